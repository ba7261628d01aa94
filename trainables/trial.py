"""Assembling one trial, so the loop only loops: backbone source -> model -> where batches come from.

`assemble(cfg)` resolves the backbone (registry name, hub id or folder; weights downloaded
once per node), decides ZeRO-3 on the device the trial runs on (`zero.decide`), applies the
method, and picks the data source: the activation cache for side methods, else the live
backbone. `Trial` then hands the loop batches, a forward, and the step's memory/FLOPs.

A side trial that finds its cache complete does not materialise the backbone (T5 still loads it
whole: its side models read the LM head and both stacks' norms and first blocks): it is built
on the meta device and only what the method reads is loaded from the checkpoint — the
final norm, the blocks the method runs itself (SHERL's last block), whatever `apply`
copies (LST's pruned init reads every block). A data-dependent init (LST's Fisher-pruned one) needs
the whole backbone: a cached trial reads the one stored beside the cache (`trainables.inits`), and
without one it runs live once, computes and stores it. Its memory/FLOPs columns are the method's
live step, measured once per (pair, method config, batch shape, dtype, device) by the trial
that built the cache and kept beside it (`steps/`), or else the fake-tensor estimate of the
same step; `memory_source` says which ("tracked"/"cuda" or "estimated"). Random weights are always built whole
(their values are only reproducible as a whole draw), directly in the target dtype and device.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from trainables import backbones, cache, inits, tasks, zero
from trainables.backbones import BackboneSpec, Source, build, get_spec, load_tokenizer
from trainables.energy import flops_per_step
from trainables.methods import apply_method, get_method
from trainables.methods.base import MethodInfo, Output, Taps, TaskModel
from trainables.text2text import LabelWords, regression_targets

MEASURE_KEYS = ("flops_per_step", "peak_memory_bytes", "peak_memory_reserved_bytes", "memory_params_bytes",
                "memory_grads_bytes", "memory_optimizer_bytes", "memory_activations_bytes", "memory_source")


def resolve(cfg: Any) -> tuple[torch.device, torch.dtype, str]:
    """The trial's device, compute dtype and weights (auto: pretrained when the checkpoint is on this machine).

    bf16 (asked for, or auto on CUDA) only on a GPU with native bf16 (compute capability >= 8: A10G, A100,
    H100); an older one (T4, V100) trains in fp32, as `dtype` records: fp16 would need a GradScaler, which
    the loop does not have, and emulated bf16 is slower than fp32."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype == torch.bfloat16 and device.type == "cuda" and not bf16_native(device):
        dtype = torch.float32
    spec = get_spec(cfg.backbone)
    weights = ("pretrained" if backbones.weights_here(spec) else "random") if cfg.weights == "auto" else cfg.weights
    return device, dtype, weights


def bf16_native(device: torch.device) -> bool:
    """The GPU computes in bf16 natively (not emulated)."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def dtype_name(dtype: torch.dtype) -> str:
    """The `dtype` column: the compute dtype the trial ran with (fp32 | bf16)."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def eval_subset(split: datasets.Dataset, n: int | None) -> datasets.Dataset:
    """At most n examples, the same fixed random ones for every trial (splits keep file order,
    which may be sorted by label, so the first n could all be one class), shortest first.

    Evaluation pads each batch to its longest row; in length order a batch holds rows of about one
    length (vader-movies at 32 tokens: 19% fewer tokens through the backbone). The metrics do not
    depend on the order."""
    keep = range(len(split)) if n is None or len(split) <= n else np.random.default_rng(0).permutation(len(split))[:n]
    lengths = [len(ids) for ids in split["input_ids"]] if "input_ids" in split.column_names else None
    order = sorted(int(i) for i in keep)
    if lengths is not None:
        order.sort(key=lambda i: lengths[i])  # stable: equal lengths keep file order
    return split if order == list(range(len(split))) else split.select(order)


def test_split(task: tasks.TaskData) -> datasets.Dataset:
    """The whole test split as it is scored, shortest first; `example` is each row's index in `task.test`."""
    return eval_subset(task.test.add_column("example", list(range(len(task.test)))), None)


