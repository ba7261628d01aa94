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
    assert b.memory_bytes == int(24 * 2**30 * 0.9)  # 10% kept for the allocator and kernels' workspaces
    assert b.cpu_max_block_params > 10**12  # no "too slow on cpu" cut on GPUs
