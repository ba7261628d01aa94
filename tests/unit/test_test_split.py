"""Select on validation, report on test: the loop's test score, its per-example predictions, the chance
floor and the learning-rate schedule, live and from the activation cache.

Tiny random backbones on the synthetic task (test split: 64 examples of 4..16 tokens, so the
shortest-first order is not the file order); every cache lives under tmp_path.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from method_table import ROWS  # tests/unit/method_table.py: the one table

from study import prepare
from study.launch import Group
from trainables import cache, tasks
from trainables.backbones import get_spec
from trainables.loop import (
    PREDICTIONS_FILE,
    RunConfig,
    chance_metric,
    evaluate,
    load_checkpoint,
    seed_everything,
    train,
)
from trainables.trial import assemble, load_data

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def config(tmp_path: Path, method: str = "read", **overrides: Any) -> RunConfig:
    """2 epochs × 4 batches of 16 synthetic examples; caches (if any) under tmp_path."""
    method_config, lr = ROWS[method]
    values = dict(backbone="llama-tiny", method=method, method_config=method_config, lr=lr, task="synthetic",
                  train_size=64, max_length=16, epochs=2, batch_size=16, eval_batch_size=32, max_eval_examples=32,
                  device="cpu", measure_memory=False, cache=False, cache_dir=str(tmp_path / "cache"),
                  cache_dtype="fp32")
    return RunConfig(**(values | overrides))


class Recorder:
    """A `report` callable that notes each call and whether its checkpoint held predictions, and copies the
    last checkpoint away (what Ray Tune does: persist the folder to the study's storage)."""

    def __init__(self, into: Path):
        self.calls: list[tuple[dict[str, Any], bool]] = []
        self.into = into

    def __call__(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        has = checkpoint is not None and (checkpoint / PREDICTIONS_FILE).is_file()
        self.calls.append((dict(metrics), has))
        if checkpoint is not None:
            shutil.rmtree(self.into, ignore_errors=True)
            shutil.copytree(checkpoint, self.into)


def synthetic_test_split() -> datasets.Dataset:
    task, _ = load_data(RunConfig(backbone="llama-tiny", task="synthetic", max_length=16, train_size=64), get_spec("llama-tiny"))
    return task.test


def test_eval_test_scores_the_final_model_on_every_test_example(tmp_path):
    cfg = config(tmp_path, eval_test=True)
    rec = Recorder(tmp_path / "persisted")
    summary = train(cfg, tmp_path / "run", rec)
    assert summary["status"] == "ok", summary["error"]
    # only the last epoch's report carries the test score, and its checkpoint the predictions
    assert [(m["epoch"], m["test_metric"] is not None, has) for m, has in rec.calls] == [(1, False, False),
                                                                                      (2, True, True)]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["test_metric"] == summary["test_metric"]

    table = pq.read_table(tmp_path / "persisted" / PREDICTIONS_FILE)
    test = synthetic_test_split()
    assert table.column_names == ["example", "label", "prediction"]
    assert [str(t) for t in table.schema.types] == ["int64", "double", "double"]
    examples = table["example"].to_pylist()
    assert table.num_rows == len(test) == 64 and sorted(examples) == list(range(len(test)))
    assert examples != sorted(examples)  # scored shortest first; `example` still names the row of task.test
    assert table["label"].to_pylist() == [float(test["labels"][i]) for i in examples]
    accuracy = np.mean(np.array(table["prediction"]) == np.array(table["label"]))
    assert accuracy == summary["test_metric"]

    # the final model's own predictions, scored again in the file's row order, agree row by row
    seed_everything(cfg.seed)  # the same random backbone the run drew
    trial = assemble(cfg)
    trial.model.load_trainable_state_dict(load_checkpoint(tmp_path / "persisted")["model"])
    _, preds, labels = evaluate(trial, tasks.batches(test, 32, pad_token_id=trial.task.pad_token_id))
    by_row = dict(zip(examples, table["prediction"].to_pylist(), strict=True))
    assert [by_row[i] for i in range(len(test))] == preds.double().tolist()
    assert labels.tolist() == test["labels"]


def test_a_resumed_finished_run_keeps_its_test_score(tmp_path):
    cfg = config(tmp_path, eval_test=True, epochs=1)
    whole = train(cfg, tmp_path / "a")
    again = train(cfg, tmp_path / "b", resume_from=tmp_path / "a" / "checkpoint")
    assert again["status"] == "ok" and again["test_metric"] == whole["test_metric"] is not None


def test_without_eval_test_nothing_reads_the_test_split(tmp_path):
    rec = Recorder(tmp_path / "persisted")
    summary = train(config(tmp_path), tmp_path / "run", rec)
    assert summary["status"] == "ok" and summary["test_metric"] is None
    assert not any(has for _, has in rec.calls) and not (tmp_path / "persisted" / PREDICTIONS_FILE).exists()


def test_early_stopping_still_scores_the_model_it_ends_with(monkeypatch, tmp_path):
    # on the 32 validation examples: chance_metric (once, after assembly), then epochs 1, 2 (falls: patience 1
    # ends the run after epoch 2 of 4); the 64 test examples are scored for real
    values = iter([0.5, 0.6, 0.4])
    real = tasks.metric
    monkeypatch.setattr(tasks, "metric", lambda name, p, y: next(values) if len(y) == 32 else real(name, p, y))
    rec = Recorder(tmp_path / "persisted")
    summary = train(config(tmp_path, eval_test=True, epochs=4, early_stopping_patience=1), tmp_path / "run", rec)
    assert summary["epochs_run"] == 2 and summary["test_metric"] is not None
    assert (tmp_path / "persisted" / PREDICTIONS_FILE).is_file() and rec.calls[-1][1]


def test_chance_metric_is_the_training_majority_class_on_the_validation_examples(tmp_path):
    cfg = config(tmp_path, train_size=37, max_eval_examples=40)  # train: 19 of class 0, 18 of class 1
    summary = train(cfg, tmp_path / "run")
    trial = assemble(cfg)
    assert Counter(trial.task.train["labels"]) == {0: 19, 1: 18}
    assert Counter(trial.validation["labels"]) == {0: 24, 1: 16}
    assert summary["chance_metric"] == 24 / 40
    assert summary["steps_per_epoch"] == 3 and summary["lr_schedule"] == "linear"
    # the majority is the training split's, even where validation's differs
    ones = [i for i, y in enumerate(trial.task.train["labels"]) if y == 1]
    trial.task = dataclasses.replace(trial.task, train=trial.task.train.select(ones + [0]))
    assert chance_metric(trial) == 16 / 40


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_constant_schedule_holds_the_peak_lr_after_warmup(schedule, tmp_path):
    cfg = config(tmp_path, epochs=3, lr_schedule=schedule, warmup_ratio=0.25)  # warm-up: 3 of 12 steps
    summary = train(cfg, tmp_path / "run")
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "epochs.jsonl").read_text().splitlines()]
    assert summary["lr_schedule"] == schedule and len(lrs) == 3
    if schedule == "constant":
        assert lrs == pytest.approx([cfg.lr] * 3)
    else:  # the contrast: linear decays to zero at the budget's last step
        assert lrs[0] < cfg.lr and lrs[-1] == pytest.approx(0.0)


