"""Full fine-tuning: every backbone parameter trains. The baseline every saving is measured against.

Paper: none (standard practice); reference lr 3e-4 (LST repo).
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
    config_cls=Config, apply=apply, reference_lr=3e-4,
))
