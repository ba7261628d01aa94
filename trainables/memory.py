"""Peak memory of one training step, split into params / grads / optimizer / activations.

One step = forward + backward + AdamW step, in steady state: the optimizer state already
exists when the step starts (it is created by a zero-gradient "priming" step first), as
it does from the second step of a real run on. Three sources, one accounting:

- ``cuda``: ``torch.cuda.max_memory_allocated`` around a real step on the GPU gives the
  peak (``max_memory_reserved`` is kept beside it); the split comes from the same tracker as below.
- ``tracked``: a real step on the CPU under ``torch.distributed._tools.mem_tracker.MemTracker``
  (a TorchDispatchMode that follows every tensor storage and tags it as parameter, buffer,
  gradient, optimizer state or activation/temporary). It is device-agnostic and works on
  CPU in torch 2.13, so we use it rather than writing our own.
- ``estimated``: the same tracked step on fake tensors (``FakeTensorMode``): the model is
  built on the meta device and materialised as fake CPU tensors with ``to_empty``, so a
  Llama-7B (or 70B) step is accounted op by op in seconds without allocating its memory.
  On a small config estimated and tracked agree to the byte (same ops, same storages).
  Estimated for a GPU (``device_type="cuda"``), the step is the one CUDA runs: CUDA autocast's
  float32 ops (LayerNorm, softmax, the loss) in fp32 where CPU autocast keeps bf16, and the
  cuBLAS workspaces torch allocates per thread and stream (``cublas_workspace_bytes``).

Categories at the peak: ``params`` = parameters + buffers (resident model state),
``grads`` = gradients of parameters live at that moment, ``optimizer`` = the optimizer's
persistent state (AdamW: exp_avg, exp_avg_sq, step), ``activations`` = everything else
(saved activations, gradients of activations, optimizer temporaries, the batch; on CUDA
also allocator rounding and library workspaces).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

SOURCES = ("cuda", "tracked", "estimated")
BATCH_KEYS = ("input_ids", "attention_mask", "labels")


@dataclass(frozen=True)
class MemoryReport:
    """Peak bytes of one training step and its split; the four categories sum to the peak."""

    peak_bytes: int
    params: int
    grads: int
    optimizer: int
    activations: int
    source: str
    flops: int | None = None  # FLOPs of forward + backward (FlopCounterMode), when counted in the same step
    reserved_bytes: int | None = None  # cuda: the allocator's reserved peak (max_memory_reserved); else None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"memory source {self.source!r}; valid: {', '.join(SOURCES)}")

    def as_dict(self) -> dict[str, int | str]:
        """The results-schema columns (trials.parquet)."""
        return {
            "peak_memory_bytes": self.peak_bytes,
            "peak_memory_reserved_bytes": self.reserved_bytes,
            "memory_params_bytes": self.params,
            "memory_grads_bytes": self.grads,
            "memory_optimizer_bytes": self.optimizer,
            "memory_activations_bytes": self.activations,
            "memory_source": self.source,
        }


# --------------------------------------------------------------------------- the tracker

class _PeakTracker(MemTracker):
    """MemTracker (torch 2.13) with two hand-written overrides of its private hooks.

    1. Frozen parameters: the stock tracker registers a gradient hook on every parameter
       of every module it enters, which raises for parameters that do not require grad
       (every PETL method's frozen backbone). We track all parameters but hook only the
       trainable ones, tagging their gradients as the stock hook does.
    2. Speed: the stock `_update_peak_stats` also updates a per-module peak for every
       active module after every op: ~70% of the run time on Llama-7B (profiled: 61 of
       85 s). We need only the global peak, the other half of that method.
    """

    def _track_module_params_and_buffers(self, module: nn.Module,
                                         install_grad_hooks: bool = True) -> tuple[int, int]:
        sizes = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for p in module.parameters():
                if p.requires_grad and p not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[p] = (
                        p.register_hook(self._tag_grad),
                        p.register_post_accumulate_grad_hook(lambda q: self._tag_grad(q.grad)),
                    )
        return sizes

    def _tag_grad(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)


def _storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared state counted once)."""
    storages = {st for t in tensors for st in get_untyped_storages(t)}
    return sum(st.nbytes() for st in storages)


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _storage_bytes(v for state in optimizer.state.values() for v in state.values()
                          if isinstance(v, torch.Tensor))


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float = 0.01,
          foreach: bool | None = None) -> torch.optim.AdamW:
    """The study's optimizer, in every trial and every memory measurement.

    `foreach=None` picks the kernel training uses on the parameters' device: torch's fused
    AdamW on CPU (the same update to ~1e-7, and ~6× faster than AdamW's CPU default, a
    per-parameter loop: 0.04 s against 0.28 s a step for MiniLM-L6's 22.6M parameters, measured
    here), AdamW's own choice elsewhere (foreach on CUDA). True or False force the foreach or
    per-parameter kernel (an estimate of a CUDA step, fake tensors being CPU tensors).
    """
    if foreach is None and params and all(p.device.type == "cpu" for p in params):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=foreach)


