"""The intervals and verdict rules, checked by simulation: they must cover, and hold their error rate under the null.

Every simulation is seeded, so a failure is a property of the rule, not of the draw.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import claims
from study import quality

DRAWS = 4000


def _covers(n: int, interval) -> float:
    """Share of DRAWS normal samples of size n whose interval holds the true mean (0)."""
    rng = np.random.default_rng(n)
    hits = 0
    for sample in rng.normal(0.0, 1.0, size=(DRAWS, n)):
        lo, hi = interval(sample)
        hits += lo <= 0.0 <= hi
    return hits / DRAWS


def _percentile_bootstrap(values: np.ndarray, n_boot: int = 2000) -> tuple[float, float]:
    """The interval study.quality reported before schema 3: percentile bootstrap of the mean over seeds."""
    means = values[np.random.default_rng(0).integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


@pytest.mark.parametrize("n", [3, 5])
def test_t_interval_covers_95_percent_at_the_seeds_a_study_has(n):
    assert abs(_covers(n, quality.t_interval) - 0.95) <= 0.02


def test_the_percentile_bootstrap_over_3_seeds_was_their_range_and_covered_75_percent():
    old = _covers(3, _percentile_bootstrap)
    assert abs(old - 0.75) <= 0.03  # theory: 1 − 2·(1/2)³
    values = np.array([0.70, 0.71, 0.73])
    assert _percentile_bootstrap(values, 10_000) == pytest.approx((0.70, 0.73))  # [min, max]
    lo, hi = quality.t_interval(values)
    assert lo < 0.70 and hi > 0.73 and quality.t_interval([0.7]) is None


def test_paired_t_is_the_t_interval_of_the_differences_with_its_p_value():
    from scipy import stats

    a, b = [0.80, 0.82, 0.81], [0.70, 0.71, 0.72]
    d = quality.paired_t(a, b)
    assert d.n == 3 and d.mean == pytest.approx(0.1)
    assert d.ci == pytest.approx(quality.t_interval(np.subtract(a, b)))
    assert d.p == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert quality.paired_t([0.8], [0.7]).ci is None and quality.paired_t([], []) is None


# --------------------------------------------------------------------------- seeds + test examples

def _accuracy_draw(rng: np.random.Generator, p: np.ndarray, seeds: int, seed_sd: float, shift: float = 0.0
                   ) -> np.ndarray:
    """Correct (1) / wrong (0) per seed × test example: `p` is each example's P(correct), drawn with the test
    set from the population; each seed adds its own skill shift (training noise, sd `seed_sd`)."""
    u = rng.normal(0.0, seed_sd, seeds)[:, None]
    return (rng.random((seeds, len(p))) < p + shift + u).astype(float)


def test_seeds_and_examples_interval_covers_the_population_mean():
    """Seeds share one test set: the interval must cover the mean over new test sets too, not only new seeds."""
    rng, draws, m = np.random.default_rng(7), 800, 500
    hits = 0
    for _ in range(draws):
        correct = _accuracy_draw(rng, rng.uniform(0.45, 0.85, m), 3, 0.02)  # population mean 0.65
        lo, hi = quality.examples_interval(correct, np.ones(m), "accuracy", n_resamples=200,
                                           seed=int(rng.integers(2**31)))
        hits += lo <= 0.65 <= hi
    assert abs(hits / draws - 0.95) <= 0.03


def test_paired_seeds_and_examples_interval_of_a_difference_covers_it():
    """Seeds agree on most examples (as fine-tuned models do): the test sample, not the seeds, is the noise.

    Population: an example is easy (P(correct) 0.95) for method a with probability 0.7, else hard (0.05);
    method b matches a on 80% of examples and is flipped on the rest: true a − b = 0.68 − 0.608 = 0.072.
    """
    rng, draws, m = np.random.default_rng(8), 800, 500
    hits = seeds_only = 0
    for _ in range(draws):
        pa = np.where(rng.random(m) < 0.7, 0.95, 0.05)
        pb = np.where(rng.random(m) < 0.8, pa, 1.0 - pa)
        a, b = (_accuracy_draw(rng, p, 3, 0.01) for p in (pa, pb))
        lo, hi = quality.examples_interval(a, np.ones(m), "accuracy", other=b, n_resamples=200,
                                           seed=int(rng.integers(2**31)))
        hits += lo <= 0.072 <= hi
        t_lo, t_hi = quality.paired_t(a.mean(axis=1), b.mean(axis=1)).ci
        seeds_only += t_lo <= 0.072 <= t_hi
    assert abs(hits / draws - 0.95) <= 0.03
    assert seeds_only / draws < 0.90  # the seeds-only interval misses the test set's own noise


def test_examples_interval_for_a_metric_that_is_not_a_mean():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300).astype(float)
    preds = np.where(rng.random((3, 300)) < 0.8, labels, 1 - labels)
    lo, hi = quality.examples_interval(preds, labels, "mcc", n_resamples=100)
    from trainables.tasks import metric

    mean = np.mean([metric("mcc", p, labels) for p in preds])
    assert lo < mean < hi and hi - lo < 0.5
    assert quality.examples_interval(preds[:1], labels, "mcc") is None


# --------------------------------------------------------------------------- verdict rules under the null

def _table(rng: np.random.Generator, effects: dict[str, float], sd: float = 0.02, seeds: int = 3) -> pd.DataFrame:
    """Confirm rows of the probe and of each method (test score = 0.7 + effect + noise) on one backbone."""
    rows = []
    for method, effect in {"probe": 0.0, **effects}.items():
        for seed, score in enumerate(0.7 + effect + rng.normal(0.0, sd, seeds), start=1):
            rows.append({"trial_id": f"{method}-{seed}", "method": method, "backbone": "b", "task": "t",
                         "train_size": 100, "weights": "pretrained", "metric_name": "accuracy", "status": "ok",
                         "role": "confirm", "seed": seed, "test_metric": float(score), "final_metric": float(score),
                         "early_stopped": False, "peak_memory_bytes": 10, "params_trainable": 1})
    return pd.DataFrame(rows)


def test_floor_rule_on_null_tables_gives_a_definite_verdict_at_most_5_percent_of_the_time():
    """Four methods drawn from the probe's own distribution, 1,000 tables: Holm holds the family's error."""
    rng, tables = np.random.default_rng(11), 1000
    methods = {m: 0.0 for m in ("read", "lora", "lst", "full")}
    definite_tables = definite = 0
    for _ in range(tables):
        verdicts = [v.verdict for v in claims.floor_verdicts(_table(rng, methods))]
        hits = sum(v in (claims.SUPPORTED, claims.NOT_SUPPORTED) for v in verdicts)
        definite, definite_tables = definite + hits, definite_tables + (hits > 0)
    assert definite_tables / tables <= 0.05
    assert definite / (tables * len(methods)) <= 0.05


def test_floor_rule_finds_a_real_difference_in_either_direction():
    rng = np.random.default_rng(12)
    verdicts = {v.details["method"]: v for v in claims.floor_verdicts(
        _table(rng, {"read": 0.10, "lst": -0.10, "lora": 0.0}, sd=0.01))}
    assert verdicts["read"].verdict == claims.SUPPORTED and verdicts["lst"].verdict == claims.NOT_SUPPORTED
    assert verdicts["lora"].verdict == claims.INCONCLUSIVE
    assert verdicts["read"].details["family_size"] == 3
    assert verdicts["read"].details["p_holm"] >= verdicts["read"].details["p_value"]
    assert verdicts["read"].ci[0] > 0 and verdicts["read"].n == 3


def test_holm_and_decide():
    assert claims.holm([0.01, 0.04, 0.03, None, 0.005]) == pytest.approx([0.03, 0.06, 0.06, np.nan, 0.02],
                                                                         nan_ok=True)
    assert claims.holm([0.5, 0.9]) == [1.0, 1.0] and claims.holm([]) == []
    assert claims.decide(0.1, (0.02, 0.2), 0.01) == claims.SUPPORTED
    assert claims.decide(-0.1, (-0.2, -0.02), 0.01) == claims.NOT_SUPPORTED
    assert claims.decide(0.1, (-0.01, 0.2), 0.01) == claims.INCONCLUSIVE  # the interval spans zero
    assert claims.decide(0.1, (0.02, 0.2), 0.06) == claims.INCONCLUSIVE  # not significant after Holm
    assert claims.decide(None, None, None) == claims.INCONCLUSIVE


# --------------------------------------------------------------------------- unconfirmed cells, failed seeds

def test_an_unconfirmed_cell_is_off_the_fronts_and_out_of_the_floor_verdicts():
    table = _table(np.random.default_rng(1), {"read": 0.05}, sd=0.01)
    # full was only searched: its validation maximum (0.99) at the lowest cost would dominate every front
    search = {**table.iloc[0].to_dict(), "trial_id": "full-search", "method": "full", "role": "search", "seed": 0,
              "test_metric": None, "final_metric": 0.99, "peak_memory_bytes": 1, "params_trainable": 0}
    trials = pd.concat([table, pd.DataFrame([search])], ignore_index=True)
    q = claims.quality_per_cost(trials).set_index("method")
    assert not q.loc["full", "confirmed"] and pd.isna(q.loc["full", "mean"])
    assert q.loc["full", "search_best_val"] == 0.99 and q.loc["full", "cost_from"] == "search"
    assert not q.loc["full", "front_memory"] and not q.loc["full", "front_params"]
    assert q.loc["read", "front_memory"] and q.loc["read", "cost_from"] == "confirm"
    verdicts = {v.details["method"]: v for v in claims.floor_verdicts(trials)}
    assert verdicts["full"].verdict == claims.NO_DATA and "unconfirmed" in verdicts["full"].details["summary"]
    assert verdicts["read"].details["family_size"] == 1  # the unconfirmed cell is not in Holm's family
    row = next(r for r in quality.quality_rows(trials.to_dict("records")) if r["method"] == "full")
    assert quality.fmt(row) == "unconfirmed"
    assert quality.fmt(row, search=True) == "unconfirmed, search max (val) 0.99"


def test_a_diverged_confirm_seed_is_counted_and_shown_in_its_cell():
    table = _table(np.random.default_rng(2), {"read": 0.05}, sd=0.01)
    diverged = table["trial_id"] == "read-3"
    table.loc[diverged, ["status", "test_metric"]] = ["diverged", None]
    row = next(r for r in quality.quality_rows(claims._records(table)) if r["method"] == "read")
    assert row["seeds"] == 2 and row["seeds_failed"] == 1 and row["confirmed"]
    assert row["mean"] == pytest.approx(table.loc[(table["method"] == "read") & ~diverged, "test_metric"].mean())
    assert quality.fmt(row).endswith("(1 failed)")
    (v,) = claims.floor_verdicts(table)
    assert v.verdict == claims.INCONCLUSIVE and v.details["seeds_failed"] == 1
    assert "1 failed confirm seed" in v.details["summary"]


def test_quality_with_predictions_carries_the_seeds_and_examples_interval():
    rng, m = np.random.default_rng(4), 400
    p = rng.uniform(0.45, 0.85, m)
    table = _table(rng, {"read": 0.0})
    predictions = []
    for r in table.itertuples():  # label 1 for every example: prediction 1 is correct
        correct = _accuracy_draw(rng, p, 1, 0.0, shift=0.1 if r.method == "read" else 0.0)[0]
        table.loc[r.Index, "test_metric"] = correct.mean()
        predictions += [{"trial_id": r.trial_id, "example": j, "label": 1.0, "prediction": float(c)}
                        for j, c in enumerate(correct)]
    rows = {r["method"]: r for r in quality.quality_rows(claims._records(table), predictions)}
    read = rows["read"]
    assert read["ci_low_examples"] < read["mean"] < read["ci_high_examples"]
    (v,) = claims.floor_verdicts(table, pd.DataFrame(predictions))
    lo, hi = v.details["ci_seeds_and_examples"]
    assert lo < v.statistic < hi and lo > 0  # a 0.1 gain on 400 shared examples is clear of the test noise
