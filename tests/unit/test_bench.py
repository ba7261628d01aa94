"""The benchmarks run for real on tiny backbones (their figures are printed, never asserted as times)."""

from __future__ import annotations

import json

import pytest

from study import bench
from trainables.methods import REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.mark.parametrize("argv,needle", [
    (["cache", "--methods", "nope"], "unknown method 'nope'"),
    (["cache", "--methods", "lora"], "cacheable: lst, probe, read, sherl"),
    (["cache", "--trials", "0"], "--trials must be 1 or more"),
    (["cache", "--task", "imdb"], "unknown task"),
    (["memory", "--backbone", "gpt-9"], "unknown backbone"),
    (["memory", "--batch-size", "0"], "--batch-size must be 1 or more"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_memory_bench_tracks_and_estimates_every_method_alike(capsys):
    argv = ["memory", "--json", "--backbone", "llama-tiny", "--seq-len", "32", "--paper-backbone", "",
            "--check-backbone", "bert-tiny", "--check-seq-len", "16"]
    assert bench.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["check"]["rows"]
    assert [r["method"] for r in rows][0] == "full" and len(rows) == len(REGISTRY)  # every method, full first
    for r in rows:
        assert "error" not in r, r
        assert abs(r["error_vs_tracked"]) <= 0.10, r  # fake-tensor accounting vs a real CPU step


def test_cache_bench_reads_the_cache_and_trains_the_same(capsys):
    """A fp32 cache: the cached sweep trains READ to the same results as the live one."""
    argv = ["cache", "--json", "--backbone", "llama-tiny", "--task", "synthetic", "--methods", "read",
            "--trials", "2", "--epochs", "2", "--train-size", "64", "--max-length", "16",
            "--max-eval-examples", "32", "--cache-dtype", "fp32", "--no-lora", "--threads", "1"]
    assert bench.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    read = out["read"]
    assert read["cached"]["best_metrics"] == read["uncached"]["best_metrics"]
    assert read["side_only"]["best_metrics"] == read["uncached"]["best_metrics"]
    assert read["positions"] == "last" and 0 < read["cache_bytes"] < read["padded_cache_bytes"]
    assert out["speedup"] == read["uncached_s"] / read["cached_s"] > 0
    assert set(out["sizes_per_1000"]) == {"minilm-l6", "smollm2-135m", "llama-7b"}
