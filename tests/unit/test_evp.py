"""Expected validation performance (study.evp): Dodge et al.'s closed form against draws, and which trials count."""

from __future__ import annotations

import numpy as np
import pytest

from study import evp, schema


def trial(score: float | None, *, method: str = "lora", backbone: str = "tiny-llama", role: str = "search",
          status: str = "ok", weights: str = "pretrained", **extra) -> dict:
    return {"study": "s", "method": method, "backbone": backbone, "task": "vader-movies", "train_size": 64,
            "metric_name": "accuracy", "role": role, "status": status, "weights": weights, "final_metric": score,
            **extra}


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_closed_form_matches_drawing_k_trials_with_replacement(k):
    rng = np.random.default_rng(7)
    scores = rng.uniform(0.5, 0.8, size=8)
    scores[3] = scores[5]  # a tie: its two copies share the probability mass
    draws = scores[rng.integers(0, len(scores), size=(200_000, k))].max(axis=1)
    mean, std = evp.expected_max(scores, k)
    # the Monte Carlo mean's standard error is std / sqrt(200k) < 2e-4: 1e-3 is five of them
    assert mean == pytest.approx(draws.mean(), abs=1e-3)
    assert std == pytest.approx(draws.std(), abs=1e-3)


def test_one_trial_is_the_mean_and_more_trials_never_expect_less_nor_beyond_the_max():
    scores = [0.61, 0.55, 0.72, 0.70, 0.58, 0.66]
    curve = [evp.expected_max(scores, k) for k in range(1, len(scores) + 1)]
    means = np.array([m for m, _ in curve])
    assert means[0] == pytest.approx(np.mean(scores))
    assert curve[0][1] == pytest.approx(np.std(scores))  # one draw: the scores' own spread
    assert np.all(np.diff(means) >= 0)
    assert means[-1] <= max(scores) and means[-1] > np.mean(scores)
    # many draws converge on the maximum, and their spread vanishes
    top, spread = evp.expected_max(scores, 500)
    assert top == pytest.approx(max(scores), abs=1e-9) and spread == pytest.approx(0, abs=1e-6)


def test_a_constant_search_has_a_flat_curve_with_no_spread():
    for k in (1, 3):
        assert evp.expected_max([0.7, 0.7, 0.7], k) == pytest.approx((0.7, 0.0))


def test_rows_per_cell_and_k_with_exactly_the_schema_columns(tmp_path):
    trials = ([trial(s) for s in (0.60, 0.70, 0.65)]
              + [trial(s, method="read") for s in (0.50, 0.90)]
              + [trial(s, backbone="tiny-bert") for s in (0.80, 0.81, 0.82, 0.83)])
    rows = evp.evp_rows(trials)
    assert all(set(r) == {f.name for f in schema.EVP_FIELDS} for r in rows)
    cells = {(r["method"], r["backbone"]): r["n_trials"] for r in rows}
    assert cells == {("lora", "tiny-llama"): 3, ("read", "tiny-llama"): 2, ("lora", "tiny-bert"): 4}
    by = {(r["method"], r["backbone"], r["k"]): r["expected_best"] for r in rows}
    assert sorted(k for m, b, k in by if (m, b) == ("lora", "tiny-llama")) == [1, 2, 3]
    assert by[("read", "tiny-llama", 1)] == pytest.approx(0.70)  # its own two trials, not lora's
    assert by[("lora", "tiny-bert", 1)] == pytest.approx(0.815)
    assert by[("read", "tiny-llama", 2)] == pytest.approx(0.5 * 0.25 + 0.9 * 0.75)
    schema.write_evp(rows, tmp_path / "evp.parquet")
    table = schema.read(tmp_path / "evp.parquet").to_pandas()
    assert len(table) == len(rows) == 3 + 2 + 4


def test_only_finished_search_trials_on_real_weights_count():
    kept = [trial(0.60), trial(0.70, early_stopped=True)]  # stopped by ASHA: scored at the stop
    left_out = [trial(0.99, status="diverged"), trial(0.99, status="oom"), trial(None),
                trial(float("nan")), trial(0.99, role="confirm"), trial(0.99, weights="random"),
                trial(0.99, method="full", weights="random")]
    rows = evp.evp_rows(kept + left_out)
    assert {(r["method"], r["k"], r["n_trials"]) for r in rows} == {("lora", 1, 2), ("lora", 2, 2)}
    assert max(r["expected_best"] for r in rows) < 0.70
    assert evp.evp_rows(left_out) == []


def test_no_scores_is_an_error_not_a_number():
    with pytest.raises(ValueError):
        evp.expected_max([], 1)
