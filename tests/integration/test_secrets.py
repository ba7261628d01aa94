"""Credentials in the environment are written nowhere: not to the study's storage, not to the Ray
session folder the study starts (which is private to the user), not to the printed output.

The study is the session fixture `tiny_study` (shared_studies.py: read and lora on two tiny backbones, caches
built as Ray tasks, search then confirm), run once with the planted credentials, shared with test_study.py."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from shared_studies import PLANTED

pytestmark = pytest.mark.integration


def leaks(folder: Path) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:  # sockets and the like
                continue
            found += [f"{name} in {path}" for name, value in PLANTED.items() if value.encode() in data]
    return found


def test_planted_credentials_land_in_no_file_and_no_output(tiny_study):
    proc, storage, ray_tmp = tiny_study.proc, tiny_study.storage, tiny_study.ray_tmp
    assert proc.returncode == 0, proc.stderr[-4000:]
    sessions = [p for p in ray_tmp.glob("petl-ray-*/ray/session_*") if p.is_dir() and not p.is_symlink()]
    assert len(sessions) == 1, sessions
    assert stat.S_IMODE(sessions[0].parents[1].stat().st_mode) == 0o700  # Ray makes its own folders 0777
    assert any(sessions[0].rglob("runtime_env_agent.log"))  # the log that held AWS_* before
    assert not leaks(storage) and not leaks(ray_tmp), leaks(storage) + leaks(ray_tmp)
    printed = proc.stdout + proc.stderr
    assert not [name for name, value in PLANTED.items() if value in printed]
