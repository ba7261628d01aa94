"""The training loop of one trial: plain PyTorch, read it top to bottom.

`train(cfg, out_dir, report)` seeds everything, builds the tokenizer, task, backbone and
method, then trains with AdamW (linear warmup + linear decay, gradient clipping) and
evaluates on the validation split after every epoch. After each epoch it appends a line
to `epochs.jsonl`, writes a checkpoint (trainable state only) and calls `report` with the
epoch's values plus the running trial summary, so the last report alone is a complete
trial record: a scheduler (Ray Tune's ASHA) may stop the trial after any report. A confirm
run (`eval_test`) also scores its final model on the held-out test split (see `train`). At the
end it writes `summary.json` and returns the summary. The loop knows nothing of Ray.

OOM and divergence are outcomes, not crashes: the status says what happened and the
summary is written, reported and returned whatever happens.

Precision: fp32 on CPU (bf16 matmuls are very slow there). On CUDA with bf16 the frozen
backbone is held in bf16, what trains is kept in fp32 (master weights, fp32 AdamW state),
and forward passes run under `torch.autocast(bf16)`: standard mixed precision. A GPU without native
bf16 (compute capability < 8) trains in fp32 (`trial.resolve`; the row's `dtype` says which).

Single-run CLI: `python -m trainables.loop --backbone minilm-l6 --method read --task vader-movies`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers

from trainables import tasks
from trainables.backbones import build, get_spec
from trainables.energy import EnergyMeter
from trainables.memory import adamw
from trainables.methods import REGISTRY, apply_method, get_method
from trainables.methods.base import Pooling, TaskModel, config_from_dict
from trainables.methods.external import provenance
from trainables.trial import (  # noqa: F401 (re-exported)
    Trial,
    assemble,
    check_quant,
    device_name,
    eval_subset,
    frozen_backbone,
    load_data,
    prepare_backbone,
    resolve,
)

# The trial record (DESIGN.md, trials.parquet), in this order; null where not applicable.
SUMMARY_KEYS: tuple[str, ...] = (
    "status", "error", "method", "backbone", "backbone_family", "backbone_revision", "task", "train_size", "seed",
    "pooling",
    "quant", "quant_double", "gradient_checkpointing",  # the frozen backbone's precision; activation checkpointing
    "dataset_revision", "method_module", "method_version", "method_hash",  # which data and which method code ran
    "metric_name", "best_metric", "best_epoch", "final_metric", "test_metric", "chance_metric", "steps_per_epoch",
    "lr_schedule", "epochs_run", "epochs_to_target",
    "params_total", "params_trainable", "params_head",
    "peak_memory_bytes", "peak_memory_reserved_bytes", "memory_params_bytes", "memory_grads_bytes",
    "memory_optimizer_bytes", "memory_activations_bytes", "memory_source",
    "energy_joules", "energy_source", "flops_per_step", "tokens_per_s", "train_time_s", "cache_hit",
    "cache_reason", "cache_builds", "device", "dtype", "torch_version", "transformers_version",
)
MEMORY_KEYS: tuple[str, ...] = (
    "peak_memory_bytes", "peak_memory_reserved_bytes", "memory_params_bytes", "memory_grads_bytes", "memory_optimizer_bytes",
    "memory_activations_bytes", "memory_source",
)
# One line of epochs.jsonl (plus `eval_<metric name>`, a copy of eval_metric under its own name).
# wall_time_s and tokens_seen are cumulative since the trial started; lr is the lr after the epoch.
EPOCH_KEYS: tuple[str, ...] = ("epoch", "train_loss", "eval_metric", "wall_time_s", "tokens_seen", "lr")
Status = Literal["ok", "oom", "diverged", "error"]
Report = Callable[[dict[str, Any], Path | None], None]
CHECKPOINT_FILE = "state.pt"
PREDICTIONS_FILE = "predictions.parquet"  # in the last checkpoint of an eval_test run (study.schema PREDICTION_FIELDS)
# A training loss this many times the first one (or 1.0, if larger) is divergence, not training.
LOSS_EXPLOSION = 1000.0
# Settings a checkpoint must share with the run that resumes it (others, e.g. epochs, may change).
RESUME_MUST_MATCH = ("backbone", "method", "method_config", "task", "train_size", "max_length", "pooling", "seed",
                     "batch_size", "lr", "weight_decay", "text_col", "label_col", "lr_schedule", "quant",
                     "quant_double", "gradient_checkpointing")


# --------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class RunConfig:
    """Everything one trial needs; `from_dict` is strict so a typo in a study fails loudly."""

    backbone: str = "minilm-l6"
    method: str = "read"
    method_config: dict[str, Any] = field(default_factory=dict)
    task: str = "vader-movies"
    text_col: str = "text"
    label_col: str = "label"
    train_size: int | None = 1000
    max_length: int = 64
    pooling: Pooling | None = None  # None: the checkpoint's own (methods.base.default_pooling)
    weights: Literal["auto", "pretrained", "random"] = "auto"  # auto: pretrained when available offline
    epochs: int = 3
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float | None = None  # None: the method's reference learning rate on this family (MethodInfo.lr_for)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    # linear: warm-up, then linear decay to zero at the budget's last step (the search and confirm runs);
    # constant: warm-up, then the peak lr to the end (the convergence study: no decay forces a late peak)
    lr_schedule: Literal["linear", "constant"] = "linear"
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    seed: int = 0
    early_stopping_patience: int | None = None  # epochs without a new best before stopping
    target_fraction: float = 0.95  # epochs_to_target: first epoch within this fraction of the best
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on cuda, fp32 on cpu
    measure_memory: bool = True
    max_train_batches: int | None = None  # cap per epoch, for quick runs
    max_eval_examples: int | None = None  # a fixed random subset of the validation split
    # after the last epoch, score the final model on the whole held-out test split: `test_metric` and the
    # per-example predictions (checkpoint/predictions.parquet). Confirm and convergence runs; never the search.
    eval_test: bool = False
    # side methods read the frozen backbone's taps from the activation cache (trainables.cache)
    cache: bool = True
    cache_dir: str | None = None  # default: <asset cache dir>/activations; a study passes its own
    cache_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # storage; training stays in the run's dtype
    cache_budget_bytes: int = 32 * 2**30  # a cache that would need more is not built: the backbone runs live
    # side methods: the frozen backbone under DeepSpeed ZeRO-3 (trainables.zero); auto = when it does not fit
    zero: Literal["auto", "off", "on"] = "auto"
    zero_offload: Literal["cpu", "nvme", "none"] = "cpu"
    zero_nvme_path: str | None = None
    # a quantised frozen backbone (bitsandbytes; trainables.backbones.bnb_config): QLoRA is lora with nf4;
    # quant_double: NF4's double quantisation of the block constants
    quant: Literal["none", "int8", "nf4"] = "none"
    quant_double: bool = False
    # recompute each block's activations in backward (transformers' non-reentrant checkpointing), for methods
    # that backpropagate through the backbone; refused for side methods and the probe (nothing to recompute)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.method_config, dict):
            raise ValueError(f"method_config must be a dict, not {type(self.method_config).__name__}")
        for key in ("epochs", "batch_size", "eval_batch_size", "max_length", "train_size",
                    "early_stopping_patience", "max_train_batches", "max_eval_examples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be > 0 and finite, got {self.lr}")
        for key in ("weight_decay", "max_grad_norm", "seed"):  # a negative clip norm would flip the gradients
            value = getattr(self, key)
            if value is not None and not 0 <= value < math.inf:
                raise ValueError(f"{key} must be >= 0 and finite, got {value}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if not 0.0 < self.target_fraction <= 1.0:
            raise ValueError(f"target_fraction must be in (0, 1], got {self.target_fraction}")
        if self.cache_budget_bytes < 0:
            raise ValueError(f"cache_budget_bytes must be >= 0, got {self.cache_budget_bytes}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> RunConfig:
        return config_from_dict(cls, values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else get_method(self.method).lr_for(get_spec(self.backbone).family)


def validate(cfg: RunConfig) -> None:
    """Check names and the method config without building anything; raises ValueError naming valid values."""
    spec = get_spec(cfg.backbone)
    method_cfg = get_method(cfg.method).parse(cfg.method_config)
    if not tasks.is_task_name(cfg.task):
        raise ValueError(f"unknown task {cfg.task!r}; valid: {', '.join(tasks.TASK_NAMES)}, file:PATH, "
                         "or hf:ORG/NAME[:CONFIG][@REVISION]")
    if cfg.weights == "pretrained" and not spec.has_checkpoint:
        raise ValueError(f"{spec.name} has no checkpoint (random weights only); use weights=random or auto")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda, but no CUDA device is visible")
    check_quant(cfg, spec)
    if cfg.zero == "on" and get_method(cfg.method).family == "graft":
        raise ValueError(f"zero=on is for side methods' frozen backbones; {cfg.method} trains inside the backbone")
    positions = spec.config.get("max_position_embeddings")
    tokens = cfg.max_length + getattr(method_cfg, "n_virtual_tokens", 0)
    if positions is not None and tokens > positions:
        raise ValueError(f"max_length {cfg.max_length} (plus any virtual tokens: {tokens}) exceeds "
                         f"{spec.name}'s {positions} positions")
    # the method on a weightless copy (meta device, milliseconds even for 70B): config errors surface
    # here, before any data, weights or output folder
    apply_method(cfg.method, prepare_backbone(build(spec, "meta", quant=cfg.quant, quant_double=cfg.quant_double),
                                              cfg), spec, method_cfg, n_labels=2, pooling=cfg.pooling)
    if cfg.zero == "on" and getattr(method_cfg, "importance", None) == "fisher":
        raise ValueError("zero=on: Fisher importance needs the backbone's gradients, which a partitioned "
                         "backbone does not gather; use importance=l1")


# --------------------------------------------------------------------------- outcomes

class Diverged(Exception):
    """Training produced a non-finite loss, gradient norm or metric."""


def classify_failure(exc: BaseException) -> tuple[Status, str]:
    """Map an exception to a trial status and a one-line message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    message = f"{type(exc).__name__}: {text}"[:500]
    if isinstance(exc, Diverged):
        return "diverged", text[:500]
    lowered = text.lower()
    if isinstance(exc, torch.OutOfMemoryError | MemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in lowered or "can't allocate memory" in lowered
                                           or "defaultcpuallocator: can't allocate" in lowered)
    ):
        return "oom", message
    return "error", message