def _make_optimizer(params: list[nn.Parameter], lr: float, foreach: bool | None) -> torch.optim.AdamW:
    """AdamW with its state created by one zero-gradient step (weights are restored by the caller)."""
    optimizer = adamw(params, lr, foreach=foreach)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def _loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    out = model(**{k: batch[k] for k in BATCH_KEYS if k in batch})
    return out.loss if hasattr(out, "loss") else out


def _tracked_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, torch.Tensor],
                  forward_context: contextlib.AbstractContextManager | None = None) -> dict[str, int]:
    """Run forward+backward+step under the tracker; categories at the tracker's peak."""
    tracker = _PeakTracker()
    tracker.track_external(model, optimizer, *batch.values())
    for t in quant_constants(model):  # resident beside the packed weights, but neither parameter nor buffer
        tracker._update_and_maybe_create_winfos(t, _MemRefType.PARAM)
    with tracker:
        with forward_context or contextlib.nullcontext():
            loss = _loss(model, batch)
        loss.backward()
        optimizer.step()
    # One device in practice (the batch is moved to the model's); sum in case of strays.
    snaps = tracker.get_tracker_snapshot("peak").values()

    def peak_of(*keys: Any) -> int:
        return int(sum(snap.get(k, 0) for snap in snaps for k in keys))

    total = peak_of("Total")
    params = peak_of(_MemRefType.PARAM, _MemRefType.BUFFER)
    grads = peak_of(_MemRefType.GRAD)
    # The tracker tags every tensor allocated inside optimizer.step() as optimizer state,
    # temporaries included; the persistent state is what the optimizer still holds.
    optimizer_bytes = _optimizer_state_bytes(optimizer)
    return {"peak_bytes": total, "params": params, "grads": grads, "optimizer": optimizer_bytes,
            "activations": total - params - grads - optimizer_bytes}


# --------------------------------------------------------------------------- measured

@contextlib.contextmanager
def _restored(model: nn.Module, devices: list[torch.device]) -> Iterator[None]:
    """Same trainable weights, no grads, same train/eval mode and RNG after the measurement.

    The snapshot goes to host memory so it does not count towards the GPU peak.
    """
    snapshot = {id(p): p.detach().to("cpu", copy=True) for p in _trainable(model)}
    was_training = model.training
    cuda_devices = [d for d in devices if d.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=cuda_devices, device_type="cuda"):
            yield
    finally:
        with torch.no_grad():
            for p in _trainable(model):
                p.copy_(snapshot[id(p)])
                p.grad = None
        model.train(was_training)