def splits_read(cfg: Any, task: tasks.TaskData, validation: datasets.Dataset) -> dict[str, datasets.Dataset]:
    """The splits a trial reads, by name: train, the validation examples evaluated and, with `eval_test`, the
    whole test split. Its caches are built (study.prepare) and looked up (assemble) for exactly these."""
    return {"train": task.train, "validation": validation} | ({"test": test_split(task)} if cfg.eval_test else {})


def load_data(cfg: Any, spec: BackboneSpec) -> tuple[tasks.TaskData, datasets.Dataset]:
    """The tokenised task (training subsample drawn by seed) and the validation examples evaluated."""
    tokenizer = None if cfg.task == "synthetic" else load_tokenizer(spec)
    task = tasks.load_task(cfg.task, tokenizer, max_length=cfg.max_length, train_size=cfg.train_size,
                           seed=cfg.seed, text_col=cfg.text_col, label_col=cfg.label_col,
                           vocab_size=spec.config["vocab_size"])
    return task, eval_subset(task.validation, cfg.max_eval_examples)


def frozen_backbone(cfg: Any, spec: BackboneSpec, device: torch.device, dtype: torch.dtype, weights: str,
                    src: Source | None = None) -> tuple[nn.Module, zero.ZeroBackbone | None]:
    """The whole backbone, partitioned under ZeRO-3 when `zero.decide` says so on this device, or quantised
    (`cfg.quant`: never partitioned, `check_quant`)."""
    quant, double = getattr(cfg, "quant", "none"), getattr(cfg, "quant_double", False)
    if quant == "none" and zero.decide(cfg.zero, get_method(cfg.method).family != "graft", spec, dtype, device):
        partitioned = zero.build_partitioned(spec, weights=weights, dtype=dtype,
                                             ds_config=zero.config(cfg.zero_offload, dtype, cfg.zero_nvme_path))
        return partitioned.module, partitioned
    if weights == "pretrained":
        return backbones.load_pretrained(spec, dtype, device, src, quant, double), None
    return build(spec, device=device, weights="random", dtype=dtype, quant=quant, quant_double=double), None


def check_quant(cfg: Any, spec: BackboneSpec) -> None:
    """Refuse, in one line, a quantised backbone or gradient checkpointing where they cannot apply."""
    info = get_method(cfg.method)
    if cfg.quant not in backbones.QUANTS:
        raise ValueError(f"quant {cfg.quant!r}; valid: {', '.join(backbones.QUANTS)}")
    if cfg.quant_double and cfg.quant != "nf4":
        raise ValueError(f"quant_double quantises NF4's block constants; it needs quant=nf4, not {cfg.quant}")
    if cfg.gradient_checkpointing and info.family != "graft":
        raise ValueError(f"gradient_checkpointing: {cfg.method} does not backpropagate through the backbone "
                         "(it reads frozen taps), so there is nothing to recompute; use it with full, lora, ia3, "
                         "adapter, bitfit or prompt")
    if cfg.quant == "none":
        return
    if cfg.method == "full":
        raise ValueError("full fine-tuning trains the backbone's weights; quant needs a frozen backbone")
    if cfg.zero == "on":
        raise ValueError(f"zero=on with quant={cfg.quant}: a quantised backbone is not partitioned; use one or "
                         "the other")
    if getattr(info.parse(cfg.method_config), "importance", None) == "fisher":
        raise ValueError(f"quant={cfg.quant}: Fisher importance needs gradients of the backbone's weights, which "
                         "quantised weights do not have; use importance=l1")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"quant={cfg.quant} needs bitsandbytes ({exc}); install it or use quant=none") from None


