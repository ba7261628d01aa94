"""One backbone resolver: a registry name, `hf:ORG/NAME[@REVISION]`, or a local folder in HF format.

`get_spec(name)` gives a `BackboneSpec`: the HF config (as a dict), where its weights and
tokenizer come from, and the anatomy of its family. `build(spec, device, weights)` gives
the bare backbone (LlamaModel, Qwen2Model, BertModel, ... : no LM head).

- Registry names are shorthands for hub ids with their configs written out here, so
  every size up to llama-70b builds on the meta device offline in milliseconds (counting,
  estimating). `name@L<k>` keeps the first k blocks (pretrained weights included): a
  pretrained depth ladder offline.
- `hf:ORG/NAME[@REV]` reads `config.json` from the hub; weights and tokenizer come
  through `huggingface_hub.snapshot_download` + transformers' `from_pretrained`. A gated
  model needs `HF_TOKEN` in the environment (huggingface_hub reads it; it is never
  written anywhere by this code).
- A folder needs a `config.json` (enough for counting) and weights to train pretrained.

Families are data: `ANATOMIES`, keyed by the config's `model_type`, says where a family
keeps its parts and how to run one block outside its model (mask, rotary). `family` is
the layout the methods rely on: "llama" (pre-norm decoder with RoPE: llama, mistral,
qwen2), "bert" (post-norm encoder: bert, roberta) or "t5" (pre-norm encoder–decoder with
relative position biases, text-to-text: the task is scored through its own LM head, see
trainables.methods.text2text). For T5 `blocks`/`final_norm` name the encoder's and
`decoder_blocks`/`decoder_final_norm` the decoder's; `n_layers` counts encoder blocks.

Offline assets are hub repositories too: `study.assets fetch` lays them out as a hub
cache under `<asset cache>/hub` (trainables.assets.OFFLINE_HUB), and every hub id is
looked up there first, then in the Hugging Face cache, then on the hub — one code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import operator
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    BertModel,
    LlamaForCausalLM,
    LlamaModel,
    MistralModel,
    PretrainedConfig,
    Qwen2Model,
    RobertaModel,
    T5ForConditionalGeneration,
)
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding
from transformers.models.roberta.modeling_roberta import RobertaLayer
from transformers.models.t5.modeling_t5 import T5Block

Family = Literal["llama", "bert", "t5"]
Device = Literal["meta", "cpu", "cuda"]
Weights = Literal["random", "pretrained"]
Quant = Literal["none", "int8", "nf4"]  # a frozen backbone's weights: full precision, LLM.int8, or NF4 (bitsandbytes)
MaskFn = Callable[..., Any]
# What a pretrained load downloads: configs, tokenizers, safetensors weights (not .bin/.gguf/onnx copies).
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]
TOKENIZER_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "tokenizer*"]


def _causal_mask(config: PretrainedConfig) -> MaskFn:
    """The mask the decoder itself builds: sliding-window when the config turns it on (Mistral, some Qwen2)."""
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return create_sliding_window_causal_mask if sliding else create_causal_mask


@dataclass(frozen=True)
class Anatomy:
    """Where a family keeps its parts (attribute paths on the bare backbone) and how a block runs alone."""

    family: Family
    model_class: type[nn.Module]  # the bare backbone
    blocks: str
    embeddings: str
    final_norm: str | None  # None: the last block's output is the final hidden state (BERT, post-LN)
    attn_proj: tuple[str, ...]  # q, k, v, o module names inside a block
    mlp_proj: tuple[str, ...]
    pooling: Literal["first", "last", "mean"]  # default pooling for classification
    block_class: type[nn.Module] | None = None  # one block, for side networks built of the family's own blocks
    rotary: type[nn.Module] | None = None  # decoders: the model's own rotary embedding
    build_kwargs: tuple[tuple[str, Any], ...] = ()
    decoder_blocks: str | None = None  # encoder–decoder families: the decoder stack's blocks ...
    decoder_final_norm: str | None = None  # ... and the norm before the LM head
    #: a bare leaf name ("q") may name several projections of a block (T5: self- and cross-attention)
    shared_leaf_names: bool = False

    def get(self, model: nn.Module, part: str) -> Any:
        path = getattr(self, part)
        model = getattr(model, "base_model", model)  # a peft prompt wrapper: the model it wraps
        return None if path is None else operator.attrgetter(path)(model)

    @property
    def encoder_decoder(self) -> bool:
        return self.decoder_blocks is not None

    def all_blocks(self, model: nn.Module) -> list[nn.Module]:
        """Every block of every stack (encoder then decoder)."""
        decoder = self.get(model, "decoder_blocks") if self.encoder_decoder else []
        return [*self.get(model, "blocks"), *decoder]

    def block_paths(self) -> str:
        """A regex for the blocks' module paths, every stack (peft targets)."""
        stacks = [self.blocks, *([self.decoder_blocks] if self.decoder_blocks else [])]
        return "(" + "|".join(re.escape(b) for b in stacks) + ")" if len(stacks) > 1 else re.escape(stacks[0])

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.build_kwargs)


