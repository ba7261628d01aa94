"""BitFit: only the bias terms train.

Paper: "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models", Ben Zaken, Ravfogel, Goldberg; arXiv 2106.10199. Reference lr 4e-4: the
paper's BERT grid is {1e-4, 4e-4, 7e-4, 1e-3} (Sec. 3, App. A); the search spans it.

BERT: every existing bias of the backbone trains (attention, FFN and LayerNorm biases,
embedding LayerNorm included), as in the paper. Llama has NO biases (its linears are
bias-free and RMSNorm has none), so a zero bias is added to every nn.Linear in the blocks
(attention and MLP projections) and only those train; zero biases keep identity at init.

Deviations: on Llama (and other bias-free families) BitFit trains biases that the
pre-trained model never had; the norms get no bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainables.backbones import BackboneSpec
from trainables.methods.base import GraftModel, MethodInfo, Pooling, register


@dataclass(frozen=True)
class Config:
    pass


def apply(backbone: nn.Module, spec: BackboneSpec, cfg: Config, *, n_labels: int, pooling: Pooling) -> GraftModel:
    for linear in (m for block in spec.anatomy.all_blocks(backbone) for m in block.modules()):
        if isinstance(linear, nn.Linear) and linear.bias is None:
            w = linear.weight  # a quantised Linear's weight is packed integers: its bias takes the backbone's dtype
            dtype = w.dtype if w.is_floating_point() else backbone.dtype
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=dtype, device=w.device))
    for name, p in backbone.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] == "bias")
    return GraftModel(backbone, spec, n_labels, pooling)


INFO = register(MethodInfo(
    name="bitfit", family="graft", paper="Ben Zaken et al. 2021, BitFit (arXiv 2106.10199)", identity_at_init=True,
    cacheable=False, config_cls=Config, apply=apply, reference_lr=4e-4,
    lr_by_family=(("t5", 3e-4),),  # T5: the LST repo's T5-base GLUE value (batch 100)
    note="ours: trains bias terms only; bias-free families (Llama) get zero-initialised biases on every "
         "block Linear, and only those train",
))
