"""Build the activation caches a study's side-method trials read, once, before any trial starts.

For each group whose method is cacheable, the cache keys are computed exactly as its
trials will compute them (`trainables.loop` helpers: same task subsample, validation
subset, device, dtype, weights; `trainables.cache.trial_keys`). Groups on the same
backbone and task share caches: a group needing taps up to φ_{L-1} (SHERL) is served by
one holding φ_0..φ_L (LST), so such requests are merged. Every missing cache is built by
builder actors (one per backbone, or one per device of a ZeRO backbone's ranks), each loading the
backbone once and writing every shard it is given into a staging folder that `cache.ensure`
commits under the cache's lock; trials then only read (`cache_dir` in their run config). The
builders, holding the backbone on the trials' kind of device, also measure each reading config's
live step and publish it beside the caches (`<caches>/steps/`), and meter their own devices'
energy, summed into the manifest.

The caches live in the study's storage, `<storage>/.activations/`, where every node can
read them: a local `--storage` must be one folder for all nodes (checked: one machine or
a shared file system); with cloud storage the shard tasks upload what they write and the
manifest is committed last (`ensure_published`), and each node's trials fetch a cache once
into a node-local mirror (`cache.fetch`).

A backbone under ZeRO-3 (`zero: on`, or auto when it does not fit a device) is built
partitioned; with `ranks > 1` the shards are spread over that many builders forming one
torch.distributed group on one node (a STRICT_PACK placement group the autoscaler can
fulfil), kept in lockstep (`cache.write_shards(per_rank=...)`).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
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
from optuna.distributions import CategoricalDistribution, FloatDistribution

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
    configs: tuple[dict[str, Any], ...] = ()  # method configs whose live step the builder measures (train split)


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
    configs = step_configs(group) if cfg.measure_memory else ()
    return [Need(keys[n], dict(group.run), split, task.pad_token_id, zero_on, group.resources.get("gpu", 0),
                 configs if n == "train" else ()) for n, split in splits.items()]


def step_configs(group: Group) -> tuple[dict[str, Any], ...]:
    """The method configs a group's trials may draw, for the builder to measure: every combination of its
    categorical `m.` values. A float (READ's output scale) sizes nothing, so any value measures it
    (`Trial._memo` leaves floats out); a space with another kind of `m.` knob is left to the estimate."""
    base = dict(group.run.get("method_config") or {})
    axes = []
    for name, dist in group.space.items():
        if not name.startswith("m."):
            continue
        if isinstance(dist, CategoricalDistribution):
            axes.append([(name[2:], v) for v in dist.choices])
        elif isinstance(dist, FloatDistribution):
            axes.append([(name[2:], dist.low)])
        else:
            return ()
    return tuple({**base, **dict(combo)} for combo in itertools.product(*axes))


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

RANKS_WAIT_S = 900.0  # for a placement group of ZeRO ranks: an autoscaler starts a multi-GPU node in minutes
LOCAL_RANKS_WAIT_S = 10.0  # a Ray started by the study has no autoscaler: the ranks fit now or never


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


def holds(need: Need) -> tuple[Any, ...]:
    """What identifies the backbone a need is built from: needs that agree share one loaded backbone."""
    run = need.run
    return (need.key.backbone, need.key.weights, need.key.compute_dtype, need.zero, run.get("device"),
            run.get("zero_offload"), run.get("quant"), run.get("quant_double"))


@ray.remote
class Builder:
    """One device's cache builder: loads a backbone once and writes every shard it is given with it, then
    measures the side methods' live step on it. (A Ray task asking for a GPU runs in a fresh process each
    call: one task per shard reloaded the backbone for every shard.) Several builders of one ZeRO-3 backbone
    form one torch.distributed group (`join`) and are kept in lockstep."""

    def __init__(self) -> None:
        self.held: tuple[Any, ...] | None = None
        self.backbone: Any = None
        self.partitioned: Any = None
        self.loads = 0

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), zero.free_port()

    def join(self, rank: int, world: int, master: tuple[str, int]) -> None:
        os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR=master[0],
                          MASTER_PORT=str(master[1]))

    def _load(self, need: Need) -> None:
        if self.held == holds(need):
            return
        self.close()
        self.backbone, self.partitioned = _backbone(need)
        self.held, self.loads = holds(need), self.loads + 1
        if self.partitioned is None and need.key.weights.startswith("random:"):
            got = cache.weights_revision(get_spec(need.key.backbone), "random", need.key.seed, self.backbone)
            if got != need.key.weights:
                raise RuntimeError(f"builder drew other random weights than the trial ({got} != {need.key.weights})")

    def write(self, need: Need, staging: str, shards: list[tuple[int, range]], per_rank: list[int] | None,
              threads: int) -> list[dict[str, Any]]:
        """Write some shards with the held backbone; the energy of this device, metered here, rides on the
        records (split over them by examples) and is summed into the manifest."""
        torch.set_num_threads(threads)
        self._load(need)
        meter = EnergyMeter(loop.resolve(loop.RunConfig.from_dict(need.run))[0]).start()
        records = self._write(need, staging, shards, per_rank)
        joules = meter.stop()
        total = sum(r["examples"] for r in records) or 1
        return [{**r, "energy_joules": None if joules is None else joules * r["examples"] / total,
                 "energy_source": meter.source} for r in records]

    def _write(self, need: Need, staging: str, shards: list[tuple[int, range]],
               per_rank: list[int] | None) -> list[dict[str, Any]]:
        spec = get_spec(need.key.backbone)
        cfg = loop.RunConfig.from_dict(need.run)
        args = dict(pad_token_id=need.pad_token_id, batch_size=cfg.eval_batch_size, per_rank=per_rank)
        if not is_uri(staging):  # a folder every node sees (one machine, or a shared file system)
            return cache.write_shards(self.backbone, spec, need.split, need.key, Path(staging), shards, **args)
        with tempfile.TemporaryDirectory(prefix="petl-shards-") as tmp:  # cloud: this node's disk, then one PUT each
            records = cache.write_shards(self.backbone, spec, need.split, need.key, Path(tmp), shards, **args)
            for record in records:
                (Location.of(staging) / record["file"]).upload(Path(tmp) / record["file"])
            return records

    def measure(self, need: Need, root: str, threads: int) -> tuple[list[str], list[str]]:
        """Each of `need.configs`' live step (memory by category, FLOPs) on this device, published as
        `<root>/steps/<name>.json`, the name a cached trial of that config looks up (`Trial._memo`);
        returns (the names written, why each config that could not be measured failed). Last: applying a
        method may touch the backbone."""
        from trainables import trial as trials

        torch.set_num_threads(threads)
        self._load(need)
        cfg = loop.RunConfig.from_dict(need.run)
        spec = get_spec(cfg.backbone)
        device, dtype, weights = loop.resolve(cfg)
        task, validation = loop.load_data(cfg, spec)
        revision = need.key.weights.rsplit("@", 1)[-1] if weights == "pretrained" else None
        names, failed = [], []
        for method_config in need.configs:
            gc.collect()  # each config's peak from a clean slate: nothing the previous one reserved
            if device.type == "cuda":
                torch.cuda.empty_cache()
            c = dataclasses.replace(cfg, method_config=method_config)
            try:
                model = trials._apply(c, self.backbone, spec, task)
                trials._master_fp32(model)
                t = trials.Trial(c, spec, device, dtype, weights, task, validation, model, True, revision,
                                 facts={"device": trials.device_name(device)})
                measured = t.measure(loop.epoch_seed(c.seed, 0), c.learning_rate, True, loop.untouched)
                name = t._memo(tuple(next(t.train_batches(loop.epoch_seed(c.seed, 0)))["input_ids"].shape)).name
            except Exception as e:  # e.g. out of memory: its trials measure (or meet the error) themselves
                failed.append(f"{c.method} {method_config}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            (Location.of(root) / "steps" / name).write_json(measured)
            names.append(name)
        return names, failed

    def count(self) -> int:
        """Backbone loads so far."""
        return self.loads

    def close(self) -> None:
        if self.partitioned is not None:
            self.partitioned.close()
        self.backbone = self.partitioned = self.held = None


class NoRoom(ValueError):
    """The Ray cluster could not seat the requested ZeRO ranks in time."""


def start_builders(n: int, cpus: int = 1, gpus: float = 0, *, ranks: bool = False, wait_s: float = RANKS_WAIT_S,
                   say: Callable[[str], None] = lambda s: None) -> tuple[list[Any], Any]:
    """`n` builders, and the placement group holding them (None unless `ranks`).

    ZeRO ranks (`ranks`) run NCCL with each other: one placement group seats them on one node (STRICT_PACK,
    n × {GPU, CPU}), a request the autoscaler fulfils by starting such a node; waited on for `wait_s` (said
    after the first seconds), then refused with NoRoom. They are then joined into one torch.distributed group
    (rank 0 the master)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if not ranks:
        return [Builder.options(num_cpus=cpus, num_gpus=gpus).remote() for _ in range(n)], None
    bundle = {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v}
    need = f"{n * cpus} CPUs" + (f" and {n * gpus:g} GPUs" if gpus else "")
    group = placement_group([dict(bundle) for _ in range(n)], strategy="STRICT_PACK")
    try:
        seated = group.wait(min(wait_s, 5))
        if not seated and wait_s > 5:
            say(f"waiting up to {wait_s:g} s for one node with {need} for {n} ZeRO ranks (an autoscaling cluster "
                "starts one)")
            seated = group.wait(wait_s - 5)
    except BaseException:  # Ctrl-C while waiting: no request left behind
        remove_placement_group(group)
        raise
    if not seated:
        remove_placement_group(group)
        raise NoRoom(f"{n} ZeRO ranks need one node with {need}; none came within {wait_s:g} s (no node type "
                     "has that many, or the cluster is full): lower --zero-ranks")
    actors = [Builder.options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=i)).remote() for i in range(n)]
    try:
        master = ray.get(actors[0].address.remote())
        ray.get([a.join.remote(r, n, master) for r, a in enumerate(actors)])
    except BaseException:  # none left holding a device
        stop_builders(actors, group)
        raise
    return actors, group