def _decoder(cls: type[nn.Module], block: type[nn.Module], rotary: type[nn.Module]) -> Anatomy:
    return Anatomy("llama", cls, blocks="layers", embeddings="embed_tokens", final_norm="norm",
                   attn_proj=("q_proj", "k_proj", "v_proj", "o_proj"), mlp_proj=("gate_proj", "up_proj", "down_proj"),
                   pooling="last", block_class=block, rotary=rotary)


def _encoder(cls: type[nn.Module], block: type[nn.Module]) -> Anatomy:
    return Anatomy("bert", cls, blocks="encoder.layer", embeddings="embeddings", final_norm=None,
                   attn_proj=("query", "key", "value", "dense"), mlp_proj=("intermediate.dense", "output.dense"),
                   pooling="first", block_class=block, build_kwargs=(("add_pooling_layer", False),))


def _t5() -> Anatomy:
    return Anatomy("t5", T5ForConditionalGeneration, blocks="encoder.block", embeddings="shared",
                   final_norm="encoder.final_layer_norm", attn_proj=("q", "k", "v", "o"), mlp_proj=("wo",),
                   pooling="first", block_class=T5Block, decoder_blocks="decoder.block",
                   decoder_final_norm="decoder.final_layer_norm", shared_leaf_names=True)


# model_type -> anatomy. Qwen2 has biases on q/k/v: same module names, so the same entry shape.
ANATOMIES: dict[str, Anatomy] = {
    "llama": _decoder(LlamaModel, LlamaDecoderLayer, LlamaRotaryEmbedding),
    "mistral": _decoder(MistralModel, MistralDecoderLayer, MistralRotaryEmbedding),
    "qwen2": _decoder(Qwen2Model, Qwen2DecoderLayer, Qwen2RotaryEmbedding),
    "bert": _encoder(BertModel, BertLayer),
    "roberta": _encoder(RobertaModel, RobertaLayer),
    "t5": _t5(),
}


def anatomy_of(model_type: str, where: str = "") -> Anatomy:
    if model_type not in ANATOMIES:
        raise ValueError(f"{where or 'config'}: model_type {model_type!r} is not supported; "
                         f"supported: {', '.join(ANATOMIES)}")
    return ANATOMIES[model_type]


@dataclass(frozen=True)
class BackboneSpec:
    """A resolved backbone. `hf_id`/`folder` say where pretrained weights come from (None: random only)."""

    name: str
    model_type: str
    config: dict[str, Any] = field(repr=False)
    hf_id: str | None = None
    revision: str | None = None  # requested hub revision (branch, tag or commit); None: main
    folder: str | None = None  # a local folder in HF format
    tokenizer: str | None = None  # a backbone name (registry, hf:..., folder) whose tokenizer this one uses
    note: str = ""

    @property
    def anatomy(self) -> Anatomy:
        return anatomy_of(self.model_type, self.name)

    @property
    def family(self) -> Family:
        return self.anatomy.family

    @property
    def n_layers(self) -> int:
        """Blocks of the (encoder) stack; T5 keeps its decoder's count in `n_decoder_layers`."""
        return int(self.config.get("num_hidden_layers", self.config.get("num_layers", 0)))

    @property
    def n_decoder_layers(self) -> int:
        """Blocks of the decoder stack (0 for single-stack families)."""
        if not self.anatomy.encoder_decoder:
            return 0
        return int(self.config.get("num_decoder_layers") or self.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.config.get("hidden_size", self.config.get("d_model", 0)))

    @property
    def has_checkpoint(self) -> bool:
        """Pretrained weights exist somewhere (hub or folder); whether they are on this machine: `weights_here`."""
        return self.hf_id is not None or self.folder is not None

    def hf_config(self) -> PretrainedConfig:
        cfg = AutoConfig.for_model(self.model_type, **self.config)
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


