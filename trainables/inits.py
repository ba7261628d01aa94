"""Data-dependent inits, computed once where the backbone is and kept beside the activation cache.

A method's `init_with_data` (today LST's Fisher-pruned side blocks) reads the whole backbone
and training examples. A cached trial never materialises the backbone, so it cannot compute it:
without a stored init it would train from the side network's random draw while its row says
otherwise. The trial that has the backbone (the live path of `trial.assemble`) computes the init
and stores the trainable state right after it here; cached trials of the same configuration read
it back. The file is named by a digest of everything the init depends on (`key`): backbone,
config and weights revision, compute dtype, method and its whole parsed config (`fisher_examples`
included), pooling, labels, task, the training subsample's rows and the seed (which draws the side
network and orders the examples). Layout: `<cache root>/inits/<digest>.pt`, a `torch.save` of
{"key": ..., "state": ...} that `torch.load(weights_only=True)` reads; written to a temporary
file and renamed, so a reader never sees a partial one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import torch

from trainables import cache
from trainables.backbones import BackboneSpec, file_lock
from trainables.methods.base import MethodInfo, TaskModel

FORMAT = 1


def wanted(info: MethodInfo, model: TaskModel) -> bool:
    """Whether this trial's method config has a data-dependent init (LST: only `init=prune, importance=fisher`).

    A model that does not say is assumed to need one: storing it is cheap, skipping it is the bug this
    module exists for."""
    return info.init_with_data is not None and getattr(model, "needs_data_init", True)


def key(cfg: Any, spec: BackboneSpec, info: MethodInfo, model: TaskModel, train: datasets.Dataset, *,
        weights: str, revision: str | None, dtype: torch.dtype) -> dict[str, Any]:
    """Everything the init depends on (its digest names the file). `model.backbone` may be on meta if pretrained."""
    return {"format": FORMAT, "backbone": spec.name, "backbone_config": spec.config,
            "weights": cache.weights_revision(spec, weights, cfg.seed, model.backbone, revision),
            "compute_dtype": str(dtype).removeprefix("torch."), "method": cfg.method,
            "method_config": dataclasses.asdict(info.parse(cfg.method_config)), "pooling": model.pooling,
            "n_labels": model.n_labels, "task": cfg.task, "data": cache.data_digest(train), "seed": cfg.seed,
            # a quantised backbone's weights are other weights (a pruned init reads them dequantised)
            **({"quant": cfg.quant, "quant_double": cfg.quant_double} if getattr(cfg, "quant", "none") != "none"
               else {})}


def path_of(cfg: cache.TrialSettings, parts: dict[str, Any]) -> Path:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return cache.trial_root(cfg) / "inits" / f"{hashlib.sha256(blob.encode()).hexdigest()[:32]}.pt"


def load(path: Path, model: TaskModel, parts: dict[str, Any]) -> bool:
    """Apply the init stored at `path` to `model`'s trainable parameters; False if none (or an unreadable one)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return False
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return False  # damaged: the live path recomputes it and replaces the file
    if json.dumps(blob.get("key"), sort_keys=True, default=str) != json.dumps(parts, sort_keys=True, default=str):
        return False  # a digest collision, or a file someone copied in by hand: recompute
    model.load_trainable_state_dict(blob["state"])
    return True


def store(path: Path, model: TaskModel, parts: dict[str, Any]) -> None:
    """Keep `model`'s trainable state (right after its data init) under `path`, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {n: t.cpu() for n, t in model.trainable_state_dict().items()}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"key": json.loads(json.dumps(parts, default=str)), "state": state}, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def computing(path: Path) -> Iterator[None]:
    """One computer per init on a machine: concurrent trials of one config wait, then read what it stored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock")):
        yield
