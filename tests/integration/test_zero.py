"""DeepSpeed ZeRO-3 (param offload to cpu) for frozen backbones: forward, cache, live trials, two ranks.

The shared-memory comm op build is skipped (trainables.zero does so by default); each
single-process engine gets its own free MASTER_PORT (trainables.zero.single_process_env).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from trainables import cache, zero
from trainables.backbones import build, get_spec
from trainables.loop import RunConfig, load_data, train
from trainables.methods import collect_taps
from trainables.methods.base import numel

pytestmark = pytest.mark.integration
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SHARD_BYTES = 400_000  # a few MiniLM examples per shard


@pytest.fixture(scope="module", autouse=True)
def restore_env():
    """The single-process rank env stays for the process group's life; tidy it after the module."""
    before = {k: os.environ.get(k) for k in DIST_VARS}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def plain_and_partitioned(tmp_path_factory):
    spec = get_spec("llama-tiny")
    torch.manual_seed(0)
    plain = build(spec, "cpu")
    folder = tmp_path_factory.mktemp("llama-tiny")
    plain.save_pretrained(folder)
    part = zero.build_partitioned(spec, weights="pretrained", dtype=torch.float32, ds_config=zero.config("cpu"),
                                  folder=folder)
    yield spec, plain, part
    part.close()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    return ids, mask