def _t5cfg(d: int, layers: int, heads: int, ff: int, d_kv: int = 64, gated: bool = False,
           vocab: int = 32128, **extra: Any) -> dict[str, Any]:
    """T5 (v1.0: ReLU FFN, tied LM head) or T5 v1.1 / Flan-T5 (gated-GELU FFN, untied head)."""
    return dict(d_model=d, num_layers=layers, num_decoder_layers=layers, num_heads=heads, d_ff=ff, d_kv=d_kv,
                vocab_size=vocab, feed_forward_proj="gated-gelu" if gated else "relu",
                tie_word_embeddings=not gated, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, layer_norm_epsilon=1e-6, pad_token_id=0,
                decoder_start_token_id=0, dropout_rate=0.1, **{"eos_token_id": 1, **extra})


def _spec(name: str, model_type: str, config: dict[str, Any], hf_id: str | None = None, revision: str | None = None,
          tokenizer: str | None = None, note: str = "") -> BackboneSpec:
    return BackboneSpec(name, model_type, config, hf_id=hf_id, revision=revision,
                        tokenizer=tokenizer or (name if hf_id else None), note=note)


# The offline SmolLM2 asset is the dequantised Q4_1 GGUF of SmolLM2-135M-Instruct, not the hub's
# safetensors: it is presented as revision `gguf-q4_1` of that repo (trainables.assets.OFFLINE_HUB),
# so `smollm2-135m` rows say which weights they used and `hf:HuggingFaceTB/SmolLM2-135M-Instruct`
# (main) still means the hub's own weights on a cluster.
SMOLLM2_OFFLINE_REVISION = "gguf-q4_1"
_SMOL = dict(vocab=49152, tied=True, rope_theta=100000.0, pad=2, max_pos=8192)
_SPECS = [
    # tests: tiny, but with the real tokenizers' vocabularies so they also run on real tasks
    _spec("llama-tiny", "llama", _llama(64, 2, 4, 128, kv=2, **_SMOL), tokenizer="smollm2-135m", note="tests"),
    _spec("bert-tiny", "bert", _bert(64, 2, 4, 128), tokenizer="minilm-l6", note="tests"),
    # random-initialised Llama ladder for cost scaling on CPU (width and depth grow together)
    _spec("llama-11m", "llama", _llama(256, 4, 4, 688), tokenizer="smollm2-135m", note="ladder"),
    _spec("llama-35m", "llama", _llama(512, 6, 8, 1376), tokenizer="smollm2-135m", note="ladder"),
    _spec("llama-110m", "llama", _llama(768, 12, 12, 2048), tokenizer="smollm2-135m", note="ladder"),
    _spec("llama-340m", "llama", _llama(1024, 24, 16, 2816), tokenizer="smollm2-135m", note="ladder"),
    # real checkpoints: the configs written out, the hub ids they stand for
    _spec("tinyllama-1.1b", "llama", _llama(2048, 22, 32, 5632, kv=4, max_pos=2048),
          hf_id="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"),
    _spec("llama-7b", "llama", _llama(4096, 32, 32, 11008, eps=1e-6, max_pos=2048), hf_id="huggyllama/llama-7b"),
    _spec("llama-13b", "llama", _llama(5120, 40, 40, 13824, eps=1e-6, max_pos=2048), hf_id="huggyllama/llama-13b"),
    _spec("llama-70b", "llama", _llama(8192, 80, 64, 28672, kv=8, max_pos=4096), hf_id="meta-llama/Llama-2-70b-hf"),
    _spec("smollm2-135m", "llama", _llama(576, 30, 9, 1536, kv=3, **_SMOL),
          hf_id="HuggingFaceTB/SmolLM2-135M-Instruct", revision=SMOLLM2_OFFLINE_REVISION),
    _spec("smollm2-360m", "llama", _llama(960, 32, 15, 2560, kv=5, **_SMOL), hf_id="HuggingFaceTB/SmolLM2-360M-Instruct"),
    _spec("smollm2-1.7b", "llama", _llama(2048, 24, 32, 8192, kv=32, **_SMOL),
          hf_id="HuggingFaceTB/SmolLM2-1.7B-Instruct"),
    _spec("minilm-l6", "bert", _bert(384, 6, 12, 1536), hf_id="sentence-transformers/all-MiniLM-L6-v2"),
    _spec("bert-base", "bert", _bert(768, 12, 12, 3072), hf_id="google-bert/bert-base-uncased"),
    _spec("bert-large", "bert", _bert(1024, 24, 16, 4096), hf_id="google-bert/bert-large-uncased"),
    # T5, the READ / LST / SHERL papers' own backbones (text-to-text; configs as on the hub).
    # Tiny T5 for tests borrows MiniLM's WordPiece tokenizer: pad 0 is T5's pad and decoder start, [SEP] ends targets.
    _spec("t5-tiny", "t5", _t5cfg(64, 2, 4, 128, d_kv=16, vocab=30522, eos_token_id=102),
          tokenizer="minilm-l6", note="tests"),
    _spec("t5-small", "t5", _t5cfg(512, 6, 8, 2048), hf_id="google-t5/t5-small"),
    _spec("t5-base", "t5", _t5cfg(768, 12, 12, 3072), hf_id="google-t5/t5-base"),
    _spec("t5-large", "t5", _t5cfg(1024, 24, 16, 4096), hf_id="google-t5/t5-large"),
    _spec("t5-3b", "t5", _t5cfg(1024, 24, 32, 16384, d_kv=128), hf_id="google-t5/t5-3b"),
    _spec("t5-11b", "t5", _t5cfg(1024, 24, 128, 65536, d_kv=128), hf_id="google-t5/t5-11b"),
    _spec("flan-t5-small", "t5", _t5cfg(512, 8, 6, 1024, gated=True), hf_id="google/flan-t5-small"),
    _spec("flan-t5-base", "t5", _t5cfg(768, 12, 12, 2048, gated=True), hf_id="google/flan-t5-base"),
    _spec("flan-t5-large", "t5", _t5cfg(1024, 24, 16, 2816, gated=True), hf_id="google/flan-t5-large"),
    _spec("flan-t5-xl", "t5", _t5cfg(2048, 24, 32, 5120, gated=True), hf_id="google/flan-t5-xl"),
    _spec("flan-t5-xxl", "t5", _t5cfg(4096, 24, 64, 10240, gated=True), hf_id="google/flan-t5-xxl"),
]
REGISTRY: dict[str, BackboneSpec] = {s.name: s for s in _SPECS}


