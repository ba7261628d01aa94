"""LST: a narrow side stack of the backbone's own blocks, fed by gated ladders from every block.

Paper: Sung, Cho, Bansal, "LST: Ladder Side-Tuning for Parameter and Memory Efficient
Transfer Learning", NeurIPS 2022, arXiv 2206.06522; code github.com/ylsung/Ladder-Side-Tuning.
Reference r=8. Learning rate 1e-3: the paper's 3e-3 is for T5-base GLUE at batch 100; at this
study's batch 16 on MiniLM-L6 (vader-movies, 1,000 examples, 252 steps) an lr sweep gave
0.772 / 0.758 / 0.736 accuracy at 3e-4 / 1e-3 / 3e-3, so the search (1e-4–1e-2) is centred lower. The reference drops every 4th block from the first (T5-base keeps 9 of 12:
drops 0, 4, 8): `drop_every=4`; studies record the whole method config on every row.

s_0 = Down_0(φ_0); for each kept backbone block j (0-based, as in `layers.j`), reading
φ_{j+1}: ŝ = μ_j·s + (1−μ_j)·Down_{j+1}(φ_{j+1}), μ_j = sigmoid(α_j/0.1), s = SideBlock_j(ŝ);
a dropped block leaves s unchanged. Output: norm, Up (d'→d), pooling, head. With the pruned
init the output norm is the backbone's final norm (BERT: the last block's output LayerNorm)
pruned to the last side block's residual indices, as the reference copies it.
Side blocks are LlamaDecoderLayer / BertLayer at width d' = d/r and FFN d_ff/r with the
backbone's head count (head dim / r), so a structured prune of block j fits side block j.

Deviations:
- Default init is `prune` with `importance="l1"` (needs no data). The paper's Fisher
  importance (batch 1, N examples) needs task batches: build with `importance="fisher"`,
  then call `prune_init(model, batches)`; its head is the freshly initialised one. The
  default study uses Fisher (study/scaling.py), with fewer examples than the paper's 1,024
  when the training set is smaller.
- Pruning keeps one index set per block for the residual stream, one for the FFN, and
  one set of within-head dims shared by all heads (q/k, and v/o); for Llama, q/k dims
  are chosen in rotary pairs (j, j + head_dim/2) so rotate_half stays meaningful.
  Side blocks' own rotary uses the side head dim's frequencies.
- Gates exist only for kept blocks on single-stack backbones (the reference also creates
  unused gates for dropped ones). On T5 the side network is the reference's (`LstT5Model`:
  side encoder and side decoder, a gate per backbone block, dropped ones included), so
  T5-base with r=8 and `drop_every=4` has its 3,878,712 trainable parameters exactly.
- T5: the side decoder's cross-attention keys/values are pruned along the side encoder's
  kept output dims; the first kept side block of each stack gets the backbone's relative
  bias table (all heads are kept).
- Random init of side blocks uses the HF scheme (normal, std = initializer_range).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.t5.modeling_t5 import T5Block, T5LayerNorm

from trainables.backbones import BackboneSpec, BlockRunner
from trainables.methods.base import MethodInfo, Output, Pooling, SideModel, Taps, register
from trainables.text2text import decode


@dataclass(frozen=True)
class Config:
    r: int = 8  # reduction factor: side width d' = d / r
    drop_layers: tuple[int, ...] = ()  # 0-based backbone block indices without a side block
    drop_every: int = 0  # also drop blocks 0, k, 2k, ... (the reference: k = 4); 0 = none
    heads: int | None = None  # side attention heads; None = the backbone's (head dim shrinks by r)
    init: Literal["random", "prune"] = "prune"
    importance: Literal["l1", "fisher"] = "l1"
    fisher_examples: int = 1024
    merge_last: bool = False  # gate the backbone's final hidden state into the output

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lst: r={self.r} must be a positive integer")
        if self.init not in ("random", "prune") or self.importance not in ("l1", "fisher"):
            raise ValueError(f"lst: init={self.init!r}, importance={self.importance!r}; "
                             "valid: init random|prune, importance l1|fisher")
        if self.drop_every < 0:
            raise ValueError(f"lst: drop_every={self.drop_every} must be >= 0 (0: keep every block)")
        if self.fisher_examples < 1:
            raise ValueError(f"lst: fisher_examples={self.fisher_examples} must be >= 1")


def side_config(backbone_config: Any, family: str, cfg: Config) -> Any:
    """The backbone's HF config shrunk by r; one-line errors name the valid values."""
    if family == "t5":
        return _t5_side_config(backbone_config, cfg)
    d, ff, n_heads = backbone_config.hidden_size, backbone_config.intermediate_size, backbone_config.num_attention_heads
    if d % cfg.r or ff % cfg.r:
        valid = [k for k in range(1, math.gcd(d, ff) + 1) if math.gcd(d, ff) % k == 0]
        raise ValueError(f"lst: r={cfg.r} must divide d={d} and d_ff={ff}; valid r: {valid}")
    width = d // cfg.r
    heads = cfg.heads or n_heads
    rotary = family == "llama"

    def fits(h: int) -> bool:
        return width % h == 0 and (not rotary or (width // h) % 2 == 0)

    if heads < 1 or not fits(heads):
        valid = [h for h in range(1, width + 1) if fits(h)]
        why = "an even head dim (rotary)" if rotary else "a whole head dim"
        raise ValueError(f"lst: {heads} heads at side width {width} (d={d}, r={cfg.r}) do not give {why}; "
                         f"valid heads: {valid or 'none: lower r'}")
    side = copy.deepcopy(backbone_config)
    side.hidden_size, side.intermediate_size, side.num_attention_heads = width, ff // cfg.r, heads
    if rotary:
        side.head_dim = width // heads
        side.num_key_value_heads = math.gcd(heads, backbone_config.num_key_value_heads)
    return side


def _t5_side_config(config: Any, cfg: Config) -> Any:
    """T5 shrunk by r as the reference does: d_model, d_ff and the per-head d_kv all / r, same head count."""
    dims = {"d_model": config.d_model, "d_ff": config.d_ff, "d_kv": config.d_kv}
    if cfg.heads is not None and cfg.heads != config.num_heads:
        raise ValueError(f"lst: T5 side blocks keep the backbone's {config.num_heads} heads (d_kv shrinks by r); "
                         f"heads={cfg.heads} is not supported")
    if any(v % cfg.r for v in dims.values()):
        g = math.gcd(*dims.values())
        raise ValueError(f"lst: r={cfg.r} must divide {dims}; valid r: {[k for k in range(1, g + 1) if g % k == 0]}")
    side = copy.deepcopy(config)
    side.d_model, side.d_ff, side.d_kv = (v // cfg.r for v in dims.values())
    side.use_cache = False
    return side


def side_norm(family: str, backbone_config: Any, width: int) -> nn.Module:
    """A fresh trainable norm of the family's kind (RMSNorm for Llama, LayerNorm for BERT, T5's RMS norm)."""
    if family == "llama":
        return LlamaRMSNorm(width, eps=backbone_config.rms_norm_eps)
    if family == "t5":
        return T5LayerNorm(width, eps=backbone_config.layer_norm_epsilon)
    return nn.LayerNorm(width, eps=backbone_config.layer_norm_eps)


class Stack(NamedTuple):
    """One ladder: the backbone blocks it reads, which it keeps, and the side blocks and norm it trains."""

    prefix: str  # "" for single-stack backbones; "enc_"/"dec_" for T5
    backbone_blocks: Any
    kept: list[int]
    side_blocks: nn.ModuleDict
    side_norm: nn.Module
    final_norm: str  # the anatomy part the side norm is pruned from


def fisher_pruned(cfg: Config) -> bool:
    return cfg.init == "prune" and cfg.importance == "fisher"


def kept_blocks(n: int, cfg: Config) -> list[int]:
    """Block indices with a side block: all but `drop_layers` and every `drop_every`-th from 0."""
    bad = [j for j in cfg.drop_layers if not 0 <= j < n]
    if bad:
        raise ValueError(f"lst: drop_layers {bad} out of range; blocks are 0..{n - 1} (0-based)")
    dropped = {*cfg.drop_layers, *(range(0, n, cfg.drop_every) if cfg.drop_every else ())}
    kept = [j for j in range(n) if j not in dropped]
    if not kept:
        raise ValueError(f"lst: drop_layers drops all {n} blocks; keep at least one")
    return kept


class LstModel(SideModel):
    def __init__(self, backbone: nn.Module, spec: BackboneSpec, cfg: Config, n_labels: int, pooling: Pooling):
        super().__init__(backbone, spec, n_labels, pooling)
        self.cfg = cfg
        self.kept = kept_blocks(spec.n_layers, cfg)
        self.side_config = side_config(backbone.config, spec.family, cfg)
        d, width = spec.d_model, self.side_config.hidden_size
        block_cls = spec.anatomy.block_class  # the family's own block (Qwen2's has q/k/v biases)
        self.blocks = nn.ModuleDict({str(j): block_cls(self.side_config, layer_idx=j) for j in self.kept})
        self.downs = nn.ModuleDict({str(t): nn.Linear(d, width) for t in [0, *(j + 1 for j in self.kept)]})
        self.alpha = nn.Parameter(torch.zeros(len(self.kept)))
        self.norm = side_norm(spec.family, backbone.config, width)
        self.up = nn.Linear(width, d)
        self.merge_alpha = nn.Parameter(torch.zeros(1)) if cfg.merge_last else None
        self.runner = BlockRunner(spec.family, self.side_config)
        self._hf_init(self.blocks)

    @property
    def needs_data_init(self) -> bool:
        """The Fisher-pruned init needs training examples (`init_with_data`); l1 and random need none."""
        return fisher_pruned(self.cfg)

    def _hf_init(self, module: nn.Module) -> None:
        std = self.side_config.initializer_range
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def stacks(self) -> list[Stack]:
        return [Stack("", self.spec.anatomy.get(self.backbone, "blocks"), self.kept, self.blocks, self.norm,
                      "final_norm")]

    def tap_layers(self) -> list[int]:
        extra = [self.spec.n_layers] if self.cfg.merge_last else []
        return sorted({0, *(j + 1 for j in self.kept), *extra})

    def forward_taps(self, taps: Taps, labels: torch.Tensor | None = None) -> Output:
        dtype = self.head.weight.dtype
        mask = taps.attention_mask
        s = self.downs["0"](taps.hidden[0].to(dtype))
        kwargs = self.runner.prepare(s, mask)
        gates = torch.sigmoid(self.alpha / 0.1)
        for n, j in enumerate(self.kept):
            ladder = self.downs[str(j + 1)](taps.hidden[j + 1].to(dtype))
            s = self.runner(self.blocks[str(j)], gates[n] * s + (1 - gates[n]) * ladder, kwargs)
        out = self.up(self.norm(s))
        if self.merge_alpha is not None:
            mu = torch.sigmoid(self.merge_alpha / 0.1)
            out = mu * self.final_norm(taps.hidden[self.spec.n_layers].to(dtype)).to(dtype) + (1 - mu) * out
        return self.classify(out, mask, labels)


class LstT5Model(SideModel):
    """LST on T5 as the reference builds it: a side encoder over the encoder's taps and a side decoder
    over the frozen decoder's taps that cross-attends to the side encoder; Up then the LM head.

    Each stack: s_0 = Down_0(φ_0), gated ladders into side T5 blocks at the kept indices, a side final
    norm. Gates exist for every backbone block, dropped ones included, and the first kept side block
    owns the relative-bias table, as in the reference (its T5-base count, 3,878,712, needs both)."""

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, cfg: Config, n_labels: int, pooling: Pooling):
        super().__init__(backbone, spec, n_labels, pooling)
        if cfg.merge_last:
            raise ValueError("lst: merge_last is not supported on encoder–decoder backbones")
        self.cfg = cfg
        self.side_config = side_config(backbone.config, "t5", cfg)
        d, width = spec.d_model, self.side_config.d_model
        self.kept = {"enc_": kept_blocks(spec.n_layers, cfg), "dec_": kept_blocks(spec.n_decoder_layers, cfg)}
        self.runners = {}
        for prefix, n in (("enc_", spec.n_layers), ("dec_", spec.n_decoder_layers)):
            config = copy.deepcopy(self.side_config)
            config.is_decoder = prefix == "dec_"
            kept = self.kept[prefix]
            setattr(self, f"{prefix}blocks", nn.ModuleDict({
                str(j): T5Block(config, has_relative_attention_bias=j == kept[0], layer_idx=j) for j in kept}))
            setattr(self, f"{prefix}downs", nn.ModuleDict({str(t): nn.Linear(d, width)
                                                           for t in [0, *(j + 1 for j in kept)]}))
            setattr(self, f"{prefix}alpha", nn.Parameter(torch.zeros(n)))
            setattr(self, f"{prefix}norm", side_norm("t5", backbone.config, width))
            self.runners[prefix] = BlockRunner("t5", config)
        self.up = nn.Linear(width, d)
        std = backbone.config.initializer_factor * width ** -0.5
        for m in [*self.enc_blocks.modules(), *self.dec_blocks.modules()]:
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=std)

    @property
    def needs_data_init(self) -> bool:
        return fisher_pruned(self.cfg)

    def stacks(self) -> list[Stack]:
        get = self.spec.anatomy.get
        return [Stack("enc_", get(self.backbone, "blocks"), self.kept["enc_"], self.enc_blocks, self.enc_norm,
                      "final_norm"),
                Stack("dec_", get(self.backbone, "decoder_blocks"), self.kept["dec_"], self.dec_blocks,
                      self.dec_norm, "decoder_final_norm")]

    def tap_layers(self) -> list[int]:
        return [0, *(j + 1 for j in self.kept["enc_"])]

    def decoder_tap_layers(self) -> list[int]:
        return [0, *(j + 1 for j in self.kept["dec_"])]

    def ladder(self, prefix: str, hidden: dict[int, torch.Tensor], mask: torch.Tensor,
               encoded: torch.Tensor | None = None, encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        dtype, runner = self.side_dtype, self.runners[prefix]
        downs, blocks = getattr(self, f"{prefix}downs"), getattr(self, f"{prefix}blocks")
        s = downs["0"](hidden[0].to(dtype))
        kwargs = runner.prepare(s, mask, encoded, encoder_mask)
        gates = torch.sigmoid(getattr(self, f"{prefix}alpha") / 0.1)
        for j in self.kept[prefix]:
            ladder = downs[str(j + 1)](hidden[j + 1].to(dtype))
            s = runner(blocks[str(j)], gates[j] * s + (1 - gates[j]) * ladder, kwargs)
        return getattr(self, f"{prefix}norm")(s)

    def forward_taps(self, taps: Taps, labels: torch.Tensor | None = None) -> Output:
        n, mask = self.words.n, taps.attention_mask
        encoded = self.ladder("enc_", taps.hidden, mask)
        decoded = self.ladder("dec_", taps.decoder, taps.decoder_mask, encoded.repeat_interleave(n, 0),
                              mask.repeat_interleave(n, 0))
        return self.classify(self.up(decoded), mask, labels)


# --------------------------------------------------------------------------- pruned init

# module inside a block -> (what its rows index, what its columns index); None: a vector
# "res" residual stream, "ffn" FFN hidden, "qk"/"vo" within-head dims (all heads share them)
PLANS: dict[str, dict[str, tuple[str, str | None]]] = {
    "llama": {
        "self_attn.q_proj": ("qk", "res"), "self_attn.k_proj": ("qk", "res"),
        "self_attn.v_proj": ("vo", "res"), "self_attn.o_proj": ("res", "vo"),
        "mlp.gate_proj": ("ffn", "res"), "mlp.up_proj": ("ffn", "res"), "mlp.down_proj": ("res", "ffn"),
        "input_layernorm": ("res", None), "post_attention_layernorm": ("res", None),
    },
    "bert": {
        "attention.self.query": ("qk", "res"), "attention.self.key": ("qk", "res"),
        "attention.self.value": ("vo", "res"), "attention.output.dense": ("res", "vo"),
        "attention.output.LayerNorm": ("res", None),
        "intermediate.dense": ("ffn", "res"), "output.dense": ("res", "ffn"), "output.LayerNorm": ("res", None),
    },
}


def _t5_plan() -> dict[str, tuple[str, str | None]]:
    """T5 blocks: self-attention is layer 0; the decoder's cross-attention is layer 1 (its keys and values
    read the side encoder's output dims, "enc"); the FFN is layer 1 (encoder) or 2 (decoder)."""
    plan: dict[str, tuple[str, str | None]] = {
        "layer.0.SelfAttention.q": ("qk", "res"), "layer.0.SelfAttention.k": ("qk", "res"),
        "layer.0.SelfAttention.v": ("vo", "res"), "layer.0.SelfAttention.o": ("res", "vo"),
        "layer.0.SelfAttention.relative_attention_bias": ("all", "all"), "layer.0.layer_norm": ("res", None),
        "layer.1.EncDecAttention.q": ("qk", "res"), "layer.1.EncDecAttention.k": ("qk", "enc"),
        "layer.1.EncDecAttention.v": ("vo", "enc"), "layer.1.EncDecAttention.o": ("res", "vo"),
    }
    for ff in (1, 2):
        plan |= {f"layer.{ff}.DenseReluDense.wi": ("ffn", "res"), f"layer.{ff}.DenseReluDense.wi_0": ("ffn", "res"),
                 f"layer.{ff}.DenseReluDense.wi_1": ("ffn", "res"), f"layer.{ff}.DenseReluDense.wo": ("res", "ffn"),
                 f"layer.{ff}.layer_norm": ("res", None)}
    return plan


PLANS["t5"] = _t5_plan()


def _split(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _scores(block: nn.Module, family: str, head_dim: int, sums: dict[str, tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """Importance per index of each kind, from per-parameter (row sums, column sums)."""
    total: dict[str, torch.Tensor] = {}

    def add(kind: str, v: torch.Tensor) -> None:
        if kind in ("qk", "vo"):  # fold heads: one score per within-head dim
            v = v.reshape(-1, head_dim).sum(0)
        if kind not in ("all", "enc"):  # kept whole / chosen by the side encoder
            total[kind] = total.get(kind, 0) + v.float()

    for name, _ in block.named_parameters():
        module, leaf = _split(name)
        rows, cols = PLANS[family][module]
        add(rows, sums[name][0])
        if leaf == "weight" and cols is not None:
            add(cols, sums[name][1])
    return total


def _top(score: torch.Tensor, k: int, pairs: bool = False) -> torch.Tensor:
    """Indices of the k most important, in their original order; rotary pairs (j, j+n/2) together."""
    if not pairs:
        return score.topk(k).indices.sort().values
    half = score.numel() // 2
    j = (score[:half] + score[half:]).topk(k // 2).indices.sort().values
    return torch.cat([j, j + half])


def _index(kind: str, sel: dict[str, torch.Tensor], size: int, head_dim: int) -> torch.Tensor:
    """Kept positions along a dimension of `size`; within-head dims repeat for every head."""
    if kind == "all":
        return torch.arange(size, device=sel["res"].device)
    if kind in ("qk", "vo"):
        heads = torch.arange(size // head_dim, device=sel[kind].device)
        return (heads[:, None] * head_dim + sel[kind]).reshape(-1)
    return sel[kind]


def prune_init(model: LstModel, batches: Iterable[Any] | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Copy each backbone block, pruned to 1/r by importance, into the side block of the same index.

    Returns the kept indices per block ({"res", "ffn", "qk", "vo"}). No-op on a backbone wholly on the
    meta device (counting); it reads only the blocks and final norms, so a cached trial, whose backbone
    has just those loaded, gets the same init as a live one. Fisher importance needs `batches` (dicts or
    tuples of input_ids, attention_mask, labels) and the whole backbone.
    """
    cfg, spec, side = model.cfg, model.spec, model.side_config
    reads = [p for st in model.stacks() for p in st.backbone_blocks.parameters()]
    on_meta = [p.device.type == "meta" for p in reads]
    if all(on_meta):
        return {}
    if any(on_meta) or (cfg.importance == "fisher" and any(p.device.type == "meta" for p in model.backbone.parameters())):
        raise ValueError("lst: the pruned init reads backbone weights that are not loaded (meta device)")
    if cfg.heads is not None and cfg.heads != model.backbone.config.num_attention_heads:
        raise ValueError(f"lst: prune init needs the backbone's head count, not heads={cfg.heads}")
    stacks = model.stacks()
    if cfg.importance == "fisher":
        if batches is None:
            raise ValueError("lst: importance='fisher' needs batches: prune_init(model, batches)")
        sums = _fisher_sums(model, batches)
    else:
        sums = {f"{st.prefix}{j}.{n}": _line_sums(p.abs()) for st in stacks for j in st.kept
                for n, p in _dense_parameters(st.backbone_blocks[j])}
    head_dim = model.backbone.config.head_dim if spec.family == "t5" else \
        spec.d_model // model.backbone.config.num_attention_heads
    side_head_dim = side.hidden_size // side.num_attention_heads if spec.family != "t5" else side.d_kv
    ffn = side.d_ff if spec.family == "t5" else side.intermediate_size
    sizes = {"res": side.hidden_size, "ffn": ffn, "qk": side_head_dim, "vo": side_head_dim}
    chosen: dict[int | str, dict[str, torch.Tensor]] = {}
    encoder_res = None  # T5: the side encoder's output dims, what the side decoder's cross-attention reads
    for st in stacks:
        for j in st.kept:
            blocks = st.backbone_blocks
            own = {n: sums[f"{st.prefix}{j}.{n}"] for n, _ in blocks[j].named_parameters()}
            scores = _scores(blocks[j], spec.family, head_dim, own)
            sel = {k: _top(v, sizes[k], pairs=(k == "qk" and spec.family == "llama")) for k, v in scores.items()}
            if encoder_res is not None:
                sel["enc"] = encoder_res
            _copy_pruned(blocks[j], st.side_blocks[str(j)], spec.family, sel, head_dim)
            chosen[f"{st.prefix}{j}" if st.prefix else j] = sel
        if spec.family == "t5":  # the side's first block owns the relative bias table: the backbone's, all heads
            first = st.side_blocks[str(st.kept[0])].layer[0].SelfAttention.relative_attention_bias
            with torch.no_grad():
                first.weight.copy_(st.backbone_blocks[0].layer[0].SelfAttention.relative_attention_bias.weight)
        last_res = chosen[f"{st.prefix}{st.kept[-1]}" if st.prefix else st.kept[-1]]["res"]
        _copy_final_norm(model, st, last_res)
        encoder_res = last_res
    return chosen


def _copy_final_norm(model: LstModel, stack: Stack, res: torch.Tensor) -> None:
    """The side output norm := the backbone's final norm, pruned to the last side block's residual indices.

    Post-LN BERT has no final norm: its final hidden state leaves the last block's output LayerNorm."""
    final = model.spec.anatomy.get(model.backbone, stack.final_norm)
    if final is None:
        final = model.spec.anatomy.get(model.backbone, "blocks")[-1].output.LayerNorm
    own = dict(stack.side_norm.named_parameters())
    with torch.no_grad():
        for name, p in final.named_parameters():
            own[name].copy_(p.index_select(0, res))


def _line_sums(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(row sums, column sums) of a matrix; (x,) for a vector."""
    return (x.sum(-1), x.sum(0)) if x.dim() == 2 else (x,)


def _dense_parameters(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A block's parameters by name, a quantised backbone's Linear weights dequantised (the values the
    frozen backbone computes with), so a pruned init reads a quantised backbone as it reads any other."""
    from trainables.backbones import dense_weight, quantised_linears

    quantised = quantised_linears(block)
    dense = {f"{n}.weight": dense_weight(m) for n, m in block.named_modules() if any(m is q for q in quantised)}
    return [(n, dense.get(n, p)) for n, p in block.named_parameters()]


def _copy_pruned(src: nn.Module, dst: nn.Module, family: str, sel: dict[str, torch.Tensor], head_dim: int) -> None:
    dst_params = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in _dense_parameters(src):
            module, leaf = _split(name)
            rows, cols = PLANS[family][module]
            w = p.index_select(0, _index(rows, sel, p.shape[0], head_dim))
            if leaf == "weight" and cols is not None:
                w = w.index_select(1, _index(cols, sel, p.shape[1], head_dim))
            dst_params[name].copy_(w)


def _examples(batches: Iterable[Any], device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    for batch in batches:
        parts = (batch["input_ids"], batch["attention_mask"], batch["labels"]) if isinstance(batch, dict) else batch
        for i in range(parts[0].shape[0]):
            yield tuple(x[i:i + 1].to(device) for x in parts[:3])


def _fisher_sums(model: LstModel, batches: Iterable[Any]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Σ over examples (batch 1, as the paper) of squared task-loss grads, kept as row/column sums.

    The backbone (frozen, eval mode) plus this model's head gives the task loss. Block by block:
    each parameter's gradient is folded into its sums as backward produces it and freed at once, so
    beside the weights and one example's activations about one block's gradients exist at a time,
    never a gradient copy of the whole backbone (a 7B init needs the memory of a 7B batch-1 forward
    and backward, not twice the weights).
    """
    params = {f"{st.prefix}{j}.{n}": p for st in model.stacks() for j in st.kept
              for n, p in st.backbone_blocks[j].named_parameters()}
    sums = {name: tuple(torch.zeros(n, dtype=torch.float32, device=p.device) for n in p.shape)  # (rows, cols) or (n,)
            for name, p in params.items()}

    def fold(name: str) -> Any:
        def hook(p: torch.Tensor) -> None:
            sums[name] = tuple(a + b for a, b in zip(sums[name], _line_sums(p.grad.float() ** 2), strict=True))
            p.grad = None

        return hook

    was_training = model.backbone.training
    model.backbone.eval()
    for p in params.values():
        p.requires_grad_(True)
    handles = [p.register_post_accumulate_grad_hook(fold(name)) for name, p in params.items()]
    seen = 0
    try:
        device = next(model.backbone.parameters()).device
        for ids, mask, labels in itertools.islice(_examples(batches, device), model.cfg.fisher_examples):
            with torch.enable_grad():
                if model.text2text:  # the frozen T5 scoring the true class's target words
                    encoded = model.t5.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                    h = decode(model.t5, encoded, mask, model.words)
                else:
                    h = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
                loss = model.classify(h.to(model.side_dtype), mask, labels).loss
                torch.autograd.backward(loss, inputs=list(params.values()))  # the head's .grad stays untouched
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
        model.backbone.train(was_training)
    if not seen:
        raise ValueError("lst: fisher importance got no examples from batches")
    return sums


def _fisher_init(model: LstModel, batches: Iterable[Any]) -> None:
    if fisher_pruned(model.cfg):
        prune_init(model, batches)


def apply(backbone: nn.Module, spec: BackboneSpec, cfg: Config, *, n_labels: int,
          pooling: Pooling) -> LstModel | LstT5Model:
    cls = LstT5Model if spec.anatomy.encoder_decoder else LstModel
    model = cls(backbone, spec, cfg, n_labels, pooling)
    if cfg.init == "prune" and cfg.importance == "l1":
        prune_init(model)
    return model


INFO = register(MethodInfo(
    name="lst", family="side", paper="Sung, Cho, Bansal 2022, LST, arXiv 2206.06522", identity_at_init=False,
    cacheable=True, config_cls=Config, apply=apply, reference_lr=1e-3,
    init_with_data=_fisher_init, lr_by_family=(("t5", 3e-3),),  # T5: the LST repo's T5-base GLUE value (batch 100)
    note="importance='fisher' prunes by Fisher scores over training examples (run after apply where the "
         "backbone is; cached trials read it from trainables.inits)",
))
