"""SHERL: a cheap adapter merges early taps; only the backbone's last block is backpropagated.

Paper: Diao et al., "SHERL: Synthesizing High Accuracy and Efficient Memory for
Resource-Limited Transfer Learning", ECCV 2024, arXiv 2407.07523, and its
public reference code (both versions, as read for METHODS.md). Reference r=8, lr 3e-3, weight decay 0.

Early route, per token: taps F = φ_0 … φ_{L−1} (the embedding output and every block's output
but the last's, as the reference feeds them; K = L), each through its own gated
down-projection z_k. The deepest, z_{L−1}, is the guide g; the shallow taps z_0 … z_{L−2}
(or the subset `taps`) are weighted against it: ρ_k = Σ_j ReLU(cos(z_k, z_j)) over the
shallow taps (j = k included), a_k = ReLU(wᵀ(z_k ⊙ g) + c) / ρ_k, ã = a / (Σa + 1e-6),
c = g + Σ_k ã_k z_k. Then m = W_out ReLU(c) + b_out + tanh(β/0.1)·φ_{L−1} (β = 0: the skip
starts closed). Late route: the frozen last block runs on m (on the autograd graph), then a
trainable norm, pooling, head. Everything below the last block is cacheable.

Learning rate 1e-3: the reference's 3e-3 is for its batch sizes; at this study's batch 16 the
side methods prefer lower rates (LST's sweep on MiniLM-L6, trainables/methods/lst.py), so the
search spans 1e-4–1e-2.

Encoder–decoders (T5): SHERL per stack, each with its own early route, skip and norm. The
encoder's early route feeds the frozen last encoder block, whose normed output replaces the
encoder output; the decoder's early route reads the frozen decoder's taps (computed on the
uncorrected encoder output, so they are cacheable) and feeds the frozen last decoder block,
which cross-attends to the SHERL encoder output: gradients pass through the two last blocks
only. The last blocks get T5's relative position bias from their stack's first block.

Deviations:
- ρ_k is clamped at 1e-6 before dividing, so an all-zero z_k cannot give NaN.
- The trainable norm starts as a copy of the backbone's final norm (Llama), so m = φ_{L−1}
  would reproduce the backbone; BERT has no final norm, so a fresh LayerNorm.
- `taps` may choose a subset of the shallow taps (an ablation; the reference reads all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainables.backbones import BackboneSpec, BlockRunner
from trainables.methods.base import MethodInfo, Output, Pooling, SideModel, Taps, register
from trainables.methods.lst import side_norm


@dataclass(frozen=True)
class Config:
    r: int = 8  # adapter width d' = d / r
    taps: tuple[int, ...] = ()  # shallow φ indices weighed against the guide φ_{L-1}, within 0..L-2; () = all

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"sherl: r={self.r} must be a positive integer")


class GatedDown(nn.Module):
    """z = (W2 u + b2 + u) ⊙ sigmoid(W3 u + b3), u = ReLU(W1 f + b1): one per tap."""

    def __init__(self, d: int, width: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(d, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        u = F.relu(self.w1(f))
        return (self.w2(u) + u) * torch.sigmoid(self.w3(u))


class SherlModel(SideModel):
    def __init__(self, backbone: nn.Module, spec: BackboneSpec, cfg: Config, n_labels: int, pooling: Pooling):
        super().__init__(backbone, spec, n_labels, pooling)
        n, d = spec.n_layers, spec.d_model
        if n < 2:
            raise ValueError(f"sherl: needs at least 2 blocks (taps below the last one); {spec.name} has {n}")
        if d % cfg.r:
            valid = [k for k in range(1, d + 1) if d % k == 0]
            raise ValueError(f"sherl: r={cfg.r} must divide d={d}; valid r: {valid}")
        bad = [k for k in cfg.taps if not 0 <= k <= n - 2]
        if bad:
            raise ValueError(f"sherl: taps {bad} out of range; valid φ indices are 0..{n - 2}")
        self.taps = sorted(set(cfg.taps)) or list(range(n - 1))  # shallow; the guide is φ_{L-1}
        width = d // cfg.r
        stacks = [("", "final_norm", len(self.tap_layers()))]
        if self.text2text:  # the attributes without a prefix are the stack that feeds the head: T5's decoder
            stacks = [("", "decoder_final_norm", spec.n_decoder_layers), ("enc_", "final_norm", len(self.tap_layers()))]
        for prefix, norm_part, k in stacks:
            setattr(self, f"{prefix}downs", nn.ModuleList(GatedDown(d, width) for _ in range(k)))
            setattr(self, f"{prefix}score", nn.Linear(width, 1))  # w, c of a_k = ReLU(wᵀ(z_k ⊙ g) + c) / ρ_k
            setattr(self, f"{prefix}out", nn.Linear(width, d))
            setattr(self, f"{prefix}beta", nn.Parameter(torch.zeros(1)))
            setattr(self, f"{prefix}norm", side_norm(spec.family, backbone.config, d))
            final = spec.anatomy.get(backbone, norm_part)
            if final is not None and final.weight.device.type != "meta":
                with torch.no_grad():
                    getattr(self, f"{prefix}norm").weight.copy_(final.weight)
        self.runner = BlockRunner(spec.family, backbone.config)

    def tap_layers(self) -> list[int]:
        return [*self.taps, self.spec.n_layers - 1]

    def decoder_tap_layers(self) -> list[int]:
        return list(range(self.spec.n_decoder_layers)) if self.text2text else []

    def mix(self, taps: Taps, prefix: str = "") -> torch.Tensor:
        """m: the early route's output, input to the last block (B×T×d); T5: `prefix="enc_"` is the encoder's."""
        dtype = self.side_dtype
        hidden = taps.decoder if self.text2text and not prefix else taps.hidden
        layers = self.decoder_tap_layers() if hidden is taps.decoder else self.tap_layers()
        downs = getattr(self, f"{prefix}downs")
        z = torch.stack([down(hidden[k].to(dtype)) for k, down in zip(layers, downs, strict=True)])
        shallow, guide = z[:-1], z[-1]  # guide: the deepest tap, φ_{L-1}
        unit = F.normalize(shallow, dim=-1)
        rho = F.relu(torch.einsum("kbtd,jbtd->kjbt", unit, unit)).sum(1).clamp_min(1e-6)
        a = F.relu(getattr(self, f"{prefix}score")(shallow * guide).squeeze(-1)) / rho  # (K-1)×B×T
        a = a / (a.sum(0, keepdim=True) + 1e-6)
        c = guide + (a.unsqueeze(-1) * shallow).sum(0)
        skip = hidden[layers[-1]].to(dtype)
        return getattr(self, f"{prefix}out")(F.relu(c)) + torch.tanh(getattr(self, f"{prefix}beta") / 0.1) * skip

    def late_route(self, m: torch.Tensor, attention_mask: torch.Tensor, stack: str = "blocks",
                   encoded: torch.Tensor | None = None, encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen last block on m, in the block's dtype, with gradients flowing through it.

        T5: `stack` names the encoder's or decoder's blocks; the last block gets the relative position
        bias from its stack's first block, and a decoder block cross-attends to `encoded`."""
        blocks = self.spec.anatomy.get(self.backbone, stack)
        block = blocks[-1]
        dtype = next(p.dtype for p in block.parameters() if p.is_floating_point())  # not a quantised weight's
        x = m.to(dtype)
        bias = None
        if self.text2text:
            bias = blocks[0].layer[0].SelfAttention.compute_bias(x.shape[1], x.shape[1], device=x.device).to(dtype)
        kwargs = self.runner.prepare(x, attention_mask, None if encoded is None else encoded.to(dtype),
                                     encoder_mask, position_bias=bias) if self.text2text else \
            self.runner.prepare(x, attention_mask)
        return self.runner(block, x, kwargs).to(m.dtype)

    def forward_taps(self, taps: Taps, labels: torch.Tensor | None = None) -> Output:
        if self.text2text:
            mask = taps.attention_mask
            encoded = self.enc_norm(self.late_route(self.mix(taps, "enc_"), mask))
            n = self.words.n
            h = self.late_route(self.mix(taps), taps.decoder_mask, "decoder_blocks",
                                encoded.repeat_interleave(n, 0), mask.repeat_interleave(n, 0))
            return self.classify(self.norm(h), mask, labels)
        h = self.late_route(self.mix(taps), taps.attention_mask)
        return self.classify(self.norm(h), taps.attention_mask, labels)


def apply(backbone: nn.Module, spec: BackboneSpec, cfg: Config, *, n_labels: int, pooling: Pooling) -> SherlModel:
    return SherlModel(backbone, spec, cfg, n_labels, pooling)


INFO = register(MethodInfo(
    name="sherl", family="side-late", paper="Diao et al. 2024, SHERL, arXiv 2407.07523", identity_at_init=False,
    cacheable=True, config_cls=Config, apply=apply, reference_lr=1e-3,
    lr_by_family=(("t5", 3e-3),),  # T5: the LST repo's T5-base GLUE value (batch 100)
    note="taps below the last block are cacheable; the frozen last block stays on the gradient path",
))
