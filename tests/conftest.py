"""Shared test setup: offline environment and a guard that fails any non-loopback connection.

Nothing may download at test time (DESIGN.md); local Ray talks over loopback and AF_UNIX,
which stay allowed. The guard covers this process only, not subprocesses.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

import pytest

for _var, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "WANDB_MODE": "offline",  # --log wandb writes local run folders only
}.items():
    os.environ[_var] = _value


class NetworkBlockedError(OSError):
    """Raised when a test tries to reach a non-loopback address."""


def _is_loopback(address: Any) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX path (str/bytes)
        return True
    host = address[0].decode() if isinstance(address[0], bytes) else str(address[0])
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # any other host name would need DNS: not allowed
        return False


def _check(address: Any) -> None:
    if not _is_loopback(address):
        raise NetworkBlockedError(f"network access blocked in tests: connect to {address!r}")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Patch connect/connect_ex/create_connection so only loopback and AF_UNIX get through."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_create = socket.create_connection

    def connect(self: socket.socket, address: Any) -> None:
        if self.family != socket.AF_UNIX:
            _check(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if self.family != socket.AF_UNIX:
            _check(address)
        return real_connect_ex(self, address)

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        _check(address)
        return real_create(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread ran ~7-10x faster than two contended ones.

    Autouse: every in-process test computes on one thread (the method-contract table ran ~4x faster
    on one than on two contended ones). Subprocesses and Ray workers choose their own threads.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: without xdist (`-p no:xdist`) it is never called
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make test` (`-n 2 --dist loadscope`): every integration test in one scope, the unit tests one each.

    The integration tests then run in order on one worker, so their session fixtures (the shared tiny
    studies) run once and no two real studies or Ray clusters compete for the 2 cores, while the unit tests
    fill the other worker. Written here because xdist's own `--dist loadgroup` with an `xdist_group` mark
    no longer groups under pytest 9.2 (pytest-xdist issue #1386: it rewrites a node id pytest no longer
    reads); `LoadScopeScheduling._split_scope` is the extension point xdist's own loadfile mode uses.
    """
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class IntegrationInOneScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "tests/integration" if nodeid.startswith("tests/integration/") else nodeid

    return IntegrationInOneScope(config, log)
