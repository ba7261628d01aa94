"""What every fine-tuning method shares: the registry, strict configs, the task model.

A method is one module with a frozen `Config` dataclass, a `MethodInfo`, and an
`apply(backbone, spec, cfg, n_labels, pooling)` that returns a `TaskModel`: a module
whose `forward(input_ids, attention_mask, labels)` returns loss and logits. Side
methods (`SideModel`) also take precomputed taps via `forward_taps`, which is how
the activation cache feeds them without running the backbone.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainables.backbones import BackboneSpec
from trainables.text2text import LabelWords, decode, lm_logits

MethodFamily = Literal["graft", "side", "side-late"]
Pooling = Literal["first", "last", "mean"]


# --------------------------------------------------------------------------- configs

def config_from_dict(cls: type, values: dict[str, Any] | None) -> Any:
    """Strict parsing: unknown keys name the valid ones; strings (from the CLI) are coerced."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__module__.rsplit('.', 1)[-1]} config key(s) {unknown}; "
                         f"valid: {', '.join(fields) or '(none)'}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"config key {key}={value!r}: must be one of {list(typing.get_args(hint))}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _coerce(key, value, args[0])
    if origin is tuple:
        (inner, *_) = typing.get_args(hint)
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(_coerce(key, x.strip() if isinstance(x, str) else x, inner) for x in items if x != "")
    if hint is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config key {key}={value!r}: expected true/false")
            return value.lower() in ("true", "1")
        return bool(value)
    if hint in (int, float, str):
        try:
            out = hint(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key {key}={value!r}: expected {hint.__name__}") from None
        if hint is int and isinstance(value, float) and value != out:
            raise ValueError(f"config key {key}={value!r}: expected an integer")
        return out
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class MethodInfo:
    name: str
    family: MethodFamily
    paper: str
    identity_at_init: bool  # same logits as frozen backbone + head at step 0
    cacheable: bool  # the backbone taps it reads do not depend on anything that trains
    config_cls: type
    apply: Callable[..., TaskModel]
    reference_lr: float  # the default lr and the centre of its search space; its source is in the module
    note: str = ""
    #: per backbone family where the literature differs, e.g. (("bert", 5e-4), ("llama", 2e-4)) for LoRA
    lr_by_family: tuple[tuple[str, float], ...] = ()
    #: optional data-dependent init, run by the loop after `apply` on batches of the training split
    init_with_data: Callable[[TaskModel, Iterable[dict]], None] | None = None

    def parse(self, values: dict[str, Any] | None = None) -> Any:
        return config_from_dict(self.config_cls, values)

    def lr_for(self, family: str | None) -> float:
        """The reference learning rate on a backbone family (the module says where each comes from)."""
        return dict(self.lr_by_family).get(family, self.reference_lr) if family else self.reference_lr


REGISTRY: dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> MethodInfo:
    REGISTRY[info.name] = info
    return info


def get_method(name: str) -> MethodInfo:
    if name not in REGISTRY:
        from trainables.methods.external import ENTRY_POINT_ERRORS

        if name in ENTRY_POINT_ERRORS:
            raise ValueError(f"method {name!r} did not load: {ENTRY_POINT_ERRORS[name]}")
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(REGISTRY)}, or a module path "
                         "(my_pkg.my_method) whose import registers one")
    return REGISTRY[name]


# --------------------------------------------------------------------------- pooling

# sentence-transformers' Pooling config keys, in the order its own Pooling module checks them
_ST_POOLING = (("pooling_mode_cls_token", "first"), ("pooling_mode_lasttoken", "last"),
               ("pooling_mode_mean_tokens", "mean"))


@functools.lru_cache(maxsize=64)
def checkpoint_pooling(folder: str | Path | None, fallback: Pooling) -> Pooling:
    """The pooling a checkpoint was trained with: its sentence-transformers Pooling config if it has one
    (all-MiniLM-L6-v2: mean), else `fallback`, the family's convention (BERT: first token, decoders: last).

    `modules.json` names the Pooling module's folder (usually `1_Pooling`). Modes this task head
    cannot express (max, mean-sqrt-len, weighted) fall back to mean, the nearest.
    """
    if folder is None:
        return fallback
    folder = Path(folder)
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except FileNotFoundError:
        return fallback
    for module in modules:
        if module.get("type", "").endswith("models.Pooling"):
            cfg = json.loads((folder / module.get("path", "1_Pooling") / "config.json").read_text())
            return next((mode for key, mode in _ST_POOLING if cfg.get(key)), "mean")
    return fallback


