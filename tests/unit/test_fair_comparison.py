"""Fair comparisons (issue 13): pooling from the checkpoint, the probe floor, SHERL's taps, seeds and CIs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_side_methods import batch, build, jiggle

from trainables import backbones
from trainables.methods import apply_method, collect_taps
from trainables.methods.base import Taps, checkpoint_pooling, default_pooling

# ----------------------------------------------------------------------------- pooling


def _sentence_transformers_folder(tmp_path, **modes):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    cfg = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": False}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(cfg | modes))
    return tmp_path


@pytest.mark.parametrize("mode,expected", [("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "first"),
                                           ("pooling_mode_lasttoken", "last")])
def test_checkpoint_pooling_reads_the_sentence_transformers_config(tmp_path, mode, expected):
    folder = _sentence_transformers_folder(tmp_path, **{mode: True})
    assert checkpoint_pooling(str(folder), "first") == expected


def test_checkpoint_without_a_pooling_config_uses_the_family_convention(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint_pooling(str(tmp_path), "last") == "last"
    assert checkpoint_pooling(None, "first") == "first"
    assert default_pooling(backbones.get_spec("bert-base")) == "first"  # plain BERT: [CLS]
    assert default_pooling(backbones.get_spec("smollm2-135m@L2")) == "last"  # decoder: last real token


def test_minilm_checkpoint_pools_the_mean():
    """all-MiniLM-L6-v2 was trained with mean pooling; its own 1_Pooling/config.json says so."""
    spec = backbones.get_spec("minilm-l6")
    assert default_pooling(spec) == "mean"
    assert apply_method("read", backbones.build(spec, "meta"), spec, {}).pooling == "mean"
    assert apply_method("read", backbones.build(spec, "meta"), spec, {}, pooling="first").pooling == "first"


@pytest.mark.parametrize("pooling,depends", [("mean", True), ("first", False)])
def test_read_reads_a_middle_token_only_under_mean_pooling(pooling, depends):
    """Randomise one middle position's taps: READ's logits move under mean pooling, not under [CLS]."""
    model = build("read", "bert-tiny", {"hidden_size": 16}, pooling=pooling)
    jiggle(model)
    model.eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        taps = collect_taps(model.backbone, model.spec, ids, mask, model.tap_layers())
        base = model.forward_taps(taps).logits
        hidden = {i: h.clone() for i, h in taps.hidden.items()}
        for i in model.tap_layers()[:-1]:  # the correction's input only; the final tap stays as it was
            hidden[i][:, 2] = torch.randn_like(hidden[i][:, 2]) * 3
        moved = model.forward_taps(Taps(hidden, taps.attention_mask)).logits
    changed = (moved - base).abs().amax(dim=-1) > 1e-5
    assert bool(changed.all()) is depends, (pooling, changed)


# ----------------------------------------------------------------------------- the probe floor


def _logistic_regression(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Unregularised multinomial logistic regression fitted to convergence with L-BFGS (float64)."""
    x, w = x.double(), torch.zeros(x.shape[1] + 1, 2, dtype=torch.float64, requires_grad=True)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xb @ w, y)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logits = xb @ w
        return logits, torch.nn.functional.cross_entropy(logits, y).item()


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_probe_reaches_the_logistic_regression_optimum(pooling):
    """The probe is exactly a linear classifier on the pooled frozen features: trained long enough it lands
    on logistic regression's optimum (fitted independently, from the backbone's own last_hidden_state)."""
    model = build("probe", "bert-tiny", pooling=pooling)
    g = torch.Generator().manual_seed(3)
    n, t = 300, 12  # 300 examples > 2·64 dims with random labels: not separable, so the optimum is finite
    ids = torch.randint(3, 2000, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[torch.arange(n) % 3 == 0, 8:] = 0
    y = torch.randint(0, 2, (n,), generator=g)
    with torch.no_grad():
        hidden = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        x = (hidden * m).sum(1) / m.sum(1) if pooling == "mean" else hidden[:, 0]
        taps = collect_taps(model.backbone, model.spec, ids, mask, model.tap_layers())
    ref_logits, ref_loss = _logistic_regression(x, y)
    assert [n for n, _ in model.trainable_named_parameters()] == ["head.weight", "head.bias"]
    opt = torch.optim.Adam([p for _, p in model.trainable_named_parameters()], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / 2000)
    for _ in range(2000):
        opt.zero_grad()
        loss = model.forward_taps(taps, y).loss
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        out = model.forward_taps(taps, y)
    assert out.loss.item() == pytest.approx(ref_loss, abs=2e-3)
    margin = lambda z: z[:, 1] - z[:, 0]  # noqa: E731  (logits are defined up to a shift; the margin is not)
    agree = (margin(out.logits.double()).sign() == margin(ref_logits).sign()).double().mean().item()
    assert agree >= 0.98
    torch.testing.assert_close(margin(out.logits.double()), margin(ref_logits), atol=0.15, rtol=0.05)


# ----------------------------------------------------------------------------- SHERL's taps


@pytest.mark.parametrize("backbone,layers", [("llama-tiny", 2), ("minilm-l6", 6), ("bert-tiny", 2)])
def test_sherl_reads_phi_0_to_phi_L_minus_1_with_the_deepest_as_guide(backbone, layers):
    """The reference feeds φ_0 … φ_{L−1}: K = L taps, each with its own gated down-projection; φ_{L−1} is
    the guide and the skip, never φ_L. On a 2-block backbone the early route reads the embedding and block 0."""
    model = build("sherl", backbone, {"r": 4}, device="meta")
    assert model.spec.n_layers == layers
    assert model.tap_layers() == list(range(layers))
    assert model.taps == list(range(layers - 1))  # shallow taps, weighed against the guide
    d, w = model.spec.d_model, model.spec.d_model // 4
    k = layers  # (K+1)·d·d' + 2K·d'² weights (METHODS.md) plus their biases, w·c, β and the norm
    norm = sum(p.numel() for p in model.norm.parameters())
    expected = (k + 1) * d * w + 2 * k * w * w + k * 3 * w + (w + 1) + d + 1 + norm
    assert model.param_counts()["params_trainable"] == expected


def test_sherl_guide_and_skip_are_the_deepest_tap():
    """Perturb φ_{L−1} and the output moves even with the skip closed (the guide reads it); perturb a
    shallow tap and the output moves only through the weighted sum."""
    model = build("sherl", "bert-tiny", {"r": 4})
    jiggle(model, 0.2)
    model.eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        model.beta.fill_(-10.0)  # tanh(β/0.1) = −1: skip on, sign aside
        taps = collect_taps(model.backbone, model.spec, ids, mask, model.tap_layers())
        base = model.forward_taps(taps).logits
        for i in model.tap_layers():
            hidden = {j: h.clone() for j, h in taps.hidden.items()}
            hidden[i] = hidden[i] + torch.randn_like(hidden[i])
            assert not torch.allclose(model.forward_taps(Taps(hidden, taps.attention_mask)).logits, base), i


# ----------------------------------------------------------------------------- LST as its reference


@pytest.mark.parametrize("backbone", ["llama-tiny", "bert-tiny"])
def test_lst_output_norm_is_the_pruned_backbone_norm(backbone):
    from trainables.methods.lst import prune_init

    model = build("lst", backbone, {"r": 4, "init": "random"})
    with torch.no_grad():  # make the backbone's norm distinguishable from a fresh one
        for p in model.backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    chosen = prune_init(model)
    res = chosen[model.kept[-1]]["res"]
    src = (model.backbone.norm if backbone == "llama-tiny"
           else model.spec.anatomy.get(model.backbone, "blocks")[-1].output.LayerNorm)
    for name, p in src.named_parameters():
        torch.testing.assert_close(dict(model.norm.named_parameters())[name], p[res])


def test_lst_reference_layer_drop():
    """The reference drops every 4th block from the first (T5-base: 0, 4, 8 of 12)."""
    assert build("lst", "minilm-l6", {"drop_every": 4}, device="meta").kept == [1, 2, 3, 5]
    assert build("lst", "smollm2-135m@L16", {"drop_every": 4}, device="meta").kept == [
        j for j in range(16) if j % 4]
    assert build("lst", "minilm-l6", {}, device="meta").kept == list(range(6))


# ----------------------------------------------------------------------------- reference hyperparameters


def test_reference_lrs_per_family_and_search_spaces_contain_them():
    from study.spaces import space
    from trainables.methods import REGISTRY, get_method

    assert get_method("full").lr_for("bert") == get_method("full").lr_for("llama") == 2e-5
    assert (get_method("lora").lr_for("bert"), get_method("lora").lr_for("llama")) == (5e-4, 2e-4)
    assert 1e-4 <= get_method("read").lr_for("bert") <= 1e-3  # READ's authors' range
    assert "m.scale" in space("read")  # READ's output scale is searched
    for name in REGISTRY:
        for family in ("bert", "llama"):
            lr = space(name, family)["lr"]
            assert lr.low < get_method(name).lr_for(family) < lr.high, (name, family)


# ----------------------------------------------------------------------------- seeds, roles, confidence intervals


def _row(method, score, role="search", seed=0, backbone="minilm-l6", **kw):
    """A finished trial: search rows score on validation (`final_metric`), confirm rows on test too."""
    test = {"test_metric": score} if role == "confirm" else {}
    return {"study": "s", "trial_id": f"{method}-{role}-{seed}-{score}", "method": method, "backbone": backbone,
            "task": "vader-movies", "train_size": 800, "metric_name": "accuracy", "weights": "pretrained",
            "status": "ok", "final_metric": score, "best_metric": score, "role": role, "seed": seed, "epochs_run": 4,
            **test, **kw}


def test_quality_is_the_confirm_seeds_test_mean_with_a_t_interval(tmp_path):
    import pyarrow.parquet as pq
    from scipy import stats

    from study import quality, schema

    trials = [_row("read", 0.74), _row("read", 0.69, epochs_run=1, early_stopped=True), _row("read", 0.80,
                                                                                              early_stopped=True)]
    trials += [_row("read", v, "confirm", s) for s, v in ((1, 0.71), (2, 0.70), (3, 0.73))]
    trials += [_row("probe", 0.70)] + [_row("probe", v, "confirm", s) for s, v in ((1, 0.70), (2, 0.71), (3, 0.72))]
    trials += [_row("lst", 0.52)] + [_row("lst", v, "confirm", s) for s, v in ((1, 0.50), (2, 0.55), (3, 0.51))]
    trials += [_row("lst", None, status="error"), _row("lora", 0.9, weights="random")]
    rows = {r["method"]: r for r in quality.quality_rows([t for t in trials if t["weights"] != "random"])}
    read = rows["read"]
    assert read["confirmed"] and read["seeds"] == 3 and read["seeds_failed"] == 0
    # the search max is over trials that ran their budget (0.80 was stopped early), on validation
    assert read["search_trials"] == 3 and read["search_best_val"] == 0.74
    assert read["search_epochs"] == 9 and read["search_stopped"] == 2
    assert read["mean"] == pytest.approx((0.71 + 0.70 + 0.73) / 3) and read["val_mean"] == pytest.approx(read["mean"])
    half = stats.t.ppf(0.975, 2) * read["std"] / 3 ** 0.5  # Student-t at 3 seeds: wider than their range
    assert (read["ci_low"], read["ci_high"]) == pytest.approx((read["mean"] - half, read["mean"] + half))
    assert read["ci_low"] < 0.70 and read["ci_high"] > 0.73
    assert read["probe_mean"] == pytest.approx(0.71) and read["below_probe"] is False  # paired: within noise
    assert rows["lst"]["below_probe"] is True and rows["probe"]["below_probe"] is None  # the floor itself
    assert rows["lst"]["search_trials"] == 2 and rows["lst"]["seeds_failed"] == 0  # a failed search trial is no seed
    assert read["ci_low_examples"] is None  # no predictions given
    path = schema.write_quality(list(rows.values()), tmp_path / "quality.parquet")
    table = pq.read_table(path)
    assert [f.name for f in table.schema] == [f.name for f in schema.QUALITY_FIELDS]
    assert all(set(r) == {f.name for f in schema.QUALITY_FIELDS} for r in rows.values())
    assert quality.fmt(read) == f"{read['mean']:.3f} [{read['ci_low']:.3f}, {read['ci_high']:.3f}]"
    # a method that was only searched: unconfirmed, no mean, its search max labelled as one
    only = quality.quality_rows([_row("full", 0.8), _row("full", 0.7)])[0]
    assert not only["confirmed"] and only["mean"] is None and only["ci_low"] is None and only["seeds"] == 0
    assert only["search_best_val"] == 0.8 and quality.fmt(only, search=True) == "unconfirmed, search max (val) 0.80"
    # every confirm seed failed: unconfirmed, and the failures are counted, not hidden
    failed = quality.quality_rows([_row("full", 0.8), _row("full", None, "confirm", 1, status="oom")])[0]
    assert not failed["confirmed"] and failed["seeds_failed"] == 1 and quality.fmt(failed) == "unconfirmed (1 failed)"


def test_role_and_pooling_columns_are_in_the_trials_schema():
    from study import schema

    for name in ("role", "seed", "pooling", "method_config"):
        assert name in schema.TRIAL_COLUMNS


# ----------------------------------------------------------------------------- cost that counts the cache build


def test_cache_build_cost_is_split_over_its_readers_and_sums_to_the_measured_build(tmp_path):
    """Real trials on a real cache: each cache's build (manifest build_s, measured by cache.ensure) is split
    over the trials that read it; the shares of one cache add back up to that build; a live trial pays none."""
    from test_cache import config

    from study.collect import with_cache_shares
    from trainables.loop import train

    runs = {"read0": config(tmp_path, "read"), "probe0": dataclasses.replace(config(tmp_path, "read"), method="probe", method_config={}),
            "read1": config(tmp_path, "read", seed=1), "live": config(tmp_path, "read", cache=False)}
    rows = [train(cfg, tmp_path / name) for name, cfg in runs.items()]
    assert [r["status"] for r in rows] == ["ok"] * 4, [r["error"] for r in rows]
    assert rows[3]["cache_builds"] is None
    with_share = with_cache_shares(rows)
    manifests = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/manifest.json")}
    assert len(manifests) == 4  # train and validation per seed (a random backbone is drawn by its seed)
    readers = {cid: [r for r in with_share if r["cache_builds"] and cid in json.loads(r["cache_builds"])]
               for cid in manifests}
    assert sorted(len(v) for v in readers.values()) == [1, 1, 2, 2]  # READ and the probe share seed 0's
    total_share = sum(r["cache_share_s"] for r in with_share)
    assert total_share == pytest.approx(sum(m["build_s"] for m in manifests.values()))
    for r in with_share[:3]:
        expected = sum(manifests[c]["build_s"] / len(readers[c]) for c in json.loads(r["cache_builds"]))
        assert r["cache_share_s"] == pytest.approx(expected) and r["cache_share_s"] > 0
        assert r["time_with_cache_s"] == pytest.approx(r["train_time_s"] + r["cache_share_s"])
    assert with_share[3]["cache_share_s"] == 0 and with_share[3]["time_with_cache_s"] == with_share[3]["train_time_s"]


def test_the_default_budget_measures_methods():
    """Same trials for every method (>= 8), hundreds of steps, 3 confirm seeds, one example < 0.2 points."""
    from study import scaling

    s = scaling.DEFAULT
    assert s.trials_per_method >= 8 and s.confirm_seeds == 3
    assert s.epochs * s.train_size // 16 >= 150  # optimisation steps at the default batch size
    assert 100 / s.max_eval_examples <= 0.2
    assert "probe" in scaling.DEFAULT_METHODS and "probe" in scaling.QUICK_METHODS
    assert all(backbones.weights_here(backbones.get_spec(b)) or b.startswith("llama-") for b in scaling.DEFAULT_RUN_BACKBONES)
