"""The only Ray import in trainables/: adapts `loop.train` to a Tune function trainable.

The trial config is `{"group", "hp", "run", "resources"}`, where `run` is a complete
RunConfig dict. Each epoch's report carries the trial's running summary plus
`objective` (the validation metric, or a large negative number when the trial
failed, so the searcher learns to avoid it and no NaN reaches Optuna).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

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
