"""study.storage on the local filesystem (the same calls go to S3: tests/integration/test_s3.py)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from study.storage import Location, StorageError, is_uri


def test_local_round_trip_is_atomic_and_lists(tmp_path):
    root = Location.of(tmp_path / "a")
    assert root.local and root.local_path == (tmp_path / "a").resolve() and not root.exists()
    (root / "s" / "plan.json").write_json({"x": 1})
    (root / "s" / "t.parquet").write_parquet(pa.table({"v": [1, 2]}))
    (root / "s" / "plan.json").write_json({"x": 2})  # replaced whole
    assert (root / "s" / "plan.json").read_json() == {"x": 2}
    assert (root / "s" / "t.parquet").read_parquet().column("v").to_pylist() == [1, 2]
    assert pq.read_table(root / "s" / "t.parquet").num_rows == 2  # a local Location is a path
    assert root.list() == ["s"] and (root / "s").list() == ["plan.json", "t.parquet"]  # no temp file left
    assert (root / "s").exists() and not (root / "s").is_file() and (root / "s" / "plan.json").is_file()
    src = tmp_path / "blob"
    src.write_bytes(b"x" * 1000)
    assert (root / "s" / "blob").upload(src).size() == 1000
    assert (root / "s" / "blob").download(tmp_path / "copy").read_bytes() == b"x" * 1000
    with pytest.raises(FileNotFoundError):
        (root / "nope.json").read_bytes()
    assert (root / "nope").list() == []


def test_uris_and_unwritable_storage(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # else pyarrow asks AWS for the bucket's region
    assert is_uri("s3://b/p") and not is_uri("results") and not is_uri("file:///tmp/x")
    assert Location.of(f"file://{tmp_path}").path == tmp_path.resolve().as_posix()
    assert str(Location.of("s3://bucket/prefix/") / "study") == "s3://bucket/prefix/study"
    with pytest.raises(StorageError, match="not writable"):
        Location.of("/proc/no-such-dir").check_writable()
    with pytest.raises(TypeError, match="not a local path"):
        open(Location.of("s3://bucket/prefix"))  # noqa: SIM115
    with pytest.raises(StorageError, match="nope://"):
        Location.of("nope://x/y")
