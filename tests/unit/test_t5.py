"""T5, the papers' own setting: the registry's sizes, the papers' counts, text-to-text scoring, a real trial.

Counts are on the meta device (no weights); the tiny random T5 (`t5-tiny`, MiniLM's tokenizer)
runs methods and a short trial on the offline vader-movies corpus.
"""

from __future__ import annotations

import json

import pytest
import torch

from study.scaling import ladder
from trainables import backbones
from trainables.backbones import build, get_spec
from trainables.methods import apply_method
from trainables.methods.lst import prune_init
from trainables.text2text import LabelWords, regression_grid


def trainable(backbone: str, method: str, cfg: dict | None = None) -> int:
    spec = get_spec(backbone)
    return apply_method(method, build(spec), spec, cfg or {}).param_counts()["params_trainable"]


# Parameter totals as published on the hub model cards (T5: tied head; Flan-T5 = T5 v1.1: untied head).
PUBLISHED = {"t5-small": 60_506_624, "t5-base": 222_903_552, "t5-large": 737_668_096, "t5-3b": 2_851_598_336,
             "t5-11b": 11_307_321_344, "flan-t5-small": 76_961_152, "flan-t5-base": 247_577_856,
             "flan-t5-large": 783_150_080, "flan-t5-xl": 2_849_757_184, "flan-t5-xxl": 11_135_332_352}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_registry_sizes_match_the_published_counts(name):
    assert backbones.count_params(build(name)) == PUBLISHED[name]


def test_truncation_keeps_the_first_k_blocks_of_both_stacks():
    spec = get_spec("t5-base@L6")
    model = build(spec)
    assert (spec.n_layers, spec.n_decoder_layers) == (6, 6)
    assert len(model.encoder.block) == len(model.decoder.block) == 6


def test_lst_t5_base_matches_the_lst_paper():
    """LST paper (Table 1): T5-base, r=8, 9 of 12 layers kept -> 3,878,712 trainable, 1.74%."""
    n = trainable("t5-base", "lst", {"r": 8, "drop_every": 4})
    assert n == 3_878_712
    assert round(100 * n / PUBLISHED["t5-base"], 2) == 1.74


def test_read_does_not_grow_with_t5_size():
    """t5-large, t5-3b and t5-11b share d = 1024: READ's count is the same (READ paper's claim)."""
    h, d = 256, 1024
    decoder = 4 * h * d + 3 * h * h + 6 * h + 2 * d  # GRU, joiner scale, W_o
    encoder = 3 * h * d + 3 * h * h + 6 * h + d  # GRU, joiner scale (its state feeds the decoder's RNN)
    counts = {b: trainable(b, "read") for b in ("t5-large", "t5-3b", "t5-11b")}
    assert set(counts.values()) == {decoder + encoder}, counts


def test_ladders_keep_families_apart():
    assert all(get_spec(n).family == "t5" for n in ladder("t5-11b"))
    assert not any(get_spec(n).family == "t5" for n in ladder("llama-7b"))


def test_label_words_score_and_regression_grid():
    from trainables.backbones import load_tokenizer

    tok = load_tokenizer("t5-tiny")  # MiniLM's WordPiece: [SEP] ends targets
    config = build("t5-tiny").config
    words = LabelWords.from_names(tok, ["negative", "positive"], config)
    assert words.target[:, -1].tolist() == [tok.sep_token_id] * 2 and words.decoder_input_ids[:, 0].eq(0).all()
    logits = torch.full((2 * 2, words.target.shape[1], config.vocab_size), -10.0)
    positions = torch.arange(words.target.shape[1])
    for example, cls in ((0, 1), (1, 0)):  # example 0's targets say "positive", example 1's "negative"
        logits[example * 2 + cls, positions, words.target[cls]] = 10.0
    loss, scores = words.loss_and_logits(words.scores(logits), torch.tensor([1, 0]))
    assert scores.argmax(-1).tolist() == [1, 0] and loss.item() < 1e-3
    grid = regression_grid()
    assert len(grid) == 26 and grid[0] == 0.0 and grid[-1] == 5.0
    reg = LabelWords.placeholder(1, config)
    assert reg.n == 26 and reg.classes_of(torch.tensor([3.79, 0.05])).tolist() == [19, 0]


