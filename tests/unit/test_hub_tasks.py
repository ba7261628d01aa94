"""Hub datasets as tasks (`hf:ORG/NAME[:CONFIG]`), read from a hub cache laid out on disk with HF_HUB_OFFLINE=1:
the same snapshot_download + load_dataset(folder) path that downloads on a cluster (tests/hub_cache.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import hub_cache
import pytest
from test_tasks import WordTokenizer

from study import runner
from trainables import tasks


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory) -> Path:
    return hub_cache.build(tmp_path_factory.mktemp("hf") / "hub", n=200)


@pytest.fixture(autouse=True)
def hub(hub_root, tmp_path, monkeypatch) -> Path:
    """huggingface_hub and datasets read their caches from here (both read these at call time)."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub_root))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_root


def test_loaded_by_id_with_hidden_test_labels_carved_from_train():
    name = f"hf:{hub_cache.VADER}:sentiment"
    raw, n_labels, metric_name, notes = tasks.load_raw(name)
    assert (n_labels, metric_name) == (2, "accuracy")
    assert raw["train"].pairs is None and len(raw["validation"].texts) == 50  # the hub's own validation split
    assert len(raw["test"].texts) == round(0.1 * 200)  # hidden (-1) test labels: 10% of train, stratified
    assert set(raw["test"].labels) == {0, 1} and -1 not in raw["train"].labels
    assert any("no labelled test split" in n and "10% of train" in n for n in notes), notes
    assert tasks.dataset_revision(name) == hub_cache.REVISION
    assert tasks.class_names(name, 2) == ("negative", "positive")  # ClassLabel names: T5's target words
    again, *_ = tasks.load_raw(name)
    assert again["test"].texts == raw["test"].texts  # the fixed rule: the same examples every time
    task = tasks.load_task(name, WordTokenizer(), max_length=16, train_size=32, seed=1)
    assert task.revision == hub_cache.REVISION and len(task.train) == 32


def test_sentence_pairs_inferred_and_named():
    raw, n_labels, _, notes = tasks.load_raw(f"hf:{hub_cache.VADER}:pairs")  # premise, hypothesis: 2 text columns
    assert n_labels == 2 and not notes
    assert raw["train"].pairs is not None and raw["train"].pairs[0] == raw["train"].texts[1]
    named, *_ = tasks.load_raw(f"hf:{hub_cache.VADER}:pairs", text_col="hypothesis,premise")
    assert named["train"].texts == raw["train"].pairs
    assert tasks.class_names(f"hf:{hub_cache.VADER}:pairs", 2) == ("different", "same")


def test_folder_configs_and_a_named_integer_label():
    raw, n_labels, _, notes = tasks.load_raw(f"hf:{hub_cache.FOLDERS}:x", text_col="review", label_col="stars")
    assert n_labels == 2 and {len(raw[s].texts) for s in ("validation", "test")} == {20}
    assert any("validation and test = a fixed stratified 10% of train each" in n for n in notes), notes
    assert tasks.class_names(f"hf:{hub_cache.FOLDERS}:x", 2) == ("1", "5")


def test_the_driver_pins_a_hub_task_to_the_commit_it_checked():
    args = argparse.Namespace(batch_size=16, max_length=None, zero_ranks=1, gpu_memory_gib=None, seed=0, name="x",
                              log=None, task=f"hf:{hub_cache.VADER}:sentiment", text_col="text", label_col="label")
    runner.check_input(["probe"], ["llama-tiny"], args)
    assert args.task == f"hf:{hub_cache.VADER}:sentiment@{hub_cache.REVISION}"
    runner.check_input(["probe"], ["llama-tiny"], args)  # pinned stays pinned; and it loads by that commit
    assert args.task.count("@") == 1 and tasks.dataset_revision(args.task) == hub_cache.REVISION
    assert tasks.parse_hub(args.task) == (hub_cache.VADER, "sentiment", hub_cache.REVISION)


def test_hidden_labels_in_a_plain_integer_column_are_no_class():
    raw, n_labels, _, notes = tasks.load_raw(f"hf:{hub_cache.FOLDERS}:y", text_col="review", label_col="stars")
    assert n_labels == 2 and set(raw["test"].labels) == {0, 1}  # carved from train, -1 is no third class
    assert any("test split has no labels (hidden)" in n for n in notes), notes


@pytest.mark.parametrize("task,text_col,label_col,needle", [
    (f"hf:{hub_cache.VADER}", "text", "label", "has configs sentiment, pairs; name one"),
    (f"hf:{hub_cache.VADER}:nope", "text", "label", "has no config 'nope'; configs: sentiment, pairs"),
    (f"hf:{hub_cache.FOLDERS}", "text", "label", "has configs x, y; name one"),
    (f"hf:{hub_cache.FOLDERS}:x", "review", "label", "no label column 'label'"),
    (f"hf:{hub_cache.FOLDERS}:x", "review", "stars_", "no label column 'stars_'; name it with --label-col; "
                                                      "columns: review, stars, label_text, when"),
    (f"hf:{hub_cache.FOLDERS}:x", "review", "review", "column 'review' is not a label: 200 distinct values"),
    (f"hf:{hub_cache.FOLDERS}:x", "text", "stars", "no column 'text' and 3 text columns"),
    (f"hf:{hub_cache.VADER}:pairs", "premise,nope", "label", "no column 'nope'; columns: premise, hypothesis"),
    (f"hf:{hub_cache.VADER}:pairs", "idx", "label", "column 'idx' is not text"),
    ("hf:nobody/nothing", "text", "label", "is not on this machine and HF_HUB_OFFLINE is set; tasks that work "
                                           "offline: vader-movies"),
    ("hf:a/b/c", "text", "label", "expected hf:ORG/NAME[:CONFIG][@REVISION]"),
    (f"hf:{hub_cache.VADER}:sentiment@", "text", "label", "expected hf:ORG/NAME[:CONFIG][@REVISION]"),
    (f"hf:{hub_cache.VADER}:sentiment@0123abcd", "text", "label", "is not on this machine and HF_HUB_OFFLINE"),
])
def test_bad_input_is_one_line_before_ray(task, text_col, label_col, needle):
    args = argparse.Namespace(batch_size=16, max_length=None, zero_ranks=1, gpu_memory_gib=None, task=task,
                              text_col=text_col, label_col=label_col, seed=0, name="x", log=None)
    with pytest.raises(runner.UsageError) as err:
        runner.check_input(["probe"], ["llama-tiny"], args)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_dataset_revision_of_files_and_built_ins(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "".join(f"w{i},{i % 2}\n" for i in range(40)))
    first = tasks.dataset_revision(f"file:{path}")
    assert first is not None and first.startswith("sha256:") and len(first) == len("sha256:") + 16
    path.write_text("text,label\n" + "".join(f"v{i},{i % 2}\n" for i in range(40)))
    assert tasks.dataset_revision(f"file:{path}") != first  # the content's digest, not the name's
    assert tasks.dataset_revision("vader-movies") is None
