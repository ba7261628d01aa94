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

Methods are labels (`lora@nf4+gc`, study.spaces): a quantised frozen backbone (@int8, @nf4) is
estimated and placed as such — Llama-13B side methods on one 24 GB GPU and Llama-70B ones on one
80 GB GPU in NF4, where bf16 needs ZeRO-3 offload — and is never offloaded itself (ZeRO-3 does not
partition bitsandbytes weights). `compare_unquantized` plans each quantised pair's bf16/fp32
counterpart beside it, so a dry run shows both choices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from study.count import count
from study.spaces import method_label, parse_method_spec
from trainables import backbones
from trainables.methods import get_method
from trainables.methods.base import default_pooling
from trainables.methods.external import provenance

# What a trial process holds on its GPU outside torch's allocator: the CUDA context with the kernels torch
# and cuBLAS load (CUDA 12 loads them lazily). An assumed figure: measuring it takes a context, which the
# driver must not hold on a GPU its trials use; `make gpu-check` measures it (mem_get_info) and says so if
# it is larger. Of the rest, 10% is kept for the allocator's fragmentation and cached blocks (reserved
# above allocated, recorded as peak_memory_reserved_bytes).
CUDA_CONTEXT_BYTES = 512 * 2**20
GPU_HEADROOM = 0.9