def names() -> list[str]:
    return list(REGISTRY)


# --------------------------------------------------------------------------- the hub (one code path)

def offline_hub() -> Path:
    """The hub cache `study.assets fetch` lays the offline assets out in."""
    from trainables.assets import hub_dir  # local import: meta counting needs no asset cache

    return hub_dir()


def offline_names() -> str:
    """`name (ORG/NAME@REV)` of every registry backbone whose weights are on this machine."""
    here = [s for s in REGISTRY.values() if s.hf_id and weights_here(s)]
    return ", ".join(f"{s.name} ({s.hf_id}@{s.revision or 'main'})" for s in here) or "none (run study.assets fetch)"


def _hub_error(exc: Exception, repo: str, revision: str | None) -> ValueError:
    """A hub failure as one line that says what to do."""
    from huggingface_hub import errors

    where = f"{repo}@{revision or 'main'}"
    if isinstance(exc, errors.GatedRepoError):
        return ValueError(f"{where} is gated: accept its licence on huggingface.co, then set HF_TOKEN in the "
                          "environment of every process that loads it (export HF_TOKEN=hf_...; on a cluster via "
                          "the node setup or the job's runtime_env), never in a file")
    if isinstance(exc, errors.RevisionNotFoundError):
        return ValueError(f"{repo} has no revision {revision!r} on the hub (a branch, tag or commit hash)")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return ValueError(f"unknown hub id {repo!r} (no such model on huggingface.co, or private without HF_TOKEN)")
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return ValueError(f"{where} is not a checkpoint: it has no config.json")
    if isinstance(exc, errors.LocalEntryNotFoundError | errors.IncompleteSnapshotError | OSError):
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub is unreachable"
        return ValueError(f"{where} is not on this machine and {why}; offline backbones here: {offline_names()}")
    return ValueError(f"{where}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")


@contextlib.contextmanager
def _download_lock(repo: str, revision: str | None) -> Iterator[None]:
    """Trials starting together on one node download a repo once: the first holds the lock, the rest find it cached."""
    from huggingface_hub.constants import HF_HUB_CACHE

    root = Path(HF_HUB_CACHE)
    root.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(f"{repo}@{revision}".encode()).hexdigest()[:16]
    with file_lock(root / f".petl-download-{tag}.lock"):
        yield


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if absent), shared by processes on one machine."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached_snapshot(repo: str, revision: str | None, patterns: list[str]) -> Path | None:
    """The snapshot folder from the offline hub or the Hugging Face cache, without the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    caches = [offline_hub(), None]  # None: the Hugging Face cache (HF_HOME / HF_HUB_CACHE)
    for cache in caches:
        if cache is not None and not cache.is_dir():
            continue
        try:
            return Path(snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=patterns,
                                          local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
            continue
    return None


def _weights_complete(folder: Path) -> bool:
    """Every weight file the checkpoint's index lists is in `folder` (a sharded checkpoint mid-download, or
    cut off, has only some), or, unsharded, its one .safetensors file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with contextlib.suppress(ValueError, KeyError, OSError):
            return all((folder / f).is_file() for f in set(json.loads(index.read_text())["weight_map"].values()))
        return False
    return any(folder.glob("*.safetensors"))