def test_lst_pruned_init_copies_both_stacks_and_cross_attention_reads_the_side_encoder():
    torch.manual_seed(0)
    spec = get_spec("t5-tiny")
    model = apply_method("lst", build(spec, "cpu"), spec, {"r": 4, "init": "random"})
    chosen = prune_init(model)
    t5 = model.backbone
    enc_res = chosen["enc_1"]["res"]
    sel = chosen["dec_1"]
    heads, d_kv = t5.config.num_heads, t5.config.d_kv
    rows = (torch.arange(heads)[:, None] * d_kv + sel["qk"]).reshape(-1)
    want = t5.decoder.block[1].layer[1].EncDecAttention.k.weight[rows][:, enc_res]
    torch.testing.assert_close(model.dec_blocks["1"].layer[1].EncDecAttention.k.weight, want)
    torch.testing.assert_close(model.enc_norm.weight, t5.encoder.final_layer_norm.weight[enc_res])
    first = model.enc_blocks["0"].layer[0].SelfAttention.relative_attention_bias.weight
    torch.testing.assert_close(first, t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight)


def test_read_reference_variant_backpropagates_through_the_frozen_decoder_only():
    torch.manual_seed(0)
    spec = get_spec("t5-tiny")
    model = apply_method("read", build(spec, "cpu"), spec, {"hidden_size": 16, "enc_correction_into_decoder": True})
    with torch.no_grad():
        model.enc_out.weight.normal_(std=0.1)
    ids = torch.randint(5, 500, (2, 6))
    model(ids, torch.ones_like(ids), torch.tensor([0, 1])).loss.backward()
    assert model.enc_out.weight.grad.abs().sum() > 0  # reached through the frozen decoder
    assert model.enc_rnn.weight_ih_l0.grad.abs().sum() > 0
    assert not model.backbone_tensors_with_grad()


def test_read_default_reaches_the_encoder_module_through_the_side_network():
    torch.manual_seed(0)
    spec = get_spec("t5-tiny")
    model = apply_method("read", build(spec, "cpu"), spec, {"hidden_size": 16})
    with torch.no_grad():
        model.out.weight.normal_(std=0.1)  # W_o starts at zero: give the path a gradient
    ids = torch.randint(5, 500, (2, 6))
    model(ids, torch.ones_like(ids), torch.tensor([0, 1])).loss.backward()
    assert model.enc_out is None and model.enc_rnn.weight_hh_l0.grad.abs().sum() > 0


def test_memory_estimate_runs_on_t5():
    from trainables.memory import estimate_step

    full = estimate_step("t5-tiny", "full", batch_size=4, seq_len=16, dtype=torch.float32)
    lst = estimate_step("t5-tiny", "lst", {"r": 4}, batch_size=4, seq_len=16, dtype=torch.float32)
    assert 0 < lst.optimizer < full.optimizer and lst.peak_bytes < full.peak_bytes


