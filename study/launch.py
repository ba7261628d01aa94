"""The only place a Ray Tune `Tuner` is built: search, scheduling, resources, storage, resume.

A study is a list of `Group`s (one method on one backbone and task, with its search
space and trial budget). One Tuner runs them all, so worker actors (which have paid
for importing torch and transformers) are reused across every trial. Two thin
wrappers — written here because Tune has no notion of groups — keep comparisons fair:
`GroupedSearch` gives each group its own seeded Optuna TPE and exactly its budget, and
`GroupedASHA` runs one ASHA per group, so a weak method is never stopped for being
worse than a different method.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
import pyarrow.fs as pafs
import ray
from optuna.samplers import TPESampler
from ray import tune
from ray.air.constants import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from study import progress
from study.collect import early_stopped
from study.spaces import split_hp
from study.storage import Location, tune_storage
from trainables.loop import RunConfig
from trainables.methods import external, get_method
from trainables.ray_trainable import OBJECTIVE, TrialTrainable

EXPERIMENT = "tune"  # the Tune experiment folder inside the study folder
optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class Group:
    """Trials that share everything but their searched hyperparameters."""

    name: str
    run: dict[str, Any]  # RunConfig fields fixed for the group (backbone, method, task, epochs, ...)
    space: dict[str, Any]  # Optuna distributions (study.spaces)
    n_trials: int
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1})


def longest_first(groups: Sequence[Group]) -> list[Group]:
    """The groups in the order their trials should start: the longest first, so that no slot idles at the end.

    Tune starts trials in the order the searcher hands them out (round-robin over groups here), and a
    study waits for its slowest trial. Started last, full fine-tuning's trials (several times any other
    method's) run alone while the other slots idle; started first, the short ones fill in around them
    (longest-processing-time first). The expected cost is a rank, not a timing: trials that backpropagate
    through the backbone (full fine-tuning, then the other graft methods) before side methods, which read a
    cached frozen forward; within a rank, more optimisation examples (epochs × train size) first; one-short
    cost runs last. The order changes only when trials start, not what they compute (each group's sampler
    seed comes from its name, see GroupedSearch).
    """
    def key(g: Group) -> tuple:
        family = get_method(g.run["method"]).family
        rank = 0 if g.run["method"] == "full" else 1 if family == "graft" else 2
        work = int(g.run.get("epochs", 1)) * int(g.run.get("train_size", 0))
        return g.run.get("max_train_batches") is not None, rank, -work

    return sorted(groups, key=key)  # stable: equal keys keep the caller's order


def group_seed(seed: int, name: str) -> int:
    """A group's sampler seed: from the study seed and the group's name, so it does not depend on the order."""
    return (seed + zlib.crc32(name.encode())) % 2**31


class GroupedSearch(Searcher):
    """One seeded OptunaSearch per group, handed trials round-robin until each budget is spent.

    A trial ASHA stopped before its epoch budget is told to its Optuna study as PRUNED, not
    COMPLETE: its last validation metric is from an earlier epoch than a finished trial's, and
    slow starters (READ, LST, SHERL, prompt tuning) would otherwise pass as bad configurations.
    Every epoch's metric reaches Optuna as an intermediate value (OptunaSearch.on_trial_result; Tune
    withholds the result its scheduler stopped a trial on, so that one is reported at completion).
    Optuna's TPE ranks complete trials above pruned ones, and pruned ones by the epoch they reached,
    then by their last intermediate value. A trial Tune saw fail is FAIL (TPE ignores it); one the
    loop ended as oom or diverged reported the failed objective and is COMPLETE at that value.
    """

    def __init__(self, groups: Sequence[Group], metric: str, mode: str, seed: int = 0):
        super().__init__(metric=metric, mode=mode)
        self.groups = {g.name: g for g in groups}
        self.order = [g.name for g in groups]
        self.left = {g.name: g.n_trials for g in groups}
        self.subs = {g.name: OptunaSearch(space=g.space, metric=metric, mode=mode,
                                          sampler=TPESampler(seed=group_seed(seed, g.name),
                                                             n_startup_trials=max(2, g.n_trials // 3)))
                     for g in groups if g.space}
        self.owner: dict[str, str] = {}
        self.budget: dict[str, int] = {}  # trial id -> its epochs (the group's, or a searched value)
        self.turn = 0

    def suggest(self, trial_id: str) -> dict | None:
        for _ in range(len(self.order)):
            name = self.order[self.turn % len(self.order)]
            self.turn += 1
            if self.left[name] <= 0:
                continue
            hp = self.subs[name].suggest(trial_id) if name in self.subs else {}
            if hp is None:
                continue
            self.left[name] -= 1
            self.owner[trial_id] = name
            group = self.groups[name]
            run_hp, method_hp = split_hp(hp)
            run = {**group.run, **run_hp,
                   "method_config": {**group.run.get("method_config", {}), **method_hp}}
            self.budget[trial_id] = int(run.get("epochs", RunConfig.epochs))
            return {"group": name, "hp": hp, "run": run, "resources": group.resources}
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        sub = self.subs.get(self.owner.get(trial_id, ""))
        if sub is not None:
            sub.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        sub = self.subs.get(self.owner.get(trial_id, ""))
        if sub is None:
            return
        if error or not result or OBJECTIVE not in result:
            sub.on_trial_complete(trial_id, result=None, error=True)  # FAIL
        elif early_stopped(result, {"epochs": self.budget.get(trial_id)}):
            if TRAINING_ITERATION in result:  # the epoch ASHA stopped it at: never passed to on_trial_result
                sub.on_trial_result(trial_id, result)
            sub.on_trial_complete(trial_id, result=None, error=False)  # PRUNED at that epoch's value
        else:
            sub.on_trial_complete(trial_id, result=result, error=False)  # COMPLETE

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__.copy(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class GroupedASHA(FIFOScheduler):
    """ASHA per group: early stopping compares a trial only with trials of its own group."""

    def __init__(self, metric: str, mode: str, max_t: dict[str, int], grace_period: int = 1,
                 reduction_factor: float = 2):
        super().__init__()
        self._metric, self._mode = metric, mode
        self.max_t = max_t
        self.grace, self.factor = grace_period, reduction_factor
        self.subs: dict[str, ASHAScheduler] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # metric and mode are fixed at construction

    def _sub(self, trial: Any) -> ASHAScheduler:
        name = trial.config.get("group", "")
        if name not in self.subs:
            max_t = max(1, self.max_t.get(name, 1))
            self.subs[name] = ASHAScheduler(metric=self._metric, mode=self._mode, max_t=max_t,
                                            grace_period=min(self.grace, max_t), reduction_factor=self.factor)
        return self.subs[name]

    def on_trial_add(self, tc: Any, trial: Any) -> None:
        self._sub(trial).on_trial_add(tc, trial)

    def on_trial_result(self, tc: Any, trial: Any, result: dict) -> str:
        return self._sub(trial).on_trial_result(tc, trial, result)

    def on_trial_complete(self, tc: Any, trial: Any, result: dict) -> None:
        sub = self._sub(trial)
        if trial.trial_id in sub._trial_info:
            sub.on_trial_complete(tc, trial, result)

    def on_trial_error(self, tc: Any, trial: Any) -> None:
        self.on_trial_remove(tc, trial)

    def on_trial_remove(self, tc: Any, trial: Any) -> None:
        sub = self._sub(trial)
        if trial.trial_id in sub._trial_info:
            sub.on_trial_remove(tc, trial)

    def debug_string(self) -> str:
        return f"GroupedASHA over {len(self.subs)} groups"


def trial_name(trial: Any) -> str:
    """Short, readable trial folders: `<method>-<backbone>-<id>` instead of Tune's config dump."""
    group = str(trial.config.get("group", "trial")).split("|")
    return "-".join([*group[:2], trial.trial_id]).replace("@", "_")


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (`auto` or an address) or start an in-process local Ray.

    A local Ray writes its session (logs, sockets) under a new folder private to the user
    (mode 0700, under $RAY_TMPDIR or /tmp): Ray's own logs are outside what this project
    controls, and Ray makes its session folders world-writable. Methods from the user's own code travel
    to every worker in the runtime_env (their module names; their code unless installed): `external`.
    """
    if ray.is_initialized():
        return
    runtime_env = external.worker_runtime_env()
    if address:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local, in-process, loopback only
    # address="local": always a new in-process Ray. Without it ray.init joins any cluster already running
    # on this machine (`ray start`, a test's ray.cluster_utils.Cluster) and runs our tasks on its nodes.
    private = tempfile.mkdtemp(prefix="petl-ray-", dir=os.environ.get("RAY_TMPDIR") or "/tmp")  # short: socket paths
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _temp_dir=os.path.join(private, "ray"),  # Ray makes that one world-writable
             runtime_env=runtime_env)


CPU_ONLY = "cpu_only"  # a custom resource on the cluster's CPU-only node types (cluster.yaml)


def cpu_work() -> dict[str, Any]:
    """Ray options for CPU-only tasks (memory estimates): on a cluster whose CPU node types carry the
    `cpu_only` resource, ask for it, so the autoscaler starts (and Ray uses) a CPU machine, never a GPU
    one; elsewhere (a laptop, tests) nothing extra."""
    return {"resources": {CPU_ONLY: 1}} if ray.cluster_resources().get(CPU_ONLY) else {}


def _tune_storage(study_dir: str) -> tuple[str, Any]:
    """(experiment path, filesystem): Tune reads and writes through the study's own storage filesystem."""
    path, fs = tune_storage(Location.of(study_dir))
    return f"{path}/{EXPERIMENT}", fs


