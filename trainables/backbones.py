"""Registry of named backbones: HF config, hub id, local loader, and anatomy.

A name resolves to a `BackboneSpec`; `build(name, device="meta")` gives the bare
backbone (LlamaModel / BertModel, no LM head) for counting, estimating and training.
Real configs are written out here (not fetched) so every size, up to llama-70b, can be
built on the meta device offline in milliseconds. `name@L<k>` truncates to the first k
blocks (pretrained weights included), which gives a pretrained depth ladder offline.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

Family = Literal["llama", "bert"]
Device = Literal["meta", "cpu", "cuda"]
Weights = Literal["random", "pretrained"]


@dataclass(frozen=True)
class Anatomy:
    """Where a family keeps its parts (attribute paths on the bare backbone)."""

    blocks: str
    embeddings: str
    final_norm: str | None  # None: the last block's output is the final hidden state (BERT, post-LN)
    attn_proj: tuple[str, ...]  # q, k, v, o module names inside a block
    mlp_proj: tuple[str, ...]
    pooling: Literal["first", "last", "mean"]  # default pooling for classification

    def get(self, model: nn.Module, part: str) -> Any:
        path = getattr(self, part)
        return None if path is None else operator.attrgetter(path)(model)


ANATOMIES: dict[str, Anatomy] = {
    "llama": Anatomy(
        blocks="layers",
        embeddings="embed_tokens",
        final_norm="norm",
        attn_proj=("q_proj", "k_proj", "v_proj", "o_proj"),
        mlp_proj=("gate_proj", "up_proj", "down_proj"),
        pooling="last",
    ),
    "bert": Anatomy(
        blocks="encoder.layer",
        embeddings="embeddings",
        final_norm=None,
        attn_proj=("query", "key", "value", "dense"),
        mlp_proj=("intermediate.dense", "output.dense"),
        pooling="first",
    ),
}


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: Family
    config: dict[str, Any] = field(repr=False)
    hf_id: str | None = None
    local: str | None = None  # asset name in trainables.assets holding pretrained weights
    tokenizer: str | None = None  # asset whose tokenizer this backbone uses
    note: str = ""

    @property
    def anatomy(self) -> Anatomy:
        return ANATOMIES[self.family]

    @property
    def n_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def d_model(self) -> int:
        return int(self.config["hidden_size"])

    def hf_config(self) -> LlamaConfig | BertConfig:
        cls = LlamaConfig if self.family == "llama" else BertConfig
        cfg = cls(**self.config)
        # One attention implementation everywhere, so side blocks and the backbone agree.
        cfg._attn_implementation = "sdpa"
        return cfg


def _llama(d: int, layers: int, heads: int, ff: int, vocab: int = 32000, kv: int | None = None,
           tied: bool = False, **extra: Any) -> dict[str, Any]:
    return dict(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv or heads, intermediate_size=ff, vocab_size=vocab,
                tie_word_embeddings=tied, max_position_embeddings=extra.pop("max_pos", 4096),
                rms_norm_eps=extra.pop("eps", 1e-5), pad_token_id=extra.pop("pad", 0), **extra)


def _bert(d: int, layers: int, heads: int, ff: int, vocab: int = 30522) -> dict[str, Any]:
    return dict(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=ff, vocab_size=vocab, max_position_embeddings=512, pad_token_id=0)


_SMOL = dict(vocab=49152, tied=True, rope_theta=100000.0, pad=2, max_pos=8192)
_SPECS = [
    # tests: tiny, but with the real tokenizers' vocabularies so they also run on real tasks
    BackboneSpec("llama-tiny", "llama", _llama(64, 2, 4, 128, kv=2, **_SMOL), tokenizer="smollm2-135m",
                 note="tests"),
    BackboneSpec("bert-tiny", "bert", _bert(64, 2, 4, 128), tokenizer="minilm-l6", note="tests"),
    # random-initialised Llama ladder for cost scaling on CPU (width and depth grow together)
    BackboneSpec("llama-11m", "llama", _llama(256, 4, 4, 688), tokenizer="smollm2-135m", note="ladder"),
    BackboneSpec("llama-35m", "llama", _llama(512, 6, 8, 1376), tokenizer="smollm2-135m", note="ladder"),
    BackboneSpec("llama-110m", "llama", _llama(768, 12, 12, 2048), tokenizer="smollm2-135m", note="ladder"),
    BackboneSpec("llama-340m", "llama", _llama(1024, 24, 16, 2816), tokenizer="smollm2-135m", note="ladder"),
    # real configurations (hub ids for clusters)
    BackboneSpec("tinyllama-1.1b", "llama", _llama(2048, 22, 32, 5632, kv=4, max_pos=2048),
                 hf_id="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"),
    BackboneSpec("llama-7b", "llama", _llama(4096, 32, 32, 11008, eps=1e-6, max_pos=2048),
                 hf_id="huggyllama/llama-7b"),
    BackboneSpec("llama-13b", "llama", _llama(5120, 40, 40, 13824, eps=1e-6, max_pos=2048),
                 hf_id="huggyllama/llama-13b"),
    BackboneSpec("llama-70b", "llama", _llama(8192, 80, 64, 28672, kv=8, max_pos=4096),
                 hf_id="meta-llama/Llama-2-70b-hf"),
    BackboneSpec("smollm2-135m", "llama", _llama(576, 30, 9, 1536, kv=3, **_SMOL),
                 hf_id="HuggingFaceTB/SmolLM2-135M-Instruct", local="smollm2-135m", tokenizer="smollm2-135m"),
    BackboneSpec("smollm2-360m", "llama", _llama(960, 32, 15, 2560, kv=5, **_SMOL),
                 hf_id="HuggingFaceTB/SmolLM2-360M-Instruct", tokenizer="smollm2-135m"),
    BackboneSpec("smollm2-1.7b", "llama", _llama(2048, 24, 32, 8192, kv=32, **_SMOL),
                 hf_id="HuggingFaceTB/SmolLM2-1.7B-Instruct", tokenizer="smollm2-135m"),
    BackboneSpec("minilm-l6", "bert", _bert(384, 6, 12, 1536), hf_id="sentence-transformers/all-MiniLM-L6-v2",
                 local="minilm-l6", tokenizer="minilm-l6"),
    BackboneSpec("bert-base", "bert", _bert(768, 12, 12, 3072), hf_id="bert-base-uncased", tokenizer="minilm-l6"),
    BackboneSpec("bert-large", "bert", _bert(1024, 24, 16, 4096), hf_id="bert-large-uncased",
                 tokenizer="minilm-l6"),
]
REGISTRY: dict[str, BackboneSpec] = {s.name: s for s in _SPECS}


def names() -> list[str]:
    return list(REGISTRY)


def get_spec(name: str | BackboneSpec) -> BackboneSpec:
    """Resolve a name, including truncated variants `base@L<k>` (first k blocks)."""
    if isinstance(name, BackboneSpec):
        return name
    base, _, trunc = name.partition("@")
    if base not in REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(REGISTRY)} (or NAME@L<k> to truncate)")
    spec = REGISTRY[base]
    if not trunc:
        return spec
    if not (trunc.startswith("L") and trunc[1:].isdigit()):
        raise ValueError(f"bad truncation {trunc!r} in {name!r}; expected NAME@L<k>, e.g. {base}@L{spec.n_layers // 2}")
    k = int(trunc[1:])
    if not 1 <= k <= spec.n_layers:
        raise ValueError(f"{name!r}: {base} has {spec.n_layers} blocks; k must be in 1..{spec.n_layers}")
    return dataclasses.replace(spec, name=name, config={**spec.config, "num_hidden_layers": k})


def build(spec: str | BackboneSpec, device: Device | str = "meta", weights: Weights = "random",
          dtype: torch.dtype = torch.float32, causal_lm: bool = False) -> nn.Module:
    """Build a backbone. Meta builds allocate nothing (any size in well under a second).

    `causal_lm=True` returns the LM-head model (LlamaForCausalLM) — only for counting
    against published totals; training uses the bare backbone.
    """
    spec = get_spec(spec)
    cfg = spec.hf_config()
    if weights == "pretrained":
        if causal_lm:
            raise ValueError("pretrained causal-LM builds are not needed; use causal_lm=False")
        model = _load_pretrained(spec, cfg, dtype)
        return model.to(device) if str(device) != "cpu" else model
    if weights != "random":
        raise ValueError(f"weights must be 'random' or 'pretrained', not {weights!r}")
    cls = (LlamaForCausalLM if causal_lm else LlamaModel) if spec.family == "llama" else BertModel
    if causal_lm and spec.family != "llama":
        raise ValueError(f"causal_lm builds exist only for the llama family, not {spec.family}")
    kwargs = {"add_pooling_layer": False} if spec.family == "bert" else {}
    # Random values are drawn on the CPU whatever the target device (CUDA's generator draws other
    # numbers from the same seed): a trial on a GPU node gets the weights, and so the activation-cache
    # key, that the planner and the cache builders computed on CPU.
    with torch.device("meta" if str(device) == "meta" else "cpu"):
        model = cls(cfg, **kwargs)
    return model.to(dtype).to(device).eval()


def _load_pretrained(spec: BackboneSpec, cfg: LlamaConfig | BertConfig, dtype: torch.dtype) -> nn.Module:
    from trainables.assets import asset_path  # local import: meta counting needs no asset cache

    if spec.local is None:
        where = f"hub id {spec.hf_id}" if spec.hf_id else "no weights"
        local = [s.name for s in REGISTRY.values() if s.local]
        raise ValueError(f"{spec.name} has no offline weights here ({where}); pretrained offline: {', '.join(local)}")
    folder = asset_path(spec.local)
    cls = LlamaModel if spec.family == "llama" else BertModel
    kwargs = {"add_pooling_layer": False} if spec.family == "bert" else {}
    # The registry's config (possibly truncated) wins over the checkpoint's; blocks beyond k are ignored.
    pretrained_cfg = cls.config_class.from_pretrained(folder)
    pretrained_cfg.num_hidden_layers = cfg.num_hidden_layers
    pretrained_cfg._attn_implementation = cfg._attn_implementation
    model = cls.from_pretrained(folder, config=pretrained_cfg, dtype=dtype, **kwargs)
    return model.eval()


def load_tokenizer(spec: str | BackboneSpec):
    from transformers import AutoTokenizer

    from trainables.assets import asset_path

    spec = get_spec(spec)
    if spec.tokenizer is None:
        raise ValueError(f"{spec.name} has no offline tokenizer; it is for counting and estimating only")
    tok = AutoTokenizer.from_pretrained(asset_path(spec.tokenizer))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class BlockRunner(nn.Module):
    """Calls one block of a family outside its parent model (side blocks, SHERL's late route).

    Builds the same attention mask (and rotary embeddings, for Llama) the parent model
    would, with transformers' own mask helpers, so a block behaves exactly as inside it.
    """

    def __init__(self, family: Family, config: LlamaConfig | BertConfig):
        super().__init__()
        self.family = family
        self.config = config
        self.rotary = LlamaRotaryEmbedding(config) if family == "llama" else None

    def prepare(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """Per-batch kwargs for every block call (compute once, reuse across blocks)."""
        if self.family == "llama":
            pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                      past_key_values=None, position_ids=pos)
            return {"attention_mask": mask, "position_ids": pos, "position_embeddings": self.rotary(hidden, pos)}
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        return {"attention_mask": mask}

    def forward(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out
