"""Selection on validation, reporting on test (issue 20): the searcher is told which trials ASHA stopped, each
method's winner is picked on what the searcher optimised, and confirm runs' test predictions are collected."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray import tune
from ray.tune import Result

from study import collect, confirm, schema
from study.launch import Group, GroupedSearch
from trainables.loop import PREDICTIONS_FILE
from trainables.ray_trainable import OBJECTIVE


def _result(group, lr, final, *, epochs_run=4, epochs=4, status="ok", best=None, path="/nowhere", checkpoint=None,
            trial_id=None, seed=0, **metrics):
    """A real Tune Result as a finished trial leaves it: its last report, carrying the trial's config."""
    run = {"method": group.split("|")[0], "backbone": "minilm-l6", "task": "vader-movies", "train_size": 800,
           "lr": lr, "seed": seed, "epochs": epochs}
    return Result(metrics={"status": status, "final_metric": final, "best_metric": best if best is not None else final,
                           "epochs_run": epochs_run, "metric_name": "accuracy", "trial_id": trial_id,
                           "config": {"group": group, "hp": {"lr": lr}, "run": run}, **metrics},
                  checkpoint=checkpoint, error=None, path=path)


# ----------------------------------------------------------------------------- the winner: what the searcher optimised


def test_best_runs_picks_the_best_final_metric_among_trials_that_ran_their_whole_budget():
    grid = [_result("read|m", 1e-3, 0.70, best=0.80),  # best over epochs is highest: not what was optimised
            _result("read|m", 3e-4, 0.74),
            _result("read|m", 2e-3, 0.78, epochs_run=2),  # ASHA stopped it at epoch 2: an earlier epoch's score
            _result("read|m", 1e-2, 0.99, status="diverged"),
            _result("lst|m", 1e-3, 0.60, epochs_run=1), _result("lst|m", 3e-3, 0.65, epochs_run=2),  # none ran it all
            _result("full|x", 1e-5, 0.9)]
    best = confirm.best_runs(grid, ["read|m", "lst|m"])
    assert best["read|m"]["run"]["lr"] == 3e-4 and best["read|m"]["hp"] == {"lr": 3e-4}
    assert best["lst|m"]["run"]["lr"] == 3e-3  # no trial ran its budget: the best final metric overall
    assert "full|x" not in best  # not a searched group (a cost-only run)


def test_confirm_runs_are_scored_on_the_test_split_with_fresh_seeds():
    searched = [Group("read|m", {}, {}, 3), Group("lst|m", {}, {}, 1)]
    best = confirm.best_runs([_result("read|m", 3e-4, 0.74), _result("lst|m", 1e-3, 0.6)], ["read|m", "lst|m"])
    groups = confirm.confirm_groups(searched, best, seeds=(1, 2, 3))
    assert [(g.name, g.run["seed"], g.run["lr"], g.n_trials) for g in groups[:3]] == [
        ("read|m|confirm-s1", 1, 3e-4, 1), ("read|m|confirm-s2", 2, 3e-4, 1), ("read|m|confirm-s3", 3, 3e-4, 1)]
    assert len(groups) == 6 and all(g.run["eval_test"] is True and not g.space for g in groups)


def test_rows_record_which_trials_asha_stopped():
    grid = [_result("read|m", 1e-3, 0.7, trial_id="a"), _result("read|m", 1e-3, 0.6, epochs_run=2, trial_id="b"),
            _result("read|m", 1e-3, 0.5, epochs_run=1, status="diverged", trial_id="c")]
    rows, _ = collect.rows_from_results("s", grid, {})
    assert [(r["trial_id"], r["early_stopped"]) for r in rows] == [("a", False), ("b", True), ("c", False)]
    table = schema.to_table(rows, schema.trial_schema(rows))
    assert table.column("early_stopped").to_pylist() == [False, True, False]


# ----------------------------------------------------------------------------- the searcher is told


def _search(n_trials=3, epochs=4):
    groups = [Group("read|m", {"method": "read", "epochs": epochs}, {"lr": FloatDistribution(1e-4, 1e-2, log=True)},
                    n_trials)]
    return GroupedSearch(groups, metric=OBJECTIVE, mode="max", seed=0)


