"""Credentials in the environment are written nowhere: not to the study's storage, not to the Ray
session folder the study starts (which is private to the user), not to the printed output."""

from __future__ import annotations

import shutil
import stat
import tempfile
from pathlib import Path

import clis
import pytest

pytestmark = pytest.mark.integration
PLANTED = {"AWS_ACCESS_KEY_ID": "AKIAPLANTED0NOTAREALKEY", "AWS_SECRET_ACCESS_KEY": "planted/aws+secret/not-real-4417",
           "AWS_SESSION_TOKEN": "planted-aws-session-token-8823", "HF_TOKEN": "hf_PLANTED_not_a_real_token_5521",
           "WANDB_API_KEY": "planted0wandb0key0not0real0000000000009"}


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


def test_planted_credentials_land_in_no_file_and_no_output(tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    try:
        check(tmp_path, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def check(tmp_path: Path, ray_tmp: Path) -> None:
    proc = clis.run_cli("study.scaling", "--backbones", "llama-tiny", "--max-model", "llama-tiny", "--methods", "read",
                        "--task", "synthetic", "--trials-per-method", "1", "--epochs", "1", "--train-size", "128", "--cost-runs", "none",
                        "--confirm-seeds", "0",
                        "--no-memory-estimates", "--storage", str(tmp_path / "r"),
                        env=clis.cli_env(**PLANTED, RAY_TMPDIR=str(ray_tmp)), timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sessions = [p for p in ray_tmp.glob("petl-ray-*/ray/session_*") if p.is_dir() and not p.is_symlink()]
    assert len(sessions) == 1, sessions
    assert stat.S_IMODE(sessions[0].parents[1].stat().st_mode) == 0o700  # Ray makes its own folders 0777
    assert any(sessions[0].rglob("runtime_env_agent.log"))  # the log that held AWS_* before
    assert not leaks(tmp_path) and not leaks(ray_tmp), leaks(tmp_path) + leaks(ray_tmp)
    printed = proc.stdout + proc.stderr
    assert not [name for name, value in PLANTED.items() if value in printed]
