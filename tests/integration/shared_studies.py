"""Studies shared by several integration tests (their fixtures are in conftest.py): each runs once
per session, as a real process.

The tiny study is the small two-backbone study whose tables test_study.py checks; it runs with
planted credentials in its environment and its Ray session in a private RAY_TMPDIR, so
test_secrets.py checks the same run for leaks instead of starting a study of its own.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import clis

# planted in the tiny study's environment; none may appear in a file or in the output
PLANTED = {"AWS_ACCESS_KEY_ID": "AKIAPLANTED0NOTAREALKEY", "AWS_SECRET_ACCESS_KEY": "planted/aws+secret/not-real-4417",
           "AWS_SESSION_TOKEN": "planted-aws-session-token-8823", "HF_TOKEN": "hf_PLANTED_not_a_real_token_5521",
           "WANDB_API_KEY": "planted0wandb0key0not0real0000000000009"}
TINY_STUDY = ["--backbones", "llama-tiny", "bert-tiny", "--max-model", "llama-tiny", "--methods", "read", "lora",
              "--task", "synthetic", "--trials-per-method", "2", "--epochs", "2", "--cost-runs", "none",
              "--batch-size", "16", "--confirm-seeds", "2", "--train-size", "128"]


@dataclass
class StudyRun:
    proc: subprocess.CompletedProcess
    storage: Path  # --storage: the study is storage / "scaling", its caches storage / ".activations"
    ray_tmp: Path  # RAY_TMPDIR: the study's Ray session folder is under it


def run_tiny_study(storage: Path, ray_tmp: Path) -> StudyRun:
    proc = clis.run_cli("study.scaling", *TINY_STUDY, "--storage", str(storage), "--no-memory-estimates",
                        env=clis.cli_env(**PLANTED, RAY_TMPDIR=str(ray_tmp)), timeout=600)
    return StudyRun(proc, storage, ray_tmp)
