"""Turn Tune's results (and the planner's estimated-only pairs) into the two Parquet tables.

Rows are built from what each trial reported itself (its last report carries the full
running summary), not from `ResultGrid.get_dataframe()`, whose bookkeeping columns
have guessed types. Works on a finished, an interrupted or a resumed study alike.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from study import schema
from study.plan import describe
from study.spaces import method_label
from study.storage import Location
from trainables import backbones
from trainables.loop import PREDICTIONS_FILE, RunConfig
from trainables.methods import get_method
from trainables.methods.base import config_to_dict

_TRIAL_KEYS = set(schema.TRIAL_COLUMNS)


def environment() -> dict[str, Any]:
    """Versions and the code revision, recorded on every row.

    Called on the driver, which carries the values into every row it writes: trial nodes
    need no `.git` (a cluster's file mounts leave it out; the head gets it, see cluster.yaml).
    `git_dirty`: the working tree differed from `git_sha` (uncommitted changes ran).
    """
    import deepspeed
    import ray
    import torch
    import transformers

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    sha = (git("rev-parse", "HEAD") or "").strip() or None
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status.strip()),
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "ray_version": ray.__version__, "deepspeed_version": deepspeed.__version__}


def method_config_json(method: str, values: dict[str, Any] | None) -> str | None:
    """The method's whole config (defaults included) as JSON: e.g. LST's importance and layer drop."""
    try:
        return json.dumps(config_to_dict(get_method(method).parse(values)), sort_keys=True, default=str)
    except ValueError:
        return None


def _one_line(error: Any) -> str | None:
    if error is None:
        return None
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else type(error).__name__


def early_stopped(summary: dict[str, Any], run: dict[str, Any]) -> bool:
    """Ended, without failing, before its epoch budget (ASHA stopped it): its final metric is an earlier epoch's."""
    epochs_run = summary.get("epochs_run")
    return (summary.get("status") == "ok" and epochs_run is not None
            and int(epochs_run) < int(run.get("epochs") or RunConfig.epochs))


_UNFINISHED = ("PENDING", "RUNNING", "PAUSED")  # Tune's statuses of a trial that has not ended


def _tune_trials(grid: Any) -> list[tuple[str | None, dict]]:
    """(Tune status, the config Tune gave the trial) for each result of `grid`, in the grid's order.

    A `Result` carries neither the status nor, before the first report, the config; the
    `Trial`s behind the grid do (ResultGrid has no public accessor for them).
    """
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None)
    if trials is None:
        return [(None, {}) for _ in grid]
    return [(t.status, dict(t.config or {})) for t in trials]


def rows_from_results(study: str, grid: Any, env: dict[str, Any], role: str = "search") -> tuple[list[dict], list[dict]]:
    """(trial rows, epoch rows) for every trial Tune knows of; `role`: search, or confirm (study.confirm)."""
    trials: list[dict] = []
    epochs: list[dict] = []
    now = dt.datetime.now(dt.UTC)
    for (tune_status, given), result in zip(_tune_trials(grid), grid, strict=True):
        config = result.config or given  # a trial that has not reported yet has no config in its result
        run = config.get("run") or {}
        last = dict(result.metrics or {})
        reported = "status" in last or result.error is not None  # every report of the loop carries its status
        if not run or not reported:
            continue  # never started, or stopped before its first epoch: nothing finished
        unfinished = tune_status in _UNFINISHED and result.error is None
        trial_id = str(last.get("trial_id") or Path(result.path).name)
        row: dict[str, Any] = {k: v for k, v in last.items() if k in _TRIAL_KEYS}
        row.update(env)
        # the row's method is the label (lora@nf4+gc), method_base the registry name the run config carries
        row.update(describe(method_label(run["method"], run.get("quant") or "none",
                                         bool(run.get("gradient_checkpointing"))), run["backbone"]))
        weights = run.get("weights")
        if weights in (None, "auto"):
            weights = "pretrained" if backbones.weights_here(backbones.get_spec(run["backbone"])) else "random"
        row.update(study=study, trial_id=trial_id, created_at=now, task=run.get("task"), weights=weights, role=role,
                   train_size=run.get("train_size"), seed=run.get("seed"), max_length=run.get("max_length"),
                   batch_size=run.get("batch_size"), epochs=run.get("epochs"))
        if row.get("pooling") is None:  # failed before the model was built: what was asked
            row["pooling"] = run.get("pooling")
        row["method_config"] = method_config_json(run["method"], run.get("method_config"))
        if result.error is not None and row.get("status", "ok") == "ok":
            row.update(status="error", error=_one_line(result.error))
        row.setdefault("status", "error" if not last else "ok")
        if unfinished:  # stopped mid-trial (Ctrl-C, SIGTERM): its finished epochs count, its row does not yet
            row.update(status="interrupted", error=None)
        row["early_stopped"] = early_stopped(row, run)
        row.update({f"hp.{k}": v for k, v in (config.get("hp") or {}).items()})
        trials.append(row)
        frame = result.metrics_dataframe
        records = [] if frame is None or frame.empty or "epoch" not in frame else frame.to_dict("records")
        # the last report, as the saved experiment state has it: on cloud storage the trial's own result files
        # are uploaded with its checkpoints, so a report without one (a resumed finished run) may be missing there
        records.append(last)
        for rec in records:
            if rec.get("epoch") is None or rec.get("eval_metric") is None and rec.get("train_loss") is None:
                continue
            epochs.append({"study": study, "trial_id": trial_id, "method": row["method"], "backbone": row["backbone"],
                           **{k: rec.get(k) for k in ("epoch", "train_loss", "metric_name", "eval_metric",
                                                       "wall_time_s", "tokens_seen", "lr")}})
    for rec in epochs:
        rec["epoch"] = int(rec["epoch"])
        if rec.get("tokens_seen") is not None:
            rec["tokens_seen"] = int(rec["tokens_seen"])
    # a restored trial can report an epoch again (its result history is replayed): the last report wins
    epochs = list({(rec["trial_id"], rec["epoch"]): rec for rec in epochs}.values())
    return trials, epochs


