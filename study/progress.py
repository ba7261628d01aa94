"""A study's console a person can follow: phases, progress, best so far and time left.

Each phase (plan, caches, search, confirm, report) logs a line when it starts and when it ends, with its
wall time (`phase`). During search and confirm, `Progress` (a Tune callback) keeps per method the trials
done of its budget, the best validation score of its finished trials and the failures, and estimates the
time left from the finished trials' durations and the remaining queue on the slots seen running at once.
On a terminal that is one tqdm line updated in place; elsewhere (CI, `ray exec`, a log file) one line per
finished trial. A failed trial (an outcome the loop reported: error, oom, diverged; or a crash Tune saw)
prints its one-line reason at once.

Ray Tune's own reporter (each trial's configuration and results, the status table, error tracebacks)
writes into `<study>/logs/tune.log` instead (`TuneLog`, `StudyLog`: also in a cloud folder), so the console
stays short; `--verbose` puts Ray's tables back on the console too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from statistics import mean
from typing import Any, TextIO

from ray import tune
from ray.exceptions import RayTaskError
from ray.tune.experimental.output import AirVerbosity, TuneTerminalReporter
from tqdm import tqdm

from study.storage import Location, StorageError
from trainables.ray_trainable import FAILED_OBJECTIVE, OBJECTIVE

LOG = "logs/tune.log"  # in the study folder
PHASES: dict[str, float] = {}  # phase -> wall seconds, this process's study (reset by `start`)
_started: list[float] = []  # when `start` was called: the study's total wall time
RAY_LOGGERS = ("ray.tune", "ray.train", "ray.air")  # Tune's warnings and trial tracebacks: to the log file
_bar: tqdm | None = None  # the live progress line on a terminal: log lines are written above it


def log(msg: str) -> None:
    """A timestamped console line (stderr), above the progress line when one is live."""
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    if _bar is not None:
        _bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """`45s`, `3m05s`, `1h12m`."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def time_left(seconds: float | None) -> str:
    if seconds is None:
        return "time left: after the first trial"
    if seconds < 60:
        return "<1 min left"
    if seconds < 5400:
        return f"~{round(seconds / 60)} min left"
    return f"~{seconds / 3600:.1f} h left"


def start(folder: str) -> None:
    """A study's first line: where its folder and Ray Tune's log are."""
    PHASES.clear()
    _started[:] = [time.monotonic()]
    log(f"study folder {folder}; Ray Tune's per-trial output: {Location.of(folder) / LOG} (--verbose: also here)")


@contextlib.contextmanager
def phase(name: str, what: str = "") -> Iterator[None]:
    """A line when the phase starts and one when it ends (or stops), with its wall time (summed per name)."""
    log(f"{name} started" + (f": {what}" if what else ""))
    t0, ended = time.monotonic(), "stopped"
    try:
        yield
        ended = "done"
    finally:
        seconds = time.monotonic() - t0
        PHASES[name] = PHASES.get(name, 0.0) + seconds
        log(f"{name} {ended} in {duration(seconds)}")


def phase_times() -> str:
    parts = [f"{name} {duration(s)}" for name, s in PHASES.items()]
    total = time.monotonic() - _started[0] if _started else sum(PHASES.values())
    return " · ".join([*parts, f"total {duration(total)}"])


def where(folder: str, report: str) -> str:
    """The end of a study: its tables, report, log and the wall time per phase (one item a line)."""
    out = Location.of(folder)
    tables = []
    for name in ("trials", "epochs", "quality", "evp", "predictions"):
        with contextlib.suppress(StorageError, OSError):
            if (out / f"{name}.parquet").exists():
                tables.append(f"{name}.parquet")
    return "\n".join([f"tables:    {out}/{{{','.join(tables)}}}",
                      f"report:    {report} -> {out / 'report.html'}",
                      f"log:       {out / LOG}",
                      f"wall time: {phase_times()}"])


# method -> seconds per epoch of the trials this process saw finish, in any phase: a later phase's first
# guess for a method none of its own trials has finished yet (confirm after search)
SECONDS_PER_EPOCH: dict[str, list[float]] = {}


def method_of(group: str) -> str:
    """A group's method label: the first part of its name (`lora@nf4|llama-7b`, `read|minilm-l6|confirm-s1`)."""
    return str(group).split("|", 1)[0]


