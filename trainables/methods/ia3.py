"""(IA)^3: learned vectors rescale keys, values and the FFN's inner activation, via peft.

Paper: "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", Liu, Tam, Muqeeth, Mohta, Huang, Bansal, Raffel; arXiv 2205.05638.
Reference lr 3e-3: T-Few's (IA)^3 recipe (Sec. 3.3 and the t-few repo's configs: Adafactor,
lr 3e-3); here with AdamW, the study's optimiser for every method.

Keys and values are scaled on their output; the FFN output projection is a peft
"feedforward module", so its vector scales its input, i.e. the FFN's inner activation
(l_ff in the paper). Vectors start at one: identity at init.

Deviations: none. (For Llama's gated FFN the scaled activation is act(gate)·up, the input
of down_proj, as for the paper's gated T5 v1.1 FFN and peft's own T5 default.)
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import IA3Config, inject_adapter_in_model
from torch import nn

from trainables.backbones import BackboneSpec
from trainables.methods.base import GraftModel, MethodInfo, Pooling, register
from trainables.methods.lora import block_regex, resolve_targets


@dataclass(frozen=True)
class Config:
    target_modules: tuple[str, ...] = ()  # empty: the family's k, v and FFN output projections


def apply(backbone: nn.Module, spec: BackboneSpec, cfg: Config, *, n_labels: int, pooling: Pooling) -> GraftModel:
    anatomy = spec.anatomy
    _, k, v, _ = anatomy.attn_proj
    targets = resolve_targets(backbone, spec, cfg.target_modules or (k, v, anatomy.mlp_proj[-1]))
    ffn = set(resolve_targets(backbone, spec, anatomy.mlp_proj))
    feedforward = [t for t in targets if t in ffn]
    peft_cfg = IA3Config(target_modules=block_regex(spec, targets),
                         feedforward_modules=block_regex(spec, feedforward) if feedforward else [])
    backbone = inject_adapter_in_model(peft_cfg, backbone)
    return GraftModel(backbone, spec, n_labels, pooling)


INFO = register(MethodInfo(
    name="ia3", family="graft", paper="Liu et al. 2022, (IA)^3 (arXiv 2205.05638)", identity_at_init=True,
    cacheable=False, config_cls=Config, apply=apply, reference_lr=3e-3,
    note="peft IA3Config + inject_adapter_in_model; k, v and FFN inner activation (input of the FFN output layer)",
))
