"""Studies shared by several integration tests (their session fixture is in conftest.py): they run
once per session, as real processes, both at once (most of a tiny study's time is start-up and
waiting: imports, Ray, workers, which overlaps on two cores).

The tiny scaling study is the one whose tables test_study.py checks and whose results the analysis
notebooks read (test_analysis.py: planned up to llama-70b, so the parameter-scaling notebook sees
every registered size; the probe, so the floor claim has its floor). It runs with planted
credentials in its environment and its Ray session in a private RAY_TMPDIR, so test_secrets.py
checks the same run for leaks. The convergence study is the analysis notebooks' other input.
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import clis

# planted in the tiny study's environment; none may appear in a file or in the output
PLANTED = {"AWS_ACCESS_KEY_ID": "AKIAPLANTED0NOTAREALKEY", "AWS_SECRET_ACCESS_KEY": "planted/aws+secret/not-real-4417",
           "AWS_SESSION_TOKEN": "planted-aws-session-token-8823", "HF_TOKEN": "hf_PLANTED_not_a_real_token_5521",
           "WANDB_API_KEY": "planted0wandb0key0not0real0000000000009"}
METHODS = ["read", "lora", "full", "probe"]
TINY_STUDY = ["--backbones", "llama-tiny", "bert-tiny", "--max-model", "llama-70b", "--methods", *METHODS,
              "--task", "synthetic", "--trials-per-method", "2", "--epochs", "2", "--cost-runs", "none",
              "--batch-size", "16", "--confirm-seeds", "2", "--train-size", "128",
              # meta-device memory estimates up to 70B take minutes on 2 cores; counts alone take seconds
              "--no-memory-estimates", "--log", "mlflow"]
CONVERGENCE = ["--backbone", "llama-tiny", "--methods", "read", "lora", "--task", "synthetic", "--sizes", "32", "64",
               "--seeds", "0", "1", "--epochs", "3"]


@dataclass
class StudyRun:
    proc: subprocess.CompletedProcess
    storage: Path  # --storage: the study folder is under it, the caches in storage / ".activations"
    ray_tmp: Path | None = None  # RAY_TMPDIR: the study's Ray session folder is under it
    seconds: float = 0.0


def run_shared_studies(root: Path, ray_tmp: Path) -> dict[str, StudyRun]:
    """{"scaling": the tiny study (planted credentials), "convergence": the convergence study}, run at once."""
    (root / "scaling-root").mkdir()
    (root / "convergence-root").mkdir()

    def run(module: str, args: list[str], storage: Path, env: dict[str, str], tmp: Path | None) -> StudyRun:
        t0 = time.time()
        proc = clis.run_cli(module, *args, "--storage", str(storage), env=env, timeout=600)
        return StudyRun(proc, storage, tmp, time.time() - t0)

    with ThreadPoolExecutor(2) as pool:
        scaling = pool.submit(run, "study.scaling", TINY_STUDY, root / "scaling-root",
                              clis.cli_env(**PLANTED, RAY_TMPDIR=str(ray_tmp)), ray_tmp)
        convergence = pool.submit(run, "study.convergence", CONVERGENCE, root / "convergence-root", clis.cli_env(),
                                  None)
        return {"scaling": scaling.result(), "convergence": convergence.result()}
