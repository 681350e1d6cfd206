"""The scheduling of one call over several workers, shared by every multi-process host (the local
worker pool, pool.py, and the Ray actors, implementations/ray_actors.py): which worker gets which
items, what happens to a failed batch, when the call gives up, and the results in input order.
A host only moves batches: it asks for work for worker w, sends it, and reports what came back.

    host (a thread per worker, or one loop)            Scheduler (one per call)
    batch = take(w) ------------------------------->   a retry first, then w's own queue (round
                                                       robin) or the shared one (dynamic)
    sends the batch to worker w, then reports one of:
      done(w, batch, results, who) ---------------->   results checked against the batch, stored
                                                       by index; w's restarts in a row reset
      failed(batch, cause) ------------------------>   the worker lived, the batch raised: its
                                                       items fail with the cause
      died(batch, cause, kind) -------------------->   the worker died or hung: each item is
                                                       retried alone (max_retries), then fails
      lost(w, cause, held) ------------------------>   w is gone for good: its queue (and a batch
                                                       it held) goes to the others; with no worker
                                                       left, every item without a result fails
    ordered() <-------------------------------------   one result per item, in input order

Restarts (kept by the host across calls) bounds how often one worker is restarted in a row.
One lock (`cond`) guards a Scheduler, so a host's threads share it; a single-threaded host never
waits on it (take(w) without `wait`).
"""
from __future__ import annotations

import collections
import sys
import threading
from typing import Any, Callable, Sequence

from .errors import JudgeConfigError
from .types import ScoreItem, ScoreResult, item_name, metadata_problem, result_metadata

# fail(index, reason, error_kind) -> the failed result for that item
Fail = Callable[[int, str, str], ScoreResult]

SCHEDULES = ("round_robin", "dynamic")


class Scheduler:
    """The work of one call: the queues of micro-batches (lists of item indices), the retry queue,
    each item's attempts, and one result slot per item, filled once.

    items: the call's items (for error messages). n_workers: the host's workers (slots 0..n-1).
    micro_batch: items per batch. schedule: `round_robin` (item i goes to worker i mod n, each
    worker's share in micro-batches) or `dynamic` (one shared queue: a free worker takes the next).
    failed: results of items that failed before scheduling (an image that could not be sent).
    lost: workers already given up when the call starts, with why. noun: how errors name a worker.
    closing: read by take(); true once the host is closing (no more work handed out)."""

    def __init__(self, items: Sequence[ScoreItem], n_workers: int, micro_batch: int, schedule: str = "dynamic",
                 max_retries: int = 1, on_done: Callable[[int], None] = lambda n: None,
                 failed: Sequence[ScoreResult] = (), lost: dict[int, str] | None = None, noun: str = "worker",
                 closing: Callable[[], bool] = lambda: False):
        if schedule not in SCHEDULES:
            raise JudgeConfigError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.cond = threading.Condition()
        self.items = items
        self.fail = failer(items)
        self.results: list[ScoreResult | None] = [None] * len(items)
        self.remaining = len(items)
        self.retry: collections.deque[list[int]] = collections.deque()
        self.attempts: collections.Counter[int] = collections.Counter()
        self.max_retries = max_retries
        self.on_done = on_done
        self.noun = noun
        self.closing = closing
        self.aborted = False               # the call ended (interrupted): no more work
        self.drivers = n_workers           # host threads still taking work for this call
        self.lost_causes: dict[int, str] = {}
        self.n_workers = n_workers
        self.store(failed)
        failed_ix = {r.index for r in failed}
        todo = [i for i in range(len(items)) if i not in failed_ix]
        self.queues: list[collections.deque[list[int]]] = [collections.deque() for _ in range(n_workers)]
        self.shared: collections.deque[list[int]] | None = None
        if schedule == "dynamic":
            self.shared = collections.deque(_chunks(todo, micro_batch))
        else:
            for w in range(n_workers):
                self.queues[w].extend(_chunks(todo[w::n_workers], micro_batch))
        for w, cause in (lost or {}).items():
            self.lost(w, cause)

    # -- handing out work ---------------------------------------------------------------------

    def take(self, w: int, wait: bool = False) -> list[int] | None:
        """The next micro-batch for worker `w`: a retry first, then its own queue (or the shared
        one); None when there is none now. With `wait` (a host thread per worker), waits while
        other workers still hold items that may come back for retry, and returns None only when
        every item has a result, the call was aborted or the host is closing, or no other thread
        is left to give anything back (so a thread never waits forever)."""
        with self.cond:
            while True:
                if self.aborted or self.closing():
                    return None
                if self.retry:
                    return self.retry.popleft()
                q = self.shared if self.shared is not None else self.queues[w]
                if q:
                    return q.popleft()
                if not wait or self.remaining == 0 or self.drivers <= 1:
                    return None
                self.cond.wait(0.5)

    def driver_done(self) -> None:
        """A host thread left the call (for whatever reason): the others stop waiting on it."""
        with self.cond:
            self.drivers -= 1
            self.cond.notify_all()

    def abort(self) -> None:
        """The call ended early (Ctrl-C, an error, the host closing): take() hands out nothing more."""
        with self.cond:
            self.aborted = True
            self.cond.notify_all()

    # -- what came back -----------------------------------------------------------------------

    def store(self, results: Sequence[ScoreResult]) -> None:
        """Fill the results' slots (by `index`); a slot already filled keeps its first result."""
        with self.cond:
            n = 0
            for r in results:
                if self.results[r.index] is None:
                    self.results[r.index] = r
                    self.remaining -= 1
                    n += 1
            self.cond.notify_all()
        if n:
            self.on_done(n)

    def done(self, batch: Sequence[int], results: Sequence[ScoreResult], who: str) -> None:
        """Worker `who` answered `batch`: one result per item, in the batch's order, or the batch fails.
        A failure the worker could not give its item's metadata (it could not load it, or could not
        send it back: result_form.cannot_send_back) carries the caller's."""
        got = [r.index for r in results]
        if got != list(batch):
            self.failed(batch, f"{who} answered for items {got}, asked for {list(batch)}")
            return
        for r in results:
            if r.error and not r.metadata and self.items[r.index].metadata:
                r.metadata = result_metadata(self.items[r.index])
        self.store(results)

    def failed(self, batch: Sequence[int], cause: str) -> None:
        """The worker lived but the batch raised: its items fail with the cause."""
        self.store([self.fail(i, cause, "worker_died") for i in batch])

    def died(self, batch: Sequence[int], cause: str, kind: str = "worker_died") -> None:
        """Items of a batch whose worker died or hung: retry each alone (so one poison item
        cannot take its neighbours down again), or fail it once its retries are spent."""
        failed = []
        with self.cond:
            for i in batch:
                self.attempts[i] += 1
                if self.attempts[i] > self.max_retries:
                    n = self.attempts[i]
                    failed.append(self.fail(i, f"tried {n} time{'s' if n > 1 else ''}; the last time {cause}", kind))
                else:
                    self.retry.append([i])
            self.cond.notify_all()
        self.store(failed)

    def lost(self, w: int, cause: str, held: Sequence[int] | None = None) -> None:
        """Worker `w` is gone for good: its queue (and the batch it `held`, not yet sent) goes to
        the others, one item at a time; if none is left, every item without a result fails with
        the causes."""
        with self.cond:
            if w in self.lost_causes:
                return
            self.lost_causes[w] = cause
            if held:
                self.retry.extend([i] for i in held)
            self.retry.extend([i] for batch in self.queues[w] for i in batch)
            self.queues[w].clear()
            if len(self.lost_causes) < self.n_workers:
                self.cond.notify_all()
                return
            why = "; ".join(dict.fromkeys(self.lost_causes[k] for k in sorted(self.lost_causes)))
            pending = [i for i, r in enumerate(self.results) if r is None]
            self.retry.clear()
            if self.shared is not None:
                self.shared.clear()
        self.store([self.fail(i, f"no {self.noun} left: {why}", "worker_died") for i in pending])

    # -- the answer ---------------------------------------------------------------------------

    def pending(self) -> list[int]:
        with self.cond:
            return [i for i, r in enumerate(self.results) if r is None]

    def ordered(self) -> list[ScoreResult]:
        """One result per item, in input order (every slot is filled by construction)."""
        missing = self.pending()
        assert not missing, f"lost items {missing}"
        return list(self.results)  # type: ignore[arg-type]


