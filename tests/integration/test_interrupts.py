"""Interrupted studies on real Ray Tune: SIGINT (Ctrl-C to the process group) and SIGHUP (to the driver, as
an SSH drop under `ray exec` sends it) write every finished trial and epoch and exit 130/129; `--resume`
continues, also from a state that names a checkpoint Tune already deleted (the SIGKILL race, planted
deterministically). SIGTERM has the very handler SIGHUP has (tests/unit/test_stop_signals.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import clis
import pandas as pd
import pytest
from clis import ROOT, cli_env, kill_session, session_processes

pytestmark = pytest.mark.integration
EPOCHS = 4
STUDY = ["--backbones", "llama-tiny", "--max-model", "llama-tiny", "--methods", "full", "--task", "synthetic",
         "--trials-per-method", "4", "--epochs", str(EPOCHS), "--train-size", "256", "--cost-runs", "none",
         "--batch-size", "16",
         "--no-memory-estimates", "--confirm-seeds", "0", "--name", "s"]


def reported(trial_dir: Path) -> int:
    """Epochs a trial has reported (progress.csv: a header, then one line per report)."""
    progress = trial_dir / "progress.csv"
    return max(0, len(progress.read_text().splitlines()) - 1) if progress.exists() else 0


def run_until(storage: Path, ready, sig: int, to_group: bool) -> subprocess.CompletedProcess:
    """Start a study, send `sig` once `ready(epochs by trial)` holds, return the finished process."""
    proc = subprocess.Popen([sys.executable, "-m", "study.scaling", *STUDY, "--storage", str(storage)], cwd=ROOT,
                            env=cli_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ready({d.name: reported(d) for d in (storage / "s" / "tune").glob("*-*-*") if d.is_dir()}):
            assert time.time() < deadline and proc.poll() is None, "the study never reached the state to interrupt"
            time.sleep(0.2)
        (os.killpg if to_group else os.kill)(proc.pid, sig)
        out, _ = proc.communicate(timeout=180)
    finally:
        kill_session(proc.pid)
    assert not session_processes(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def tables(storage: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    trials = pd.read_parquet(storage / "s" / "trials.parquet").query("status != 'estimated'")
    return trials, pd.read_parquet(storage / "s" / "epochs.parquet")


def agree(trials: pd.DataFrame, epochs: pd.DataFrame) -> None:
    """Every trial's epochs run 1..n once, and its row says n."""
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    runs = epochs.groupby("trial_id").epoch.apply(list)
    assert all(e == list(range(1, len(e) + 1)) for e in runs), runs
    assert set(runs.index) == set(trials.trial_id)
    assert trials.set_index("trial_id").epochs_run.sort_index().tolist() == runs.map(len).sort_index().tolist()


def test_sigint_writes_finished_trials_then_resume_survives_a_deleted_checkpoint(tmp_path):
    # Ctrl-C once a trial has finished and another is mid-way (1 or 2 of 4 epochs)
    out = run_until(tmp_path, lambda n: EPOCHS in n.values() and any(0 < k < EPOCHS - 1 for k in n.values()),
                    signal.SIGINT, to_group=True)
    assert out.returncode == 130, out.stdout[-4000:]
    trials, epochs = tables(tmp_path)
    finished = trials[trials.status == "ok"]
    assert len(finished) >= 1 and finished.epochs_run.eq(EPOCHS).all(), trials[["trial_id", "status", "epochs_run"]]
    assert set(trials.status) <= {"ok", "interrupted"} and (trials.status == "interrupted").any()
    agree(trials, epochs)

    # the race a SIGKILL can leave: Tune logged the report of checkpoint N+1, registered it and deleted
    # N, but its saved state still names N. Planted on each interrupted trial: the state names the
    # checkpoint of its last report; that one becomes N+1 (a folder the trial may have written after
    # that report, unreported, is replaced) and N is deleted.
    planted = 0
    for trial_id in trials[trials.status == "interrupted"].trial_id:
        trial_dir = next((tmp_path / "s" / "tune").glob(f"*-{trial_id}"))
        named = trial_dir / pd.read_csv(trial_dir / "progress.csv").checkpoint_dir_name.dropna().iloc[-1]
        successor = trial_dir / f"checkpoint_{int(named.name.removeprefix('checkpoint_')) + 1:06d}"
        shutil.rmtree(successor, ignore_errors=True)
        named.rename(successor)
        planted += 1
    assert planted

    out = clis.run_cli("study.scaling", *STUDY, "--storage", str(tmp_path), "--resume", timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    trials, epochs = tables(tmp_path)
    assert len(trials) == 4 and set(trials.status) == {"ok"}, trials[["trial_id", "status", "error"]]
    agree(trials, epochs)


def digests(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sighup_to_the_driver_writes_what_finished_exit_129_and_resume_refuses_other_flags(tmp_path, capsys):
    out = run_until(tmp_path, lambda n: any(k > 0 for k in n.values()), signal.SIGHUP, to_group=False)
    assert out.returncode == 129, out.stdout[-4000:]
    assert "interrupted by SIGHUP" in out.stdout
    trials, epochs = tables(tmp_path)
    assert len(trials) >= 1 and set(trials.status) <= {"ok", "interrupted"}
    agree(trials, epochs)

    # --resume with other methods and epochs: one line naming both, nothing changed (in-process: before Ray)
    from study import runner, scaling

    before = digests(tmp_path)
    code = runner.main_guard(lambda: scaling.main([*STUDY, "--storage", str(tmp_path), "--resume",
                                                   "--methods", "read", "--epochs", "2"]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --resume") and "\n" not in err, err
    assert "methods ['full'] -> ['read']" in err and "'epochs': 4" in err and "'epochs': 2" in err, err
    assert digests(tmp_path) == before
