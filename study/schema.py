"""The results schema: one module owns the Parquet columns, their types and the version.

`trials.parquet` has one row per trial (and one per pair that was only estimated);
`epochs.parquet` one row per trial × epoch. Hyperparameters are `hp.<name>` columns,
typed from their values. Missing values are nulls, never NaN. Files are written
atomically through `study.storage` (local or cloud), so a reader never sees half a table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from study.storage import Location

SCHEMA_VERSION = "4"  # 4: gradient_checkpointing, quant, dataset/method provenance, memory_reserved
# 3: test_metric, chance_metric, predictions.parquet, evp.parquet, t-intervals
# 2: pooling, method_config, role; quality.parquet
# estimated: planned, too big to run here; interrupted: stopped mid-trial, `--resume` finishes it
STATUSES = ("ok", "oom", "diverged", "error", "timeout", "estimated", "interrupted")
MEMORY_SOURCES = ("cuda", "tracked", "estimated")
ENERGY_SOURCES = ("nvml", "rapl", "none")

TRIAL_FIELDS: list[pa.Field] = [
    pa.field("study", pa.string(), nullable=False),
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC")),
    pa.field("git_sha", pa.string()),
    pa.field("git_dirty", pa.bool_()),  # uncommitted changes in the driver's working tree
    pa.field("method", pa.string(), nullable=False),  # the label: lora, lora+gc, lora@nf4 (QLoRA), full+gc
    pa.field("method_base", pa.string()),  # the registry name behind the label: lora
    pa.field("method_family", pa.string()),
    # the code that ran: the module that registered the method, its version, sha256 of its file (first 16 hex)
    pa.field("method_module", pa.string()),
    pa.field("method_version", pa.string()),
    pa.field("method_hash", pa.string()),
    pa.field("backbone", pa.string(), nullable=False),
    pa.field("backbone_family", pa.string()),
    pa.field("backbone_layers", pa.int64()),
    pa.field("backbone_width", pa.int64()),
    pa.field("weights", pa.string()),
    pa.field("backbone_revision", pa.string()),  # the commit (or folder digest) pretrained weights were loaded at
    pa.field("quant", pa.string()),  # the frozen backbone's weights: none | int8 | nf4 (bitsandbytes)
    pa.field("quant_double", pa.bool_()),  # nf4 with double quantisation of its block constants
    pa.field("gradient_checkpointing", pa.bool_()),  # blocks' activations recomputed in backward
    pa.field("task", pa.string()),
    pa.field("dataset_revision", pa.string()),  # a hub dataset's commit or a file task's digest; null: built-in
    pa.field("train_size", pa.int64()),
    pa.field("seed", pa.int64()),
    pa.field("max_length", pa.int64()),
    pa.field("pooling", pa.string()),  # first | last | mean: what the task head read
    pa.field("method_config", pa.string()),  # the method's whole config as JSON (defaults included)
    pa.field("batch_size", pa.int64()),
    pa.field("epochs", pa.int64()),
    pa.field("role", pa.string()),  # search | confirm (the best config re-run with fresh seeds); null: planned
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("metric_name", pa.string()),
    pa.field("best_metric", pa.float64()),
    pa.field("best_epoch", pa.int64()),
    pa.field("final_metric", pa.float64()),  # validation metric after the last epoch run (what the searcher saw)
    # the final model on the held-out test split (eval_test runs: confirm and convergence trials); null otherwise
    pa.field("test_metric", pa.float64()),
    # the metric of always predicting the training split's majority class (regression: its mean label), on validation
    pa.field("chance_metric", pa.float64()),
    pa.field("steps_per_epoch", pa.int64()),  # optimisation steps per epoch
    pa.field("lr_schedule", pa.string()),  # linear (warm-up, decay to zero) | constant (after warm-up)
    pa.field("early_stopped", pa.bool_()),  # stopped by the scheduler (ASHA) before its epoch budget
    pa.field("epochs_run", pa.int64()),
    pa.field("epochs_to_target", pa.int64()),
    pa.field("params_total", pa.int64()),
    pa.field("params_trainable", pa.int64()),
    pa.field("params_head", pa.int64()),
    pa.field("peak_memory_bytes", pa.int64()),
    # cuda: torch.cuda.max_memory_reserved over the same step (the allocator's segments: the peak plus its
    # fragmentation and cached blocks, what the device must hold); null off cuda
    pa.field("peak_memory_reserved_bytes", pa.int64()),
    pa.field("memory_params_bytes", pa.int64()),
    pa.field("memory_grads_bytes", pa.int64()),
    pa.field("memory_optimizer_bytes", pa.int64()),
    pa.field("memory_activations_bytes", pa.int64()),
    pa.field("memory_source", pa.string()),
    pa.field("energy_joules", pa.float64()),
    pa.field("energy_source", pa.string()),
    pa.field("flops_per_step", pa.int64()),
    pa.field("tokens_per_s", pa.float64()),
    pa.field("train_time_s", pa.float64()),
    pa.field("cache_hit", pa.bool_()),
    pa.field("cache_reason", pa.string()),  # how the cache was found or built, or why the backbone ran live
    pa.field("cache_builds", pa.string()),  # JSON {cache id: {s, joules}}: what building the caches it read cost
    # its share of those builds (each split over the study's trials that read it), and the totals with it
    pa.field("cache_share_s", pa.float64()),
    pa.field("cache_share_joules", pa.float64()),
    pa.field("time_with_cache_s", pa.float64()),  # train_time_s + cache_share_s
    pa.field("energy_with_cache_joules", pa.float64()),
    pa.field("device", pa.string()),
    pa.field("dtype", pa.string()),  # the compute dtype it ran with: bf16 | fp32 (a GPU without native bf16)
    pa.field("torch_version", pa.string()),
    pa.field("transformers_version", pa.string()),
    pa.field("ray_version", pa.string()),
    pa.field("deepspeed_version", pa.string()),
]
EPOCH_FIELDS: list[pa.Field] = [
    pa.field("study", pa.string(), nullable=False),
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("method", pa.string()),
    pa.field("backbone", pa.string()),
    pa.field("epoch", pa.int64(), nullable=False),
    pa.field("train_loss", pa.float64()),
    pa.field("metric_name", pa.string()),
    pa.field("eval_metric", pa.float64()),
    pa.field("wall_time_s", pa.float64()),
    pa.field("tokens_seen", pa.int64()),
    pa.field("lr", pa.float64()),
]
# quality.parquet (study.quality): one row per method × backbone × task × train size
QUALITY_FIELDS: list[pa.Field] = [
    pa.field("study", pa.string()),
    pa.field("method", pa.string(), nullable=False),
    pa.field("backbone", pa.string(), nullable=False),
    pa.field("weights", pa.string()),
    pa.field("task", pa.string()),
    pa.field("train_size", pa.int64()),
    pa.field("metric_name", pa.string()),
    pa.field("search_trials", pa.int64()),
    # the search's selected maximum (validation, final epoch): biased upward, for reference only, never a mean
    pa.field("search_best_val", pa.float64()),
    pa.field("search_epochs", pa.int64()),  # epochs the search consumed (early stopping included)
    pa.field("search_stopped", pa.int64()),  # search trials stopped early by ASHA
    pa.field("confirmed", pa.bool_()),  # has confirm runs; an unconfirmed cell stays out of fronts and verdicts
    pa.field("seeds", pa.int64()),  # confirm runs that finished (status ok, with a test score)
    pa.field("seeds_failed", pa.int64()),  # confirm runs that failed, diverged or ran out of memory
    pa.field("val_mean", pa.float64()),  # confirm seeds' mean validation metric (final epoch)
    pa.field("mean", pa.float64()),  # confirm seeds' mean TEST metric (final epoch); null when unconfirmed
    pa.field("ci_low", pa.float64()),  # Student-t 95% CI of that mean over seeds (null below 2 seeds)
    pa.field("ci_high", pa.float64()),
    pa.field("std", pa.float64()),
    # seeds + test examples 95% interval (t over seeds, widened by the bootstrap variance over test examples)
    pa.field("ci_low_examples", pa.float64()),
    pa.field("ci_high_examples", pa.float64()),
    pa.field("probe_mean", pa.float64()),  # the linear probe's test mean on the same backbone, task and size
    pa.field("below_probe", pa.bool_()),  # paired difference to the probe significantly below zero
]
# predictions.parquet: one row per confirm trial × test example (the final model's prediction)
PREDICTION_FIELDS: list[pa.Field] = [
    pa.field("study", pa.string(), nullable=False),
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("method", pa.string()),
    pa.field("backbone", pa.string()),
    pa.field("task", pa.string()),
    pa.field("train_size", pa.int64()),
    pa.field("seed", pa.int64()),
    pa.field("metric_name", pa.string()),
    pa.field("example", pa.int64(), nullable=False),  # row index in the task's test split
    pa.field("label", pa.float64()),
    pa.field("prediction", pa.float64()),  # the predicted class index, or the score (regression)
]
# evp.parquet: expected best validation score of k search trials (Dodge et al. 2019), k = 1..N per cell
EVP_FIELDS: list[pa.Field] = [
    pa.field("study", pa.string()),
    pa.field("method", pa.string(), nullable=False),
    pa.field("backbone", pa.string(), nullable=False),
    pa.field("task", pa.string()),
    pa.field("train_size", pa.int64()),
    pa.field("metric_name", pa.string()),
    pa.field("k", pa.int64(), nullable=False),
    pa.field("n_trials", pa.int64()),
    pa.field("expected_best", pa.float64()),
    pa.field("std", pa.float64()),
]
TRIAL_COLUMNS = [f.name for f in TRIAL_FIELDS]
PREDICTION_COLUMNS = [f.name for f in PREDICTION_FIELDS]
EPOCH_COLUMNS = [f.name for f in EPOCH_FIELDS]


def _hp_type(values: Iterable[Any]) -> pa.DataType:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return pa.float64()
    return pa.string()


def trial_schema(rows: list[dict[str, Any]]) -> pa.Schema:
    """The fixed trial columns plus one typed `hp.<name>` column per hyperparameter seen."""
    hp_names = sorted({k for r in rows for k in r if k.startswith("hp.")})
    hp_fields = [pa.field(n, _hp_type(r.get(n) for r in rows)) for n in hp_names]
    return pa.schema(TRIAL_FIELDS + hp_fields, metadata=_metadata("trials"))


def epoch_schema() -> pa.Schema:
    return pa.schema(EPOCH_FIELDS, metadata=_metadata("epochs"))


def _metadata(kind: str) -> dict[str, str]:
    return {"petl_study.schema_version": SCHEMA_VERSION, "petl_study.table": kind}


def _clean(value: Any, typ: pa.DataType) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # never NaN-coded
    if value is not None and pa.types.is_string(typ) and not isinstance(value, str):
        return str(value)
    return value


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    unknown = sorted({k for r in rows for k in r} - set(schema.names))
    if unknown:
        raise ValueError(f"columns not in the results schema: {unknown}")
    columns = {f.name: pa.array([_clean(r.get(f.name), f.type) for r in rows], type=f.type) for f in schema}
    return pa.table(columns, schema=schema)


def write_atomic(table: pa.Table, path: str | Path | Location) -> Location:
    """Through the study's storage (local folder or cloud URI): a reader never sees half a table."""
    return Location.of(path).write_parquet(table)


def write_trials(rows: list[dict[str, Any]], path: str | Path | Location) -> Location:
    return write_atomic(to_table(rows, trial_schema(rows)), path)


def write_epochs(rows: list[dict[str, Any]], path: str | Path | Location) -> Location:
    return write_atomic(to_table(rows, epoch_schema()), path)


def write_quality(rows: list[dict[str, Any]], path: str | Path | Location) -> Location:
    return write_atomic(to_table(rows, pa.schema(QUALITY_FIELDS, metadata=_metadata("quality"))), path)


def write_predictions(rows: list[dict[str, Any]], path: str | Path | Location) -> Location:
    return write_atomic(to_table(rows, pa.schema(PREDICTION_FIELDS, metadata=_metadata("predictions"))), path)


def write_evp(rows: list[dict[str, Any]], path: str | Path | Location) -> Location:
    return write_atomic(to_table(rows, pa.schema(EVP_FIELDS, metadata=_metadata("evp"))), path)


def read(path: Path) -> pa.Table:
    """Read a results table, refusing files written under another schema version."""
    table = pq.read_table(path)
    version = (table.schema.metadata or {}).get(b"petl_study.schema_version", b"?").decode()
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema version {version}, this code reads {SCHEMA_VERSION}")
    return table
