"""The papers' claims, tested on a study's Parquet tables: computations and verdict rules.

Every function takes the tables as DataFrames (read with `read_trials` / `read_epochs`,
which check the schema version), so the rules can be tested on planted tables. A
verdict is one of SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE or NO_DATA, with the number it
rests on, its confidence interval where one makes sense, n, and details that say where
the numbers came from. Only `study.schema` and `study.quality` are imported from the project.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from study import schema
from study.quality import (
    FLOOR,
    confirm_runs,
    examples_interval,
    paired_seeds,
    predictions_by_trial,
    quality_rows,
    stacked,
)

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, NO_DATA = "supported", "not supported", "inconclusive", "no data"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, NO_DATA)
VERDICT_KEYS = ("claim", "scope", "verdict", "statistic", "ci", "n", "details")

PARAMS_CLAIM = "read-params-flat"
FLOOR_CLAIM = "clears-the-probe-floor"  # a tuned method beats the linear probe on the same backbone
CONVERGENCE_CLAIM = "read-slower-convergence-small-data"

FLAT_SLOPE = 0.05  # |log-log slope| at most this is "flat": doubling the axis changes the count by < 3.5%
COST_TOLERANCE = 0.10  # a cost claim holds if the measured change is within 10 points of the paper's, or better


@dataclass(frozen=True)
class Verdict:
    """One claim judged in one scope (a family, a training-set size, a measurement source)."""

    claim: str
    scope: str
    verdict: str
    statistic: float | None
    ci: tuple[float, float] | None
    n: int
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")

    def as_dict(self) -> dict[str, Any]:
        return plain({"claim": self.claim, "scope": self.scope, "verdict": self.verdict,
                      "statistic": self.statistic, "ci": list(self.ci) if self.ci is not None else None,
                      "n": self.n, "details": self.details})


def plain(value: Any) -> Any:
    """JSON-ready copy: numpy scalars to Python, NaN to None (the results never NaN-code a null)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray | pd.Series):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


# --------------------------------------------------------------------------- error control, shared by the claims

ALPHA = 0.05


