"""Contracts every registered method meets (METHODS.md), table-driven over methods × tiny backbones.

A new method is one file in trainables/methods/ plus one row in method_table.ROWS.
"""

from __future__ import annotations

import copy

import pytest
import torch
from method_table import ROWS  # tests/unit/method_table.py: the one table
from tiny_families import FOLDERS  # tests/tiny_families.py: mistral, qwen2, roberta config folders

from trainables import backbones
from trainables.methods import REGISTRY, apply_method, collect_taps, get_method
from trainables.methods.base import SideModel, Taps, pool, pooled_positions
from trainables.methods.contracts import live_and_cached
from trainables.text2text import decode, lm_logits

TINY = ["llama-tiny", "bert-tiny", *FOLDERS, "t5-tiny"]  # every supported model_type
CASES = [(m, b) for m in ROWS for b in TINY]


def make(method: str, backbone: str, seed: int = 0, device: str = "cpu"):
    torch.manual_seed(seed)
    spec = backbones.get_spec(backbone)
    bb = backbones.build(spec, device=device)
    return apply_method(method, bb, spec, ROWS[method][0], n_labels=2), bb


def batch(seed: int = 1, b: int = 4, t: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 6:] = 0  # one padded row, so pooling and masks are exercised
    mask[3, 4:] = 0
    labels = torch.tensor([0, 1, 1, 0][:b])
    return ids, mask, labels


def test_every_registered_method_has_a_row():
    assert set(REGISTRY) == set(ROWS), f"add a row to ROWS for: {set(REGISTRY) ^ set(ROWS)}"


@pytest.mark.parametrize("method,backbone", CASES)
def test_only_declared_parameters_get_grads(method, backbone):
    model, _ = make(method, backbone)
    model.train()
    ids, mask, labels = batch()
    block_grad: list[tuple[int, bool]] = []
    if get_method(method).family != "graft":
        for i, blk in enumerate(model.spec.anatomy.all_blocks(model.backbone)):
            blk.register_forward_hook(lambda _m, _a, out, i=i: block_grad.append(
                (i, (out[0] if isinstance(out, tuple) else out).requires_grad)))
    model(ids, mask, labels).loss.backward()
    declared = {n for n, p in model.named_parameters() if p.requires_grad}
    assert declared, "a method must train something"
    for name, p in model.named_parameters():
        if name in declared:
            assert p.grad is not None, f"{name} is trainable but got no grad"
        else:
            assert p.grad is None, f"{name} is frozen but got a grad"
    family = get_method(method).family
    n_blocks, n_dec = model.spec.n_layers, model.spec.n_decoder_layers
    if family == "side":
        assert block_grad and not any(g for _, g in block_grad), "no backbone block may be on the autograd graph"
    if family == "side-late":  # the last block of each stack (T5: encoder and decoder)
        on_graph = {i for i, g in block_grad if g}
        last = {n_blocks - 1} | ({n_blocks + n_dec - 1} if n_dec else set())
        assert on_graph == last, f"only the last block may be on the graph, got {on_graph}"
    if family != "graft":
        assert not model.backbone_tensors_with_grad()


@pytest.mark.parametrize("method,backbone", CASES)
def test_meta_count_equals_materialised_count(method, backbone):
    cpu, _ = make(method, backbone)
    meta, _ = make(method, backbone, device="meta")
    assert meta.param_counts() == cpu.param_counts()
    assert meta.param_counts()["params_trainable"] > 0 or method == "probe"  # the probe trains only the head


@pytest.mark.parametrize("method,backbone", [c for c in CASES if get_method(c[0]).identity_at_init])
def test_identity_at_init(method, backbone):
    torch.manual_seed(0)
    spec = backbones.get_spec(backbone)
    bb = backbones.build(spec, device="cpu")
    frozen = copy.deepcopy(bb)
    model = apply_method(method, bb, spec, ROWS[method][0], n_labels=2)
    model.eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        if model.text2text:  # the frozen T5 scoring the same target words through its LM head
            encoded = frozen.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            decoded = decode(frozen, encoded, mask, model.words)
            ref = (model.words.scores(lm_logits(frozen, decoded)) if model.head is None  # the probe: its head
                   else model.head(decoded[:: model.words.n, 0]))
        else:
            ref = model.head(pool(frozen(input_ids=ids, attention_mask=mask).last_hidden_state, mask, model.pooling))
        got = model(ids, mask).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,backbone", CASES)
