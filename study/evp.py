"""Expected validation performance (Dodge et al. 2019, "Show Your Work"): how much tuning a method needs.

A method's search winner says how good it got with the whole budget; it does not say how
many trials it took. For each cell (method × backbone × task × train size) this gives the
expected best validation score of k trials drawn i.i.d. from that cell's observed search
trials, k = 1..N: with the N scores sorted v_(1) <= … <= v_(N),

    E[max_k] = Σ_i v_(i) · [(i/N)^k − ((i−1)/N)^k]

(the probability that the maximum of k draws with replacement is v_(i)), and its standard
deviation from E[max_k²] with the same weights. A curve that is flat from k = 1 belongs to a
method that any configuration of its space serves; one that only reaches its top at k = N
belongs to a method that needs tuning.

The score of a trial is its `final_metric`: the last validation metric it reported, the
quantity the searcher (ASHA + TPE) optimised and the winner is picked on. A trial that ASHA
stopped early scores what it had at the stop: that is the budget-aware reading Dodge et al.
use (a stopped trial consumed less budget and delivered that score). The trials of a TPE
search are not independent draws (later ones follow earlier ones), so the curve is the
expected best of k configurations drawn from the ones this search visited, not of an
independent random search. Random-weight (cost) runs, failed trials and confirm runs are
left out. Rows: `study.schema.EVP_FIELDS`, written as `evp.parquet` beside quality.parquet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

KEYS = ("method", "backbone", "task", "train_size")


def expected_max(scores: Sequence[float], k: int) -> tuple[float, float]:
    """(mean, standard deviation) of the maximum of k draws with replacement from `scores`."""
    v = np.sort(np.asarray(scores, dtype=float))
    n = len(v)
    if n == 0 or k < 1:
        raise ValueError(f"need at least one score and k >= 1 (got {n} scores, k={k})")
    i = np.arange(1, n + 1)
    weights = (i / n) ** k - ((i - 1) / n) ** k  # P(max of k draws = i-th smallest); sums to 1
    mean = float(weights @ v)
    second = float(weights @ v**2)
    return mean, math.sqrt(max(second - mean**2, 0.0))  # clipped: rounding can make a zero variance negative


def _is_search_score(r: dict[str, Any]) -> bool:
    score = r.get("final_metric")
    return (r.get("role") == "search" and r.get("status") == "ok" and r.get("weights") != "random"
            and score is not None and math.isfinite(score))


def evp_rows(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell with finished search trials: one row per k = 1..N (N = the cell's search trials)."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in trials:
        if _is_search_score(r):
            cells.setdefault((r.get("study"), *(r.get(k) for k in KEYS)), []).append(r)
    out = []
    for (study, *key), rows in sorted(cells.items(), key=lambda kv: (*map(str, kv[0][:4]), kv[0][4] or 0)):
        scores = [float(r["final_metric"]) for r in rows]
        cell = {"study": study, **dict(zip(KEYS, key, strict=True)), "metric_name": rows[0].get("metric_name"),
                "n_trials": len(scores)}
        for k in range(1, len(scores) + 1):
            mean, std = expected_max(scores, k)
            out.append({**cell, "k": k, "expected_best": mean, "std": std})
    return out
