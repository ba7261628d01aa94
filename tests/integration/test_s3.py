"""Studies with `--storage s3://...` against a real S3 HTTP API on loopback (moto's server mode):
the tables land in the bucket, a SIGKILLed driver resumes from the URI, pandas and DuckDB read the
tables from S3, bad credentials or endpoints are one line before any trial, and no secret is stored."""

from __future__ import annotations

import time

import clis
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
from clis import cli_env
from s3server import moto_s3

pytestmark = pytest.mark.integration
HF_SECRET = "hf_PLANTED_not_a_real_token_4412"
STUDY = ["--backbones", "llama-tiny", "--max-model", "llama-tiny", "--methods", "full", "--task", "synthetic",
         "--trials-per-method", "2", "--epochs", "2", "--cost-runs", "none", "--batch-size", "16",
         "--no-memory-estimates", "--name", "resume", "--confirm-seeds", "0", "--train-size", "128"]


@pytest.fixture(scope="module")
def s3():
    with moto_s3("petl") as env:
        yield env


def objects(env: dict[str, str], prefix: str) -> list[pafs.FileInfo]:
    fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], region=env["AWS_REGION"],
                           access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"])
    return [i for i in fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
            if i.type == pafs.FileType.File], fs


def test_study_on_s3_survives_kill_and_resumes_from_the_uri(s3, monkeypatch, capsys):
    from study import runner, scaling

    env = cli_env(HF_TOKEN=HF_SECRET, **s3)
    storage = "s3://petl/studies"
    # killed once some trial has checkpointed an epoch into the bucket
    t_killed = clis.kill_when("study.scaling", *STUDY, "--storage", storage, env=env, grace_s=2, ready=lambda: any(
        "/checkpoint_" in i.path for i in objects(s3, "petl/studies/resume/tune")[0]))

    # without --resume: refused in one line (in-process: the check reads the bucket before Ray starts)
    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    code = runner.main_guard(lambda: scaling.main([*STUDY, "--storage", storage]))
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "already exists" in err and "--resume" in err
    import ray

    assert not ray.is_initialized()

    t1 = time.time()
    out = clis.run_cli("study.scaling", *STUDY, "--storage", storage, "--resume", timeout=400, env=env)
    t_resume = time.time() - t1
    assert out.returncode == 0, out.stderr[-4000:]
    assert "starts over" not in out.stderr  # killed after a checkpoint: Tune's saved state is read from the bucket
    files, fs = objects(s3, "petl/studies/resume")
    names = {i.path.removeprefix("petl/studies/resume/") for i in files}
    assert {"trials.parquet", "epochs.parquet", "plan.json"} <= names

    # pandas straight from the URI (pyarrow's S3 filesystem, credentials from the environment, set above)
    df = pd.read_parquet(f"{storage}/resume/trials.parquet").query("status != 'estimated'")
    assert len(df) == 2 and df.trial_id.is_unique and set(df.status) == {"ok"}, df[["trial_id", "status", "error"]]
    assert df.git_sha.notna().all() and df.git_dirty.notna().all()  # provenance from the driver
    ep = pd.read_parquet(f"{storage}/resume/epochs.parquet")
    assert not ep.duplicated(["trial_id", "epoch"]).any()
    runs = ep.groupby("trial_id").epoch.apply(list)
    assert all(e == list(range(1, len(e) + 1)) for e in runs), runs

    # DuckDB's SQL over the same objects (scanned through pyarrow's S3 filesystem: DuckDB's own httpfs
    # extension would be downloaded at first use, which this offline machine cannot do)
    import duckdb

    trials = ds.dataset("petl/studies/resume/trials.parquet", filesystem=fs)  # noqa: F841 (DuckDB reads it by name)
    epochs = ds.dataset("petl/studies/resume/epochs.parquet", filesystem=fs)  # noqa: F841
    t2 = time.time()
    rows = duckdb.sql("SELECT t.trial_id, t.epochs_run, count(e.epoch) AS n FROM trials t JOIN epochs e "
                      "USING (trial_id) WHERE t.status = 'ok' GROUP BY ALL ORDER BY 1").fetchall()
    t_duck = time.time() - t2
    assert len(rows) == 2 and all(run == n for _, run, n in rows), rows

    # no planted secret in any object of the study, nor in what the CLI printed
    for info in files:
        with fs.open_input_stream(info.path) as f:
            blob = f.read()
        for secret in (HF_SECRET, s3["AWS_SECRET_ACCESS_KEY"]):
            assert secret.encode() not in blob, f"secret leaked into {info.path}"
    for secret in (HF_SECRET, s3["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in out.stdout + out.stderr
    print(f"\nS3 round trip: killed after {t_killed:.1f}s, resume {t_resume:.1f}s, DuckDB join {t_duck:.3f}s, "
          f"{len(files)} objects")


@pytest.mark.parametrize("case", ["wrong secret", "unknown key", "no bucket", "unreachable"])
def test_bad_s3_is_one_line_exit_2_before_any_trial(case, s3, monkeypatch, capsys):
    from study import runner, scaling

    env = dict(s3)
    storage = "s3://petl/bad"
    if case == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif case == "unknown key":
        env["AWS_ACCESS_KEY_ID"] = "AKIANOSUCHKEY0000000"
    elif case == "no bucket":
        storage = "s3://no-such-bucket/x"
    else:
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t0 = time.time()
    code = runner.main_guard(lambda: scaling.main([*STUDY, "--storage", storage]))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: storage"), err
    assert "not writable" in lines[0] and time.time() - t0 < 30
    import ray

    assert not ray.is_initialized()  # refused before Ray, the plan or any trial


def test_concurrent_cache_builders_on_s3_never_corrupt_and_nodes_verify(s3, monkeypatch, tmp_path):
    """Two builders of the same cache at once (as two drivers, or nodes, would): each writes its own
    build prefix, the manifest PUT commits one; a node's fetch checks every shard's sha256."""
    import threading

    import numpy as np
    import torch

    from study import prepare
    from study.storage import Location
    from trainables import cache

    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    key = cache.CacheKey(backbone="t", backbone_config="c", weights="random:x", compute_dtype="float32",
                         tokenizer="none", task="synthetic", split="train", train_size=6, seed=0, max_length=4,
                         data="d", taps=(0, 1), positions="last", dtype="fp32")
    lengths = np.array([3, 2, 4, 1, 2, 3])
    both = threading.Barrier(2)

    def writer(n: int):
        def write(staging: str, ranges: list[range]) -> list[dict]:
            both.wait(timeout=30)  # the two builds overlap
            records = []
            for s, r in enumerate(ranges):
                local = tmp_path / f"w{n}" / cache.shard_name(s)
                local.parent.mkdir(exist_ok=True)
                pieces = {i: torch.full((1, 2, 4), float(r.start + i)) for i in range(len(r))}
                records.append(cache.save_shard(local, pieces, [[1] * int(lengths[j]) for j in r],
                                                torch.arange(len(r))))
                (Location.of(staging) / local.name).upload(local)
            return records
        return write

    root = Location.of("s3://petl/caches")
    results = []
    threads = [threading.Thread(target=lambda n=n: results.append(prepare.ensure_published(
        root, key, lengths, 4, writer(n), shard_bytes=3 * 2 * 4 * 4))) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(status for _, status in results) == ["built (no cache)"] * 2
    folder = root / key.fingerprint()
    assert len([n for n in folder.list() if n.startswith("build-")]) == 2 and prepare.published(folder, key) is None
    assert prepare.ensure_published(root, key, lengths, 4, writer(9))[1] == "hit"

    mirror = cache.fetch(root.uri, key, tmp_path / "node-a")
    reader = cache.TapReader(mirror)
    assert len(reader) == 6 and reader.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert cache.fetch(root.uri, key, tmp_path / "node-a") == mirror  # once per node
    manifest = (folder / cache.MANIFEST).read_json()
    shard = folder / manifest["shards"][0]["file"]
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 0xFF  # same size, other bytes: only the checksum can tell
    shard.write_bytes(bytes(blob))
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        cache.fetch(root.uri, key, tmp_path / "node-b")
    assert not [p for p in (tmp_path / "node-b").iterdir() if not p.name.startswith(".")]
