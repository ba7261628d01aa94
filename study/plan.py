"""Plan a study before running anything: exact counts and memory estimates on the meta device.

Every (method, backbone) pair gets its parameter counts and an estimated peak training
memory (`trainables.memory.estimate_step`, no weights allocated). Pairs that fit this
machine run as trials; the rest become `estimated` rows in trials.parquet with the
reason — never silently dropped.

On a GPU budget (a local GPU, or `--gpu-memory-gib` for a cluster's workers) every backbone
with a checkpoint runs pretrained in bf16 when its estimated step fits one GPU; a side
method whose step fits only with the frozen backbone offloaded runs with ZeRO-3 (params on
the host, one block gathered at a time); graft methods train inside the backbone, so for
them there is no such way out. On CPU, fp32, and backbones whose blocks are too slow for
this machine are estimated only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from study.count import count
from trainables import backbones
from trainables.methods import get_method
from trainables.methods.base import default_pooling


@dataclass(frozen=True)
class Budget:
    """What this machine can run: memory per trial, and compute (non-embedding params) on CPU."""

    device: str = "cpu"
    memory_bytes: int = 8 * 2**30
    cpu_max_block_params: int = 30_000_000  # CPU trials beyond this are too slow to be worth running
    cpus_per_trial: int = 1
    gpus_per_trial: int = 0

    @staticmethod
    def detect(concurrent_trials: int = 2, gpu_memory_gib: float | None = None) -> Budget:
        """This machine's GPU, else `gpu_memory_gib` (the workers' GPUs, for a driver on a CPU head
        of an autoscaling cluster, which has no GPU to look at), else a share of this machine's RAM."""
        mem = int(gpu_memory_gib * 2**30) if gpu_memory_gib else None
        if mem is None and torch.cuda.is_available():
            mem = torch.cuda.get_device_properties(0).total_memory
        if mem is not None:
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
    batch_size: int | None = None
    seq_len: int | None = None
    dtype: str = "fp32"  # fp32 | bf16: the trial's compute dtype
    zero: bool = False  # the frozen backbone under ZeRO-3 (side methods whose step fits only so)
    peak_bytes: int | None = None  # the estimated peak of the step as it will run (with ZeRO-3: offloaded)

    @property
    def where(self) -> str:
        if not self.runnable:
            return "estimated only"
        device = "gpu" if self.resources.get("gpu") else "cpu"
        return f"{device} + ZeRO-3" if self.zero else device

    def line(self) -> str:
        """One human line of the dry run: where it runs, with which weights and dtype, the peak, or why not."""
        peak = "n/a" if self.peak_bytes is None else f"{self.peak_bytes / 2**30:.2f} GiB"
        head = f"{self.method:<8} {self.backbone:<28}"
        if not self.runnable:
            return f"{head} estimated only (peak {peak}): {self.reason}"
        return f"{head} runs on {self.where}, {self.weights} weights, {self.dtype}, estimated peak {peak}"

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "backbone": self.backbone, "runnable": self.runnable, "where": self.where,
                "weights": self.weights, "dtype": self.dtype, "zero": self.zero, "peak_bytes": self.peak_bytes,
                "reason": self.reason, "resources": self.resources, **self.counts}

    def estimated_row(self) -> dict[str, Any]:
        """The plan as a trials.parquet row: default-config counts and memory, status `estimated`."""
        return {**describe(self.method, self.backbone), "weights": self.weights, "status": "estimated",
                "pooling": default_pooling(backbones.get_spec(self.backbone)),
                "error": None if self.runnable else self.reason, "batch_size": self.batch_size,
                "max_length": self.seq_len, **self.counts, **(self.memory or {})}


def describe(method: str, backbone: str) -> dict[str, Any]:
    """Registry facts recorded on every row, so the analysis needs no registry."""
    spec = backbones.get_spec(backbone)
    return {"method": method, "method_family": get_method(method).family, "backbone": backbone,
            "backbone_family": spec.family, "backbone_layers": spec.n_layers, "backbone_width": spec.d_model}


def param_counts(method: str, backbone: str) -> dict[str, int]:
    """The default config's counts, as `python -m study.count` gives them (meta device)."""
    return {k: v for k, v in count(backbone, method).items() if k in ("params_total", "params_trainable", "params_head")}


def block_params(spec: backbones.BackboneSpec) -> int:
    """Parameters in the blocks: what costs compute per token (embeddings are a lookup)."""
    model = backbones.build(spec, "meta")
    blocks = spec.anatomy.get(model, "blocks")
    return sum(p.numel() for p in blocks.parameters())


def _code_fingerprint() -> str:
    """Estimates depend on the code that builds and steps the model: key the cache on it."""
    import trainables

    root = Path(trainables.__file__).parent
    h = hashlib.sha256(torch.__version__.encode())
    for f in sorted([*root.glob("*.py"), *root.glob("methods/*.py")]):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _estimate(backbone: str, method: str, batch_size: int, seq_len: int, dtype: str) -> dict[str, Any]:
    from trainables.memory import estimate_step  # fake-tensor machinery: only when planning memory

    torch.set_num_threads(1)
    return estimate_step(backbone, method, None, batch_size=batch_size, seq_len=seq_len,
                         dtype=getattr(torch, dtype)).as_dict()


