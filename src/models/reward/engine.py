"""The scoring engine: load a Qwen-VL judge once, then turn items into scores.

This is the only place that knows about the model. Every host runs it unchanged: the
single-device class (in this process), each worker process of the multi-GPU pool, each Ray
actor, the HTTP service. It imports only torch, transformers, qwen-vl-utils, pillow and this
package's plain-data modules, so a worker environment needs nothing else.

Flow of one call:

    items --> chunks of `batch_size` items (static batches: a quarter chunk first, batching.py),
                 |  cut from the order `chunk_order` asks for (auto: prompts of similar size
                 |  together, size_order.py, and items that share a source image side by side,
                 |  so that vision reuse encodes it once, grouping.py; results in input order)
                 |  prepare (a background thread, one chunk ahead): decode images, resize
                 |  (on prepare_threads), chat template, processor -> tensors; a bad image
                 |  fails only its item
                 v
              run: one forward pass (logits) or generate() per rubric part
                 |  (speed paths: vision_attention.py, compile_*, fast_decode.py; same scores)
                 |  (vision_reuse.py: an image shown again, in this chunk or while its features
                 |  stay within vision_cache_mb, is not encoded again)
                 |  out of memory -> split the batch in halves and retry, down to one prompt;
                 |  later batches start at the size that fit (and under max_memory_gb)
                 v
              parse / expected value -> sub-scores -> rubric.overall -> ScoreResult

Where each job lives (JudgeEngine is assembled from one mixin per job):
    loading.py      checkpoint, processor, model on its device, the scale's level tokens
    preparation.py  images, prompts, the processor; per-item errors
    batching.py     batches, out-of-memory splits, the memory budget
    continuous.py   generate mode's continuous batching: one decode per call, fed from the chunks
    size_order.py   the order chunks are cut from: prompts of similar size together, and
    grouping.py       items sharing a source image together
    scoring.py      the forward pass / the answers, turned into sub-scores
    speed.py        the speed paths chosen at load (vision attention, compiling, fast decoding)
    rope_ahead.py     logits mode: each batch's rope positions worked out in the prepare thread
    mask_ahead.py     logits mode: each batch's image-token positions found there too
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any, Callable, Iterator, Sequence

from .batching import Batching
from .chat import is_chat, split_chats
from .continuous import ContinuousCalls
from .devices import check_device, resolve_device
from .errors import ItemFailed, JudgeConfigError, JudgeInputError, JudgeUnavailable
from .loading import Loading
from .preparation import Preparation, _name, _PreparedChunk, _Request  # noqa: F401
from .scoring import Scoring
from .settings import JudgeSettings
from .size_order import Resize, chunk_order
from .speed import SpeedPaths
from .templates import Rubric, Template, resolve_rubric
from .types import ScoreItem, ScoreResult, result_metadata

log = logging.getLogger(__name__)


class JudgeEngine(Loading, Preparation, Batching, ContinuousCalls, Scoring, SpeedPaths):
    """A loaded judge on one device. Not thread-safe: one caller at a time."""

    def __init__(self, settings: JudgeSettings, device: str = "auto", device_label: str | None = None,
                 devices: Sequence[str] | None = None):
        """device: `auto` (the first CUDA GPU, else the CPU), `cpu`, `cuda` or `cuda:N`; settled
        here (devices.resolve_device), so `self.device` and every result name `cpu` or `cuda:N`.
        devices: the GPUs this judge is spread over (`['cuda:0', 'cuda:1']`, a worker of a group
        of GPUs: transformers' device_map places the layers, inputs go to the first). None: `device`."""
        import torch

        self.settings = settings
        self.rubric: Rubric = resolve_rubric(settings.template, settings.templates)
        if devices and len(devices) > 1:  # named GPUs: `auto` and `cpu` are no members of a group
            self.devices = [check_device(d, "devices") for d in devices]
            if any(not d.startswith("cuda") for d in self.devices):
                raise JudgeConfigError(f"devices: a judge spreads over CUDA GPUs only, got {self.devices}")
        else:
            self.devices = [resolve_device(devices[0] if devices else device)]
        self.device = self.devices[0]
        self.device_label = device_label or self.device
        self._torch = torch
        self._closed = False
        self._ramp_first_chunk = 4  # batching.py: a call starts with a quarter chunk (0: a whole one)
        t0 = time.perf_counter()
        self._load()
        self.load_time_s = time.perf_counter() - t0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="judge-prepare")
        self._image_pool = concurrent.futures.ThreadPoolExecutor(settings.prepare_threads, thread_name_prefix="judge-image")

    def fingerprint(self) -> str:
        return self.settings.judge_fingerprint()

    def score(self, items: Sequence[ScoreItem], base_index: int = 0,
              indices: Sequence[int] | None = None,
              on_done: Callable[[int], None] | None = None) -> list[ScoreResult]:
        """Score items; result i is for items[i] and has index base_index + i, or indices[i] when
        given (a worker scoring scattered items of a larger call, so its errors name them right).
        on_done(n): called as each chunk's n results are ready (a progress bar)."""
        if self._closed:
            raise JudgeUnavailable("the judge is closed")
        items = list(items)
        idx = list(indices) if indices is not None else [base_index + i for i in range(len(items))]
        if len(idx) != len(items):
            raise JudgeInputError(f"{len(indices or [])} indices for {len(items)} items")
        if any(is_chat(it) for it in items):  # raw chat prompts from the service's OpenAI route
            answered = split_chats(self, items, idx)
            if on_done is not None:
                on_done(len(answered))
            return answered
        results: list[ScoreResult | None] = [None] * len(items)
        bs = self._chunk_items()
        # Chunks are cut from `order`: the input order, or the one `chunk_order: auto` asks for.
        order = self._chunk_order(items, bs) or list(range(len(items)))
        ordered = [items[p] for p in order]
        chunks = [(start, ordered[start:stop], [idx[p] for p in order[start:stop]])
                  for start, stop in self._chunk_bounds(ordered)]
        for start, chunk_results in (self._continuous_call(chunks) if self._continuous else self._static_call(chunks)):
            for pos, res in chunk_results.items():
                results[order[start + pos]] = res
            if on_done is not None:
                on_done(len(chunk_results))
        missing = [i for i, r in enumerate(results) if r is None]
        assert not missing, f"engine lost items {missing}"  # by construction; a bug if it fires
        return results  # type: ignore[return-value]

    def _chunk_order(self, items: list[ScoreItem], chunk: int) -> list[int] | None:
        """The order to cut chunks from; None: the input order. `chunk_order: auto` (size_order.py):
        prompts of similar size together, largest first, and items that share source images side by
        side (grouping.py) where vision reuse can use it: reuse on, a rubric that shows the sources."""
        if self.settings.chunk_order == "input":
            return None
        reuse = self._vision_reuse
        shows_sources = self.rubric.needs_source
        return chunk_order(items, chunk, Resize(self.patch_size, self.min_pixels, self.max_pixels),
                           with_sources=shows_sources,
                           group_sources=reuse is not None and reuse.enabled and shows_sources,
                           map_fn=self._image_pool.map)

    def _static_call(self, chunks: list[tuple[int, list[ScoreItem], list[int]]]) -> Iterator[tuple[int, dict[int, ScoreResult]]]:
        for start, prepared in self._prefetched(chunks):
            yield start, self._run_chunk(prepared)
            self._count_scored(len(prepared.items))

    def _prefetched(self, chunks: list[tuple[int, list[ScoreItem], list[int]]]) -> Iterator[tuple[int, _PreparedChunk]]:
        # Preparation (image decoding, tokenising) of chunk k+1 overlaps the model on chunk k.
        if not chunks:
            return
        fut = self._pool.submit(self._prepare, chunks[0][1], chunks[0][2])
        for k, (start, _, _) in enumerate(chunks):
            prepared = fut.result()
            if k + 1 < len(chunks):
                _, nxt, nxt_idx = chunks[k + 1]
                fut = self._pool.submit(self._prepare, nxt, nxt_idx)
            yield start, prepared

    def prompts(self, items: Sequence[ScoreItem], mode: str | None = None) -> list[list[tuple[str, Template, str, list[Any]]]]:
        """What the judge is shown for each item, without running the model: per item, per rubric
        part, (part name, template, prompt text, resized images in prompt order), built by the
        same code as scoring. `mode` (default: the settings' mode) picks the question's wording.
        Training a judge uses this so that it learns on exactly the inputs it is scored on.
        Raises ValueError naming the first item that cannot be prepared."""
        if mode is not None and mode not in ("logits", "generate"):
            raise JudgeConfigError(f"mode: unknown value {mode!r}; known: logits, generate")
        items = list(items)
        chunk = self._prepare(items, list(range(len(items))), mode, encode=False)  # the prompts, not the tensors
        if chunk.errors:
            pos, (msg, _) = min(chunk.errors.items())
            raise JudgeInputError(f"item {_name(items[pos], pos)}: {msg}")
        out: list[list[tuple[str, Template, str, list[Any]]]] = [[] for _ in items]
        for r in chunk.requests:
            out[r.pos].append((r.part, r.template, r.prompt, r.images))
        return out

    def _run_chunk(self, chunk: _PreparedChunk) -> dict[int, ScoreResult]:
        reuse = self._vision_reuse
        if reuse is not None:  # vision_reuse.py: how often each image is shown in this chunk
            reuse.begin_chunk([k for r in chunk.requests if r.pos not in chunk.errors for k in (r.image_keys or [])],
                              chunk.source_keys)
        try:
            outcomes = list(self._run_all(chunk))
        finally:
            if reuse is not None:
                reuse.end_chunk()
        return self._assemble(chunk, outcomes)

    def _assemble(self, chunk: _PreparedChunk, outcomes: list[tuple[_Request, Any, float]]) -> dict[int, ScoreResult]:
        """A chunk's results from its prompts' (request, outcome or ItemFailed, seconds)."""
        part_out: dict[int, dict[str, Any]] = {}    # pos -> part -> (score, raw) or error
        part_err: dict[int, tuple[str, str]] = dict(chunk.errors)
        part_time: dict[int, float] = {}
        failed_part: dict[int, str] = {}  # the part whose prompt failed, where a part of the item did
        # In rubric order, not the order the prompts finished in: under continuous batching a
        # shorter answer finishes first, and an item's raw answers and its error would otherwise
        # list its parts (and name its first failing one) differently from a static batch.
        order = {part: i for i, (part, _) in enumerate(self.rubric.parts)}
        outcomes = sorted(outcomes, key=lambda o: (o[0].pos, order.get(o[0].part, len(order))))
        for req, outcome, dt in outcomes:
            part_time[req.pos] = part_time.get(req.pos, 0.0) + dt
            if isinstance(outcome, ItemFailed):
                part_err.setdefault(req.pos, (str(outcome), outcome.kind))
                failed_part.setdefault(req.pos, req.part)
            else:
                part_out.setdefault(req.pos, {})[req.part] = outcome
        results: dict[int, ScoreResult] = {}
        for pos, item in enumerate(chunk.items):
            index = chunk.indices[pos]
            if pos in part_err and pos not in part_out:
                msg, kind = part_err[pos]
                r = ScoreResult.failure(index, item, f"item {_name(item, index)}: {msg}", kind, self.device_label)
                r.latency_s = part_time.get(pos, 0.0)
                results[pos] = r
                continue
            outs = part_out.get(pos, {})
            sub = {part: outs[part]["score"] if part in outs else None for part, _ in self.rubric.parts}
            raw = {part: outs[part]["raw"] for part in outs}
            errors = [f"{part}: {outs[part]['error']}" for part in outs if outs[part].get("error")]
            if pos in part_err:  # a part's prompt failed where others scored: named, as parse errors are
                errors.append(f"{failed_part[pos]}: {part_err[pos][0]}")
            score = self.rubric.overall(sub)
            kinds = {outs[p].get("kind") for p in outs if outs[p].get("error")}
            r = ScoreResult(index=index, id=item.id, score=score, sub_scores=sub, raw=raw,
                            device=self.device_label, latency_s=part_time.get(pos, 0.0))
            if score is None:
                r.error = f"item {_name(item, index)}: " + "; ".join(errors or ["no score"])
                r.error_kind = (part_err[pos][1] if pos in part_err else (sorted(k for k in kinds if k) or ["parse"])[0])
            notes = chunk.notes.get(pos, []) + [f"{part}: {outs[part]['note']}" for part in outs if outs[part].get("note")]
            r.metadata = result_metadata(item, notes)  # an item's own `notes` stays
            results[pos] = r
        return results

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._image_pool.shutdown(wait=True)
        # Every reference to the model's modules goes, so its memory is given back even while
        # the closed judge object lives on (a notebook variable): the model, vision reuse's hold
        # on the inner model and its kept features, and the compiled blocks.
        del self.model
        self._forget_vision_features()
        self._vision_reuse = None
        self._rope_ahead = None
        self._mask_ahead = None
        self._compiled = []
        self._compile_pending = []
        self._free_memory()
