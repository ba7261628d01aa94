"""The one backbone resolver: registry names, hub ids (offline assets through the hub cache), folders.

Real components only: the offline assets laid out as a hub cache by `study.assets fetch`,
config folders written by transformers' own config classes, the real safetensors files.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_families import CONFIGS, FOLDERS

from study import count
from trainables import backbones, trial
from trainables.assets import OFFLINE_HUB, _read_manifest
from trainables.backbones import ANATOMIES, get_spec
from trainables.loop import RunConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_names_are_hub_ids_and_the_offline_assets_are_those_repos():
    for name, (repo, ref) in OFFLINE_HUB.items():
        spec = get_spec(name)
        assert spec.hf_id == repo and (spec.revision or "main") == ref
        src = backbones.source(spec)
        _, manifest = _read_manifest(name)
        assert src.revision == manifest["archive_sha256"][:40] == src.folder.name  # not a hub commit: the asset's
    # the hub id itself resolves offline to the same snapshot, config read from it
    hub = get_spec("hf:sentence-transformers/all-MiniLM-L6-v2")
    assert hub.model_type == "bert" and hub.d_model == 384 and hub.n_layers == 6 and hub.folder is None
    assert backbones.source(hub).folder == backbones.source("minilm-l6").folder
    assert backbones.weights_here(hub) and backbones.tokenizer_here(hub)


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_family_resolves_from_a_config_folder(folder):
    spec = get_spec(folder)
    anatomy = ANATOMIES[spec.model_type]
    assert spec.model_type in CONFIGS and spec.folder is not None and not backbones.weights_here(spec)
    model = backbones.build(spec, "meta")
    assert isinstance(model, anatomy.model_class)
    assert len(anatomy.get(model, "blocks")) == spec.n_layers
    assert isinstance(anatomy.get(model, "blocks")[0], anatomy.block_class)
    if spec.model_type == "qwen2":  # Qwen2's q/k/v carry biases; the anatomy's names still find them
        assert anatomy.get(model, "blocks")[0].self_attn.q_proj.bias is not None


def test_random_builds_are_made_in_the_target_dtype():
    model = backbones.build("llama-tiny", "cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_count_and_estimate_a_config_folder(capsys):
    qwen = FOLDERS[list(CONFIGS).index("qwen2")]
    assert count.main(["--backbone", qwen, "--method", "read", "--memory", "--batch-size", "2", "--seq-len", "8",
                       "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = backbones.count_params(backbones.build(qwen, "meta"))
    assert out["params_backbone"] == expected and out["memory_source"] == "estimated"
    assert out["peak_memory_bytes"] >= out["memory_params_bytes"] > 0


@pytest.mark.parametrize("name,needle", [
    ("no-such-model", "valid: llama-tiny"),
    ("hf:no-such-org/no-such-model", "offline backbones here: smollm2-135m"),
    ("hf:sentence-transformers/all-MiniLM-L6-v2@no-such-revision", "HF_HUB_OFFLINE is set"),
    ("hf:not-a-hub-id", "expected hf:ORG/NAME"),
])
def test_bad_backbones_are_one_line_errors_before_any_work(name, needle, capsys):
    assert count.main(["--backbone", name, "--method", "read"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err


def test_folders_that_are_not_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        get_spec(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; supported: llama, mistral, qwen2"):
        get_spec(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        get_spec(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no \\*.safetensors"):  # counting works, pretrained weights do not
        backbones.source(FOLDERS[0])


@pytest.mark.parametrize("method", ["read", "sherl"])
def test_a_cached_side_trial_does_not_materialise_the_backbone(method, tmp_path):
    """The second trial finds the cache: only what the method reads is loaded; same memory/FLOPs columns."""
    cfg = RunConfig(backbone="smollm2-135m@L4", method=method, method_config={"r": 8} if method == "sherl" else {},
                    task="vader-movies", train_size=24, max_length=16, epochs=1, batch_size=8, max_eval_examples=16,
                    device="cpu", weights="pretrained", cache_dir=str(tmp_path / "cache"))
    live = train(cfg, tmp_path / "first")
    assert live["status"] == "ok" and live["cache_reason"].startswith("train built"), live
    assembled = trial.assemble(cfg)
    spec = assembled.spec
    backbone_bytes = backbones.count_params(backbones.build(spec, "meta")) * 4
    real = sum(p.numel() * p.element_size() for p in assembled.model.backbone.parameters() if p.device.type != "meta")
    assert assembled.readers is not None and real == assembled.backbone_bytes_loaded
    last_block = sum(p.numel() for p in spec.anatomy.get(assembled.model.backbone, "blocks")[-1].parameters()) * 4
    expected = spec.d_model * 4 + (last_block if method == "sherl" else 0)  # the final norm (+ SHERL's last block)
    assert real == expected and real < 0.1 * backbone_bytes, (real, backbone_bytes)
    columns = ("flops_per_step", "peak_memory_bytes", "memory_params_bytes", "memory_source")
    hit = train(cfg, tmp_path / "second")  # the step the first trial measured live, kept beside the cache
    assert hit["status"] == "ok" and hit["cache_reason"] == "hit (backbone not materialised)"
    assert hit["backbone_revision"] == live["backbone_revision"] == backbones.source(spec).revision
    assert {k: hit[k] for k in columns} == {k: live[k] for k in columns} and live["memory_source"] == "tracked"
    shutil.rmtree(tmp_path / "cache" / "steps")  # no measurement kept: the same step, estimated on fake tensors
    est = train(cfg, tmp_path / "third")
    assert est["memory_source"] == "estimated" and est["flops_per_step"] == live["flops_per_step"]
    assert abs(est["peak_memory_bytes"] - live["peak_memory_bytes"]) <= 0.01 * live["peak_memory_bytes"]