def default_pooling(spec: BackboneSpec) -> Pooling:
    """The checkpoint's own pooling for a backbone with offline weights here, else the family's."""
    from trainables.backbones import TOKENIZER_PATTERNS, source, tokenizer_here

    folder = spec.folder
    if folder is None and spec.hf_id is not None and tokenizer_here(spec):  # on this machine: no download
        folder = str(source(spec, TOKENIZER_PATTERNS).folder)
    return checkpoint_pooling(folder, spec.anatomy.pooling)


def apply_method(name: str, backbone: nn.Module, spec: BackboneSpec, cfg: Any = None, *, n_labels: int = 2,
                 pooling: Pooling | None = None, device: torch.device | str | None = None) -> TaskModel:
    """Freeze the backbone, then let the method add what trains; new modules land on `device`, default the
    backbone's (a cached trial's backbone stays mostly on the meta device while what trains is real).

    `pooling` None: the checkpoint's own (`default_pooling`)."""
    info = get_method(name)
    cfg = info.parse(cfg) if cfg is None or isinstance(cfg, dict) else cfg
    backbone.requires_grad_(False)
    first = next(backbone.parameters())
    own_buffers = [(m, k, b) for m in backbone.modules() for k, b in m._buffers.items() if b is not None]
    with torch.device(first.device if device is None else device):
        model = info.apply(backbone, spec, cfg, n_labels=n_labels, pooling=pooling or default_pooling(spec))
    model = model.to(first.dtype)  # the head and side networks in the backbone's dtype ...
    for module, key, buffer in own_buffers:  # ... but the backbone's buffers as loaded (RoPE's fp32 inv_freq)
        module._buffers[key] = buffer
    return model


def numel(p: torch.Tensor) -> int:
    """Full element count, also for a parameter DeepSpeed ZeRO-3 partitioned (its local tensor is empty)."""
    return int(getattr(p, "ds_numel", p.numel()))


# --------------------------------------------------------------------------- task model

@dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


@dataclass
class Taps:
    """Frozen backbone activations a side method reads.

    `hidden[i]` is φ_i (φ_0 = embedding output, φ_i = raw output of block i), each B×T×d.
    A cache may hold only the pooled position (T = 1, mask all ones); token-local
    methods give the same loss on it.
    """

    hidden: dict[int, torch.Tensor]
    attention_mask: torch.Tensor
    #: encoder–decoders: the frozen decoder's φ_i over every (example, candidate) row, (B·C)×T×d,
    #: computed on the uncorrected encoder output; `decoder_mask` marks the candidates' real tokens
    decoder: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    decoder_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Taps:
        return Taps({i: h.to(device=device, dtype=dtype) for i, h in self.hidden.items()},
                    self.attention_mask.to(device),
                    {i: h.to(device=device, dtype=dtype) for i, h in self.decoder.items()},
                    None if self.decoder_mask is None else self.decoder_mask.to(device))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: Pooling) -> torch.Tensor:
    """B×T×d → B×d. `last` finds the last real token whatever the padding side."""
    if mode == "first":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype)
    if mode == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (attention_mask.long() * (positions + 1)).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def pooled_positions(attention_mask: torch.Tensor, mode: Pooling) -> torch.Tensor | None:
    """Index of the one position the loss reads per example, or None for mean pooling."""
    if mode == "mean":
        return None
    if mode == "first":
        return torch.zeros(attention_mask.shape[0], dtype=torch.long, device=attention_mask.device)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


def task_loss(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    if labels is None:
        return None
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels.long())