def snapshot(repo: str, revision: str | None = None, patterns: list[str] | None = None) -> Path:
    """A hub repository's files on this machine (cached, else downloaded once per node); ValueError if not.

    The lock comes before the look in the cache: a process starting while another downloads waits for it,
    rather than finding the first of two shards and loading half a checkpoint."""
    from huggingface_hub import snapshot_download

    patterns = patterns or WEIGHT_PATTERNS
    try:
        with _download_lock(repo, revision):
            found = _cached_snapshot(repo, revision, patterns)
            if found is not None and (patterns is not WEIGHT_PATTERNS or _weights_complete(found)):
                return found
            return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # every hub failure becomes one line (ValueError)
        raise _hub_error(exc, repo, revision) from None


def _hub_config(repo: str, revision: str | None) -> dict[str, Any]:
    """config.json of a hub repo: from a cache, else downloaded (only that file)."""
    from huggingface_hub import hf_hub_download

    for cache in (offline_hub(), None):
        if cache is not None and not cache.is_dir():
            continue
        with contextlib.suppress(Exception):
            path = hf_hub_download(repo, "config.json", revision=revision, cache_dir=cache, local_files_only=True)
            return json.loads(Path(path).read_text())
    try:
        return json.loads(Path(hf_hub_download(repo, "config.json", revision=revision)).read_text())
    except Exception as exc:
        raise _hub_error(exc, repo, revision) from None


def weights_here(spec: BackboneSpec) -> bool:
    """Pretrained weights are on this machine (offline hub, HF cache, or a folder): no download needed."""
    if spec.folder is not None:
        return any(Path(spec.folder).glob("*.safetensors"))
    if spec.hf_id is None:
        return False
    found = _cached_snapshot(spec.hf_id, spec.revision, WEIGHT_PATTERNS)
    return found is not None and _weights_complete(found)


def tokenizer_here(spec: BackboneSpec) -> bool:
    """The backbone's tokenizer is on this machine (no download needed)."""
    if spec.tokenizer is None:
        return False
    owner = get_spec(spec.tokenizer)
    if owner.folder is not None:
        return True
    return owner.hf_id is not None and _cached_snapshot(owner.hf_id, owner.revision, TOKENIZER_PATTERNS) is not None


# --------------------------------------------------------------------------- resolving a name

def _truncated(spec: BackboneSpec, trunc: str, name: str) -> BackboneSpec:
    if not (trunc.startswith("L") and trunc[1:].isdigit()):
        raise ValueError(f"bad truncation {trunc!r} in {name!r}; expected NAME@L<k>, e.g. "
                         f"{spec.name}@L{max(1, spec.n_layers // 2)}")
    k = int(trunc[1:])
    if not 1 <= k <= spec.n_layers:
        raise ValueError(f"{name!r}: {spec.name} has {spec.n_layers} blocks; k must be in 1..{spec.n_layers}")
    return dataclasses.replace(spec, name=name, config={**spec.config, **_depth(spec, k)})


def _depth(spec: BackboneSpec, k: int) -> dict[str, int]:
    """Config keys that keep the first k blocks (of every stack, for encoder–decoders)."""
    if spec.anatomy.encoder_decoder:
        return {"num_layers": k, "num_decoder_layers": k}
    return {"num_hidden_layers": k}


def _from_config_dict(name: str, config: dict[str, Any], **where: Any) -> BackboneSpec:
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError(f"{name}: config.json has no model_type; supported: {', '.join(ANATOMIES)}")
    anatomy_of(model_type, name)
    keep = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "architectures",
                                                       "auto_map", "quantization_config")}
    return BackboneSpec(name, model_type, keep, tokenizer=name, **where)