def holm(pvalues: Sequence[float | None]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (None/NaN: not tested, stays NaN, not in the family).

    One family is every comparison one claim makes on one table. Holm controls the family-wise
    error rate at alpha under any dependence between the comparisons (cells of one table share a
    probe, a backbone, a test set), and is uniformly more powerful than Bonferroni.
    """
    p = np.array([np.nan if v is None else v for v in pvalues], dtype=float)
    tested = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(len(p), np.nan)
    running = 0.0
    for rank, i in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running = max(running, min(1.0, (len(tested) - rank) * p[i]))  # monotone: never below an earlier step
        adjusted[i] = running
    return adjusted.tolist()


def decide(effect: float | None, ci: tuple[float, float] | None, p_adjusted: float | None,
           alpha: float = ALPHA) -> str:
    """The verdict of one comparison whose claim is "effect > 0".

    Supported iff the (family-adjusted) p < alpha and effect > 0; not supported iff p < alpha and
    effect < 0; inconclusive otherwise, and always when the effect's interval spans zero or any
    input is missing. A caller with no comparison at all reports NO_DATA itself.
    """
    if effect is None or ci is None or p_adjusted is None or not all(
            math.isfinite(x) for x in (effect, ci[0], ci[1], p_adjusted)):
        return INCONCLUSIVE
    if ci[0] <= 0.0 <= ci[1] or p_adjusted >= alpha:
        return INCONCLUSIVE
    return SUPPORTED if effect > 0 else NOT_SUPPORTED if effect < 0 else INCONCLUSIVE


# --------------------------------------------------------------------------- reading and writing

def read_trials(results_dir: str | Path) -> pd.DataFrame:
    return schema.read(Path(results_dir) / "trials.parquet").to_pandas()


def read_trials_of(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """The trials of several studies in one table (empty or missing paths are skipped)."""
    found = [Path(d) for d in dirs if d and (Path(d) / "trials.parquet").is_file()]
    if not found:
        raise FileNotFoundError(f"no trials.parquet in any of {list(dirs)}")
    return pd.concat([read_trials(d) for d in found], ignore_index=True)


def read_epochs(results_dir: str | Path) -> pd.DataFrame:
    path = Path(results_dir) / "epochs.parquet"
    if not path.exists():  # a study that only planned has no epochs
        return pd.DataFrame(columns=schema.EPOCH_COLUMNS)
    return schema.read(path).to_pandas()


def read_predictions(results_dir: str | Path) -> pd.DataFrame:
    """predictions.parquet: one row per confirm trial × test example (schema version checked)."""
    return schema.read(Path(results_dir) / "predictions.parquet").to_pandas()


def write_verdicts(verdicts: Sequence[Verdict], results_dir: str | Path,
                   claims: Iterable[str] | None = None) -> Path:
    """Merge into `<results_dir>/verdicts.json`: entries of these claims replace earlier ones.

    Each notebook owns some claims, so notebooks can run in any order, or again, and the
    file always holds the latest verdict of every claim judged on that directory.
    """
    path = Path(results_dir) / "verdicts.json"
    owned = set(claims or ()) | {v.claim for v in verdicts}
    kept = [e for e in read_verdicts(results_dir) if e.get("claim") not in owned]
    entries = kept + [v.as_dict() for v in verdicts]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries, indent=2, allow_nan=False, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_verdicts(results_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(results_dir) / "verdicts.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


def verdict_problems(entry: dict[str, Any]) -> list[str]:
    """What makes a verdicts.json entry malformed (empty list: well-formed)."""
    problems = []
    if set(entry) != set(VERDICT_KEYS):
        problems.append(f"keys {sorted(entry)} != {sorted(VERDICT_KEYS)}")
    if not isinstance(entry.get("claim"), str) or not isinstance(entry.get("scope"), str):
        problems.append("claim and scope must be strings")
    if entry.get("verdict") not in VERDICTS:
        problems.append(f"verdict {entry.get('verdict')!r} not in {VERDICTS}")
    if entry.get("statistic") is not None and not isinstance(entry["statistic"], int | float):
        problems.append("statistic must be a number or null")
    ci = entry.get("ci")
    if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(isinstance(x, int | float) for x in ci)
                               and ci[0] <= ci[1]):
        problems.append(f"ci must be null or [low, high], got {ci!r}")
    if not isinstance(entry.get("n"), int) or entry["n"] < 0:
        problems.append("n must be a non-negative integer")
    if not isinstance(entry.get("details"), dict):
        problems.append("details must be an object")
    return problems


def verdict_table(verdicts: Iterable[Verdict | dict[str, Any]]) -> pd.DataFrame:
    """The verdicts as a table to show in a notebook (the summary sentence included)."""
    rows = [v.as_dict() if isinstance(v, Verdict) else v for v in verdicts]
    return pd.DataFrame([{**{k: r[k] for k in VERDICT_KEYS if k != "details"},
                          "summary": r["details"].get("summary", "")} for r in rows])


# --------------------------------------------------------------------------- 1. parameter scaling

def _is_default_config(trials: pd.DataFrame) -> pd.Series:
    hp = [c for c in trials.columns if c.startswith("hp.m.")]
    return trials[hp].isna().all(axis=1) if hp else pd.Series(True, index=trials.index)


def parameter_counts(trials: pd.DataFrame) -> pd.DataFrame:
    """One trainable count (head excluded) per method × backbone, at the method's default config.

    Tuned trials vary capacity knobs (READ's hidden size, LoRA's rank), which would mix
    configurations into a scaling fit. Planned (`estimated`) rows and methods without a
    knob carry the default config; a pair seen only with tuned knobs keeps its median
    count, is marked config="tuned" and is left out of the fits.
    """
    cols = ["method", "backbone", "backbone_family", "layers", "width", "params_trainable", "params_total",
            "config", "rows", "ladder"]
    t = trials[trials["params_trainable"].notna()].copy()
    if t.empty:
        return pd.DataFrame(columns=cols)
    # failed or early rows may lack the backbone's shape: take it from any row of that backbone
    for col in ("backbone_family", "backbone_layers", "backbone_width"):
        known = trials.dropna(subset=[col]).groupby("backbone")[col].first()
        t[col] = t[col].where(t[col].notna(), t["backbone"].map(known))
    t = t.dropna(subset=["backbone_layers", "backbone_width"])
    t["default"] = _is_default_config(t)
    rows = []
    for (method, backbone), g in t.groupby(["method", "backbone"], sort=False):
        use, config = (g[g["default"]], "default") if g["default"].any() else (g, "tuned")
        first = use.iloc[0]
        rows.append({"method": method, "backbone": backbone, "backbone_family": first["backbone_family"],
                     "layers": int(first["backbone_layers"]), "width": int(first["backbone_width"]),
                     "params_trainable": float(use["params_trainable"].median()),
                     "params_total": float(use["params_total"].median()), "config": config, "rows": len(use),
                     "ladder": str(backbone).split("@")[0]})
    return pd.DataFrame(rows, columns=cols).sort_values(["method", "backbone_family", "width", "layers"],
                                                        ignore_index=True)


def _slopes(y: np.ndarray, *xs: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of y on the columns xs (intercept dropped)."""
    design = np.column_stack([np.ones_like(y), *xs])
    return np.linalg.lstsq(design, y, rcond=None)[0][1:]


def depth_fits(counts: pd.DataFrame) -> pd.DataFrame:
    """Log-log slope of each method's count against depth L along each depth ladder.

    A ladder is one architecture truncated to several depths (`smollm2-135m@L2`, `@L4`, ...
    and the full model): width and everything else fixed, so the slope isolates depth.
    """
    rows = []
    c = counts[counts["config"] == "default"]
    for (ladder, method), g in c.groupby(["ladder", "method"]):
        if g["layers"].nunique() < 2 or g["width"].nunique() != 1:
            continue
        g = g.sort_values("layers")
        slope = _slopes(np.log(g["params_trainable"].to_numpy()), np.log(g["layers"].to_numpy(float)))[0]
        rows.append({"ladder": ladder, "method": method, "backbone_family": g["backbone_family"].iloc[0],
                     "width": int(g["width"].iloc[0]), "n": len(g), "layers": g["layers"].tolist(),
                     "params": g["params_trainable"].tolist(), "loglog_slope": float(slope),
                     "ratio": float(g["params_trainable"].iloc[-1] / g["params_trainable"].iloc[0])})
    return pd.DataFrame(rows, columns=["ladder", "method", "backbone_family", "width", "n", "layers", "params",
                                       "loglog_slope", "ratio"])


def width_fits(counts: pd.DataFrame) -> pd.DataFrame:
    """How each method's count grows with width d across a family's backbones.

    Along a family's ladder depth grows with width, so the log-log slope on d is taken
    with log L as a covariate when the data can separate them (n >= 4, two or more
    depths); otherwise it is the plain slope, marked `depth_adjusted=False`. A straight
    line N = a + b·d (with R²) says whether growth is linear in d.
    """
    rows = []
    c = counts[counts["config"] == "default"]
    for (family, method), g in c.groupby(["backbone_family", "method"]):
        if g["width"].nunique() < 2:
            continue
        n_params = g["params_trainable"].to_numpy()
        d, layers = g["width"].to_numpy(float), g["layers"].to_numpy(float)
        log_y, log_d, log_l = np.log(n_params), np.log(d), np.log(layers)
        adjusted = len(g) >= 4 and g["layers"].nunique() >= 2 and np.linalg.matrix_rank(
            np.column_stack([np.ones_like(log_d), log_d, log_l])) == 3
        slope = _slopes(log_y, log_d, log_l)[0] if adjusted else _slopes(log_y, log_d)[0]
        b, a = np.polyfit(d, n_params, 1)
        resid = n_params - (a + b * d)
        total = ((n_params - n_params.mean()) ** 2).sum()
        r2 = 1.0 - (resid ** 2).sum() / total if total > 0 else 1.0
        lo, hi = g.loc[g["width"].idxmin()], g.loc[g["width"].idxmax()]
        rows.append({"backbone_family": family, "method": method, "n": len(g), "width_min": int(d.min()),
                     "width_max": int(d.max()), "loglog_slope": float(slope), "depth_adjusted": bool(adjusted),
                     "linear_intercept": float(a), "linear_slope": float(b), "linear_r2": float(r2),
                     "ratio": float(hi["params_trainable"] / lo["params_trainable"])})
    return pd.DataFrame(rows, columns=["backbone_family", "method", "n", "width_min", "width_max", "loglog_slope",
                                       "depth_adjusted", "linear_intercept", "linear_slope", "linear_r2", "ratio"])


def _flat(slope: float) -> str:
    return SUPPORTED if abs(slope) <= FLAT_SLOPE else NOT_SUPPORTED


def parameter_verdicts(trials: pd.DataFrame, method: str = "read") -> list[Verdict]:
    """READ's trainable count "does not grow with the backbone": judged along depth and along width.

    Rule: |log-log slope| <= FLAT_SLOPE → supported (flat), else not supported; fewer than
    two depths (widths) → inconclusive; no READ counts → no data. Counts are exact, so no CI.
    """
    counts = parameter_counts(trials)
    rule = f"|log-log slope| <= {FLAT_SLOPE} → supported (flat); larger → not supported; < 2 sizes → inconclusive"
    mine = counts[(counts["method"] == method) & (counts["config"] == "default")]
    if mine.empty:
        return [Verdict(PARAMS_CLAIM, "all backbones", NO_DATA, None, None, 0,
                        {"rule": rule, "summary": f"no default-config {method} parameter counts in the table"})]
    out: list[Verdict] = []
    depth = depth_fits(counts)
    mine_depth = depth[depth["method"] == method]
    if mine_depth.empty:
        out.append(Verdict(PARAMS_CLAIM, "depth", INCONCLUSIVE, None, None, 0,
                           {"axis": "depth", "rule": rule,
                            "summary": "no depth ladder (one architecture at >= 2 depths) in the table"}))
    for r in mine_depth.itertuples():
        others = depth[(depth["ladder"] == r.ladder) & (depth["method"] != method)]
        verdict = _flat(r.loglog_slope)
        out.append(Verdict(
            PARAMS_CLAIM, f"depth: {r.ladder} ladder ({r.backbone_family}, width {r.width})", verdict,
            r.loglog_slope, None, r.n,
            {"axis": "depth", "family": r.backbone_family, "width": r.width, "layers": r.layers,
             "params_trainable": r.params, "ratio_deepest_to_shallowest": r.ratio,
             "other_methods_loglog_slope": dict(zip(others["method"], others["loglog_slope"], strict=True)),
             "source": "params_trainable (head excluded), default method config", "rule": rule,
             "summary": (f"{method} count vs depth L = {min(r.layers)}–{max(r.layers)} at width {r.width}: "
                         f"log-log slope {r.loglog_slope:.3f}, ×{r.ratio:.2f} from shallowest to deepest — "
                         + ("flat" if verdict == SUPPORTED else "grows"))}))
    width = width_fits(counts)
    mine_width = width[width["method"] == method]
    families = sorted(set(mine["backbone_family"].dropna()))
    for family in families:
        rows = mine_width[mine_width["backbone_family"] == family]
        if rows.empty:
            out.append(Verdict(PARAMS_CLAIM, f"width: {family}", INCONCLUSIVE, None, None,
                               int((mine["backbone_family"] == family).sum()),
                               {"axis": "width", "family": family, "rule": rule,
                                "summary": f"only one width in the {family} family"}))
            continue
        r = next(rows.itertuples())
        others = width[(width["backbone_family"] == family) & (width["method"] != method)]
        verdict = _flat(r.loglog_slope)
        linear = r.linear_r2 >= 0.99
        out.append(Verdict(
            PARAMS_CLAIM, f"width: {family} (d = {r.width_min}–{r.width_max})", verdict, r.loglog_slope, None, r.n,
            {"axis": "width", "family": family, "depth_adjusted": r.depth_adjusted,
             "linear_fit": {"intercept": r.linear_intercept, "per_unit_width": r.linear_slope, "r2": r.linear_r2},
             "ratio_widest_to_narrowest": r.ratio,
             "other_methods_loglog_slope": dict(zip(others["method"], others["loglog_slope"], strict=True)),
             "source": "params_trainable (head excluded), default method config", "rule": rule,
             "summary": (f"{method} count vs width d = {r.width_min}–{r.width_max} ({family}): log-log slope "
                         f"{r.loglog_slope:.3f}{' (depth-adjusted)' if r.depth_adjusted else ''}, "
                         f"×{r.ratio:.1f} narrowest to widest; N ≈ {r.linear_intercept:,.0f} + "
                         f"{r.linear_slope:,.0f}·d (R² = {r.linear_r2:.4f})"
                         + (" — grows linearly in d" if linear and verdict == NOT_SUPPORTED else ""))}))
    out.append(t5_verdict(method))
    return out


# The READ paper's own setting for the claim: three T5 sizes (0.74B–11.3B) that share d = 1024.
T5_SAME_WIDTH = ("t5-large", "t5-3b", "t5-11b")


def t5_counts(methods: Sequence[str] = ("read", "lora", "adapter", "lst", "sherl")) -> pd.DataFrame:
    """Exact trainable counts on T5-large/3B/11B, from meta-device builds (no study run needed)."""
    from study.count import count

    rows = [count(b, m) for b in T5_SAME_WIDTH for m in methods]
    return pd.DataFrame(rows, columns=["backbone", "method", "params_backbone", "params_trainable",
                                       "trainable_fraction"])


def t5_verdict(method: str = "read") -> Verdict:
    """The claim on T5 sizes at fixed width: the log-log slope of the count against the backbone's size."""
    c = t5_counts((method,))
    slope = round(float(np.polyfit(np.log(c["params_backbone"]), np.log(c["params_trainable"]), 1)[0]), 9) + 0.0
    verdict = _flat(slope)
    sizes = ", ".join(f"{b} {n / 1e9:.2f}B: {t:,}" for b, n, t in
                      zip(c["backbone"], c["params_backbone"], c["params_trainable"], strict=True))
    return Verdict(PARAMS_CLAIM, "size at fixed width: T5-large / 3B / 11B (d = 1024)", verdict, slope, None,
                   len(c), {"axis": "size", "family": "t5", "width": 1024,
                            "params_trainable": c["params_trainable"].tolist(),
                            "params_backbone": c["params_backbone"].tolist(),
                            "source": "meta-device count (exact), default method config",
                            "rule": f"|log-log slope vs backbone size| <= {FLAT_SLOPE} → supported (flat)",
                            "summary": f"{method} count vs T5 size ({sizes}): log-log slope {slope:.3f} — "
                                       + ("flat" if verdict == SUPPORTED else "grows")})


# --------------------------------------------------------------------------- 2. convergence

# analysis/convergence.py: one fixed threshold per (backbone, task, size), steps to it right-censored at the
# budget, Kaplan–Meier and a permutation log-rank test, Holm, `decide` (it imports this module, not back)


# --------------------------------------------------------------------------- 3. memory and energy

@dataclass(frozen=True)
class CostClaim:
    """A paper's cost figure: method vs full fine-tuning, as a relative change (−0.56 = −56%)."""

    claim: str
    method: str
    quantity: str  # memory | energy
    paper_change: float
    paper: str


COST_CLAIMS = (
    CostClaim("read-memory-56", "read", "memory", -0.56,
              "READ (arXiv 2305.15348): −56% training memory vs full fine-tuning, T5 on GLUE"),
    CostClaim("read-energy-84", "read", "energy", -0.84,
              "READ (arXiv 2305.15348): −84% GPU energy vs full fine-tuning, T5 on GLUE"),
    CostClaim("lst-memory-69", "lst", "memory", -0.69,
              "LST (arXiv 2206.06522): −69% training memory vs full fine-tuning, T5-base GLUE (17.6 → 5.5 GB)"),
)
COST_SOURCES = {"memory": ("cuda", "tracked", "estimated"), "energy": ("nvml", "rapl")}
COST_KEYS = ["study", "backbone", "batch_size", "max_length", "source"]


def cost_values(trials: pd.DataFrame, quantity: str) -> pd.DataFrame:
    """Median cost per method × setting × source: peak memory in bytes, or energy in joules per training token.

    Energy is per training token because trials stop at different epochs (ASHA); the
    paper's figure is for whole runs; trials that read the activation cache are left out (their
    energy has no backbone forward). Memory comes from finished and planned rows: a trial's memory
    is its method's live step whether or not it read the cache.
    """
    if quantity == "memory":
        t = trials[trials["status"].isin(["ok", "estimated"]) & trials["peak_memory_bytes"].notna()].copy()
        t["value"], t["source"] = t["peak_memory_bytes"].astype(float), t["memory_source"]
    elif quantity == "energy":
        # a trial on the activation cache spent no energy on the backbone forward: not the paper's quantity
        t = trials[(trials["status"] == "ok") & trials["energy_joules"].notna() & ~trials["cache_hit"].eq(True)].copy()
        tokens = t["tokens_per_s"] * t["train_time_s"]
        t["value"], t["source"] = t["energy_joules"] / tokens.where(tokens > 0), t["energy_source"]
    else:
        raise ValueError(f"quantity must be memory or energy, got {quantity!r}")
    t = t.dropna(subset=["value", "source"])
    for key in ("batch_size", "max_length"):  # nullable ints: rows without them still group and pair
        t[key] = t[key].astype("Int64")
    return (t.groupby([*COST_KEYS, "method"], dropna=False, sort=False)["value"].agg(["median", "size"])
            .rename(columns={"median": "value", "size": "trials"}).reset_index())


def cost_ratios(trials: pd.DataFrame) -> pd.DataFrame:
    """Every claim's method vs full FT in the same study, backbone, batch, length and source."""
    frames = []
    for c in COST_CLAIMS:
        v = cost_values(trials, c.quantity)
        mine = v[v["method"] == c.method].drop(columns="method")
        full = v[v["method"] == "full"].drop(columns="method")
        both = mine.merge(full, on=COST_KEYS, suffixes=("_method", "_full"))
        both["change"] = both["value_method"] / both["value_full"] - 1.0
        frames.append(both.assign(claim=c.claim, method=c.method, quantity=c.quantity,
                                  paper_change=c.paper_change))
    cols = ["claim", "method", "quantity", *COST_KEYS, "value_method", "value_full", "change", "paper_change",
            "trials_method", "trials_full"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def cost_verdicts(trials: pd.DataFrame) -> list[Verdict]:
    """One verdict per cost claim per measurement source.

    Rule: the median over settings (backbones) of method/full − 1 at or below the paper's
    change + COST_TOLERANCE (e.g. <= −0.46 for −56%) → supported, above → not supported;
    no pair from that source → no data. Settings are not samples of one population, so
    no CI: the per-backbone values and their range are in the details.
    """
    ratios = cost_ratios(trials)
    out: list[Verdict] = []
    for c in COST_CLAIMS:
        threshold = c.paper_change + COST_TOLERANCE
        rule = (f"median change <= {threshold:+.2f} (paper {c.paper_change:+.0%} + {COST_TOLERANCE:.0%} tolerance) "
                "→ supported; above → not supported; no pair → no data")
        for source in COST_SOURCES[c.quantity]:
            r = ratios[(ratios["claim"] == c.claim) & (ratios["source"] == source)]
            base = {"paper": c.paper, "paper_change": c.paper_change, "quantity": c.quantity, "source": source,
                    "rule": rule}
            if r.empty:
                out.append(Verdict(c.claim, f"source={source}", NO_DATA, None, None, 0,
                                   {**base, **_missing_cost(trials, c, source)}))
                continue
            median = float(r["change"].median())
            meets = int((r["change"] <= threshold).sum())
            unit = "peak memory" if c.quantity == "memory" else "J per training token"
            out.append(Verdict(
                c.claim, f"source={source}", SUPPORTED if median <= threshold else NOT_SUPPORTED, median, None,
                len(r),
                {**base, "unit": unit, "range": [float(r["change"].min()), float(r["change"].max())],
                 "settings_meeting_threshold": meets,
                 "per_setting": [{"study": s.study, "backbone": s.backbone, "batch_size": s.batch_size,
                                  "max_length": s.max_length, "change": s.change, "method": s.value_method,
                                  "full": s.value_full} for s in r.itertuples()],
                 "full_oom_backbones": sorted(set(trials.loc[(trials["method"] == "full")
                                                             & (trials["status"] == "oom"), "backbone"])),
                 "summary": (f"{c.method} vs full, {unit} ({source}): median {median:+.0%} over {len(r)} "
                             f"setting(s), range {r['change'].min():+.0%} … {r['change'].max():+.0%}; "
                             f"paper {c.paper_change:+.0%}")}))
    return out


# The field's memory baselines (issue 21): LoRA with and without gradient checkpointing, QLoRA (LoRA on an NF4
# backbone) with and without, and full fine-tuning with checkpointing. Labels as in trials.parquet's `method`.
STRONGEST_BASELINES = ("lora", "lora+gc", "lora@nf4", "lora@nf4+gc", "full+gc")
STRONGEST_SCOPE = "vs strongest baseline"


def strongest_ratios(trials: pd.DataFrame, baselines: Sequence[str] = STRONGEST_BASELINES) -> pd.DataFrame:
    """Each memory claim's method vs the lowest peak among `baselines` present in the same study, backbone, batch,
    length and source: the paper's saving restated against the baseline a reader would pick today."""
    v = cost_values(trials, "memory")
    base = v[v["method"].isin(baselines)]
    cols = ["claim", "method", *COST_KEYS, "value_method", "baseline", "value_baseline", "change", "baselines"]
    if base.empty:
        return pd.DataFrame(columns=cols)
    lowest = base.loc[base.groupby(COST_KEYS, dropna=False)["value"].idxmin()]
    present = (base.groupby(COST_KEYS, dropna=False)["method"].agg(lambda m: ",".join(sorted(m)))
               .rename("baselines").reset_index())
    lowest = lowest.rename(columns={"method": "baseline", "value": "value_baseline"}).drop(columns="trials")
    frames = []
    for c in (c for c in COST_CLAIMS if c.quantity == "memory"):
        mine = v[v["method"] == c.method].rename(columns={"value": "value_method"}).drop(columns="trials")
        both = mine.merge(lowest, on=COST_KEYS).merge(present, on=COST_KEYS)
        both["change"] = both["value_method"] / both["value_baseline"] - 1.0
        frames.append(both.assign(claim=c.claim))
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def strongest_verdicts(trials: pd.DataFrame, baselines: Sequence[str] = STRONGEST_BASELINES) -> list[Verdict]:
    """Each memory claim restated against the strongest baseline, per source (scope `vs strongest baseline,
    source=X`): the median over settings of method / min(baselines) − 1 below zero (the side method still
    needs less memory than every baseline present) → supported; at or above → not supported; no setting
    with the method and a baseline → no data. The papers give no figure against these baselines, so the
    rule asks only for a saving; its size is the statistic."""
    ratios = strongest_ratios(trials, baselines)
    out: list[Verdict] = []
    for c in (c for c in COST_CLAIMS if c.quantity == "memory"):
        rule = (f"median over settings of {c.method} / lowest peak of {{{', '.join(baselines)}}} − 1 < 0 → supported; "
                ">= 0 → not supported; no setting with both → no data")
        for source in COST_SOURCES["memory"]:
            r = ratios[(ratios["claim"] == c.claim) & (ratios["source"] == source)]
            base = {"paper": c.paper, "paper_change": c.paper_change, "quantity": "memory", "source": source,
                    "rule": rule, "baselines": list(baselines)}
            scope = f"{STRONGEST_SCOPE}, source={source}"
            if r.empty:
                out.append(Verdict(c.claim, scope, NO_DATA, None, None, 0,
                                   {**base, "summary": f"no data: no {source} setting with {c.method} and one of "
                                                       f"{', '.join(baselines)}"}))
                continue
            median = float(r["change"].median())
            winners = r["baseline"].value_counts().to_dict()
            out.append(Verdict(
                c.claim, scope, SUPPORTED if median < 0 else NOT_SUPPORTED, median, None, len(r),
                {**base, "unit": "peak memory", "range": [float(r["change"].min()), float(r["change"].max())],
                 "strongest": winners,
                 "per_setting": [{"study": s.study, "backbone": s.backbone, "batch_size": s.batch_size,
                                  "max_length": s.max_length, "change": s.change, "method": s.value_method,
                                  "baseline": s.baseline, "baseline_peak": s.value_baseline,
                                  "baselines_present": s.baselines} for s in r.itertuples()],
                 "summary": (f"{c.method} vs the lowest-peak of {', '.join(baselines)} ({source}): median "
                             f"{median:+.0%} over {len(r)} setting(s), range {r['change'].min():+.0%} … "
                             f"{r['change'].max():+.0%}; strongest: "
                             + ", ".join(f"{m} ×{n}" for m, n in winners.items()))}))
    return out


def _missing_cost(trials: pd.DataFrame, c: CostClaim, source: str) -> dict[str, Any]:
    col = "memory_source" if c.quantity == "memory" else "energy_source"
    have = trials[trials[col] == source]
    counts = {m: int((have["method"] == m).sum()) for m in (c.method, "full")}
    none = int((trials["energy_source"] == "none").sum()) if c.quantity == "energy" else None
    why = f"rows with {col}={source}: {c.method} {counts[c.method]}, full {counts['full']}"
    if none:
        why += f"; {none} trial(s) ran without an energy meter (energy_source=none)"
    return {"rows_with_source": counts, "summary": f"no data: {why}"}


# --------------------------------------------------------------------------- 4. quality per cost

CELL = ["backbone", "task", "train_size"]
QUALITY_COLUMNS = ["confirmed", "mean", "ci_low", "ci_high", "ci_low_examples", "ci_high_examples", "seeds",
                   "seeds_failed", "search_best_val", "probe_mean", "below_probe"]


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts of Python values, nulls as None (study.quality's input)."""
    return [{k: None if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v)) else v
             for k, v in r.items()} for r in frame.to_dict("records")]


def _predictions(predictions: pd.DataFrame | None) -> list[dict[str, Any]] | None:
    return None if predictions is None else predictions[["trial_id", "example", "label", "prediction"]].to_dict(
        "records")


def best_per_method(trials: pd.DataFrame) -> pd.DataFrame:
    """Per method × backbone × task × size: the costs of the configuration the study reports.

    A confirmed cell's costs are its confirm runs' (the search winner re-run; median peak memory);
    an unconfirmed cell's are those of its best finished search trial (final validation metric,
    full-budget trials first), shown for reference: such a cell has no quality to put on a front.
    """
    cols = ["backbone", "task", "train_size", "method", "weights", "metric_name", "peak_memory_bytes",
            "memory_source", "params_trainable", "trial_id", "trials", "cost_from"]
    ok = trials[trials["status"] == "ok"]
    rows = []
    for key, g in ok.groupby([*CELL, "method"], sort=False, dropna=False):
        confirm = g[(g["role"] == "confirm") & g["test_metric"].notna()]
        if len(confirm):
            first, source = confirm.sort_values("trial_id").iloc[0], "confirm"
            memory = confirm["peak_memory_bytes"].median()
        else:
            search = g[g["role"].ne("confirm")]
            if search.empty:
                continue
            ranked = search.assign(_full=~search["early_stopped"].eq(True)).sort_values(
                ["_full", "final_metric", "peak_memory_bytes"], ascending=[False, False, True], na_position="last")
            first, source = ranked.iloc[0], "search"
            memory = first["peak_memory_bytes"]
        rows.append({**dict(zip([*CELL, "method"], key, strict=True)), "weights": first.get("weights"),
                     "metric_name": first.get("metric_name"), "peak_memory_bytes": memory,
                     "memory_source": first.get("memory_source"), "params_trainable": first.get("params_trainable"),
                     "trial_id": first["trial_id"], "trials": len(g), "cost_from": source})
    return pd.DataFrame(rows, columns=cols).sort_values([*CELL, "method"], ignore_index=True)


def pareto_front(frame: pd.DataFrame, cost: str, metric: str = "mean") -> pd.Series:
    """True where no other point costs no more and scores no less, and is strictly better in one (NaN: never)."""
    cost_v, metric_v = frame[cost].to_numpy(float), frame[metric].to_numpy(float)
    valid = ~(np.isnan(cost_v) | np.isnan(metric_v))
    front = []
    for i in range(len(frame)):
        if not valid[i]:
            front.append(False)
            continue
        dominated = valid & (cost_v <= cost_v[i]) & (metric_v >= metric_v[i]) & (
            (cost_v < cost_v[i]) | (metric_v > metric_v[i]))
        front.append(not dominated.any())
    return pd.Series(front, index=frame.index, dtype=bool)


def quality(trials: pd.DataFrame, predictions: pd.DataFrame | None = None) -> pd.DataFrame:
    """quality.parquet's rows (study.quality): per cell the confirm seeds' mean TEST score with its Student-t
    95% CI (and the seeds + test examples interval when predictions are given), failures, the probe floor."""
    cols = [f.name for f in schema.QUALITY_FIELDS]
    rows = quality_rows(_records(trials[trials["status"] != "estimated"]), _predictions(predictions))
    return pd.DataFrame(rows, columns=cols) if rows else pd.DataFrame(columns=cols)


def quality_per_cost(trials: pd.DataFrame, predictions: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per cell: the reported quality (confirm seeds' test mean and CI; null when unconfirmed), its costs, and
    whether it is on the Pareto front of memory and of params among the confirmed cells of its backbone, task
    and size. An unconfirmed cell stays in the table (its `search_best_val` is a labelled validation maximum)
    and off every front."""
    def key(values: Iterable[Any]) -> tuple:
        return tuple(None if pd.isna(v) else v for v in values)

    q = {key(r[k] for k in (*CELL, "method")): r for r in quality(trials, predictions).to_dict("records")}
    best = best_per_method(trials)
    cells = [q.get(key(k), {}) for k in best[[*CELL, "method"]].itertuples(index=False)]
    best = pd.concat([best, pd.DataFrame([{c: r.get(c) for c in QUALITY_COLUMNS} for r in cells],
                                         index=best.index, columns=QUALITY_COLUMNS)], axis=1)
    best["mean"] = best["mean"].where(best["confirmed"].eq(True)).astype(float)
    best["front_memory"] = False
    best["front_params"] = False
    for _, g in best.groupby(CELL, dropna=False):
        best.loc[g.index, "front_memory"] = pareto_front(g, "peak_memory_bytes")
        best.loc[g.index, "front_params"] = pareto_front(g, "params_trainable")
    return best


def floor_verdicts(trials: pd.DataFrame, predictions: pd.DataFrame | None = None) -> list[Verdict]:
    """Every tuned method against the linear probe on the same backbone, task and training-set size.

    The effect is the mean paired difference method − probe in test score over the confirm seeds
    both ran (same seed: same training subsample), with its Student-t 95% CI and the paired
    t-test's p-value; Holm's correction runs over every floor comparison of the table (one
    family). Holm-adjusted p < 0.05 and effect > 0 → supported (clears the floor); p < 0.05 and
    effect < 0 → not supported (under-tuned or broken); otherwise inconclusive. No verdict on an
    unconfirmed cell, random weights or no confirmed probe (no data); fewer than 2 paired seeds
    or a failed confirm seed in either cell → inconclusive, the reason in the details. With
    predictions, the seeds + test examples interval of the effect is in the details beside it.
    """
    records = _records(trials[trials["status"] != "estimated"])
    rows = quality_rows(records)
    runs, by_trial = confirm_runs(records), predictions_by_trial(_predictions(predictions) or [])
    rule = ("mean paired (by seed) test difference method − probe; Holm over all floor comparisons: adjusted "
            "p < 0.05 and > 0 → supported; adjusted p < 0.05 and < 0 → not supported (under-tuned or broken); "
            "otherwise, an interval spanning 0, < 2 paired seeds or a failed seed → inconclusive")
    probes = {tuple(r[k] for k in CELL): r for r in rows if r["method"] == FLOOR}
    pending: list[dict[str, Any]] = []
    for r in (r for r in rows if r["method"] != FLOOR):
        key = tuple(r[k] for k in CELL)
        probe = probes.get(key)
        base = {"method": r["method"], **dict(zip(CELL, key, strict=True)), "rule": rule, "mean": r["mean"],
                "probe_mean": probe["mean"] if probe else None, "seeds": r["seeds"],
                "seeds_failed": r["seeds_failed"], "probe_seeds_failed": probe["seeds_failed"] if probe else None}
        size = "all" if pd.isna(r["train_size"]) else int(r["train_size"])  # pandas reads a nullable int as float
        item = {"scope": f"{r['method']} on {r['backbone']} ({r['task']}, n={size})", "base": base,
                "verdict": NO_DATA, "diff": None, "p": None}
        pending.append(item)
        failed = (r["seeds_failed"] or 0) + ((probe or {}).get("seeds_failed") or 0)
        lost = f" ({r['seeds_failed']} failed)" if r["seeds_failed"] else ""
        why = ("random weights: a cost run, its metric means nothing" if r["weights"] == "random"
               else f"unconfirmed: no confirm seed finished{lost}" if not r["confirmed"]
               else "no confirmed probe on this backbone, task and size" if not (probe and probe["confirmed"])
               else None)
        if why:
            item["why"] = why
            continue
        diff = paired_seeds(runs.get((r["method"], *key), {}), runs.get((FLOOR, *key), {}))
        item.update(diff=diff, verdict=INCONCLUSIVE)
        if diff is None or diff.ci is None:
            item["why"] = f"{diff.n if diff else 0} paired seed(s): fewer than 2, no interval"
        elif failed:
            item["why"] = (f"{r['seeds_failed']} failed confirm seed(s) here, {probe['seeds_failed']} in the probe: "
                           "not judged on the survivors")
        else:
            item["p"] = diff.p
        if diff is not None and by_trial and diff.n >= 2:
            shared = sorted(set(runs[(r["method"], *key)]) & set(runs[(FLOOR, *key)]))
            stack = stacked(by_trial, [runs[(m, *key)][s]["trial_id"] for m in (r["method"], FLOOR) for s in shared])
            if stack is not None:
                ex = examples_interval(stack[0][:len(shared)], stack[1], str(r["metric_name"]),
                                       other=stack[0][len(shared):])
                base["ci_seeds_and_examples"] = list(ex) if ex else None
    adjusted = holm([item["p"] for item in pending])
    family = sum(item["p"] is not None for item in pending)
    out = []
    for item, p_adj in zip(pending, adjusted, strict=True):
        base, diff = item["base"], item["diff"]
        if item["p"] is not None:
            item["verdict"] = decide(diff.mean, diff.ci, p_adj)
        details = {**base, "paired_seeds": diff.n if diff else 0, "p_value": item["p"],
                   "p_holm": None if math.isnan(p_adj) else p_adj, "family_size": family}
        if "why" in item:
            details["reason"] = item["why"]
        if diff is None:
            summary = f"{item['verdict']}: {item.get('why')}"
        else:
            ci = f"[{diff.ci[0]:+.3f}, {diff.ci[1]:+.3f}]" if diff.ci else "n/a"
            words = {SUPPORTED: "clears the probe", NOT_SUPPORTED: "below the probe: under-tuned or broken",
                     INCONCLUSIVE: item.get("why") or "within noise of the probe"}[item["verdict"]]
            ex = base.get("ci_seeds_and_examples")
            summary = (f"{base['method']} − probe = {diff.mean:+.3f} (95% CI {ci}, {diff.n} seeds"
                       + (f"; with test-set noise [{ex[0]:+.3f}, {ex[1]:+.3f}]" if ex else "")
                       + (f"; Holm p = {p_adj:.3g} of {family}" if item["p"] is not None else "") + f"): {words}")
        out.append(Verdict(FLOOR_CLAIM, item["scope"], item["verdict"], None if diff is None else diff.mean,
                           None if diff is None else diff.ci, diff.n if diff else 0, {**details, "summary": summary}))
    return out