class TaskModel(nn.Module, abc.ABC):
    """A backbone plus what a method trains plus the classification head.

    `head` is trainable for every method and counted separately (`params_head`). Encoder–decoder
    backbones (T5) classify text-to-text instead: the decoder scores each class's target words
    through the backbone's own LM head (`words`, trainables.text2text) and there is no new head,
    unless `linear_head` asks for one (the probe).
    """

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, n_labels: int, pooling: Pooling,
                 linear_head: bool | None = None):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.pooling = pooling
        self.n_labels = n_labels
        self.text2text = spec.anatomy.encoder_decoder
        self.words = LabelWords.placeholder(n_labels, backbone.config) if self.text2text else None
        wants_head = not self.text2text if linear_head is None else linear_head
        self.head = nn.Linear(spec.d_model, n_labels) if wants_head else None

    @property
    def side_dtype(self) -> torch.dtype:
        """The dtype what trains computes in (fp32 master weights, whatever the backbone's)."""
        if self.head is not None:
            return self.head.weight.dtype
        return next((p.dtype for _, p in self.trainable_named_parameters()), torch.float32)

    @property
    def t5(self) -> nn.Module:
        """The encoder–decoder model itself (under a peft prompt wrapper, the model it wraps)."""
        return getattr(self.backbone, "base_model", self.backbone)

    def set_label_words(self, words: LabelWords) -> None:
        """The task's real target words (trials; the placeholder has the right shape for counting)."""
        if self.words is None:
            raise ValueError(f"{self.spec.name} is not an encoder–decoder: it has a classification head")
        device = self.words.target.device
        self.words = words.to(device)

    def classify(self, final_hidden: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor | None) -> Output:
        """Pooled linear head; text-to-text: `final_hidden` is the decoder's (B·C)×T×d, scored by the LM head."""
        if self.head is None:
            loss, logits = self.words.loss_and_logits(self.words.scores(lm_logits(self.t5, final_hidden)), labels)
            return Output(loss, logits)
        logits = self.head(pool(final_hidden, attention_mask, self.pooling))
        return Output(task_loss(logits, labels), logits)

    # -- what trains
    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def param_counts(self) -> dict[str, int]:
        head = 0 if self.head is None else sum(numel(p) for p in self.head.parameters())
        trainable = sum(numel(p) for _, p in self.trainable_named_parameters())
        total = sum(numel(p) for p in self.parameters())
        return {"params_total": total, "params_trainable": trainable - head, "params_head": head}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what trains: a READ checkpoint of Llama-7B is megabytes, not 13 GB."""
        return {n: p.detach().clone() for n, p in self.trainable_named_parameters()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.trainable_named_parameters())
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"trainable state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    def backbone_tensors_with_grad(self) -> list[str]:
        """Names of backbone parameters that receive gradients (graft methods; empty for side)."""
        return [n for n, p in self.backbone.named_parameters() if p.requires_grad]

    @abc.abstractmethod
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> Output: ...


class GraftModel(TaskModel):
    """Graft family: trainable parameters live inside the backbone; backprop runs through it."""

    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder–decoders: the encoder's output and the mask the decoder attends with."""
        return self.t5.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, attention_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> Output:
        if self.text2text:
            encoded, mask = self.encode(input_ids, attention_mask)
            return self.classify(decode(self.t5, encoded, mask, self.words), attention_mask, labels)
        return self.classify(self.final_hidden(input_ids, attention_mask), attention_mask, labels)


