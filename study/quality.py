"""Quality with its uncertainty: each method's confirmed result as mean and bootstrap 95% CI over seeds.

A study searches each method (role `search`), then re-runs its best configuration with
fresh seeds (role `confirm`, study/confirm.py). The search winner's own score is biased
upward (it was selected as the maximum), so the reported quality is the confirm runs'
mean with a percentile bootstrap CI over the seeds. The linear probe is the floor: a method
whose mean falls below the probe's on the same backbone and task is flagged as under-tuned
or broken (`below_probe`). Written as `quality.parquet` beside trials.parquet (columns: study.schema).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

N_BOOT = 10_000
LEVEL = 0.95
FLOOR = "probe"
KEYS = ("method", "backbone", "task", "train_size")

def bootstrap_ci(values: Sequence[float] | np.ndarray, *, level: float = LEVEL, n_boot: int = N_BOOT,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean (seeded numpy; None below two values)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def quality_rows(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method × backbone × task × train size that finished (random weights too: `weights` says so)."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in trials:
        if r.get("status") != "ok" or r.get("best_metric") is None:
            continue
        role = r.get("role") or "search"
        groups.setdefault(tuple(r.get(k) for k in KEYS), {}).setdefault(role, []).append(r)
    out = []
    for key, by_role in groups.items():
        search, confirm = by_role.get("search", []), by_role.get("confirm", [])
        first = (confirm or search)[0]
        values = [r["best_metric"] for r in confirm] or [max(r["best_metric"] for r in search)]
        ci = bootstrap_ci(values)
        out.append({**dict(zip(KEYS, key, strict=True)), "study": first.get("study"), "weights": first.get("weights"),
                    "metric_name": first.get("metric_name"), "search_trials": len(search),
                    "search_best": max((r["best_metric"] for r in search), default=None), "seeds": len(confirm),
                    "mean": float(np.mean(values)), "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None,
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else None})
    floors = {(r["backbone"], r["task"], r["train_size"]): r["mean"] for r in out if r["method"] == FLOOR}
    for r in out:
        floor = floors.get((r["backbone"], r["task"], r["train_size"]))
        r["probe_mean"] = floor
        # random weights: a cost run, whose metric means nothing, is never "under-tuned"
        r["below_probe"] = (None if floor is None or r["method"] == FLOOR or r["weights"] == "random"
                            else bool(r["mean"] < floor))
    return sorted(out, key=lambda r: (str(r["backbone"]), -r["mean"]))


def fmt(row: dict[str, Any] | None) -> str:
    """`0.712 ± [0.701, 0.720]` (3 seeds), or the search best alone."""
    if row is None:
        return "-"
    if row.get("ci_low") is None:
        return f"{row['mean']:.3f}"
    return f"{row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
