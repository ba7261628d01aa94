"""Method specs NAME[@QUANT][+gc] (study.spaces), their rows' labels, and the plan with quantised backbones."""

from __future__ import annotations

import json

import pytest
import torch

from study import plan, runner, spaces
from trainables import backbones


@pytest.mark.parametrize(("spec", "parsed", "label"), [
    ("lora", ("lora", "none", False), "lora"),
    ("lora+gc", ("lora", "none", True), "lora+gc"),
    ("lora@nf4", ("lora", "nf4", False), "lora@nf4"),
    ("lora@nf4+gc", ("lora", "nf4", True), "lora@nf4+gc"),
    ("lora@none", ("lora", "none", False), "lora"),
    ("full+gc", ("full", "none", True), "full+gc"),
    ("read@int8", ("read", "int8", False), "read@int8"),
])
def test_a_spec_parses_to_name_quant_gc_and_its_label_is_canonical(spec, parsed, label):
    assert spaces.parse_method_spec(spec) == parsed
    assert spaces.method_label(*parsed) == label


@pytest.mark.parametrize(("spec", "message"), [
    ("bogus", "unknown method 'bogus'; valid: .*lora"),
    ("lora@nf3", "unknown quantisation 'nf3'; valid: none, int8, nf4"),
    ("lora@", "valid: none, int8, nf4"),
    ("full@nf4", "full fine-tuning trains the backbone"),
    ("read+gc", "does not backpropagate through the backbone"),
    ("probe+gc", "does not backpropagate through the backbone"),
])
def test_a_bad_spec_is_one_line_naming_the_valid_choices(spec, message):
    with pytest.raises(ValueError, match=message) as e:
        spaces.parse_method_spec(spec)
    assert "\n" not in str(e.value)


def test_study_wide_quant_and_checkpointing_apply_where_they_apply():
    got = spaces.resolve_methods(["probe", "read", "lora", "lora@int8", "lora@none", "full", "lora@nf4"],
                                 quant="nf4", gradient_checkpointing=True)
    # full keeps its weights, side methods do not checkpoint, an entry's own @QUANT wins, duplicates go
    assert [m.label for m in got] == ["probe@nf4", "read@nf4", "lora@nf4+gc", "lora@int8+gc", "lora+gc", "full+gc"]
    assert got[2].run_fields() == {"method": "lora", "quant": "nf4", "gradient_checkpointing": True}


def test_rows_carry_the_label_and_the_registry_name():
    row = plan.describe("lora@nf4+gc", "bert-tiny")
    assert (row["method"], row["method_base"], row["quant"], row["gradient_checkpointing"]) == (
        "lora@nf4+gc", "lora", "nf4", True)
    assert row["method_family"] == "graft"


def test_a_bad_methods_entry_is_one_clear_error_before_ray():
    from study import scaling

    for bad, match in (("full@nf4", "full fine-tuning trains"), ("lora@fp8", "valid: none, int8, nf4")):
        with pytest.raises(runner.UsageError, match=match):
            scaling.main(["--methods", "read", bad, "--dry-run"])


def _analytic(pairs, **_):
    """Stand-in for the fake-tensor estimate (70B's takes minutes): the frozen weights as loaded plus 2 GiB
    for the method's own state and activations at this small batch."""
    out = {}
    for label, backbone in pairs:
        quant = spaces.parse_method_spec(label)[1]
        weights = plan.quantized_weight_bytes(backbones.get_spec(backbone), torch.bfloat16, quant)
        out[label, backbone] = {"peak_memory_bytes": weights + 2 * 2**30, "memory_source": "estimated"}
    return out


