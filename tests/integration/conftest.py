"""Session fixtures for the studies several integration tests share (shared_studies.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import shared_studies


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> Iterator[shared_studies.StudyRun]:
    """shared_studies.TINY_STUDY, run once with the planted credentials (test_study.py, test_secrets.py)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    try:
        yield shared_studies.run_tiny_study(tmp_path_factory.mktemp("tiny-study"), ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
