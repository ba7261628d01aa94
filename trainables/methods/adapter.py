"""Houlsby adapters: a residual bottleneck d → d/16 → d after attention and after the FFN.

Paper: "Parameter-Efficient Transfer Learning for NLP", Houlsby, Giurgiu, Jastrzebski,
Morrone, de Laroussilhe, Gesmundo, Attariyan, Gelly; arXiv 1902.00751.
Reference lr 3e-4: the middle of the paper's BERT sweep {3e-5, 3e-4, 3e-3} (Sec. 3.1), also the
LST repo's value. peft has no Houlsby adapter, so this one is ours.

Each adapter is a child module (`adapter`) of the projection it follows, run by a forward
hook on that projection, so the backbone's own parameter names (and pretrained loading)
are untouched. Sites: Llama `self_attn.o_proj` and `mlp.down_proj` (their outputs are
exactly the attention and FFN outputs before the residual add); BERT
`attention.output.dense` and `output.dense` (before their residual add and LayerNorm).
The up-projection starts at zero: identity at init.

T5: `SelfAttention.o` and `DenseReluDense.wo` of every encoder and decoder block (the
decoder's cross-attention gets none).

Deviations: in BERT the adapter sits before the sub-layer's dropout instead of after it
(they differ only in training mode). The down-projection keeps nn.Linear's default init
(the paper draws near-zero weights for both projections; with a zero up-projection the
output is the identity either way, and the default init gives the up-projection a useful gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from trainables.backbones import BackboneSpec
from trainables.methods.base import GraftModel, MethodInfo, Pooling, register

SITES: dict[str, tuple[str, str]] = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "bert": ("attention.output.dense", "output.dense"),
    "t5": ("SelfAttention.o", "DenseReluDense.wo"),  # a path suffix: T5's FFN is layer 1 (encoder) or 2 (decoder)
}


@dataclass(frozen=True)
class Config:
    reduction_factor: int = 16  # bottleneck width = d // reduction_factor
    activation: Literal["gelu", "relu"] = "gelu"


class Bottleneck(nn.Module):
    """x + up(act(down(x))), with `up` zero-initialised so the block starts as the identity."""

    def __init__(self, d: int, width: int, activation: str, dtype: torch.dtype):
        super().__init__()
        self.down = nn.Linear(d, width, dtype=dtype)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.up = nn.Linear(width, d, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


def _run_adapter(module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
    # Reads the adapter from the hooked module (not a closure), so deepcopy keeps each copy's own adapter.
    return module.adapter(out)


def apply(backbone: nn.Module, spec: BackboneSpec, cfg: Config, *, n_labels: int, pooling: Pooling) -> GraftModel:
    d = spec.d_model
    if not 1 <= cfg.reduction_factor <= d:
        raise ValueError(f"adapter reduction_factor={cfg.reduction_factor}: must be in 1..{d} (d_model)")
    width = d // cfg.reduction_factor
    for block in spec.anatomy.all_blocks(backbone):
        for site in SITES[spec.family]:
            proj = next(m for name, m in block.named_modules() if name == site or name.endswith("." + site))
            # a quantised projection's weight is packed integers: the adapter takes the backbone's float dtype
            dtype = proj.weight.dtype if proj.weight.is_floating_point() else backbone.dtype
            proj.adapter = Bottleneck(d, width, cfg.activation, dtype)
            proj.register_forward_hook(_run_adapter)
    return GraftModel(backbone, spec, n_labels, pooling)


INFO = register(MethodInfo(
    name="adapter", family="graft", paper="Houlsby et al. 2019, adapters (arXiv 1902.00751)",
    identity_at_init=True, cacheable=False, config_cls=Config, apply=apply, reference_lr=3e-4,
    lr_by_family=(("t5", 3e-4),),  # T5: the LST repo's T5-base GLUE value (batch 100)
    note="ours (peft has none): bottleneck d -> d/16 -> d, zero-init up, after attention and FFN outputs",
))
