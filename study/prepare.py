"""Build the activation caches a study's side-method trials read, once, before any trial starts.

For each group whose method is cacheable, the cache keys are computed exactly as its
trials will compute them (`trainables.loop` helpers: same task subsample, validation
subset, device, dtype, weights; `trainables.cache.trial_keys`). Groups on the same
backbone and task share caches: a group needing taps up to φ_{L-1} (SHERL) is served by
one holding φ_0..φ_L (LST), so such requests are merged. Every missing cache is built as
Ray tasks, one per shard, writing into a staging folder that `cache.ensure` commits under
the cache's lock; trials then only read (`cache_dir` in their run config).

The caches live in the study's storage, `<storage>/.activations/`, where every node can
read them: a local `--storage` must be one folder for all nodes (checked: one machine or
a shared file system); with cloud storage the shard tasks upload what they write and the
manifest is committed last (`ensure_published`), and each node's trials fetch a cache once
into a node-local mirror (`cache.fetch`).

A backbone under ZeRO-3 (`zero: on`, or auto when it does not fit a device) is built
partitioned; with `ranks > 1` the shards are spread over that many Ray actors forming
one torch.distributed group, kept in lockstep (`cache.write_shards(per_rank=...)`).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import ray
import torch

from study.launch import Group
from study.storage import Location, is_uri
from trainables import cache, loop, zero
from trainables.backbones import build, get_spec
from trainables.energy import EnergyMeter
from trainables.methods import apply_method, get_method
from trainables.trial import label_words, splits_read


@dataclass
class Need:
    """One cache to build, with what a builder needs to recompute the trial's backbone."""

    key: cache.CacheKey
    run: dict[str, Any]  # the group's RunConfig dict: the builder rebuilds the backbone from it
    split: datasets.Dataset
    pad_token_id: int
    zero: bool
    gpus: float = 0  # per builder, as the group's trials ask


def cache_root(study_folder: str) -> Location:
    """`<storage>/.activations` beside the study folders (shared by studies), local or cloud alike."""
    return Location.of(study_folder).parent / ".activations"


def needs_of(group: Group) -> list[Need]:
    """The caches one group's trials will ask for (none for graft methods or cache=false)."""
    cfg = loop.RunConfig.from_dict(group.run)
    info = get_method(cfg.method)
    if not (cfg.cache and info.cacheable):
        return []
    spec = get_spec(cfg.backbone)
    device, dtype, weights = loop.resolve(cfg)
    if group.resources.get("gpu"):
        device, dtype = torch.device("cuda"), {"fp32": torch.float32}.get(cfg.dtype, torch.bfloat16)
    task, validation = loop.load_data(cfg, spec)
    loop.seed_everything(cfg.seed)
    # random weights are named by their values: draw them as the trial will; pretrained ones need no weights
    backbone = build(spec, "cpu" if weights == "random" else "meta", dtype=dtype)
    model = apply_method(cfg.method, backbone, spec, cfg.method_config, n_labels=task.n_labels, pooling=cfg.pooling)
    if model.text2text and cfg.task != "synthetic":  # the task's class words, as the trial will score them
        model.set_label_words(label_words(cfg, spec, backbone, task))
    if not model.taps_frozen:
        return []
    splits = splits_read(cfg, task, validation)  # with eval_test (confirm runs) the test split too
    keys = cache.trial_keys(model, spec, cfg, splits, weights=weights)
    zero_on = cfg.zero == "on" or (cfg.zero == "auto" and device.type == "cuda" and torch.cuda.is_available()
                                   and zero.needed(spec, dtype, device))
    return [Need(keys[n], dict(group.run), split, task.pad_token_id, zero_on, group.resources.get("gpu", 0))
            for n, split in splits.items()]