def outcome(result: Mapping[str, Any]) -> str:
    """A finished trial's status: the loop reports oom, diverged and errors as outcomes, not crashes."""
    return str(result.get("status") or "ok")


def one_line_error(trial: Any) -> str:
    """Why a trial failed, in one line: the original exception's type and first line, else the error file's last."""
    with contextlib.suppress(Exception):  # the reason is a courtesy: never let it break the run
        exc = trial.get_pickled_error()
        if isinstance(exc, RayTaskError) and exc.cause is not None:
            exc = exc.cause
        if exc is not None:
            text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
            return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
    with contextlib.suppress(Exception):
        lines = [ln.strip() for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
        if lines:
            return lines[-1][:300]
    return "unknown (see the log)"


class Progress(tune.Callback):
    """Per method: trials done of its budget, best validation score of the finished ones, failures; time left.

    Counts come from Tune's trial list on every event (so a resumed run starts from what had finished);
    durations from trials this process saw start and end. Time left = max(remaining work / slots, the
    longest running trial's remainder), a trial's expected duration being its method's mean in this phase,
    else its seconds per epoch in an earlier phase × `epochs[method]`, else the mean of all.
    """

    def __init__(self, phase: str, totals: Mapping[str, int], *, log_file: str = "", tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, say: Callable[[str], None] = log,
                 epochs: Mapping[str, int] | None = None):
        self.phase, self.totals, self.epochs = phase, dict(totals), dict(epochs or {})
        self.total = sum(self.totals.values())
        self.log_file, self.tty, self.clock, self.say = log_file, tty, clock, say
        self.started: dict[str, float] = {}  # running trial id -> its start
        self.seconds: dict[str, list[float]] = {}  # method -> finished trials' durations
        self.finished: set[str] = set()
        self.failed: set[str] = set()
        self.slots = 1  # the most trials seen running at once
        self.bar: tqdm | None = None
        self.trials: list[Any] = []
        self.drawn = 0.0

    def __getstate__(self) -> dict:  # Tune pickles its run config (callbacks included): not the live bar
        return {**self.__dict__, "bar": None, "trials": [], "say": log}

    # ------------------------------------------------------------------ state

    def tally(self, trials: Sequence[Any]) -> dict[str, dict[str, Any]]:
        """method -> {done, failed, left, best}."""
        out = {m: {"done": 0, "failed": 0, "left": n, "best": None} for m, n in self.totals.items()}
        for t in trials:
            m = method_of((t.config or {}).get("group", ""))
            row = out.setdefault(m, {"done": 0, "failed": 0, "left": 0, "best": None})
            if t.trial_id in self.failed or t.status == "ERROR":
                row["failed"] += 1
            elif t.trial_id in self.finished or t.status == "TERMINATED":
                result = t.last_result or {}
                if outcome(result) != "ok":
                    row["failed"] += 1
                    row["left"] = max(0, row["left"] - 1)
                    continue
                row["done"] += 1
                score = result.get(OBJECTIVE)
                if isinstance(score, (int, float)) and score > FAILED_OBJECTIVE / 2:
                    row["best"] = score if row["best"] is None else max(row["best"], score)
            else:
                continue
            row["left"] = max(0, row["left"] - 1)
        return out

    def eta(self, tally: Mapping[str, Mapping[str, Any]], running: Mapping[str, str]) -> float | None:
        """Seconds left: the queue's expected work over the slots, at least the longest running remainder.
        `running` maps a running trial id to its method."""
        known = [s for seconds in self.seconds.values() for s in seconds]
        prior = {m: mean(SECONDS_PER_EPOCH[m]) * self.epochs[m] for m in tally  # an earlier phase's pace
                 if SECONDS_PER_EPOCH.get(m) and m in self.epochs}
        if not known and not prior:
            return None
        overall = mean(known or prior.values())

        def expected(m: str) -> float:
            if self.seconds.get(m):
                return mean(self.seconds[m])
            return prior.get(m, overall)

        now = self.clock()
        remainders = [max(0.0, expected(m) - (now - self.started[t])) for t, m in running.items()]
        n_running = {m: list(running.values()).count(m) for m in set(running.values())}
        queued = sum(expected(m) * max(0, row["left"] - n_running.get(m, 0)) for m, row in tally.items())
        return max((queued + sum(remainders)) / self.slots, max(remainders, default=0.0))

    def status(self, trials: Sequence[Any], *, terminal: bool = False) -> str:
        """The status line; on a terminal failures and time left come first (a narrow one cuts the end)."""
        tally = self.tally(trials)
        done = sum(r["done"] for r in tally.values())
        failed = sum(r["failed"] for r in tally.values())
        running = {t.trial_id: method_of((t.config or {}).get("group", "")) for t in trials
                   if t.trial_id in self.started}
        methods = []
        for m, r in tally.items():
            best = "–" if r["best"] is None else f"{r['best']:.3f}"
            methods.append(f"{m} best {best} ({r['left']} left)" if r["left"] else f"{m} best {best} (done)")
        end = [f"{failed} failed",
               time_left(self.eta(tally, running)) if done + failed < self.total else "finished"]
        head = f"{self.phase} {done + failed}/{self.total} done"
        return " · ".join([head, *end, *methods] if terminal else [head, *methods, *end])

    # ------------------------------------------------------------------ display

    def on_terminal(self) -> bool:
        """A terminal with a width (a pseudo-terminal without one, as under `script`, shows nothing in place)."""
        if self.tty is not None:
            return self.tty
        try:
            return sys.stderr.isatty() and os.get_terminal_size(sys.stderr.fileno()).columns > 0
        except (OSError, ValueError):
            return False

    def show(self, trials: Sequence[Any], *, finished: bool) -> None:
        """On a terminal: redraw the progress line; elsewhere: a line per finished trial."""
        global _bar
        self.trials = list(trials)
        text = self.status(trials, terminal=self.on_terminal())
        if not self.on_terminal():
            if finished:
                self.say(text)
            return
        if self.bar is None:
            self.bar = _bar = tqdm(total=self.total, file=sys.stderr, dynamic_ncols=True, leave=True,
                                   bar_format="{bar:12} {desc}")
        self.bar.n = sum(1 for t in trials if t.trial_id in self.finished | self.failed
                         or t.status in ("TERMINATED", "ERROR"))
        self.bar.set_description_str(f"[{time.strftime('%H:%M:%S')}] {text}", refresh=True)
        self.drawn = self.clock()

    def close(self) -> None:
        global _bar
        if self.bar is not None:
            self.bar.close()
            self.bar = _bar = None

    # ------------------------------------------------------------------ Tune's hooks

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = self.clock()
        self.slots = max(self.slots, len(self.started))
        self.show(trials, finished=False)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        began = self.started.pop(trial.trial_id, None)
        if began is not None:
            m = method_of((trial.config or {}).get("group", ""))
            self.seconds.setdefault(m, []).append(self.clock() - began)
            epochs_run = (trial.last_result or {}).get("training_iteration")
            if isinstance(epochs_run, int) and epochs_run > 0:
                SECONDS_PER_EPOCH.setdefault(m, []).append((self.clock() - began) / epochs_run)
        self.finished.add(trial.trial_id)
        result = trial.last_result or {}
        if outcome(result) != "ok":  # the loop's one-line reason (trainables.loop.classify_failure)
            reason = " ".join(str(result.get("error") or "no reason recorded").split())[:300]
            self.say(f"{self.phase}: trial {trial} failed ({outcome(result)}): {reason}")
        self.show(trials, finished=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started.pop(trial.trial_id, None)
        self.failed.add(trial.trial_id)
        self.say(f"{self.phase}: trial {trial} crashed: {one_line_error(trial)}"
                 + (f" (traceback in {self.log_file})" if self.log_file else ""))
        self.show(trials, finished=True)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started.pop(trial.trial_id, None)
        self.say(f"{self.phase}: trial {trial} failed, retrying: {one_line_error(trial)}")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.on_terminal() and self.clock() - self.drawn >= 1:  # the time left counts down
            self.show(trials, finished=False)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.close()


class TuneLog(tune.Callback):
    """Ray Tune's own verbose reporter (each trial's configuration and results, the status table every 30 s,
    errors), printing into the study's log file instead of the console."""

    def __init__(self, stream: TextIO, experiment_path: str):
        self.stream, self.experiment_path = stream, experiment_path
        self.reporter = TuneTerminalReporter(AirVerbosity.VERBOSE, metric=OBJECTIVE, mode="max")

    def __getstate__(self) -> dict:  # Tune pickles its run config (callbacks included): not the open file
        return {**self.__dict__, "stream": None}

    def _forward(self, hook: str, **info: Any) -> None:
        if self.stream is None or self.stream.closed:
            return
        with contextlib.redirect_stdout(self.stream):
            getattr(self.reporter, hook)(**info)
        self.stream.flush()

    def setup(self, **info: Any) -> None:
        total = int(info.get("total_num_samples") or 0)
        self._forward("setup", start_time=time.time(), total_samples=total)
        self._forward("experiment_started", experiment_name=Path(self.experiment_path).name,
                      experiment_path=self.experiment_path, searcher_str="GroupedSearch", scheduler_str="",
                      total_num_samples=total)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.stream is not None and not self.stream.closed:
            with contextlib.redirect_stdout(self.stream):
                self.reporter.print_heartbeat(trials)

    def on_trial_start(self, **info: Any) -> None:
        self._forward("on_trial_start", **info)

    def on_trial_result(self, **info: Any) -> None:
        self._forward("on_trial_result", **info)

    def on_trial_complete(self, **info: Any) -> None:
        self._forward("on_trial_complete", **info)
        result = info["trial"].last_result or {}
        if outcome(result) != "ok" and self.stream is not None and not self.stream.closed:  # Ray's table cuts it
            self.stream.write(f"Trial {info['trial']} {outcome(result)}: {result.get('error')}\n\n")

    def on_trial_error(self, **info: Any) -> None:
        self._forward("on_trial_error", **info)

    def on_checkpoint(self, **info: Any) -> None:
        self._forward("on_checkpoint", **info)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.stream is not None and not self.stream.closed:
            with contextlib.redirect_stdout(self.stream):
                self.reporter.print_heartbeat(trials, force=True)
        self._forward("on_experiment_end", trials=trials, **info)


@contextlib.contextmanager
def ray_console(verbose: bool) -> Iterator[None]:
    """Ray Tune's console output on (`verbose`) or off while a run fits.

    Off is Tune's legacy output engine at verbosity 0, which prints nothing: the new engine announces
    the experiment in a 10-line box at any verbosity, and its reporter, set up without a start time
    when it is not the first among the callbacks, fails on a trial error.
    """
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


class StudyLog:
    """`<study>/logs/tune.log`, appended to; in a cloud folder written here and uploaded when the run ends."""

    def __init__(self, study: str):
        self.target = Location.of(study) / LOG
        self.scratch: Path | None = None
        if self.target.local:
            self.path = self.target.local_path
            self.path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self.scratch = Path(tempfile.mkdtemp(prefix="petl-log-"))
            self.path = self.scratch / "tune.log"
            if self.target.exists():  # a resumed study's log goes on
                self.target.download(self.path)
        self.stream = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed by close())

    def close(self) -> None:
        self.stream.close()
        if self.scratch is not None:
            try:
                self.target.upload(self.path)
            except StorageError as e:
                log(f"warning: the log was not uploaded: {e}")
            shutil.rmtree(self.scratch, ignore_errors=True)


@contextlib.contextmanager
def watch(phase: str, groups: Sequence[Any], study: str, experiment: str, *,
          verbose: bool = False) -> Iterator[list[tune.Callback]]:
    """The callbacks a run passes to Tune: the console's progress and Ray Tune's output into the study's log.

    Tune's own log messages (warnings, each failed trial's traceback) go to the log file too; with
    `verbose` they also reach the console, as they do without this project.
    """
    totals: dict[str, int] = {}
    epochs: dict[str, int] = {}
    for g in groups:
        totals[method_of(g.name)] = totals.get(method_of(g.name), 0) + g.n_trials
        epochs[method_of(g.name)] = max(epochs.get(method_of(g.name), 1), int(g.run.get("epochs", 1)))
    study_log = StudyLog(study)
    study_log.stream.write(f"\n===== {phase} started {time.strftime('%Y-%m-%d %H:%M:%S')}: {experiment} =====\n")
    handler = logging.StreamHandler(study_log.stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in RAY_LOGGERS]
    propagate = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = verbose
    progress = Progress(phase, totals, log_file=str(study_log.target), epochs=epochs)
    try:
        yield [progress, TuneLog(study_log.stream, experiment)]
    finally:
        progress.close()
        for lg, p in zip(loggers, propagate, strict=True):
            lg.removeHandler(handler)
            lg.propagate = p
        study_log.close()