def prepare_backbone(backbone: nn.Module, cfg: Any) -> nn.Module:
    """Gradient checkpointing and k-bit preparation, before the method is applied (one place: trials,
    validation, memory estimates).

    A method that backpropagates through a quantised backbone (QLoRA = lora on nf4) gets peft's
    `prepare_model_for_kbit_training`: it freezes every weight, upcasts fp16/bf16 weights that are not
    quantised (embeddings, norms) to fp32 — a no-op in fp32, more resident bytes in bf16 — and enables
    checkpointing only when `gradient_checkpointing` asks for it. Checkpointing is transformers' own,
    non-reentrant: with a frozen embedding the checkpointed blocks' inputs need no requires_grad."""
    if get_method(cfg.method).family != "graft":
        return backbone
    kwargs = {"use_reentrant": False}
    if getattr(cfg, "quant", "none") != "none":
        from peft import prepare_model_for_kbit_training

        with warnings.catch_warnings():  # peft calls checkpointing by the name transformers 5 deprecates
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.* is deprecated",
                                    category=FutureWarning)
            return prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                   gradient_checkpointing_kwargs=kwargs)
    if getattr(cfg, "gradient_checkpointing", False):  # transformers 5's name for gradient_checkpointing_enable
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    return backbone


def _param_names(backbone: nn.Module, params: list[nn.Parameter]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in backbone.named_parameters() if id(p) in ids}


def read_parts(model: TaskModel, spec: BackboneSpec) -> list[nn.Parameter]:
    """Backbone parameters a side model reads when fed cached taps: the final norm and every block at or
    above its deepest tap (those it runs itself, e.g. SHERL's late route through the last block)."""
    deepest = max(model.tap_layers())
    norm = spec.anatomy.get(model.backbone, "final_norm")
    blocks = list(spec.anatomy.get(model.backbone, "blocks"))[deepest:]
    return [p for m in ([norm] if norm is not None else []) + blocks for p in m.parameters()]


_ESTIMATED: dict[str, dict[str, Any]] = {}  # per process: a reused Ray actor estimates a (config, shape) once


