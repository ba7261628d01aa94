"""Ray Tune's MLflow and W&B callbacks as `--log` uses them (study.trackers builds them; imported only then:
Ray's integrations import MLflow and W&B, which takes seconds)."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import ray
from ray.air.constants import TRAINING_ITERATION
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback, _clean_log, _QueueItem, _WandbLoggingActor
from ray.air.util.node import _force_on_current_node
from ray.tune.utils import flatten_dict

from study.trackers import wandb_offline


class MLflow(MLflowLoggerCallback):
    """Ray Tune's MLflow callback, with: a resumed trial continues its run (found by its trial name), each
    epoch's metrics in one batch, the config logged once as parameters (not again as metrics with every
    result), and a file store allowed."""

    def setup(self, *args: Any, **kwargs: Any) -> None:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")  # None: MLflow reads the environment
        if str(uri).startswith("file:"):  # MLflow 3 refuses its file store unless told
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        super().setup(*args, **kwargs)

    def log_trial_start(self, trial: Any) -> None:
        if trial not in self._trial_runs:
            util = self.mlflow_util
            found = util._get_client().search_runs([util.experiment_id], f"tags.trial_name = '{trial}'",
                                                   max_results=1)
            if found:
                self._trial_runs[trial] = found[0].info.run_id
        super().log_trial_start(trial)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        """As Ray's, in one batch: Ray logs each metric on its own, tens of file-store writes per epoch."""
        from mlflow.entities import Metric

        step = result[TRAINING_ITERATION]  # one training iteration is one epoch (TrialTrainable.step)
        values = self.mlflow_util._parse_dict(flatten_dict({k: v for k, v in result.items() if k != "config"}))
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.mlflow_util._get_client().log_batch(self._trial_runs[trial], metrics=metrics[i:i + 1000])


class InOrder:
    """A queue's numbered items, handed out in their numbers' order (see Wandb._put)."""

    def __init__(self, queue: Any):
        self.queue, self.next, self.early = queue, 0, {}

    def get(self) -> Any:
        while self.next not in self.early:
            seq, item = self.queue.get()
            self.early[seq] = item
        self.next += 1
        return self.early.pop(self.next - 1)


class WandbActor(_WandbLoggingActor):
    """W&B's per-trial logging actor: the API key comes as an argument (online only); offline, any key the
    actor inherited is dropped, so W&B cannot write it anywhere."""

    def __init__(self, *args: Any, api_key: str | None = None, **kwargs: Any):
        if api_key:
            os.environ["WANDB_API_KEY"] = api_key
        elif wandb_offline(kwargs.get("mode")):
            os.environ.pop("WANDB_API_KEY", None)
        super().__init__(*args, **kwargs)
        self.queue = InOrder(self.queue)

    def run(self) -> None:
        """Ray's loop, then W&B's teardown, which waits for its service to write and close the run's files:
        `wandb.finish` returns before, and Ray kills this actor's process group as soon as `run` returns."""
        try:
            super().run()
        finally:
            self._wandb.teardown()


class Wandb(WandbLoggerCallback):
    """Ray Tune's W&B callback, whose logging actors get no runtime_env: Ray's would carry WANDB_API_KEY,
    and Ray's runtime-env agent writes every runtime_env to its log in clear text."""

    _logger_actor_cls = WandbActor

    def _start_logging_actor(self, trial: Any, exclude_results: list[str], **wandb_init_kwargs: Any) -> None:
        if self._remote_logger_class is None:  # not restarted (Ray's are): a restart could not rebuild its arguments
            self._remote_logger_class = ray.remote(num_cpus=0, **_force_on_current_node())(self._logger_actor_cls)
        key = None if wandb_offline() else os.environ.get("WANDB_API_KEY")
        super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs, **({"api_key": key} if key else {}))

    def setup(self, *args: Any, **kwargs: Any) -> None:
        super().setup(*args, **kwargs)
        self._numbered: dict[Any, int] = {}  # per trial: the number of the next item put in its queue

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if trial not in self._trial_logging_actors:
            self.log_trial_start(trial)
        self._put(trial, (_QueueItem.RESULT, _clean_log(result, video_kwargs=self.video_kwargs,
                                                         image_kwargs=self.image_kwargs)))

    def _signal_logging_actor_stop(self, trial: Any) -> None:
        self._put(trial, (_QueueItem.END, None))

    def _put(self, trial: Any, item: tuple) -> None:
        """Into the trial's queue, numbered, without waiting. Ray's `Queue.put` waits for each item, so the
        first waits for the trial's queue actor to start: seconds per trial, one trial after another (tens on
        a loaded machine), with the driver stalled. The queue actor is async, which may run one caller's puts
        in any order: the logging actor puts them back in order by their number (InOrder)."""
        seq = self._numbered.get(trial, 0)
        self._numbered[trial] = seq + 1
        self._trial_queues[trial].actor.put.remote((seq, item), None)

    def _cleanup_logging_actor(self, trial: Any) -> None:
        self._numbered.pop(trial, None)
        super()._cleanup_logging_actor(trial)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # Ray's, at interpreter exit, finds its modules gone and says so
            super().__del__()
