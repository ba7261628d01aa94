"""Frozen-backbone activation cache: a side method's taps, computed once, read by every epoch of every trial.

For READ, LST and SHERL (below its last block) the frozen backbone's forward depends on
nothing that trains, so a hyperparameter search needs it once per example, not once per
step. A cache holds one split's taps φ_0..φ_k (backbone in eval mode) and is named by a
content fingerprint of everything they depend on (`CacheKey`): backbone config and
weights revision, the tokenised rows and labels (which pin task, split, train_size,
seed, tokenizer and max length; those are also recorded by name), the tap set, which
positions are kept, and the storage dtype.

Encoder–decoders (T5): the encoder's taps are stored as above; the frozen decoder's taps over
every candidate target (the class words, `targets` in the key) are stored beside them in
`decoder` [examples·C·T, K_dec, d] (a fixed C·T rows per example), read back as `Taps.decoder`.

Two exact savings shape the storage: only real tokens are kept (packed, no padding;
batches are re-padded when read), and for token-local methods with first/last pooling
(READ) only the pooled position: L×d per example instead of L×T×d.

Layout: `<root>/<fingerprint>/shard-NNNNN.safetensors` + `manifest.json`. A shard holds
`taps` [rows, K, d] (rows: the real tokens of its examples, or one per example),
`lengths` (real tokens per example) and `labels`; reads are memory-mapped. Shards are
written into a staging folder, the manifest (with per-shard sha256) last, and the folder
is renamed into place under a file lock: readers never see a partial cache, concurrent
builders wait for the first one, and a stale, partial or corrupted cache fails
`verify` and is rebuilt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import datasets
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from trainables.backbones import BackboneSpec, file_lock
from trainables.energy import EnergyMeter
from trainables.methods.base import SideModel, Taps, collect_taps, pooled_positions
from trainables.zero import input_device, is_partitioned, lockstep

FORMAT = 1
MANIFEST = "manifest.json"
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHARD_BYTES = 256 * 2**20  # target shard size: a shard is assembled in memory before it is written
Positions = Literal["all", "first", "last"]
# write_shards(staging folder or storage URI, example ranges) -> one manifest record per range, in order
ShardWriter = Callable[[Path | str, list[range]], list[dict[str, Any]]]


@dataclass(frozen=True)
class CacheKey:
    """Everything a split's taps depend on; its fingerprint names the cache folder."""

    backbone: str
    backbone_config: str  # sha256 of the HF config dict
    weights: str  # revision: the asset archive's sha256, or random:seed=...
    compute_dtype: str  # the backbone's dtype when the taps were computed
    tokenizer: str
    task: str
    split: str
    train_size: int | None
    seed: int
    max_length: int
    data: str  # sha256 of the tokenised rows and labels
    taps: tuple[int, ...]
    positions: Positions
    dtype: str  # storage dtype
    format: int = FORMAT
    decoder_taps: tuple[int, ...] = ()  # encoder–decoders: the frozen decoder's φ_i, over every candidate ...
    targets: tuple[tuple[int, ...], ...] = ()  # ... target: the class words' token ids (trainables.text2text)
    quant: str = "none"  # a quantised backbone's taps are their own cache (none | int8 | nf4) ...
    quant_double: bool = False  # ... and NF4 with double quantisation another

    # Recorded, not hashed: the data digest already pins the rows they select, and the weights
    # revision the random draw, so trials that differ only here share one cache.
    INFORMATIONAL = ("train_size", "seed")

    def fingerprint(self) -> str:
        parts = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.INFORMATIONAL
                 and not (k in ("decoder_taps", "targets", "quant_double") and not v)
                 and not (k == "quant" and v == "none")}  # single-stack, full-precision keys hash as before
        blob = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def data_digest(split: datasets.Dataset) -> str:
    table = split.to_dict()
    return _sha([table["input_ids"], table["labels"]])


def weights_revision(spec: BackboneSpec, weights: str, seed: int, backbone: nn.Module,
                     revision: str | None = None) -> str:
    """Pretrained: the repo (or folder) and the resolved revision it was loaded at (a hub commit).
    Random: a digest of the drawn values themselves (a sample of every tensor), so two builds that
    drew differently never share a cache; a partitioned (ZeRO) random backbone has no local values
    to sample: its seed names it."""
    if weights == "pretrained":
        return f"{spec.hf_id or spec.folder}@{revision or hub_revision(spec)}"
    if is_partitioned(backbone):
        return f"random:seed={seed}:torch={torch.__version__}:zero-init"
    h = hashlib.sha256()
    for name, p in backbone.named_parameters():
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return f"random:{h.hexdigest()[:32]}"


