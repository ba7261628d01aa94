"""An example of a method from your own code: a low-rank residual on the pooled state ("pooled-lowrank").

How to write one (no fork of petl-study needed):

1. A module with a frozen `Config` dataclass (its fields are the method's config keys; strings
   from the CLI are coerced to the annotated types), an `apply(backbone, spec, cfg, *, n_labels,
   pooling)` that returns a `TaskModel`, and one `register(MethodInfo(...))` call at import time,
   exactly as the built-in modules in trainables/methods/ do (probe.py is the shortest).
   - family "graft": trainable parameters inside the backbone (subclass `GraftModel`);
     "side": reads frozen activations only (subclass `SideModel`, implement `tap_layers` and
     `forward_taps`); cacheable=True lets a study compute those activations once.
   - identity_at_init=True promises the same logits as the frozen backbone + head at step 0.
2. Point a study at it: `--methods probe my_pkg.my_method` (the module must be importable where
   the study starts: installed, or on PYTHONPATH; Ray ships code that is not installed to every
   node), or install a package that declares it as an entry point:
   `[project.entry-points."petl_study.methods"] pooled-lowrank = "my_pkg.my_method"`.
3. Before any trial the study checks the contracts (trainables.methods.contracts: gradients only
   where declared, side methods off the backbone's graph, counts on the meta device, identity at
   init, cached taps = live forward, checkpoints restore) on tiny backbones and refuses a broken
   method in one line. Every trial row records `method_module`, `method_version` (this
   `__version__`, or the installed package's version) and `method_hash` (of this file).

This one: a side method reading the backbone's final state (through its final norm), adding a
rank-r correction B·A·h that starts at zero (B = 0), then the task head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainables.backbones import BackboneSpec
from trainables.methods.base import MethodInfo, Output, Pooling, SideModel, Taps, register

__version__ = "0.1.0"


@dataclass(frozen=True)
class Config:
    r: int = 4


class PooledLowRank(SideModel):
    token_local = True  # the loss reads each pooled position's own final state

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, cfg: Config, n_labels: int, pooling: Pooling):
        super().__init__(backbone, spec, n_labels, pooling, linear_head=True)
        self.down = nn.Linear(spec.d_model, cfg.r, bias=False)
        self.up = nn.Linear(cfg.r, spec.d_model, bias=False)
        nn.init.zeros_(self.up.weight)  # the correction starts at zero: identity at init

    def tap_layers(self) -> list[int]:
        return [self.spec.n_layers]

    def forward_taps(self, taps: Taps, labels: torch.Tensor | None = None) -> Output:
        h = self.final_norm(taps.hidden[self.spec.n_layers].to(self.side_dtype))
        return self.classify(h + self.up(self.down(h)), taps.attention_mask, labels)


def apply(backbone: nn.Module, spec: BackboneSpec, cfg: Config, *, n_labels: int, pooling: Pooling) -> PooledLowRank:
    if spec.anatomy.encoder_decoder:
        raise ValueError("pooled-lowrank reads a single-stack backbone's final state; not for encoder-decoders")
    return PooledLowRank(backbone, spec, cfg, n_labels, pooling)


INFO = register(MethodInfo(
    name="pooled-lowrank", family="side", paper="example (tests/example_method)", identity_at_init=True,
    cacheable=True, config_cls=Config, apply=apply, reference_lr=1e-2,
    note="example of a user method: a zero-initialised rank-r residual on the pooled final state",
))
