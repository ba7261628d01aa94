"""The training loop on tiny random backbones and the synthetic task: seconds per run.

Every registered method trains (loss falls), the files and the summary have the documented
fields, failures are outcomes (oom / diverged / error), and checkpoint → restore → continue
gives the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from method_table import ROWS  # tests/unit/method_table.py: the one table

from trainables import loop, trial
from trainables.loop import EPOCH_KEYS, SUMMARY_KEYS, RunConfig, classify_failure, epochs_to_target, train
from trainables.methods import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def config(method: str = "read", backbone: str = "llama-tiny", **overrides: Any) -> RunConfig:
    """3 epochs × 4 batches of 16 synthetic examples (the whole subsample each epoch)."""
    method_config, lr = ROWS[method]
    values = dict(backbone=backbone, method=method, method_config=method_config, lr=lr, task="synthetic",
                  train_size=64, max_length=16, epochs=EPOCHS, batch_size=16, eval_batch_size=32,
                  max_eval_examples=32, device="cpu", measure_memory=False)
    return RunConfig(**(values | overrides))


class Recorder:
    """A `report` callable that keeps every call (and can copy a checkpoint away)."""

    def __init__(self, keep_checkpoint_of_epoch: int | None = None, into: Path | None = None):
        self.calls: list[tuple[dict[str, Any], Path | None]] = []
        self.keep, self.into = keep_checkpoint_of_epoch, into

    def __call__(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        self.calls.append((dict(metrics), checkpoint))
        if checkpoint is not None and metrics.get("epoch") == self.keep:
            shutil.copytree(checkpoint, self.into)  # what Ray does: persist the folder elsewhere


def read_epochs(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]


def without_times(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]


def test_every_registered_method_has_a_row():
    assert set(REGISTRY) == set(ROWS), f"add a row to ROWS for: {set(REGISTRY) ^ set(ROWS)}"


def test_reference_lr_covers_every_method():
    assert all(info.reference_lr > 0 for info in REGISTRY.values())
    assert RunConfig(method="prompt").learning_rate == 0.3
    assert RunConfig(method="read", lr=1e-2).learning_rate == 1e-2


@pytest.mark.parametrize("method,backbone", [(m, "llama-tiny") for m in ROWS]
                         + [(m, "bert-tiny") for m in ("read", "lora", "lst")])
def test_method_trains_and_writes_the_documented_records(method, backbone, tmp_path):
    rec = Recorder()
    summary = train(config(method, backbone), tmp_path, rec)
    assert summary["status"] == "ok", summary["error"]
    epochs = read_epochs(tmp_path)
    assert [r["epoch"] for r in epochs] == list(range(1, EPOCHS + 1))
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"], [r["train_loss"] for r in epochs]
    for r in epochs:
        assert set(r) == {*EPOCH_KEYS, "eval_accuracy"} and r["eval_accuracy"] == r["eval_metric"]
    assert epochs[-1]["tokens_seen"] > epochs[0]["tokens_seen"] > 0
    # summary.json: exactly the documented keys, no NaN, agrees with the returned summary
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert list(on_disk) == list(SUMMARY_KEYS) and on_disk == summary
    assert summary["epochs_run"] == EPOCHS and summary["final_metric"] == epochs[-1]["eval_metric"]
    assert summary["best_metric"] == max(r["eval_metric"] for r in epochs)
    assert (summary["params_trainable"] > 0 or method == "probe") and summary["params_head"] > 0
    assert summary["flops_per_step"] > 0
    assert summary["backbone_family"] == ("llama" if backbone == "llama-tiny" else "bert")
    assert summary["peak_memory_bytes"] is None and summary["memory_source"] is None  # measure_memory=False
    # one report per epoch; each carries the epoch's values plus the running summary
    assert len(rec.calls) == EPOCHS
    for (metrics, ckpt), r in zip(rec.calls, epochs, strict=True):
        assert metrics.items() >= r.items() and set(SUMMARY_KEYS) <= set(metrics)
        assert ckpt == tmp_path / "checkpoint"
    assert {k: rec.calls[-1][0][k] for k in SUMMARY_KEYS} == summary


def test_memory_is_measured_once_and_leaves_the_run_unchanged(tmp_path):
    measured = train(config(measure_memory=True), tmp_path / "a")
    plain = train(config(), tmp_path / "b")
    assert measured["memory_source"] == "tracked"
    assert measured["peak_memory_bytes"] >= measured["memory_params_bytes"] > 0
    assert measured["memory_optimizer_bytes"] > 0
    assert measured["final_metric"] == plain["final_metric"]
    assert without_times(read_epochs(tmp_path / "a")) == without_times(read_epochs(tmp_path / "b"))


@pytest.mark.parametrize("method,backbone", [("full", "bert-tiny"), ("read", "llama-tiny")])
def test_checkpoint_restore_continue_equals_uninterrupted(method, backbone, tmp_path):
    """bert-tiny has dropout: the restored RNG state matters too."""
    cfg = config(method, backbone)
    saved = tmp_path / "after-epoch-1"
    whole = train(cfg, tmp_path / "whole", Recorder(keep_checkpoint_of_epoch=1, into=saved))
    rec = Recorder()
    resumed = train(cfg, tmp_path / "resumed", rec, resume_from=saved)
    assert resumed["status"] == whole["status"] == "ok"
    assert [m["epoch"] for m, _ in rec.calls] == [2, 3]
    assert resumed["final_metric"] == whole["final_metric"] and resumed["best_epoch"] == whole["best_epoch"]
    assert without_times(read_epochs(tmp_path / "resumed")) == without_times(read_epochs(tmp_path / "whole"))
    a = loop.load_checkpoint(tmp_path / "whole" / "checkpoint")["model"]
    b = loop.load_checkpoint(tmp_path / "resumed" / "checkpoint")["model"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resuming_a_finished_run_reports_its_record_once(tmp_path):
    whole = train(config(epochs=2), tmp_path / "a")
    rec = Recorder()
    again = train(config(epochs=2), tmp_path / "b", rec, resume_from=tmp_path / "a" / "checkpoint")
    same = ("status", "best_metric", "final_metric", "epochs_run", "tokens_per_s", "train_time_s", "flops_per_step")
    assert {k: again[k] for k in same} == {k: whole[k] for k in same}
    epochs = read_epochs(tmp_path / "b")
    assert len(epochs) == 2 and len(rec.calls) == 1 and rec.calls[0][1] is None
    # the one report is the summary plus the last epoch: Tune's objective reads its eval_metric
    assert rec.calls[0][0] == {**again, **epochs[-1]} and rec.calls[0][0]["eval_metric"] is not None


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    train(config(epochs=1), tmp_path / "a")
    summary = train(config(seed=1), tmp_path / "b", resume_from=tmp_path / "a" / "checkpoint")
    assert summary["status"] == "error" and "different run" in summary["error"]


# --------------------------------------------------------------------------- failures are outcomes

def patch_forward(monkeypatch: pytest.MonkeyPatch, fail: Any, armed: dict[str, bool]) -> None:
    """Wrap every task model's forward: once `armed["on"]`, training forwards return `fail(output)`."""
    real_apply = trial.apply_method

    def apply(*args: Any, **kwargs: Any) -> Any:
        model = real_apply(*args, **kwargs)
        real_forward = model.forward

        def forward(*a: Any, **k: Any) -> Any:
            out = real_forward(*a, **k)
            return fail(out) if armed["on"] and model.training else out

        model.forward = forward
        return model

    monkeypatch.setattr(trial, "apply_method", apply)


