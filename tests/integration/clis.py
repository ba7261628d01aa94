"""Run the project's CLIs as real processes in their own session, and leave nothing behind.

Cleanup is by session id and PID, never by name and never a broad `ray stop`: other jobs
on the machine may run Ray too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def cli_env(**extra: str) -> dict[str, str]:
    """This environment, with local Ray unauthenticated on loopback and no cluster address inherited."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def run_cli(module: str, *args: str, timeout: int = 600, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    """`python -m module args...` in its own session; whatever it started is killed afterwards."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env or cli_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def session_processes(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, psutil.Error, PermissionError):
            continue
    return out


def kill_session(sid: int) -> None:
    """Kill every process of this session (the CLI and the Ray processes it started), by PID."""
    for _ in range(3):
        procs = session_processes(sid)
        if not procs:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)
