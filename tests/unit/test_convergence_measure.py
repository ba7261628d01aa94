"""The convergence measure and its verdict rule (analysis.convergence) on planted tables and simulated data.

Planted tables go through `study.schema` and back, so they are real schema Parquet. The null-data
simulation runs the rule exactly as `convergence_verdicts` does (compare → judge: permutation
log-rank, Holm, claims.decide) on two methods with one step distribution.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import claims
from analysis import convergence as cv
from study import schema

SPE = {32: 2, 64: 4, 256: 16}  # steps per epoch at batch size 16


def trial(trial_id: str, method: str, size: int, seed: int, metrics: list[float], *, chance: float = 0.5,
          task: str = "synthetic", backbone: str = "llama-tiny", status: str = "ok", **values) -> dict:
    return {"study": "planted", "trial_id": trial_id, "method": method, "backbone": backbone, "task": task,
            "status": status, "train_size": size, "seed": seed, "epochs": 6, "batch_size": 16,
            "metric_name": "accuracy", "chance_metric": chance, "steps_per_epoch": SPE[size],
            "final_metric": metrics[-1] if metrics else None, "lr_schedule": "constant", **values}


def epoch_rows(trial_id: str, method: str, metrics: list[float], backbone: str = "llama-tiny") -> list[dict]:
    return [{"study": "planted", "trial_id": trial_id, "method": method, "backbone": backbone, "epoch": e,
             "eval_metric": m, "metric_name": "accuracy"} for e, m in enumerate(metrics, start=1)]


def roundtrip(tmp_path: Path, trials: list[dict], epochs: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    schema.write_trials(trials, tmp_path / "trials.parquet")
    schema.write_epochs(epochs, tmp_path / "epochs.parquet")
    return claims.read_trials(tmp_path), claims.read_epochs(tmp_path)


def curve(reach: int | None, top: float = 0.85, epochs: int = 6) -> list[float]:
    """Accuracy from 0.55 rising linearly to `top` at epoch `reach` (1-based), flat after; None: flat at 0.52."""
    if reach is None:
        return [0.50, 0.51, 0.52, 0.52, 0.52, 0.52][:epochs]
    return [0.55 + (top - 0.55) * min(e, reach) / reach for e in range(1, epochs + 1)]


def study(reach: dict[str, list[int | None]], sizes=(32, 64), task: str = "synthetic") -> tuple[list, list]:
    """Trials and epochs: per size and method, one trial per seed reaching its plateau at reach[method][seed]."""
    trials, epochs = [], []
    for size in sizes:
        for method, per_seed in reach.items():
            for seed, r in enumerate(per_seed):
                tid = f"{method}-{task}-{size}-{seed}"
                metrics = curve(r)
                trials.append(trial(tid, method, size, seed, metrics, task=task))
                epochs += epoch_rows(tid, method, metrics)
    return trials, epochs


# --------------------------------------------------------------------------- the measure

def test_flat_non_learner_is_censored_not_fast(tmp_path):
    rows = [trial("flat", "read", 64, 0, [0.50, 0.51, 0.52, 0.52, 0.52, 0.52]),
            trial("learner", "lora", 64, 0, [0.60, 0.70, 0.75, 0.78, 0.80, 0.80])]
    epochs = (epoch_rows("flat", "read", [0.50, 0.51, 0.52, 0.52, 0.52, 0.52])
              + epoch_rows("learner", "lora", [0.60, 0.70, 0.75, 0.78, 0.80, 0.80]))
    table = cv.trial_table(*roundtrip(tmp_path, rows, epochs)).set_index("trial_id")
    assert table["threshold"].tolist() == pytest.approx([0.5 + 0.9 * (0.80 - 0.5)] * 2)  # 0.77
    flat, learner = table.loc["flat"], table.loc["learner"]
    assert not flat["reached"] and flat["steps_to_threshold"] == flat["budget_steps"] == 6 * 4
    assert flat["epochs_to_threshold"] == 6  # censored at the budget: never "1 epoch"
    assert learner["reached"] and learner["epochs_to_threshold"] == 4 and learner["steps_to_threshold"] == 16
    assert flat["norm_auc"] < 0.1 < 0.5 < learner["norm_auc"]


def test_reaching_at_epoch_2_is_two_epochs_of_steps(tmp_path):
    metrics = [0.6, 0.9, 0.9, 0.9, 0.9, 0.9]
    rows = [trial("t", "read", 256, 0, metrics, steps_per_epoch=13)]
    table = cv.trial_table(*roundtrip(tmp_path, rows, epoch_rows("t", "read", metrics)))
    (r,) = table.itertuples()
    assert r.reached and r.epochs_to_threshold == 2 and r.steps_to_threshold == 2 * 13
    assert r.norm_auc == pytest.approx(np.mean([(m - 0.5) / (0.5 + 0.9 * 0.4 - 0.5) for m in metrics]))


def test_one_threshold_per_backbone_task_and_size(tmp_path):
    trials, epochs = study({"read": [4, 5, 4], "lora": [1, 2, 1]}, sizes=(32, 64))
    more_t, more_e = study({"read": [2, 2, 2], "lora": [3, 3, 3]}, sizes=(32,), task="other")
    for r in more_t:  # another task, another best: its own threshold
        r["final_metric"] = 0.75
    trials, epochs = roundtrip(tmp_path, trials + more_t, epochs + more_e)
    th = cv.thresholds(trials)
    assert len(th) == 3 and not th.duplicated(cv.CELL).any()
    table = cv.trial_table(trials, epochs)
    assert (table.groupby(cv.CELL)["threshold"].nunique() == 1).all()
    by = th.set_index(["task", "train_size"])["threshold"]
    assert by[("synthetic", 32)] == pytest.approx(0.5 + 0.9 * 0.35)
    assert by[("other", 32)] == pytest.approx(0.5 + 0.9 * 0.25)


def test_no_method_above_chance_gives_no_threshold_and_no_data(tmp_path):
    trials, epochs = study({"read": [None, None, None], "lora": [None, None, None]}, sizes=(32,))
    for r in trials:  # the majority class scores 0.55 here: the flat curves (<= 0.52) never beat it
        r["chance_metric"] = 0.55
    trials, epochs = roundtrip(tmp_path, trials, epochs)
    (row,) = cv.thresholds(trials).itertuples()
    assert np.isnan(row.threshold) and "above chance" in row.why
    (v,) = cv.convergence_verdicts(trials, epochs)
    assert v.verdict == claims.NO_DATA and "above chance" in v.details["summary"]


# --------------------------------------------------------------------------- the statistics

def test_logrank_statistic_and_permutation_p_match_scipy():
    rng = np.random.default_rng(3)
    for n in (4, 5, 6):
        a, b = rng.integers(1, 8, n).astype(float), rng.integers(1, 8, n).astype(float)
        ra, rb = a < 7, b < 7
        ref = stats.logrank(stats.CensoredData(uncensored=a[ra], right=a[~ra]),
                            stats.CensoredData(uncensored=b[rb], right=b[~rb]))
        z, p = cv.logrank_test(a, ra, b, rb)
        assert z == pytest.approx(ref.statistic)
        x, y = np.where(ra, a, np.inf), np.where(rb, b, np.inf)
        exact = stats.permutation_test((x, y), cv.logrank_z, permutation_type="independent", vectorized=True,
                                       n_resamples=cv.PERMUTATIONS).pvalue
        assert p == pytest.approx(exact)


def test_km_median_counts_censored_trials_as_not_yet_there():
    assert cv.km_median([16, 16, 24, 24], [True, True, False, False]) == 16  # S(16) = 1/2
    assert cv.km_median([16, 24, 24, 24], [True, False, False, False]) is None  # never falls to 1/2: > budget
    assert cv.km_median([8, 16, 24], [True, True, True]) == 16


def null_rate(rng: np.random.Generator, sims: int, seeds: int, sizes: int, probs: list[float]) -> float:
    """Share of simulations with any definite verdict when both methods share one step distribution."""
    p = np.array(probs) / sum(probs)
    definite = 0
    for _ in range(sims):
        comparisons = []
        for size in range(sizes):
            frames = []
            for _method in range(2):
                epoch = rng.choice(len(p), size=seeds, p=p) + 1  # the last category: never within the budget
                reached = epoch < len(p)
                frames.append(pd.DataFrame({"seed": np.arange(seeds), "reached": reached,
                                            "steps_to_threshold": np.minimum(epoch, len(p) - 1) * (size + 1) * 4.0,
                                            "norm_auc": rng.normal(0.7, 0.1, seeds)}))
            comparisons.append(cv.compare(*frames))
        definite += any(v != claims.INCONCLUSIVE for v in cv.judge(comparisons))
    return definite / sims


def test_rule_on_null_data_is_definite_at_most_5_percent():
    rng = np.random.default_rng(2026)
    t0 = time.perf_counter()
    # 5 seeds per method, 3 sizes, Holm over the 3: a step distribution with censoring at the budget
    rate = null_rate(rng, 500, seeds=5, sizes=3, probs=[0.1, 0.2, 0.25, 0.2, 0.1, 0.05, 0.1])
    elapsed = time.perf_counter() - t0
    assert rate <= 0.05, rate
    assert elapsed < 60, elapsed  # ~5 s on one free core


def test_clearly_slower_read_is_supported_and_faster_read_not(tmp_path):
    slow = {"read": [5, 5, 6, 5, None], "lora": [1, 1, 2, 1, 1]}
    trials, epochs = roundtrip(tmp_path, *study(slow, sizes=(32, 64, 256)))
    verdicts = cv.convergence_verdicts(trials, epochs)
    assert [v.details["train_size"] for v in verdicts] == [32, 64, 256]
    for v in verdicts:
        assert v.verdict == claims.SUPPORTED and v.ci[0] > 0 and v.n == 5
        d = v.details
        assert d["p_logrank"] <= d["p_holm"] <= 3 * d["p_logrank"] + 1e-12
        assert d["p_holm"] < 0.05 and d["family_size"] == 3 and d["logrank_z"] < 0
        assert d["censored_read"] == 1 and d["censored_lora"] == 0
        assert d["km_median_steps_lora"] == SPE[d["train_size"]] and d["km_median_steps_read"] == 5 * SPE[d["train_size"]]
        assert d["threshold"] == pytest.approx(0.5 + 0.9 * 0.35) and d["rule"] == cv.RULE
        assert d["norm_auc_difference"] > 0 and "summary" in d and "p_logrank_asymptotic" in d
        assert claims.verdict_problems(v.as_dict()) == []
    fast = {"read": [1, 1, 2, 1, 1], "lora": [5, 5, 6, 5, None]}
    verdicts = cv.convergence_verdicts(*roundtrip(tmp_path, *study(fast, sizes=(32, 64, 256))))
    assert {v.verdict for v in verdicts} == {claims.NOT_SUPPORTED}


def test_three_seeds_or_mixed_evidence_is_inconclusive(tmp_path):
    # 3 seeds each: the smallest exact two-sided log-rank p is 0.1, so no verdict can be definite
    trials, epochs = roundtrip(tmp_path, *study({"read": [5, 5, 5], "lora": [1, 1, 1]}, sizes=(32,)))
    (v,) = cv.convergence_verdicts(trials, epochs)
    assert v.verdict == claims.INCONCLUSIVE and v.statistic > 0 and v.details["p_logrank"] >= 0.05
    # same steps for both: the interval is [0, 0], spanning zero
    trials, epochs = roundtrip(tmp_path, *study({"read": [2] * 5, "lora": [2] * 5}, sizes=(32,)))
    (v,) = cv.convergence_verdicts(trials, epochs)
    assert v.verdict == claims.INCONCLUSIVE and v.statistic == 0


def test_failures_diverged_and_settings_are_recorded(tmp_path):
    trials, epochs = study({"read": [5, 5, 6, 5, 5], "lora": [1, 1, 2, 1, 1]}, sizes=(32,))
    trials[0].update(status="diverged")  # read seed 0 stops after epoch 2, below the threshold
    epochs = [e for e in epochs if not (e["trial_id"] == trials[0]["trial_id"] and e["epoch"] > 2)]
    trials.append(trial("oom", "read", 32, 9, [], status="oom"))
    for r in trials:
        r["hp.tuned_from"] = "results/scaling" if r["method"] == "read" else "reference"
    (v,) = cv.convergence_verdicts(*roundtrip(tmp_path, trials, epochs))
    d = v.details
    assert d["excluded_failures"] == {"read: oom": 1}
    assert d["censored_read"] == 1  # the diverged trial never reached: censored at the budget, not dropped
    assert d["tuned_from"] == {"lora": ["reference"], "read": ["results/scaling"]}


# --------------------------------------------------------------------------- the study's settings

def scaling_row(trial_id: str, method: str, role: str, backbone: str = "minilm-l6", n: int = 640, **hp) -> dict:
    return {"study": "scaling", "trial_id": trial_id, "method": method, "backbone": backbone, "task": "vader-movies",
            "train_size": n, "role": role, "status": "ok", **{f"hp.{k}": v for k, v in hp.items()}}


def test_convergence_runs_each_method_at_its_confirmed_winner(tmp_path):
    from argparse import Namespace

    from study import convergence as study_convergence
    from trainables import loop

    rows = [scaling_row(f"r{s}", "read", "confirm", lr=1e-3, **{"m.scale": 2.5, "m.hidden_size": 128})
            for s in (1, 2, 3)]
    rows += [scaling_row("r-search", "read", "search", lr=3e-4, **{"m.scale": 0.2, "m.hidden_size": 64}),
             scaling_row("r-other", "read", "confirm", backbone="llama-11m", lr=3e-2),
             scaling_row("l1", "lora", "confirm", n=128, lr=5e-4, **{"m.r": 4}),
             scaling_row("l2", "lora", "confirm", n=600, lr=2e-4, **{"m.r": 16})]
    schema.write_trials(rows, tmp_path / "trials.parquet")
    settings = study_convergence.tuned_settings(str(tmp_path), ["read", "lora", "adapter"], "minilm-l6",
                                                "vader-movies", [64, 512])
    assert settings[("read", 64)] == {"lr": 1e-3, "m.scale": 2.5, "m.hidden_size": 128,
                                      "tuned_from": f"{tmp_path} (n=640)"}
    assert type(settings[("read", 64)]["m.hidden_size"]) is int  # the method config takes an int
    assert settings[("lora", 64)]["m.r"] == 4 and settings[("lora", 512)]["m.r"] == 16  # the nearest size's winner
    assert settings[("adapter", 512)] == {"tuned_from": "reference"}

    args = Namespace(sizes=[64, 512], seeds=[0, 1], backbone="minilm-l6", task="vader-movies", text_col="text",
                     label_col="label", epochs=6, batch_size=16, max_eval_examples=500)
    groups = study_convergence.build_groups(args, ["read", "lora", "adapter"], settings, {"cpu": 1}, 32)
    assert len(groups) == 2 * 2 * 3
    for g in groups:
        cfg = loop.RunConfig.from_dict(g.run)
        loop.validate(cfg)
        assert cfg.lr_schedule == "constant" and cfg.eval_test
        expected = settings[(cfg.method, cfg.train_size)]
        assert cfg.lr == expected.get("lr")  # None: the method's reference lr
        assert cfg.method_config == {k[2:]: v for k, v in expected.items() if k.startswith("m.")}

    ran = [{"method": "read", "train_size": 64, "status": "ok"}, {"method": "adapter", "train_size": 512, "status": "ok"}]
    ran = study_convergence.with_settings(ran, settings)
    assert ran[0]["hp.tuned_from"] == f"{tmp_path} (n=640)" and ran[0]["hp.m.scale"] == 2.5
    assert ran[1]["hp.tuned_from"] == "reference"
