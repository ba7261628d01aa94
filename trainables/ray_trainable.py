"""The only Ray import in trainables/: adapts `loop.train` to a Tune function trainable.

The trial config is `{"group", "hp", "run", "resources"}`, where `run` is a complete
RunConfig dict. Each epoch's report carries the trial's running summary plus
`objective` (the validation metric, or a large negative number when the trial
failed, so the searcher learns to avoid it and no NaN reaches Optuna).
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import torch
from ray import tune
from ray.train._internal.session import _TrainingResult
from ray.tune.trainable import wrap_function

from trainables.loop import RunConfig, train

OBJECTIVE = "objective"
FAILED_OBJECTIVE = -1e9


def run_trial(config: dict[str, Any]) -> None:
    cpus = int(config.get("resources", {}).get("cpu", 1))
    torch.set_num_threads(max(1, cpus))
    run = RunConfig.from_dict(config["run"])
    out_dir = Path(tune.get_context().get_trial_dir())
    node_id = ray.get_runtime_context().get_node_id()

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        metric = metrics.get("eval_metric")
        ok = metrics.get("status", "ok") == "ok" and isinstance(metric, int | float) and math.isfinite(metric)
        payload = {**metrics, OBJECTIVE: float(metric) if ok else FAILED_OBJECTIVE, "node_id": node_id}
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(payload, checkpoint=checkpoint)

    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as resume_dir:
        train(run, out_dir, report, resume_from=Path(resume_dir) if resume_dir else None)


def restorable(checkpoint_result: Any) -> Any:
    """The checkpoint to restore a trial from: the one Tune's state names, or its successor if deleted.

    With `num_to_keep=1` Tune deletes checkpoint N-1 as soon as it registers checkpoint N and
    saves its experiment state a moment later; a driver killed in between leaves a state that
    names the deleted N-1. N was fully written before it was registered, so it is the one to
    restore (the loop's checkpoint carries its own epoch and history). A newer folder than N
    may be half-written, so the first one after the missing index is taken, not the newest.
    Tune has no option for this; it is hand-written here.
    """
    checkpoint = getattr(checkpoint_result, "checkpoint", None)
    if checkpoint is None:
        return checkpoint_result
    fs, path = checkpoint.filesystem, checkpoint.path
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        return checkpoint_result
    parent, name = path.rstrip("/").rsplit("/", 1)
    index = _checkpoint_index(name)
    later = sorted((i, info.path) for info in fs.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
                   if info.type == pyarrow.fs.FileType.Directory
                   and (i := _checkpoint_index(info.base_name)) is not None and index is not None and i > index)
    if not later:
        return checkpoint_result  # nothing to fall back to: Tune reports the missing checkpoint
    return _TrainingResult(checkpoint=tune.Checkpoint(later[0][1], filesystem=fs), metrics=checkpoint_result.metrics)


def _checkpoint_index(name: str) -> int | None:
    match = re.fullmatch(r"checkpoint_(\d+)", name)
    return int(match.group(1)) if match else None


class TrialTrainable(wrap_function(run_trial)):  # type: ignore[misc]
    """`run_trial` as Tune's function trainable (same name in Tune's state), restored by `restorable`."""

    def restore(self, checkpoint_path: Any) -> Any:
        return super().restore(restorable(checkpoint_path))
