"""Batching: which prompts run together, how many fit (out-of-memory splits, the memory budget),
and running one batch so that a failure stays with the prompts it belongs to.

Part of JudgeEngine (engine.py), as a mixin: these methods run on the engine's attributes.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator, Sequence, TYPE_CHECKING

from .errors import ItemFailed
from .grouping import cut_between_sources

if TYPE_CHECKING:
    from .preparation import _PreparedChunk, _Request
    from .types import ScoreItem

log = logging.getLogger("src.models.reward.engine")


class _PromptsTooLong(ItemFailed):
    """Prompts of a batch that must not run (preparation.prompt_length_problem): (pos, part) ->
    why. They fail alone; the rest of their batch runs without them."""

    def __init__(self, over: dict[tuple[int, str], str]):
        super().__init__(next(iter(over.values())), "prompt_too_long")
        self.over = over


class Batching:
    """Forming and running prompt batches (JudgeEngine mixin)."""

    def _batches(self, chunk: _PreparedChunk, evict: bool = True) -> Iterator[list[_Request]]:
        """The prompt batches a chunk runs as (see `_static_batches`)."""
        yield from self._static_batches([req for req in chunk.requests if req.pos not in chunk.errors], evict)

    def _static_batches(self, requests: list[_Request], evict: bool = True) -> Iterator[list[_Request]]:
        """Prompt batches: one per template, cut to the batch limit. Lazy: the limit is read again
        after each batch has run (and measured its memory). evict: see `_batch_limit`."""
        by_template: dict[str, list[_Request]] = {}
        for req in requests:
            by_template.setdefault(req.template.name, []).append(req)
        for reqs in by_template.values():
            start = 0
            while start < len(reqs):
                n = self._batch_limit(evict)
                yield reqs[start:start + n]
                start += n

    def _run_all(self, chunk: _PreparedChunk) -> Iterator[tuple[_Request, Any, float]]:
        """Every prompt of a chunk, in static batches: (request, outcome, seconds), batch by batch.
        (Continuous batching runs a whole call at once: continuous.py.)"""
        for reqs in self._batches(chunk):
            yield from self._run_requests(reqs, chunk.encoded)

    def _chunk_items(self) -> int:
        """Items prepared together: a batch (also under continuous batching, whose decode pulls
        chunks as slots free up)."""
        return self.settings.batch_size

    def _chunk_bounds(self, ordered: Sequence[ScoreItem]) -> list[tuple[int, int]]:
        """(start, stop) of each chunk of a call's items, in the order chunks are cut from: every
        `_chunk_items()` items. A call of static batches longer than one chunk starts with a quarter
        chunk (1/_ramp_first_chunk; 0: a whole one), then the first chunk's rest: the model waits
        only for the quarter's preparation (every later chunk is prepared while the model runs the
        one before), not for a whole chunk's (0.2 s for 32 images of 1024x768 on an H200). Measured
        1.03-1.04x on 128-item logits calls; a half or an eighth ran slower (benchmarks/NOTES.md).
        Where vision reuse encodes a chunk's shared source images once, the cut moves to where it
        splits no such group, up to half the chunk, or is not made."""
        n, size = len(ordered), self._chunk_items()
        cuts = list(range(0, n, size)) + [n]
        part = self._ramp_first_chunk
        if part and not self._continuous and n > size and size >= part:
            cut: int | None = size // part
            reuse = self._vision_reuse
            if reuse is not None and reuse.enabled and self.rubric.needs_source:
                cut = cut_between_sources(ordered[:size], cut, size // 2)
            if cut:
                cuts.insert(1, cut)
        return list(zip(cuts[:-1], cuts[1:]))

    def _batch_limit(self, evict: bool = True) -> int:
        """Prompts for the next batch (batch_limit), with what the judge holds now. Under a memory
        budget batches come first: when vision features kept beyond their chunk (vision_reuse.py)
        leave room for fewer prompts than a full batch (the limit with nothing kept), the least
        recently used give up that room, and no more; the batch is then full.
        evict False (the prepare thread, planning a chunk's batches while the main thread runs the
        model, whose vision reuse reads and moves the same kept features): that full batch, with
        nothing evicted; the main thread evicts as it runs it."""
        budget = self.settings.max_memory_gb if self.device.startswith("cuda") else None
        per_prompt = self._bytes_per_prompt

        def limit(held: float) -> int:
            return batch_limit(self.settings.batch_size, self._batch_cap, budget, held, per_prompt)

        now = limit(self._held_bytes())
        reuse = self._vision_reuse
        if budget is None or not per_prompt or reuse is None or not reuse.kept_bytes:
            return now
        full = limit(self._resident_bytes)
        if now < full:
            if not evict:
                return full
            reuse.shrink_to(budget * 1e9 - self._resident_bytes - full * per_prompt)
            return limit(self._held_bytes())  # read from what is kept now (full, as shrink_to empties as far as asked)
        return now

    def _held_bytes(self) -> float:
        """What the judge holds between batches: the loaded model, and the vision features kept
        beyond their chunk (vision_reuse.py; on the device, so under the memory budget too)."""
        reuse = self._vision_reuse
        return self._resident_bytes + (reuse.kept_bytes if reuse is not None else 0)

    def _run_requests(self, reqs: list[_Request], encoded: dict | None = None) -> Iterator[tuple[_Request, Any, float]]:
        """Run prompts as one batch; on out-of-memory split in halves; prompts over the length
        limits fail alone and the others run as a batch; on any other batch error, run them one
        by one so a single bad prompt fails alone."""
        torch = self._torch
        try:
            t0 = time.perf_counter()
            base = self._batch_memory_start()
            outcomes = self._forward(reqs, encoded)
            self._largest_ok = max(self._largest_ok, len(reqs))
            self._batch_memory_end(len(reqs), base)
            dt = (time.perf_counter() - t0) / len(reqs)
            for req, out in zip(reqs, outcomes):
                yield req, out, dt
            return
        except torch.OutOfMemoryError as e:
            self._free_memory()
            self._note_oom(len(reqs))
            if len(reqs) == 1:
                yield reqs[0], ItemFailed(f"out of memory even alone on {self.device_label}: {_first_line(e)}", "oom"), 0.0
                return
            log.warning("out of memory on a batch of %d on %s; splitting it", len(reqs), self.device_label)
            half = len(reqs) // 2
            yield from self._run_requests(reqs[:half])
            yield from self._run_requests(reqs[half:])
        except _PromptsTooLong as e:
            for req in reqs:
                why = e.over.get(_batch_key([req])[0])
                if why is not None:
                    yield req, ItemFailed(why, e.kind), 0.0
            rest = [req for req in reqs if _batch_key([req])[0] not in e.over]
            if rest:
                yield from self._run_requests(rest)
        except ItemFailed as e:
            for req in reqs:
                yield req, e, 0.0
        except Exception as e:
            if len(reqs) == 1:
                yield reqs[0], ItemFailed(f"model failed: {type(e).__name__}: {e}", "model"), 0.0
                return
            log.warning("a batch of %d failed on %s (%s: %s); retrying its prompts one by one",
                        len(reqs), self.device_label, type(e).__name__, e)
            for req in reqs:
                yield from self._run_requests([req])

    def _free_memory(self) -> None:
        """After out of memory, a failed decode, or close: give back what can be given back, the
        kept vision features included (shown again, they are encoded again)."""
        import gc

        self._forget_vision_features()
        gc.collect()
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

    def _batch_memory_start(self) -> float | None:
        """What the judge holds as the batch starts (the model, kept vision features), or None
        when no budget is kept. Only under a budget: resetting the peak counter would hide the peak
        from the caller."""
        if self.settings.max_memory_gb is None or not self.device.startswith("cuda"):
            return None
        self._torch.cuda.reset_peak_memory_stats(self.device)
        return self._held_bytes()

    def _batch_memory_end(self, n: int, held: float | None) -> None:
        # The batch's own peak, per prompt: above what was held when it started. (Kept features it
        # evicted on the way could hide up to their bytes from this batch's figure; the figure is
        # the largest over all batches, and the judge's first batch starts with nothing kept.)
        if held is None:
            return
        extra = self._torch.cuda.max_memory_allocated(self.device) - held
        self._bytes_per_prompt = max(self._bytes_per_prompt, extra / n)

    def _note_oom(self, n: int) -> None:
        # Later batches start at a size that fits instead of failing at full size first: half the
        # failed size, or the largest size that has run, whichever is larger.
        cap = max(n // 2, self._largest_ok if self._largest_ok < n else 1, 1)
        if n > 1 and (self._batch_cap is None or self._batch_cap > cap):
            self._batch_cap = cap
            log.warning("%s: batches capped at %d prompts after running out of memory", self.device_label, cap)


def batch_limit(batch_size: int, oom_cap: int | None, budget_gb: float | None, resident_bytes: float,
                bytes_per_prompt: float) -> int:
    """Prompts for the next forward pass: batch_size, lowered to the size that last fit after an
    out-of-memory error, and under a memory budget to what the measured peak per prompt allows
    (one prompt first, to measure it)."""
    limit = batch_size if oom_cap is None else min(batch_size, oom_cap)
    if budget_gb is not None:
        if not bytes_per_prompt:
            return 1
        fit = int((budget_gb * 1e9 - resident_bytes) / bytes_per_prompt)
        limit = min(limit, max(1, fit))
    return limit


def _batch_key(reqs: list[_Request]) -> tuple:
    return tuple((r.pos, r.part) for r in reqs)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]

