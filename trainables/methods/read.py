"""READ: a small RNN reads every block's output and corrects the frozen final hidden state.

Paper: Wang, Nguyen, Li, Wu, "READ: Recurrent Adaptation of Large Transformers",
arXiv 2305.15348. Reference lr 3e-4: the authors'
scripts sweep about 1e-4–1e-3 (the LST repo's 3e-3 for side methods is a T5 batch-100 value).
The output scale s is searched too (log-uniform 0.1–10, study/spaces.py): with W_o zero-init
and Adam, s sets how fast δ can grow, which the authors tune alongside the lr.

Per token position, independently, the recurrence runs over LAYERS: x_i = RMSNorm(φ_i),
h_i = GRU(x_i, h_{i−1}), ḡ = mean(h_1 … h_L), δ = s·(W_o ḡ + b_o) with W_o, b_o zero, so
the model equals the frozen backbone at step 0. Because δ at a position reads only that
position's taps, padding positions are skipped and first/last pooling runs the RNN on one
position per example (`token_local`); the loss is the same.

Deviations:
- One joiner RMSNorm (a single trainable scale of size d) shared by all layers, as the
  count 4hd + 3h² + 6h + 2d implies; `init_from_embedding` reuses it for φ_0.
- Encoder–decoder options (`enc_correction_into_decoder`) are absent: no T5 backbone here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from trainables.backbones import BackboneSpec
from trainables.methods.base import MethodInfo, Output, Pooling, SideModel, Taps, pooled_positions, register

RNNS = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


@dataclass(frozen=True)
class Config:
    hidden_size: int = 256
    rnn: Literal["gru", "lstm", "rnn"] = "gru"
    joiner: Literal["norm", "linear"] = "norm"
    aggregate: Literal["mean", "last"] = "mean"
    scale: float = 1.0  # fixed s in δ = s·(W_o ḡ + b_o)
    init_from_embedding: bool = False

    def __post_init__(self) -> None:
        if self.rnn not in RNNS:
            raise ValueError(f"read: rnn={self.rnn!r}; valid: {', '.join(RNNS)}")
        if self.hidden_size < 1:
            raise ValueError(f"read: hidden_size={self.hidden_size} must be >= 1 (paper sweeps 64-512)")
        if self.joiner not in ("norm", "linear"):
            raise ValueError(f"read: joiner={self.joiner!r}; valid: norm, linear")
        if self.aggregate not in ("mean", "last"):
            raise ValueError(f"read: aggregate={self.aggregate!r}; valid: mean, last")


def norm_eps(hf_config: object) -> float:
    """The backbone's own norm epsilon, so the joiner normalises like the backbone does."""
    for key in ("rms_norm_eps", "layer_norm_eps"):
        if getattr(hf_config, key, None) is not None:
            return float(getattr(hf_config, key))
    return 1e-6


class ReadModel(SideModel):
    token_local = True

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, cfg: Config, n_labels: int, pooling: Pooling):
        super().__init__(backbone, spec, n_labels, pooling)
        self.cfg = cfg
        d, h = spec.d_model, cfg.hidden_size
        self.joiner = nn.RMSNorm(d, eps=norm_eps(backbone.config))
        self.joiner_proj = nn.Linear(d, h) if cfg.joiner == "linear" else None
        self.h0_proj = nn.Linear(d, h) if cfg.init_from_embedding else None
        self.rnn = RNNS[cfg.rnn](d if self.joiner_proj is None else h, h, batch_first=True)
        self.out = nn.Linear(h, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def tap_layers(self) -> list[int]:
        first = 0 if self.cfg.init_from_embedding else 1
        return list(range(first, self.spec.n_layers + 1))

    def correction(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """δ for N independent positions; `taps[i]` is N×d for i in tap_layers()."""
        if self.h0_proj is not None:
            state = self.h0_proj(self.joiner(taps[0])).unsqueeze(0)
            state = (state, torch.zeros_like(state)) if self.cfg.rnn == "lstm" else state
            taps = taps[1:]
        else:
            state = None
        x = self.joiner(torch.stack(taps, dim=1))  # N×L×d: the layers are the sequence
        if self.joiner_proj is not None:
            x = self.joiner_proj(x)
        h, _ = self.rnn(x, state)
        g = h.mean(dim=1) if self.cfg.aggregate == "mean" else h[:, -1]
        return self.cfg.scale * self.out(g)

    def forward_taps(self, taps: Taps, labels: torch.Tensor | None = None) -> Output:
        dtype = self.head.weight.dtype
        mask = taps.attention_mask
        pos = pooled_positions(mask, self.pooling)
        if pos is not None:
            # The loss reads one position: keep only it, before any dtype copy (B×d per tap, no masking).
            rows = torch.arange(mask.shape[0], device=mask.device)
            picked = {i: h[rows, pos] if h.shape[1] > 1 else h[:, 0] for i, h in taps.hidden.items()}
            delta = self.correction([picked[i].to(dtype) for i in self.tap_layers()])
            final = self.final_norm(picked[self.spec.n_layers]).to(dtype) + delta
            ones = torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)
            return self.classify(final.unsqueeze(1), ones, labels)
        real = mask.bool()  # mean pooling: the RNN runs on real tokens only
        delta = self.correction([taps.hidden[i][real].to(dtype) for i in self.tap_layers()])
        final = self.final_norm(taps.hidden[self.spec.n_layers]).to(dtype)
        final = final.masked_scatter(real.unsqueeze(-1), final[real] + delta)
        return self.classify(final, mask, labels)


def apply(backbone: nn.Module, spec: BackboneSpec, cfg: Config, *, n_labels: int, pooling: Pooling) -> ReadModel:
    return ReadModel(backbone, spec, cfg, n_labels, pooling)


INFO = register(MethodInfo(
    name="read", family="side", paper="Wang et al. 2023, READ, arXiv 2305.15348", identity_at_init=True,
    cacheable=True, config_cls=Config, apply=apply, reference_lr=3e-4,
    note="GRU over layers per token; zero-init output so step 0 equals the frozen backbone",
))
