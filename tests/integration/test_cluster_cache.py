"""One activation cache per study on a two-node Ray cluster (ray.cluster_utils.Cluster on one machine),
each node with its own node-local cache folder and the study's storage in S3 (moto on loopback): the
driver builds the cache once into the bucket (a builder actor on one node) and the trials on both nodes read it
from there, with the step measured by the builder and published beside it."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest
from s3server import moto_s3

pytestmark = pytest.mark.integration


def test_cache_built_once_in_storage_and_read_on_both_nodes(tmp_path, monkeypatch):
    import pandas as pd
    import ray
    from ray.cluster_utils import Cluster

    from study import launch, runner

    local = {n: tmp_path / n / "activations" for n in ("left", "right")}  # node-local mirrors
    # pretrained LST: its cached trials never hold the whole backbone, so their step is the builder's measurement
    run = {"backbone": "minilm-l6@L2", "method": "lst", "method_config": {"r": 8}, "task": "vader-movies",
           "weights": "pretrained", "dtype": "fp32", "cache_dtype": "fp32", "epochs": 1, "train_size": 32,
           "max_length": 16, "batch_size": 8, "max_eval_examples": 16}
    # the same trials pinned to one node each (a custom resource per node): both need the same cache
    groups = [launch.Group(f"read|{n}", run, {}, 1, {"cpu": 1, n: 1}) for n in local]
    with moto_s3("petl") as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "resources": {"left": 1}, "env_vars": {"PETL_STUDY_ACTIVATIONS": str(local["left"])}})
        cluster.add_node(num_cpus=1, resources={"right": 1},
                         env_vars={"PETL_STUDY_ACTIVATIONS": str(local["right"])})
        try:
            folder = runner.study_dir("s3://petl/two-node", "cached", resume=False)
            trials, _ = runner.execute("cached", folder, groups, [], plan_info={}, resume=False,
                                       address=cluster.address, seed=0)
            nodes = {r.config["group"]: r.metrics["node_id"] for r in launch.results(folder)}
            node_of = {n.node_id: name for n, name in zip([cluster.head_node, *cluster.worker_nodes], local, strict=True)}
        finally:
            ray.shutdown()
            cluster.shutdown()
        stored_trials = pd.read_parquet("s3://petl/two-node/cached/trials.parquet")
        fs, root = pafs.FileSystem.from_uri("s3://petl/two-node/.activations")
        stored = [i.path.removeprefix(root + "/") for i in fs.get_file_info(
            pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]

    assert len(set(nodes.values())) == 2  # the two groups ran on the two nodes
    assert len(stored_trials) == 2 and set(stored_trials.status) == {"ok"}, stored_trials[["status", "error"]]
    assert stored_trials.cache_hit.all(), stored_trials.cache_reason  # no trial built one
    assert all(r.startswith("hit (backbone not materialised)") for r in stored_trials.cache_reason)
    # the builder (on one node) measured the step and published it in the bucket: both nodes' trials read it
    assert set(stored_trials.memory_source) == {"tracked"}, stored_trials.memory_source
    assert len([p for p in stored if p.startswith("steps/")]) == 1
    assert {node_of[n] for n in nodes.values()} == set(local)
    caches = {p.split("/")[0] for p in stored if not p.startswith("steps/")}
    assert len(caches) == 2  # the train and the validation split, each built once: one build prefix each
    for fp in caches:
        assert len({p.split("/")[1] for p in stored if p.startswith(fp + "/build-")}) == 1
    for node, mirror in local.items():  # each node fetched both from the bucket, once, and verified them
        fetched = {p.name for p in mirror.iterdir() if not p.name.startswith(".")}
        assert fetched == caches, (node, fetched)
        for fp in caches:
            assert json.loads((mirror / fp / "manifest.json").read_text())["source"].startswith("s3://petl/")
    assert len(trials) == 2
