"""A page as a person sees it: headless Chromium (Debian's `chromium`, which study/setup.sh installs for the dev
extras; CHROMIUM=/path names another), driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
no port, no network). `render` loads a local file, collects every console message, uncaught exception and
browser log entry (a broken image, a blocked load), measures elements and takes a full-page screenshot.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def chromium() -> str:
    """The browser's path; a clear failure (not a skip: CI installs it through study/setup.sh) without one."""
    name = os.environ.get("CHROMIUM", "chromium")
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"no headless browser: {name!r} is not on PATH; `bash study/setup.sh --extras dev` "
                             "installs Debian's chromium (or set CHROMIUM=/path/to/chrome)")
    return found


@dataclass
class Rendered:
    errors: list[str]  # console errors and warnings, uncaught exceptions, browser log errors
    screenshot: bytes  # PNG of the whole page
    size: tuple[int, int]  # the page's CSS size (width, height)
    found: dict[str, Any] = field(default_factory=dict)  # what each `evaluate` expression returned


class _Pipe:
    """The DevTools protocol over Chromium's fds 3 (commands in) and 4 (replies and events out)."""

    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int):
        self.proc, self.write_fd, self.read_fd = proc, write_fd, read_fd
        self.buffer, self.events, self.next_id = b"", [], 0

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.read_fd], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise TimeoutError("no reply from chromium")
            chunk = os.read(self.read_fd, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe (exit code {self.proc.poll()})")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            event = self._message(deadline)
            if event.get("method") == method:
                return event
            self.events.append(event)


def _errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
            out.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description", "")))
                                                           for a in p.get("args", [])))
        elif e.get("method") == "Runtime.exceptionThrown":
            out.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
        elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
            entry = p["entry"]
            out.append(f"log {entry['level']} ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
    return out


def _high(fd: int) -> int:
    """The same pipe end at a number >= 10, so that moving it to fd 3 or 4 in the child clobbers nothing."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


def render(page: Path, width: int = 1280, evaluate: dict[str, str] | None = None, timeout: float = 90) -> Rendered:
    """Load `page` in headless Chromium; its problems, its full-page screenshot and `evaluate`'s JS results."""
    cmd_r, cmd_w = (_high(fd) for fd in os.pipe())  # we write commands, chromium reads them on its fd 3
    out_r, out_w = (_high(fd) for fd in os.pipe())  # chromium writes replies and events on its fd 4, we read them
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        args = [chromium(), "--headless", "--remote-debugging-pipe", f"--user-data-dir={profile}", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
                "--mute-audio", *(["--no-sandbox"] if os.geteuid() == 0 else []), "about:blank"]
        shell = f'exec "$@" 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-'  # the pipe ends at the fds it expects
        proc = subprocess.Popen(["bash", "-c", shell, "chromium", *args], pass_fds=(cmd_r, out_w),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(cmd_r)
        os.close(out_w)
        pipe = _Pipe(proc, cmd_w, out_r)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                pipe.send(f"{domain}.enable", session=session)
            pipe.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
            pipe.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
            pipe.wait_for("Page.loadEventFired", timeout=timeout)
            found = {k: pipe.send("Runtime.evaluate", {"expression": js, "returnByValue": True},
                                  session=session)["result"].get("value") for k, js in (evaluate or {}).items()}
            content = pipe.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
            w, h = int(content["width"]), int(content["height"])
            shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                        "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}},
                             session=session, timeout=timeout)
            time.sleep(0.2)  # late log entries (a failed decode) arrive as events
            pipe.send("Runtime.evaluate", {"expression": "1"}, session=session)
            errors = _errors(pipe.events)
            try:
                pipe.send("Browser.close", timeout=10)
            except (RuntimeError, TimeoutError):
                pass
        finally:
            os.close(cmd_w)
            os.close(out_r)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return Rendered(errors, base64.b64decode(shot["data"]), (w, h), found)
