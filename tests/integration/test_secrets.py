"""Credentials in the environment are written nowhere: not to the study's storage, not to the Ray
session folder the study starts (which is private to the user), not to the printed output.

The study is the session fixture `tiny_study` (shared_studies.py: read and lora on two tiny backbones, caches
built as Ray tasks, search then confirm, tracked with `--log mlflow`), run once with the planted credentials,
shared with test_study.py. `--log wandb` offline with a planted WANDB_API_KEY is checked the same way on the hub
study of test_user_data_and_methods.py (a W&B logging actor per trial costs seconds each on 2 cores)."""

from __future__ import annotations

import stat
from pathlib import Path

import clis
import pytest
from shared_studies import PLANTED

pytestmark = pytest.mark.integration


def leaks(folder: Path) -> list[str]:
    return clis.leaks(folder, PLANTED)


def test_planted_credentials_land_in_no_file_and_no_output(tiny_study):
    proc, storage, ray_tmp = tiny_study.proc, tiny_study.storage, tiny_study.ray_tmp
    assert proc.returncode == 0, proc.stderr[-4000:]
    sessions = [p for p in ray_tmp.glob("petl-ray-*/ray/session_*") if p.is_dir() and not p.is_symlink()]
    assert len(sessions) == 1, sessions
    assert stat.S_IMODE(sessions[0].parents[1].stat().st_mode) == 0o700  # Ray makes its own folders 0777
    assert any(sessions[0].rglob("runtime_env_agent.log"))  # the log that held AWS_* before
    # --log mlflow: its file store is in the storage scanned here
    assert any((storage / "scaling" / "mlruns").rglob("meta.yaml")), "no MLflow file store"
    assert not leaks(storage) and not leaks(ray_tmp), leaks(storage) + leaks(ray_tmp)
    printed = proc.stdout + proc.stderr
    assert not [name for name, value in PLANTED.items() if value in printed]
