"""Messages between the pool (parent) and a worker process.

They travel pickled over an authenticated `multiprocessing.connection` Unix socket, which frames
each message; stdout and stderr carry logs only, so launchers that buffer or wrap stdout
(`conda run`, `srun`, shells) cannot corrupt the channel. Items and results travel as plain
dicts (their JSON form) so the two sides need only agree on this module.

    parent                         worker
      |  <-- connect + auth --------  |
      |  --- Init(settings, device) ->|  loads the model
      |  <-- Ready | StartFailed -----|
      |  --- Score(batch_id, items) ->|
      |  <-- Scored | BatchFailed ----|   (repeat)
      |  --- Shutdown --------------->|  exits
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

AUTHKEY_ENV = "REWARD_WORKER_AUTHKEY"   # hex; never on the command line, where `ps` shows it
PARENT_PID_ENV = "REWARD_PARENT_PID"    # the worker exits when this process is gone


@dataclass(frozen=True)
class Init:
    settings: dict[str, Any]
    device: str             # as the worker sees it (`cuda:0` after CUDA_VISIBLE_DEVICES pinning)
    device_label: str       # as the user knows it (`cuda:3`, `cpu#1`)
    num_threads: int | None = None
    devices: list[str] | None = None  # a worker spread over a group of GPUs: all of them (`cuda:0`, `cuda:1`)


@dataclass(frozen=True)
class Ready:
    pid: int
    load_time_s: float
    fingerprint: str
    quantization: str | None = None  # how the weights were loaded (quantization.py's report)


@dataclass(frozen=True)
class StartFailed:
    pid: int
    error: str
    traceback: str


@dataclass(frozen=True)
class Score:
    batch_id: int
    items: list[dict[str, Any]]
    indices: list[int] | None = None  # the items' indices in the parent's call; results carry them


@dataclass(frozen=True)
class Scored:
    batch_id: int
    results: list[dict[str, Any]]


@dataclass(frozen=True)
class BatchFailed:
    batch_id: int
    error: str
    traceback: str


@dataclass(frozen=True)
class Shutdown:
    pass
