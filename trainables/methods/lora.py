"""LoRA: a trainable low-rank update B·A beside frozen projection matrices, via peft.

Paper: "LoRA: Low-Rank Adaptation of Large Language Models", Hu, Shen, Wallis, Allen-Zhu,
Li, Wang, Wang, Chen; arXiv 2106.09685. Reference lr per family: BERT 5e-4 (the paper's
RoBERTa-base GLUE runs, Table 9: 4e-4–5e-4), Llama 2e-4 (Dettmers et al. 2023, QLoRA,
arXiv 2305.14314, Table 9: 2e-4 for 7B/13B).

peft's `inject_adapter_in_model` puts the LoRA layers into the bare backbone in place, so
the backbone stays a LlamaModel/BertModel and the trainable tensors keep readable names
(`layers.0.self_attn.q_proj.lora_A.default.weight`). B starts at zero: identity at init.

T5: the default targets are every q and v projection, self- and cross-attention, in both
stacks (peft's own T5 default, `q`/`v` naming several projections per decoder block).

Deviations: none (defaults as in the paper's GPT-3 / RoBERTa setup: r=8, alpha=16, q and v).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from trainables.backbones import BackboneSpec
from trainables.methods.base import GraftModel, MethodInfo, Pooling, register


@dataclass(frozen=True)
class Config:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # empty: the family's q and v projections


def block_linears(backbone: nn.Module, spec: BackboneSpec) -> list[str]:
    """Block-relative paths of every Linear in a block, e.g. 'self_attn.q_proj', 'attention.self.query'
    (encoder–decoders: in an encoder or a decoder block, e.g. T5's 'layer.1.EncDecAttention.q')."""
    stacks = ["blocks", "decoder_blocks"] if spec.anatomy.encoder_decoder else ["blocks"]
    blocks = [spec.anatomy.get(backbone, stack)[0] for stack in stacks]
    return list(dict.fromkeys(name for b in blocks for name, m in b.named_modules() if isinstance(m, nn.Linear)))


def resolve_targets(backbone: nn.Module, spec: BackboneSpec, names: Sequence[str]) -> list[str]:
    """Map names (a block-relative path, or a unique suffix of one) to block-relative paths.

    Suffixes keep configs short ('q_proj', 'value'), and exact paths disambiguate BERT's
    several 'dense' layers ('output.dense' is the FFN output, 'attention.output.dense' the o-projection).
    """
    paths = block_linears(backbone, spec)
    resolved = []
    for name in names:
        hits = [p for p in paths if p == name] or [p for p in paths if p.endswith("." + name)]
        if len(hits) > 1 and spec.anatomy.shared_leaf_names and "." not in name:
            resolved.extend(hits)  # T5: 'q' is every query projection, self- and cross-attention (peft's T5 default)
            continue
        if len(hits) != 1:
            why = "ambiguous" if hits else "unknown"
            raise ValueError(f"{why} target module {name!r} for {spec.family} blocks; "
                             f"valid (a path or a unique suffix): {', '.join(paths)}")
        resolved.append(hits[0])
    return resolved


def block_regex(spec: BackboneSpec, paths: Sequence[str]) -> str:
    """A peft target regex (peft full-matches string targets) for these paths in every block."""
    return rf"{spec.anatomy.block_paths()}\.\d+\.({'|'.join(map(re.escape, paths))})"


def apply(backbone: nn.Module, spec: BackboneSpec, cfg: Config, *, n_labels: int, pooling: Pooling) -> GraftModel:
    if cfg.r < 1:
        raise ValueError(f"lora r={cfg.r}: must be >= 1")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"lora dropout={cfg.dropout}: must be in [0, 1)")
    q, _, v, _ = spec.anatomy.attn_proj
    targets = resolve_targets(backbone, spec, cfg.target_modules or (q, v))
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=block_regex(spec, targets), bias="none")
    backbone = inject_adapter_in_model(peft_cfg, backbone)
    return GraftModel(backbone, spec, n_labels, pooling)


INFO = register(MethodInfo(
    name="lora", family="graft", paper="Hu et al. 2021, LoRA (arXiv 2106.09685)", identity_at_init=True,
    cacheable=False, config_cls=Config, apply=apply, reference_lr=5e-4,
    lr_by_family=(("bert", 5e-4), ("llama", 2e-4), ("t5", 3e-4)),  # T5: the LST repo's T5-base GLUE value
    note="peft LoraConfig + inject_adapter_in_model; default targets: the family's q and v projections",
))