def test_zero3_offload_forward_equals_plain_forward(plain_and_partitioned):
    spec, plain, part = plain_and_partitioned
    assert zero.is_partitioned(part.module) and not zero.is_partitioned(plain)
    assert all(p.numel() == 0 for p in part.module.parameters())  # no rank holds the whole model
    assert sum(numel(p) for p in part.module.parameters()) == sum(p.numel() for p in plain.parameters())
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(part.module(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   plain(input_ids=ids, attention_mask=mask).last_hidden_state)
    for _ in range(2):  # the tap hooks stop the forward early; the next forward must still be right
        a = collect_taps(part.module, spec, ids, mask, [0, 1])
        b = collect_taps(plain, spec, ids, mask, [0, 1])
        for i in (0, 1):
            torch.testing.assert_close(a.hidden[i], b.hidden[i])


def test_cache_built_through_zero3_equals_the_plain_cache(plain_and_partitioned, tmp_path):
    spec, plain, part = plain_and_partitioned
    cfg = RunConfig(backbone="llama-tiny", method="lst", task="synthetic", train_size=40, max_length=16,
                    cache_dtype="fp32")
    task, _ = load_data(cfg, spec)
    key = cache.CacheKey(backbone=spec.name, backbone_config="c", weights="w", compute_dtype="float32",
                         tokenizer="none", task=cfg.task, split="train", train_size=40, seed=0, max_length=16,
                         data=cache.data_digest(task.train), taps=(0, 1, 2), positions="all", dtype="fp32")
    lengths = cache.lengths_of(task.train)
    folders = {}
    for name, backbone in (("plain", plain), ("zero", part.module)):
        writer = cache.local_writer(backbone, spec, task.train, key, task.pad_token_id, batch_size=8)
        folders[name], status = cache.ensure(tmp_path / name, key, lengths, spec.d_model, writer)
        assert status.startswith("built")
    a, b = cache.TapReader(folders["plain"]), cache.TapReader(folders["zero"])
    for x, y in zip(a._shards, b._shards, strict=True):
        torch.testing.assert_close(y, x)


def loop_config(tmp_path: Path, method: str, **overrides: Any) -> RunConfig:
    values = dict(backbone="llama-tiny", method=method, method_config={"r": 4} if method != "read" else {},
                  task="synthetic", train_size=32, max_length=16, epochs=1, batch_size=16, eval_batch_size=32,
                  max_eval_examples=16, device="cpu", measure_memory=False, cache_dir=str(tmp_path / "cache"))
    return RunConfig(**(values | overrides))


@pytest.mark.parametrize("method,cached", [("read", True), ("sherl", False)])
def test_side_trials_run_on_a_zero3_backbone(method, cached, tmp_path):
    plain = train(loop_config(tmp_path, method, cache=False), tmp_path / "plain")
    summary = train(loop_config(tmp_path, method, zero="on", cache=cached), tmp_path / "zero")
    assert summary["status"] == "ok", summary["error"]
    assert summary["cache_hit"] is cached
    counts = ("params_total", "params_trainable", "params_head")
    assert {k: summary[k] for k in counts} == {k: plain[k] for k in counts}


def test_graft_methods_refuse_zero(tmp_path):
    summary = train(RunConfig(method="lora", zero="on", task="synthetic"), tmp_path)
    assert summary["status"] == "error" and "side methods" in summary["error"]


def test_two_rank_gloo_cache_build_equals_the_plain_cache(tmp_path):
    """Two Ray actors form one gloo group holding MiniLM partitioned; the trials then only read.

    A READ group on the same data goes through the default path (one builder). Two CPUs exactly: three
    ranks never fit in a placement group, and the request times out with NoRoom.
    """
    import ray

    from study import prepare
    from study.launch import Group

    run = dict(backbone="minilm-l6", method="lst", task="vader-movies", train_size=25, max_eval_examples=8,
               max_length=16, eval_batch_size=8, cache_dtype="fp32", zero="on")
    group = Group(name="lst|minilm-l6", run=run, space={}, n_trials=1)
    read = Group(name="read|minilm-l6", run=run | {"method": "read", "zero": "off", "pooling": "first"}, space={}, n_trials=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        needs = prepare.needs_of(group)
        assert [n.zero for n in needs] == [True, True]
        shards = cache.shard_ranges(cache.lengths_of(needs[0].split), needs[0].key, 384, SHARD_BYTES)
        assert len(shards) % 2 == 1  # the ranks get different numbers of forwards: lockstep pads one
        read_needs = prepare.needs_of(read)
        assert [n.key.positions for n in read_needs] == ["first", "first"] and not read_needs[0].zero
        with pytest.raises(prepare.NoRoom, match="3 ZeRO ranks need one node with 3 CPUs; none came within 2 s"):
            prepare.build_all(needs, tmp_path / "too-many", ranks=3, shard_bytes=SHARD_BYTES, wait_s=2)
        statuses = prepare.build_all(needs + read_needs, tmp_path / "zero", ranks=2, shard_bytes=SHARD_BYTES)
    finally:
        ray.shutdown()
    assert len(statuses) == 4 and all(s.startswith("built") for s in statuses.values()), statuses
    read_cfg = RunConfig(**(read.run | {"epochs": 1, "measure_memory": False, "cache_dir": str(tmp_path / "zero")}))
    assert train(read_cfg, tmp_path / "read")["cache_reason"] == "hit (backbone not materialised)"
    cfg = RunConfig(**(run | {"zero": "off", "epochs": 1, "measure_memory": False, "cache_dir": str(tmp_path / "zero")}))
    hit = train(cfg, tmp_path / "trial")
    assert hit["status"] == "ok" and hit["cache_reason"] == "hit (backbone not materialised)", hit["cache_reason"]
    plain = train(dataclasses.replace(cfg, cache_dir=str(tmp_path / "plain")), tmp_path / "trial-plain")
    assert "built" in plain["cache_reason"]
    for need in needs:
        name = need.key.fingerprint()
        a, b = cache.TapReader(tmp_path / "plain" / name), cache.TapReader(tmp_path / "zero" / name)
        assert torch.equal(a.lengths, b.lengths) and torch.equal(a.labels, b.labels)
        torch.testing.assert_close(torch.cat(b._shards), torch.cat(a._shards), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["read", "lst", "sherl"])
def test_t5_side_methods_on_a_zero3_backbone_equal_the_plain_one(method, tmp_path):
    """Encoder–decoder taps through a partitioned T5: both stacks, the LM head and SHERL's two last blocks."""
    from trainables.methods import apply_method

    spec = get_spec("t5-tiny")
    torch.manual_seed(0)
    plain = build(spec, "cpu")
    plain.save_pretrained(tmp_path / "t5")
    part = zero.build_partitioned(spec, weights="pretrained", dtype=torch.float32, ds_config=zero.config("cpu"),
                                  folder=tmp_path / "t5")
    try:
        ids, mask = batch()
        labels = torch.tensor([0, 1, 1, 0])
        losses = []
        for backbone in (plain, part.module):
            torch.manual_seed(1)
            with zero.gathered(zero.apply_reads(backbone, spec, method)):
                model = apply_method(method, backbone, spec, {"r": 4} if method != "read" else {}, n_labels=2)
            model.eval()
            loss = model(ids, mask, labels).loss
            loss.backward()
            losses.append(loss.detach())
            assert not model.backbone_tensors_with_grad()
        torch.testing.assert_close(losses[1], losses[0])
    finally:
        part.close()
