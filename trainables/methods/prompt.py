"""Prompt tuning: n trainable virtual-token embeddings prepended to the input, via peft.

Paper: "The Power of Scale for Parameter-Efficient Prompt Tuning", Lester, Al-Rfou,
Constant; arXiv 2104.08691. Reference lr 0.3: the paper's (Sec. 3, Adafactor), also the LST
repo's.

peft's `PromptTuningConfig` with task type FEATURE_EXTRACTION wraps the bare backbone
(`PeftModelForFeatureExtraction`): it prepends the prompt embeddings via `inputs_embeds`
and extends the attention mask. The hidden sequence is therefore n tokens longer than
`input_ids`; the model drops the n virtual positions before pooling, so 'first' reads
BERT's [CLS], 'last' the last real token and 'mean' averages real tokens only.
The outputs differ from the frozen backbone at init by design (identity_at_init=False).

Deviations: default init is peft's RANDOM (N(0, 1) rows), as METHODS.md asks; the paper
prefers sampled-vocabulary or class-label init (`init=sample_vocab` gives the former).
Inputs must leave n positions free (BERT: 512 − n tokens). T5: the prompt is prepended to the
encoder's input embeddings (the peft wrapper's `get_prompt`), as in the paper.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
from torch import nn

from trainables.backbones import BackboneSpec
from trainables.methods.base import GraftModel, MethodInfo, Pooling, register


@dataclass(frozen=True)
class Config:
    n_virtual_tokens: int = 20
    init: Literal["random", "sample_vocab"] = "random"


class PromptModel(GraftModel):
    """A GraftModel whose backbone prepends virtual tokens; pooling sees only the real ones."""

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, n_labels: int, pooling: Pooling, n_virtual: int):
        super().__init__(backbone, spec, n_labels, pooling)
        self.n_virtual = n_virtual

    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return super().final_hidden(input_ids, attention_mask)[:, self.n_virtual:]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """T5: the prompt is prepended to the encoder's input (as peft's seq2seq wrapper does); the decoder
        attends to the virtual positions too."""
        prompt = self.backbone.get_prompt(batch_size=input_ids.shape[0])
        embeds = torch.cat([prompt.to(self.t5.shared.weight.dtype), self.t5.shared(input_ids)], dim=1)
        ones = torch.ones(input_ids.shape[0], self.n_virtual, dtype=attention_mask.dtype, device=attention_mask.device)
        mask = torch.cat([ones, attention_mask], dim=1)
        return self.t5.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, mask


def apply(backbone: nn.Module, spec: BackboneSpec, cfg: Config, *, n_labels: int, pooling: Pooling) -> PromptModel:
    if cfg.n_virtual_tokens < 1:
        raise ValueError(f"prompt n_virtual_tokens={cfg.n_virtual_tokens}: must be >= 1")
    init = PromptTuningInit.RANDOM if cfg.init == "random" else PromptTuningInit.SAMPLE_VOCAB
    peft_cfg = PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=cfg.n_virtual_tokens,
                                  prompt_tuning_init=init)
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = get_peft_model(backbone, peft_cfg)
    return PromptModel(wrapped, spec, n_labels, pooling, cfg.n_virtual_tokens)


INFO = register(MethodInfo(
    name="prompt", family="graft", paper="Lester et al. 2021, prompt tuning (arXiv 2104.08691)",
    identity_at_init=False, cacheable=False, config_cls=Config, apply=apply, reference_lr=0.3,
    note="peft PromptTuningConfig (FEATURE_EXTRACTION wrapper); virtual positions dropped before pooling",
))
