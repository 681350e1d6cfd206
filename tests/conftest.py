"""Shared fixtures: tiny offline models, real image files, and the no-orphan check."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One cache of tiny checkpoints for the whole run; workers find it through the env var."""
    cache = Path(os.environ.get("REWARD_TINY_CACHE") or (ROOT / ".cache" / "tiny_models"))
    os.environ["REWARD_TINY_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_qwen25(tiny_cache) -> str:
    from src.models.tiny import resolve_model_name

    return resolve_model_name("tiny:qwen2_5_vl", cache_dir=tiny_cache)


def make_image(seed: int, w: int = 64, h: int = 48):
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    im = Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))
    ImageDraw.Draw(im).rectangle([seed % 7, 5, 20 + seed % 11, 30], fill=(200, 30, 30))
    return im


@pytest.fixture(scope="session")
def image_files(tmp_path_factory) -> list[str]:
    """Twelve real PNG files of a few different sizes."""
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(12):
        p = d / f"img_{i:02d}.png"
        make_image(i, 48 + 8 * (i % 4), 40 + 12 * (i % 3)).save(p)
        paths.append(str(p))
    return paths


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it has exited but not been reaped.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def assert_no_orphans(pids, timeout: float = 15.0) -> None:
    """Every pid (and every process whose command line names our worker script) is gone."""
    deadline = time.monotonic() + timeout
    pids = [p for p in pids if p]
    while time.monotonic() < deadline:
        if all(pid_gone(p) for p in pids):
            break
        time.sleep(0.1)
    alive = [p for p in pids if not pid_gone(p)]
    assert not alive, f"worker processes still alive: {alive}"


def worker_processes(root: int | None = None) -> list[int]:
    """PIDs of live reward_worker.py processes descended from `root` (default: this test process).

    `ps -ww`: without it ps cuts lines at 80 columns and the `--connect` argument is never seen.
    Descendants only: other test runs on the same machine have workers of their own."""
    root = root or os.getpid()
    out = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    parent: dict[int, int] = {}
    workers = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 2)
        if len(parts) < 2:
            continue
        pid, ppid = int(parts[0]), int(parts[1])
        parent[pid] = ppid
        if len(parts) == 3 and "reward_worker.py" in parts[2] and "--connect" in parts[2]:
            workers.append(pid)

    def descends(pid: int) -> bool:
        seen = set()
        while pid > 1 and pid not in seen:
            seen.add(pid)
            pid = parent.get(pid, 0)
            if pid == root:
                return True
        return False

    return [p for p in workers if descends(p) and not pid_gone(p)]
