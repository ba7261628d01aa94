"""Method-specific checks for READ, LST and SHERL that the contract table does not cover."""

from __future__ import annotations

import pytest
import torch

from trainables import backbones
from trainables.methods import apply_method, collect_taps
from trainables.methods.base import pool
from trainables.methods.lst import prune_init


def build(method: str, backbone: str, cfg: dict | None = None, device: str = "cpu", seed: int = 0, **kw):
    torch.manual_seed(seed)
    spec = backbones.get_spec(backbone)
    return apply_method(method, backbones.build(spec, device), spec, cfg or {}, n_labels=2, **kw)


def batch(b: int = 4, t: int = 9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    return ids, mask, torch.tensor([0, 1, 1, 0][:b])


def jiggle(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every trainable off its init so zero-initialised parts matter."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


# ----------------------------------------------------------------------------- READ

@pytest.mark.parametrize("backbone", ["llama-tiny", "minilm-l6", "llama-7b"])
@pytest.mark.parametrize("rnn,gates", [("gru", 3), ("lstm", 4), ("rnn", 1)])
@pytest.mark.parametrize("h", [8, 256])
def test_read_count_formula(backbone, rnn, gates, h):
    d = backbones.get_spec(backbone).d_model
    count = build("read", backbone, {"hidden_size": h, "rnn": rnn}, device="meta").param_counts()["params_trainable"]
    # RNN (input d, weights ih + hh, two biases) + joiner scale + W_o, b_o
    assert count == gates * h * (d + h) + 2 * gates * h + d + h * d + d
    linear = build("read", backbone, {"hidden_size": h, "rnn": rnn, "joiner": "linear", "init_from_embedding": True},
                   device="meta").param_counts()["params_trainable"]
    assert linear == gates * h * (h + h) + 2 * gates * h + d + h * d + d + 2 * (d * h + h)


@pytest.mark.parametrize("backbone", ["bert-tiny", "llama-tiny"])
def test_read_mean_pooling_skips_pads_exactly(backbone):
    model = build("read", backbone, {"hidden_size": 16}, pooling="mean")
    jiggle(model)
    model.eval()
    ids, mask, labels = batch()
    with torch.no_grad():
        got = model(ids, mask, labels).logits
        taps = collect_taps(model.backbone, model.spec, ids, mask, model.tap_layers())
        every = [taps.hidden[i].flatten(0, 1) for i in model.tap_layers()]  # all B×T positions, pads too
        delta = model.correction(every).view(*ids.shape, -1)
        final = model.final_norm(taps.hidden[model.spec.n_layers]) + delta
        ref = model.head(pool(final, mask, "mean"))
    torch.testing.assert_close(got, ref)


# ----------------------------------------------------------------------------- LST

def _expected_side_weights(model, chosen: dict) -> dict[str, torch.Tensor]:
    """Side q/k/v/o/FFN weights rebuilt from the chosen indices, independently of lst.PLANS."""
    cfg = model.backbone.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    blocks = model.spec.anatomy.get(model.backbone, "blocks")

    def heads(dims, n_rows):
        return torch.cat([h * hd + dims for h in range(n_rows // hd)])

    out = {}
    for j, sel in chosen.items():
        b = blocks[j]
        res, ffn, qk, vo = sel["res"], sel["ffn"], sel["qk"], sel["vo"]
        if model.spec.family == "llama":
            a, m = b.self_attn, b.mlp
            q, k, v, o, ups, down = a.q_proj, a.k_proj, a.v_proj, a.o_proj, [m.gate_proj, m.up_proj], m.down_proj
            names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
            out[f"{j}.input_layernorm.weight"] = b.input_layernorm.weight[res]
        else:
            a = b.attention
            q, k, v, o, ups, down = a.self.query, a.self.key, a.self.value, a.output.dense, [b.intermediate.dense], \
                b.output.dense
            names = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "intermediate.dense", "output.dense"]
            out[f"{j}.output.LayerNorm.bias"] = b.output.LayerNorm.bias[res]
        weights = [q.weight[heads(qk, q.weight.shape[0])][:, res], k.weight[heads(qk, k.weight.shape[0])][:, res],
                   v.weight[heads(vo, v.weight.shape[0])][:, res], o.weight[res][:, heads(vo, o.weight.shape[1])],
                   *(u.weight[ffn][:, res] for u in ups), down.weight[res][:, ffn]]
        out.update({f"{j}.{n}.weight": w for n, w in zip(names, weights, strict=True)})
    return out


@pytest.mark.parametrize("backbone", ["llama-tiny", "bert-tiny"])
@pytest.mark.parametrize("importance", ["l1", "fisher"])
def test_lst_prune_copies_the_selected_slices(backbone, importance):
    model = build("lst", backbone, {"r": 4, "importance": importance})
    ids, mask, labels = batch()
    chosen = prune_init(model, [{"input_ids": ids, "attention_mask": mask, "labels": labels}] * 2)
    assert set(chosen) == set(range(model.spec.n_layers))
    side = dict(model.blocks.named_parameters())
    for name, want in _expected_side_weights(model, chosen).items():
        torch.testing.assert_close(side[name], want, rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())
    random = build("lst", backbone, {"r": 4, "init": "random"})
    q = "0.self_attn.q_proj.weight" if model.spec.family == "llama" else "0.attention.self.query.weight"
    assert not torch.equal(side[q], dict(random.blocks.named_parameters())[q])


def test_lst_l1_picks_the_heaviest_ffn_units_and_rotary_pairs():
    model = build("lst", "llama-tiny", {"r": 4})
    chosen = prune_init(model)
    mlp = model.backbone.layers[0].mlp
    score = mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1) + mlp.down_proj.weight.abs().sum(0)
    assert torch.equal(chosen[0]["ffn"], score.topk(len(chosen[0]["ffn"])).indices.sort().values)
    qk, half = chosen[0]["qk"], model.backbone.config.head_dim // 2
    assert torch.equal(qk[len(qk) // 2:], qk[: len(qk) // 2] + half)


def test_lst_fisher_needs_batches_and_meta_prune_is_a_no_op():
    model = build("lst", "llama-tiny", {"r": 4, "importance": "fisher"})
    with pytest.raises(ValueError, match="batches"):
        prune_init(model)
    meta = build("lst", "llama-tiny", {"r": 4}, device="meta")
    assert prune_init(meta) == {}


def test_lst_drop_layers_removes_one_block_ladder_and_gate():
    def count(cfg):
        return build("lst", "llama-tiny", {"r": 4, **cfg}, device="meta").param_counts()["params_trainable"]

    model = build("lst", "llama-tiny", {"r": 4}, device="meta")
    block = sum(p.numel() for p in model.blocks["0"].parameters())
    d, width = model.spec.d_model, model.side_config.hidden_size
    assert count({}) - count({"drop_layers": (0,)}) == block + d * width + width + 1
    assert build("lst", "llama-tiny", {"r": 4, "drop_layers": (1,)}, device="meta").tap_layers() == [0, 1]


def test_lst_merge_last_gates_in_the_backbone_output():
    model = build("lst", "bert-tiny", {"r": 4, "merge_last": True, "drop_layers": (1,)})
    assert model.tap_layers() == [0, 1, 2]
    assert model.param_counts()["params_trainable"] == \
        build("lst", "bert-tiny", {"r": 4, "drop_layers": (1,)}).param_counts()["params_trainable"] + 1
    model.eval()
    ids, mask, labels = batch()
    with torch.no_grad():
        live = model(ids, mask, labels)
        cached = model.forward_taps(collect_taps(model.backbone, model.spec, ids, mask, model.tap_layers()), labels)
    torch.testing.assert_close(cached.logits, live.logits)


# ----------------------------------------------------------------------------- SHERL

@pytest.mark.parametrize("backbone", ["llama-tiny", "bert-tiny"])
def test_sherl_open_skip_and_zero_adapter_reproduce_the_backbone(backbone):
    """m = φ_{L−1} (tanh(β/0.1) = 1, W_out = b_out = 0): the late route must rebuild φ_L."""
    model = build("sherl", backbone, {"r": 4})
    jiggle(model)
    with torch.no_grad():
        model.out.weight.zero_()
        model.out.bias.zero_()
        model.beta.fill_(10.0)
    model.eval()
    ids, mask, _ = batch()
    n = model.spec.n_layers
    with torch.no_grad():
        taps = collect_taps(model.backbone, model.spec, ids, mask, [*model.tap_layers(), n])
        late = model.late_route(model.mix(taps), mask)
        torch.testing.assert_close(late, taps.hidden[n])
        if model.spec.family == "llama":  # the norm starts as the backbone's final norm
            model.norm.load_state_dict(model.backbone.norm.state_dict())
            ref = model.head(pool(model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state, mask, "last"))
            torch.testing.assert_close(model(ids, mask).logits, ref)


def test_sherl_taps_stop_below_the_last_block():
    model = build("sherl", "llama-tiny", {"r": 4}, device="meta")
    assert model.tap_layers() == [0, 1]
    assert build("sherl", "smollm2-135m", {"taps": "0,5"}, device="meta").tap_layers() == [0, 5, 29]


# ----------------------------------------------------------------------------- all three

@pytest.mark.parametrize("method", ["read", "lst", "sherl"])
def test_low_precision_cached_taps_are_cast(method):
    model = build(method, "llama-tiny", {"hidden_size": 16} if method == "read" else {"r": 4})
    jiggle(model)
    model.eval()
    ids, mask, labels = batch()
    with torch.no_grad():
        taps = collect_taps(model.backbone, model.spec, ids, mask, model.tap_layers())
        full = model.forward_taps(taps, labels).logits
        half = model.forward_taps(taps.to("cpu", torch.bfloat16), labels).logits
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("method,cfg,needle", [
    ("read", {"hidden_size": 0}, ">= 1"),
    ("read", {"rnn": "transformer"}, "gru"),
    ("lst", {"r": 3}, "valid r: [1, 2, 4, 8, 16, 32, 64]"),
    ("lst", {"r": 4, "heads": 3}, "valid heads: [1, 2, 4, 8]"),
    ("lst", {"r": 16}, "even head dim"),
    ("lst", {"drop_layers": (2,)}, "0..1"),
    ("lst", {"drop_layers": (0, 1)}, "keep at least one"),
    ("sherl", {"r": 3}, "valid r"),
    ("sherl", {"taps": (1,)}, "0..0"),
])
def test_bad_configs_raise_one_line(method, cfg, needle):
    with pytest.raises(ValueError) as err:
        build(method, "llama-tiny", cfg, device="meta")
    assert needle in str(err.value)
    assert "\n" not in str(err.value)