def _is_pathlike(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name or Path(name).expanduser().exists()


@functools.lru_cache(maxsize=256)
def _resolve(name: str) -> BackboneSpec:
    if name.startswith("hf:"):
        body = name[3:]
        repo, *tags = body.split("@")
        trunc = tags.pop() if tags and tags[-1][:1] == "L" and tags[-1][1:].isdigit() else None
        if len(tags) > 1 or repo.count("/") != 1 or not all(repo.split("/")):
            raise ValueError(f"bad hub id {name!r}; expected hf:ORG/NAME[@REVISION][@L<k>]")
        revision = tags[0] if tags else None
        spec = _from_config_dict(name if trunc is None else name.rsplit("@", 1)[0], _hub_config(repo, revision),
                                 hf_id=repo, revision=revision)
        return spec if trunc is None else _truncated(spec, trunc, name)
    base, _, trunc = name.partition("@")
    if base in REGISTRY:
        return REGISTRY[base] if not trunc else _truncated(REGISTRY[base], trunc, name)
    if _is_pathlike(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ValueError(f"backbone folder {name!r} does not exist")
        if not (folder / "config.json").is_file():
            raise ValueError(f"{name!r} is not a checkpoint folder: it has no config.json (a Hugging Face "
                             "model folder, e.g. from save_pretrained)")
        try:
            config = json.loads((folder / "config.json").read_text())
        except ValueError as exc:
            raise ValueError(f"{name!r}: config.json is not valid JSON ({exc})") from None
        return _from_config_dict(name, config, folder=str(folder.resolve()))
    raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(REGISTRY)} (NAME@L<k> truncates), "
                     "hf:ORG/NAME[@REVISION], or a folder in Hugging Face format")


def get_spec(name: str | BackboneSpec) -> BackboneSpec:
    """Resolve a registry name (NAME@L<k> truncates), `hf:ORG/NAME[@REV]`, or a folder; ValueError says why not."""
    return name if isinstance(name, BackboneSpec) else _resolve(name)


# --------------------------------------------------------------------------- weights and tokenizer

@dataclass(frozen=True)
class Source:
    """Pretrained files on this machine and the revision they are (a hub commit, or a folder's digest)."""

    folder: Path
    revision: str


def folder_revision(folder: Path) -> str:
    """A local folder has no commit: name it by its config and its weight files' names and sizes."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"folder:{h.hexdigest()[:16]}"


def source(spec: str | BackboneSpec, patterns: list[str] | None = None) -> Source:
    """Where the pretrained files are; downloads them (once per node) when they are not cached."""
    spec = get_spec(spec)
    if spec.folder is not None:
        folder = Path(spec.folder)
        if patterns is not TOKENIZER_PATTERNS and not any(folder.glob("*.safetensors")):
            raise ValueError(f"{spec.name}: the folder has no *.safetensors weights (counting works, training "
                             "pretrained does not; use weights=random)")
        return Source(folder, folder_revision(folder))
    if spec.hf_id is None:
        raise ValueError(f"{spec.name} has no checkpoint (random weights only); pretrained: "
                         f"{', '.join(n for n, s in REGISTRY.items() if s.has_checkpoint)}, or hf:ORG/NAME")
    folder = snapshot(spec.hf_id, spec.revision, patterns)
    return Source(folder, folder.name)  # the snapshot folder is named by its commit hash


def load_pretrained(spec: str | BackboneSpec, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    src: Source | None = None, quant: Quant = "none", quant_double: bool = False) -> nn.Module:
    """The bare backbone with its checkpoint's weights (the spec's config wins: truncation keeps the first k blocks).

    `quant` int8 / nf4: its block Linears quantised by bitsandbytes while loading (`bnb_config`), the same
    call on CPU and CUDA."""
    spec = get_spec(spec)
    src = src or source(spec)
    cls = spec.anatomy.model_class
    cfg = AutoConfig.from_pretrained(src.folder)
    for key, value in _depth(spec, spec.n_layers).items():
        setattr(cfg, key, value)
    if spec.anatomy.encoder_decoder:
        cfg.num_decoder_layers = spec.n_decoder_layers
    cfg._attn_implementation = "sdpa"
    placed = {} if torch.device(device).type == "cpu" else {"device_map": torch.device(device)}  # straight there
    if quant != "none":  # bitsandbytes quantises as it places the weights: a device map, on CPU too
        placed = {"device_map": {"": torch.device(device)}, "quantization_config": bnb_config(quant, quant_double, dtype)}
    model = cls.from_pretrained(src.folder, config=cfg, dtype=dtype, **placed, **spec.anatomy.kwargs)
    if quant != "none":
        _bnb_ready(model, spec, quant)
    return model.eval()


# --------------------------------------------------------------------------- quantised frozen backbones

QUANTS: tuple[str, ...] = ("none", "int8", "nf4")


def bnb_config(quant: Quant, quant_double: bool, dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for a frozen backbone: int8 (LLM.int8, outlier threshold 6.0) or NF4
    (blocks of 64, compute in the trial's dtype, optional double quantisation of the block constants).

    What stays full precision is transformers' default: embeddings and norms (not Linears), the LM head and
    tied / last modules (`get_keys_to_not_convert`), and a family's `_keep_in_fp32_modules` (T5's FFN out)."""
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_use_double_quant=quant_double)
    raise ValueError(f"quant {quant!r}; valid: {', '.join(QUANTS)}")


