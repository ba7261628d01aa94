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
        self.downs = nn.ModuleList(GatedDown(d, width) for _ in self.tap_layers())
        self.score = nn.Linear(width, 1)  # w, c of a_k = ReLU(wᵀ(z_k ⊙ g) + c) / ρ_k
        self.out = nn.Linear(width, d)
        self.beta = nn.Parameter(torch.zeros(1))
        self.norm = side_norm(spec.family, backbone.config, d)
        final = spec.anatomy.get(backbone, "final_norm")
        if final is not None and final.weight.device.type != "meta":
            with torch.no_grad():
                self.norm.weight.copy_(final.weight)
        self.runner = BlockRunner(spec.family, backbone.config)

    def tap_layers(self) -> list[int]:
        return [*self.taps, self.spec.n_layers - 1]

    def mix(self, taps: Taps) -> torch.Tensor:
        """m: the early route's output, input to the last block (B×T×d)."""
        dtype = self.head.weight.dtype
        layers = self.tap_layers()
        z = torch.stack([down(taps.hidden[k].to(dtype)) for k, down in zip(layers, self.downs, strict=True)])
        shallow, guide = z[:-1], z[-1]  # guide: the deepest tap, φ_{L-1}
        unit = F.normalize(shallow, dim=-1)
        rho = F.relu(torch.einsum("kbtd,jbtd->kjbt", unit, unit)).sum(1).clamp_min(1e-6)
        a = F.relu(self.score(shallow * guide).squeeze(-1)) / rho  # (K-1)×B×T
        a = a / (a.sum(0, keepdim=True) + 1e-6)
        c = guide + (a.unsqueeze(-1) * shallow).sum(0)
        skip = taps.hidden[self.spec.n_layers - 1].to(dtype)
        return self.out(F.relu(c)) + torch.tanh(self.beta / 0.1) * skip

    def late_route(self, m: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The frozen last block on m, in the block's dtype, with gradients flowing through it."""
        block = self.spec.anatomy.get(self.backbone, "blocks")[-1]
        x = m.to(next(block.parameters()).dtype)
        return self.runner(block, x, self.runner.prepare(x, attention_mask)).to(m.dtype)

    def forward_taps(self, taps: Taps, labels: torch.Tensor | None = None) -> Output:
        h = self.late_route(self.mix(taps), taps.attention_mask)
        return self.classify(self.norm(h), taps.attention_mask, labels)


def apply(backbone: nn.Module, spec: BackboneSpec, cfg: Config, *, n_labels: int, pooling: Pooling) -> SherlModel:
    return SherlModel(backbone, spec, cfg, n_labels, pooling)


INFO = register(MethodInfo(
    name="sherl", family="side-late", paper="Diao et al. 2024, SHERL, arXiv 2407.07523", identity_at_init=False,
    cacheable=True, config_cls=Config, apply=apply, reference_lr=1e-3,
    note="taps below the last block are cacheable; the frozen last block stays on the gradient path",
))