def hub_revision(spec: BackboneSpec) -> str:
    """The commit a trial's weights will be, without the weights: a folder's digest, the commit of this
    machine's hub cache (its refs, offline), else the hub's metadata (`model_info`). A GPU-less head names
    a 13 GB backbone's caches this way instead of downloading it."""
    from trainables.backbones import _cached_snapshot, folder_revision

    if spec.folder is not None:
        return folder_revision(Path(spec.folder))
    cached = _cached_snapshot(spec.hf_id, spec.revision, ["config.json"])  # named by its commit
    if cached is not None:
        return cached.name
    from huggingface_hub import HfApi

    return HfApi().model_info(spec.hf_id, revision=spec.revision).sha


def tokenizer_revision(spec: BackboneSpec) -> str:
    from trainables.backbones import tokenizer_revision as revision

    return revision(spec)


def tap_request(model: SideModel) -> tuple[tuple[int, ...], Positions]:
    """The taps a side model needs (φ_0 up to its deepest, so methods can share) and which positions."""
    if model.text2text:  # every real source token; the decoder's taps are asked for by `decoder_request`
        return tuple(range(max(model.tap_layers(), default=-1) + 1)), "all"
    deepest = max(model.tap_layers())
    pooled = model.token_local and model.pooling != "mean"
    return tuple(range(deepest + 1)), model.pooling if pooled else "all"


def decoder_request(model: SideModel) -> dict[str, Any]:
    """Encoder–decoders: the decoder taps (φ_0 up to the deepest) and the candidate targets they are read on."""
    if not model.text2text:
        return {}
    words = model.words
    targets = tuple(tuple(t[m].tolist()) for t, m in zip(words.target, words.mask, strict=True))
    return {"decoder_taps": tuple(range(max(model.decoder_tap_layers()) + 1)), "targets": targets}


class CacheSettings(Protocol):
    """The trial settings a cache depends on (trainables.loop.RunConfig has them)."""

    task: str
    train_size: int | None
    seed: int
    max_length: int
    cache_dtype: str


def trial_keys(model: SideModel, spec: BackboneSpec, cfg: CacheSettings, splits: dict[str, datasets.Dataset], *,
               weights: str, revision: str | None = None) -> dict[str, CacheKey]:
    """One key per split the trial reads. With pretrained weights `model` may live on the meta device."""
    taps, positions = tap_request(model)
    compute_dtype = next(model.backbone.parameters()).dtype
    common = dict(backbone=spec.name, backbone_config=_sha(spec.config),
                  weights=weights_revision(spec, weights, cfg.seed, model.backbone, revision),
                  compute_dtype=str(compute_dtype).removeprefix("torch."),
                  tokenizer="none" if cfg.task == "synthetic" else tokenizer_revision(spec),
                  task=cfg.task, train_size=cfg.train_size, seed=cfg.seed, max_length=cfg.max_length,
                  taps=taps, positions=positions, dtype=cfg.cache_dtype, **decoder_request(model),
                  quant=getattr(cfg, "quant", "none"), quant_double=getattr(cfg, "quant_double", False))
    return {name: CacheKey(split=name, data=data_digest(ds), **common) for name, ds in splits.items()}


def candidates(key: CacheKey, n_layers: int) -> list[CacheKey]:
    """A cache with every tap (φ_0..φ_L) also serves a method that needs fewer (LST's serves SHERL).

    Encoder–decoder caches are looked up by their own tap sets only."""
    if key.decoder_taps:
        return [key]
    full = dataclasses.replace(key, taps=tuple(range(n_layers + 1)))
    return [key] if full == key else [key, full]


# --------------------------------------------------------------------------- sizes

def lengths_of(split: datasets.Dataset) -> np.ndarray:
    return np.array([len(r) for r in split["input_ids"]], dtype=np.int64)


def estimate_bytes(lengths: np.ndarray, n_taps: int, d: int, positions: Positions, dtype: str) -> int:
    """Bytes on disk before building: packed real tokens, or one position per example."""
    rows = int(lengths.sum()) if positions == "all" else len(lengths)
    return rows * n_taps * d * STORAGE_DTYPES[dtype].itemsize


