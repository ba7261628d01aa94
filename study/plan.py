"""Plan a study before running anything: exact counts and memory estimates on the meta device.

Every (method, backbone) pair gets its parameter counts and an estimated peak training
memory (`trainables.memory.estimate_step`, no weights allocated). Pairs that fit this
machine run as trials; the rest become `estimated` rows in trials.parquet with the
reason — never silently dropped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trainables import backbones
from trainables.methods import apply_method, get_method


@dataclass(frozen=True)
class Budget:
    """What this machine can run: memory per trial, and compute (non-embedding params) on CPU."""

    device: str = "cpu"
    memory_bytes: int = 8 * 2**30
    cpu_max_block_params: int = 30_000_000  # CPU trials beyond this are too slow to be worth running
    cpus_per_trial: int = 1
    gpus_per_trial: int = 0

    @staticmethod
    def detect(concurrent_trials: int = 2) -> Budget:
        if torch.cuda.is_available():
            mem = torch.cuda.get_device_properties(0).total_memory
            return Budget(device="cuda", memory_bytes=int(mem * 0.9), cpus_per_trial=2, gpus_per_trial=1,
                          cpu_max_block_params=10**13)
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return Budget(memory_bytes=int(total * 0.6 / concurrent_trials))


@dataclass(frozen=True)
class PairPlan:
    method: str
    backbone: str
    weights: str  # pretrained | random
    counts: dict[str, int]
    memory: dict[str, Any] | None  # MemoryReport.as_dict(), source "estimated"
    runnable: bool
    reason: str = ""
    resources: dict[str, float] = field(default_factory=dict)

    def estimated_row(self) -> dict[str, Any]:
        spec = backbones.get_spec(self.backbone)
        return {"method": self.method, "method_family": get_method(self.method).family,
                "backbone": self.backbone, "backbone_family": spec.family, "backbone_layers": spec.n_layers,
                "backbone_width": spec.d_model, "weights": self.weights, "status": "estimated",
                "error": self.reason, **self.counts, **(self.memory or {})}


def block_params(spec: backbones.BackboneSpec) -> int:
    """Parameters in the blocks: what costs compute per token (embeddings are a lookup)."""
    model = backbones.build(spec, "meta")
    blocks = spec.anatomy.get(model, "blocks")
    return sum(p.numel() for p in blocks.parameters())


def counts(method: str, backbone: str, method_config: dict | None = None, n_labels: int = 2) -> dict[str, int]:
    spec = backbones.get_spec(backbone)
    model = apply_method(method, backbones.build(spec, "meta"), spec, method_config or {}, n_labels=n_labels)
    return model.param_counts()


def plan_pairs(methods: Sequence[str], backbone_names: Sequence[str], *, batch_size: int, seq_len: int,
               budget: Budget, estimate_memory: bool = True,
               progress: Callable[[str], None] = lambda s: None) -> list[PairPlan]:
    dtype = torch.bfloat16 if budget.device == "cuda" else torch.float32
    plans: list[PairPlan] = []
    for name in backbone_names:
        spec = backbones.get_spec(name)
        weights = "pretrained" if spec.local else "random"
        compute = block_params(spec)
        for method in methods:
            progress(f"plan {method} on {name}")
            memory = None
            if estimate_memory:
                from trainables.memory import estimate_step  # fake-tensor machinery: only when asked

                memory = estimate_step(name, method, None, batch_size=batch_size, seq_len=seq_len,
                                       dtype=dtype).as_dict()
            reason = ""
            if spec.tokenizer is None:
                reason = "no offline tokenizer/weights here (hub id for clusters)"
            elif budget.device == "cpu" and compute > budget.cpu_max_block_params:
                reason = f"too slow on cpu: {compute / 1e6:.0f}M block params > {budget.cpu_max_block_params / 1e6:.0f}M"
            elif memory and memory["peak_memory_bytes"] > budget.memory_bytes:
                reason = (f"needs {memory['peak_memory_bytes'] / 2**30:.1f} GiB (estimated) > "
                          f"{budget.memory_bytes / 2**30:.1f} GiB per trial")
            resources = {"cpu": budget.cpus_per_trial, **({"gpu": budget.gpus_per_trial} if budget.gpus_per_trial else {})}
            plans.append(PairPlan(method, name, weights, counts(method, name), memory, not reason, reason, resources))
    return plans