def _report(search, trial_id, values):
    """Each epoch's result as Tune passes it on; the last one, the result its scheduler stopped the trial on
    (ASHA stops a trial at its budget too), Tune only hands to on_trial_complete: it is returned."""
    results = [{OBJECTIVE: v, "training_iteration": i, "epochs_run": i, "status": "ok"}
               for i, v in enumerate(values, start=1)]
    for result in results[:-1]:
        search.on_trial_result(trial_id, result)
    return results[-1]


def test_an_asha_stopped_trial_is_pruned_for_optuna_a_finished_one_complete():
    search = _search()
    for trial_id in ("full", "stopped", "crashed"):
        assert search.suggest(trial_id)["run"]["epochs"] == 4
    search.on_trial_complete("full", _report(search, "full", [0.6, 0.7, 0.72, 0.75]))
    search.on_trial_complete("stopped", _report(search, "stopped", [0.55, 0.58]))  # ASHA stopped it at epoch 2
    search.on_trial_complete("crashed", _report(search, "crashed", [0.5]), error=True)
    study = search.subs["read|m"]._ot_study
    states = {t.number: t for t in study.trials}
    full, stopped, crashed = states[0], states[1], states[2]
    assert full.state == TrialState.COMPLETE and full.value == pytest.approx(0.75)
    assert stopped.state == TrialState.PRUNED and stopped.last_step == 2
    assert stopped.intermediate_values == {1: 0.55, 2: 0.58}  # TPE ranks it by its step, then this value
    assert crashed.state == TrialState.FAIL


def test_a_trial_the_loop_ended_as_diverged_is_complete_at_the_failed_objective_not_pruned():
    search = _search(n_trials=1)
    search.suggest("t")
    _report(search, "t", [0.6])
    search.on_trial_complete("t", {OBJECTIVE: -1e9, "training_iteration": 2, "epochs_run": 1, "status": "diverged"})
    (trial,) = search.subs["read|m"]._ot_study.trials
    assert trial.state == TrialState.COMPLETE and trial.value == -1e9  # the searcher learns to avoid it


def test_a_searched_epoch_budget_decides_what_early_stopped_means():
    groups = [Group("g", {"method": "read", "epochs": 4},
                    {"lr": FloatDistribution(1e-4, 1e-2, log=True), "epochs": IntDistribution(2, 2)}, 1)]
    search = GroupedSearch(groups, metric=OBJECTIVE, mode="max")
    assert search.suggest("t")["run"]["epochs"] == 2
    search.on_trial_complete("t", _report(search, "t", [0.6, 0.7]))  # two of its own two epochs: complete
    assert search.subs["g"]._ot_study.trials[0].state == TrialState.COMPLETE


# ----------------------------------------------------------------------------- per-example test predictions


def _checkpoint_with_predictions(folder, n, with_file=True):
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"")
    if with_file:
        pq.write_table(pa.table({"example": pa.array(range(n), pa.int64()),
                                 "label": pa.array([float(i % 2) for i in range(n)]),
                                 "prediction": pa.array([1.0] * n)}), folder / PREDICTIONS_FILE)
    return tune.Checkpoint.from_directory(str(folder))


def test_prediction_rows_are_read_from_each_finished_trials_checkpoint(tmp_path):
    grid = [_result("read|m|confirm-s1", 3e-4, 0.7, seed=1, trial_id="t1",
                    checkpoint=_checkpoint_with_predictions(tmp_path / "t1" / "checkpoint_000003", 5)),
            _result("read|m|confirm-s2", 3e-4, 0.7, seed=2, trial_id="t2",  # an older run: no predictions file
                    checkpoint=_checkpoint_with_predictions(tmp_path / "t2" / "checkpoint_000003", 5, False)),
            _result("read|m|confirm-s3", 3e-4, 0.7, seed=3, trial_id="t3", status="oom",  # failed: left out
                    checkpoint=_checkpoint_with_predictions(tmp_path / "t3" / "checkpoint_000001", 5)),
            _result("read|m|confirm-s4", 3e-4, None, seed=4, trial_id="t4")]  # never checkpointed
    rows = collect.prediction_rows("s", grid)
    assert len(rows) == 5 and {r["trial_id"] for r in rows} == {"t1"}
    assert rows[3] == {"study": "s", "trial_id": "t1", "method": "read", "backbone": "minilm-l6",
                       "task": "vader-movies", "train_size": 800, "seed": 1, "metric_name": "accuracy",
                       "example": 3, "label": 1.0, "prediction": 1.0}
    written = pq.read_table(schema.write_predictions(rows, tmp_path / "predictions.parquet").local_path)
    assert written.schema.names == schema.PREDICTION_COLUMNS and written.num_rows == 5


