"""The claim rules on planted results: each claim planted true, then false, and the verdict must flip.

Tables are written with `study.schema` and read back, so they are real schema Parquet.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import claims, convergence
from study import schema

WIDTHS = {"llama-s": (256, 4), "llama-m": (512, 6), "llama-l": (1024, 24), "llama-xl": (4096, 32)}
DEPTHS = (2, 4, 8, 16)


def trial(trial_id: str, method: str, backbone: str, **values) -> dict:
    return {"study": "planted", "trial_id": trial_id, "method": method, "backbone": backbone,
            "backbone_family": "llama", "task": "synthetic", "status": "ok", **values}


def roundtrip(tmp_path: Path, trials: list[dict], epochs: list[dict] | None = None) -> tuple[pd.DataFrame,
                                                                                             pd.DataFrame]:
    schema.write_trials(trials, tmp_path / "trials.parquet")
    schema.write_epochs(epochs or [], tmp_path / "epochs.parquet")
    return claims.read_trials(tmp_path), claims.read_epochs(tmp_path)


def read_count(d: int, h: int = 256) -> int:
    return 4 * h * d + 3 * h * h + 6 * h + 2 * d


# --------------------------------------------------------------------------- parameter scaling

def param_rows(read_grows_with_depth: bool) -> list[dict]:
    rows = []
    for L in DEPTHS:
        read = read_count(576) * (L if read_grows_with_depth else 1)
        for method, count in (("read", read), ("lora", 2 * 8 * 576 * 2 * L), ("full", 3_000_000 * L)):
            rows.append(trial(f"estimated:{method}:m@L{L}", method, f"m@L{L}", status="estimated",
                              backbone_layers=L, backbone_width=576, params_trainable=count,
                              params_total=count + 30_000_000, params_head=1154))
    for name, (d, L) in WIDTHS.items():
        for method, count in (("read", read_count(d)), ("lora", 32 * d * L), ("full", 12 * d * d * L)):
            rows.append(trial(f"estimated:{method}:{name}", method, name, status="estimated", backbone_layers=L,
                              backbone_width=d, params_trainable=count, params_total=count * 10))
    return rows


def by_axis(verdicts: list[claims.Verdict], axis: str) -> claims.Verdict:
    (v,) = [v for v in verdicts if v.details.get("axis") == axis]
    return v


def test_params_flat_along_depth_is_supported_and_width_grows_linearly(tmp_path):
    trials, _ = roundtrip(tmp_path, param_rows(read_grows_with_depth=False))
    verdicts = claims.parameter_verdicts(trials)
    depth, width = by_axis(verdicts, "depth"), by_axis(verdicts, "width")
    assert depth.verdict == claims.SUPPORTED and abs(depth.statistic) < 1e-9 and depth.n == 4
    assert depth.details["other_methods_loglog_slope"]["full"] == pytest.approx(1.0)
    assert width.verdict == claims.NOT_SUPPORTED and 0.5 < width.statistic < 1.0
    assert width.details["linear_fit"]["per_unit_width"] == pytest.approx(4 * 256 + 2)
    assert width.details["linear_fit"]["r2"] == pytest.approx(1.0)
    assert "grows linearly in d" in width.details["summary"]


def test_params_growing_along_depth_is_not_supported(tmp_path):
    trials, _ = roundtrip(tmp_path, param_rows(read_grows_with_depth=True))
    depth = by_axis(claims.parameter_verdicts(trials), "depth")
    assert depth.verdict == claims.NOT_SUPPORTED
    assert depth.statistic == pytest.approx(1.0)


def test_tuned_capacity_is_kept_out_of_the_fits(tmp_path):
    rows = param_rows(read_grows_with_depth=False)
    # a run pair: READ tuned to another hidden size on the shallowest ladder member
    rows = [r for r in rows if r["trial_id"] != "estimated:read:m@L2"]
    rows.append(trial("t1", "read", "m@L2", backbone_layers=2, backbone_width=576,
                      params_trainable=read_count(576, h=64), params_total=1, **{"hp.m.hidden_size": 64}))
    trials, _ = roundtrip(tmp_path, rows)
    counts = claims.parameter_counts(trials)
    assert counts.set_index(["method", "backbone"]).loc[("read", "m@L2"), "config"] == "tuned"
    depth = by_axis(claims.parameter_verdicts(trials), "depth")
    assert depth.verdict == claims.SUPPORTED and depth.n == 3


def test_params_without_read_is_no_data(tmp_path):
    trials, _ = roundtrip(tmp_path, [r for r in param_rows(False) if r["method"] != "read"])
    (v,) = claims.parameter_verdicts(trials)
    assert v.verdict == claims.NO_DATA


# --------------------------------------------------------------------------- convergence
# the measure and its rule: tests/unit/test_convergence_measure.py; here only rows for verdicts.json

def convergence_rows(read_reach: int, lora_reach: int, seeds=(0, 1, 2, 3), sizes=(32, 64)):
    """Accuracy rising from 0.5 to 0.9 at epoch `reach`, flat after; chance 0.5, 2 steps per epoch."""
    trials, epochs = [], []
    for size in sizes:
        for seed in seeds:
            for method, reach in (("read", read_reach), ("lora", lora_reach)):
                tid = f"{method}-{size}-{seed}"
                metrics = [0.5 + 0.4 * min(e, reach) / reach for e in range(1, 7)]
                trials.append(trial(tid, method, "llama-tiny", train_size=size, seed=seed, epochs=6, batch_size=16,
                                    metric_name="accuracy", chance_metric=0.5, steps_per_epoch=2,
                                    final_metric=metrics[-1], epochs_run=6))
                epochs += [{"study": "planted", "trial_id": tid, "method": method, "backbone": "llama-tiny",
                            "epoch": e, "eval_metric": m, "metric_name": "accuracy"}
                           for e, m in enumerate(metrics, start=1)]
    return trials, epochs


# --------------------------------------------------------------------------- memory and energy

def cost_rows(read_fraction: float) -> list[dict]:
    rows = []
    for name, full_bytes in (("llama-s", 1_000_000), ("llama-m", 4_000_000)):
        for method, fraction in (("full", 1.0), ("read", read_fraction)):
            rows.append(trial(f"{method}-{name}", method, name, batch_size=16, max_length=32,
                              peak_memory_bytes=int(full_bytes * fraction), memory_source="tracked",
                              energy_source="none", best_metric=0.8))
            rows.append(trial(f"estimated:{method}:{name}-7b", method, f"{name}-7b", status="estimated",
                              peak_memory_bytes=int(full_bytes * 1000 * fraction), memory_source="estimated"))
    return rows


def memory_verdict(verdicts: list[claims.Verdict], claim: str, source: str) -> claims.Verdict:
    (v,) = [v for v in verdicts if v.claim == claim and v.scope == f"source={source}"]
    return v


def test_memory_saving_of_60_percent_supports_the_56_percent_claim(tmp_path):
    trials, _ = roundtrip(tmp_path, cost_rows(read_fraction=0.4))
    verdicts = claims.cost_verdicts(trials)
    for source in ("tracked", "estimated"):
        v = memory_verdict(verdicts, "read-memory-56", source)
        assert v.verdict == claims.SUPPORTED and v.statistic == pytest.approx(-0.6, abs=1e-6) and v.n == 2
    assert memory_verdict(verdicts, "read-memory-56", "cuda").verdict == claims.NO_DATA
    assert {v.verdict for v in verdicts if v.claim in ("read-energy-84", "lst-memory-69")} == {claims.NO_DATA}
    energy = memory_verdict(verdicts, "read-energy-84", "nvml")
    assert "energy_source=none" in energy.details["summary"]


def test_memory_saving_of_10_percent_does_not_support_it(tmp_path):
    trials, _ = roundtrip(tmp_path, cost_rows(read_fraction=0.9))
    v = memory_verdict(claims.cost_verdicts(trials), "read-memory-56", "tracked")
    assert v.verdict == claims.NOT_SUPPORTED and v.statistic == pytest.approx(-0.1, abs=1e-6)


def test_energy_is_compared_per_training_token(tmp_path):
    rows = []
    for method, joules, tokens_per_s in (("full", 1000.0, 100.0), ("read", 100.0, 50.0)):
        rows.append(trial(method, method, "llama-s", batch_size=16, max_length=32, energy_joules=joules,
                          energy_source="nvml", tokens_per_s=tokens_per_s, train_time_s=10.0))
    # a READ trial on the activation cache spent no energy on the backbone: left out of the claim
    rows.append(trial("read-cached", "read", "llama-s", batch_size=16, max_length=32, energy_joules=1.0,
                      energy_source="nvml", tokens_per_s=50.0, train_time_s=10.0, cache_hit=True))
    trials, _ = roundtrip(tmp_path, rows)
    v = memory_verdict(claims.cost_verdicts(trials), "read-energy-84", "nvml")
    # full: 1 J/token; read: 100 J / 500 tokens = 0.2 J/token → −80%, within 10 points of −84%
    assert v.statistic == pytest.approx(-0.8) and v.verdict == claims.SUPPORTED


# --------------------------------------------------------------------------- quality per cost, verdicts.json

def test_pareto_front_on_confirmed_test_means_and_the_reported_configs_costs(tmp_path):
    def confirmed(method, scores, memory, params):
        return [trial(f"{method}-c{s}", method, "b", role="confirm", seed=s, test_metric=v, final_metric=v,
                      peak_memory_bytes=memory + s, params_trainable=params) for s, v in enumerate(scores, 1)]

    rows = [*confirmed("full", (0.90, 0.91), 100, 1000), *confirmed("read", (0.85, 0.86), 40, 10),
            *confirmed("lora", (0.80, 0.81), 60, 20),
            trial("c", "lora", "b", role="search", final_metric=0.83, peak_memory_bytes=61, params_trainable=20),
            trial("d", "lora", "b", role="search", final_metric=0.70, peak_memory_bytes=50, params_trainable=20),
            # searched only: its validation max would top every front, but it is no mean and stays off
            trial("e", "adapter", "b", role="search", final_metric=0.99, peak_memory_bytes=10, params_trainable=5),
            trial("f", "lst", "b", role="search", status="oom")]
    trials, _ = roundtrip(tmp_path, rows)
    q = claims.quality_per_cost(trials).set_index("method")
    assert list(q.index) == ["adapter", "full", "lora", "read"]  # lst never finished a trial
    assert q.loc["lora", "trial_id"] == "lora-c1" and q.loc["lora", "trials"] == 4
    assert q.loc["lora", "peak_memory_bytes"] == 61.5 and q.loc["lora", "cost_from"] == "confirm"
    assert q.loc["lora", "mean"] == pytest.approx(0.805)  # the test mean, not the search's 0.83
    assert pd.isna(q.loc["adapter", "mean"]) and q.loc["adapter", "search_best_val"] == 0.99
    assert q["front_memory"].to_dict() == {"adapter": False, "full": True, "lora": False, "read": True}
    assert q["front_params"].to_dict() == {"adapter": False, "full": True, "lora": False, "read": True}


def test_verdicts_json_is_well_formed_and_merged_per_claim(tmp_path):
    trials, epochs = roundtrip(tmp_path, *convergence_rows(read_reach=4, lora_reach=1))
    claims.write_verdicts(convergence.convergence_verdicts(trials, epochs), tmp_path)
    claims.write_verdicts(claims.cost_verdicts(trials), tmp_path)
    claims.write_verdicts(convergence.convergence_verdicts(trials, epochs), tmp_path)  # again: replaces, no duplicates
    entries = json.loads((tmp_path / "verdicts.json").read_text())
    assert all(claims.verdict_problems(e) == [] for e in entries)
    by_claim = pd.Series([e["claim"] for e in entries]).value_counts().to_dict()
    assert by_claim[claims.CONVERGENCE_CLAIM] == 2
    assert by_claim["read-memory-56"] == 3
    assert claims.verdict_problems({"claim": "x"}) != []


# --------------------------------------------------------------------------- bad input to the report

@pytest.mark.parametrize("write,needle", [
    (None, "no trials.parquet in"),
    (lambda path: path.write_text("not parquet"), "magic bytes"),
    (lambda path: pq.write_table(pa.table({"a": [1]}), path), "schema version ?"),
])
def test_report_refuses_bad_folders_in_one_line(tmp_path, capsys, write, needle):
    from analysis import report

    if write is not None:
        write(tmp_path / "trials.parquet")
    with pytest.raises(SystemExit) as stop:
        report.main(["--scaling", str(tmp_path)])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m analysis.report: error:") and needle in last, last
    assert not (tmp_path / "notebooks").exists()  # no notebook started
