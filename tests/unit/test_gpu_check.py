"""The GPU check's logic on CPU inputs: the cuda-against-estimate table and its 10% tolerance, and what it
does without a GPU (skipped; or one error line where an NVIDIA device is present but torch has no CUDA)."""

from __future__ import annotations

import pytest
import torch

from study import gpu_check
from study.gpu_check import Measured

MIB = 2**20


def test_table_passes_within_tolerance_and_names_each_failure():
    rows = [Measured("read", "minilm-l6", "cuda", 105 * MIB, 130 * MIB, 100 * MIB),
            Measured("full", "smollm2-135m", "cuda", 91 * MIB, 96 * MIB, 100 * MIB)]
    lines, ok = gpu_check.table(rows)
    assert ok and len(lines) == 3 and "+5.0%" in lines[1] and "-9.0%" in lines[2]
    assert "130.0" in lines[1]  # the reserved peak is shown beside the allocated one

    beyond = Measured("lst", "smollm2-135m", "cuda", 111 * MIB, None, 100 * MIB)
    below = Measured("lora", "minilm-l6", "cuda", 89 * MIB, None, 100 * MIB)
    estimated = Measured("lst", "minilm-l6", "estimated", 100 * MIB, None, 100 * MIB)  # not what a builder measured
    missing = Measured("lora", "smollm2-135m", "cuda", 100 * MIB, 100 * MIB, None)
    for bad, says in ((beyond, "OFF BY MORE THAN 10%"), (below, "OFF BY MORE THAN 10%"),
                      (estimated, "not measured on cuda (estimated)"), (missing, "no estimate")):
        lines, ok = gpu_check.table([rows[0], bad])
        assert not ok and lines[-1].endswith(says), lines[-1]
    assert gpu_check.table([]) == ([gpu_check.table([])[0][0]], False)  # no rows is no check


def test_nvidia_device_is_seen_by_its_node_or_nvidia_smi(tmp_path):
    node = tmp_path / "nvidia0"
    assert not gpu_check.nvidia_present(node, smi=str(tmp_path / "absent"))
    node.touch()
    assert gpu_check.nvidia_present(node)
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A10G (UUID: GPU-x)'\n")
    smi.chmod(0o755)
    assert gpu_check.nvidia_present(tmp_path / "none", smi=str(smi))
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed'; exit 9\n")
    assert not gpu_check.nvidia_present(tmp_path / "none", smi=str(smi))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU paths")
def test_without_a_gpu_it_skips_unless_a_gpu_is_there_and_torch_cannot_use_it(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "nvidia_present", lambda: False)
    assert gpu_check.main([]) == 0
    assert capsys.readouterr().out.startswith("skipped: no GPU")
    monkeypatch.setattr(gpu_check, "nvidia_present", lambda: True)
    assert gpu_check.main([]) == 1
    out = capsys.readouterr().out
    assert out.startswith("error: an NVIDIA GPU is on this machine but torch") and out.count("\n") == 1