def test_cached_trial_gives_the_live_trials_test_predictions(tmp_path):
    cfg = config(tmp_path, eval_test=True)
    live = train(cfg, tmp_path / "live")
    built = train(config(tmp_path, eval_test=True, cache=True), tmp_path / "built")
    read = train(config(tmp_path, eval_test=True, cache=True), tmp_path / "read")
    assert live["status"] == built["status"] == read["status"] == "ok", (built["error"], read["error"])
    assert "test built" in built["cache_reason"] and read["cache_reason"] == "hit"
    assert live["test_metric"] == built["test_metric"] == read["test_metric"]
    tables = [pq.read_table(tmp_path / run / "checkpoint" / PREDICTIONS_FILE) for run in ("live", "built", "read")]
    assert tables[0].equals(tables[1]) and tables[0].equals(tables[2])


def test_prepare_builds_the_test_cache_an_eval_test_trial_reads(tmp_path):
    cfg = config(tmp_path, eval_test=True, cache=True)
    needs = prepare.needs_of(Group("g", cfg.to_dict(), {}, 1))
    assert sorted(n.key.split for n in needs) == ["test", "train", "validation"]
    assert sorted(n.key.split for n in prepare.needs_of(Group("g", config(tmp_path, cache=True).to_dict(), {}, 1))) \
        == ["train", "validation"]
    summary = train(cfg, tmp_path / "run")  # builds the caches it reads: exactly the ones prepare names
    assert summary["status"] == "ok" and "test built" in summary["cache_reason"]
    root = cache.trial_root(cfg)
    for need in needs:
        assert cache.verify(root / need.key.fingerprint(), need.key) is None, need.key.split
