"""Where a study's results live: a local folder or a cloud URI (s3://, gs://), one code path for both.

Everything a study keeps (Tune's experiment, `plan.json`, the Parquet tables, verdicts,
figures, the activation caches) is written through pyarrow's filesystems, which Ray Tune
uses too, so `--storage s3://bucket/prefix` puts it all in the bucket and `ray down` loses
nothing. An S3-compatible endpoint (MinIO, Ceph, moto), region and credentials come only
from the standard AWS environment (`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`) or an instance profile: no
setting of ours, and no credential is ever written anywhere.

Writes are atomic — a reader sees the old object or the new one, never half: a local
file is written beside its target and renamed over it; an S3 object is one PUT (S3 has no
rename; an object larger than one upload part is a multipart upload, which also becomes
visible only when complete).
"""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(OSError):
    """The storage cannot be reached, read or written: one line saying which and why."""


def is_uri(where: str | Path) -> bool:
    """A cloud URI (`s3://...`); local paths and `file://` are not."""
    text = str(where)
    return "://" in text and not text.startswith("file://")


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


@dataclass(frozen=True)
class Location:
    """A file or folder in a local or cloud filesystem: `uri` for people, (`fs`, `path`) for pyarrow."""

    uri: str
    fs: pafs.FileSystem
    path: str

    @classmethod
    def of(cls, where: str | Path | Location) -> Location:
        if isinstance(where, Location):
            return where
        text = str(where)
        if not is_uri(text):
            local = Path(text.removeprefix("file://")).expanduser().resolve()
            return cls(str(local), pafs.LocalFileSystem(), local.as_posix())
        uri = text.rstrip("/")
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except (OSError, ValueError) as e:  # unknown scheme, malformed URI, unresolvable bucket region
            raise StorageError(f"storage {uri!r}: {_one_line(e)}") from None
        if isinstance(fs, pafs.S3FileSystem):
            # The same options (from_uri's reading of the environment), but opened lazily, so an object
            # smaller than one part is a single PutObject instead of a multipart upload. The pickle
            # protocol is pyarrow's public way to copy a filesystem's options (no credential is in them
            # unless they were given explicitly, which we never do).
            rebuild, (options,) = fs.__reduce__()
            fs = rebuild({**options, "allow_delayed_open": True})
        return cls(uri, fs, path.rstrip("/"))

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path:
        if not self.local:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.path)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.uri.rsplit("/", 1)[0], self.fs, self.path.rsplit("/", 1)[0])

    def __truediv__(self, name: str) -> Location:
        name = name.strip("/")
        return Location(f"{self.uri}/{name}", self.fs, f"{self.path}/{name}")

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        """A local Location is a path (open, pq.read_table, Path); a cloud one is not."""
        if not self.local:
            raise TypeError(f"{self.uri} is not a local path")
        return self.path

    # ------------------------------------------------------------------ reading

    def _info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as e:
            raise StorageError(f"{self.uri}: {_one_line(e)}") from None

    def exists(self) -> bool:
        """A file, or a folder (on S3: a prefix with objects under it)."""
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def size(self) -> int:
        return self._info().size

    def list(self) -> list[str]:
        """Names directly under this folder (empty if there is none)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError as e:
            raise StorageError(f"{self.uri}: {_one_line(e)}") from None
        return sorted(i.base_name for i in infos)

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            if self._info().type == pafs.FileType.NotFound:
                raise FileNotFoundError(self.uri) from None
            raise StorageError(f"{self.uri}: {_one_line(e)}") from None

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def read_parquet(self) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes()))

    def download(self, dest: Path) -> Path:
        """Copy this file to a local path (atomically there too)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            pafs.copy_files(self.path, str(tmp), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem(), use_threads=False)
            os.replace(tmp, dest)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"{self.uri}: {_one_line(e)}") from None
        return dest

    # ------------------------------------------------------------------ writing (atomic)

    def write_bytes(self, data: bytes) -> Location:
        try:
            if not self.local:  # one upload: the object appears whole or not at all
                with self.fs.open_output_stream(self.path) as f:
                    f.write(data)
                return self
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{self.path.rsplit('/', 1)[0]}/.{self.name}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                self.fs.move(tmp, self.path)  # rename(2): atomic on one filesystem
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as e:
            raise StorageError(f"cannot write {self.uri}: {_one_line(e)}") from None
        return self

    def write_text(self, text: str) -> Location:
        return self.write_bytes(text.encode())

    def write_json(self, obj: Any) -> Location:
        return self.write_bytes(json.dumps(obj, indent=2, default=str).encode())

    def write_parquet(self, table: pa.Table) -> Location:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return self.write_bytes(sink.getvalue().to_pybytes())

    def upload(self, src: Path) -> Location:
        """Copy a local file here, streamed (shards can be large), atomically as `write_bytes`."""
        target = self.path if not self.local else f"{self.path.rsplit('/', 1)[0]}/.{self.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            if self.local:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(str(src), target, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs, use_threads=False)
            if self.local:
                self.fs.move(target, self.path)
        except OSError as e:
            if self.local and os.path.exists(target):
                os.unlink(target)
            raise StorageError(f"cannot write {self.uri}: {_one_line(e)}") from None
        return self

    def delete(self) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"cannot delete {self.uri}: {_one_line(e)}") from None

    def check_writable(self) -> None:
        """Write and delete a probe object: an unreachable endpoint, wrong credentials, a missing bucket or
        a read-only folder is one StorageError line, before anything is started."""
        probe = self / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"ok")
            probe.delete()
        except StorageError as e:
            reason = str(e).removeprefix(f"cannot write {probe.uri}: ").removeprefix(f"cannot delete {probe.uri}: ")
            raise StorageError(f"storage {self.uri!r} is not writable: {reason}") from None


def tune_storage(study: Location) -> tuple[str, pafs.FileSystem]:
    """(storage_path, storage_filesystem) for Ray Tune: the very filesystem the study's tables go through."""
    return study.path, study.fs
