"""`--log`: bad input is one line before Ray; the callbacks point at the study folder and carry no credential
(Tune pickles them into the experiment). What they record is tests/integration/test_trackers.py's check."""

from __future__ import annotations

import argparse

import pytest
from ray import cloudpickle

from study import runner, trackers

KEY = "planted0wandb0key0not0real0000000000009"


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    runner.add_common_args(p, name="scaling")
    return p.parse_args(list(argv))


def test_log_takes_several_trackers_and_refuses_others(capsys):
    assert parse("--log", "mlflow", "wandb", "--log", "tensorboard").log == ["mlflow", "wandb", "tensorboard"]
    assert parse().log == []
    with pytest.raises(SystemExit):
        parse("--log", "neptune")
    err = capsys.readouterr().err  # argparse quotes the choices in some Python versions, not in others
    assert "argument --log: invalid choice: 'neptune' (choose from " in err and all(t in err for t in trackers.TRACKERS)


def test_missing_client_and_wandb_without_credentials_are_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"--log mlflow needs the mlflow package: pip install 'petl-study\[trackers\]'"):
        trackers.check(["mlflow"])
    monkeypatch.undo()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    with pytest.raises(ValueError, match="no W&B credentials; export WANDB_API_KEY .* or set WANDB_MODE=offline"):
        trackers.check(["wandb"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    trackers.check(["mlflow", "wandb", "tensorboard"])


def test_callbacks_write_under_the_study_and_pickle_without_the_key(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from study import tracker_callbacks as tc

    mlflow, wandb, tbx = trackers.callbacks(["mlflow", "wandb", "tensorboard"], "my-study", str(tmp_path / "s"))
    assert isinstance(mlflow, tc.MLflow) and mlflow.tracking_uri == (tmp_path / "s" / "mlruns").as_uri()
    assert mlflow.experiment_name == "my-study"
    assert isinstance(wandb, tc.Wandb) and wandb.project == "my-study"
    assert wandb.kwargs == {"dir": str(tmp_path / "s"), "mode": "offline"}
    assert type(tbx).__name__ == "TBXLoggerCallback"
    assert KEY.encode() not in cloudpickle.dumps([mlflow, wandb, tbx])


def test_wandb_items_come_back_in_the_order_they_were_numbered():
    from study.tracker_callbacks import InOrder

    class Shuffled:  # what an async queue actor may do with one caller's puts
        items = [(2, "end"), (0, "epoch 1"), (1, "epoch 2")]

        def get(self):
            return self.items.pop(0)

    queue = InOrder(Shuffled())
    assert [queue.get() for _ in range(3)] == ["epoch 1", "epoch 2", "end"]


def test_a_tracking_uri_from_the_environment_is_not_pickled_and_offline_spellings_agree(monkeypatch, tmp_path):
    uri = "postgresql://mlflow:planted-db-password-3391@127.0.0.1/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("WANDB_MODE", "DryRun")  # W&B's older name for offline, in any case
    mlflow, wandb = trackers.callbacks(["mlflow", "wandb"], "my-study", str(tmp_path / "s"))
    assert mlflow.tracking_uri is None and b"planted-db-password" not in cloudpickle.dumps([mlflow, wandb])
    assert trackers.os.environ["WANDB_MODE"] == "offline" and wandb.kwargs["mode"] == "offline"


def test_the_staged_tracker_files_go_only_once_uploaded(tmp_path, capsys):
    staged, study = tmp_path / "staged", tmp_path / "study"
    (staged / "mlruns").mkdir(parents=True)
    (staged / "mlruns" / "run.txt").write_text("epoch 1")
    study.mkdir()
    upload = trackers.Upload(str(staged), str(study), ["mlruns"])
    upload.close()  # nothing uploaded yet (a crash before a phase ended): kept, and said
    assert (staged / "mlruns" / "run.txt").exists() and str(staged) in capsys.readouterr().err
    upload.on_experiment_end([])
    assert (study / "mlruns" / "run.txt").read_text() == "epoch 1"
    upload.on_trial_result(1, [], None, {})  # written after the upload: kept again
    upload.close()
    assert staged.exists()
    upload.on_experiment_end([])
    upload.close()
    assert not staged.exists()
