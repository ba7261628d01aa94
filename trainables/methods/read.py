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

Encoder–decoders (T5): one READ module per stack. The decoder's RNN runs over the frozen
decoder's taps at every target position of every candidate and corrects what the LM head
reads. The frozen decoder is fed the UNCORRECTED encoder output (METHODS.md), so nothing is
backpropagated through the backbone and the decoder's taps stay frozen. The encoder's RNN
runs over the encoder's taps at every real source token; the mean of its aggregate over an
example's source tokens is the initial state of the decoder's RNN at that example's target
positions, so the encoder-side module reaches the loss through the side network alone.
`enc_correction_into_decoder=True` is the reference code's variant: the encoder module also
gets W_o, and the frozen decoder reads the corrected encoder output (backprop through the
frozen decoder; its taps then depend on what trains).

Deviations:
- One joiner RMSNorm (a single trainable scale of size d) shared by all layers, as the
  count 4hd + 3h² + 6h + 2d implies; `init_from_embedding` reuses it for φ_0.
- T5: the encoder summary as the decoder RNN's initial state is ours (the reference links
  the stacks only through the corrected encoder output, our option). Without the option the
  encoder module has no W_o (it would get no gradient): T5 READ has 4hd + 3h² + 6h + 2d
  (decoder) + 3hd + 3h² + 6h + d (encoder) trainable parameters, still independent of depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from trainables.backbones import BackboneSpec
from trainables.methods.base import (
    MethodInfo,
    Output,
    Pooling,
    SideModel,
    Taps,
    collect_taps_t2t,
    decoder_taps,
    pooled_positions,
    register,
)

RNNS = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


@dataclass(frozen=True)
class Config:
    hidden_size: int = 256
    rnn: Literal["gru", "lstm", "rnn"] = "gru"
    joiner: Literal["norm", "linear"] = "norm"
    aggregate: Literal["mean", "last"] = "mean"
    scale: float = 1.0  # fixed s in δ = s·(W_o ḡ + b_o)
    init_from_embedding: bool = False
    enc_correction_into_decoder: bool = False  # T5: the reference's variant (backprop through the frozen decoder)

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


def _zero_linear(h: int, d: int) -> nn.Linear:
    out = nn.Linear(h, d)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return out