def stop_builders(actors: Sequence[Any], group: Any = None) -> None:
    from ray.util.placement_group import remove_placement_group

    for a in actors:
        ray.kill(a)
    if group is not None:
        remove_placement_group(group)


def builder_writer(need: Need, actors: Sequence[Any], cpus: int = 1) -> cache.ShardWriter:
    """Shards spread round-robin over the builders; ZeRO ranks (a partitioned backbone over several) also
    run the same number of forwards (`per_rank`), as each forward gathers every rank's partition."""

    def write(staging: Path | str, ranges: list[range]) -> list[dict[str, Any]]:
        n = len(actors)
        mine = [[(s, r) for s, r in enumerate(ranges) if s % n == k] for k in range(n)]
        batch_size = loop.RunConfig.from_dict(need.run).eval_batch_size
        per_rank = [cache.n_batches([r for _, r in m], batch_size) for m in mine] if need.zero and n > 1 else None
        busy = [(a, m) for a, m in zip(actors, mine, strict=True) if m or per_rank]
        out = ray.get([a.write.remote(need, str(staging), m, per_rank, cpus) for a, m in busy])
        records = {rec["file"]: rec for recs in out for rec in recs}
        return [records[cache.shard_name(s)] for s in range(len(ranges))]

    return write


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
    joules, source = cache.metered(records, meter)
    records = [{**r, "file": f"{build.name}/{r['file']}"} for r in records]
    (folder / cache.MANIFEST).write_json(cache.manifest_of(key, lengths, records, time.perf_counter() - start,
                                                           joules, source))
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