def merged(needs: Sequence[Need]) -> list[Need]:
    """One build per cache: identical requests once; different tap sets on the same data become one all-taps cache."""
    by_data: dict[str, list[Need]] = {}
    for need in needs:
        full = cache.candidates(need.key, get_spec(need.key.backbone).n_layers)[-1]
        by_data.setdefault(full.fingerprint(), []).append(need)
    out = []
    for same in by_data.values():
        if len({n.key.fingerprint() for n in same}) == 1:
            out.append(same[0])
        else:
            full = cache.candidates(same[0].key, get_spec(same[0].key.backbone).n_layers)[-1]
            out.append(dataclasses.replace(same[0], key=full))
    return out


# --------------------------------------------------------------------------- the builders

def _backbone(need: Need) -> tuple[torch.nn.Module, Any]:
    """The trial's frozen backbone, drawn the same way (seeded first, for random weights)."""
    cfg = loop.RunConfig.from_dict(need.run)
    spec = get_spec(cfg.backbone)
    loop.seed_everything(cfg.seed)
    device, dtype, weights = loop.resolve(cfg)
    # ZeRO as planned for several ranks; otherwise decided here, on the builder's own device (zero.decide),
    # for pretrained weights (random ones drawn partitioned would differ from the draw the cache key names)
    mode = "on" if need.zero else (cfg.zero if weights == "pretrained" else "off")
    return loop.frozen_backbone(dataclasses.replace(cfg, zero=mode), spec, device, dtype, weights)


def _write(need: Need, staging: str, shards: list[tuple[int, range]], per_rank: list[int] | None,
           threads: int) -> list[dict[str, Any]]:
    """Build the backbone and write some shards (runs in a Ray task or a rank actor)."""
    torch.set_num_threads(threads)
    backbone, partitioned = _backbone(need)
    spec = get_spec(need.key.backbone)
    if not partitioned and need.key.weights.startswith("random:"):
        got = cache.weights_revision(spec, "random", need.key.seed, backbone)
        if got != need.key.weights:
            raise RuntimeError(f"builder drew other random weights than the trial ({got} != {need.key.weights})")
    cfg = loop.RunConfig.from_dict(need.run)
    try:
        if not is_uri(staging):  # a folder every node sees (one machine, or a shared file system)
            return cache.write_shards(backbone, spec, need.split, need.key, Path(staging), shards,
                                      pad_token_id=need.pad_token_id, batch_size=cfg.eval_batch_size,
                                      per_rank=per_rank)
        with tempfile.TemporaryDirectory(prefix="petl-shards-") as tmp:  # cloud: this node's disk, then one PUT each
            records = cache.write_shards(backbone, spec, need.split, need.key, Path(tmp), shards,
                                         pad_token_id=need.pad_token_id, batch_size=cfg.eval_batch_size,
                                         per_rank=per_rank)
            for record in records:
                (Location.of(staging) / record["file"]).upload(Path(tmp) / record["file"])
            return records
    finally:
        if partitioned is not None:
            partitioned.close()


def task_writer(need: Need, cpus: int = 1) -> cache.ShardWriter:
    """One Ray task per shard."""
    remote = ray.remote(num_cpus=cpus, num_gpus=need.gpus)(_write)

    def write(staging: Path, ranges: list[range]) -> list[dict[str, Any]]:
        refs = [remote.remote(need, str(staging), [(s, r)], None, cpus) for s, r in enumerate(ranges)]
        return [record for records in ray.get(refs) for record in records]

    return write


@ray.remote
class Rank:
    """One rank of a torch.distributed group (ZeRO-3 across several devices)."""

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), zero.free_port()

    def join(self, rank: int, world: int, master: tuple[str, int]) -> None:
        os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR=master[0],
                          MASTER_PORT=str(master[1]))

    def write(self, need: Need, staging: str, shards: list[tuple[int, range]], per_rank: list[int],
              threads: int) -> list[dict[str, Any]]:
        return _write(need, staging, shards, per_rank, threads)