def _on_cuda(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def measure_step(model: nn.Module, batch: Mapping[str, torch.Tensor], *, lr: float = 1e-4,
                 foreach: bool | None = None,
                 forward_context: contextlib.AbstractContextManager | None = None) -> MemoryReport:
    """Peak memory of one real training step of `model` on `batch`; leaves the model as it was.

    Source ``cuda`` if the model's parameters are on a GPU, else ``tracked``. `forward_context`
    (the trial's autocast) wraps the forward only, as the loop trains: held across the whole step,
    autocast's cache of bf16 weight copies would stay live through backward and the optimizer step
    (~2 bytes per trainable parameter). On cuda the reserved peak is recorded too. `foreach=None`
    picks the kernel the trial trains with (`adamw`: fused on CPU, foreach on CUDA).
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with _restored(model, [device]):
        model.train()
        optimizer = _make_optimizer(_trainable(model), lr, foreach)
        if _on_cuda(device):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            split = _tracked_step(model, optimizer, batch, forward_context)
            torch.cuda.synchronize(device)
            # The allocator's peak is the truth (rounding, workspaces, anything else on the
            # device); what the tracker cannot name goes to activations.
            peak = int(torch.cuda.max_memory_allocated(device))
            split["activations"] = peak - split["params"] - split["grads"] - split["optimizer"]
            split["peak_bytes"] = peak
            split["reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
            source = "cuda"
        else:
            split = _tracked_step(model, optimizer, batch, forward_context)
            source = "tracked"
        del optimizer
    return MemoryReport(source=source, **split)


# --------------------------------------------------------------------------- estimated

_aten = torch.ops.aten
_BOOL_INDEXING = (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
                  _aten._index_put_impl_.default)


def _every_index(mask: torch.Tensor) -> torch.Tensor:
    """What `nonzero` returns for a mask that is all True: every index, numel × ndim."""
    grids = torch.meshgrid(*[torch.arange(n, device=mask.device) for n in mask.shape], indexing="ij")
    return torch.stack(grids, dim=-1).reshape(-1, mask.dim())


class _AllTrueMasks(TorchDispatchMode):
    """Fake tensors have no values, so boolean-mask selection (`x[mask]`) has no size.

    Written by hand (FakeTensorMode raises DynamicOutputShapeException; its ShapeEnv route
    gives symbolic sizes no peak can be read from): take every mask as all True. Exact
    where masks are all True by construction, e.g. READ keeping only the pooled position
    per example; an upper bound where a mask selects fewer (READ with mean pooling).
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _aten.nonzero.default:
            return _every_index(args[0])
        if str(func) == "bitsandbytes.int8_vectorwise_quant.default":
            # LLM.int8's outlier columns (inputs above the threshold) depend on values: taken as none, their
            # fp16 side product (a few columns wide) is left out
            rows, stats, _ = func(args[0], 0.0)
            return rows, stats, args[0].new_empty(0, dtype=torch.int64)
        if str(func) == "bitsandbytes.int8_mixed_scaled_mm.default":  # the int8 matmul, with no outlier columns
            a, ca, cb = args[:3]
            return a.new_empty((*ca.shape[:-1], cb.shape[0])), a.new_empty((*a.shape[:-1], 0))
        if func in _BOOL_INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1]):
            indices: list[torch.Tensor | None] = []
            for i in args[1]:
                indices.extend(_every_index(i).unbind(1) if i is not None and i.dtype == torch.bool else [i])
            return func(args[0], indices, *args[2:], **kwargs)
        return func(*args, **kwargs)