def keep_credentials_out_of_runtime_envs() -> None:
    """Stop Ray Tune copying the driver's AWS_* variables into every trial actor's runtime_env.

    Ray's runtime-env agent logs each runtime_env in clear text (runtime_env_agent.log in the
    session folder). The copy is not needed: trial actors of a local Ray inherit the driver's
    environment through the raylet, and cluster nodes take credentials from their instance profile
    or their own environment. Ray has no option for this, so its module-level list is narrowed.
    """
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = {v for v in class_cache.ENV_VARS_TO_PROPAGATE if not v.startswith("AWS_")}


# What Tune needs to resume: its tuner, the newest experiment state (trials), the search generator's and
# the searcher's states. Tune writes tuner.pkl when `fit` starts and the rest with its first snapshot.
STATE_FILES = ("tuner.pkl", "experiment_state-", "search_gen_state-", "searcher-state-")


class Unresumable(ValueError):
    """Tune's saved state of an experiment is damaged: resuming it would lose or repeat trials."""


def resumable(path: str, fs: Any) -> bool:
    """Whether the experiment at (path, fs) holds a complete saved state Tune can resume.

    False when Tune recorded nothing (no experiment state): a driver killed before Tune's first snapshot
    reached storage leaves only tuner.pkl, and `Tuner.can_restore`, which looks at that alone, says yes;
    Tune's restore then fails, logs it and "restarts" with one trial, no scheduler and no searcher budget
    (a study that looked finished after one trial in CI). Unresumable when an experiment state is there
    but cut short or without the rest: trials were recorded, so nothing is thrown away.
    """
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    except (FileNotFoundError, OSError):
        return False
    names = {info.base_name: info.path for info in infos if info.type == pafs.FileType.File}
    newest = {prefix: max((n for n in names if n.startswith(prefix)), default=None) for prefix in STATE_FILES}
    if newest["experiment_state-"] is None:
        return False
    missing = [prefix.rstrip("-") for prefix, name in newest.items() if name is None]
    if missing:
        raise Unresumable(f"Ray Tune's saved state in {path} lacks {', '.join(missing)} (the driver was stopped "
                          "while saving it); resume is not possible: start a new --name (nothing was removed)")
    with fs.open_input_stream(names[newest["experiment_state-"]]) as f:
        try:
            json.loads(f.readall())
        except ValueError:
            raise Unresumable(f"Ray Tune's experiment state {newest['experiment_state-']} in {path} is cut short "
                              "(the driver was stopped while saving it); resume is not possible: start a new "
                              "--name (nothing was removed)") from None
    return True