def estimated_step(spec: BackboneSpec, cfg: Any, n_labels: int, batch_shape: tuple[int, int],
                   dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Memory and FLOPs of the method's live step for this config and batch shape, on fake tensors, with the
    optimizer kernel the trial's device trains with (fused on CPU, foreach on CUDA: `memory.adamw`) and, on
    a GPU, as CUDA runs the step (its autocast rules and cuBLAS workspaces: `memory.estimate_step`)."""
    from trainables.memory import estimate_step

    key = json.dumps([spec.name, spec.config, cfg.method, cfg.method_config, n_labels, batch_shape, str(dtype),
                      device.type, *step_variant(cfg)], sort_keys=True, default=str)
    if key not in _ESTIMATED:
        b, t = batch_shape
        report = estimate_step(spec, cfg.method, cfg.method_config, batch_size=b, seq_len=t, dtype=dtype,
                               quant=cfg.quant, quant_double=cfg.quant_double,
                               gradient_checkpointing=cfg.gradient_checkpointing,
                               n_labels=n_labels, count_flops=True, foreach=None if device.type == "cpu" else True,
                               device_type="cuda" if device.type == "cuda" else "cpu")
        out: dict[str, Any] = {**report.as_dict(), "flops_per_step": report.flops}
        _ESTIMATED[key] = out
    return dict(_ESTIMATED[key])


def step_variant(cfg: Any) -> list[dict[str, Any]]:
    """A step's quantisation and checkpointing, for keys of step measurements: empty when neither is on, so
    keys of full-precision steps stay what they were."""
    variant = {"quant": getattr(cfg, "quant", "none"), "quant_double": getattr(cfg, "quant_double", False),
               "gradient_checkpointing": getattr(cfg, "gradient_checkpointing", False)}
    return [variant] if variant != {"quant": "none", "quant_double": False, "gradient_checkpointing": False} else []


@dataclass
class Trial:
    """One assembled trial: what the loop trains, and where its batches come from."""

    cfg: Any
    spec: BackboneSpec
    device: torch.device
    dtype: torch.dtype
    weights: str
    task: tasks.TaskData
    validation: datasets.Dataset
    model: TaskModel
    side: bool
    revision: str | None
    partitioned: zero.ZeroBackbone | None = None
    readers: dict[str, cache.TapReader] | None = None
    cache_reason: str = ""
    backbone_bytes_loaded: int | None = None  # None: the whole backbone is materialised
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def autocast(self) -> contextlib.AbstractContextManager:
        return (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                else contextlib.nullcontext())

    def train_batches(self, epoch_seed: int) -> Iterator[dict[str, Any]]:
        if self.readers:
            return self.readers["train"].batches(self.cfg.batch_size, shuffle=True, seed=epoch_seed)
        return tasks.batches(self.task.train, self.cfg.batch_size, pad_token_id=self.task.pad_token_id,
                             shuffle=True, seed=epoch_seed)

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        if self.readers:
            return self.readers["validation"].batches(self.cfg.eval_batch_size)
        return tasks.batches(self.validation, self.cfg.eval_batch_size, pad_token_id=self.task.pad_token_id)

    @functools.cached_property
    def test(self) -> datasets.Dataset:
        """The whole test split, in the order `test_batches` yields it (`test_split`)."""
        return test_split(self.task)

    def test_batches(self) -> Iterator[dict[str, Any]]:
        """The test split's batches: its cache when the trial reads one (an eval_test trial caches it too)."""
        if self.readers:
            return self.readers["test"].batches(self.cfg.eval_batch_size)
        return tasks.batches(self.test, self.cfg.eval_batch_size, pad_token_id=self.task.pad_token_id)

    def forward(self, batch: dict[str, Any], with_labels: bool = True) -> Output:
        labels = batch["labels"] if with_labels else None
        if "taps" in batch:
            return self.model.forward_taps(batch["taps"], labels)
        return self.model(batch["input_ids"], batch["attention_mask"], labels)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, Taps) else v.to(self.device, non_blocking=True)
                for k, v in batch.items()}

    def measure(self, first_seed: int, lr: float, measure_memory: bool,
                untouched: Callable[[TaskModel], contextlib.AbstractContextManager]) -> dict[str, Any]:
        """Memory and FLOPs of the method's live step (backbone forward included, also for a cached trial:
        the method's cost, comparable across trials), measured here or, without a whole backbone, estimated."""
        first = next(tasks.batches(self.task.train, self.cfg.batch_size, pad_token_id=self.task.pad_token_id,
                                   shuffle=True, seed=first_seed))
        shape = tuple(first["input_ids"].shape)
        memo = self._memo(shape) if measure_memory and self.readers is not None else None
        if memo is not None and memo.is_file():  # measured (or estimated) once for this config and shape
            return json.loads(memo.read_text())
        remote = cache.roots(self.cfg)[1] if memo is not None else None
        if remote is not None and (published := cache.published_step(remote, memo.name)) is not None:
            return published  # measured by the cache's builder, in the study's storage
        if self.backbone_bytes_loaded is not None:
            measured = estimated_step(self.spec, self.cfg, self.task.n_labels, shape, self.dtype, self.device)
        else:
            from trainables.memory import measure_step

            first = self.to_device(first)
            self.model.train()
            measured = {}
            with untouched(self.model):
                with self.autocast:  # leaving it drops autocast's cache of bf16 weight copies before the peak
                    measured["flops_per_step"] = int(flops_per_step(self.model, first))
                if measure_memory:  # autocast around the forward only, as the loop trains
                    measured |= measure_step(self.model, first, lr=lr, forward_context=self.autocast).as_dict()
        if memo is not None:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(measured))
            os.replace(tmp, memo)
        return measured if measure_memory else {"flops_per_step": measured["flops_per_step"]}

    def _memo(self, shape: tuple[int, ...]) -> Path:
        """Where a cached trial's step measurement is kept beside the cache, per (pair, config, batch shape,
        dtype, device): the cache's builder (study.prepare) or the trial that builds the cache measures live,
        later ones read it. A float in the config (READ's output scale) changes no size: left out."""
        sized = {k: v for k, v in (self.cfg.method_config or {}).items() if not isinstance(v, float)}  # no scale
        key = json.dumps([self.spec.name, self.spec.config, self.revision, self.cfg.method, sized,
                          self.model.pooling, self.task.n_labels, shape, str(self.dtype), self.facts["device"],
                          *step_variant(self.cfg)],
                         sort_keys=True,
                         default=str)
        return cache.trial_root(self.cfg) / "steps" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    def close(self) -> None:
        if self.partitioned is not None:
            self.partitioned.close()  # release the ZeRO engine's hooks and partitions


