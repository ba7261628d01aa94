"""`report.html`: one page per study folder to open or send — the verdicts, the summary with its intervals,
every figure.

The page is self-contained: the style is inline and each figure is a PNG data URI, so it reads the same
from a bucket, a laptop or an e-mail attachment, and needs no script. This module only formats; the
report CLI (analysis.report) gathers the verdicts (verdicts.json), the summary (quality.parquet's rows)
and the figures. Nothing from the project is imported.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from html import escape
from typing import Any

# one colour per verdict (the badge's background): also what the browser test looks for in the screenshot
VERDICT_COLOURS = {"supported": "#1a7f37", "not supported": "#cf222e", "inconclusive": "#9a6700", "no data": "#6e7781"}

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1f2328; background: #ffffff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
.meta { color: #57606a; margin: 0 0 12px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.rule { color: #57606a; font-size: 12px; min-width: 260px; } td.claim { white-space: nowrap; }
.badge { color: #ffffff; padding: 2px 8px; border-radius: 10px; white-space: nowrap; display: inline-block; }
figure { margin: 16px 0; } figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; }
"""


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{float(value):.{digits}g}"


def _interval(low: Any, high: Any, digits: int = 4) -> str:
    if low is None or high is None or any(isinstance(v, float) and not math.isfinite(v) for v in (low, high)):
        return "–"
    return f"[{_num(low, digits)}, {_num(high, digits)}]"


def _cell(text: str, cls: str = "") -> str:
    return f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>"


def badge(verdict: str) -> str:
    colour = VERDICT_COLOURS.get(verdict, "#6e7781")
    return f'<span class="badge" style="background:{colour}">{escape(verdict)}</span>'


def verdict_table(verdicts: Sequence[dict[str, Any]]) -> str:
    """Each verdict with the number it rests on, its 95% interval where one makes sense, n, and its rule."""
    head = "".join(f"<th>{h}</th>" for h in ("verdict", "claim", "scope", "statistic", "95% interval", "n", "summary",
                                            "rule"))
    rows = []
    for v in verdicts:
        details = v.get("details") or {}
        ci = v.get("ci") or [None, None]
        rows.append("<tr>" + "".join([
            _cell(badge(str(v.get("verdict", "")))), _cell(escape(str(v.get("claim", ""))), "claim"),
            _cell(escape(str(v.get("scope", "")))), _cell(_num(v.get("statistic")), "num"),
            _cell(_interval(*ci), "num"), _cell(_num(v.get("n")), "num"),
            _cell(escape(str(details.get("summary", "")))), _cell(escape(str(details.get("rule", ""))), "rule"),
        ]) + "</tr>")
    return f'<table class="verdicts"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def summary_table(quality: Sequence[dict[str, Any]]) -> str:
    """quality.parquet's rows: the confirm seeds' mean TEST score with its Student-t 95% interval (and the
    interval that adds the test set's sampling noise), the seeds, the labelled search maximum, the probe floor."""
    head = "".join(f"<th>{h}</th>" for h in (
        "method", "backbone", "task", "train size", "metric", "test mean", "95% t-interval (seeds)",
        "95% interval (seeds + test examples)", "seeds", "search max (val, selected)", "probe mean", "below probe"))
    rows = []
    for q in quality:
        seeds = _num(q.get("seeds")) + (f" + {q['seeds_failed']} failed" if q.get("seeds_failed") else "")
        confirmed = bool(q.get("confirmed"))
        rows.append("<tr>" + "".join([
            _cell(escape(str(q.get("method", "")))), _cell(escape(str(q.get("backbone", "")))),
            _cell(escape(str(q.get("task", "")))), _cell(_num(q.get("train_size")), "num"),
            _cell(escape(str(q.get("metric_name") or ""))),
            _cell(_num(q.get("mean"), 3) if confirmed else "unconfirmed", "num"),
            _cell(_interval(q.get("ci_low"), q.get("ci_high"), 3), "num"),
            _cell(_interval(q.get("ci_low_examples"), q.get("ci_high_examples"), 3), "num"),
            _cell(seeds, "num"), _cell(_num(q.get("search_best_val"), 3), "num"),
            _cell(_num(q.get("probe_mean"), 3), "num"), _cell("yes" if q.get("below_probe") else "", "num"),
        ]) + "</tr>")
    return f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def figure(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(name)}">'
            f"<figcaption>{escape(name)}</figcaption></figure>")


def page(title: str, verdicts: Sequence[dict[str, Any]], quality: Sequence[dict[str, Any]],
         figures: Sequence[tuple[str, bytes]], meta: Sequence[str] = ()) -> str:
    """The whole page: `figures` are (file name, PNG bytes); `meta` lines go under the title."""
    counts = {k: sum(v.get("verdict") == k for v in verdicts) for k in VERDICT_COLOURS}
    tally = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "none"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>", *(f'<p class="meta">{escape(m)}</p>' for m in meta),
        f'<h2 id="verdicts">Verdicts ({len(verdicts)}: {tally})</h2>',
        verdict_table(verdicts) if verdicts else "<p>No verdicts (verdicts.json is missing or empty).</p>",
        '<h2 id="summary">Summary: test scores with their intervals</h2>',
        summary_table(quality) if quality else "<p>No confirmed or searched cells.</p>",
        f'<h2 id="figures">Figures ({len(figures)})</h2>',
        *(figure(name, png) for name, png in figures),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