def synthetic_batch(vocab_size: int, batch_size: int, seq_len: int, *, n_labels: int = 2,
                    pad_token_id: int = 0, device: torch.device | str = "cpu",
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch shaped like `tasks.batches` output.

    The second half of the rows is padded to half length, as real batches are, so the
    attention-mask path (not the mask-free causal shortcut) runs, as in training.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=gen)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    mask[batch_size // 2:, max(1, seq_len // 2):] = 0
    ids = ids.masked_fill(mask == 0, pad_token_id)
    labels = (torch.rand(batch_size, generator=gen) if n_labels == 1
              else torch.randint(0, n_labels, (batch_size,), generator=gen))
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def build_task_model(backbone: str, method: str, method_cfg: dict[str, Any] | None, *, device: str,
                     dtype: torch.dtype, n_labels: int = 2, master_fp32: bool = True, quant: str = "none",
                     quant_double: bool = False, gradient_checkpointing: bool = False) -> nn.Module:
    """Backbone (random weights) + method, the way trainables.loop sets it up.

    Like the loop: the backbone is held in `dtype` (its block Linears quantised with `quant`; on meta,
    bitsandbytes layers without weights) and, with `master_fp32`, what trains is kept in fp32 (master
    weights, fp32 AdamW state); checkpointing and k-bit preparation as a trial does (`trial.prepare_backbone`).
    """
    from types import SimpleNamespace

    from trainables.backbones import build, get_spec  # local: keeps `import trainables.memory` light
    from trainables.methods import apply_method
    from trainables.trial import prepare_backbone

    spec = get_spec(backbone)
    settings = SimpleNamespace(method=method, quant=quant, quant_double=quant_double,
                               gradient_checkpointing=gradient_checkpointing)
    frozen = prepare_backbone(build(spec, device=device, dtype=dtype, quant=quant, quant_double=quant_double),
                              settings)
    model = apply_method(method, frozen, spec, method_cfg, n_labels=n_labels)
    if master_fp32:
        for p in _trainable(model):
            p.data = p.data.float()
    return model


def _materialise_once(model: nn.Module) -> None:
    """`model.to_empty(device="cpu")` that converts a parameter shared by several modules once.

    `to_empty` visits a shared parameter (peft's prompt tuning shares the word embeddings) once
    per owner; on the second visit it is already fake and torch refuses to swap it again.
    """
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (old, new): old kept alive, ids unique
    for module in model.modules():
        for slots, as_param in ((module._parameters, True), (module._buffers, False)):
            for key, t in slots.items():
                if t is None:
                    continue
                if id(t) not in done:
                    empty = torch.empty_like(t, device="cpu")
                    done[id(t)] = t, nn.Parameter(empty, requires_grad=t.requires_grad) if as_param else empty
                slots[key] = done[id(t)][1]


# --------------------------------------------------------------------------- quantised frozen backbones

def quant_constants(model: nn.Module) -> list[torch.Tensor]:
    """The quantisation constants of a model's bitsandbytes layers: NF4's per-block absmax and code (double
    quantisation: 8-bit absmax, its offset, the second-level absmax and code), int8's per-row scales (SCB)."""
    out: list[torch.Tensor] = []
    for m in model.modules():
        weight = getattr(m, "weight", None)
        qs = getattr(weight, "quant_state", None) or getattr(m, "quant_state", None)
        if qs is not None and hasattr(qs, "absmax"):
            out += [qs.absmax, qs.code]
            if qs.nested:
                out += [qs.offset, qs.state2.absmax, qs.state2.code]
        for owner in (weight, getattr(m, "state", None)):
            if getattr(owner, "SCB", None) is not None:
                out.append(owner.SCB)
    return [t for t in out if isinstance(t, torch.Tensor)]


def _quant_settings(model: nn.Module) -> dict[int, dict[str, Any]]:
    """How each meta bitsandbytes layer quantises (read before materialising replaces its weight)."""
    from trainables.backbones import quantised_linears

    return {id(m): {k: getattr(m.weight, k, None) for k in ("blocksize", "compress_statistics", "quant_type",
                                                              "quant_storage")}
            for m in quantised_linears(model)}


def _quantise_fake(model: nn.Module, settings: dict[int, dict[str, Any]], dtype: torch.dtype) -> None:
    """Give each bitsandbytes layer what a quantised load gives it, on fake tensors: bitsandbytes' own
    quantise ops (`quantize_4bit`, `int8_vectorwise_quant`) on a `dtype` weight, through their fake
    kernels. The packed weight is a plain frozen Parameter carrying the attributes bitsandbytes reads
    (`quant_state`; `CB`/`SCB`): its Params4bit / Int8Params subclasses cannot wrap a fake tensor."""
    import bitsandbytes as bnb

    from trainables.backbones import quantised_linears

    for m in quantised_linears(model):
        shape = (m.out_features, m.in_features)
        if isinstance(m, bnb.nn.Linear4bit):
            packed, state = bnb.functional.quantize_4bit(torch.empty(shape, dtype=dtype), **settings[id(m)])
            weight = nn.Parameter(packed, requires_grad=False)
            weight.quant_state = m.quant_state = state
        else:
            cb, scb, _ = bnb.functional.int8_vectorwise_quant(torch.empty(shape, dtype=torch.float16))
            weight = nn.Parameter(cb, requires_grad=False)
            weight.CB, weight.SCB, weight.has_fp16_weights = cb, scb, False
        m.weight = weight


# --------------------------------------------------------------------------- what a CUDA step adds

# torch's cuBLAS workspace (aten/src/ATen/cuda/CublasHandlePool.cpp, parseChosenWorkspaceSize): the default
# CUBLAS_WORKSPACE_CONFIG ":4096:2:16:8" = 2 × 4 MiB + 8 × 16 KiB = 8,519,680 B, and 32 MiB on compute
# capability 9, 10 and 12 (Hopper, Blackwell). cuBLASLt shares it (TORCH_CUBLASLT_UNIFIED_WORKSPACE, on by
# default on CUDA). It comes from the caching allocator, so max_memory_allocated counts it, once per (thread,
# stream) and kept for the process's life: a training step has two, the forward's thread and the thread
# autograd runs the backward on for the device.
CUBLAS_DEFAULT_BYTES = 4096 * 1024 * 2 + 16 * 1024 * 8
CUBLAS_LARGE_BYTES = 4096 * 1024 * 8
CUBLAS_WORKSPACES_PER_STEP = 2


def cublas_workspace_bytes(major: int | None = None) -> int:
    """One cuBLAS workspace, as torch sizes it: CUBLAS_WORKSPACE_CONFIG (":SIZE_KIB:COUNT" pairs) if set,
    else the default for the GPU's compute capability `major` (this machine's GPU when None; without
    one, an Ampere-class default: the A10G's)."""
    import os
    import re

    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    pairs = re.findall(r":([0-9]+):([0-9]+)", config or "")
    if pairs:
        return sum(int(size) * 1024 * int(count) for size, count in pairs)
    if major is None:
        major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 8
    return CUBLAS_LARGE_BYTES if major in (9, 10, 12) else CUBLAS_DEFAULT_BYTES


_F = torch.nn.functional
# The ops of CUDA autocast's float32 list (torch.amp "CUDA Ops that can autocast to float32") that these
# models call. CPU autocast leaves them in bf16; under CUDA autocast a bf16 input is cast to fp32 first,
# so the op's output and what it saves for backward are fp32 (BERT: every LayerNorm; every softmax outside
# the fused attention kernel; the loss).
CUDA_FP32_OPS = frozenset({
    _F.layer_norm, _F.group_norm, torch.layer_norm, torch.group_norm,
    _F.softmax, _F.log_softmax, _F.softmin, torch.softmax, torch.log_softmax, torch.Tensor.softmax,
    torch.Tensor.log_softmax,
    _F.cross_entropy, _F.nll_loss, _F.mse_loss, _F.l1_loss, _F.smooth_l1_loss, _F.kl_div,
    _F.binary_cross_entropy_with_logits, _F.cosine_similarity, _F.normalize, _F.softplus,
    torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__,
    torch.Tensor.__rpow__, torch.rsqrt, torch.Tensor.rsqrt, torch.reciprocal, torch.Tensor.reciprocal,
    torch.sum, torch.Tensor.sum, torch.cumsum, torch.Tensor.cumsum, torch.prod, torch.Tensor.prod,
    torch.norm, torch.Tensor.norm, torch.logsumexp, torch.Tensor.logsumexp,
})


class _CudaAutocastRules(TorchFunctionMode):
    """CUDA autocast's float32 rule, applied to a forward that runs under CPU autocast on fake CPU tensors.

    Written by hand: `torch.autocast("cuda")` is disabled where CUDA is not available, and a fake CUDA
    tensor's backward needs a CUDA build (the autograd engine aborts the process). The lower-precision
    lists of the two devices agree for these models (linear, matmul, bmm, baddbmm, addmm, SDPA), so CPU
    autocast does those; this mode casts the bf16/fp16 floating inputs of `CUDA_FP32_OPS` to fp32 above
    autograd, as CUDA autocast does.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in CUDA_FP32_OPS and torch.is_autocast_enabled("cpu"):
            low = torch.get_autocast_dtype("cpu")

            def up(x: Any) -> Any:
                return x.float() if isinstance(x, torch.Tensor) and x.dtype == low else x

            args, kwargs = tree_map(up, args), tree_map(up, kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _forward_as(device_type: str, dtype: torch.dtype) -> Iterator[None]:
    """The forward's mixed precision as it runs on `device_type`, on fake CPU tensors."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast("cpu", dtype=dtype), _CudaAutocastRules() if device_type == "cuda" else contextlib.nullcontext():
        yield


def estimate_step(backbone: str, method: str, method_cfg: dict[str, Any] | None = None, *, batch_size: int,
                  seq_len: int, dtype: torch.dtype, n_labels: int = 2, foreach: bool | None = True,
                  master_fp32: bool = True, count_flops: bool = False, device_type: str = "cpu",
                  cuda_major: int | None = None, quant: str = "none", quant_double: bool = False,
                  gradient_checkpointing: bool = False) -> MemoryReport:
    """Peak memory of one training step, accounted on fake tensors: no weights, no real memory.

    Mirrors trainables.loop: backbone in `dtype`, trainables in fp32 (`master_fp32`), the
    forward under autocast(`dtype`) when `dtype` is not fp32, backward and AdamW step
    outside it. `foreach=True` is what AdamW picks on CUDA, where estimated sizes run;
    pass None to mirror a CPU trial's fused kernel (as `study.bench` does to compare with a
    tracked CPU step). Fake tensors are CPU tensors, so kernel choices (e.g. the
    attention kernel) are the CPU's; GPU kernels with other workspaces are not modelled.
    Boolean-mask selections are taken as selecting everything (see `_AllTrueMasks`).

    `device_type="cuda"` estimates the step as CUDA runs it: the forward follows CUDA autocast's
    float32 rule (`_CudaAutocastRules`: LayerNorm, softmax, the loss in fp32, where CPU autocast
    keeps bf16), and the step's two cuBLAS workspaces are added to the activations
    (`cublas_workspace_bytes(cuda_major)`, None: this machine's GPU, else an Ampere-class one).

    `gradient_checkpointing`: the model's own checkpointing, so the recomputation runs here as in training.
    `quant`: the bitsandbytes layers a quantised load puts in, given fake packed weights and constants by
    bitsandbytes' own quantise ops (their fake kernels: `_quantise_fake`), so the step runs bitsandbytes' own
    forward and backward code: packed bytes, constants, the dequantised weight its backward builds per layer.
    Not seen, here as in a tracked CPU step: what one bitsandbytes kernel allocates inside itself (the
    forward's fused dequantise-and-matmul, `gemm_4bit`, shows only its output; on CUDA its transient
    dequantised weight, one layer's at a time, is allocated and freed within the op).
    """
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type {device_type!r}; valid: cpu, cuda")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from trainables.backbones import get_spec

    spec = get_spec(backbone)
    model = build_task_model(backbone, method, method_cfg, device="meta", dtype=dtype, n_labels=n_labels,
                             master_fp32=master_fp32, quant=quant, quant_double=quant_double,
                             gradient_checkpointing=gradient_checkpointing)
    settings = _quant_settings(model)
    # allow_non_fake_inputs: materialising reads the meta tensors it replaces
    with FakeTensorMode(allow_non_fake_inputs=True), _AllTrueMasks():
        _materialise_once(model)
        _quantise_fake(model, settings, dtype)
        model.train()
        batch = synthetic_batch(spec.config["vocab_size"], batch_size, seq_len, n_labels=n_labels,
                                pad_token_id=spec.config.get("pad_token_id") or 0)
        optimizer = _make_optimizer(_trainable(model), 1e-4, foreach)
        split = _tracked_step(model, optimizer, batch, _forward_as(device_type, dtype))
        flops = None
        if count_flops:  # forward + backward counted in a second pass: FlopCounterMode's module hooks keep
            # tensors alive, which made the peak depend on what ran before (measured: +9% at 2 blocks)
            optimizer.zero_grad(set_to_none=True)
            with FlopCounterMode(display=False) as counter:
                with _forward_as(device_type, dtype) or contextlib.nullcontext():
                    loss = _loss(model, batch)
                loss.backward()
            flops = int(counter.get_total_flops())
    if device_type == "cuda":
        workspaces = CUBLAS_WORKSPACES_PER_STEP * cublas_workspace_bytes(cuda_major)
        split = {**split, "peak_bytes": split["peak_bytes"] + workspaces,
                 "activations": split["activations"] + workspaces}
    return MemoryReport(source="estimated", flops=flops, **split)



def compare_step(backbone: str, method: str, method_cfg: dict[str, Any] | None = None, *, batch_size: int = 4,
                 seq_len: int = 32, dtype: torch.dtype = torch.float32, weights: str = "random", quant: str = "none",
                 quant_double: bool = False, gradient_checkpointing: bool = False, n_labels: int = 2,
                 timed_steps: int = 3) -> dict[str, Any]:
    """Estimated against tracked peak for one configuration on this machine's CPU (study.bench, tests).

    The tracked step runs on a real model (`weights` random, or pretrained: the backbone's checkpoint,
    quantised by bitsandbytes as a trial loads it); the estimate is `estimate_step` with the CPU's optimizer
    kernel. Also times `timed_steps` plain training steps (forward, backward, AdamW) after one warm-up.
    Returns both reports' peaks, their relative difference (estimated / tracked - 1) and seconds per step.
    """
    import time
    from types import SimpleNamespace

    from trainables.backbones import build, get_spec
    from trainables.methods import apply_method
    from trainables.trial import prepare_backbone

    spec = get_spec(backbone)
    settings = SimpleNamespace(method=method, quant=quant, quant_double=quant_double,
                               gradient_checkpointing=gradient_checkpointing)
    frozen = build(spec, "cpu", weights=weights, dtype=dtype, quant=quant, quant_double=quant_double)  # type: ignore[arg-type]
    model = apply_method(method, prepare_backbone(frozen, settings), spec, method_cfg, n_labels=n_labels)
    for p in _trainable(model):
        p.data = p.data.float()
    batch = synthetic_batch(spec.config["vocab_size"], batch_size, seq_len, n_labels=n_labels,
                            pad_token_id=spec.config.get("pad_token_id") or 0)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else None
    tracked = measure_step(model, batch, forward_context=autocast)
    estimated = estimate_step(spec, method, method_cfg, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                              n_labels=n_labels, foreach=None, quant=quant, quant_double=quant_double,
                              gradient_checkpointing=gradient_checkpointing)
    optimizer = adamw(_trainable(model), 1e-4)
    model.train()
    seconds = []
    for _ in range(timed_steps + 1 if timed_steps else 0):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext():
            loss = _loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return {"backbone": spec.name, "method": method, "quant": quant, "quant_double": quant_double,
            "gradient_checkpointing": gradient_checkpointing, "batch_size": batch_size, "seq_len": seq_len,
            "tracked": tracked, "estimated": estimated,
            "relative_error": estimated.peak_bytes / tracked.peak_bytes - 1.0,
            "step_seconds": sum(seconds[1:]) / max(len(seconds) - 1, 1)}