# --------------------------------------------------------------------------- small helpers

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> tuple[Any, ...]:
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return kind, key.tolist(), pos, has_gauss, gauss  # plain lists: loadable with weights_only=True


def _as_tuples(x: Any) -> Any:
    return tuple(_as_tuples(v) for v in x) if isinstance(x, list | tuple) else x


@contextlib.contextmanager
def untouched(model: TaskModel) -> Iterator[None]:
    """Run a measurement without leaving a trace: same trainable weights, no grads, same RNG.

    The weights are kept on the CPU: a copy on the GPU would sit in the measured peak.
    """
    weights = {n: p.detach().to("cpu", copy=True) for n, p in model.trainable_named_parameters()}
    rng, was_training = rng_state(), model.training
    try:
        yield
    finally:
        model.load_trainable_state_dict(weights)
        model.zero_grad(set_to_none=True)
        set_rng_state(rng)
        model.train(was_training)


def epoch_seed(seed: int, epoch: int) -> int:
    """Data order of an epoch depends only on (seed, epoch), so a resumed run sees the same batches."""
    return seed * 100_003 + epoch


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def epochs_to_target(metrics: list[float], fraction: float) -> int | None:
    """First epoch (1-based) whose metric is within `fraction` of the best (negative metrics too)."""
    if not metrics:
        return None
    best = max(metrics)
    target = best - (1.0 - fraction) * abs(best)
    return next(i + 1 for i, m in enumerate(metrics) if m >= target)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write temp, then rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)


