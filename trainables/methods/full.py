"""Full fine-tuning: every backbone parameter trains. The baseline every saving is measured against.

Paper: none (standard practice). Reference lr 2e-5 on both families: BERT's own fine-tuning
grid is {5e-5, 4e-5, 3e-5, 2e-5} (Devlin et al. 2019, arXiv 1810.04805, App. A.3); Llama
instruction tuning uses 2e-5 (Taori et al. 2023, Stanford Alpaca train.py; Touvron et al.
2023, Llama 2, arXiv 2307.09288, Sec. 3.1). The LST repo's 3e-4 is a T5 value and is not used.
Deviations: none.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from trainables.backbones import BackboneSpec
from trainables.methods.base import GraftModel, MethodInfo, Pooling, register


@dataclass(frozen=True)
class Config:
    pass


def apply(backbone: nn.Module, spec: BackboneSpec, cfg: Config, *, n_labels: int, pooling: Pooling) -> GraftModel:
    backbone.requires_grad_(True)
    return GraftModel(backbone, spec, n_labels, pooling)


INFO = register(MethodInfo(
    name="full", family="graft", paper="full fine-tuning (baseline)", identity_at_init=True, cacheable=False,
    config_cls=Config, apply=apply, reference_lr=2e-5,
    lr_by_family=(("t5", 3e-4),),  # T5: the LST repo's T5-base GLUE value (batch 100)
))