@pytest.mark.parametrize(("gib", "backbone"), [(24, "llama-13b"), (80, "llama-70b")])
def test_with_nf4_side_methods_of_a_big_llama_run_on_one_gpu_instead_of_zero_offload(monkeypatch, gib, backbone):
    monkeypatch.setattr(plan, "estimate_memory", _analytic)
    labels = [m.label for m in spaces.resolve_methods(["read", "lst", "probe", "full"], quant="nf4")]
    assert labels == ["read@nf4", "lst@nf4", "probe@nf4", "full"]
    pairs = plan.plan_pairs(labels, [backbone], batch_size=16, seq_len=32,
                            budget=plan.Budget.detect(gpu_memory_gib=gib), compare_unquantized=True)
    by = {p.method: p for p in pairs}
    assert [p.method for p in pairs] == labels  # the unquantised twins ride along, not as pairs of their own
    for side in ("read@nf4", "lst@nf4", "probe@nf4"):
        p = by[side]
        assert p.runnable and not p.zero and p.where == "gpu", p.line()
        assert p.unquantized is not None and p.unquantized.zero, p.unquantized.line()  # bf16: only with ZeRO-3
        assert "unquantised" in p.line() and "ZeRO-3" in p.line()
    assert not by["full"].runnable and by["full"].unquantized is None


def test_nf4_weights_are_about_a_quarter_of_bf16():
    spec = backbones.get_spec("llama-7b")
    bf16 = plan.quantized_weight_bytes(spec, torch.bfloat16, "none")
    nf4 = plan.quantized_weight_bytes(spec, torch.bfloat16, "nf4")
    int8 = plan.quantized_weight_bytes(spec, torch.bfloat16, "int8")
    assert 0.25 < nf4 / bf16 < 0.35 and 0.45 < int8 / bf16 < 0.55  # embeddings and norms stay bf16


def test_memory_claims_restated_against_the_lowest_peak_baseline(tmp_path):
    from analysis import claims
    from study import schema

    peaks = {"full": 100, "full+gc": 60, "lora": 80, "lora+gc": 40, "lora@nf4": 50, "lora@nf4+gc": 30, "read": 35}
    rows = [{"study": "s", "trial_id": f"{m}-{b}", "method": m, "backbone": b, "status": "ok", "batch_size": 16,
             "max_length": 32, "peak_memory_bytes": peak * scale, "memory_source": "tracked"}
            for b, scale in (("b1", 1), ("b2", 2)) for m, peak in peaks.items()]
    schema.write_trials(rows, tmp_path / "trials.parquet")
    trials = claims.read_trials(tmp_path)
    by = {(v.claim, v.scope): v for v in claims.strongest_verdicts(trials)}
    v = by["read-memory-56", "vs strongest baseline, source=tracked"]
    # READ 35 against QLoRA + checkpointing's 30: more memory than the strongest baseline, though -65% vs full
    assert v.verdict == claims.NOT_SUPPORTED and v.statistic == pytest.approx(35 / 30 - 1) and v.n == 2
    assert v.details["strongest"] == {"lora@nf4+gc": 2}
    assert by["lst-memory-69", "vs strongest baseline, source=tracked"].verdict == claims.NO_DATA
    paper = {(x.claim, x.scope): x for x in claims.cost_verdicts(trials)}["read-memory-56", "source=tracked"]
    assert paper.verdict == claims.SUPPORTED  # the paper's comparison, vs plain full fine-tuning, stands beside it


@pytest.mark.parametrize(("argv", "needle"), [
    (["memory-quant", "--methods", "full@nf4"], "full fine-tuning trains the backbone"),
    (["memory-quant", "--large", "gpt-9"], "unknown backbone"),
])
def test_memory_quant_bench_refuses_bad_input_in_one_line(argv, needle, capsys):
    from study import bench

    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_count_takes_a_method_spec(capsys):
    from study import count

    assert count.main(["--backbone", "bert-tiny", "--method", "lora@nf4+gc", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["method"], out["method_base"], out["quant"], out["gradient_checkpointing"]) == (
        "lora@nf4+gc", "lora", "nf4", True)
    assert count.main(["--backbone", "bert-tiny", "--method", "full@int8"]) == 2