def quantised_linears(model: nn.Module) -> list[nn.Module]:
    """The bitsandbytes Linear layers of a model (empty for a full-precision one)."""
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)]


def _bnb_ready(model: nn.Module, spec: BackboneSpec, quant: str) -> None:
    """Checks a quantised load quantised something, and turns off bitsandbytes' CPU repacking.

    On a CPU with AVX512-BF16, Linear4bit repacks its weight in place into an inference-only layout on the
    first forward in eval mode without grad (an evaluation pass); a later training forward then takes a
    kernel without autograd, and gradients stop at that layer. The frozen weights must stay as loaded."""
    linears = quantised_linears(model)
    if not linears:
        raise ValueError(f"quant={quant}: bitsandbytes quantised no Linear layer of {spec.name} "
                         f"({spec.model_type}); use quant=none")
    for m in linears:
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def quantise_structure(model: nn.Module, spec: BackboneSpec, quant: Quant, quant_double: bool,
                       dtype: torch.dtype) -> nn.Module:
    """A meta-device backbone with bitsandbytes layers where a quantised load would put them (transformers'
    own quantiser replaces the modules, as in `from_pretrained`); weightless: for counting and estimating
    (trainables.memory gives them fake packed weights)."""
    from transformers.quantizers import AutoHfQuantizer

    quantiser = AutoHfQuantizer.from_config(bnb_config(quant, quant_double, dtype))
    quantiser._process_model_before_weight_loading(model, device_map=None)
    quantiser._process_model_after_weight_loading(model)  # the is_loaded_in_4bit / 8bit flags peft reads
    _bnb_ready(model, spec, quant)
    return model


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A Linear's weight in full precision: bitsandbytes layers dequantised (the copy a pruned init reads)."""
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    if not any(m is module for m in quantised_linears(module)):
        return module.weight
    return dequantize_bnb_weight(module.weight, getattr(module, "state", None)).to(torch.float32)


def build(spec: str | BackboneSpec, device: Device | str | torch.device = "meta", weights: Weights = "random",
          dtype: torch.dtype = torch.float32, causal_lm: bool = False, quant: Quant = "none",
          quant_double: bool = False) -> nn.Module:
    """Build a backbone directly in `dtype` on `device` (meta builds allocate nothing: any size in well under a second).

    `causal_lm=True` returns the LM-head model (LlamaForCausalLM) — only for counting
    against published totals; training uses the bare backbone. `quant`: a quantised frozen backbone — on
    meta its structure (`quantise_structure`); random weights are drawn as without it, saved and loaded back
    through the quantised load, so the quantised values are those of the full-precision draw.
    """
    spec = get_spec(spec)
    if weights == "pretrained":
        if causal_lm:
            raise ValueError("pretrained causal-LM builds are not needed; use causal_lm=False")
        return load_pretrained(spec, dtype, device, quant=quant, quant_double=quant_double)
    if quant != "none":
        if causal_lm:
            raise ValueError("quantised causal-LM builds are not needed; use causal_lm=False")
        if str(device) == "meta":
            return quantise_structure(build(spec, "meta", dtype=dtype), spec, quant, quant_double, dtype)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="petl-quant-") as folder:
            build(spec, "cpu", dtype=dtype).save_pretrained(folder)
            return load_pretrained(spec, dtype, device, Source(Path(folder), "random"), quant, quant_double)
    if weights != "random":
        raise ValueError(f"weights must be 'random' or 'pretrained', not {weights!r}")
    if causal_lm and spec.model_type != "llama":
        raise ValueError(f"causal_lm builds exist only for llama configs, not {spec.model_type}")
    cls = LlamaForCausalLM if causal_lm else spec.anatomy.model_class
    # Drawn directly in `dtype` (a random 7B never exists in fp32), on the CPU whatever the target device
    # (CUDA's generator draws other numbers from the same seed): a trial on a GPU node gets the weights,
    # and so the activation-cache key, that the planner and the cache builders computed on CPU.
    with torch.device("meta" if str(device) == "meta" else "cpu"):
        model = cls._from_config(spec.hf_config(), dtype=dtype, **({} if causal_lm else spec.anatomy.kwargs))
        _untie_head(model, spec)
    model = model.to(device)
    return model.eval()


def _untie_head(model: nn.Module, spec: BackboneSpec) -> None:
    """transformers 5 always ties T5's LM head to its embeddings; a checkpoint with its own head (T5 v1.1,
    Flan-T5) loads untied, so a random build of such a config gets its own head too (published counts)."""
    head, embed = getattr(model, "lm_head", None), model.get_input_embeddings()
    if spec.config.get("tie_word_embeddings") is False and head is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())


