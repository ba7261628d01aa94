"""Hub datasets laid out as a Hugging Face hub cache on disk, built from an offline task's data.

`<hub>/datasets--ORG--NAME/refs/main` holds the commit, `snapshots/<commit>/` the files, as
huggingface_hub's own cache keeps them: with HF_HUB_OFFLINE=1, `snapshot_download(repo_type=
"dataset")` returns that folder, the same call that downloads on a cluster (STACK_NOTES.md).
"""

from __future__ import annotations

from pathlib import Path

import datasets

from trainables.tasks import load_raw

REVISION = "0123456789abcdef0123456789abcdef01234567"
VADER = "petl-test/vader-hub"  # README-declared configs: sentiment (test labels hidden), pairs
FOLDERS = "petl-test/folders"  # no card: configs are top-level folders; an int label, a label_text column
CARD = """---
configs:
- config_name: sentiment
  data_files:
  - split: train
    path: sentiment/train-*
  - split: validation
    path: sentiment/validation-*
  - split: test
    path: sentiment/test-*
- config_name: pairs
  data_files:
  - split: train
    path: pairs/train-*
  - split: validation
    path: pairs/validation-*
  - split: test
    path: pairs/test-*
---
# A test dataset built from vader-movies
"""


def _snapshot(hub: Path, repo: str) -> Path:
    root = hub / f"datasets--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    folder = root / "snapshots" / REVISION
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write(ds: datasets.Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))  # the features (ClassLabel names) travel in the Parquet schema's metadata


def build(hub: Path, n: int = 400) -> Path:
    """Both test datasets under `hub` (a HF_HUB_CACHE folder); returns `hub`."""
    raw, _, _, _ = load_raw("vader-movies")
    for split, part in raw.items():  # spread over the split (its file order runs by rating), both classes in any prefix
        step = max(1, len(part.texts) // n)
        raw[split] = part.take(range(0, len(part.texts), step))
    sentiment = datasets.Features({"text": datasets.Value("string"),
                                   "label": datasets.ClassLabel(names=["negative", "positive"])})
    folder = _snapshot(hub, VADER)
    (folder / "README.md").write_text(CARD)
    sizes = {"train": n, "validation": n // 4, "test": n // 4}
    for split, size in sizes.items():
        part = raw[split]
        labels = [-1] * min(size, len(part.labels)) if split == "test" else part.labels[:size]  # hidden test labels
        _write(datasets.Dataset.from_dict({"text": part.texts[:size], "label": labels}, features=sentiment),
               folder / "sentiment" / f"{split}-00000-of-00001.parquet")
        texts = part.texts[:size]
        pair_labels = [int(part.labels[i] == part.labels[(i + 1) % len(texts)]) for i in range(len(texts))]
        pairs = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                   "label": datasets.ClassLabel(names=["different", "same"]),
                                   "idx": datasets.Value("int32")})
        _write(datasets.Dataset.from_dict({"premise": texts, "hypothesis": texts[1:] + texts[:1],
                                           "label": pair_labels, "idx": list(range(len(texts)))}, features=pairs),
               folder / "pairs" / f"{split}-00000-of-00001.parquet")
    folder = _snapshot(hub, FOLDERS)
    for config in ("x", "y"):
        part = raw["train"]
        _write(datasets.Dataset.from_dict({"review": part.texts[:n], "stars": [1 + 4 * y for y in part.labels[:n]],
                                           "label_text": [["bad", "good"][y] for y in part.labels[:n]],
                                           "when": [f"2026-01-{1 + i % 28:02d}" for i in range(n)]}),
               folder / config / "train-00000-of-00001.parquet")
    test = raw["test"]  # y: a test split whose plain integer label is hidden (-1 all through)
    _write(datasets.Dataset.from_dict({"review": test.texts[:n // 4], "stars": [-1] * len(test.texts[:n // 4]),
                                       "label_text": ["?"] * len(test.texts[:n // 4]),
                                       "when": ["2026-02-01"] * len(test.texts[:n // 4])}),
           folder / "y" / "test-00000-of-00001.parquet")
    return hub


if __name__ == "__main__":  # lay the test datasets out by hand: python tests/hub_cache.py $HF_HOME/hub
    import sys

    print(build(Path(sys.argv[1])))