def padded_bytes(n_examples: int, n_taps: int, d: int, max_length: int, dtype: str) -> int:
    """What a naive cache (every position up to max_length) would take: the baseline of the savings."""
    return n_examples * max_length * n_taps * d * STORAGE_DTYPES[dtype].itemsize


def key_bytes(key: CacheKey, lengths: np.ndarray, d: int) -> int:
    """Bytes on disk of the cache for `key`: `estimate_bytes`, plus an encoder–decoder's decoder taps."""
    decoder_rows = len(lengths) * len(key.targets) * max((len(t) for t in key.targets), default=0)
    return (estimate_bytes(lengths, len(key.taps), d, key.positions, key.dtype)
            + decoder_rows * len(key.decoder_taps) * d * STORAGE_DTYPES[key.dtype].itemsize)


def shard_ranges(lengths: np.ndarray, key: CacheKey, d: int, shard_bytes: int = SHARD_BYTES) -> list[range]:
    per_example = max(1, key_bytes(key, lengths, d) // max(1, len(lengths)))
    size = max(1, shard_bytes // per_example)
    return [range(a, min(a + size, len(lengths))) for a in range(0, len(lengths), size)]


# --------------------------------------------------------------------------- verify, lock, commit

_VERIFIED: dict[tuple, bool] = {}  # per process: a reused Ray actor hashes a cache once


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(2**22):
            h.update(chunk)
    return h.hexdigest()


def verify(folder: Path, key: CacheKey) -> str | None:
    """None if `folder` is a complete cache for `key`; else why not (missing, stale, partial, corrupted)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "no cache" if not folder.exists() else "no manifest (partial build)"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    if manifest.get("format") != FORMAT or manifest.get("fingerprint") != key.fingerprint():
        return "stale (fingerprint or format differs)"
    stamp = [folder.as_posix()]
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        try:
            st = path.stat()
        except FileNotFoundError:
            return f"{shard['file']} missing"
        if st.st_size != shard["bytes"]:
            return f"{shard['file']} has {st.st_size} bytes, manifest says {shard['bytes']} (truncated?)"
        stamp.append((shard["file"], st.st_size, st.st_mtime_ns))
    if tuple(stamp) not in _VERIFIED:
        for shard in manifest["shards"]:
            if _sha256_file(folder / shard["file"]) != shard["sha256"]:
                return f"{shard['file']} checksum mismatch (corrupted)"
        _VERIFIED[tuple(stamp)] = True
    return None


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    """An exclusive lock per cache name: a second builder blocks until the first has committed."""
    with file_lock(root / f".{name}.lock"):
        yield


def manifest_of(key: CacheKey, lengths: np.ndarray, records: list[dict[str, Any]], build_s: float,
                joules: float | None, energy_source: str) -> dict[str, Any]:
    """What marks a cache complete, written last: the key, every shard with its size and sha256, the build's cost."""
    return {"format": FORMAT, "fingerprint": key.fingerprint(), "key": dataclasses.asdict(key),
            "examples": len(lengths), "tokens": int(lengths.sum()), "shards": records,
            "bytes": sum(r["bytes"] for r in records), "build_s": round(build_s, 3),
            "build_energy_joules": joules, "build_energy_source": energy_source, "created_at": time.time()}


def metered(records: list[dict[str, Any]], meter: EnergyMeter) -> tuple[float | None, str]:
    """A build's energy: what the builders metered on their own devices (each record's `energy_joules`,
    summed), or else this process's meter (a trial building with its own backbone)."""
    joules = meter.stop()
    sources = {r.get("energy_source") for r in records}
    if not records or None in sources:
        return joules, meter.source
    per = [r.get("energy_joules") for r in records]
    source = "+".join(sorted(sources))
    return (None if None in per or "none" in sources else float(sum(per))), source


def ensure(root: Path, key: CacheKey, lengths: np.ndarray, d: int, write_shards: ShardWriter,
           shard_bytes: int = SHARD_BYTES) -> tuple[Path, str]:
    """The valid cache folder for `key`, building it if needed; returns (folder, what happened)."""
    root.mkdir(parents=True, exist_ok=True)
    name = key.fingerprint()
    final = root / name
    if verify(final, key) is None:
        return final, "hit"
    with _locked(root, name):
        why = verify(final, key)
        if why is None:
            return final, "hit (built concurrently)"
        shutil.rmtree(final, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.building-"))
        try:
            start = time.perf_counter()
            meter = EnergyMeter("cuda" if torch.cuda.is_available() else "cpu").start()  # the builders' node
            records = write_shards(staging, shard_ranges(lengths, key, d, shard_bytes))
            joules, source = metered(records, meter)
            manifest = manifest_of(key, lengths, records, time.perf_counter() - start, joules, source)
            tmp = staging / f".{MANIFEST}.tmp"
            tmp.write_text(json.dumps(manifest, indent=1))
            os.replace(tmp, staging / MANIFEST)  # the manifest last: it is what marks a cache complete
            os.chmod(staging, 0o755)  # mkdtemp makes it private; other users' trials read it
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final, f"built ({why})"


# --------------------------------------------------------------------------- computing taps

@dataclass(frozen=True)
class Batch:
    """Examples (indices into a shard) padded into one forward."""

    index: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def plan_batches(rows: Sequence[Sequence[int]], pad_token_id: int, batch_size: int) -> list[Batch]:
    """Length-sorted batches (little padding to compute); the shard restores the original order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = []
    for a in range(0, len(order), batch_size):
        idx = order[a:a + batch_size]
        width = max(1, max(len(rows[i]) for i in idx))
        ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, :len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
            mask[j, :len(rows[i])] = 1
        out.append(Batch(idx, ids, mask))
    return out


def extract(backbone: nn.Module, spec: BackboneSpec, batch: Batch,
            key: CacheKey) -> list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example of `batch`: its kept rows [rows, K, d] in the storage dtype (backbone in eval mode);
    encoder–decoders: (encoder rows, decoder rows [C·T, K_dec, d]) per example."""
    device = input_device(backbone)
    mask = batch.attention_mask.to(device)
    if key.decoder_taps:
        return _extract_t2t(backbone, spec, batch.input_ids.to(device), mask, key)
    pos = None if key.positions == "all" else pooled_positions(mask, key.positions)
    taps = collect_taps(backbone, spec, batch.input_ids.to(device), mask, key.taps, pos)
    stacked = torch.stack([taps.hidden[i] for i in key.taps], dim=2).to(STORAGE_DTYPES[key.dtype]).cpu()
    rows = taps.attention_mask.sum(1).tolist()  # real tokens, or 1 for the pooled position
    return [stacked[j, :n] for j, n in enumerate(rows)]


def _extract_t2t(model: nn.Module, spec: BackboneSpec, ids: torch.Tensor, mask: torch.Tensor,
                 key: CacheKey) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from trainables.methods.base import collect_taps_t2t
    from trainables.text2text import LabelWords

    words = LabelWords(key.targets, int(spec.config.get("decoder_start_token_id") or 0)).to(ids.device)
    taps = collect_taps_t2t(model, spec, ids, mask, key.taps, key.decoder_taps, words)
    dtype = STORAGE_DTYPES[key.dtype]
    enc = (torch.stack([taps.hidden[i] for i in key.taps], dim=2) if key.taps
           else taps.decoder[key.decoder_taps[0]].new_zeros(*ids.shape, 0, spec.d_model))
    enc = enc.to(dtype).cpu()
    dec = torch.stack([taps.decoder[i] for i in key.decoder_taps], dim=2).to(dtype).cpu()  # (B·C)×T×K×d
    dec = dec.reshape(ids.shape[0], -1, *dec.shape[2:])  # per example: C·T rows
    return [(enc[j, :n], dec[j]) for j, n in enumerate(mask.sum(1).tolist())]


def save_shard(path: Path, pieces: dict[int, Any], rows: Sequence[Sequence[int]],
               labels: torch.Tensor) -> dict[str, Any]:
    """Write one shard (examples in their original order) and return its manifest record."""
    ordered = [pieces[i] for i in range(len(rows))]
    tensors = {}
    if isinstance(ordered[0], tuple):  # encoder–decoder: (encoder rows, decoder rows) per example
        ordered, decoder = zip(*ordered, strict=True)
        tensors["decoder"] = torch.cat(decoder).contiguous()
    taps = torch.cat(ordered)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    save_file({"taps": taps.contiguous(), "lengths": lengths, "labels": labels.contiguous(), **tensors}, str(path))
    return {"file": path.name, "examples": len(rows), "rows": taps.shape[0], "bytes": path.stat().st_size,
            "sha256": _sha256_file(path)}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def n_batches(ranges: Sequence[range], batch_size: int) -> int:
    """Forward calls `write_shards` makes for these shards (what ZeRO ranks must agree on)."""
    return sum(-(-len(r) // batch_size) for r in ranges)


def write_shards(backbone: nn.Module, spec: BackboneSpec, split: datasets.Dataset, key: CacheKey, staging: Path,
                 shards: Sequence[tuple[int, range]], *, pad_token_id: int, batch_size: int,
                 per_rank: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Compute and write the numbered shards given (backbone in eval mode); returns their records.

    With several ZeRO ranks, `per_rank` holds every rank's `n_batches`: this rank keeps
    making (discarded) forwards until the busiest rank is done.
    """
    table = split.to_dict()
    labels = torch.tensor(table["labels"])
    spans = dict(shards)
    rows = {s: table["input_ids"][r.start:r.stop] for s, r in shards}
    work = [(s, b) for s, r in shards for b in plan_batches(rows[s], pad_token_id, batch_size)]
    filler = (-1, Batch([0], torch.full((1, 1), pad_token_id), torch.ones(1, 1, dtype=torch.long)))
    pieces: dict[int, dict[int, torch.Tensor]] = {s: {} for s, _ in shards}
    records: dict[int, dict[str, Any]] = {}
    was_training = backbone.training
    backbone.eval()
    try:
        for (s, batch), real in lockstep(work, per_rank or [len(work)], filler):
            out = extract(backbone, spec, batch, key)
            if not real:
                continue
            pieces[s].update(zip(batch.index, out, strict=True))
            if len(pieces[s]) == len(rows[s]):  # shard complete: write it, free its memory
                span = spans[s]
                records[s] = save_shard(staging / shard_name(s), pieces.pop(s), rows[s], labels[span.start:span.stop])
    finally:
        backbone.train(was_training)
    return [records[s] for s, _ in shards]


def local_writer(backbone: nn.Module, spec: BackboneSpec, split: datasets.Dataset, key: CacheKey,
                 pad_token_id: int, batch_size: int) -> ShardWriter:
    """Every shard in this process with this backbone (a trial building its own cache)."""

    def write(staging: Path, ranges: list[range]) -> list[dict[str, Any]]:
        return write_shards(backbone, spec, split, key, staging, list(enumerate(ranges)),
                            pad_token_id=pad_token_id, batch_size=batch_size)

    return write


# --------------------------------------------------------------------------- reading

class TapReader:
    """One split's cached taps, memory-mapped; `batches` yields what `SideModel.forward_taps` consumes."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        key = self.manifest["key"]
        self.layers: tuple[int, ...] = tuple(key["taps"])
        self.positions: Positions = key["positions"]
        self.decoder_layers: tuple[int, ...] = tuple(key.get("decoder_taps", ()))
        files = [safe_open(str(self.folder / s["file"]), framework="pt") for s in self.manifest["shards"]]
        self._files = files  # keep the mappings open as long as the views below
        self._shards = [f.get_tensor("taps") for f in files]  # zero-copy views of the mapped files
        self._decoder = [f.get_tensor("decoder") for f in files] if self.decoder_layers else []
        if self.decoder_layers:  # the candidates' target mask, C×T, as text2text.LabelWords pads it
            targets = key["targets"]
            width = max(len(t) for t in targets)
            self._target_mask = torch.tensor([[k < len(t) for k in range(width)] for t in targets])
            counts = [f.get_tensor("lengths").numel() for f in files]
            self._local = [j for n in counts for j in range(n)]  # an example's index within its shard
        lengths = [f.get_tensor("lengths") for f in files]
        self.labels = torch.cat([f.get_tensor("labels") for f in files])
        self.lengths = torch.cat(lengths)
        rows = [n if self.positions == "all" else torch.ones_like(n) for n in lengths]
        self._shard_of = torch.cat([torch.full_like(n, s) for s, n in enumerate(rows)]).tolist()
        self._start = torch.cat([r.cumsum(0) - r for r in rows]).tolist()
        self._rows = torch.cat(rows).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return int(self.manifest["bytes"])

    def load(self) -> TapReader:
        """Copy the taps into memory (no more page faults on first touch)."""
        self._shards = [t.clone() for t in self._shards]
        self._decoder = [t.clone() for t in self._decoder]
        return self

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, Any]]:
        """{"taps", "labels", "lengths"} batches in `tasks.batches` order (same seed, same examples per batch).

        Packed rows are re-padded (zeros, right padding) to the longest example of each batch;
        a pooled cache gives T = 1 with an all-ones mask.
        """
        n = len(self)
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        for a in range(0, n, batch_size):
            idx = order[a:a + batch_size].tolist()
            rows = [self._rows[i] for i in idx]
            flat = torch.cat([self._shards[self._shard_of[i]].narrow(0, self._start[i], r)
                              for i, r in zip(idx, rows, strict=True)])
            width = max(rows)
            mask = torch.arange(width)[None, :] < torch.tensor(rows)[:, None]
            padded = flat.new_zeros(len(idx), width, *flat.shape[1:])
            padded[mask] = flat
            taps = Taps({layer: padded[:, :, k] for k, layer in enumerate(self.layers)}, mask.long())
            if self.decoder_layers:
                self._add_decoder(taps, idx)
            yield {"taps": taps, "labels": self.labels[idx], "lengths": self.lengths[idx]}

    def _add_decoder(self, taps: Taps, idx: list[int]) -> None:
        """The decoder's taps of these examples: (B·C)×T×d per layer, rows in LabelWords.expand order."""
        c, t = self._target_mask.shape
        rows = torch.stack([self._decoder[self._shard_of[i]].narrow(0, self._local[i] * c * t, c * t) for i in idx])
        rows = rows.reshape(len(idx) * c, t, *rows.shape[2:])
        taps.decoder = {layer: rows[:, :, k] for k, layer in enumerate(self.decoder_layers)}
        taps.decoder_mask = self._target_mask.repeat(len(idx), 1).long()


_OPEN: dict[tuple[str, int], TapReader] = {}  # per process: trials in a reused worker share one mapping


def build_costs(readers: Iterable[TapReader]) -> str:
    """JSON {cache id: {"s": build seconds, "joules": build energy or null}} of the caches a trial read."""
    return json.dumps({r.folder.name: {"s": r.manifest.get("build_s"), "joules": r.manifest.get("build_energy_joules")}
                       for r in readers}, sort_keys=True)


def open_reader(folder: Path) -> TapReader:
    """The process's reader of a (verified) cache folder; a rebuilt folder gets a new one."""
    stamp = (str(folder), (Path(folder) / MANIFEST).stat().st_mtime_ns)
    if stamp not in _OPEN:
        _OPEN[stamp] = TapReader(folder)
    return _OPEN[stamp]


def preload(folder: Path) -> TapReader:
    """Make this process's reader of `folder` an in-memory copy (benchmarks: side training alone)."""
    return open_reader(folder).load()


def forget() -> None:
    _OPEN.clear()


# --------------------------------------------------------------------------- a cache in cloud storage

def is_remote(root: str | Path | None) -> bool:
    """A cloud URI (s3://...): the study's storage, which every node of a cluster can read."""
    return root is not None and "://" in str(root) and not str(root).startswith("file://")


def fetch(uri: str, key: CacheKey, mirror: Path) -> Path | None:
    """This node's verified copy of the cache for `key` published under `uri`, or None if none is published.

    The study's driver publishes a cache as shards under a per-build prefix and the manifest last,
    in one PUT (study.prepare): a manifest names only complete shards. Each node downloads it once,
    under the node's lock for that cache, into `mirror` (node-local disk), checks every shard's
    sha256 and renames the folder into place: trials then memory-map it like a local cache.
    """
    import pyarrow.fs as pafs  # only nodes reading a cloud cache need it

    name = key.fingerprint()
    final = mirror / name
    if verify(final, key) is None:
        return final
    fs, base = pafs.FileSystem.from_uri(f"{uri.rstrip('/')}/{name}")
    try:
        with fs.open_input_stream(f"{base}/{MANIFEST}") as fh:
            manifest = json.loads(fh.read())
    except FileNotFoundError:
        return None
    if manifest.get("format") != FORMAT or manifest.get("fingerprint") != name:
        return None
    mirror.mkdir(parents=True, exist_ok=True)
    with _locked(mirror, name):
        if verify(final, key) is None:
            return final  # another trial on this node fetched it meanwhile
        staging = Path(tempfile.mkdtemp(dir=mirror, prefix=f".{name}.fetching-"))
        try:
            local = []
            for shard in manifest["shards"]:
                file = shard["file"].rsplit("/", 1)[-1]
                pafs.copy_files(f"{base}/{shard['file']}", str(staging / file), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem(), use_threads=False)
                local.append({**shard, "file": file})
            (staging / MANIFEST).write_text(json.dumps({**manifest, "shards": local, "source": f"{uri}/{name}"}))
            why = verify(staging, key)
            if why is not None:
                raise RuntimeError(f"activation cache {uri}/{name} is damaged: {why}")
            shutil.rmtree(final, ignore_errors=True)
            os.chmod(staging, 0o755)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def published_step(uri: str, name: str) -> dict[str, Any] | None:
    """A live-step measurement the cache's builder published under `<uri>/steps/` (study.prepare), or None."""
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(f"{uri.rstrip('/')}/steps/{name}")
    try:
        with fs.open_input_stream(base) as fh:
            return json.loads(fh.read())
    except (FileNotFoundError, OSError):
        return None


# --------------------------------------------------------------------------- one trial

class TrialSettings(CacheSettings, Protocol):
    cache_dir: str | None
    cache_budget_bytes: int
    eval_batch_size: int


def default_root() -> Path:
    """PETL_STUDY_ACTIVATIONS, else `activations/` in the asset cache."""
    from trainables.assets import cache_dir

    env = os.environ.get("PETL_STUDY_ACTIVATIONS")
    return Path(env).expanduser() if env else cache_dir() / "activations"


def roots(cfg: TrialSettings) -> tuple[Path, str | None]:
    """The local cache folder a trial reads, and the cloud cache it mirrors (None: the folder is the cache)."""
    remote = cfg.cache_dir if is_remote(cfg.cache_dir) else None  # a cloud cache is mirrored to this node
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir and not remote else default_root()
    return root, remote


def lookup(root: Path, keys: dict[str, CacheKey], n_layers: int, remote: str | None = None) -> dict[str, Path]:
    """The verified cache folder of every split that has one (a full-taps cache serves fewer taps)."""
    found: dict[str, Path] = {}
    for name, key in keys.items():
        folder = next((root / k.fingerprint() for k in candidates(key, n_layers)
                       if verify(root / k.fingerprint(), k) is None
                       or (remote is not None and fetch(remote, k, root) is not None)), None)
        if folder is not None:
            found[name] = folder
    return found


def trial_root(cfg: TrialSettings) -> Path:
    return roots(cfg)[0]


def find(model: SideModel, spec: BackboneSpec, cfg: TrialSettings, splits: dict[str, datasets.Dataset], *,
         weights: str, revision: str | None = None) -> dict[str, TapReader] | None:
    """Readers for every split if all are cached, else None; builds nothing (the backbone may be on meta)."""
    keys = trial_keys(model, spec, cfg, splits, weights=weights, revision=revision)
    root, remote = roots(cfg)
    found = lookup(root, keys, spec.n_layers, remote)
    return {name: open_reader(folder) for name, folder in found.items()} if len(found) == len(keys) else None


def for_trial(model: SideModel, spec: BackboneSpec, cfg: TrialSettings, splits: dict[str, datasets.Dataset], *,
              weights: str, pad_token_id: int, revision: str | None = None) -> tuple[dict[str, TapReader] | None, str]:
    """Readers for every split (found, or built here with the trial's own backbone), or None and why not."""
    root, remote = roots(cfg)
    keys = trial_keys(model, spec, cfg, splits, weights=weights, revision=revision)
    found = lookup(root, keys, spec.n_layers, remote)
    missing = [name for name in keys if name not in found]
    statuses = ["hit"] if not missing else []
    if missing:
        sizes = {n: lengths_of(splits[n]) for n in missing}
        need = sum(key_bytes(keys[n], sizes[n], spec.d_model) for n in missing)
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if need > cfg.cache_budget_bytes:
            return None, (f"over budget: cache needs {need / 2**20:.1f} MiB > cache_budget_bytes "
                          f"{cfg.cache_budget_bytes / 2**20:.1f} MiB; backbone runs live")
        if need > 0.9 * free:
            return None, f"not enough disk: cache needs {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free"
        for name in missing:
            writer = local_writer(model.backbone, spec, splits[name], keys[name], pad_token_id, cfg.eval_batch_size)
            found[name], status = ensure(root, keys[name], sizes[name], spec.d_model, writer)
            statuses.append(f"{name} {status}")
    return {name: open_reader(folder) for name, folder in found.items()}, "; ".join(statuses)
