"""report.html's content (analysis.html) on planted verdicts, summary rows and a figure: every verdict with its
statistic, interval and rule, the intervals of the summary, the figure embedded, nothing fetched from outside.
The page as a browser shows it is tests/integration/test_analysis.py's."""

from __future__ import annotations

import base64
import io
import re

from PIL import Image

from analysis import html

VERDICTS = [
    {"claim": "read-params-flat", "scope": "depth <llama> & co", "verdict": "supported", "statistic": 0.0123456,
     "ci": None, "n": 5, "details": {"rule": "|slope| <= 0.05 → supported", "summary": "flat over depth"}},
    {"claim": "clears-the-probe-floor", "scope": "lora on llama-tiny", "verdict": "inconclusive", "statistic": 0.021,
     "ci": [-0.013, 0.055], "n": 3, "details": {"rule": "paired t, Holm", "summary": "within noise"}},
    {"claim": "read-energy-84", "scope": "source=nvml", "verdict": "no data", "statistic": None, "ci": None, "n": 0,
     "details": {"rule": "median change <= -0.74", "summary": "no data: no energy meter"}},
]
QUALITY = [
    {"method": "lora", "backbone": "llama-tiny", "task": "synthetic", "train_size": 128, "metric_name": "accuracy",
     "confirmed": True, "mean": 0.71234, "ci_low": 0.69, "ci_high": 0.734, "ci_low_examples": 0.66,
     "ci_high_examples": 0.76, "seeds": 3, "seeds_failed": 1, "search_best_val": 0.75, "probe_mean": 0.6,
     "below_probe": False},
    {"method": "read", "backbone": "llama-tiny", "task": "synthetic", "train_size": 128, "metric_name": "accuracy",
     "confirmed": False, "mean": None, "ci_low": None, "ci_high": None, "ci_low_examples": None,
     "ci_high_examples": None, "seeds": 0, "seeds_failed": 0, "search_best_val": 0.7, "probe_mean": None,
     "below_probe": None},
]


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_page_holds_every_verdict_with_its_numbers_and_rule():
    text = html.page("petl-study: scaling", VERDICTS, QUALITY, [("a.png", png())], ["results/scaling"])
    rows = re.findall(r"<tr>(.*?)</tr>", text.split('class="verdicts"')[1].split("<tbody>")[1].split("</table>")[0],
                      re.S)
    assert len(rows) == len(VERDICTS)
    assert "0.01235" in rows[0] and "|slope| &lt;= 0.05 → supported" in rows[0] and ">5<" in rows[0]
    assert "[-0.013, 0.055]" in rows[1] and "paired t, Holm" in rows[1]
    assert html.VERDICT_COLOURS["no data"] in rows[2] and "no data: no energy meter" in rows[2]
    assert "depth &lt;llama&gt; &amp; co" in text and "<llama>" not in text  # escaped
    assert "Verdicts (3: 1 supported, 1 inconclusive, 1 no data)" in text


def test_summary_shows_the_intervals_and_labels_the_unconfirmed():
    text = html.page("t", VERDICTS, QUALITY, [])
    summary = text.split('class="summary"')[1].split("<tbody>")[1].split("</table>")[0]
    lora, read = re.findall(r"<tr>(.*?)</tr>", summary, re.S)
    assert "0.712" in lora and "[0.69, 0.734]" in lora and "[0.66, 0.76]" in lora and "3 + 1 failed" in lora
    assert "unconfirmed" in read and "0.7" in read


def test_figures_are_embedded_and_nothing_is_fetched_from_outside():
    image = png()
    text = html.page("t", VERDICTS, QUALITY, [("pareto.png", image)])
    uris = re.findall(r'src="([^"]+)"', text)
    assert uris == [f"data:image/png;base64,{base64.b64encode(image).decode()}"]
    assert "<script" not in text and "href=" not in text and "url(" not in text and "@import" not in text