def gpu_budget_bytes(total_bytes: int) -> int:
    """What one trial's step may peak at on a GPU whose real total is `total_bytes` (what CUDA and
    nvidia-smi report: an A10G's 23,028 MiB, not its nominal 24 GB)."""
    return int(GPU_HEADROOM * (total_bytes - CUDA_CONTEXT_BYTES))


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
        """This machine's GPU, else `gpu_memory_gib` (the workers' GPUs' real total, for a driver on a CPU
        head of an autoscaling cluster, which has no GPU to look at), else a share of this machine's RAM.
        On a GPU: `gpu_budget_bytes` of the device's total (the context off, 10% kept)."""
        mem = int(gpu_memory_gib * 2**30) if gpu_memory_gib else None
        if mem is None and torch.cuda.is_available():
            mem = torch.cuda.get_device_properties(0).total_memory  # the real total (no context created)
        if mem is not None:
            return Budget(device="cuda", memory_bytes=gpu_budget_bytes(mem), cpus_per_trial=2, gpus_per_trial=1,
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
    unquantized: PairPlan | None = None  # a quantised pair's unquantised counterpart (compare_unquantized)

    @property
    def where(self) -> str:
        if not self.runnable:
            return "estimated only"
        device = "gpu" if self.resources.get("gpu") else "cpu"
        return f"{device} + ZeRO-3" if self.zero else device

    def line(self) -> str:
        """One human line of the dry run: where it runs, with which weights and dtype, the peak, or why not."""
        peak = "n/a" if self.peak_bytes is None else f"{self.peak_bytes / 2**30:.2f} GiB"
        head = f"{self.method:<12} {self.backbone:<28}"
        quant = parse_method_spec(self.method)[1]
        dtype = self.dtype if quant == "none" else f"{quant} backbone, {self.dtype} compute"
        if not self.runnable:
            out = f"{head} estimated only (peak {peak}): {self.reason}"
        else:
            out = f"{head} runs on {self.where}, {self.weights} weights, {dtype}, estimated peak {peak}"
        if self.unquantized is not None:
            u = self.unquantized
            other = "n/a" if u.peak_bytes is None else f"{u.peak_bytes / 2**30:.2f} GiB"
            out += (f"\n{'':<12} {'':<28}   unquantised ({u.method}): "
                    + (f"runs on {u.where}, peak {other}" if u.runnable else f"estimated only (peak {other}): {u.reason}"))
        return out

    def as_dict(self) -> dict[str, Any]:
        name, quant, gc = parse_method_spec(self.method)
        out = {"method": self.method, "method_base": name, "quant": quant, "gradient_checkpointing": gc,
               "backbone": self.backbone, "runnable": self.runnable, "where": self.where,
               "weights": self.weights, "dtype": self.dtype, "zero": self.zero, "peak_bytes": self.peak_bytes,
               "reason": self.reason, "resources": self.resources, **self.counts}
        if self.unquantized is not None:
            u = self.unquantized
            out["unquantized"] = {"method": u.method, "runnable": u.runnable, "where": u.where, "zero": u.zero,
                                  "peak_bytes": u.peak_bytes, "reason": u.reason}
        return out

    def estimated_row(self) -> dict[str, Any]:
        """The plan as a trials.parquet row: default-config counts and memory, status `estimated`."""
        return {**describe(self.method, self.backbone), "weights": self.weights, "status": "estimated",
                "pooling": default_pooling(backbones.get_spec(self.backbone)),
                "error": None if self.runnable else self.reason, "batch_size": self.batch_size,
                "max_length": self.seq_len, **self.counts, **(self.memory or {})}


def describe(method: str, backbone: str) -> dict[str, Any]:
    """Registry facts recorded on every row, so the analysis needs no registry. `method` is a label
    (study.spaces): the row's `method` is the label, `method_base` the registry name."""
    spec = backbones.get_spec(backbone)
    name, quant, gc = parse_method_spec(method)
    return {"method": method_label(name, quant, gc), "method_base": name, "quant": quant,
            "gradient_checkpointing": gc, "method_family": get_method(name).family, "backbone": backbone,
            "backbone_family": spec.family, "backbone_layers": spec.n_layers, "backbone_width": spec.d_model,
            **provenance(name)}  # the method's module, version and file hash


def param_counts(method: str, backbone: str) -> dict[str, int]:
    """The default config's counts, as `python -m study.count` gives them (meta device; a quantised backbone
    has as many parameters as its unquantised one)."""
    return dict(_counts(parse_method_spec(method)[0], backbone))


@functools.lru_cache(maxsize=256)  # a label's twins (lora, lora+gc, lora@nf4) share one count: 70B builds take ~1 s
def _counts(method: str, backbone: str) -> dict[str, int]:
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
    name, quant, gc = parse_method_spec(method)  # a label: lora@nf4+gc
    extra = {"quant": quant, "gradient_checkpointing": gc} if quant != "none" or gc else {}
    # the plan estimates in bf16 exactly when its budget is a GPU's (plan_pairs): the step as CUDA runs it
    return estimate_step(backbone, name, None, batch_size=batch_size, seq_len=seq_len,
                         dtype=getattr(torch, dtype), device_type="cuda" if dtype == "bfloat16" else "cpu",
                         **extra).as_dict()


def estimate_memory(pairs: Sequence[tuple[str, str]], *, batch_size: int, seq_len: int, dtype: str,
                    cache_file: Path | None, progress: Callable[[str], None]) -> dict[tuple[str, str], dict]:
    """Estimated peak memory of every (method label, backbone) pair: Ray tasks in parallel, remembered on disk
    by code version (the label carries the quantisation and checkpointing)."""
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
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return int(mem["peak_memory_bytes"] - quantized_weight_bytes(spec, dtype, "none") + _largest_block(spec.name) * itemsize)


@functools.lru_cache(maxsize=256)
def _largest_block(name: str) -> int:
    spec = backbones.get_spec(name)
    return max(sum(p.numel() for p in b.parameters()) for b in spec.anatomy.get(backbones.build(spec, "meta"), "blocks"))


@functools.lru_cache(maxsize=256)
def _weights_by_kind(name: str) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(all parameters, (numel, output rows) of every Linear weight in the blocks) of a registered backbone."""
    spec = backbones.get_spec(name)
    model = backbones.build(spec, "meta")
    linears = tuple((m.weight.numel(), m.weight.shape[0]) for block in spec.anatomy.get(model, "blocks")
                    for m in block.modules() if isinstance(m, torch.nn.Linear))
    return sum(p.numel() for p in model.parameters()), linears


def quantized_weight_bytes(spec: backbones.BackboneSpec, dtype: torch.dtype, quant: str,
                           double: bool = False) -> int:
    """Bytes of the backbone's weights with its blocks' Linear weights quantised (bitsandbytes' layout:
    NF4 packs two weights a byte plus an fp32 absmax per 64, or with double quantisation an 8-bit one and
    an fp32 per 256 of those; int8 one byte a weight plus an fp32 scale per output row); embeddings,
    norms and biases stay in `dtype`. Analytic: what the plan judges a fit by where it has no estimate."""
    n_all, linears = _weights_by_kind(spec.name)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    total = n_all * itemsize
    if quant == "none":
        return total
    for n, rows in linears:
        if quant == "nf4":
            packed = n // 2 + (n // 64 + n // 64 // 256 * 4 if double else n // 64 * 4)
        else:
            packed = n + rows * 4
        total += packed - n * itemsize
    return total


def plan_pairs(methods: Sequence[str], backbone_names: Sequence[str], *, batch_size: int, seq_len: int,
               budget: Budget, estimate: bool | Sequence[str] = True, cache_file: Path | None = None,
               progress: Callable[[str], None] = lambda s: None, compare_unquantized: bool = False,
               ) -> list[PairPlan]:
    """Counts (meta device) and memory estimates (fake tensors, Ray tasks) for every pair, and where each runs.

    `methods` are labels (`read`, `read@nf4`, `lora@nf4+gc`). `estimate`: True estimates every pair, False
    none, a list of backbone names those backbones' pairs (the others keep their counts; without an estimate
    a pair's fit is judged on its weights alone). `compare_unquantized`: each quantised pair also gets its
    unquantised counterpart's plan (`PairPlan.unquantized`), for the dry run.
    """
    if compare_unquantized:
        labels = list(dict.fromkeys(methods))
        twins = {m: method_label(n, "none", gc) for m in labels for n, q, gc in [parse_method_spec(m)] if q != "none"}
        plans = plan_pairs(list(dict.fromkeys([*labels, *twins.values()])), backbone_names, batch_size=batch_size,
                           seq_len=seq_len, budget=budget, estimate=estimate, cache_file=cache_file,
                           progress=progress)
        by_pair = {(p.method, p.backbone): p for p in plans}
        return [dataclasses.replace(p, unquantized=by_pair.get((twins[p.method], p.backbone)))
                if p.method in twins else p for p in plans if p.method in labels]
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
        weights_by_quant: dict[str, int] = {}
        for method in methods:
            base, quant, _ = parse_method_spec(method)
            if quant not in weights_by_quant:  # quant none: trainables.zero.weight_bytes, from the same cached count
                weights_by_quant[quant] = quantized_weight_bytes(spec, getattr(torch, dtype), quant)
            weights = weights_by_quant[quant]
            mem = memory.get((method, name))
            side = get_method(base).family != "graft"
            peak = mem["peak_memory_bytes"] if mem else None
            reason, zero_on = "", False
            if not gpu and compute > budget.cpu_max_block_params:
                reason = f"too slow on cpu: {compute / 1e6:.0f}M block params > {budget.cpu_max_block_params / 1e6:.0f}M"
            elif not has_tokenizer:
                reason = ("no tokenizer on this machine (hub id: runs on a cluster)" if spec.tokenizer
                          else "no tokenizer (a config for counting only)")
            elif (peak if peak is not None else weights) > budget.memory_bytes:
                offloaded = zero_peak(mem, spec, getattr(torch, dtype)) if mem else None
                offloaded = None if quant != "none" else offloaded  # ZeRO-3 does not partition bitsandbytes weights
                if gpu and side and offloaded is not None and offloaded <= budget.memory_bytes:
                    zero_on, peak = True, offloaded
                else:
                    need = f"{peak / gib:.1f} GiB (estimated)" if peak is not None else f"{weights / gib:.1f} GiB of weights"
                    reason = f"needs {need} > {budget.memory_bytes / gib:.1f} GiB per {'GPU' if gpu else 'trial'}"
                    if gpu and not side:
                        reason += "; a graft method trains inside the backbone, so ZeRO-3 offload does not apply"
                    elif gpu and quant != "none":
                        reason += f"; a {quant} backbone is not offloaded (ZeRO-3 does not partition its weights)"
                    elif gpu and offloaded is not None:
                        reason += f", and {offloaded / gib:.1f} GiB even with the backbone under ZeRO-3"
            plans.append(PairPlan(method, name, "pretrained" if pretrained else "random", param_counts(method, name),
                                  mem, not reason, reason, resources, batch_size, seq_len,
                                  "bf16" if gpu else "fp32", zero_on, peak))
    return plans
