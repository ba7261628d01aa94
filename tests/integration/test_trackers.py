"""`--log mlflow` on the shared tiny study (shared_studies.TINY_STUDY): MLflow's own client reads the study's
file store back, one run per trial with its config and every epoch's metrics. `tracked(..., wandb=True)` also
checks W&B's offline run folders (one per trial); test_user_data_and_methods.py runs it on a `--log mlflow wandb`
study. That no planted credential is in any of these files is test_secrets.py's check of the same runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from shared_studies import TINY_STUDY

from study import schema

pytestmark = pytest.mark.integration


def tracked(folder: Path, wandb: bool = False) -> dict[str, int]:
    """Assert what `--log mlflow [wandb]` must leave in a study folder; returns the counts it checked."""
    from mlflow.tracking import MlflowClient

    trials = schema.read(folder / "trials.parquet").to_pandas()
    trials = trials[trials["status"] != "estimated"]
    epochs = schema.read(folder / "epochs.parquet").to_pandas()
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 reads its file store only when told
    client = MlflowClient(tracking_uri=(folder / "mlruns").as_uri())
    experiment = client.get_experiment_by_name(folder.name)  # the study name
    assert experiment is not None, [e.name for e in client.search_experiments()]
    runs = client.search_runs([experiment.experiment_id], max_results=10_000)
    by_trial = {r.info.run_name.rsplit("-", 1)[-1]: r for r in runs}
    assert len(runs) == len(by_trial) == len(trials), (len(runs), len(trials))  # runs = trials, one each
    assert set(by_trial) == set(trials["trial_id"])
    for trial in trials.itertuples():
        run = by_trial[trial.trial_id]
        assert run.info.status == "FINISHED", run.info
        assert run.data.params["run/method"] == trial.method_base and run.data.params["run/backbone"] == trial.backbone
        assert "run/seed" in run.data.params and "group" in run.data.params  # the trial's whole config
        history = client.get_metric_history(run.info.run_id, "objective")
        mine = epochs[epochs["trial_id"] == trial.trial_id].sort_values("epoch")
        assert [m.step for m in history] == mine["epoch"].tolist(), (trial.trial_id, history)
        if trial.status == "ok":  # each epoch's validation metric, as epochs.parquet has it
            assert [m.value for m in history] == pytest.approx(mine["eval_metric"].tolist())
        assert "train_loss" in run.data.metrics
    wandb_runs = sorted((folder / "wandb").glob("offline-run-*"))
    if wandb:
        assert {p.name.rsplit("-", 1)[-1] for p in wandb_runs} == set(trials["trial_id"]), wandb_runs
        assert all(any(p.glob("run-*.wandb")) for p in wandb_runs)
    return {"runs": len(runs), "epochs": int(pd.Series([len(client.get_metric_history(r.info.run_id, "objective"))
                                                         for r in runs]).sum()), "wandb_runs": len(wandb_runs)}


def test_mlflow_reads_back_runs_per_trial_and_metrics_per_epoch(tiny_study):
    assert tiny_study.proc.returncode == 0, tiny_study.proc.stderr[-4000:]
    assert "--log" in TINY_STUDY, "shared_studies.TINY_STUDY must run with --log mlflow"
    counts = tracked(tiny_study.storage / "scaling")
    assert counts["runs"] > 0 and counts["epochs"] >= counts["runs"]


def test_a_bucket_study_gets_its_tracker_files_uploaded_and_back_on_resume(monkeypatch):
    """s3:// storage: MLflow's file store and W&B's files are written in a local folder, uploaded into the
    study folder when a Tune experiment ends, and downloaded again when the study resumes."""
    from s3server import moto_s3

    from study import trackers
    from study.storage import Location

    with moto_s3("petl") as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        study = "s3://petl/trackers/scaling"
        first = trackers.callbacks(["mlflow", "wandb"], "scaling", study)
        upload = first[-1]
        assert isinstance(upload, trackers.Upload) and upload.folders == ["mlruns", "wandb"]
        staged = Path(upload.staged)
        assert first[0].tracking_uri == (staged / "mlruns").as_uri() and first[1].kwargs["dir"] == str(staged)
        (staged / "mlruns" / "1").mkdir(parents=True)
        (staged / "mlruns" / "1" / "meta.yaml").write_text("name: scaling\n")
        (staged / "wandb" / "offline-run-1-abc").mkdir(parents=True)
        (staged / "wandb" / "offline-run-1-abc" / "run-abc.wandb").write_bytes(b"W&B")
        upload.on_experiment_end(trials=[])
        remote = Location.of(study)
        assert (remote / "mlruns/1/meta.yaml").read_bytes() == b"name: scaling\n"
        assert (remote / "wandb/offline-run-1-abc/run-abc.wandb").read_bytes() == b"W&B"
        resumed = Path(trackers.callbacks(["mlflow", "wandb"], "scaling", study)[-1].staged)
        try:
            assert resumed != staged and (resumed / "mlruns/1/meta.yaml").read_text() == "name: scaling\n"
            assert (resumed / "wandb/offline-run-1-abc/run-abc.wandb").read_bytes() == b"W&B"
        finally:
            shutil.rmtree(staged)
            shutil.rmtree(resumed)