def start_ranks(ranks: int, cpus: int = 1, gpus: float = 0) -> list[Any]:
    """`ranks` actors joined into one torch.distributed group (rank 0's node is the master)."""
    actors = [Rank.options(num_cpus=cpus, num_gpus=gpus).remote() for _ in range(ranks)]
    try:
        master = ray.get(actors[0].address.remote())
        ray.get([a.join.remote(r, ranks, master) for r, a in enumerate(actors)])
    except BaseException:  # none left holding a device
        for a in actors:
            ray.kill(a)
        raise
    return actors


def rank_writer(need: Need, actors: Sequence[Any], cpus: int = 1) -> cache.ShardWriter:
    """Shards spread round-robin over the rank actors, each holding its partition of the backbone."""

    def write(staging: Path, ranges: list[range]) -> list[dict[str, Any]]:
        n = len(actors)
        mine = [[(s, r) for s, r in enumerate(ranges) if s % n == k] for k in range(n)]
        batch_size = loop.RunConfig.from_dict(need.run).eval_batch_size
        per_rank = [cache.n_batches([r for _, r in m], batch_size) for m in mine]
        out = ray.get([a.write.remote(need, str(staging), m, per_rank, cpus) for a, m in zip(actors, mine, strict=True)])
        records = {rec["file"]: rec for recs in out for rec in recs}
        return [records[cache.shard_name(s)] for s in range(len(ranges))]

    return write


class NoRoom(ValueError):
    """The Ray cluster cannot seat the requested ZeRO ranks."""


def check_room(ranks: int, cpus: int, gpus: float) -> None:
    """Rank actors start together and wait for each other: refuse what the cluster can never seat."""
    have = ray.cluster_resources()
    if have.get("CPU", 0) < ranks * cpus or have.get("GPU", 0) < ranks * gpus:
        raise NoRoom(f"{ranks} ZeRO ranks need {ranks * cpus} CPUs and {ranks * gpus:g} GPUs; the Ray cluster "
                         f"has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs (lower --zero-ranks)")


def published(folder: Location, key: cache.CacheKey) -> str | None:
    """None if `folder` (cloud) holds a complete cache for `key`: its manifest, and every shard it names at
    its size (readers check the sha256 when they fetch); else why not."""
    try:
        manifest = (folder / cache.MANIFEST).read_json()
    except FileNotFoundError:
        return "no cache"
    except ValueError as e:
        return f"unreadable manifest ({e})"
    if manifest.get("format") != cache.FORMAT or manifest.get("fingerprint") != key.fingerprint():
        return "stale (fingerprint or format differs)"
    for shard in manifest["shards"]:
        where = folder / shard["file"]
        if not where.is_file() or where.size() != shard["bytes"]:
            return f"{shard['file']} missing or truncated"
    return None


def ensure_published(root: Location, key: cache.CacheKey, lengths: Any, d: int, writer: cache.ShardWriter,
                     shard_bytes: int = cache.SHARD_BYTES) -> tuple[Location, str]:
    """`cache.ensure` for cloud storage, which has neither locks nor rename: each build writes its shards
    under its own prefix (`build-<id>/`) and commits with one PUT of the manifest naming them. Concurrent
    builders (other drivers, other nodes) each leave a complete build; the last manifest wins, and no
    manifest ever names a partial one."""
    folder = root / key.fingerprint()
    why = published(folder, key)
    if why is None:
        return folder, "hit"
    build = folder / f"build-{uuid.uuid4().hex[:12]}"
    start = time.perf_counter()
    meter = EnergyMeter("cuda" if torch.cuda.is_available() else "cpu").start()  # as cache.ensure measures
    records = writer(build.uri, cache.shard_ranges(lengths, key, d, shard_bytes))
    joules = meter.stop()
    records = [{**r, "file": f"{build.name}/{r['file']}"} for r in records]
    (folder / cache.MANIFEST).write_json(cache.manifest_of(key, lengths, records, time.perf_counter() - start,
                                                           joules, meter.source))
    return folder, f"built ({why})"