def write_checkpoint(out_dir: Path, state: dict[str, Any], predictions: pa.Table | None = None) -> Path:
    """Write `out_dir/checkpoint/` atomically (a temp dir, then swap it in), with the test predictions if any."""
    final = out_dir / "checkpoint"
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".checkpoint-"))
    torch.save(state, tmp / CHECKPOINT_FILE)
    if predictions is not None:
        pq.write_table(predictions, tmp / PREDICTIONS_FILE)
    old = out_dir / ".checkpoint-old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    return torch.load(file, map_location="cpu", weights_only=True)


def real_tokens(batch: dict[str, Any]) -> int:
    """Real (non-padding) tokens of a batch, live or cached (a pooled cache keeps the lengths)."""
    return int(batch["lengths"].sum() if "lengths" in batch else batch["attention_mask"].sum())


def no_nan(summary: dict[str, Any]) -> dict[str, Any]:
    """Nulls, never NaN (DESIGN.md): a non-finite float becomes None."""
    return {k: finite_or_none(v) if isinstance(v, float) else v for k, v in summary.items()}


# --------------------------------------------------------------------------- the loop

def schedule(optimizer: torch.optim.Optimizer, cfg: RunConfig, n_train: int) -> tuple[Any, int]:
    """Linear warmup to the peak lr, then linear decay to zero at the last step (or, `constant`, the peak lr
    to the end); and the steps per epoch."""
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    if cfg.max_train_batches is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_train_batches)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor), steps_per_epoch