def estimate_memory(pairs: Sequence[tuple[str, str]], *, batch_size: int, seq_len: int, dtype: str,
                    cache_file: Path | None, progress: Callable[[str], None]) -> dict[tuple[str, str], dict]:
    """Estimated peak memory of every pair: Ray tasks in parallel, remembered on disk by code version."""
    import ray

    fingerprint = _code_fingerprint()
    key = {pair: f"{pair[0]}|{pair[1]}|{batch_size}|{seq_len}|{dtype}|{fingerprint}" for pair in pairs}
    cache: dict[str, dict] = {}
    if cache_file is not None and cache_file.exists():
        with contextlib.suppress(ValueError, OSError):
            cache = json.loads(cache_file.read_text())
    todo = [p for p in pairs if key[p] not in cache]
    if todo:
        from study.launch import cpu_work

        task = ray.remote(num_cpus=1, **cpu_work())(_estimate)  # CPU-only: never a reason to start a GPU node
        refs = {task.remote(b, m, batch_size, seq_len, dtype): (m, b) for m, b in todo}
        pending, done = list(refs), 0
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                pair = refs[ready[0]]
                done += 1
                try:
                    cache[key[pair]] = ray.get(ready[0])
                    progress(f"memory estimate {done}/{len(todo)}: {pair[0]} on {pair[1]}")
                except ray.exceptions.RayTaskError as exc:  # one pair without an estimate, not the whole plan
                    cause = exc.as_instanceof_cause()
                    progress(f"memory estimate {done}/{len(todo)}: {pair[0]} on {pair[1]} FAILED "
                             f"({type(cause).__name__}: {(str(cause).splitlines() or [''])[-1][:200]}); no estimate")
        finally:  # what finished is kept, also when interrupted
            if cache_file is not None:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(cache))
                os.replace(tmp, cache_file)
    return {p: cache[key[p]] for p in pairs if key[p] in cache}


def zero_peak(mem: dict[str, Any], spec: backbones.BackboneSpec, dtype: torch.dtype) -> int:
    """The step's peak with the frozen backbone under ZeRO-3 param offload: its weights leave the device
    except the largest block, gathered for its forward (buffers and the method's own weights stay)."""
    from trainables.zero import weight_bytes

    model = backbones.build(spec, "meta")
    itemsize = torch.empty(0, dtype=dtype).element_size()
    largest = max(sum(p.numel() for p in b.parameters()) for b in spec.anatomy.get(model, "blocks")) * itemsize
    return int(mem["peak_memory_bytes"] - weight_bytes(spec, dtype) + largest)


def plan_pairs(methods: Sequence[str], backbone_names: Sequence[str], *, batch_size: int, seq_len: int,
               budget: Budget, estimate: bool | Sequence[str] = True, cache_file: Path | None = None,
               progress: Callable[[str], None] = lambda s: None) -> list[PairPlan]:
    """Counts (meta device) and memory estimates (fake tensors, Ray tasks) for every pair, and where each runs.

    `estimate`: True estimates every pair, False none, a list of backbone names those backbones' pairs
    (the others keep their counts; without an estimate a pair's fit is judged on its weights alone).
    """
    from trainables.zero import weight_bytes

    gpu = budget.device == "cuda"
    dtype = "bfloat16" if gpu else "float32"
    pairs = [(m, b) for b in backbone_names for m in methods]
    chosen = set(backbone_names) if estimate is True else set(estimate or ())
    memory = estimate_memory([(m, b) for m, b in pairs if b in chosen], batch_size=batch_size, seq_len=seq_len,
                             dtype=dtype, cache_file=cache_file, progress=progress) if chosen else {}
    resources = {"cpu": budget.cpus_per_trial, **({"gpu": budget.gpus_per_trial} if budget.gpus_per_trial else {})}
    gib = 2**30
    plans: list[PairPlan] = []
    for name in backbone_names:
        spec = backbones.get_spec(name)
        compute = block_params(spec)
        # a cluster downloads checkpoints; this machine uses what is on it (offline assets, HF cache, folders)
        pretrained = spec.has_checkpoint and (gpu or backbones.weights_here(spec))
        has_tokenizer = spec.tokenizer is not None and (gpu or backbones.tokenizer_here(spec))
        weights = weight_bytes(spec, getattr(torch, dtype))
        for method in methods:
            mem = memory.get((method, name))
            side = get_method(method).family != "graft"
            peak = mem["peak_memory_bytes"] if mem else None
            reason, zero_on = "", False
            if not gpu and compute > budget.cpu_max_block_params:
                reason = f"too slow on cpu: {compute / 1e6:.0f}M block params > {budget.cpu_max_block_params / 1e6:.0f}M"
            elif not has_tokenizer:
                reason = ("no tokenizer on this machine (hub id: runs on a cluster)" if spec.tokenizer
                          else "no tokenizer (a config for counting only)")
            elif (peak if peak is not None else weights) > budget.memory_bytes:
                offloaded = zero_peak(mem, spec, getattr(torch, dtype)) if mem else None
                if gpu and side and offloaded is not None and offloaded <= budget.memory_bytes:
                    zero_on, peak = True, offloaded
                else:
                    need = f"{peak / gib:.1f} GiB (estimated)" if peak is not None else f"{weights / gib:.1f} GiB of weights"
                    reason = f"needs {need} > {budget.memory_bytes / gib:.1f} GiB per {'GPU' if gpu else 'trial'}"
                    if gpu and not side:
                        reason += "; a graft method trains inside the backbone, so ZeRO-3 offload does not apply"
                    elif gpu and offloaded is not None:
                        reason += f", and {offloaded / gib:.1f} GiB even with the backbone under ZeRO-3"
            plans.append(PairPlan(method, name, "pretrained" if pretrained else "random", param_counts(method, name),
                                  mem, not reason, reason, resources, batch_size, seq_len,
                                  "bf16" if gpu else "fp32", zero_on, peak))
    return plans
