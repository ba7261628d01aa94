"""Quantised frozen backbones (bitsandbytes int8 / NF4, on CPU here) and gradient checkpointing (issue 21).

Every method's contract on a quantised tiny Llama and tiny BERT (full fine-tuning refuses), QLoRA's packed
weights staying as loaded, the activation-cache key per quant, and the fake-tensor estimate against the
tracked step for quantised and checkpointed steps.
"""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import datasets
import pytest
import torch
from method_table import ROWS  # tests/unit/method_table.py: the one table

from trainables import backbones, cache
from trainables.loop import RunConfig, validate
from trainables.memory import adamw, compare_step
from trainables.methods import apply_method, get_method
from trainables.trial import prepare_backbone

QUANTS = ["nf4", "int8"]
TINY = ["llama-tiny", "bert-tiny"]
FROZEN = [m for m in ROWS if m != "full"]


@functools.cache
def _quantised(backbone: str, quant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return backbones.build(backbone, "cpu", quant=quant)


def make(method: str, backbone: str, quant: str, gradient_checkpointing: bool = False):
    bb = copy.deepcopy(_quantised(backbone, quant))
    cfg = SimpleNamespace(method=method, quant=quant, quant_double=False,
                          gradient_checkpointing=gradient_checkpointing)
    spec = backbones.get_spec(backbone)
    torch.manual_seed(0)
    return apply_method(method, prepare_backbone(bb, cfg), spec, ROWS[method][0], n_labels=2)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask, torch.tensor([0, 1, 1, 0])


def packed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_floating_point()}


def test_quantised_builds_keep_embeddings_and_norms_full_precision():
    for backbone in TINY:
        for quant in QUANTS:
            bb = _quantised(backbone, quant)
            assert backbones.quantised_linears(bb), (backbone, quant)
            floating = {n for n, p in bb.named_parameters() if p.is_floating_point()}
            assert any("embed" in n for n in floating) and any("norm" in n.lower() for n in floating)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("backbone", TINY)
@pytest.mark.parametrize("method", FROZEN)
def test_contract_on_a_quantised_backbone(method, backbone, quant):
    """Only declared parameters get grads, the loss is finite, a step leaves the packed weights as loaded."""
    model = make(method, backbone, quant)
    before = packed(model)
    assert before, "the backbone is quantised"
    model.train()
    ids, mask, labels = batch()
    loss = model(ids, mask, labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    declared = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert declared and all(p.grad is not None for _, p in declared)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    adamw([p for _, p in declared], 1e-2).step()
    after = packed(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    if get_method(method).family != "graft":
        assert not model.backbone_tensors_with_grad()


@pytest.mark.parametrize("quant", QUANTS)
def test_qlora_trains_and_its_packed_weights_stay(quant):
    model = make("lora", "llama-tiny", quant)
    before = packed(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, ROWS["lora"][1])
    ids, mask, labels = batch()
    losses = []
    for step in range(6):
        model.train()
        loss = model(ids, mask, labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 2:  # an evaluation pass in between (bitsandbytes must not repack the weights for inference)
            model.eval()
            with torch.no_grad():
                model(ids, mask)
    assert losses[-1] < losses[0]
    after = packed(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_cache_key_differs_by_quant():
    spec = backbones.get_spec("llama-tiny")
    model = apply_method("read", backbones.build(spec, "meta"), spec, ROWS["read"][0])
    split = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7]], "labels": [1]})

    def key(quant: str, double: bool = False) -> str:
        cfg = SimpleNamespace(task="synthetic", train_size=1, seed=0, max_length=8, cache_dtype="bf16",
                              quant=quant, quant_double=double)
        return cache.trial_keys(model, spec, cfg, {"train": split}, weights="pretrained", revision="r")["train"]

    prints = {key(q).fingerprint() for q in ("none", "int8", "nf4")} | {key("nf4", True).fingerprint()}
    assert len(prints) == 4
    plain = key("none")
    old = {k: v for k, v in vars(plain).items() if k not in ("quant", "quant_double")}
    assert cache.CacheKey(**old).fingerprint() == plain.fingerprint()  # full-precision keys hash as before


@pytest.mark.parametrize("backbone,method,quant,gc", [
    ("llama-tiny", "lora", "nf4", False),
    ("llama-tiny", "lora", "nf4", True),  # QLoRA + checkpointing
    ("llama-tiny", "read", "int8", False),
    ("llama-tiny", "probe", "nf4", False),
    ("bert-tiny", "lora", "int8", True),
    ("bert-tiny", "full", "none", True),  # checkpointing on a full-precision backbone
])
def test_estimate_equals_tracked(backbone, method, quant, gc):
    r = compare_step(backbone, method, ROWS[method][0], batch_size=4, seq_len=16, quant=quant,
                     gradient_checkpointing=gc, timed_steps=0)
    assert r["estimated"].peak_bytes == r["tracked"].peak_bytes
    assert r["estimated"].params == r["tracked"].params


def test_checkpointing_lowers_the_activations():
    plain = compare_step("llama-tiny", "lora", ROWS["lora"][0], batch_size=4, seq_len=16, timed_steps=0)
    ckpt = compare_step("llama-tiny", "lora", ROWS["lora"][0], batch_size=4, seq_len=16, timed_steps=0,
                        gradient_checkpointing=True)
    assert ckpt["tracked"].activations < plain["tracked"].activations


@pytest.mark.parametrize("values,needle", [
    ({"method": "full", "quant": "nf4"}, "full fine-tuning trains the backbone's weights; quant needs a frozen"),
    ({"method": "read", "gradient_checkpointing": True}, "does not backpropagate through the backbone"),
    ({"method": "probe", "gradient_checkpointing": True}, "does not backpropagate through the backbone"),
    ({"method": "lora", "quant": "int8", "quant_double": True}, "needs quant=nf4"),
    ({"method": "read", "quant": "nf4", "zero": "on"}, "zero=on with quant=nf4"),
    ({"method": "lst", "quant": "nf4", "method_config": {"importance": "fisher"}}, "use importance=l1"),
])
def test_bad_input_is_one_line(values, needle):
    with pytest.raises(ValueError, match=needle) as info:
        validate(RunConfig.from_dict({"backbone": "llama-tiny", "task": "synthetic", **values}))
    assert "\n" not in str(info.value)


def test_unknown_quant_is_refused():
    with pytest.raises(ValueError, match="quant") as info:
        RunConfig.from_dict({"quant": "fp8"})
    assert "\n" not in str(info.value)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method,quant,gc", [("lora", "nf4", True), ("read", "int8", False)])
def test_a_trial_runs_quantised(method, quant, gc, tmp_path):
    """Through the loop: QLoRA with checkpointing (live), READ on an int8 backbone (its taps cached per quant)."""
    from trainables.loop import train

    cfg = RunConfig(backbone="llama-tiny", method=method, method_config=ROWS[method][0], lr=ROWS[method][1],
                    task="synthetic", train_size=32, max_length=16, epochs=2, batch_size=16, eval_batch_size=32,
                    max_eval_examples=32, device="cpu", quant=quant, gradient_checkpointing=gc,
                    cache_dir=str(tmp_path / "cache"))
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "ok", summary["error"]
    assert (summary["quant"], summary["quant_double"], summary["gradient_checkpointing"]) == (quant, False, gc)
    assert summary["memory_source"] == "tracked" and summary["peak_memory_bytes"] > 0
    assert summary["cache_hit"] == (method == "read")
