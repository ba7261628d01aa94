"""Cache builders on a local Ray: one backbone load per builder for every shard, the live step measured by
the builder and read by a cached trial, energy metered by the builders, and ZeRO ranks that no node can seat
refused after their placement group's wait."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from optuna.distributions import CategoricalDistribution

from trainables import cache
from trainables.backbones import get_spec
from trainables.loop import RunConfig, train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


RUN = dict(backbone="minilm-l6@L2", method="lst", task="vader-movies", train_size=48, max_length=16, batch_size=8,
           eval_batch_size=8, max_eval_examples=16, device="cpu", dtype="fp32", weights="pretrained",
           cache_dtype="fp32", epochs=1, seed=3)


def test_builders_load_once_write_every_shard_and_publish_the_step(local_ray, tmp_path):
    from study import prepare
    from study.launch import Group

    group = Group("lst|minilm", RUN, {"m.r": CategoricalDistribution([4, 8])}, 2)
    needs = prepare.needs_of(group)
    assert [len(n.configs) for n in needs] == [2, 0]  # the train split's need carries the configs to measure
    lines: list[str] = []
    root = tmp_path / "activations"
    shard_bytes = 8 * 1024  # a few examples per shard: many shards, one backbone load
    statuses = prepare.build_all(needs, root, shard_bytes=shard_bytes, progress=lines.append)
    assert all(s.startswith("built") for s in statuses.values()), statuses
    shards = sum(len(json.loads((root / fp / cache.MANIFEST).read_text())["shards"]) for fp in statuses)
    assert shards >= 6
    assert f"1 builder(s), 1 backbone load(s) for {shards} shard(s); 2 live step(s) measured" in lines[-1], lines
    manifest = json.loads((root / next(iter(statuses)) / cache.MANIFEST).read_text())
    assert all(s["energy_source"] in ("rapl", "none") for s in manifest["shards"])  # metered by the builder
    assert manifest["build_energy_source"] == manifest["shards"][0]["energy_source"]
    assert len(list((root / "steps").glob("*.json"))) == 2

    # a cached trial (backbone not materialised) reads the builder's measurement instead of estimating
    cfg = RunConfig(**(RUN | {"method_config": {"r": 8}, "cache_dir": str(root)}))
    summary = train(cfg, tmp_path / "trial")
    assert summary["status"] == "ok", summary["error"]
    assert summary["cache_reason"].startswith("hit (backbone not materialised)")
    assert summary["memory_source"] == "tracked"


def test_zero_ranks_wait_for_their_placement_group_then_refuse(local_ray):
    from study import prepare

    start = time.perf_counter()
    with pytest.raises(prepare.NoRoom, match=r"^2 ZeRO ranks need one node with 2 CPUs and 2 GPUs; none came "
                                             r"within 2 s .*lower --zero-ranks$"):
        prepare.start_builders(2, gpus=1, ranks=True, wait_s=2)
    assert time.perf_counter() - start >= 1.9  # it waited


def test_hub_revision_comes_from_the_hub_cache_not_the_weights(tmp_path, monkeypatch):
    """A hub cache holding only config.json (a GPU-less head): its commit names the weights, no download."""
    from trainables import backbones

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha).mkdir(parents=True)
    llama = get_spec("llama-tiny").config
    (repo / "snapshots" / sha / "config.json").write_text(json.dumps({**llama, "model_type": "llama"}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_download(*args: object, **kwargs: object) -> Path:
        raise AssertionError("weights downloaded to learn their revision")

    monkeypatch.setattr(backbones, "snapshot", no_download)
    spec = backbones.BackboneSpec("tiny", "llama", llama, hf_id="org/tiny")
    assert cache.weights_revision(spec, "pretrained", 0, None) == f"org/tiny@{sha}"