def evaluate(trial: Trial, batches: Iterable[dict[str, Any]]) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The task metric over `batches` (validation or test, cached taps or live), model in eval mode, with the
    predictions it scored (class index, or the regression score) and the labels, in batch order."""
    trial.model.eval()
    logits, labels = [], []
    with torch.no_grad(), trial.autocast:
        for batch in batches:
            batch = trial.to_device(batch)
            logits.append(trial.forward(batch, with_labels=False).logits.float().cpu())
            labels.append(batch["labels"].cpu())
    scores, y = torch.cat(logits), torch.cat(labels)
    preds = scores.reshape(y.shape) if trial.task.n_labels == 1 else scores.argmax(-1)
    return tasks.metric(trial.task.metric_name, preds, y), preds, y


def score_test(trial: Trial) -> tuple[float, pa.Table]:
    """The model on the whole test split: its metric, and one row per example (`example` = row in task.test)."""
    value, preds, labels = evaluate(trial, trial.test_batches())
    if not math.isfinite(value):
        raise Diverged(f"non-finite test {trial.task.metric_name}")
    return value, pa.table({"example": pa.array(trial.test["example"], pa.int64()),
                            "label": pa.array(labels.double().numpy(), pa.float64()),
                            "prediction": pa.array(preds.double().numpy(), pa.float64())})


def chance_metric(trial: Trial) -> float:
    """The task metric of always predicting the training split's majority class (regression: its mean label)
    on the validation examples evaluated: what a trial that learns nothing scores."""
    labels = np.asarray(trial.validation["labels"])
    train = np.asarray(trial.task.train["labels"])
    constant = train.mean() if trial.task.n_labels == 1 else np.bincount(train).argmax()  # a tie: the lowest class
    return tasks.metric(trial.task.metric_name, np.full(labels.shape, constant, dtype=labels.dtype), labels)


def train(cfg: RunConfig, out_dir: Path, report: Report = lambda m, c: None,
          resume_from: Path | None = None, *, progress: bool = False) -> dict[str, Any]:
    """Run one trial; returns the summary (SUMMARY_KEYS). Never raises for OOM, divergence or errors.

    `report(metrics, checkpoint_dir)` is called after every epoch and, if the trial fails,
    once more with the final summary (checkpoint_dir None). `progress` prints a step counter
    and a line per epoch on stderr (the CLI turns it on).

    With `eval_test`, the final model (after the budget's last epoch, or the epoch early stopping ends
    on: whenever training ends normally; never one a scheduler stops) is scored once on the whole test
    split: `test_metric`, and `predictions.parquet` in that epoch's checkpoint. Selection reads
    validation only; test scoring is outside the trial's time and energy.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS)
    summary |= {"status": "ok", "method": cfg.method, "backbone": cfg.backbone, "task": cfg.task,
                "train_size": cfg.train_size, "seed": cfg.seed, "cache_hit": False, "quant": cfg.quant,
                "quant_double": cfg.quant_double, "gradient_checkpointing": cfg.gradient_checkpointing,
                "torch_version": torch.__version__, "transformers_version": transformers.__version__}
    if cfg.method in REGISTRY:
        summary |= provenance(cfg.method)
    history: list[dict[str, Any]] = []  # one record per finished epoch (what epochs.jsonl holds)
    totals = {"tokens_seen": 0, "train_time_s": 0.0, "wall_time_s": 0.0, "energy_joules": 0.0}
    reported, live, trial = False, False, None
    try:
        # ---- setup: seeded, so a resumed run rebuilds the same frozen backbone (trainables.trial assembles)
        seed_everything(cfg.seed)
        validate(cfg)
        trial = assemble(cfg)
        model, device, task = trial.model, trial.device, trial.task
        summary |= trial.facts | model.param_counts()  # full sizes also for a partitioned or meta backbone
        summary |= {"cache_hit": trial.readers is not None, "cache_reason": trial.cache_reason}
        params = [p for _, p in model.trainable_named_parameters()]
        optimizer = adamw(params, cfg.learning_rate, cfg.weight_decay)
        scheduler, steps_per_epoch = schedule(optimizer, cfg, len(task.train))
        summary |= {"steps_per_epoch": steps_per_epoch, "lr_schedule": cfg.lr_schedule,
                    "chance_metric": chance_metric(trial)}

        # ---- resume, or measure once on the first batch (memory, FLOPs) without touching the model
        start_epoch, measured = 0, {}
        if resume_from is not None:
            ckpt = load_checkpoint(resume_from)
            mismatch = {k: (ckpt["config"].get(k), v) for k, v in cfg.to_dict().items()
                        if k in RESUME_MUST_MATCH and ckpt["config"].get(k) != v}
            if mismatch:
                raise ValueError(f"checkpoint {resume_from} is from a different run: (was, now) {mismatch}")
            model.load_trainable_state_dict({k: v.to(device) for k, v in ckpt["model"].items()})
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            start_epoch, history, totals = ckpt["epoch"], ckpt["history"], ckpt["totals"]
            measured = ckpt["measured"]
            if start_epoch >= cfg.epochs:  # finished: keep its test score (a longer budget scores anew)
                summary["test_metric"] = ckpt.get("test_metric")
        else:
            measured = trial.measure(epoch_seed(cfg.seed, 0), cfg.learning_rate, cfg.measure_memory, untouched)
        summary |= {k: measured.get(k) for k in ("flops_per_step", *MEMORY_KEYS)}
        energy = EnergyMeter(device)
        summary["energy_source"] = energy.source
        energy_before = totals["energy_joules"] or 0.0  # spent before a resume
        epochs_file = out_dir / "epochs.jsonl"
        # epochs.jsonl always agrees with the history we continue from (drops lines after a crash)
        epochs_file.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in history))
        if resume_from is not None:
            set_rng_state(ckpt["rng"])  # last: building the model above consumed random numbers

        # ---- train
        first_loss = None  # the run's first training loss: the yardstick for an exploding loss
        live = progress and sys.stderr.isatty()
        line_start = "\r" if live else ""  # overwrite the step counter
        for epoch in range(start_epoch, cfg.epochs):
            model.train()  # a side model keeps its frozen backbone in eval mode (SideModel.train)
            epoch_start = time.perf_counter()
            loss_sum, n_steps, shown = 0.0, 0, 0.0
            with energy.phase("train"):
                for step, batch in enumerate(itertools.islice(trial.train_batches(epoch_seed(cfg.seed, epoch)),
                                                                  steps_per_epoch)):
                    batch = trial.to_device(batch)
                    with trial.autocast:
                        loss = trial.forward(batch).loss
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        raise Diverged(f"non-finite training loss ({loss_value}) "
                                       f"at epoch {epoch + 1}, step {step + 1}")
                    first_loss = loss_value if first_loss is None else first_loss
                    if loss_value > LOSS_EXPLOSION * max(first_loss, 1.0):  # finite, but the run is lost
                        raise Diverged(f"training loss exploded to {loss_value:.3g} at epoch {epoch + 1}, step "
                                       f"{step + 1} (first step: {first_loss:.3g})")
                    loss.backward()
                    if cfg.max_grad_norm:
                        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                        if not torch.isfinite(grad_norm):
                            raise Diverged(f"non-finite gradient norm at epoch {epoch + 1}, step {step + 1}")
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum, n_steps = loss_sum + loss_value, n_steps + 1
                    totals["tokens_seen"] += real_tokens(batch)
                    if live and time.perf_counter() - shown > 0.5:  # a running step counter, terminals only
                        shown = time.perf_counter()
                        print(f"\repoch {epoch + 1}/{cfg.epochs} step {step + 1}/{steps_per_epoch} "
                              f"loss {loss_sum / n_steps:.4f}", end="", file=sys.stderr, flush=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            train_seconds = time.perf_counter() - epoch_start

            # ---- evaluate on the validation split
            with energy.phase("eval"):
                value, _, _ = evaluate(trial, trial.eval_batches())
            if not math.isfinite(value):
                raise Diverged(f"non-finite validation {task.metric_name} at epoch {epoch + 1}")

            # ---- record, checkpoint, report
            totals["train_time_s"] += train_seconds
            totals["wall_time_s"] += time.perf_counter() - epoch_start
            totals["energy_joules"] = energy.joules_so_far(offset=energy_before)
            record = {"epoch": epoch + 1, "train_loss": loss_sum / max(n_steps, 1),
                      f"eval_{task.metric_name}": value, "eval_metric": value,
                      "wall_time_s": totals["wall_time_s"], "tokens_seen": totals["tokens_seen"],
                      "lr": scheduler.get_last_lr()[0]}
            history.append(record)
            with epochs_file.open("a") as fh:
                fh.write(json.dumps(record, allow_nan=False) + "\n")
            summary |= running_summary(history, totals, cfg.target_fraction, energy.source)
            patience = cfg.early_stopping_patience
            stop = patience is not None and epoch + 1 - summary["best_epoch"] >= patience
            predictions = None
            if cfg.eval_test and (stop or epoch + 1 == cfg.epochs):  # the final model, scored on test once
                summary["test_metric"], predictions = score_test(trial)
            checkpoint = write_checkpoint(out_dir, {
                "config": cfg.to_dict(), "epoch": epoch + 1, "history": history, "totals": totals,
                "measured": measured, "rng": rng_state(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "test_metric": summary["test_metric"],
                "model": {k: v.cpu() for k, v in model.trainable_state_dict().items()},
            }, predictions)
            if progress:
                print(f"{line_start}epoch {epoch + 1}/{cfg.epochs}: train_loss {record['train_loss']:.4f}  "
                      f"eval_{task.metric_name} {value:.4f}  {totals['wall_time_s']:.1f}s", file=sys.stderr)
            report({**summary, **record}, checkpoint)
            reported = True
            if stop:
                break
        if not reported and history:  # resumed a finished run: still leave one complete record
            summary |= running_summary(history, totals, cfg.target_fraction, energy.source)
            report({**summary, **history[-1]}, None)  # with the last epoch's eval_metric, as Tune expects
    except Exception as exc:  # outcomes, not crashes (SystemExit/KeyboardInterrupt still stop us)
        summary["status"], summary["error"] = classify_failure(exc)
        if progress:
            print(("\n" if live else "") + f"{summary['status']}: {summary['error']}", file=sys.stderr)
        if history:
            summary |= running_summary(history, totals, cfg.target_fraction, summary["energy_source"])
        summary = no_nan(summary)
        write_json_atomic(out_dir / "summary.json", summary)
        report(dict(summary), None)
        return summary
    finally:
        if trial is not None:
            trial.close()
    summary = no_nan(summary)
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


def running_summary(history: list[dict[str, Any]], totals: dict[str, Any], target_fraction: float,
                    energy_source: str | None) -> dict[str, Any]:
    """The summary fields that change every epoch, computed from the epoch history so far."""
    metrics = [r["eval_metric"] for r in history]
    best = max(metrics)
    train_time = totals["train_time_s"]
    return {
        "best_metric": best, "best_epoch": metrics.index(best) + 1, "final_metric": metrics[-1],
        "epochs_run": len(history), "epochs_to_target": epochs_to_target(metrics, target_fraction),
        "train_time_s": train_time,
        "tokens_per_s": finite_or_none(totals["tokens_seen"] / train_time) if train_time > 0 else None,
        "energy_joules": None if energy_source in (None, "none") else finite_or_none(totals["energy_joules"]),
    }


# --------------------------------------------------------------------------- CLI

class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `error: ...` line like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def parse_args(argv: list[str] | None = None) -> tuple[RunConfig, Path, bool, Path | None]:
    """CLI flags to a validated RunConfig; bad input raises ValueError (main turns it into exit 2)."""
    parser = _Parser(prog="python -m trainables.loop", description="Train and evaluate one trial.")
    parser.add_argument("--backbone", default=RunConfig.backbone)
    parser.add_argument("--method", default=RunConfig.method)
    parser.add_argument("--task", default=RunConfig.task)
    parser.add_argument("--train-size", default=str(RunConfig.train_size), help="an integer, or none for all")
    parser.add_argument("--epochs", type=int, default=RunConfig.epochs)
    parser.add_argument("--lr", type=float, default=None, help="default: the method's reference lr")
    parser.add_argument("--batch-size", type=int, default=RunConfig.batch_size)
    parser.add_argument("--max-length", type=int, default=RunConfig.max_length)
    parser.add_argument("--seed", type=int, default=RunConfig.seed)
    parser.add_argument("--device", default=RunConfig.device)
    parser.add_argument("--weights", default=RunConfig.weights)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a method config value, e.g. hidden_size=128")
    parser.add_argument("--run", action="append", default=[], metavar="KEY=VALUE",
                        help="any other RunConfig field, e.g. max_eval_examples=200")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: ./results/runs/<method>-<backbone>-<time>/")
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint folder to continue from")
    parser.add_argument("--json", action="store_true", help="last stdout line: the summary as JSON")
    args = parser.parse_args(argv)
    named = ("backbone", "method", "task", "train_size", "epochs", "lr", "batch_size", "max_length", "seed",
             "device", "weights")
    values = {k: getattr(args, k) for k in named} | {"method_config": _key_values(args.set, "--set")}
    values |= _key_values(args.run, "--run")
    cfg = RunConfig.from_dict(values)
    validate(cfg)
    out = args.out or Path("results", "runs", f"{cfg.method}-{cfg.backbone}-{datetime.now():%Y%m%d-%H%M%S}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if args.resume is not None and not (args.resume.is_file() or (args.resume / CHECKPOINT_FILE).is_file()):
        raise ValueError(f"--resume {args.resume}: no checkpoint (a trial's checkpoint/ folder holds {CHECKPOINT_FILE})")
    return cfg, out, args.json, args.resume


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, out, as_json, resume = parse_args(argv)
    except ValueError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    summary = train(cfg, out, resume_from=resume, progress=True)
    metric = summary["metric_name"] or "metric"

    def fmt(x: Any, spec: str = ".4f") -> str:
        return "n/a" if x is None else format(x, spec)

    mib = 2**20
    print(f"{cfg.method} on {cfg.backbone} / {cfg.task}: status {summary['status']}"
          + (f" ({summary['error']})" if summary["error"] else ""))
    print(f"  best {metric} {fmt(summary['best_metric'])} at epoch {summary['best_epoch']}, "
          f"final {fmt(summary['final_metric'])}, epochs {summary['epochs_run']}, "
          f"to target {summary['epochs_to_target']}"
          + ("" if summary["test_metric"] is None else f"; test {fmt(summary['test_metric'])}"))
    print(f"  params trainable {summary['params_trainable']} + head {summary['params_head']} "
          f"of {summary['params_total']}")
    peak = None if summary["peak_memory_bytes"] is None else summary["peak_memory_bytes"] / mib
    print(f"  peak memory {fmt(peak, '.1f')} MiB ({summary['memory_source']}), "
          f"energy {fmt(summary['energy_joules'], '.1f')} J ({summary['energy_source']}), "
          f"{fmt(summary['tokens_per_s'], '.0f')} tokens/s, train {fmt(summary['train_time_s'], '.1f')} s, "
          f"wall {time.perf_counter() - start:.1f} s")
    print(f"  results in {out}")
    if as_json:
        print(json.dumps(summary, allow_nan=False))
    return 0 if summary["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
