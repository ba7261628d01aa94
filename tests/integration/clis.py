"""Run the project's CLIs as real processes in their own session, and leave nothing behind.

Cleanup is by session id and PID, never by name and never a broad `ray stop`: other jobs
on the machine may run Ray too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def cli_env(**extra: str) -> dict[str, str]:
    """This environment, with local Ray unauthenticated on loopback and no cluster address inherited."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def leaks(folder: Path, planted: dict[str, str]) -> list[str]:
    """Which planted credential values appear in which file under a folder."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:  # sockets and the like
                continue
            found += [f"{name} in {path}" for name, value in planted.items() if value.encode() in data]
    return found


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


def kill_when(module: str, *args: str, ready: Callable[[], bool], env: dict[str, str], timeout: int = 240,
              grace_s: float = 3) -> float:
    """Start `python -m module args...`, SIGKILL it `grace_s` after `ready()` first holds (a driver killed
    mid-run), then kill what it started; returns the seconds it ran. Fails if it never gets ready."""
    t0 = time.time()
    log = tempfile.TemporaryFile("w+")  # not a pipe: a chatty child would block on a full one
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        while not ready():
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"{module} ended before it was killed: {log.read()[-3000:]}")
            if time.time() - t0 > timeout:
                raise AssertionError(f"{module} was not ready to be killed after {timeout}s")
            time.sleep(1)
        time.sleep(grace_s)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        kill_session(proc.pid)
        log.close()
    assert not session_processes(proc.pid)
    return time.time() - t0