def build_all(needs: Sequence[Need], root: Path | Location, *, ranks: int = 1, builders: int = 1,
              shard_bytes: int = cache.SHARD_BYTES, progress: Callable[[str], None] = lambda s: None,
              wait_s: float = RANKS_WAIT_S) -> dict[str, str]:
    """Ensure every needed cache under `root`; returns {fingerprint: what happened}.

    The caches of one backbone are built by the same builders, started when the first of them is missing:
    `builders` actors (or, with `ranks > 1`, a ZeRO backbone's ranks, one per device), each loading the
    backbone once for all its shards; they then publish the live step of every config whose trials read
    those caches (`Builder.measure`). One backbone at a time: builders of several at once could hold every
    device while the others wait.
    """
    done: dict[str, str] = {}
    by_backbone: dict[tuple[Any, ...], list[Need]] = {}
    for need in needs:
        by_backbone.setdefault(holds(need), []).append(need)
    for same in by_backbone.values():
        spread = same[0].zero and ranks > 1
        started: list[tuple[list[Any], Any]] = []
        shards = 0

        def actors(spread: bool = spread, same: list[Need] = same, started: list = started) -> list[Any]:
            if not started:
                started.append(start_builders(ranks if spread else builders, gpus=max(n.gpus for n in same),
                                              ranks=spread, wait_s=wait_s, say=progress))
            return started[0][0]

        def writer(need: Need) -> cache.ShardWriter:
            def write(staging: Path | str, ranges: list[range]) -> list[dict[str, Any]]:
                nonlocal shards
                shards += len(ranges)
                return builder_writer(need, actors())(staging, ranges)

            return write

        try:
            for need in merged(same):
                args = (need.key, cache.lengths_of(need.split), get_spec(need.key.backbone).d_model, writer(need),
                        shard_bytes)
                folder, status = (ensure_published(root, *args) if isinstance(root, Location) and not root.local
                                  else cache.ensure(Location.of(root).local_path, *args))
                done[need.key.fingerprint()] = status
                key = need.key
                taps = f"φ_0..φ_{key.taps[-1]}" if key.taps else "no encoder taps"
                if key.decoder_taps:
                    taps += f", decoder φ_0..φ_{key.decoder_taps[-1]} over {len(key.targets)} targets"
                progress(f"activation cache {key.backbone} / {key.task} {key.split} ({key.positions}, {taps}): "
                         f"{status} -> {folder}")
            if started:
                where = root.uri if isinstance(root, Location) else str(root)
                measured: list[str] = []
                for n in ([] if same[0].zero else [n for n in same if n.configs]):
                    names, failed = ray.get(actors()[0].measure.remote(n, where, 1))
                    measured += names
                    for why in failed:
                        progress(f"live step not measured for {n.key.backbone}, {why}; its trials record the estimate")
                loads = sum(ray.get([a.count.remote() for a in actors()]))
                progress(f"cache builders for {same[0].key.backbone}: {len(actors())} builder(s), {loads} backbone "
                         f"load(s) for {shards} shard(s); {len(measured)} live step(s) measured and published")
        finally:
            if started:
                stop_builders(*started[0])
    return done


def with_caches(groups: Sequence[Group], study_folder: str, progress: Callable[[str], None] = lambda s: None,
                ranks: int = 1, wait_s: float = RANKS_WAIT_S) -> list[Group]:
    """Build the caches for the cacheable groups; returns the groups with `cache_dir` in their run config.

    `ranks`: devices one partitioned (ZeRO) backbone is spread over while building; `wait_s`: how long to wait
    for a node that seats them (a Ray started here has no autoscaler: runner.execute waits seconds).
    """
    root = cache_root(study_folder)
    needs = {g.name: needs_of(g) for g in groups}
    if any(needs.values()):
        if root.local:
            check_shared(root.local_path)
        build_all([n for ns in needs.values() for n in ns], root, ranks=ranks, progress=progress, wait_s=wait_s)
    # a cloud root: each node's trials fetch it once into their node-local mirror (cache.fetch)
    return [dataclasses.replace(g, run={**g.run, "cache_dir": root.uri}) if needs[g.name] else g for g in groups]