def _apply(cfg: Any, backbone: nn.Module, spec: BackboneSpec, task: tasks.TaskData,
           device: torch.device | None = None) -> TaskModel:
    """The method on the backbone, its own weights drawn from the trial's seed whatever the backbone's path."""
    torch.manual_seed(cfg.seed)
    backbone = prepare_backbone(backbone, cfg)
    with zero.gathered(zero.apply_reads(backbone, spec, cfg.method)):  # no-op unless partitioned
        model = apply_method(cfg.method, backbone, spec, cfg.method_config, n_labels=task.n_labels,
                             pooling=cfg.pooling, device=device)
    if model.text2text and cfg.task != "synthetic":  # the task's class words as T5 targets
        model.set_label_words(label_words(cfg, spec, backbone, task))
    return model


def label_words(cfg: Any, spec: BackboneSpec, backbone: nn.Module, task: tasks.TaskData) -> LabelWords:
    """Text-to-text targets: the task's class words, or for regression the 0.2-step grid written out,
    spanning the training labels (STS-B: 0.0–5.0), so no target is silently clamped."""
    tokenizer = load_tokenizer(spec)
    if task.n_labels == 1:
        grid = regression_targets([float(v) for v in task.train["labels"]], cfg.task)
        return LabelWords.from_names(tokenizer, [f"{v:.1f}" for v in grid], backbone.config, grid)
    return LabelWords.from_names(tokenizer, tasks.class_names(cfg.task, task.n_labels), backbone.config)


def _cached_without_backbone(cfg: Any, spec: BackboneSpec, device: torch.device, dtype: torch.dtype, src: Source,
                             task: tasks.TaskData, validation: datasets.Dataset
                             ) -> tuple[TaskModel, dict, int, str] | None:
    """A side model on a meta backbone with only what it reads loaded, if every split is cached and any
    data-dependent init is stored (`trainables.inits`); else None. The str says where the init came from."""
    backbone = build(spec, "meta", dtype=dtype)
    loaded = backbones.materialise(backbone, spec, _param_names(backbone, zero.apply_reads(backbone, spec, cfg.method)),
                                   src, device, dtype)
    model = _apply(cfg, backbone, spec, task, device)
    readers = cache.find(model, spec, cfg, splits_read(cfg, task, validation), weights="pretrained",
                         revision=src.revision)
    if readers is None:
        return None
    info, note = get_method(cfg.method), ""
    if inits.wanted(info, model):  # e.g. LST's Fisher-pruned init: only a trial with the backbone computes it
        parts = inits.key(cfg, spec, info, model, task.train, weights="pretrained", revision=src.revision, dtype=dtype)
        path = inits.path_of(cfg, parts)
        if not inits.load(path, model, parts):
            return None  # none stored: the trial runs live, computes and stores it, and still reads the caches
        note = f"; init: stored data init read ({path.name})"
    loaded += backbones.materialise(backbone, spec, _param_names(backbone, read_parts(model, spec)), src, device, dtype)
    return model, readers, loaded, note


