"""Frozen giant backbones under DeepSpeed ZeRO stage 3: forward only, parameters partitioned and offloaded.

Side methods never train the backbone, so it needs no optimizer and no gradients of its
own: ZeRO-3 with `offload_param` keeps each rank's slice of the weights on the host (or
NVMe) and gathers one module at a time during the forward. That is how Llama-7B/13B taps
are produced on a GPU smaller than the model, by the cache builder and by live trials.

The model is built partitioned from the start (HF's `from_pretrained` / `_from_config`
apply `deepspeed.zero.Init` while an `HfDeepSpeedConfig` is alive), so the full model
is never materialised on one rank. With several ranks (torch.distributed, e.g. Ray
actors), every rank must make the same sequence of forward calls: `lockstep_batches`
pads a rank's work with repeat batches whose output is discarded.

On CPU (DeepSpeed's CPU accelerator, gloo) the shared-memory comm op that DeepSpeed
JIT-builds on first use (45-80 s) is skipped by default: a forward-only engine gains
nothing from it here.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from trainables.backbones import BackboneSpec, build

ZeroMode = Literal["auto", "off", "on"]
Offload = Literal["cpu", "nvme", "none"]
FIT_FRACTION = 0.8  # `auto` turns ZeRO on when the frozen weights exceed this share of device memory


def config(offload: Offload = "cpu", dtype: torch.dtype = torch.float32, nvme_path: str | None = None) -> dict:
    """A forward-only ZeRO-3 config (no optimizer); the micro-batch key is required even for inference."""
    zero: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if offload == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    elif offload == "nvme":
        if not nvme_path:
            raise ValueError("zero offload 'nvme' needs zero_nvme_path (a folder on a fast local disk)")
        zero["offload_param"] = {"device": "nvme", "nvme_path": nvme_path, "pin_memory": True}
    elif offload != "none":
        raise ValueError(f"zero offload {offload!r}; valid: cpu, nvme, none")
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
            "bf16": {"enabled": dtype == torch.bfloat16}}


def weight_bytes(spec: BackboneSpec, dtype: torch.dtype) -> int:
    """Bytes of the backbone's weights in `dtype`, counted on the meta device."""
    model = build(spec, "meta")
    return sum(p.numel() for p in model.parameters()) * torch.empty(0, dtype=dtype).element_size()


def fits(spec: BackboneSpec, dtype: torch.dtype, device_bytes: int) -> bool:
    """The frozen weights leave room on a device of `device_bytes` (the plan asks this of a GPU budget)."""
    return weight_bytes(spec, dtype) <= FIT_FRACTION * device_bytes


def needed(spec: BackboneSpec, dtype: torch.dtype, device: torch.device) -> bool:
    """`auto`: a GPU whose memory the frozen weights would mostly fill. On CPU offloading gains nothing."""
    if device.type != "cuda":
        return False
    return not fits(spec, dtype, torch.cuda.get_device_properties(device).total_memory)


def decide(mode: ZeroMode, side: bool, spec: BackboneSpec, dtype: torch.dtype, device: torch.device) -> bool:
    """The one ZeRO decision, made where the work runs (the trial's or the cache builder's device):
    a side method's frozen backbone goes ZeRO-3 when asked, or (`auto`) when it does not fit this device."""
    return side and (mode == "on" or (mode == "auto" and needed(spec, dtype, device)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def single_process_env() -> None:
    """DeepSpeed reads the torch.distributed env (else it tries MPI); a lone process is rank 0 of 1.

    A launcher that set RANK (Ray actors, torchrun) is left alone; a lone process gets its
    own free MASTER_PORT so concurrent trials on one machine do not collide.
    """
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))


def skip_shm_op() -> None:
    """Skip DeepSpeed's JIT build of its CPU shared-memory comm op (the module, not `torch`, is patched)."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


@dataclass
class ZeroBackbone:
    """A partitioned frozen backbone: `module` is what methods wrap; `engine` keeps the ZeRO hooks alive."""

    module: nn.Module
    engine: Any
    config: dict

    def close(self) -> None:
        self.engine.destroy()


def build_partitioned(spec: BackboneSpec, *, weights: str, dtype: torch.dtype, ds_config: dict,
                      folder: str | Path | None = None, shm_op: bool = False) -> ZeroBackbone:
    """Build the bare backbone partitioned across ranks (never whole on one) and wrap it in a ZeRO-3 engine.

    `folder`: load pretrained weights from this HF folder instead of the registry's asset
    (tests, or a hub snapshot on a cluster). Random weights are initialised partitioned,
    so they differ from a plain `build` with the same seed.
    """
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from trainables.backbones import Source, load_pretrained, source

    single_process_env()
    if not shm_op:
        skip_shm_op()
    hf_ds = HfDeepSpeedConfig(ds_config)  # must stay alive while the model is built: HF checks a weakref
    if folder is not None or weights == "pretrained":
        src = Source(Path(folder), "folder") if folder is not None else source(spec)
        model = load_pretrained(spec, dtype, "cpu", src)
    else:
        model = spec.anatomy.model_class._from_config(spec.hf_config(), dtype=dtype, **spec.anatomy.kwargs)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    del hf_ds
    engine.module.eval()
    return ZeroBackbone(engine.module, engine, ds_config)


def is_partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gathered(params: Iterable[nn.Parameter]) -> contextlib.AbstractContextManager:
    """Full values of some partitioned parameters for a moment (read-only); a no-op for plain ones."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # `deepspeed.zero` is an attribute of the package, not an importable module

    return deepspeed.zero.GatheredParameters(params)


def apply_reads(backbone: nn.Module, spec: BackboneSpec, method: str) -> list[nn.Parameter]:
    """Backbone parameters a method reads while it is being applied (they must be gathered first).

    SHERL copies the final norm(s); LST's pruned init copies slices of every block and the
    final norm(s) (the whole stack, gathered once: use `init=random` to avoid that on a giant
    backbone). Encoder–decoders: both stacks.
    """
    anatomy = spec.anatomy
    norms = [n for part in ("final_norm", "decoder_final_norm") if (n := anatomy.get(backbone, part)) is not None]
    reads = [p for n in norms for p in n.parameters()]
    if method == "lst":
        reads += [p for block in anatomy.all_blocks(backbone) for p in block.parameters()]
    return reads


def lockstep(work: Sequence[Any], per_rank: Sequence[int], filler: Any) -> Iterator[tuple[Any, bool]]:
    """This rank's work items, then repeats (flagged False: discard the output) until the busiest rank is done.

    ZeRO-3 gathers each module's weights collectively, so all ranks must run the same
    number of forwards; `per_rank` is how many items each rank has; `filler` stands in
    for a rank with none.
    """
    yield from ((item, True) for item in work)
    spare = work[-1] if work else filler
    yield from ((spare, False) for _ in range(max(per_rank) - len(work)))


def input_device(module: nn.Module) -> torch.device:
    """Where inputs go: the accelerator for a partitioned module (its offloaded weights sit on the host)."""
    if is_partitioned(module):
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())
    return next(module.parameters()).device