def prediction_rows(study: str, grid: Any) -> list[dict]:
    """Per-example test predictions of every finished trial of `grid` (a confirm experiment), PREDICTION_FIELDS.

    Each is read from the trial's last checkpoint through that checkpoint's own filesystem, so local and
    cloud storage read alike. A trial that failed, did not finish, or whose checkpoint has no predictions
    (an older run) has none: it is left out, as it is left out of the cell's mean.
    """
    out: list[dict] = []
    for (tune_status, given), result in zip(_tune_trials(grid), grid, strict=True):
        metrics, checkpoint = dict(result.metrics or {}), result.checkpoint
        if (checkpoint is None or metrics.get("status") != "ok" or result.error is not None
                or tune_status in _UNFINISHED):
            continue
        path = f"{checkpoint.path.rstrip('/')}/{PREDICTIONS_FILE}"  # the loop wrote it there (eval_test)
        if checkpoint.filesystem.get_file_info(path).type != pafs.FileType.File:
            continue
        table = pq.read_table(path, filesystem=checkpoint.filesystem, columns=["example", "label", "prediction"])
        run = (result.config or given).get("run") or {}
        fixed = {"study": study, "trial_id": str(metrics.get("trial_id") or Path(result.path).name),
                 "method": method_label(run.get("method"), run.get("quant") or "none",
                                        bool(run.get("gradient_checkpointing"))),
                 "backbone": run.get("backbone"), "task": run.get("task"),
                 "train_size": run.get("train_size"), "seed": run.get("seed"), "metric_name": metrics.get("metric_name")}
        columns = zip(*(table.column(c).to_pylist() for c in ("example", "label", "prediction")), strict=True)
        out += [{**fixed, "example": e, "label": y, "prediction": p} for e, y, p in columns]
    return out


def with_cache_shares(trials: list[dict]) -> list[dict]:
    """Each cached trial's share of the cache builds it read: a build's time and energy split evenly over
    the trials of this study that read that cache (`cache_builds`), so side methods are not cheaper by
    construction. Adds cache_share_s / _joules and the totals time_with_cache_s / energy_with_cache_joules;
    a trial that ran the backbone live gets a zero share. The shares of one cache sum to its build."""
    builds: dict[str, dict[str, Any]] = {}
    readers: dict[str, int] = {}
    parsed = []
    for r in trials:
        read = json.loads(r["cache_builds"]) if r.get("cache_builds") else {}
        parsed.append(read)
        for cache_id, cost in read.items():
            builds[cache_id] = cost
            readers[cache_id] = readers.get(cache_id, 0) + 1
    out = []
    for r, read in zip(trials, parsed, strict=True):
        r = dict(r)
        if r.get("status") == "estimated":
            out.append(r)
            continue
        seconds = [builds[c].get("s") for c in read]
        joules = [builds[c].get("joules") for c in read]
        r["cache_share_s"] = (sum(s / readers[c] for c, s in zip(read, seconds, strict=True))
                              if None not in seconds else None)
        r["cache_share_joules"] = (sum(j / readers[c] for c, j in zip(read, joules, strict=True))
                                   if None not in joules else None)
        if r.get("train_time_s") is not None and r["cache_share_s"] is not None:
            r["time_with_cache_s"] = r["train_time_s"] + r["cache_share_s"]
        if r.get("energy_joules") is not None and r["cache_share_joules"] is not None:
            r["energy_with_cache_joules"] = r["energy_joules"] + r["cache_share_joules"]
        out.append(r)
    return out