def test_prediction_rows_read_through_the_checkpoints_own_filesystem(tmp_path):
    """Storage other than the local disk (S3): the checkpoint's path is only valid on its own filesystem."""
    _checkpoint_with_predictions(tmp_path / "exp" / "t1" / "checkpoint_000000", 3)
    fs = pafs.SubTreeFileSystem(str(tmp_path / "exp"), pafs.LocalFileSystem())
    grid = [_result("read|m|confirm-s1", 3e-4, 0.7, trial_id="t1",
                    checkpoint=tune.Checkpoint("t1/checkpoint_000000", filesystem=fs))]
    assert [r["example"] for r in collect.prediction_rows("s", grid)] == [0, 1, 2]


# ----------------------------------------------------------------------------- the printed summary


def _row(method, role="search", seed=0, status="ok", **kw):
    return {"study": "s", "method": method, "backbone": "minilm-l6", "task": "vader-movies", "train_size": 800,
            "metric_name": "accuracy", "weights": "pretrained", "status": status, "role": role, "seed": seed,
            "epochs": 4, **kw}


def test_summary_shows_test_scores_failures_and_what_the_search_consumed():
    trials = [_row("read", final_metric=0.74, epochs_run=4), _row("read", final_metric=0.80, epochs_run=2,
                                                                  early_stopped=True)]
    trials += [_row("read", "confirm", s, final_metric=0.7, test_metric=v) for s, v in ((1, 0.70), (2, 0.72))]
    trials += [_row("read", "confirm", 3, status="diverged")]
    trials += [_row("lst", final_metric=0.66, epochs_run=4)]  # searched, never confirmed
    lines = collect.summary_table(trials).splitlines()
    assert "test: mean [95% t-CI]" in lines[0] and "search max (val)" in lines[0]
    read = next(line for line in lines if line.startswith("read"))
    lst = next(line for line in lines if line.startswith("lst"))
    assert "0.710 [" in read and "2+1 failed" in read and " 0.740 " in read and "6 ep, 1 stopped" in read
    assert "0.800" not in read  # the early-stopped trial's epoch-2 score is not the search max
    assert "unconfirmed" in lst and " 0.660 " in lst and "4 ep, 0 stopped" in lst
    assert lines[-1] == collect.QUALITY_NOTE


def test_summary_has_a_line_per_training_size_when_a_study_has_several():
    rows = [_row("read", "confirm", s, train_size=n, final_metric=v, test_metric=v)
            for n, vs in ((64, (0.60, 0.66)), (512, (0.74, 0.75))) for s, v in enumerate(vs)]
    lines = collect.summary_table(rows).splitlines()[2:4]
    assert [line.split()[:3] for line in lines] == [["read", "minilm-l6", "n=64"], ["read", "minilm-l6", "n=512"]]
    assert " 0.630 " in lines[0] and " 0.745 " in lines[1]  # each size's own mean, not the other's
    assert "n=" not in collect.summary_table([_row("read", final_metric=0.7)])  # one size: no size column


def test_summary_flags_a_method_significantly_below_the_probe_but_never_a_random_weight_cost_run():
    trials = [_row(m, "confirm", s, final_metric=v, test_metric=v) for m, vs in
              (("probe", (0.70, 0.71, 0.72)), ("lst", (0.50, 0.55, 0.51))) for s, v in enumerate(vs, start=1)]
    # a random-weight cost run's metric means nothing: below its probe, it is not flagged
    trials += [_row(m, "confirm", 1, backbone="llama-11m", weights="random", final_metric=v, test_metric=v)
               for m, v in (("probe", 0.55), ("read", 0.47))]
    lines = collect.summary_table(trials).splitlines()
    assert "<probe" in next(line for line in lines if line.startswith("lst"))
    assert lines[-1] == "below the linear probe (under-tuned or broken): lst on minilm-l6"
