"""Gather concurrent requests into one model call.

    request A (3 items) --submit--> pending: [A, B, C]      one scoring thread:
    request B (1 item)  --submit-->    |                      wait for the first request, then
    request C (2 items) --submit-->    v                      gather until max_batch items or
                               model.score_items(A+B+C)       max_wait after the first arrived
                                       |
              A <- results[0:3], B <- results[3:4], C <- results[4:6]   (indices renumbered)

The model is called from this one thread only: reward models are not thread-safe, and one GPU
call over many requests' items is what makes the service fast under RL load. A request is never
split across calls; one larger than max_batch runs alone.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..models.reward.types import ScoreItem, ScoreResult

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    items: list[ScoreItem]
    future: concurrent.futures.Future
    arrived: float = field(default_factory=time.monotonic)


class BatcherClosed(RuntimeError):
    pass


class MicroBatcher:
    """submit(items) -> Future of one result per item, in order, with index 0..n-1."""

    def __init__(self, score: Callable[[Sequence[ScoreItem]], list[ScoreResult]], max_batch: int = 32,
                 max_wait_s: float = 0.01):
        if max_batch < 1:
            raise ValueError(f"max_batch: must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_ms: must be >= 0, got {max_wait_s * 1000}")
        self._score = score
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._pending: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.items_scored = 0
        self.requests_done = 0
        self.batches = 0
        self.in_flight = 0
        self._thread = threading.Thread(target=self._loop, name="reward-batcher", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Items waiting for a model call (not counting the call in progress)."""
        with self._cond:
            return sum(len(p.items) for p in self._pending)

    def submit(self, items: Sequence[ScoreItem]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        items = list(items)
        if not items:
            fut.set_result([])
            return fut
        with self._cond:
            if self._closed:
                raise BatcherClosed("the reward service is shutting down")
            self._pending.append(_Pending(items, fut))
            self._cond.notify()
        return fut

    def _take(self) -> list[_Pending] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None  # closed and drained
            # More requests may be on their way: wait until the batch is full or the oldest
            # request has waited max_wait. Under load the oldest has already waited, so a busy
            # model starts its next call at once with everything that queued meanwhile.
            deadline = self._pending[0].arrived + self.max_wait_s
            while not self._closed and sum(len(p.items) for p in self._pending) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            taken = [self._pending.popleft()]
            size = len(taken[0].items)
            while self._pending and size + len(self._pending[0].items) <= self.max_batch:
                nxt = self._pending.popleft()
                taken.append(nxt)
                size += len(nxt.items)
            self.in_flight = size
            return taken

    def _loop(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            items = [it for p in taken for it in p.items]
            try:
                results = self._score(items)
                if len(results) != len(items):
                    raise RuntimeError(f"the reward model returned {len(results)} results for {len(items)} items")
            except BaseException as e:  # the model itself failed: every request in the call learns why
                log.error("a batch of %d items failed: %s: %s", len(items), type(e).__name__, e)
                for p in taken:
                    if not p.future.done():
                        p.future.set_exception(e)
                with self._cond:
                    self.in_flight = 0
                continue
            start = 0
            for p in taken:
                part = results[start:start + len(p.items)]
                for k, r in enumerate(part):
                    r.index = k
                start += len(p.items)
                if not p.future.done():
                    p.future.set_result(part)
            with self._cond:
                self.in_flight = 0
                self.items_scored += len(items)
                self.requests_done += len(taken)
                self.batches += 1

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, fail those still queued, wait for the call in progress."""
        with self._cond:
            self._closed = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for p in dropped:
            if not p.future.done():
                p.future.set_exception(BatcherClosed("the reward service is shutting down"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