def check_resumable(study_dir: str) -> None:
    """Before Ray: the study's experiment in `study_dir` can be resumed or started over (Unresumable if not)."""
    resumable(*_tune_storage(study_dir))


def discard_unsaved(path: str, fs: Any) -> None:
    """Remove what a driver killed before Tune's first snapshot left (tuner.pkl, trial folders no saved state
    names: no trial was recorded), so the search starts over cleanly in the same folder; said on the console."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    except (FileNotFoundError, OSError):
        return
    if infos:
        trials = sum(info.type == pafs.FileType.Directory for info in infos)
        progress.log(f"--resume: {path} holds no saved state of Ray Tune (the driver was stopped before Tune's "
                     f"first snapshot): {trials} trial folder(s) no state names are discarded and the search "
                     "starts over")
        fs.delete_dir(path)


def trainable_class() -> type:
    """The trial trainable with each trial's resources (its config's `resources`)."""
    return tune.with_resources(TrialTrainable, lambda config: config["resources"])


def run(groups: Sequence[Group], study_dir: str, *, seed: int = 0, resume: bool = False,
        early_stopping: bool = True, max_failures: int = 1, callbacks: Sequence[tune.Callback] = (),
        verbose: bool = False) -> tune.ResultGrid:
    """Run (or resume) every group's trials; returns Tune's ResultGrid (also on resume).

    `callbacks` see every trial event (the console's progress, trackers); `verbose` brings Ray Tune's own
    status tables and result boxes back on the console (off by default: study.progress shows progress).
    """
    # Every epoch checkpoints, and num_to_keep=1 makes Tune snapshot its state on each one. A driver
    # killed between Tune deleting the previous checkpoint and that snapshot leaves a state naming a
    # deleted checkpoint: TrialTrainable then restores the one that replaced it. Cached side-method
    # epochs take about a second, so Tune would warn on nearly every epoch: the snapshots stay, the warning goes.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    keep_credentials_out_of_runtime_envs()
    trainable = trainable_class()
    path, fs = _tune_storage(study_dir)
    restore = resume and resumable(path, fs)
    if resume and not restore:
        discard_unsaved(path, fs)
    if restore:
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
        # the stored run config carries the first run's callbacks and verbosity (pickled): this run's replace them
        stored = tuner._local_tuner.get_run_config()
        stored.callbacks, stored.verbose = list(callbacks), 2 if verbose else 0
        with progress.ray_console(verbose):
            return tuner.fit()
    searcher = GroupedSearch(longest_first(groups), metric=OBJECTIVE, mode="max", seed=seed)
    scheduler = (GroupedASHA(OBJECTIVE, "max", max_t={g.name: int(g.run.get("epochs", 1)) for g in groups})
                 if early_stopping else FIFOScheduler())
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=sum(g.n_trials for g in groups), reuse_actors=True,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=path.rsplit("/", 1)[0], storage_filesystem=fs,
            verbose=2 if verbose else 0, callbacks=list(callbacks),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )
    with progress.ray_console(verbose):
        return tuner.fit()


def results(study_dir: str) -> tune.ResultGrid | None:
    """The ResultGrid of a study's experiment as stored (after an interrupt, too)."""
    path, fs = _tune_storage(study_dir)
    try:
        if not resumable(path, fs):
            return None
    except Unresumable:
        return None
    return tune.Tuner.restore(path, trainable=trainable_class(), storage_filesystem=fs).get_results()
