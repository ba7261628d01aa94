"""The planner's budget: what one trial may use, from this machine or from the flag for a cluster's GPUs."""

from __future__ import annotations

import pytest
import torch

from study import plan


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_without_a_gpu_trials_plan_for_cpu_and_a_share_of_ram():
    b = plan.Budget.detect(concurrent_trials=2)
    assert b.device == "cpu" and b.gpus_per_trial == 0 and b.memory_bytes > 0


def test_gpu_memory_flag_plans_gpu_trials_from_a_cpu_head():
    b = plan.Budget.detect(gpu_memory_gib=24)
    assert b.device == "cuda" and b.gpus_per_trial == 1
    # the context off the device's total, then 10% kept for the allocator's fragmentation and cache
    assert b.memory_bytes == int(0.9 * (24 * 2**30 - plan.CUDA_CONTEXT_BYTES))
    a10g = plan.Budget.detect(gpu_memory_gib=23028 / 1024)  # what an A10G reports, not its nominal 24 GB
    assert 19.7 < a10g.memory_bytes / 2**30 < 19.8 < 0.9 * 24
    assert b.cpu_max_block_params > 10**12  # no "too slow on cpu" cut on GPUs


def test_memory_estimates_cover_only_the_backbones_asked_for(monkeypatch):
    asked: list[tuple[str, str]] = []

    def estimate_memory(pairs, **_):  # the fake-tensor estimate itself is tested in test_memory_energy.py
        asked.extend(pairs)
        return {pair: {"peak_memory_bytes": 1000, "memory_source": "estimated"} for pair in pairs}

    monkeypatch.setattr(plan, "estimate_memory", estimate_memory)
    budget = plan.Budget(memory_bytes=2**30)
    pairs = plan.plan_pairs(["probe", "read"], ["bert-tiny", "llama-tiny"], batch_size=2, seq_len=8, budget=budget,
                            estimate=["llama-tiny"])
    assert asked == [("probe", "llama-tiny"), ("read", "llama-tiny")]
    memory = {(p.method, p.backbone): p.memory for p in pairs}
    assert memory["read", "llama-tiny"]["peak_memory_bytes"] == 1000 and memory["read", "bert-tiny"] is None
    assert all(p.counts["params_total"] > 0 for p in pairs)  # counted either way
    asked.clear()
    plan.plan_pairs(["probe"], ["bert-tiny"], batch_size=2, seq_len=8, budget=budget, estimate=False)
    assert asked == []
    plan.plan_pairs(["probe"], ["bert-tiny", "llama-tiny"], batch_size=2, seq_len=8, budget=budget, estimate=True)
    assert asked == [("probe", "bert-tiny"), ("probe", "llama-tiny")]


def test_a_cpu_study_estimates_what_runs_and_the_top_a_gpu_study_or_a_dry_run_everything():
    from study import scaling

    run, ladder = ["minilm-l6", "llama-11m"], ["minilm-l6", "llama-11m", "bert-base", "llama-7b"]

    def chosen(*flags: str, gpu: bool = False) -> list[str]:
        return scaling.to_estimate(scaling.parse(["--max-model", "llama-7b", *flags]), gpu, run, ladder)

    assert chosen() == ["minilm-l6", "llama-11m", "llama-7b"]
    assert chosen(gpu=True) == chosen("--dry-run") == chosen("--estimate-ladder") == ladder
    assert chosen("--no-memory-estimates") == chosen("--no-memory-estimates", gpu=True) == []


def test_estimate_ladder_with_no_memory_estimates_is_one_clear_error():
    from study import runner, scaling

    with pytest.raises(runner.UsageError, match="contradict"):
        scaling.main(["--estimate-ladder", "--no-memory-estimates", "--dry-run"])
