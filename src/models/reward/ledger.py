"""The result slots of one call and its retry rule, shared by every multi-process host (the local
worker pool and the Ray actors), so both fill results the same way and retry the same way."""
from __future__ import annotations

import collections
import sys
import threading
from typing import Any, Callable, Sequence

from .types import ScoreItem, ScoreResult

# fail(index, reason, error_kind) -> the failed result for that item
Fail = Callable[[int, str, str], ScoreResult]


class CallLedger:
    """One slot per input item, filled once. `cond` guards every field, so worker threads may
    share a ledger; a single-threaded host simply never waits on it."""

    def __init__(self, n_items: int, max_retries: int, on_done: Callable[[int], None]):
        self.cond = threading.Condition()
        self.results: list[ScoreResult | None] = [None] * n_items
        self.remaining = n_items
        self.retry: collections.deque[list[int]] = collections.deque()
        self.attempts: collections.Counter[int] = collections.Counter()
        self.max_retries = max_retries
        self.on_done = on_done

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

    def give_back(self, indices: Sequence[int], cause: str, fail: Fail, kind: str = "worker_died") -> None:
        """Items of a batch whose worker died or hung: retry each alone (so one poison item
        cannot take its neighbours down again), or fail it once its retries are spent."""
        failed = []
        with self.cond:
            for i in indices:
                self.attempts[i] += 1
                if self.attempts[i] > self.max_retries:
                    n = self.attempts[i]
                    failed.append(fail(i, f"tried {n} time{'s' if n > 1 else ''}; the last time {cause}", kind))
                else:
                    self.retry.append([i])
            self.cond.notify_all()
        self.store(failed)

    def pending(self) -> list[int]:
        with self.cond:
            return [i for i, r in enumerate(self.results) if r is None]


# -- helpers both hosts use ----------------------------------------------------------------------

def item_name(item: ScoreItem, index: int) -> str:
    """How an error names an item: its id and position, or its position."""
    return f"{item.id!r} (#{index})" if item.id is not None else f"#{index}"


def failer(items: Sequence[ScoreItem]) -> Fail:
    """The `fail` of one call over `items`: the failed result of item i, naming it."""
    def fail(i: int, why: str, kind: str = "worker_died") -> ScoreResult:
        return ScoreResult.failure(i, items[i], f"item {item_name(items[i], i)}: {why}", kind)

    return fail


def wire_item(item: ScoreItem, index: int, encode: Callable[[Any, str], Any]) -> ScoreItem | ScoreResult:
    """The item with each image passed through `encode(image, tag)` (tag: i0, i1.. / s0, s1..), or
    the item's failed result ("input") when an image cannot be encoded."""
    try:
        return ScoreItem(images=[encode(im, f"i{k}") for k, im in enumerate(item.images)],
                         source_images=[encode(im, f"s{k}") for k, im in enumerate(item.source_images)],
                         instruction=item.instruction, id=item.id, metadata=item.metadata)
    except Exception as e:
        return ScoreResult.failure(index, item, f"item {item_name(item, index)}: {e}", "input")


def stderr_log(line: str) -> None:
    """A host's log line on stderr, above any progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    except ImportError:
        print(line, file=sys.stderr, flush=True)