def test_overfits_one_batch(method, backbone):
    model, _ = make(method, backbone)
    model.train()
    ids, mask, labels = batch(b=4)
    lr = ROWS[method][1]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = model(ids, mask, labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Text-to-text losses are target-token NLLs over the whole vocabulary (~10 nats on a random T5):
    # "learns" there means the true targets became e² ≈ 7× likelier, not half the loss.
    enough = losses[0] - 2.0 if model.text2text and model.head is None else 0.5 * losses[0]
    assert min(losses[-5:]) < enough, f"{method} on {backbone}: {losses[0]:.3f} -> {losses[-1]:.3f}"


SIDE = [c for c in CASES if get_method(c[0]).cacheable]


@pytest.mark.parametrize("method,backbone", SIDE)
def test_tap_path_equals_live_path(method, backbone):
    model, bb = make(method, backbone)
    assert isinstance(model, SideModel)
    live, cached = live_and_cached(model, bb, *batch())
    torch.testing.assert_close(cached.logits, live.logits)
    torch.testing.assert_close(cached.loss, live.loss)


@pytest.mark.parametrize("method,backbone", [c for c in SIDE if c[0] == "read" and c[1] != "t5-tiny"])
def test_token_local_methods_need_only_the_pooled_position(method, backbone):
    model, bb = make(method, backbone)
    assert model.token_local
    with torch.no_grad():  # make the correction non-zero so the check means something
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    ids, mask, labels = batch()
    with torch.no_grad():
        live = model(ids, mask, labels)
        taps = collect_taps(bb, model.spec, ids, mask, model.tap_layers())
        pos = pooled_positions(mask, model.pooling)
        rows = torch.arange(ids.shape[0])
        one = Taps({i: h[rows, pos].unsqueeze(1) for i, h in taps.hidden.items()},
                   torch.ones(ids.shape[0], 1, dtype=torch.long))
        got = model.forward_taps(one, labels)
    torch.testing.assert_close(got.logits, live.logits)


@pytest.mark.parametrize("method,backbone", CASES)
def test_trainable_state_roundtrip(method, backbone, tmp_path):
    model, _ = make(method, backbone, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    state = model.trainable_state_dict()
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    torch.save(state, tmp_path / "trainable.pt")
    other, _ = make(method, backbone, seed=0)  # same frozen weights, fresh trainables
    other.load_trainable_state_dict(torch.load(tmp_path / "trainable.pt"))
    model.eval()
    other.eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(other(ids, mask).logits, model(ids, mask).logits)


# ----------------------------------------------------------------------- golden counts (meta device)

def meta_trainable(method: str, backbone: str, cfg: dict | None = None) -> int:
    spec = backbones.get_spec(backbone)
    model = apply_method(method, backbones.build(spec, "meta"), spec, cfg or {}, n_labels=2)
    return model.param_counts()["params_trainable"]


def test_golden_backbone_counts():
    count = backbones.count_params
    assert count(backbones.build("llama-7b", causal_lm=True)) == 6_738_415_616
    assert count(backbones.build("llama-7b")) == 6_607_343_616
    assert count(backbones.build("llama-13b", causal_lm=True)) == 13_015_864_320
    assert count(backbones.build("llama-70b", causal_lm=True)) == 68_976_648_192


def test_golden_lora_llama7b():
    assert meta_trainable("lora", "llama-7b", {"r": 8, "target_modules": "q_proj,v_proj"}) == 4_194_304


def test_golden_read_llama7b():
    h, d = 256, 4096
    assert meta_trainable("read", "llama-7b", {"hidden_size": h}) == 4 * h * d + 3 * h * h + 6 * h + 2 * d


def test_read_is_flat_in_depth():
    assert meta_trainable("read", "smollm2-135m@L4") == meta_trainable("read", "smollm2-135m")


# ----------------------------------------------------------------------- bad input

@pytest.mark.parametrize("method,cfg,needle", [
    ("nope", {}, "valid: "),
    ("lora", {"rank": 8}, "valid: "),
    ("lst", {"r": 7}, "r"),
    ("read", {"rnn": "transformer"}, "gru"),
])
def test_bad_config_gives_one_clear_error(method, cfg, needle):
    spec = backbones.get_spec("llama-tiny")
    with pytest.raises(ValueError) as err:
        apply_method(method, backbones.build(spec, "meta"), spec, cfg)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["read", "lora"])
def test_backbone_buffers_keep_their_dtype(method):
    """A bf16 checkpoint keeps RoPE's inv_freq in fp32 (as from_pretrained loads it); the method must not round it."""
    spec = backbones.get_spec("llama-tiny")
    bb = backbones.build(spec, "cpu", dtype=torch.bfloat16)
    rotary = bb.rotary_emb
    rotary.inv_freq = rotary.inv_freq.float()
    model = apply_method(method, bb, spec, ROWS[method][0], n_labels=2)
    assert model.backbone.rotary_emb.inv_freq.dtype == torch.float32
    assert next(p for p in model.parameters() if p.requires_grad).dtype == torch.bfloat16  # new parts: backbone's
