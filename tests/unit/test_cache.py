"""The activation cache: cached and live trials agree, fingerprints, damage, concurrency, budget.

Tiny random backbones on the synthetic task; every cache lives under tmp_path.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainables import cache
from trainables.backbones import build, get_spec
from trainables.loop import RunConfig, load_data, train
from trainables.methods import apply_method

METHODS = {"read": {"hidden_size": 32}, "lst": {"r": 4}, "sherl": {"r": 4}}


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def config(tmp_path: Path, method: str = "read", backbone: str = "llama-tiny", **overrides: Any) -> RunConfig:
    values = dict(backbone=backbone, method=method, method_config=METHODS[method], lr=1e-2, task="synthetic",
                  train_size=64, max_length=16, epochs=2, batch_size=16, eval_batch_size=32, max_eval_examples=32,
                  device="cpu", measure_memory=False, cache_dir=str(tmp_path / "cache"), cache_dtype="fp32")
    return RunConfig(**(values | overrides))


def losses(out: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (out / "epochs.jsonl").read_text().splitlines()]


def trained(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint" / "state.pt", weights_only=True)["model"]


@pytest.mark.parametrize("backbone", ["llama-tiny", "bert-tiny"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cached_and_live_trials_give_the_same_loss_and_side_network(method, backbone, tmp_path):
    live = train(config(tmp_path, method, backbone, cache=False, measure_memory=True), tmp_path / "live")
    cached = train(config(tmp_path, method, backbone, measure_memory=True), tmp_path / "cached")
    assert live["status"] == cached["status"] == "ok", (live["error"], cached["error"])
    # the cost columns are the method's live step either way (the paper's quantity), not the cached step
    assert cached["peak_memory_bytes"] == live["peak_memory_bytes"] > 0
    assert cached["flops_per_step"] == live["flops_per_step"] > 0
    assert live["cache_hit"] is False and live["cache_reason"] == "off: cache=false"
    assert cached["cache_hit"] is True and "built" in cached["cache_reason"]
    assert cached["final_metric"] == live["final_metric"]
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "live"), rel=1e-5)
    a, b = trained(tmp_path / "live"), trained(tmp_path / "cached")
    assert a.keys() == b.keys()
    # Taps agree to ~1e-7 (the builder batches other examples together); AdamW divides by the
    # gradients' own scale, so near-zero gradients turn that into ~1e-4 after a few steps.
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-3, rtol=1e-3, msg=name)
    again = train(config(tmp_path, method, backbone), tmp_path / "again")
    assert again["cache_hit"] is True and again["cache_reason"] == "hit"
    assert losses(tmp_path / "again") == losses(tmp_path / "cached")


def test_graft_methods_run_live_and_say_why(tmp_path):
    cfg = dataclasses.replace(config(tmp_path), method="lora", method_config={"r": 2})
    summary = train(cfg, tmp_path / "lora")
    assert summary["status"] == "ok" and summary["cache_hit"] is False
    assert summary["cache_reason"].startswith("not cacheable")


def test_budget_fallback_runs_live_and_records_the_reason(tmp_path):
    summary = train(config(tmp_path, cache_budget_bytes=1), tmp_path / "run")
    assert summary["status"] == "ok" and summary["cache_hit"] is False
    assert "over budget" in summary["cache_reason"] and "runs live" in summary["cache_reason"]
    assert not any((tmp_path / "cache").glob("*/manifest.json"))


def key(**changes: Any) -> cache.CacheKey:
    base = cache.CacheKey(backbone="llama-tiny", backbone_config="c", weights="w", compute_dtype="float32",
                          tokenizer="t", task="synthetic", split="train", train_size=64, seed=0, max_length=16,
                          data="d", taps=(0, 1, 2), positions="all", dtype="bf16")
    return dataclasses.replace(base, **changes)


def test_fingerprint_changes_when_any_key_part_changes():
    other = {"backbone": "bert-tiny", "backbone_config": "c2", "weights": "w2", "compute_dtype": "bfloat16",
             "tokenizer": "t2", "task": "vader-movies", "split": "validation", "train_size": 32, "seed": 1,
             "max_length": 32, "data": "d2", "taps": (0, 1), "positions": "last", "dtype": "fp32", "format": 2,
             "decoder_taps": (0, 1), "targets": ((5, 1), (6, 1)), "quant": "nf4", "quant_double": True}
    assert set(other) == {f.name for f in dataclasses.fields(cache.CacheKey)}
    prints = {name: key(**{name: value}).fingerprint() for name, value in other.items()}
    hashed = {k: v for k, v in prints.items() if k not in cache.CacheKey.INFORMATIONAL}
    assert len(set(hashed.values()) | {key().fingerprint()}) == len(hashed) + 1
    # the rows (data) and the draw (weights) already say what train size and seed select
    assert {prints[k] for k in cache.CacheKey.INFORMATIONAL} == {key().fingerprint()}
    assert key().fingerprint() == key().fingerprint()


def test_trial_keys_follow_data_weights_and_taps(tmp_path):
    def keys_of(**overrides: Any) -> dict[str, cache.CacheKey]:
        cfg = config(tmp_path, **overrides)
        spec = get_spec(cfg.backbone)
        task, validation = load_data(cfg, spec)
        torch.manual_seed(cfg.seed)
        model = apply_method(cfg.method, build(spec, "cpu"), spec, cfg.method_config, n_labels=2)
        return cache.trial_keys(model, spec, cfg, {"train": task.train, "validation": validation}, weights="random")

    base = keys_of()
    assert base["train"].taps == (0, 1, 2) and base["train"].positions == "last"  # READ on Llama: last token
    assert base["train"].data != base["validation"].data
    for change in ({"train_size": 32}, {"seed": 1}, {"max_length": 12}):
        assert keys_of(**change)["train"].fingerprint() != base["train"].fingerprint(), change
    assert keys_of(cache_dtype="bf16")["train"].dtype == "bf16"
    sherl = keys_of(method="sherl")["train"]
    assert sherl.taps == (0, 1) and sherl.positions == "all"
    assert cache.candidates(sherl, 2)[-1].taps == (0, 1, 2)  # an LST cache serves it


def build_cache(tmp_path: Path, positions: str = "all", backbone: str = "llama-tiny",
                method: str = "read") -> tuple[Any, Path, cache.CacheKey, Any]:
    cfg = config(tmp_path, method, backbone)
    spec = get_spec(cfg.backbone)
    task, _ = load_data(cfg, spec)
    torch.manual_seed(0)
    model = apply_method(cfg.method, build(spec, "cpu"), spec, cfg.method_config, n_labels=2)
    k = cache.trial_keys(model, spec, cfg, {"train": task.train}, weights="random")["train"]
    k = dataclasses.replace(k, positions=positions)
    writer = cache.local_writer(model.backbone, spec, task.train, k, task.pad_token_id, batch_size=8)
    folder, status = cache.ensure(tmp_path / "cache", k, cache.lengths_of(task.train), spec.d_model, writer)
    assert status.startswith("built")
    return model, folder, k, task


@pytest.mark.parametrize("backbone", ["llama-tiny", "bert-tiny"])
def test_pooled_cache_gives_read_the_same_loss_as_the_all_token_cache(backbone, tmp_path):
    model, full, _, _ = build_cache(tmp_path, "all", backbone)
    pooling = model.pooling
    _, pooled, _, _ = build_cache(tmp_path, pooling, backbone)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # off the zero init, so the correction matters
    a, b = cache.TapReader(full), cache.TapReader(pooled)
    assert b.nbytes < a.nbytes and torch.equal(a.lengths, b.lengths)
    for x, y in zip(a.batches(16, shuffle=True, seed=3), b.batches(16, shuffle=True, seed=3), strict=True):
        assert y["taps"].hidden[1].shape[1] == 1
        torch.testing.assert_close(model.forward_taps(y["taps"], y["labels"]).loss,
                                   model.forward_taps(x["taps"], x["labels"]).loss)


def test_damage_is_detected_and_rebuilt(tmp_path):
    model, folder, k, task = build_cache(tmp_path)
    spec = model.spec
    lengths = cache.lengths_of(task.train)
    writer = cache.local_writer(model.backbone, spec, task.train, k, task.pad_token_id, batch_size=8)
    reference = cache.TapReader(folder)._shards[0].clone()
    shard = folder / cache.shard_name(0)

    def damage_then_rebuild(damage, reason: str) -> None:
        damage()
        assert reason in cache.verify(folder, k)
        again, status = cache.ensure(tmp_path / "cache", k, lengths, spec.d_model, writer)
        assert again == folder and status.startswith("built") and reason in status
        assert cache.verify(folder, k) is None
        assert torch.equal(cache.TapReader(folder)._shards[0], reference)

    damage_then_rebuild(lambda: shard.write_bytes(shard.read_bytes()[:-100]), "truncated")
    damage_then_rebuild(lambda: (folder / cache.MANIFEST).unlink(), "no manifest")
    flipped = bytearray(shard.read_bytes())
    flipped[-5] ^= 0xFF
    damage_then_rebuild(lambda: shard.write_bytes(bytes(flipped)), "checksum")
    assert "stale" in cache.verify(folder, dataclasses.replace(k, weights="random:other"))
    assert not list((tmp_path / "cache").glob(".*building*"))


def slow_builder(root: Path, k: cache.CacheKey, out: Any) -> None:
    """A builder whose writer sleeps while holding the lock, so the other one arrives meanwhile."""
    lengths = np.array([3, 5, 2, 4])

    def write(staging: Path, ranges: list[range]) -> list[dict[str, Any]]:
        time.sleep(1.0)
        records = []
        for s, r in enumerate(ranges):
            rows = [[1] * int(n) for n in lengths[r.start:r.stop]]
            pieces = {i: torch.full((len(row), 3, 4), float(i)) for i, row in enumerate(rows)}
            records.append(cache.save_shard(staging / cache.shard_name(s), pieces, rows, torch.zeros(len(rows))))
        return records

    out.put(cache.ensure(root, k, lengths, 4, write)[1])


def test_two_concurrent_builders_make_one_valid_cache(tmp_path):
    k = key(dtype="fp32")
    ctx = multiprocessing.get_context("fork")  # the test process has imported everything already
    out = ctx.Queue()
    procs = [ctx.Process(target=slow_builder, args=(tmp_path, k, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    statuses = sorted(out.get(timeout=5) for _ in procs)
    assert statuses[0].startswith("built") and statuses[1].startswith("hit"), statuses
    assert cache.verify(tmp_path / k.fingerprint(), k) is None
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [k.fingerprint()]
    reader = cache.TapReader(tmp_path / k.fingerprint())
    batch = next(reader.batches(4))
    assert batch["taps"].attention_mask.sum(1).tolist() == [3, 5, 2, 4]
    assert batch["taps"].hidden[1][1, :5].eq(1.0).all() and batch["taps"].hidden[1][1, 5:].eq(0.0).all()


def test_reader_batches_follow_tasks_batches_order(tmp_path):
    from trainables import tasks

    model, folder, _, task = build_cache(tmp_path)
    reader = cache.TapReader(folder)
    live = tasks.batches(task.train, 16, pad_token_id=task.pad_token_id, shuffle=True, seed=7)
    for got, want in zip(reader.batches(16, shuffle=True, seed=7), live, strict=True):
        assert torch.equal(got["labels"], want["labels"])
        assert torch.equal(got["taps"].attention_mask, want["attention_mask"])
        assert torch.equal(got["lengths"], want["attention_mask"].sum(1))
