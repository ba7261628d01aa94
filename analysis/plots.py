"""Figures for the notebooks, each saved as PNG next to the Parquet it was drawn from.

They draw the tables that `claims` computes, so a figure always shows the numbers a
verdict rests on. Every function returns the Figure and saves it when given a path.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

from analysis import claims

MARKERS = {"llama": "o", "bert": "s", "t5": "^"}


def _save(fig: Figure, path: str | Path | None) -> Figure:
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _colors(methods: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(sorted(methods))}


def parameter_scaling(counts: pd.DataFrame, path: str | Path | None = None) -> Figure:
    """Trainable parameters vs depth (along each depth ladder) and vs width (every default-config backbone)."""
    fig, (ax_l, ax_d) = plt.subplots(1, 2, figsize=(12, 4.5))
    c = counts[counts["config"] == "default"]
    colors = _colors(list(c["method"].unique()))
    ladders = claims.depth_fits(counts)
    for r in ladders.itertuples():
        ax_l.plot(r.layers, r.params, marker="o", color=colors[r.method],
                  label=f"{r.method} ({r.ladder}, slope {r.loglog_slope:.2f})")
    layers = sorted({x for r in ladders.itertuples() for x in r.layers})
    ax_l.set(xscale="log", yscale="log", xticks=layers, xlabel="blocks L (fixed width)", ylabel="trainable parameters (no head)",
             title="along depth")
    for (method, family), g in c.groupby(["method", "backbone_family"]):
        g = g.sort_values("width")
        ax_d.plot(g["width"], g["params_trainable"], marker=MARKERS.get(family, "x"), linestyle="none",
                  color=colors[method], label=f"{method} ({family})")
    ax_d.set(xscale="log", yscale="log", xlabel="width d", ylabel="trainable parameters (no head)",
             title="along width (all backbones)")
    for ax in (ax_l, ax_d):
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        if ax.has_data():
            ax.legend(fontsize=7)
    return _save(fig, path)


def convergence(table: pd.DataFrame, verdicts: list[claims.Verdict], path: str | Path | None = None) -> Figure:
    """Epochs-to-target per method and size (seeds as dots), and READ − other with bootstrap CIs."""
    fig, (ax_e, ax_d) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = _colors(list(table["method"].unique()))
    sizes = sorted(table["train_size"].dropna().unique())
    pos = {s: i for i, s in enumerate(sizes)}
    methods = sorted(table["method"].unique())
    width = 0.8 / max(len(methods), 1)
    for k, m in enumerate(methods):
        g = table[table["method"] == m]
        x = g["train_size"].map(pos) + (k - (len(methods) - 1) / 2) * width
        ax_e.scatter(x, g["epochs_to_target"], color=colors[m], alpha=0.6, s=18)
        means = g.groupby("train_size")["epochs_to_target"].mean()
        ax_e.scatter(means.index.map(pos) + (k - (len(methods) - 1) / 2) * width, means, color=colors[m],
                     marker="_", s=300, label=m)
    ax_e.set(xticks=range(len(sizes)), xticklabels=[str(int(s)) for s in sizes], xlabel="training examples",
             ylabel=f"epochs to {claims.TARGET_FRACTION:.0%} of best", title="epochs-to-target (dots: seeds)")
    ax_e.yaxis.set_major_locator(MaxNLocator(integer=True))
    scored = [v for v in verdicts if v.statistic is not None]
    others = sorted({v.details["comparator"] for v in scored})
    for k, other in enumerate(others):
        vs = [v for v in scored if v.details["comparator"] == other]
        x = np.array([pos.get(v.details["train_size"], 0) for v in vs]) + (k - (len(others) - 1) / 2) * 0.2
        y = np.array([v.statistic for v in vs])
        err = np.array([[v.statistic - v.ci[0], v.ci[1] - v.statistic] if v.ci else [0, 0] for v in vs]).T
        ax_d.errorbar(x, y, yerr=err, fmt="o", capsize=4, color=colors.get(other), label=f"read − {other}")
    ax_d.axhline(0, color="grey", lw=1)
    ax_d.set(xticks=range(len(sizes)), xticklabels=[str(int(s)) for s in sizes], xlabel="training examples",
             ylabel="difference in epochs (95% bootstrap CI)", title="paired differences")
    for ax in (ax_e, ax_d):
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    return _save(fig, path)


def memory_energy(verdicts: list[claims.Verdict], path: str | Path | None = None) -> Figure:
    """Measured change vs full FT (median, range over backbones) beside the paper's figure, per claim × source."""
    fig, ax = plt.subplots(figsize=(9, 0.5 * max(len(verdicts), 2) + 1.5))
    labels = []
    for i, v in enumerate(verdicts):
        labels.append(f"{v.claim} [{v.details['source']}]")
        ax.scatter(v.details["paper_change"] * 100, i, marker="|", s=300, color="black",
                   label="paper" if i == 0 else None)
        if v.statistic is None:
            ax.text(0, i, "  no data", va="center", fontsize=8, color="grey")
            continue
        lo, hi = v.details["range"]
        ax.errorbar(v.statistic * 100, i, xerr=[[100 * (v.statistic - lo)], [100 * (hi - v.statistic)]], fmt="o",
                    capsize=4, color="tab:green" if v.verdict == claims.SUPPORTED else "tab:red")
    highest = max([50.0] + [100 * v.details["range"][1] + 10 for v in verdicts if v.statistic is not None])
    ax.set(yticks=range(len(labels)), yticklabels=labels, xlabel="change vs full fine-tuning (%)",
           xlim=(-100, highest), title="memory and energy vs full FT (dot: median over settings, bar: range; |: paper)")
    ax.axvline(0, color="grey", lw=1)
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def pareto(best: pd.DataFrame, cost: str, path: str | Path | None = None) -> Figure:
    """Best metric per method vs a cost, one panel per backbone, the Pareto front joined by a line."""
    front_col = {"peak_memory_bytes": "front_memory", "params_trainable": "front_params"}[cost]
    scale = 2**20 if cost == "peak_memory_bytes" else 1  # memory in MiB
    backbones = sorted(best["backbone"].unique()) or ["(no finished trials)"]
    cols = min(len(backbones), 3)
    rows = int(np.ceil(len(backbones) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.8 * rows), squeeze=False)
    colors = _colors(list(best["method"].unique()))
    y = "mean" if "mean" in best else "best_metric"  # the confirm seeds' mean when there is one
    for ax, backbone in zip(axes.flat, backbones, strict=False):
        g = best[best["backbone"] == backbone].dropna(subset=[cost, y])
        for r in g.itertuples():
            x, v = getattr(r, cost) / scale, getattr(r, y)
            below = bool(getattr(r, "below_probe", False) is True)
            lo, hi = getattr(r, "ci_low", np.nan), getattr(r, "ci_high", np.nan)
            if not (pd.isna(lo) or pd.isna(hi)):  # bootstrap 95% CI over the confirm seeds
                ax.errorbar(x, v, yerr=[[v - lo], [hi - v]], color=colors[r.method], capsize=3, lw=1)
            ax.scatter(x, v, s=40, color="none" if below else colors[r.method], edgecolors=colors[r.method])
            ax.annotate(r.method + (" (<probe)" if below else ""), (x, v), fontsize=8, xytext=(3, 3),
                        textcoords="offset points")
        floor = g.loc[g["method"] == "probe", y]
        if len(floor):  # the linear probe: the floor every method must clear
            ax.axhline(float(floor.iloc[0]), color="grey", ls="--", lw=0.8, label="probe floor")
        front = g[g[front_col]].sort_values(cost)
        ax.step(front[cost] / scale, front[y], where="post", color="grey", lw=1)
        weights = set(g["weights"].dropna()) if "weights" in g else set()
        note = " (random weights)" if weights == {"random"} else ""
        ax.set(xscale="log" if len(g) and (g[cost] > 0).all() else "linear", title=f"{backbone}{note}",
               xlabel="peak memory (MiB)" if cost == "peak_memory_bytes" else "trainable parameters",
               ylabel=str(g["metric_name"].iloc[0]) if len(g) else "metric")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(backbones):]:
        ax.set_visible(False)
    return _save(fig, path)