class Restarts:
    """How often each worker was restarted in a row (a good batch resets it), bounded; kept by a
    host across calls."""

    def __init__(self, n_workers: int):
        self.in_a_row = [0] * n_workers
        self.total = 0

    def allow(self, w: int, max_restarts: int) -> bool:
        """Count one restart of worker `w`, or False when it has had `max_restarts` in a row."""
        if self.in_a_row[w] >= max_restarts:
            return False
        self.in_a_row[w] += 1
        self.total += 1
        return True

    def reset(self, w: int) -> None:
        self.in_a_row[w] = 0


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[s:s + size] for s in range(0, len(indices), size)]


# -- helpers both hosts use ----------------------------------------------------------------------

def failer(items: Sequence[ScoreItem]) -> Fail:
    """The `fail` of one call over `items`: the failed result of item i, naming it."""
    def fail(i: int, why: str, kind: str = "worker_died") -> ScoreResult:
        return ScoreResult.failure(i, items[i], f"item {item_name(items[i], i)}: {why}", kind)

    return fail


def wire_item(item: ScoreItem, index: int, encode: Callable[[Any, str], Any]) -> ScoreItem | ScoreResult:
    """The item with each image passed through `encode(image, tag)` (tag: i0, i1.. / s0, s1..), or
    the item's failed result ("input") when an image cannot be encoded."""
    wrong = metadata_problem(item.metadata)  # replaced after the item was made (ScoreItem checks)
    if wrong:
        return ScoreResult.failure(index, item, f"item {item_name(item, index)}: {wrong}", "input")
    try:
        return ScoreItem(images=[encode(im, f"i{k}") for k, im in enumerate(item.images)],
                         source_images=[encode(im, f"s{k}") for k, im in enumerate(item.source_images)],
                         instruction=item.instruction, id=item.id, metadata=item.metadata)
    except Exception as e:
        return ScoreResult.failure(index, item, f"item {item_name(item, index)}: {e}", "input")


def unsendable(item: ScoreItem, error: Exception, dumps: Callable[[Any], Any], receiver: str,
               fix: str = "give metadata values that pickle (plain data)") -> str:
    """Why an item cannot go to `receiver` (serialised by `dumps`: pickled for a process or an
    actor, JSON for the service), naming the metadata key at fault when there is one."""
    for key, value in (item.metadata or {}).items():
        try:
            dumps(value)
        except Exception as e:
            return f"metadata key {key!r} cannot be sent to {receiver} ({type(e).__name__}: {e}); {fix}"
    return f"the item cannot be sent to {receiver} ({type(error).__name__}: {error})"


def stderr_log(line: str) -> None:
    """A host's log line on stderr, above any progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    except ImportError:
        print(line, file=sys.stderr, flush=True)
