"""Restoring a trial whose saved state names a checkpoint Tune already deleted (num_to_keep=1), and an
experiment whose driver was killed before Tune saved a complete state."""

from __future__ import annotations

import pyarrow.fs
import pytest
from ray import tune
from ray.train._internal.session import _TrainingResult

from study import launch
from trainables.ray_trainable import restorable


def result_for(path):
    return _TrainingResult(checkpoint=tune.Checkpoint(str(path), filesystem=pyarrow.fs.LocalFileSystem()),
                           metrics={"epoch": 2})


def test_deleted_checkpoint_falls_back_to_the_one_that_replaced_it(tmp_path):
    for i in (3, 4):  # 3 replaced the deleted 2; 4 may be half-written
        (tmp_path / f"checkpoint_{i:06d}").mkdir()
    (tmp_path / "checkpoint").mkdir()  # the loop's own folder is no Tune checkpoint
    got = restorable(result_for(tmp_path / "checkpoint_000002"))
    assert got.checkpoint.path == str(tmp_path / "checkpoint_000003") and got.metrics == {"epoch": 2}


def test_existing_or_unreplaced_checkpoint_is_kept(tmp_path):
    (tmp_path / "checkpoint_000001").mkdir()
    kept = result_for(tmp_path / "checkpoint_000001")
    assert restorable(kept) is kept
    gone = result_for(tmp_path / "checkpoint_000005")  # nothing after it: Tune reports the missing checkpoint
    assert restorable(gone) is gone
    assert restorable(None) is None


def experiment(folder, *files, state="{}"):
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / name).write_text(state if name.startswith("experiment_state-") else "x")
    return str(folder)


STATE = ["tuner.pkl", "experiment_state-2026-12-03_09-00-00.json", "search_gen_state-2026-12-03_09-00-00.json",
         "searcher-state-2026-12-03_09-00-00.pkl"]


def test_a_complete_state_resumes_and_nothing_recorded_starts_over(tmp_path):
    """Tune's can_restore looks at tuner.pkl only; a driver killed before the first snapshot has no more."""
    fs = pyarrow.fs.LocalFileSystem()
    assert launch.resumable(experiment(tmp_path / "whole", *STATE), fs)
    assert not launch.resumable(experiment(tmp_path / "killed", "tuner.pkl"), fs)
    assert not launch.resumable(str(tmp_path / "absent"), fs)


@pytest.mark.parametrize("missing", [f for f in STATE if not f.startswith("experiment_state-")])
def test_a_recorded_state_missing_a_piece_is_refused_and_kept(tmp_path, missing, capsys):
    path = experiment(tmp_path / "s" / "tune", *(f for f in STATE if f != missing))
    with pytest.raises(launch.Unresumable, match=f"lacks {missing.split('-2026')[0]}"):
        launch.resumable(path, pyarrow.fs.LocalFileSystem())
    assert launch.results(str(tmp_path / "s")) is None  # what a stopped run reads back: nothing, no traceback
    # the CLI's check, before Ray: one line, exit 2, nothing removed
    from study import runner

    with pytest.raises(runner.UsageError, match="^--resume: Ray Tune's saved state .* start a new --name"):
        runner.check_resume("s", str(tmp_path / "s"), {}, resume=True)
    assert sorted(p.name for p in (tmp_path / "s" / "tune").iterdir()) == sorted(f for f in STATE if f != missing)


def test_a_cut_experiment_state_is_refused(tmp_path):
    path = experiment(tmp_path / "cut", *STATE, state='{"trial_data": [["')
    with pytest.raises(launch.Unresumable, match="is cut short"):
        launch.resumable(path, pyarrow.fs.LocalFileSystem())


def test_what_an_unsaved_run_left_is_discarded_and_said(tmp_path, capsys):
    path = experiment(tmp_path / "tune", "tuner.pkl")
    (tmp_path / "tune" / "full-llama-tiny-1234abcd" / "checkpoint_000000").mkdir(parents=True)
    launch.discard_unsaved(path, pyarrow.fs.LocalFileSystem())
    assert not (tmp_path / "tune").exists()
    err = capsys.readouterr().err
    assert "holds no saved state" in err and "1 trial folder(s)" in err and "starts over" in err
    launch.discard_unsaved(path, pyarrow.fs.LocalFileSystem())  # nothing there: nothing said
    assert capsys.readouterr().err == ""
