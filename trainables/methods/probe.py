"""Linear probe: only the task head trains, on the frozen backbone's pooled final hidden state.

The floor of every comparison: a method whose tuned result falls below the probe on the
same backbone and task is under-tuned or broken, and the summary table, plots and verdicts
say so. Practice: Alain & Bengio, "Understanding intermediate layers using linear classifier
probes", arXiv 1610.01644; as a fine-tuning baseline (LP in LP-FT), Kumar et al., "Fine-Tuning
can Distort Pretrained Features and Underperform Out-of-Distribution", ICLR 2022, arXiv 2202.10054.

It reads one tap, φ_L, through the backbone's own final norm (the backbone's
`last_hidden_state`), so it is cacheable and token-local: with first/last pooling its cache
holds one position per example. On T5 (text-to-text) the probe is the one method with a new
linear head: it reads the frozen decoder's final state at the start position (the state the
LM head would predict the first target token from), after the decoder's final norm.

Reference lr 1e-2: Adam on a linear head over unit-scale features converges in a few hundred
steps at 1e-3–3e-2 (checked on MiniLM-L6 at batch 16, see study/spaces.py); the search spans a
factor 10 either side.

Deviations: Kumar et al. fit the probe to convergence with L-BFGS (sklearn's logistic
regression); here it trains with the study's AdamW loop and budget like every other method,
so its cost is measured the same way. tests/unit/test_fair_comparison.py checks that it reaches
the logistic-regression optimum on a fixed set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainables.backbones import BackboneSpec
from trainables.methods.base import MethodInfo, Output, Pooling, SideModel, Taps, register


@dataclass(frozen=True)
class Config:
    pass


class ProbeModel(SideModel):
    token_local = True  # the head reads each pooled position's own final hidden state

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, n_labels: int, pooling: Pooling):
        super().__init__(backbone, spec, n_labels, pooling, linear_head=True)

    def tap_layers(self) -> list[int]:
        return [] if self.text2text else [self.spec.n_layers]

    def decoder_tap_layers(self) -> list[int]:
        return [self.spec.n_decoder_layers] if self.text2text else []

    def forward_taps(self, taps: Taps, labels: torch.Tensor | None = None) -> Output:
        if self.text2text:  # the frozen decoder's state at its first (start-token) position, one row per example
            first = taps.decoder[self.spec.n_decoder_layers][:: self.words.n, :1]
            final = self.final_norm(first.to(self.side_dtype))
            return self.classify(final, torch.ones(final.shape[:2], device=final.device, dtype=torch.long), labels)
        final = self.final_norm(taps.hidden[self.spec.n_layers].to(self.side_dtype))
        return self.classify(final, taps.attention_mask, labels)


def apply(backbone: nn.Module, spec: BackboneSpec, cfg: Config, *, n_labels: int, pooling: Pooling) -> ProbeModel:
    return ProbeModel(backbone, spec, n_labels, pooling)


INFO = register(MethodInfo(
    name="probe", family="side", paper="linear probe (Alain & Bengio 2016; LP of Kumar et al. 2022, arXiv 2202.10054)",
    identity_at_init=True, cacheable=True, config_cls=Config, apply=apply, reference_lr=1e-2,
    note="ours: the task head alone on frozen pooled features; the floor every method must clear",
))
