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
from analysis import convergence as cv

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
    """Per cell (backbone, task, size): Kaplan–Meier curves of the share of trials not yet at the cell's
    threshold vs optimisation steps (|: a censored trial, at the budget), and the normalised AUC per method.

    `table` is analysis.convergence.trial_table; the verdicts name each panel's comparisons.
    """
    cells = sorted(table.groupby(cv.CELL).groups, key=lambda k: (str(k[0]), str(k[1]), k[2]))
    cols = len(cells) + 1
    fig, axes = plt.subplots(1, cols, figsize=(4.2 * cols, 4.2), squeeze=False)
    colors = _colors(list(table["method"].unique()))
    for ax, (backbone, task, size) in zip(axes.flat, cells, strict=False):
        g = table[(table["backbone"] == backbone) & (table["task"] == task) & (table["train_size"] == size)]
        for method, m in g.groupby("method"):
            steps, reached = m["steps_to_threshold"].to_numpy(float), m["reached"].to_numpy(bool)
            x, y = cv.km_curve(steps, reached)
            x, y = np.append(x, m["budget_steps"].max()), np.append(y, y[-1])
            ax.step(x, y, where="post", color=colors[method], label=f"{method} ({int(reached.sum())}/{len(m)})")
            if (~reached).any():
                ax.scatter(steps[~reached], np.full((~reached).sum(), y[-1]), marker="|", s=150, color=colors[method])
        said = [f"{v.scope.rsplit(': ', 1)[-1]}: {v.verdict}" for v in verdicts
                if v.details.get("train_size") == size and v.details.get("backbone") == backbone
                and v.details.get("task") == task]
        ax.set(xlabel="optimisation steps", ylabel="share not yet at the threshold", ylim=(-0.03, 1.03),
               title=f"{backbone} · {task} · n={size}\nthreshold {g['threshold'].iloc[0]:.3f}")
        if said:
            ax.text(0.02, 0.02, "\n".join(said), transform=ax.transAxes, fontsize=7, va="bottom")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, title="method (reached/trials)", title_fontsize=7, loc="upper right")
    ax = axes.flat[-1]
    auc = cv.auc_table(table)
    labels = [f"{b}·{t}·{n}" for b, t, n in cells]
    pos = {cell: i for i, cell in enumerate(cells)}
    methods = sorted(auc["method"].unique())
    width = 0.8 / max(len(methods), 1)
    for k, method in enumerate(methods):
        a = auc[auc["method"] == method]
        x = np.array([pos[(r.backbone, r.task, r.train_size)] for r in a.itertuples()]) + (
            k - (len(methods) - 1) / 2) * width
        err = np.array([[r.norm_auc - r.ci_low, r.ci_high - r.norm_auc] if pd.notna(r.ci_low) else [0.0, 0.0]
                        for r in a.itertuples()]).reshape(-1, 2).T
        ax.errorbar(x, a["norm_auc"], yerr=err, fmt="o", capsize=3, color=colors[method], label=method)
    ax.axhline(0, color="grey", lw=1)
    ax.axhline(1, color="grey", lw=1, ls="--")
    ax.set(xticks=range(len(cells)), xticklabels=labels, ylabel="normalised AUC (0 chance, 1 threshold)",
           title="area under the learning curve (95% t-CI)")
    ax.tick_params(axis="x", labelsize=7, rotation=20)
    ax.grid(True, alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=7)
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
    """Confirmed test mean per method vs a cost, one panel per backbone (× task and size where there are several),
    the Pareto front joined by a line; unconfirmed cells (no confirm seeds) are not drawn."""
    front_col = {"peak_memory_bytes": "front_memory", "params_trainable": "front_params"}[cost]
    scale = 2**20 if cost == "peak_memory_bytes" else 1  # memory in MiB
    best = best.assign(panel=best["backbone"].astype(str))
    if best[["task", "train_size"]].drop_duplicates().shape[0] > 1:
        best["panel"] += " · " + best["task"].astype(str) + " · n=" + best["train_size"].astype(str)
    backbones = sorted(best["panel"].unique()) or ["(no finished trials)"]
    cols = min(len(backbones), 3)
    rows = int(np.ceil(len(backbones) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.8 * rows), squeeze=False)
    colors = _colors(list(best["method"].unique()))
    y = "mean"  # the confirm seeds' test mean: null for an unconfirmed cell, which is left out
    for ax, backbone in zip(axes.flat, backbones, strict=False):
        g = best[best["panel"] == backbone].dropna(subset=[cost, y])
        for r in g.itertuples():
            x, v = getattr(r, cost) / scale, getattr(r, y)
            below = bool(getattr(r, "below_probe", False) is True)
            lo, hi = getattr(r, "ci_low", np.nan), getattr(r, "ci_high", np.nan)
            if not (pd.isna(lo) or pd.isna(hi)):  # Student-t 95% CI over the confirm seeds
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


def _order(value: object) -> tuple[int, float, str]:
    """Sort key: numbers by value (training sizes 64 < 128), then everything else by name."""
    if isinstance(value, int | float | np.integer | np.floating) and not pd.isna(value):
        return 0, float(value), ""
    return 1, 0.0, str(value)


def evp_plot(evp: pd.DataFrame, out_path: str | Path | None = None) -> Figure:
    """Expected best validation score of k search trials vs k (Dodge et al. 2019), a ±1 std band per method.

    One panel per backbone (and per task and training size where the study has several). A curve
    that reaches its top only at k = N is a method that needs its whole search budget: it needs tuning.
    """
    panel_keys = ["backbone"] + [c for c in ("task", "train_size") if evp[c].nunique(dropna=False) > 1]
    panels = sorted(evp.groupby(panel_keys, dropna=False), key=lambda p: tuple(map(_order, p[0])))
    cols = min(max(len(panels), 1), 3)
    rows = max(int(np.ceil(len(panels) / cols)), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.8 * rows), squeeze=False)
    colors = _colors(list(evp["method"].unique()))
    for ax, (values, g) in zip(axes.flat, panels, strict=False):
        for method, m in g.groupby("method"):
            m = m.sort_values("k")
            ax.plot(m["k"], m["expected_best"], marker="o", ms=3, color=colors[method],
                    label=f"{method} (N={int(m['n_trials'].iloc[0])})")
            ax.fill_between(m["k"], m["expected_best"] - m["std"], m["expected_best"] + m["std"],
                            color=colors[method], alpha=0.15, lw=0)
        ax.set(xlabel="search trials k", ylabel=f"expected best validation {g['metric_name'].iloc[0]}",
               title=" · ".join(f"{v} examples" if c == "train_size" else str(v)
                                for c, v in zip(panel_keys, values, strict=True)))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no finished search trials", ha="center", va="center", transform=axes[0, 0].transAxes)
    for ax in list(axes.flat)[max(len(panels), 1):]:
        ax.set_visible(False)
    return _save(fig, out_path)
