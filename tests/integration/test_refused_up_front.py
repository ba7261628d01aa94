"""Bad data and numbers with physical limits: one `error:` line, exit 2, before Ray starts, nothing
written (in-process: the checks run before any work). A learning rate that explodes is `diverged`."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from study import bench, count, runner
from trainables import loop


def _write(kind: str, folder: Path) -> str:
    """A task file of one bad kind; returns the --task value."""
    rows = {
        "one.csv": "text,label\n" + "".join(f"t {i},pos\n" for i in range(40)),
        "mixed.jsonl": "".join(json.dumps({"text": f"t {i}", "label": [0, 1, "neg", "pos"][i % 4]}) + "\n"
                               for i in range(40)),
        "head.csv": "text,label\n",
        "empty.csv": "",
        "fake.parquet": "text,label\na,1\n",
        "nolabel.csv": "text,y\n" + "".join(f"t {i},{i % 2}\n" for i in range(40)),
    }
    path = folder / kind
    if kind == "dir.csv":
        path.mkdir()
    elif kind == "latin.csv":
        path.write_bytes(b"text,label\n" + b"".join(b"caf\xe9 %d,%d\n" % (i, i % 2) for i in range(40)))
    else:
        path.write_text(rows[kind])
    return f"file:{path}"


@pytest.mark.parametrize("module,args,needle", [
    ("scaling", ["--task", "one.csv"], "a classifier needs 2 or more classes"),
    ("scaling", ["--task", "mixed.jsonl"], "the label column mixes"),
    ("scaling", ["--task", "head.csv"], "no rows (only a header?)"),
    ("scaling", ["--task", "empty.csv"], "the file is empty"),
    ("scaling", ["--task", "latin.csv"], "not UTF-8 text"),
    ("scaling", ["--task", "fake.parquet"], "not a Parquet file"),
    ("scaling", ["--task", "nolabel.csv"], "no column 'label'"),
    ("scaling", ["--task", "dir.csv"], "is a directory, not a file"),
    ("scaling", ["--seed", "-1"], "--seed must be 0 or more"),
    ("scaling", ["--max-length", "100000"], "exceeds minilm-l6's 512 positions"),
    ("scaling", ["--train-size", "100000"], "train_size=100000, but the training split has"),
    ("scaling", ["--name", "../x"], "--name must be one folder name"),
    ("scaling", ["--name", "/tmp/elsewhere"], "--name must be one folder name"),
    ("convergence", ["--seeds", "-1"], "--seeds must be 0 or more"),
    ("convergence", ["--sizes", "100000"], "train_size=100000, but the training split has"),
    ("convergence", ["--task", "one.csv"], "a classifier needs 2 or more classes"),
])
def test_refused_before_ray_nothing_written(module, args, needle, tmp_path, capsys):
    import ray

    args = [_write(a, tmp_path) if a in ("one.csv", "mixed.jsonl", "head.csv", "empty.csv", "latin.csv",
                                         "fake.parquet", "nolabel.csv", "dir.csv") else a for a in args]
    main = importlib.import_module(f"study.{module}").main
    storage = tmp_path / "r"
    code = runner.main_guard(lambda: main(["--quick", "--no-memory-estimates"] * (module == "scaling")
                                          + ["--storage", str(storage), *args]))
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert not ray.is_initialized()
    assert not storage.exists() or not any(storage.iterdir())
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--backbone", "minilm-l6", "--method", "lora", "--set", "r=99999999999999"], "more than 1e+12"),
    (["--backbone", "minilm-l6", "--method", "read", "--set", "hidden_size=100000000000"], "cannot be built"),
])
def test_count_refuses_sizes_no_machine_holds(argv, needle, capsys):
    assert count.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err, err


def test_bench_cache_missing_task_file_is_one_line(capsys):
    assert bench.main(["cache", "--task", "file:missing.csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: file task: no such file missing.csv", err


def test_exploding_learning_rate_is_diverged(tmp_path, one_thread):
    cfg = loop.RunConfig(backbone="llama-tiny", method="full", task="synthetic", lr=1e6, epochs=1, train_size=64,
                         max_length=16, measure_memory=False, device="cpu")
    summary = loop.train(cfg, tmp_path)
    assert summary["status"] == "diverged" and "exploded" in summary["error"], summary["error"]
