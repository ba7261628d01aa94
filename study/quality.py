"""Quality with its uncertainty: each method's confirmed TEST score as a mean with an interval that covers.

A study searches each method on validation (role `search`), then re-runs the winner with fresh
seeds (role `confirm`, study/confirm.py), scoring each final model on the held-out test split.
The reported quality is the confirm seeds' mean test metric; the search's maximum is biased
upward (it was selected) and is only ever shown labelled "search max (val)". A cell without a
finished confirm seed is unconfirmed: no mean, out of fronts, floor and verdicts. Failed confirm
seeds are counted (`seeds_failed`), never silently averaged away.

Intervals are Student-t at the seeds a cell has: a percentile bootstrap over 3 seeds is their
[min, max] and covers 75%. With the confirm runs' predictions, `ci_*_examples` adds the test
set's own sampling noise (`examples_interval`). The linear probe is the floor: `below_probe` flags
a cell whose paired (by seed) difference method − probe has a 95% t-interval entirely below zero
(a per-cell flag; the floor verdicts in analysis.claims correct for the family with Holm).
Written as `quality.parquet` (columns: study.schema.QUALITY_FIELDS).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import stats

LEVEL = 0.95
N_RESAMPLES = 1000
FLOOR = "probe"
KEYS = ("method", "backbone", "task", "train_size")
Cell = tuple[Any, ...]


class Difference(NamedTuple):
    """A paired mean difference: its t-interval (None below 2 pairs) and two-sided p-value."""

    mean: float
    ci: tuple[float, float] | None
    p: float | None
    n: int


@functools.lru_cache(maxsize=256)
def _t(level: float, df: int) -> float:
    """Two-sided Student-t quantile (cached: tables ask for the same few degrees of freedom many times)."""
    return float(stats.t.ppf((1 + level) / 2, df))


def t_interval(values: Sequence[float] | np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """Student-t interval of the mean (None below two values): nominal coverage at any n for normal data."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return None
    half = _t(level, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def paired_t(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Difference | None:
    """mean(a − b) over pairs (seeds), its t-interval and the paired t-test's p-value (None: no pairs)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) == 0:
        return None
    mean = float(d.mean())
    if len(d) < 2:
        return Difference(mean, None, None, 1)
    se = d.std(ddof=1) / math.sqrt(len(d))
    p = float(2 * stats.t.sf(abs(mean) / se, len(d) - 1)) if se > 0 else float(mean == 0)
    return Difference(mean, t_interval(d, level), p, len(d))


def _per_example(metric_name: str, preds: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
    """Per-example scores whose mean is the metric (accuracy, neg_mse); None for a metric that is not a mean."""
    if metric_name == "accuracy":
        return (preds == labels).astype(float)
    if metric_name == "neg_mse":
        return -((preds - labels) ** 2)
    return None


def examples_interval(preds: np.ndarray, labels: np.ndarray, metric_name: str, other: np.ndarray | None = None, *,
                      level: float = LEVEL, n_resamples: int = N_RESAMPLES, seed: int = 0
                      ) -> tuple[float, float] | None:
    """Interval of the seed-averaged test metric (or of a paired difference) with evaluation-set noise in it.

    `preds` is seeds × test examples (one row per confirm seed, columns aligned on the example);
    `other`, when given, the compared cell's predictions for the same seeds, row by row. Every
    seed is scored on one shared test set, so their spread misses how much the mean would move
    on another test sample (Bouthillier et al. 2021). Two parts: s²_seeds / n (training noise),
    and the test-set noise the seeds share, from a bootstrap over test examples (one set of
    resampled indices for every seed and both methods: paired): the mean covariance between
    different seeds' resampled scores. That is the bootstrap variance of the seed-averaged metric
    less the seed × example part s²_seeds already holds; adding the whole of it counts that part
    twice. Each part's half-width is taken at its own degrees of freedom (t_{n−1}; t_{examples−1})
    and the two add in quadrature. Simulated at 3 and 5 seeds it covers 0.96–0.98; t_{n−1} on the
    plain sum covers ≈ 1.0, Welch–Satterthwaite's df ≈ 0.92 at 3 seeds. None below two seeds.
    """
    preds, labels = np.asarray(preds, dtype=float), np.asarray(labels, dtype=float)
    n, m = preds.shape
    if n < 2 or m == 0:
        return None
    sign = [(preds, 1.0)] + ([(np.asarray(other, dtype=float), -1.0)] if other is not None else [])
    idx = np.random.default_rng(seed).integers(0, m, size=(n_resamples, m))
    per = [(_per_example(metric_name, p, labels), s) for p, s in sign]
    if all(e is not None for e, _ in per):  # a mean over examples: vectorised
        e = sum(s * e for e, s in per)
        scores, boots = e.mean(axis=1), np.stack([row[idx].mean(axis=1) for row in e], axis=1)
    else:
        from trainables.tasks import metric  # local: torch is heavy, and only MCC-like metrics need it

        def seeds_on(rows: np.ndarray) -> list[float]:
            return [sum(s * metric(metric_name, p[i, rows], labels[rows]) for p, s in sign) for i in range(n)]

        scores, boots = np.array(seeds_on(np.arange(m))), np.array([seeds_on(rows) for rows in idx])
    cov = np.cov(boots, rowvar=False)
    shared = max(float(cov.sum() - np.trace(cov)) / (n * (n - 1)), 0.0)
    half = math.sqrt(_t(level, n - 1) ** 2 * scores.var(ddof=1) / n + _t(level, max(m - 1, 1)) ** 2 * shared)
    return float(scores.mean() - half), float(scores.mean() + half)


def predictions_by_trial(predictions: Iterable[dict[str, Any]]) -> dict[str, tuple[np.ndarray, ...]]:
    """trial_id → (example, label, prediction) arrays sorted by example (rows: study.schema.PREDICTION_FIELDS)."""
    out: dict[str, list[tuple[int, float, float]]] = {}
    for r in predictions:
        out.setdefault(str(r["trial_id"]), []).append((int(r["example"]), float(r["label"]), float(r["prediction"])))
    return {t: tuple(np.array(c) for c in zip(*sorted(rows), strict=True)) for t, rows in out.items()}


def stacked(by_trial: dict[str, tuple[np.ndarray, ...]], trial_ids: Sequence[str]
            ) -> tuple[np.ndarray, np.ndarray] | None:
    """(predictions trials × examples, labels) when every trial has predictions on the same examples, else None."""
    if not trial_ids or any(str(t) not in by_trial for t in trial_ids):
        return None
    first = by_trial[str(trial_ids[0])]
    rows = [by_trial[str(t)] for t in trial_ids]
    if any(len(r[0]) != len(first[0]) or (r[0] != first[0]).any() or (r[1] != first[1]).any() for r in rows):
        return None
    return np.stack([r[2] for r in rows]), first[1]


def confirm_runs(trials: Iterable[dict[str, Any]]) -> dict[Cell, dict[int, dict[str, Any]]]:
    """Cell → seed → its finished confirm row (status ok, with a test score): what means and pairs are made of."""
    out: dict[Cell, dict[int, dict[str, Any]]] = {}
    for r in trials:
        if r.get("role") == "confirm" and _finished(r):
            out.setdefault(tuple(r.get(k) for k in KEYS), {})[r.get("seed")] = r
    return out


def _finished(row: dict[str, Any]) -> bool:
    return row.get("status") == "ok" and row.get("test_metric") is not None


def quality_rows(trials: list[dict[str, Any]], predictions: Iterable[dict[str, Any]] | None = None
                 ) -> list[dict[str, Any]]:
    """One row per method × backbone × task × train size that ran (random weights too: `weights` says so).

    A cell is confirmed when at least one confirm seed finished with a test score; confirm rows
    of any other status (failed, diverged, oom, interrupted, or no test score) are `seeds_failed`.
    """
    groups: dict[Cell, dict[str, list[dict]]] = {}
    for r in trials:
        if r.get("status") != "estimated":  # planned rows never ran
            role = "confirm" if r.get("role") == "confirm" else "search"
            groups.setdefault(tuple(r.get(k) for k in KEYS), {}).setdefault(role, []).append(r)
    runs, by_trial = confirm_runs(trials), predictions_by_trial(predictions or [])
    out = []
    for key, by_role in groups.items():
        search, confirm = by_role.get("search", []), by_role.get("confirm", [])
        seeds = runs.get(key, {})
        first = (confirm or search)[0]
        test = [r["test_metric"] for r in seeds.values()]
        ci = t_interval(test)
        finished = [r for r in search if r.get("status") == "ok" and r.get("final_metric") is not None]
        full = [r for r in finished if not r.get("early_stopped")] or finished  # the winner's pool: ran its budget
        stack = stacked(by_trial, [r.get("trial_id") for r in seeds.values()]) if by_trial else None
        ex = examples_interval(*stack, str(first.get("metric_name"))) if stack else None
        out.append({**dict(zip(KEYS, key, strict=True)), "study": first.get("study"), "weights": first.get("weights"),
                    "metric_name": first.get("metric_name"), "search_trials": len(search),
                    "search_best_val": max((r["final_metric"] for r in full), default=None),
                    "search_epochs": sum(r.get("epochs_run") or 0 for r in search),
                    "search_stopped": sum(bool(r.get("early_stopped")) for r in search),
                    "confirmed": bool(seeds), "seeds": len(seeds), "seeds_failed": sum(not _finished(r) for r in confirm),
                    "val_mean": _mean([r.get("final_metric") for r in seeds.values()]), "mean": _mean(test),
                    "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None,
                    "std": float(np.std(test, ddof=1)) if len(test) > 1 else None,
                    "ci_low_examples": ex[0] if ex else None, "ci_high_examples": ex[1] if ex else None})
    cells = {tuple(r[k] for k in KEYS): r for r in out}
    for r in out:
        floor_key = (FLOOR, r["backbone"], r["task"], r["train_size"])
        floor = cells.get(floor_key)
        r["probe_mean"] = floor["mean"] if floor else None
        # random weights: a cost run, whose metric means nothing, is never "under-tuned"
        diff = (None if floor is None or r["method"] == FLOOR or r["weights"] == "random"
                else paired_seeds(runs.get(tuple(r[k] for k in KEYS), {}), runs.get(floor_key, {})))
        r["below_probe"] = None if diff is None or diff.ci is None else bool(diff.ci[1] < 0)
    return sorted(out, key=lambda r: (str(r["backbone"]), str(r["task"]), r["train_size"] or 0, not r["confirmed"],
                                      -(r["mean"] or 0.0), str(r["method"])))


def paired_seeds(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> Difference | None:
    """Test-metric difference a − b over the confirm seeds both cells finished."""
    shared = sorted(set(a) & set(b))
    return paired_t([a[s]["test_metric"] for s in shared], [b[s]["test_metric"] for s in shared])


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def fmt(row: dict[str, Any] | None, search: bool = False) -> str:
    """`0.712 [0.690, 0.734]` for a confirmed cell, else `unconfirmed` (with the labelled search max if asked)."""
    if row is None:
        return "-"
    if row.get("confirmed"):
        text = f"{row['mean']:.3f}" + ("" if row.get("ci_low") is None
                                       else f" [{row['ci_low']:.3f}, {row['ci_high']:.3f}]")
    else:
        text = "unconfirmed"
        if search and row.get("search_best_val") is not None:
            text += f", search max (val) {row['search_best_val']:.2f}"
    return text + (f" ({row['seeds_failed']} failed)" if row.get("seeds_failed") else "")
