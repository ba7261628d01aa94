"""`study.count`: the counting function's numbers and the CLI's output and errors (meta device only)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from study.count import KEYS, count, main
from trainables.methods import REGISTRY


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study.count", *args], capture_output=True, text=True, timeout=300)


def test_count_lora_golden_llama7b():
    r = count("llama-7b", "lora")  # defaults: r=8 on q and v
    assert r["params_trainable"] == 4_194_304
    assert r["params_backbone"] == 6_607_343_616
    assert r["params_head"] == 4096 * 2 + 2
    assert r["params_total"] == r["params_backbone"] + r["params_trainable"] + r["params_head"]
    assert r["trainable_fraction"] == pytest.approx(4_194_304 / 6_607_343_616)
    assert r["grad_tensors"] == 4 * 32 and set(r["grad_tensor_kinds"].values()) == {32}


def test_count_overrides_go_through_strict_parsing():
    assert count("llama-7b", "lora", {"r": "16", "target_modules": "q_proj,k_proj,v_proj,o_proj"})[
        "params_trainable"] == 4 * 16 * (4096 + 4096) * 32
    with pytest.raises(ValueError, match="valid: "):
        count("llama-7b", "lora", {"rank": "8"})


def test_json_output_has_the_documented_keys():
    proc = run_cli("--backbone", "bert-tiny", "--method", "bitfit", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == set(KEYS)
    assert out["method"] == "bitfit" and out["params_trainable"] > 0


def test_memory_estimate_in_json_has_a_key_per_category(capsys):
    assert main(["--backbone", "llama-tiny", "--method", "read", "--memory", "--batch-size", "2", "--seq-len", "16",
                 "--dtype", "fp32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cats = [out[f"memory_{c}_bytes"] for c in ("params", "grads", "optimizer", "activations")]
    assert out["memory_source"] == "estimated" and out["peak_memory_bytes"] == sum(cats) > 0


def test_all_lists_every_method_up_to_max_model():
    proc = run_cli("--all", "--max-model", "llama-7b")
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert all(m in header.split() for m in REGISTRY)
    listed = [r.split()[0] for r in rows]
    assert "llama-7b" in listed and "llama-70b" not in listed and "llama-13b" not in listed


def run_main(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exc:  # argparse errors
        return int(exc.code)


BAD = [
    ["--backbone", "nope", "--method", "lora"],
    ["--backbone", "llama-tiny", "--method", "nope"],
    ["--backbone", "llama-tiny", "--method", "lora", "--set", "rank=8"],
    ["--backbone", "llama-tiny", "--method", "lora", "--set", "r=0"],
    ["--backbone", "llama-tiny", "--method", "lora", "--set", "r"],
    ["--backbone", "llama-tiny", "--method", "lora", "--set", "target_modules=o_projection"],
    ["--backbone", "llama-tiny"],
    ["--all", "--method", "lora", "--set", "rank=8"],
    ["--all", "--max-model", "nope"],
    ["--backbone", "bert-tiny", "--method", "prompt", "--memory", "--seq-len", "512"],  # + 20 virtual > 512
    ["--bogus"],
]


@pytest.mark.parametrize("args", BAD)
def test_bad_input_returns_2_with_one_line(args, capsys):
    assert run_main(*args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err


@pytest.mark.parametrize("args", [BAD[2], BAD[-1]])  # a config error and an argparse error, end to end
def test_bad_input_exits_2_with_one_line(args):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