@pytest.mark.parametrize("method", ["read"])
def test_a_short_t5_trial_on_real_text(method, tmp_path, capsys):
    from trainables import loop

    rc = loop.main(["--backbone", "t5-tiny", "--method", method, "--task", "vader-movies", "--train-size", "32",
                    "--epochs", "1", "--max-length", "24", "--batch-size", "8", "--run", "max_eval_examples=32",
                    "--out", str(tmp_path / method), "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["status"] == "ok", summary.get("error")
    assert summary["backbone_family"] == "t5" and summary["params_head"] == 0
    assert 0.0 <= summary["best_metric"] <= 1.0


def test_the_analysis_judges_the_t5_row_flat():
    from analysis import claims

    verdict = claims.t5_verdict("read")
    assert verdict.verdict == claims.SUPPORTED and verdict.statistic == 0.0 and verdict.n == 3
    assert claims.t5_verdict("lst").verdict == claims.NOT_SUPPORTED  # LST's side blocks grow with d_ff and heads


@pytest.mark.parametrize("method", ["lst", "probe"])  # both stacks + cross-attention; no encoder taps
def test_cached_encoder_decoder_taps_give_the_live_loss(method, tmp_path):
    """A cache of both stacks' taps (the decoder's over every class word) feeds forward_taps exactly."""
    import datasets

    from trainables import cache

    torch.manual_seed(0)
    spec = get_spec("t5-tiny")
    backbone = build(spec, "cpu")
    model = apply_method(method, backbone, spec, {"r": 4} if method in ("lst", "sherl") else {}, n_labels=2)
    model.set_label_words(LabelWords([[7, 102], [9, 11, 102]], 0))  # targets of different lengths
    model.eval()
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (5, 9, 3, 7, 6)]
    split = datasets.Dataset.from_dict({"input_ids": rows, "labels": [0, 1, 1, 0, 1]})
    taps, positions = cache.tap_request(model)
    key = cache.CacheKey(backbone=spec.name, backbone_config="c", weights="w", compute_dtype="float32",
                         tokenizer="none", task="t", split="train", train_size=5, seed=0, max_length=16,
                         data=cache.data_digest(split), taps=taps, positions=positions, dtype="fp32",
                         **cache.decoder_request(model))
    writer = cache.local_writer(backbone, spec, split, key, pad_token_id=0, batch_size=2)
    folder, status = cache.ensure(tmp_path, key, cache.lengths_of(split), spec.d_model, writer, shard_bytes=4000)
    assert status.startswith("built") and len(json.loads((folder / "manifest.json").read_text())["shards"]) > 1
    from trainables.tasks import batches

    live_batches = list(batches(split, 3, pad_token_id=0))
    for cached, live in zip(cache.TapReader(folder).batches(3), live_batches, strict=True):
        with torch.no_grad():
            a = model.forward_taps(cached["taps"], cached["labels"])
            b = model(live["input_ids"], live["attention_mask"], live["labels"])
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)


def test_t5_regression_grid_spans_the_labels_and_refuses_a_huge_range():
    from types import SimpleNamespace

    from trainables.trial import label_words

    cfg = SimpleNamespace(task="file:x.csv")
    config = build("t5-tiny").config
    stsb = SimpleNamespace(n_labels=1, train={"labels": [0.0, 2.3, 5.0]})
    words = label_words(cfg, get_spec("t5-tiny"), SimpleNamespace(config=config), stsb)
    assert words.n == 26 and words.values[0] == 0.0 and words.values[-1] == 5.0
    shifted = SimpleNamespace(n_labels=1, train={"labels": [-1.1, 7.9]})
    words = label_words(cfg, get_spec("t5-tiny"), SimpleNamespace(config=config), shifted)
    assert words.values[0].item() == pytest.approx(-1.2) and words.values[-1].item() == pytest.approx(8.0)
    huge = SimpleNamespace(n_labels=1, train={"labels": [0.0, 100.0]})
    with pytest.raises(ValueError, match="rescale the labels"):
        label_words(cfg, get_spec("t5-tiny"), SimpleNamespace(config=config), huge)


def test_a_study_refuses_an_unscorable_t5_regression_range_before_anything_starts(tmp_path):
    from study import runner

    csv = tmp_path / "scores.csv"
    csv.write_text("text,label\n" + "".join(f"text number {i},{i * 2.5}\n" for i in range(40)))  # 0..97.5
    run = {"backbone": "t5-tiny", "method": "read", "task": f"file:{csv}", "train_size": 20}
    with pytest.raises(runner.UsageError, match="rescale the labels"):
        runner.check_runs([run])
    runner.check_runs([{**run, "backbone": "bert-tiny"}])  # a regression head has no range to write out