def _data_init(cfg: Any, info: MethodInfo, spec: BackboneSpec, model: TaskModel, task: tasks.TaskData, *,
               weights: str, revision: str | None, dtype: torch.dtype, device: torch.device, store: bool) -> str:
    """Run the method's data-dependent init (LST's Fisher-pruned one: batch 1) on the whole backbone, or read
    the one a trial of this configuration stored; with `store`, keep it for the cached trials that follow.
    Returns what happened, for the cache_reason ("" when the config has no such init)."""
    if not inits.wanted(info, model):
        return ""
    examples = ({k: v.to(device) for k, v in b.items()} for b in tasks.batches(
        task.train, 1, pad_token_id=task.pad_token_id, shuffle=True, seed=cfg.seed))
    if not store:
        info.init_with_data(model, examples)
        return "; init: data init computed here"
    parts = inits.key(cfg, spec, info, model, task.train, weights=weights, revision=revision, dtype=dtype)
    path = inits.path_of(cfg, parts)
    with inits.computing(path):  # concurrent trials of this config compute it once
        if inits.load(path, model, parts):
            return f"; init: stored data init read ({path.name})"
        info.init_with_data(model, examples)
        inits.store(path, model, parts)
    return f"; init: data init computed here and stored ({path.name})"


def assemble(cfg: Any) -> Trial:
    """Backbone source -> model -> data source. Raises on bad input or failure (the loop records the outcome)."""
    spec = get_spec(cfg.backbone)
    device, dtype, weights = resolve(cfg)
    info = get_method(cfg.method)
    side = info.family != "graft"  # frozen backbone read, never trained
    src = backbones.source(spec) if weights == "pretrained" else None  # downloads once per node
    task, validation = load_data(cfg, spec)
    facts = {"device": device_name(device), "dtype": dtype_name(dtype), "backbone_family": spec.family,
             "backbone_revision": src.revision if src else None, "dataset_revision": task.revision,
             "train_size": len(task.train), "metric_name": task.metric_name}
    splits = splits_read(cfg, task, validation)
    use_cache = cfg.cache and info.cacheable
    # Encoder–decoders read their cache with the whole backbone loaded (the LM head, both stacks' norms and
    # first blocks' position biases are needed): the cache saves the frozen forward, not the load.
    # A quantised backbone is loaded whole too: its taps' cache saves the forward; a block the side model runs
    # itself (SHERL's last) must be the quantised one, which the safetensors files do not hold.
    if use_cache and src is not None and not spec.anatomy.encoder_decoder and cfg.quant == "none" and \
            not zero.decide(cfg.zero, side, spec, dtype, device):
        found = _cached_without_backbone(cfg, spec, device, dtype, src, task, validation)
        if found is not None:
            model, readers, loaded, init_note = found
            _master_fp32(model)
            facts |= {"pooling": model.pooling, "cache_builds": cache.build_costs(readers.values())}
            return Trial(cfg, spec, device, dtype, weights, task, validation, model, side, facts["backbone_revision"],
                         readers=readers, cache_reason=f"hit (backbone not materialised){init_note}",
                         backbone_bytes_loaded=loaded, facts=facts)
    backbone, partitioned = frozen_backbone(cfg, spec, device, dtype, weights, src)
    model = _apply(cfg, backbone, spec, task)
    init_note = _data_init(cfg, info, spec, model, task, weights=weights, revision=src.revision if src else None,
                           dtype=dtype, device=device, store=cfg.cache and partitioned is None)
    _master_fp32(model)
    readers, reason = None, (f"not cacheable: {cfg.method} trains inside the backbone" if not info.cacheable
                             else "off: cache=false")
    if use_cache and not getattr(model, "taps_frozen", True):
        use_cache, reason = False, f"not cacheable: this {cfg.method} config backpropagates through the backbone"
    if use_cache:
        readers, reason = cache.for_trial(model, spec, cfg, splits, weights=weights, pad_token_id=task.pad_token_id,
                                          revision=src.revision if src else None)
    facts["pooling"] = model.pooling
    if readers:  # what building the caches it read cost (study.collect splits it over their readers)
        facts["cache_builds"] = cache.build_costs(readers.values())
    return Trial(cfg, spec, device, dtype, weights, task, validation, model, side, facts["backbone_revision"],
                 partitioned=partitioned, readers=readers, cache_reason=reason + init_note, facts=facts)


def _master_fp32(model: TaskModel) -> None:
    for _, p in model.trainable_named_parameters():
        p.data = p.data.float()  # fp32 master weights, whatever the backbone's dtype


def device_name(device: torch.device) -> str:
    import platform

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.machine()}"
