"""Gather concurrent requests into model calls, and share the judge fairly between them.

    request A (3 items) --submit--> pending: [A, B, C]      one scoring thread:
    request B (1 item)  --submit-->    |                      wait for the first request, then
    request C (2 items) --submit-->    v                      gather until max_batch items or
                               model.score_items(A+B+C)       max_wait after the first arrived
                                       |
              A <- results[0:3], B <- results[3:4], C <- results[4:6]   (indices renumbered)

The model is called from this one thread only: reward models are not thread-safe, and one GPU
call over many requests' items is what makes the service fast under RL load.

Fair sharing: a call holds at most max_batch items, and when more are waiting than fit, the
places are shared equally among the waiting requests (one that needs fewer than its share leaves
the rest to the others). A request larger than its share is split across calls; after each call
the requests it served go to the back of the queue. So a 1-item request sent while a 10,000-item
request is being scored waits for at most the call in progress, not for the 10,000 items.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..models.reward.base import check_one_each
from ..models.reward.result_form import as_result
from ..models.reward.types import ScoreItem, ScoreResult, renumber

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: requests are dict keys and queue entries
class _Pending:
    items: list[ScoreItem]
    future: concurrent.futures.Future
    arrived: float = field(default_factory=time.monotonic)
    taken: int = 0  # items handed to model calls so far (the rest wait in the queue)
    done: int = 0   # items with a result
    results: list[ScoreResult | None] = field(default_factory=list)

    @property
    def waiting(self) -> int:
        return len(self.items) - self.taken


class BatcherClosed(RuntimeError):
    pass


class MicroBatcher:
    """submit(items) -> Future of one result per item, in order, with index 0..n-1."""

    def __init__(self, score: Callable[[Sequence[ScoreItem]], list[ScoreResult]], max_batch: int = 32,
                 max_wait_s: float = 0.01, judge: str = "the judge"):
        if max_batch < 1:
            raise ValueError(f"max_batch: must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_ms: must be >= 0, got {max_wait_s * 1000}")
        self._score = score
        self._judge = judge  # how an item's error names what returned its result
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
            return sum(p.waiting for p in self._pending)

    def submit(self, items: Sequence[ScoreItem]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        items = list(items)
        if not items:
            fut.set_result([])
            return fut
        with self._cond:
            if self._closed:
                raise BatcherClosed("the reward service is shutting down")
            self._pending.append(_Pending(items, fut, results=[None] * len(items)))
            self._cond.notify()
        return fut

    def cancel(self, future: concurrent.futures.Future) -> None:
        """Drop the request of `future` (its client is gone): its items waiting for a model call
        leave the queue; those already in a call finish, and their results are dropped."""
        with self._cond:
            for p in self._pending:
                if p.future is future:
                    self._pending.remove(p)
                    self._cond.notify()  # a call gathering company re-reads the queue
                    break
        future.cancel()

    def _take(self) -> list[tuple[_Pending, int, int]] | None:
        """The next call's items as (request, start, end) slices; None once closed and drained."""
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return None  # closed and drained
                # More requests may be on their way: wait until the batch is full or the oldest
                # request has waited max_wait. Under load the oldest has already waited, so a busy
                # model starts its next call at once with everything that queued meanwhile.
                while (self._pending and not self._closed
                       and sum(p.waiting for p in self._pending) < self.max_batch):
                    remaining = self._pending[0].arrived + self.max_wait_s - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._pending or self._closed:
                    break
                # every waiting request was cancelled meanwhile (its client left): wait for the next
            if not self._pending:
                return None
            grants = self._share(list(self._pending))
            slices = []
            for p, n in grants.items():
                slices.append((p, p.taken, p.taken + n))
                p.taken += n
            # Requests not served this time keep their place at the front; those served go to the
            # back (round robin); those wholly taken leave the queue and wait for their results.
            unserved = [p for p in self._pending if p not in grants]
            served = [p for p in self._pending if p in grants and p.waiting]
            self._pending = collections.deque(unserved + served)
            self.in_flight = sum(n for n in grants.values())
            return slices

    def _share(self, queue: list[_Pending]) -> dict[_Pending, int]:
        """Places in the next call per request: equal shares of max_batch, in queue order, the
        share of a request that needs less going to the others (water filling)."""
        grants: dict[_Pending, int] = {}
        budget, active = self.max_batch, queue
        while budget and active:
            share = max(1, budget // len(active))
            still = []
            for p in active:
                if not budget:
                    break
                n = min(share, p.waiting - grants.get(p, 0), budget)
                grants[p] = grants.get(p, 0) + n
                budget -= n
                if p.waiting > grants[p]:
                    still.append(p)
            active = still
        return {p: n for p, n in grants.items() if n}

    def _fail(self, requests: list[_Pending], e: BaseException) -> None:
        with self._cond:
            for p in requests:
                with contextlib.suppress(ValueError):
                    self._pending.remove(p)
            self.in_flight = 0
        for p in requests:
            if not p.future.done():
                p.future.set_exception(e)

    def _loop(self) -> None:
        while True:
            slices = self._take()
            if slices is None:
                return
            items = [it for p, a, b in slices for it in p.items[a:b]]
            try:
                results = self._score(items)
                check_one_each(results, len(items), self._judge, f"a call of {len(items)} items")
            except BaseException as e:  # the model itself failed: every request in the call learns why
                log.error("a batch of %d items failed: %s: %s", len(items), type(e).__name__, e)
                self._fail(list(dict.fromkeys(p for p, _, _ in slices)), e)
                continue
            try:
                finished = self._hand_back(slices, results)
            except BaseException as e:  # never the thread's end: the requests of this call learn why
                log.error("handing back a batch of %d items failed: %s: %s", len(items), type(e).__name__, e)
                self._fail([p for p in dict.fromkeys(p for p, _, _ in slices) if not p.future.done()], e)
                continue
            with self._cond:
                self.in_flight = 0
                self.items_scored += len(items)
                self.requests_done += finished
                self.batches += 1

    def _hand_back(self, slices: list[tuple[_Pending, int, int]], results: list) -> int:
        """Each result of a call to its request's place (a judge class's value that is no
        ScoreResult as its item's failure: as_result); each request now complete answered. Returns
        the number of requests completed."""
        start, finished = 0, 0
        for p, a, b in slices:
            for k, r in enumerate(results[start:start + b - a]):
                p.results[a + k] = renumber(as_result(r, p.items[a + k], a + k, self._judge), p.items[a + k], a + k)
            start += b - a
            p.done += b - a
            if p.done == len(p.items):
                finished += 1
                if not p.future.done():
                    p.future.set_result(p.results)
        return finished

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