class ReadModel(SideModel):
    token_local = True

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, cfg: Config, n_labels: int, pooling: Pooling):
        super().__init__(backbone, spec, n_labels, pooling)
        self.cfg = cfg
        d, h = spec.d_model, cfg.hidden_size
        rnn_in = h if cfg.joiner == "linear" else d
        self.joiner = nn.RMSNorm(d, eps=norm_eps(backbone.config))
        self.joiner_proj = nn.Linear(d, h) if cfg.joiner == "linear" else None
        self.h0_proj = nn.Linear(d, h) if cfg.init_from_embedding else None
        self.rnn = RNNS[cfg.rnn](rnn_in, h, batch_first=True)
        self.out = _zero_linear(h, d)
        if self.text2text:  # the encoder stack's module (the one above is the decoder's)
            self.enc_joiner = nn.RMSNorm(d, eps=norm_eps(backbone.config))
            self.enc_joiner_proj = nn.Linear(d, h) if cfg.joiner == "linear" else None
            self.enc_h0_proj = nn.Linear(d, h) if cfg.init_from_embedding else None
            self.enc_rnn = RNNS[cfg.rnn](rnn_in, h, batch_first=True)
            self.enc_out = _zero_linear(h, d) if cfg.enc_correction_into_decoder else None
        elif cfg.enc_correction_into_decoder:
            raise ValueError(f"read: enc_correction_into_decoder needs an encoder–decoder backbone, not {spec.name}")

    @property
    def taps_frozen(self) -> bool:
        return not self.cfg.enc_correction_into_decoder  # the decoder reads the corrected encoder output

    def tap_layers(self) -> list[int]:
        first = 0 if self.cfg.init_from_embedding else 1
        return list(range(first, self.spec.n_layers + 1))

    def decoder_tap_layers(self) -> list[int]:
        first = 0 if self.cfg.init_from_embedding else 1
        return list(range(first, self.spec.n_decoder_layers + 1)) if self.text2text else []

    def aggregate(self, taps: list[torch.Tensor], stack: str = "", state: torch.Tensor | None = None) -> torch.Tensor:
        """ḡ for N independent positions; `taps[i]` is N×d per tap layer. `stack="enc_"`: T5's encoder module."""
        joiner, proj, h0 = (getattr(self, f"{stack}{k}") for k in ("joiner", "joiner_proj", "h0_proj"))
        if h0 is not None:
            first = h0(joiner(taps[0]))
            state, taps = (first if state is None else state + first), taps[1:]
        if state is not None:
            state = state.unsqueeze(0)
            state = (state, torch.zeros_like(state)) if self.cfg.rnn == "lstm" else state
        x = joiner(torch.stack(taps, dim=1))  # N×L×d: the layers are the sequence
        if proj is not None:
            x = proj(x)
        h, _ = getattr(self, f"{stack}rnn")(x, state)
        return h.mean(dim=1) if self.cfg.aggregate == "mean" else h[:, -1]

    def correction(self, taps: list[torch.Tensor], state: torch.Tensor | None = None) -> torch.Tensor:
        """δ for N independent positions; `taps[i]` is N×d for i in tap_layers()."""
        return self.cfg.scale * self.out(self.aggregate(taps, state=state))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> Output:
        if not (self.text2text and self.cfg.enc_correction_into_decoder):
            return super().forward(input_ids, attention_mask, labels)
        # The reference's T5 variant: the frozen decoder reads the corrected encoder output (live, with grad).
        taps = collect_taps_t2t(self.t5, self.spec, input_ids, attention_mask, self.tap_layers(), [], self.words)
        real = attention_mask.bool()
        g = self.aggregate([taps.hidden[i][real].to(self.side_dtype) for i in self.tap_layers()], "enc_")
        encoded = self.final_norm(taps.hidden[self.spec.n_layers], "final_norm").to(self.side_dtype)
        encoded = encoded.masked_scatter(real.unsqueeze(-1), encoded[real] + self.cfg.scale * self.enc_out(g))
        dtype = next(self.t5.parameters()).dtype
        taps.decoder = decoder_taps(self.t5, self.spec, encoded.to(dtype), attention_mask, self.words,
                                    self.decoder_tap_layers())
        return self._decode_side(taps, self._summary(g, real), labels)

    def _summary(self, g: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Per example, the mean encoder aggregate over its real source tokens (B×h)."""
        example = real.nonzero()[:, 0]
        total = torch.zeros(real.shape[0], g.shape[-1], dtype=g.dtype, device=g.device).index_add_(0, example, g)
        return total / real.sum(1, keepdim=True).clamp_min(1).to(g.dtype)

    def _decode_side(self, taps: Taps, summary: torch.Tensor, labels: torch.Tensor | None) -> Output:
        """T5: the decoder module corrects every real target position; its initial state is the encoder summary."""
        dtype, real = self.side_dtype, taps.decoder_mask.bool()
        state = summary[real.nonzero()[:, 0] // self.words.n]
        delta = self.correction([taps.decoder[i][real].to(dtype) for i in self.decoder_tap_layers()], state)
        final = self.final_norm(taps.decoder[self.spec.n_decoder_layers]).to(dtype)
        final = final.masked_scatter(real.unsqueeze(-1), final[real] + delta)
        return self.classify(final, taps.attention_mask, labels)

    def forward_taps(self, taps: Taps, labels: torch.Tensor | None = None) -> Output:
        dtype = self.side_dtype
        mask = taps.attention_mask
        if self.text2text:
            real = mask.bool()
            g = self.aggregate([taps.hidden[i][real].to(dtype) for i in self.tap_layers()], "enc_")
            return self._decode_side(taps, self._summary(g, real), labels)
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