def nan_loss(out: Any) -> Any:
    out.loss = out.loss * float("nan")
    return out


def raises(exc: Exception) -> Any:
    def fail(out: Any) -> Any:
        raise exc

    return fail


@pytest.mark.parametrize("fail,status,needle", [
    (nan_loss, "diverged", "non-finite training loss"),
    (raises(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")), "oom", "out of memory"),
    (raises(RuntimeError("DefaultCPUAllocator: can't allocate memory: 8 GB")), "oom", "DefaultCPUAllocator"),
    (raises(ValueError("boom\nsecond line")), "error", "ValueError: boom second line"),
])
def test_failures_are_outcomes_written_and_reported_once(monkeypatch, tmp_path, fail, status, needle):
    armed = {"on": False}
    patch_forward(monkeypatch, fail, armed)

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        rec(metrics, checkpoint)
        armed["on"] = True  # fail from epoch 2 on

    rec = Recorder()
    summary = train(config(cache=False), tmp_path, report)  # the live path: forward is what fails
    assert summary["status"] == status and needle in summary["error"] and "\n" not in summary["error"]
    assert summary["epochs_run"] == 1 and summary["final_metric"] is not None  # epoch 1 finished
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert [c for _, c in rec.calls] == [tmp_path / "checkpoint", None]  # epoch 1, then the failure, once
    assert rec.calls[-1][0] == summary
    assert len(read_epochs(tmp_path)) == 1


def test_huge_learning_rate_diverges(tmp_path):
    summary = train(config("full", lr=1e30), tmp_path)
    assert summary["status"] == "diverged", summary


def test_failure_before_training_still_gives_a_summary(tmp_path):
    summary = train(config(backbone="llama-tiny", max_length=16, train_size=100_000), tmp_path)
    assert summary["status"] == "error" and "train_size" in summary["error"]
    assert summary["epochs_run"] is None and list(summary) == list(SUMMARY_KEYS)
    assert (tmp_path / "summary.json").exists()


def test_classify_failure():
    assert classify_failure(torch.OutOfMemoryError("x"))[0] == "oom"
    assert classify_failure(MemoryError())[0] == "oom"
    assert classify_failure(RuntimeError("CUDA error: out of memory"))[0] == "oom"
    assert classify_failure(loop.Diverged("nan")) == ("diverged", "nan")
    assert classify_failure(ValueError("a\n  b")) == ("error", "ValueError: a b")


# --------------------------------------------------------------------------- bookkeeping

def test_epochs_to_target_and_early_stopping(monkeypatch, tmp_path):
    assert epochs_to_target([0.5, 0.58, 0.6], 0.95) == 2
    assert epochs_to_target([-0.5, -0.2, -0.21], 0.95) == 2  # neg_mse: within 5% of the best
    assert epochs_to_target([], 0.95) is None
    values = iter([0.5, 0.5, 0.6, 0.6, 0.6, 0.6])  # the first: chance_metric, computed once after assembly
    monkeypatch.setattr(loop.tasks, "metric", lambda name, preds, labels: next(values))
    summary = train(config(epochs=5, early_stopping_patience=1), tmp_path)
    assert summary["epochs_run"] == 3 and summary["best_epoch"] == 2 and summary["epochs_to_target"] == 2


def test_run_config_is_strict():
    with pytest.raises(ValueError, match=r"epochz.*valid: backbone, method"):
        RunConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="weights"):
        RunConfig.from_dict({"weights": "maybe"})
    with pytest.raises(ValueError, match="batch_size"):
        RunConfig.from_dict({"batch_size": 0})
    cfg = RunConfig.from_dict({"lr": "1e-3", "train_size": "none", "epochs": "2", "method_config": {"r": 4}})
    assert (cfg.lr, cfg.train_size, cfg.epochs) == (1e-3, None, 2)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    json.dumps(cfg.to_dict())


def test_unknown_method_key_is_an_error_outcome(tmp_path):
    summary = train(config(method_config={"nope": 1}), tmp_path)
    assert summary["status"] == "error" and "nope" in summary["error"]


# --------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("argv,needle", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--backbone", "gpt-9"], "unknown backbone"),
    (["--task", "imdb"], "unknown task"),
    (["--method", "read", "--set", "nope=1"], "nope"),
    (["--run", "epochz=1"], "epochz"),
    (["--epochs", "many"], "--epochs"),
    (["--run", "max_grad_norm=-1"], "max_grad_norm must be >= 0"),
    (["--run", "lr=inf"], "lr must be > 0 and finite"),
    (["--out", str(ROOT / "pyproject.toml")], "is a file"),
    (["--resume", "no/such/checkpoint"], "no checkpoint"),
    (["--method", "lst", "--set", "importance=fisher", "--run", "zero=on"], "use importance=l1"),
    (["--method", "lora", "--set", "r=0"], "lora r=0"),  # the method's own check, before any data or folder
    (["--backbone", "bert-tiny", "--max-length", "600"], "512 positions"),
])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    assert loop.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_cli_exit_code_in_a_real_process():
    out = subprocess.run([sys.executable, "-m", "trainables.loop", "--method", "nope"], cwd=ROOT, text=True,
                         capture_output=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: ")


def test_cli_json_summary_is_the_last_stdout_line(capsys, tmp_path):
    argv = ["--backbone", "llama-tiny", "--method", "read", "--task", "synthetic", "--train-size", "32",
            "--epochs", "1", "--max-length", "16", "--set", "hidden_size=16", "--device", "cpu",
            "--run", "max_eval_examples=16", "--run", "measure_memory=false", "--out", str(tmp_path),
            "--json"]
    assert loop.main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert list(summary) == list(SUMMARY_KEYS) and summary["status"] == "ok"
    assert all(not isinstance(v, float) or math.isfinite(v) for v in summary.values())
    assert "epoch 1/1" in captured.err


def test_lst_fisher_init_runs_on_training_batches(tmp_path):
    """LST's Fisher-pruned init needs task data: the loop feeds it training examples after apply."""
    cfg = config("lst", method_config={"r": 4, "importance": "fisher", "fisher_examples": 8}, epochs=1)
    summary = train(cfg, tmp_path)
    assert summary["status"] == "ok", summary["error"]


def test_eval_subset_is_the_fixed_random_subset_shortest_first():
    import datasets
    import numpy as np

    rows = [[1] * (1 + (7 * i) % 13) for i in range(40)]
    split = datasets.Dataset.from_dict({"input_ids": rows, "labels": [i % 2 for i in range(40)]})
    picked = trial.eval_subset(split, 25)
    fixed = sorted(np.random.default_rng(0).permutation(40)[:25].tolist())  # the subset every trial evaluates
    assert sorted(map(tuple, picked["input_ids"])) == sorted(tuple(rows[i]) for i in fixed)
    lengths = [len(r) for r in picked["input_ids"]]
    assert lengths == sorted(lengths)  # one length per batch, about: little padding
    everything = trial.eval_subset(split, None)
    assert len(everything) == 40 and [len(r) for r in everything["input_ids"]] == sorted(len(r) for r in rows)