class SideModel(TaskModel):
    """Side family: reads frozen taps (live through hooks, or from the cache)."""

    @abc.abstractmethod
    def tap_layers(self) -> list[int]:
        """Which φ_i this method reads (0 = embeddings, i = output of block i); the encoder's for T5."""

    def decoder_tap_layers(self) -> list[int]:
        """Encoder–decoders: which φ_i of the frozen decoder this method reads."""
        return []

    #: True if the loss at the pooled position depends only on that position's taps
    token_local: bool = False

    @property
    def taps_frozen(self) -> bool:
        """The taps depend on nothing that trains (so they can be cached); READ's T5 reference variant is not."""
        return True

    def train(self, mode: bool = True) -> SideModel:
        """The frozen backbone stays in eval mode (no dropout), so live taps equal cached ones."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> Output:
        if self.text2text:
            taps = collect_taps_t2t(self.t5, self.spec, input_ids, attention_mask, self.tap_layers(),
                                    self.decoder_tap_layers(), self.words)
            return self.forward_taps(taps, labels)
        positions = pooled_positions(attention_mask, self.pooling) if self.token_local else None
        taps = collect_taps(self.backbone, self.spec, input_ids, attention_mask, self.tap_layers(), positions)
        return self.forward_taps(taps, labels)

    @abc.abstractmethod
    def forward_taps(self, taps: Taps, labels: torch.Tensor | None = None) -> Output: ...

    def final_norm(self, h: torch.Tensor, part: str | None = None) -> torch.Tensor:
        """The backbone's own final norm (frozen), or identity for post-LN families.

        Encoder–decoders: the decoder's (what the LM head reads), or `part="final_norm"` for the encoder's."""
        part = part or ("decoder_final_norm" if self.text2text else "final_norm")
        norm = self.spec.anatomy.get(self.backbone, part)
        return h if norm is None else norm(h)


class _StopForward(Exception):
    pass


def collect_taps(backbone: nn.Module, spec: BackboneSpec, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, layers: Sequence[int],
                 positions: torch.Tensor | None = None) -> Taps:
    """Run the frozen backbone once under no_grad and keep φ_i for i in `layers`.

    Forward hooks on the embeddings and blocks (not `output_hidden_states`, whose last
    entry is after the final norm). The forward stops after the deepest tap needed.
    With `positions` (one index per example), only those tokens are kept (B×1×d, mask of
    ones): what a token-local method needs when the loss reads one position.
    """
    anatomy = spec.anatomy
    wanted = sorted(set(layers))
    hidden: dict[int, torch.Tensor] = {}
    deepest = wanted[-1]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)

    def keep(i: int) -> Callable:
        def hook(_module: nn.Module, _args: Any, out: Any) -> None:
            if i in wanted:
                h = out[0] if isinstance(out, tuple) else out
                hidden[i] = h if positions is None else h[rows, positions].unsqueeze(1)
            if i == deepest:
                raise _StopForward

        return hook

    modules = [anatomy.get(backbone, "embeddings"), *anatomy.get(backbone, "blocks")]
    handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(modules) if i <= deepest]
    try:
        with torch.no_grad():
            backbone(input_ids=input_ids, attention_mask=attention_mask)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if positions is not None:
        attention_mask = torch.ones(input_ids.shape[0], 1, dtype=attention_mask.dtype, device=attention_mask.device)
    return Taps(hidden, attention_mask)


def _hooked(modules: Sequence[nn.Module], wanted: Sequence[int], into: dict[int, torch.Tensor],
            stop_at: int | None) -> list[Any]:
    """Hooks keeping φ_0 (the input of block 0) and φ_i (the output of block i−1 … as `modules[i]`'s output)."""
    def keep(i: int) -> Callable:
        def hook(_module: nn.Module, _args: Any, out: Any) -> None:
            if i in wanted:
                into[i] = out[0] if isinstance(out, tuple) else out
            if i == stop_at:
                raise _StopForward

        return hook

    def keep_input(_module: nn.Module, args: tuple) -> None:
        into[0] = args[0]
        if stop_at == 0:
            raise _StopForward

    handles = [modules[0].register_forward_pre_hook(keep_input)] if 0 in wanted else []
    return handles + [m.register_forward_hook(keep(i + 1)) for i, m in enumerate(modules)]


def collect_taps_t2t(model: nn.Module, spec: BackboneSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     layers: Sequence[int], decoder_layers: Sequence[int], words: LabelWords) -> Taps:
    """Encoder–decoders: the frozen encoder's φ_i for i in `layers`, and, if `decoder_layers`, the frozen
    decoder's φ_i over every candidate target, run on the uncorrected encoder output (under no_grad).

    φ_0 is a stack's input to its first block (embeddings after dropout: T5 embeds both stacks
    with one shared table, so a hook on it could not tell them apart)."""
    anatomy = spec.anatomy
    enc: dict[int, torch.Tensor] = {}
    deepest = max(layers, default=0)
    handles = _hooked(list(anatomy.get(model, "blocks")), list(layers), enc,
                      None if decoder_layers else deepest)
    try:
        with torch.no_grad():
            encoded = model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    except _StopForward:
        encoded = None
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        dec = decoder_taps(model, spec, encoded, attention_mask, words, decoder_layers) if decoder_layers else {}
    return Taps(enc, attention_mask, dec, words.expand(input_ids.shape[0])[1])


def decoder_taps(model: nn.Module, spec: BackboneSpec, encoded: torch.Tensor, attention_mask: torch.Tensor,
                 words: LabelWords, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """The frozen decoder's φ_i over every candidate, reading `encoded`; on the autograd graph unless the
    caller is under no_grad (READ's `enc_correction_into_decoder` backpropagates through it)."""
    dec: dict[int, torch.Tensor] = {}
    handles = _hooked(list(spec.anatomy.get(model, "decoder_blocks")), list(layers), dec, max(layers))
    try:
        decode(model, encoded, attention_mask, words)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return dec
