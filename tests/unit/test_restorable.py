"""Restoring a trial whose saved state names a checkpoint Tune already deleted (num_to_keep=1)."""

from __future__ import annotations

import pyarrow.fs
from ray import tune
from ray.train._internal.session import _TrainingResult

from trainables.ray_trainable import restorable


def result_for(path):
    return _TrainingResult(checkpoint=tune.Checkpoint(str(path), filesystem=pyarrow.fs.LocalFileSystem()),
                           metrics={"epoch": 2})


def test_deleted_checkpoint_falls_back_to_the_one_that_replaced_it(tmp_path):
    for i in (3, 4):  # 3 replaced the deleted 2; 4 may be half-written
        (tmp_path / f"checkpoint_{i:06d}").mkdir()
    (tmp_path / "checkpoint").mkdir()  # the loop's own folder is no Tune checkpoint
    got = restorable(result_for(tmp_path / "checkpoint_000002"))
    assert got.checkpoint.path == str(tmp_path / "checkpoint_000003") and got.metrics == {"epoch": 2}


def test_existing_or_unreplaced_checkpoint_is_kept(tmp_path):
    (tmp_path / "checkpoint_000001").mkdir()
    kept = result_for(tmp_path / "checkpoint_000001")
    assert restorable(kept) is kept
    gone = result_for(tmp_path / "checkpoint_000005")  # nothing after it: Tune reports the missing checkpoint
    assert restorable(gone) is gone
    assert restorable(None) is None
