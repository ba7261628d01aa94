"""Peak memory of one training step, split into params / grads / optimizer / activations.

One step = forward + backward + AdamW step, in steady state: the optimizer state already
exists when the step starts (it is created by a zero-gradient "priming" step first), as
it does from the second step of a real run on. Three sources, one accounting:

- ``cuda``: ``torch.cuda.max_memory_allocated`` around a real step on the GPU gives the
  peak; the split comes from the same tracker as below.
- ``tracked``: a real step on the CPU under ``torch.distributed._tools.mem_tracker.MemTracker``
  (a TorchDispatchMode that follows every tensor storage and tags it as parameter, buffer,
  gradient, optimizer state or activation/temporary). It is device-agnostic and works on
  CPU in torch 2.13, so we use it rather than writing our own.
- ``estimated``: the same tracked step on fake tensors (``FakeTensorMode``): the model is
  built on the meta device and materialised as fake CPU tensors with ``to_empty``, so a
  Llama-7B (or 70B) step is accounted op by op in seconds without allocating its memory.
  On a small config estimated and tracked agree to the byte (same ops, same storages).

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
from torch.utils._python_dispatch import TorchDispatchMode

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

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"memory source {self.source!r}; valid: {', '.join(SOURCES)}")

    def as_dict(self) -> dict[str, int | str]:
        """The results-schema columns (trials.parquet)."""
        return {
            "peak_memory_bytes": self.peak_bytes,
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
                 foreach: bool | None = None) -> MemoryReport:
    """Peak memory of one real training step of `model` on `batch`; leaves the model as it was.

    Source ``cuda`` if the model's parameters are on a GPU, else ``tracked``. The step runs
    under whatever autocast context the caller holds. `foreach=None` picks the kernel the
    trial trains with (`adamw`: fused on CPU, foreach on CUDA).
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with _restored(model, [device]):
        model.train()
        optimizer = _make_optimizer(_trainable(model), lr, foreach)
        if _on_cuda(device):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            split = _tracked_step(model, optimizer, batch)
            torch.cuda.synchronize(device)
            # The allocator's peak is the truth (rounding, workspaces, anything else on the
            # device); what the tracker cannot name goes to activations.
            peak = int(torch.cuda.max_memory_allocated(device))
            split["activations"] = peak - split["params"] - split["grads"] - split["optimizer"]
            split["peak_bytes"] = peak
            source = "cuda"
        else:
            split = _tracked_step(model, optimizer, batch)
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
                     dtype: torch.dtype, n_labels: int = 2, master_fp32: bool = True) -> nn.Module:
    """Backbone (random weights) + method, the way trainables.loop sets it up.

    Like the loop: the backbone is held in `dtype` and, with `master_fp32`, what trains is
    kept in fp32 (master weights, fp32 AdamW state).
    """
    from trainables.backbones import build, get_spec  # local: keeps `import trainables.memory` light
    from trainables.methods import apply_method

    spec = get_spec(backbone)
    model = apply_method(method, build(spec, device=device, dtype=dtype), spec, method_cfg, n_labels=n_labels)
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


def estimate_step(backbone: str, method: str, method_cfg: dict[str, Any] | None = None, *, batch_size: int,
                  seq_len: int, dtype: torch.dtype, n_labels: int = 2, foreach: bool | None = True,
                  master_fp32: bool = True, count_flops: bool = False) -> MemoryReport:
    """Peak memory of one training step, accounted on fake tensors: no weights, no real memory.

    Mirrors trainables.loop: backbone in `dtype`, trainables in fp32 (`master_fp32`), the
    forward under autocast(`dtype`) when `dtype` is not fp32, backward and AdamW step
    outside it. `foreach=True` is what AdamW picks on CUDA, where estimated sizes run;
    pass None to mirror a CPU trial's fused kernel (as `study.bench` does to compare with a
    tracked CPU step). Fake tensors are CPU tensors, so kernel choices (e.g. the
    attention kernel) are the CPU's; GPU kernels with other workspaces are not modelled.
    Boolean-mask selections are taken as selecting everything (see `_AllTrueMasks`).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from trainables.backbones import get_spec

    spec = get_spec(backbone)
    model = build_task_model(backbone, method, method_cfg, device="meta", dtype=dtype, n_labels=n_labels,
                             master_fp32=master_fp32)
    # allow_non_fake_inputs: materialising reads the meta tensors it replaces
    with FakeTensorMode(allow_non_fake_inputs=True), _AllTrueMasks():
        _materialise_once(model)
        model.train()
        batch = synthetic_batch(spec.config["vocab_size"], batch_size, seq_len, n_labels=n_labels,
                                pad_token_id=spec.config.get("pad_token_id") or 0)
        optimizer = _make_optimizer(_trainable(model), 1e-4, foreach)
        autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else None
        # the same step's FLOPs, counted in the same pass (the optimizer's elementwise ops have no formula)
        with FlopCounterMode(display=False) if count_flops else contextlib.nullcontext() as counter:
            split = _tracked_step(model, optimizer, batch, autocast)
    flops = int(counter.get_total_flops()) if count_flops else None
    return MemoryReport(source="estimated", flops=flops, **split)

