"""Continuous batching over a whole call (generate mode, `continuous_batching`): one decode per
engine call, fed from the prepared chunks as slots free up.

    prepare thread: chunks of batch_size items, one chunk ahead (images, prompts, and each
         |          prompt's own processor output)
         v
    take(n): the next n waiting prompts as one left-padded batch (row_decode.stack_inputs);
         |   the next chunk is pulled in only when the waiting prompts run short
         v
    row_decode.run_continuous:  `batch_size` slots decode; a finished row leaves, taken prompts join.
         |   Prompts are taken a few ahead of the free slots and prefilled on a second CUDA stream
         |   while the decode runs (staged); they enter slots, in the order taken, as slots free up
         v
    on_done(prompt, tokens, waited): parsed, timed (ScoreResult.latency_s); a chunk whose
                    prompts are all done becomes its ScoreResults

Why a call and not a chunk: the decode's drain (the last rows finishing while the other slots
sit empty) is paid once per decode; per chunk it cost ~400 steps every 128 items (benchmarks/
NOTES.md, issue 17). Chunks stay one batch, as without continuous batching: the decode holds
no chunk back, so a larger chunk would only hold more prepared tensors in memory.

If the decode fails, every prompt not yet finished (decoding, prefilled ahead but not yet in a
slot, waiting, or in chunks not yet prepared) runs in static batches; a finished prompt is not run
again: `entered` holds every taken prompt until it is done. Prompts whose processor
output failed in preparation run alone in static batches after the decode, which gives them
their proper error (e.g. over max_prompt_tokens).

Part of JudgeEngine (engine.py), as a mixin: these methods run on the engine's attributes.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from .batching import _batch_key, _first_line

if TYPE_CHECKING:
    from .preparation import _PreparedChunk, _Request
    from .types import ScoreResult

log = logging.getLogger("src.models.reward.engine")


@dataclass
class _Live:
    """A chunk whose prompts are not all done."""
    start: int  # its first item's place in the call
    chunk: _PreparedChunk
    waiting: int = 0  # prompts not yet done
    outcomes: list[tuple[Any, Any, float]] = field(default_factory=list)  # (request, outcome, seconds)


class ContinuousCalls:
    """A call's prompts through one continuous decode (JudgeEngine mixin)."""

    def _continuous_call(self, chunks: list[tuple[int, list, list[int]]]) -> Iterator[tuple[int, dict[int, ScoreResult]]]:
        """(start, results) of each chunk of the call, as engine.score's static loop gives them."""
        from .row_decode import run_continuous, stack_inputs

        torch = self._torch
        s = self.settings
        reuse = self._vision_reuse
        slots = self._batch_limit()
        prepared = self._prefetched(chunks)
        queue: collections.deque[tuple[_Live, _Request]] = collections.deque()  # prompts waiting for a slot
        later: list[tuple[_Live, _Request]] = []  # no processor output from preparation: static, alone
        entered: list[tuple[_Live, _Request, float] | None] = []  # by decode number; None once done
        ready: list[tuple[int, dict[int, ScoreResult]]] = []
        pulled_all = False

        def finish(live: _Live, req: _Request, outcome: Any, dt: float) -> None:
            live.outcomes.append((req, outcome, dt))
            live.waiting -= 1
            if live.waiting == 0:
                ready.append((live.start, self._assemble(live.chunk, live.outcomes)))
                self._count_scored(len(live.chunk.items))

        def pull() -> None:  # the next prepared chunk's prompts join the queue
            nonlocal pulled_all
            try:
                start, chunk = next(prepared)
            except StopIteration:
                pulled_all = True
                return
            live = _Live(start, chunk, waiting=1)  # held open until its prompts are queued
            if reuse is not None:  # vision_reuse.py: the images its prompts will show
                reuse.add_uses([k for r in chunk.requests if r.pos not in chunk.errors for k in (r.image_keys or [])],
                               chunk.source_keys)
            for req in chunk.requests:
                if req.pos not in chunk.errors:
                    live.waiting += 1
                    (queue if _batch_key([req]) in chunk.encoded else later).append((live, req))
            live.waiting -= 1
            if live.waiting == 0:  # every item failed in preparation
                ready.append((start, self._assemble(chunk, [])))
                self._count_scored(len(chunk.items))

        def enter(pairs: list[tuple[_Live, _Request]]):  # prompts into the decode, as one batch
            # Called by the decode inside the stream that will prefill them (the staging stream for
            # prompts prefilled ahead): that stream waits for the preprocessing stream, and the
            # copies to the device are queued on it.
            t = time.perf_counter()
            entered.extend((live, req, t) for live, req in pairs)  # first: a failure below loses none
            singles = [live.chunk.encoded.pop(_batch_key([req])) for live, req in pairs]
            for x in singles:
                self._join_preprocess_stream(x)
            if reuse is not None and all(req.image_keys for _, req in pairs):
                reuse.keys = [k for _, req in pairs for k in req.image_keys]  # the batch's images, in order
            inputs = stack_inputs(singles, self.tokenizer.pad_token_id).to(self.device)  # as the processor pads
            return inputs, [req.max_new or s.max_new_tokens for _, req in pairs]

        def take(n: int):
            while len(queue) < n and not pulled_all:
                pull()
            if not queue:
                return None
            return enter([queue.popleft() for _ in range(min(n, len(queue)))])

        def on_done(i: int, tokens: Any, waited_s: float) -> None:
            live, req, t0 = entered[i]
            text = self.tokenizer.decode(tokens.tolist(), skip_special_tokens=True)
            outcome = self._parse_answers([text], req.template, [self._cut_off(tokens)])[0]
            entered[i] = None
            # Its share of the decode: one of `slots` rows, from its take (its prefill) to its end,
            # less the time it sat prefilled ahead waiting for a slot (the model was decoding the
            # rows in the slots then, each of which counts that time), as for a prompt not staged.
            finish(live, req, outcome, (time.perf_counter() - t0 - waited_s) / slots)

        if reuse is not None:
            reuse.begin_chunk([])
        self._continuous_timings = {}  # the last decode's steps and joins (benchmarks read it)
        failed = None
        try:
            pull()
            if len(queue) > slots or len(chunks) > 1:  # else nothing would join: a static batch
                try:
                    got = take(slots)
                    if got is not None:
                        with torch.inference_mode():
                            run_continuous(self.model, got[0], got[1], take, self._decode_plan, on_done=on_done,
                                           cuda_graph=self.device.startswith("cuda"),
                                           min_join=self._continuous_min_join, stage=self._continuous_stage,
                                           timings=self._continuous_timings)
                except Exception as e:
                    failed = e
                    self._free_memory()
                    if reuse is not None:
                        reuse.keys = None
            rest = [(x[0], x[1]) for x in entered if x is not None] + list(queue) + later
            queue.clear()
            if failed is not None:
                log.warning("continuous batching failed on %s (%s: %s); running the %d prompts not finished, "
                            "and the rest of the call, in static batches", self.device_label,
                            type(failed).__name__, _first_line(failed), len(rest) - len(later))
            by_chunk: dict[int, tuple[_Live, list[_Request]]] = {}
            for live, req in rest:
                by_chunk.setdefault(id(live), (live, []))[1].append(req)
            for live, reqs in by_chunk.values():
                for batch in self._static_batches(reqs):
                    encoded = live.chunk.encoded
                    singles = [encoded.get(_batch_key([r])) for r in batch]
                    if failed is None and all(x is not None for x in singles):  # the batch the processor would make
                        for r, x in zip(batch, singles):
                            del encoded[_batch_key([r])]
                            self._join_preprocess_stream(x)
                        encoded[_batch_key(batch)] = stack_inputs(singles, self.tokenizer.pad_token_id)
                    for req, outcome, dt in self._run_requests(batch, encoded):
                        finish(live, req, outcome, dt)
        finally:
            if reuse is not None:
                reuse.end_chunk()
        yield from ready
        ready.clear()
        for start, chunk in prepared:  # after a failure: the call's other chunks, static
            yield start, self._run_chunk(chunk)
            self._count_scored(len(chunk.items))
