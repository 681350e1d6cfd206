"""A real `python main.py serve` process for the service and RL tests."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from conftest import pid_gone

ROOT = Path(__file__).resolve().parents[1]
_LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


class ServiceProcess:
    """Start `main.py serve` on a free loopback port (server.port=0), wait until /health says
    ready, stop it with SIGTERM and check it is gone."""

    def __init__(self, overrides: list[str], env: dict[str, str] | None = None,
                 config: str = "configs/server.yaml"):
        self.cmd = [sys.executable, "main.py", "serve", "--config", config, "--set", "server.port=0"]
        for ov in overrides:
            self.cmd += ["--set", ov]
        # One torch thread: on a small shared CI machine two OpenMP threads stall each other for
        # seconds whenever one is descheduled, which swamps what the tests measure.
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.url: str | None = None
        self.returncode: int | None = None

    def log(self) -> str:
        return "".join(self.lines[-60:])

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = _LISTENING.search(line)
            if m and self.url is None:
                self.url = m.group(1)

    def start(self, timeout: float = 180.0, wait_ready: bool = True) -> "ServiceProcess":
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while self.url is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the service did not start:\n{self.log()}")
            time.sleep(0.05)
        while wait_ready:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the service did not become ready:\n{self.log()}")
            time.sleep(0.2)
        return self

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (what a supervisor sends), bounded wait, then SIGKILL; the process must be gone."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.returncode = self.proc.returncode
        assert pid_gone(self.proc.pid), f"service pid {self.proc.pid} still alive"
        return self.returncode


class ThreadServer:
    """create_app + uvicorn in a thread, on a socket bound here first (no port race)."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the in-thread server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive()