def write(study_dir: str | Path | Location, trials: list[dict], epochs: list[dict]) -> tuple[Location, Location]:
    """Both tables, each written atomically to the study's storage (a local folder or a cloud URI)."""
    out = Location.of(study_dir)
    return schema.write_trials(trials, out / "trials.parquet"), schema.write_epochs(epochs, out / "epochs.parquet")


def _fmt_bytes(n: Any) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return "-"


def _fmt_count(n: Any) -> str:
    if n is None:
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


QUALITY_NOTE = ("quality = confirm seeds' mean TEST score of the final-epoch model (selected on validation); "
                "interval: Student-t over seeds")


def summary_table(trials: list[dict]) -> str:
    """Method × backbone (× training size): the confirmed test score with its t-interval (study.quality), the
    confirm seeds with their failures, the search's maximum (validation, labelled so) and the epochs the search
    consumed; then the search winner's costs (trainable params, peak memory, energy, time + cache share) and
    the trials by status. Methods significantly below the linear probe are flagged."""
    from study import quality  # local: quality is pure, but keeps this module's imports light

    cells: dict[tuple, list[dict]] = {}
    for r in trials:
        cells.setdefault((r["method"], r["backbone"], r.get("train_size")), []).append(r)  # convergence: sizes
    q = {(r["method"], r["backbone"], r["train_size"]): r for r in quality.quality_rows(trials)}
    sizes: dict[tuple[str, str], set] = {}
    for method, backbone, size in cells:
        sizes.setdefault((method, backbone), set()).add(size)
    head = (f"{'method':<12} {'backbone':<22} {'test: mean [95% t-CI]':>27} {'seeds':>11} {'search max (val)':>16} "
            f"{'search epochs':>17} {'trainable':>10} {'peak mem':>16} {'energy':>12} {'time+cache':>10}  trials")
    lines, flagged = [head, "-" * len(head)], []
    for (method, backbone, size), rows in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2] or 0)):
        qual = q.get((method, backbone, size)) or {}
        finished = [r for r in rows if r.get("role") in (None, "search") and r.get("status") == "ok"
                    and r.get("final_metric") is not None]  # the costs shown: the search winner's (confirm.best_runs)
        r = max(finished, key=lambda t: (not t.get("early_stopped"), t["final_metric"]), default=rows[0])
        test = quality.fmt({**qual, "seeds_failed": 0}) if qual else "unconfirmed"  # failures: the seeds column
        seeds = f"{qual.get('seeds', 0)}" + (f"+{qual['seeds_failed']} failed" if qual.get("seeds_failed") else "")
        best_val = "-" if qual.get("search_best_val") is None else f"{qual['search_best_val']:.3f}"
        spent = f"{qual.get('search_epochs') or 0} ep, {qual.get('search_stopped') or 0} stopped"
        mem = f"{_fmt_bytes(r.get('peak_memory_bytes'))} ({(r.get('memory_source') or '-')[:5]})"
        energy = "-" if r.get("energy_joules") is None else f"{r['energy_joules']:.0f}J {r.get('energy_source')}"
        time_s = "-" if r.get("train_time_s") is None else f"{r['train_time_s']:.0f}s"
        if r.get("cache_share_s"):  # its share of the activation cache's build, beside the training time
            time_s += f"+{r['cache_share_s']:.0f}"
        counts: dict[str, int] = {}
        for t in rows:
            label = t["status"] if t.get("role") in (None, "search") else f"{t['status']} {t['role']}"
            counts[label] = counts.get(label, 0) + 1
        if qual.get("below_probe"):
            test += " <probe"
            flagged.append(f"{method} on {backbone}")
        if len(sizes[(method, backbone)]) > 1:
            backbone = f"{backbone} n={size}"
        if r.get("weights") == "random":
            backbone = f"{backbone} (rnd)"  # random weights: a cost run, its metric means nothing
        lines.append(f"{method:<12} {backbone:<22} {test:>27} {seeds:>11} {best_val:>16} {spent:>17} "
                     f"{_fmt_count(r.get('params_trainable')):>10} {mem:>16} {energy:>12} {time_s:>10}  "
                     + ",".join(f"{n} {s}" for s, n in sorted(counts.items())))
    lines.append(QUALITY_NOTE)
    if flagged:
        lines.append(f"below the linear probe (under-tuned or broken): {', '.join(flagged)}")
    return "\n".join(lines)