class NotShared(ValueError):
    """A local --storage that some node of the Ray cluster cannot see."""


def check_shared(root: Path) -> None:
    """Shard writers and trials may run on any node: a local cache folder must be the same on every one
    (one machine, or a shared file system). A marker written here must be visible from each live node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if nodes == [ray.get_runtime_context().get_node_id()]:
        return  # one node, the driver's own
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f".visible-{uuid.uuid4().hex[:8]}"
    marker.write_text("ok")
    sees = ray.remote(num_cpus=0)(os.path.exists)  # by reference: the workers import nothing of ours
    try:
        seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                        .remote(str(marker)) for n in nodes])
    finally:
        marker.unlink(missing_ok=True)
    blind = [n[:8] for n, ok in zip(nodes, seen, strict=True) if not ok]
    if blind:
        raise NotShared(f"storage folder {root.parent} is not visible from Ray node(s) {', '.join(blind)}: "
                        "on a cluster use a shared file system or s3://BUCKET/PREFIX for --storage")


def build_all(needs: Sequence[Need], root: Path | Location, *, ranks: int = 1, shard_bytes: int = cache.SHARD_BYTES,
              progress: Callable[[str], None] = lambda s: None) -> dict[str, str]:
    """Ensure every needed cache under `root`; returns {fingerprint: what happened}.

    Two phases, one after the other: first the caches built as one Ray task per shard, then
    (with `ranks > 1`) the ZeRO ones on one group of rank actors shared by all of them. Running
    both at once deadlocks a small cluster: the actors hold every CPU while shard tasks wait.
    """
    todo = merged(needs)
    spread = [n for n in todo if n.zero and ranks > 1]
    tasks = [n for n in todo if not (n.zero and ranks > 1)]
    done: dict[str, str] = {}

    def ensure(need: Need, writer: cache.ShardWriter) -> None:
        args = (need.key, cache.lengths_of(need.split), get_spec(need.key.backbone).d_model, writer, shard_bytes)
        folder, status = (ensure_published(root, *args) if isinstance(root, Location) and not root.local
                          else cache.ensure(Location.of(root).local_path, *args))
        done[need.key.fingerprint()] = status
        key = need.key
        taps = f"φ_0..φ_{key.taps[-1]}" if key.taps else "no encoder taps"
        if key.decoder_taps:
            taps += f", decoder φ_0..φ_{key.decoder_taps[-1]} over {len(key.targets)} targets"
        progress(f"activation cache {key.backbone} / {key.task} {key.split} ({key.positions}, {taps}): "
                 f"{status} -> {folder}")

    for need in tasks:
        ensure(need, task_writer(need))
    if spread:
        gpus = max(n.gpus for n in spread)
        check_room(ranks, 1, gpus)
        actors = start_ranks(ranks, gpus=gpus)
        try:
            for need in spread:
                ensure(need, rank_writer(need, actors))
        finally:
            for a in actors:
                ray.kill(a)
    return done


def with_caches(groups: Sequence[Group], study_folder: str, progress: Callable[[str], None] = lambda s: None,
                ranks: int = 1) -> list[Group]:
    """Build the caches for the cacheable groups; returns the groups with `cache_dir` in their run config.

    `ranks`: devices one partitioned (ZeRO) backbone is spread over while building.
    """
    root = cache_root(study_folder)
    needs = {g.name: needs_of(g) for g in groups}
    if any(needs.values()):
        if root.local:
            check_shared(root.local_path)
        build_all([n for ns in needs.values() for n in ns], root, ranks=ranks, progress=progress)
    # a cloud root: each node's trials fetch it once into their node-local mirror (cache.fetch)
    return [dataclasses.replace(g, run={**g.run, "cache_dir": root.uri}) if needs[g.name] else g for g in groups]
