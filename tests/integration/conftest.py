"""Session fixtures for the studies several integration tests share (shared_studies.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import shared_studies


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory) -> Iterator[dict[str, shared_studies.StudyRun]]:
    """The tiny scaling study (planted credentials) and the convergence study, once per session, at once."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    try:
        runs = shared_studies.run_shared_studies(tmp_path_factory.mktemp("shared-studies"), ray_tmp)
        print(f"shared study timings: { {k: round(r.seconds, 1) for k, r in runs.items()} }")
        yield runs
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_study(shared_runs) -> shared_studies.StudyRun:
    """shared_studies.TINY_STUDY's run (test_study.py, test_secrets.py, test_analysis.py)."""
    return shared_runs["scaling"]