def load_tokenizer(spec: str | BackboneSpec):
    """The tokenizer of the backbone (or of the registry entry it borrows one from), through the hub path."""
    from transformers import AutoTokenizer

    spec = get_spec(spec)
    if spec.tokenizer is None:
        raise ValueError(f"{spec.name} has no tokenizer; it is for counting and estimating only")
    owner = get_spec(spec.tokenizer)
    tok = AutoTokenizer.from_pretrained(source(owner, TOKENIZER_PATTERNS).folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_revision(spec: str | BackboneSpec) -> str:
    spec = get_spec(spec)
    if spec.tokenizer is None:
        return "none"
    owner = get_spec(spec.tokenizer)
    return f"{owner.hf_id or owner.folder}@{source(owner, TOKENIZER_PATTERNS).revision}"


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------- partial materialisation

def materialise(backbone: nn.Module, spec: BackboneSpec, names: set[str], src: Source,
                device: torch.device | str, dtype: torch.dtype) -> int:
    """Give some parameters of a meta-device backbone their checkpoint values on `device`; returns bytes loaded.

    What a cached side trial reads (a final norm, SHERL's last block) is loaded from the
    safetensors files by name; the rest of the backbone stays on the meta device.
    """
    from safetensors import safe_open

    owners = {n: backbone.get_submodule(n.rpartition(".")[0]) for n in names}
    wanted = {n: (owners[n], n.rpartition(".")[2]) for n in names
              if getattr(owners[n], n.rpartition(".")[2]).device.type == "meta"}
    prefixes = ("", f"{spec.anatomy.model_class.base_model_prefix}.", "model.")
    loaded = 0
    for file in sorted(src.folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                target = next((key[len(p):] for p in prefixes if key.startswith(p) and key[len(p):] in wanted), None)
                if target is None:
                    continue
                module, leaf = wanted.pop(target)
                value = f.get_tensor(key).to(device=device, dtype=dtype)
                module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
                loaded += value.numel() * value.element_size()
    if wanted:
        raise ValueError(f"{spec.name}: checkpoint lacks {sorted(wanted)[:3]} (needed by the method)")
    return loaded


# --------------------------------------------------------------------------- running one block alone

class BlockRunner(nn.Module):
    """Calls one block of a family outside its parent model (side blocks, SHERL's late route).

    Builds the same attention mask (and rotary embeddings, for decoders) the parent model
    would, with transformers' own mask helpers and the family's rotary class (the anatomy
    of `config.model_type`), so a block behaves exactly as inside it.
    """

    def __init__(self, family: Family, config: PretrainedConfig):
        super().__init__()
        anatomy = ANATOMIES.get(getattr(config, "model_type", ""), ANATOMIES[family])
        self.family = anatomy.family
        self.config = config
        self.rotary = anatomy.rotary(config) if anatomy.rotary is not None else None

    def prepare(self, hidden: torch.Tensor, attention_mask: torch.Tensor, encoder_hidden: torch.Tensor | None = None,
                encoder_mask: torch.Tensor | None = None, position_bias: torch.Tensor | None = None) -> dict[str, Any]:
        """Per-batch kwargs for every block call (compute once, reuse across blocks).

        T5: a decoder block (`encoder_hidden` given) gets the causal mask and cross-attention inputs;
        `position_bias` is the relative bias blocks without their own table use (None: the first
        block called computes it, and `forward` hands it on, as T5's own stack does)."""
        if self.family == "t5":
            if encoder_hidden is None:
                mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
                return {"attention_mask": mask, "position_bias": position_bias}
            mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                      past_key_values=None)
            cross = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=encoder_mask,
                                              encoder_hidden_states=encoder_hidden)
            return {"attention_mask": mask, "position_bias": position_bias, "encoder_hidden_states": encoder_hidden,
                    "encoder_attention_mask": cross}
        if self.rotary is not None:
            pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            mask = _causal_mask(self.config)(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                             past_key_values=None, position_ids=pos)
            return {"attention_mask": mask, "position_ids": pos, "position_embeddings": self.rotary(hidden, pos)}
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        return {"attention_mask": mask}

    def forward(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        out = block(hidden, **kwargs)
        if self.family == "t5":  # later blocks reuse the first one's relative position biases
            kwargs["position_bias"] = out[1]
            if out[2] is not None:
                kwargs["encoder_decoder_position_bias"] = out[2]
        return out[0] if isinstance(out, tuple) else out
