"""The scoring engine: load a Qwen-VL judge once, then turn items into scores.

This is the only place that knows about the model. Every host runs it unchanged: the
single-device class (in this process), each worker process of the multi-GPU pool, each Ray
actor, the HTTP service. It imports only torch, transformers, qwen-vl-utils, pillow and this
package's plain-data modules, so a worker environment needs nothing else.

Flow of one call:

    items --> chunks of `batch_size` items
                 |  prepare (a background thread, one chunk ahead): decode images, resize
                 |  (on prepare_threads), chat template, processor -> tensors; a bad image
                 |  fails only its item
                 v
              run: one forward pass (logits) or generate() per rubric part
                 |  (speed paths: vision_attention.py, compile_*, fast_decode.py; same scores)
                 |  out of memory -> split the batch in halves and retry, down to one prompt;
                 |  later batches start at the size that fit (and under max_memory_gb)
                 v
              parse / expected value -> sub-scores -> rubric.overall -> ScoreResult
"""
from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from .chat import is_chat, split_chats
from .parsing import parse_score
from .settings import JudgeSettings
from .templates import Rubric, Template, resolve_rubric, rubric_fingerprint
from .types import ScoreItem, ScoreResult, describe_image, load_pil

log = logging.getLogger(__name__)

# Fault injection for the failure tests, read on every batch; unset in normal use.
# A prompt batch larger than this raises CUDA's out-of-memory error, on any device:
_FAULT_OOM_ABOVE = "REWARD_FAULT_OOM_ABOVE"
# Seconds to sleep before each forward pass (a slow or hung worker):
_FAULT_DELAY_S = "REWARD_FAULT_DELAY_S"
# An item id; a batch holding that item kills its process with a real SIGSEGV (as a crashing
# CUDA kernel or C extension would), or hangs it for an hour:
_FAULT_SEGFAULT_ON_ID = "REWARD_FAULT_SEGFAULT_ON_ID"
_FAULT_HANG_ON_ID = "REWARD_FAULT_HANG_ON_ID"


@dataclass
class _Request:
    """One prompt: item `pos` of the chunk, asked rubric part `part`."""
    pos: int
    part: str
    template: Template
    prompt: str
    images: list[Any]  # resized PIL images, in the order the prompt shows them


@dataclass
class _PreparedChunk:
    items: list[ScoreItem]
    indices: list[int]  # each item's index in the caller's input (results and errors carry it)
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)  # pos -> (message, kind)
    notes: dict[int, list[str]] = field(default_factory=dict)
    requests: list[_Request] = field(default_factory=list)
    # Processor outputs (CPU tensors) made by the prepare thread, keyed by _batch_key(requests).
    encoded: dict[tuple, Any] = field(default_factory=dict)


class JudgeEngine:
    """A loaded judge on one device. Not thread-safe: one caller at a time."""

    def __init__(self, settings: JudgeSettings, device: str = "cpu", device_label: str | None = None):
        import torch

        self.settings = settings
        self.rubric: Rubric = resolve_rubric(settings.template, settings.templates)
        self.device = _normalize_device(device)
        self.device_label = device_label or self.device
        self._torch = torch
        self._closed = False
        t0 = time.perf_counter()
        self._load()
        self.load_time_s = time.perf_counter() - t0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="judge-prepare")
        self._image_pool = concurrent.futures.ThreadPoolExecutor(settings.prepare_threads, thread_name_prefix="judge-image")

    # -- loading ----------------------------------------------------------------------------

    def _load(self) -> None:
        torch = self._torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        s = self.settings
        path = s.model_name
        if path.startswith("tiny:"):
            from ..tiny import resolve_model_name

            path = resolve_model_name(path)
        elif not os.path.isabs(path) and not os.path.exists(path):
            # A repo-relative folder (e.g. models/tiny_judge) works from any working directory.
            in_repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", path)
            if os.path.isdir(in_repo):
                path = os.path.normpath(in_repo)
        self.model_path = path
        self.processor = AutoProcessor.from_pretrained(path)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        ip = self.processor.image_processor
        self.patch_size = int(getattr(ip, "patch_size", 14))
        size = dict(getattr(ip, "size", None) or {})
        self.min_pixels = s.min_pixels or size.get("shortest_edge") or 4 * (self.patch_size * 2) ** 2
        self.max_pixels = s.max_pixels or size.get("longest_edge") or 16384 * (self.patch_size * 2) ** 2
        # The processor must not resize again what qwen-vl-utils already resized.
        ip.size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

        if s.dtype == "auto":
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        else:
            dtype = getattr(torch, s.dtype)
        self.dtype = dtype
        # Loading straight onto the GPU (device_map) needs accelerate; without it, load then move.
        import importlib.util

        direct = self.device != "cpu" and importlib.util.find_spec("accelerate") is not None
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, attn_implementation=s.attn_implementation,
            **({"device_map": self.device} if direct else {}))
        if not direct:
            model = model.to(self.device)
        self.model = model.eval()
        self._setup_speed()
        self._level_ids: dict[str, tuple[list[int], list[float], list[str]]] = {}
        if s.mode == "logits":
            for _, tpl in self.rubric.parts:
                self._level_ids[tpl.name] = self._levels_for(tpl)

    def _levels_for(self, tpl: Template) -> tuple[list[int], list[float], list[str]]:
        if not tpl.levels:
            raise ValueError(f"template {tpl.name!r}: logits mode needs single-token levels; its scale "
                             f"{tpl.scale} has none (set `levels`, or use mode: generate)")
        ids, values, names = [], [], []
        lead_space = bool(tpl.logits_prefix) and not tpl.logits_prefix[-1].isspace()
        for text, value in tpl.levels:
            piece = (" " + text) if lead_space else text
            enc = self.tokenizer.encode(piece, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(f"template {tpl.name!r}: level {piece!r} is {len(enc)} tokens for this tokenizer; "
                                 "logits mode needs every level to be one token (use other levels or mode: generate)")
            ids.append(enc[0])
            values.append(float(value))
            names.append(text)
        return ids, values, names

    def fingerprint(self) -> str:
        return self.settings.fingerprint(rubric_fingerprint(self.rubric))

    # -- scoring ----------------------------------------------------------------------------

    def score(self, items: Sequence[ScoreItem], base_index: int = 0,
              indices: Sequence[int] | None = None) -> list[ScoreResult]:
        """Score items; result i is for items[i] and has index base_index + i, or indices[i] when
        given (a worker scoring scattered items of a larger call, so its errors name them right)."""
        if self._closed:
            raise RuntimeError("the judge is closed")
        items = list(items)
        idx = list(indices) if indices is not None else [base_index + i for i in range(len(items))]
        if len(idx) != len(items):
            raise ValueError(f"{len(indices or [])} indices for {len(items)} items")
        if any(is_chat(it) for it in items):  # raw chat prompts from the service's OpenAI route
            return split_chats(self, items, idx)
        _inject_item_faults(items)
        results: list[ScoreResult | None] = [None] * len(items)
        bs = self.settings.batch_size
        chunks = [(start, items[start:start + bs], idx[start:start + bs]) for start in range(0, len(items), bs)]
        for start, prepared in self._prefetched(chunks):
            for pos, res in self._run_chunk(prepared).items():
                results[start + pos] = res
        missing = [i for i, r in enumerate(results) if r is None]
        assert not missing, f"engine lost items {missing}"  # by construction; a bug if it fires
        return results  # type: ignore[return-value]

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
            raise ValueError(f"mode: unknown value {mode!r}; known: logits, generate")
        items = list(items)
        chunk = self._prepare(items, list(range(len(items))), mode)
        if chunk.errors:
            pos, (msg, _) = min(chunk.errors.items())
            raise ValueError(f"item {_name(items[pos], pos)}: {msg}")
        out: list[list[tuple[str, Template, str, list[Any]]]] = [[] for _ in items]
        for r in chunk.requests:
            out[r.pos].append((r.part, r.template, r.prompt, r.images))
        return out

    def _prepare(self, items: list[ScoreItem], indices: list[int], mode: str | None = None) -> _PreparedChunk:
        s = self.settings
        mode = mode or s.mode
        chunk = _PreparedChunk(items=items, indices=indices)
        loading = self._load_images(items)
        for pos, item in enumerate(items):
            try:
                if not item.images:
                    raise _ItemError("the item has no image to judge", "input")
                needs_source = any(t.needs_source for _, t in self.rubric.parts)
                if needs_source and not item.source_images:
                    raise _ItemError(f"template {self.rubric.name!r} needs a source image (the image before the edit); "
                                     "the item has none", "input")
                if any(t.needs_instruction for _, t in self.rubric.parts) and not (item.instruction or "").strip():
                    raise _ItemError(f"template {self.rubric.name!r} needs an instruction; the item has none", "input")
                loaded: dict[str, list[Any]] = {}
                notes: list[str] = []
                for role, imgs in (("image", item.images), ("source", item.source_images)):
                    if role == "source" and not needs_source:
                        continue
                    out = []
                    for k, img in enumerate(imgs):
                        try:
                            note, resized = loading[(pos, role, k)].result()
                            if note:
                                notes.append(f"{describe_image(img)}: {note}")
                            out.append(resized)
                        except ValueError as e:
                            raise _ItemError(_image_error(role, describe_image(img), str(e)), "image") from None
                    loaded[role] = out
                for part, tpl in self.rubric.parts:
                    imgs = [im for role in tpl.images for im in loaded[role]]
                    content = [{"type": "image"} for _ in imgs]
                    content.append({"type": "text", "text": tpl.question(item.instruction, mode)})
                    messages = ([{"role": "system", "content": tpl.system}] if tpl.system else [])
                    messages.append({"role": "user", "content": content})
                    prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                    if mode == "logits":
                        prompt += tpl.logits_prefix
                    chunk.requests.append(_Request(pos, part, tpl, prompt, imgs))
                if notes:
                    chunk.notes[pos] = notes
            except _ItemError as e:
                chunk.errors[pos] = (str(e), e.kind)
            except Exception as e:  # anything else about one item stays with that item
                chunk.errors[pos] = (f"could not prepare the item: {type(e).__name__}: {e}", "input")
        self._pre_encode(chunk)
        return chunk

    def _run_chunk(self, chunk: _PreparedChunk) -> dict[int, ScoreResult]:
        part_out: dict[int, dict[str, Any]] = {}    # pos -> part -> (score, raw) or error
        part_err: dict[int, tuple[str, str]] = dict(chunk.errors)
        part_time: dict[int, float] = {}
        for reqs in self._batches(chunk):
            for req, outcome, dt in self._run_requests(reqs, chunk.encoded):
                part_time[req.pos] = part_time.get(req.pos, 0.0) + dt
                if isinstance(outcome, _ItemError):
                    part_err.setdefault(req.pos, (str(outcome), outcome.kind))
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
            if pos in part_err:
                errors.append(part_err[pos][0])
            score = self.rubric.overall(sub)
            kinds = {outs[p].get("kind") for p in outs if outs[p].get("error")}
            r = ScoreResult(index=index, id=item.id, score=score, sub_scores=sub, raw=raw,
                            device=self.device_label, latency_s=part_time.get(pos, 0.0), metadata=dict(item.metadata))
            if score is None:
                r.error = f"item {_name(item, index)}: " + "; ".join(errors or ["no score"])
                r.error_kind = (part_err[pos][1] if pos in part_err else (sorted(k for k in kinds if k) or ["parse"])[0])
            if pos in chunk.notes:
                r.metadata = {**r.metadata, "notes": chunk.notes[pos]}
            results[pos] = r
        return results

    def _run_requests(self, reqs: list[_Request], encoded: dict | None = None) -> Iterator[tuple[_Request, Any, float]]:
        """Run prompts as one batch; on out-of-memory split in halves; on any other batch error,
        run them one by one so a single bad prompt fails alone."""
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
                yield reqs[0], _ItemError(f"out of memory even alone on {self.device_label}: {_first_line(e)}", "oom"), 0.0
                return
            log.warning("out of memory on a batch of %d on %s; splitting it", len(reqs), self.device_label)
            half = len(reqs) // 2
            yield from self._run_requests(reqs[:half])
            yield from self._run_requests(reqs[half:])
        except _ItemError as e:
            for req in reqs:
                yield req, e, 0.0
        except Exception as e:
            if len(reqs) == 1:
                yield reqs[0], _ItemError(f"model failed: {type(e).__name__}: {e}", "model"), 0.0
                return
            log.warning("a batch of %d failed on %s (%s: %s); retrying its prompts one by one",
                        len(reqs), self.device_label, type(e).__name__, e)
            for req in reqs:
                yield from self._run_requests([req])

    def _free_memory(self) -> None:
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

    def _encode(self, reqs: list[_Request], encoded: dict | None = None):
        inputs = (encoded or {}).pop(_batch_key(reqs), None)
        if inputs is None:
            inputs = self._encode_cpu(reqs)
        self._join_preprocess_stream(inputs)
        return inputs.to(self.device)

    def _encode_cpu(self, reqs: list[_Request]):
        images = [im for r in reqs for im in r.images]
        with self._preprocess_stream():
            inputs = self.processor(text=[r.prompt for r in reqs], images=images or None,
                                    padding=True, return_tensors="pt", **self._preprocess_kwargs())
        limit = self.settings.max_prompt_tokens
        if limit is not None:
            n_tokens = int(inputs["attention_mask"].sum(dim=1).max())
            if n_tokens > limit:
                if len(reqs) == 1:
                    raise _ItemError(f"the prompt is {n_tokens} tokens, over max_prompt_tokens={limit} "
                                     "(lower max_pixels or raise the limit)", "prompt_too_long")
                raise RuntimeError("a prompt in the batch is over max_prompt_tokens")
        return inputs

    def _forward(self, reqs: list[_Request], encoded: dict | None = None) -> list[dict[str, Any]]:
        torch = self._torch
        delay = os.environ.get(_FAULT_DELAY_S)
        if delay:
            time.sleep(float(delay))
        limit = os.environ.get(_FAULT_OOM_ABOVE)
        if limit and len(reqs) > int(limit):
            raise torch.OutOfMemoryError(f"simulated: batch of {len(reqs)} > {_FAULT_OOM_ABOVE}={limit}")
        inputs = self._encode(reqs, encoded)
        tpl = reqs[0].template
        with torch.inference_mode():
            if self.settings.mode == "logits":
                return self._logits_scores(inputs, tpl)
            return self._generate_scores(inputs, tpl)

    def _logits_scores(self, inputs, tpl: Template) -> list[dict[str, Any]]:
        torch = self._torch
        ids, values, names = self._level_ids[tpl.name]
        # No KV cache: nothing reads it, and without one the compiled decoder layers (compile_language)
        # share one graph instead of one per cache layer.
        logits = self.model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1, :].float()
        logp = torch.log_softmax(logits, dim=-1)
        level_logp = logp[:, ids]
        mass = level_logp.exp().sum(dim=-1)
        probs = torch.softmax(level_logp, dim=-1)
        vals = torch.tensor(values, dtype=probs.dtype, device=probs.device)
        scores = (probs * vals).sum(dim=-1)
        out = []
        for row in range(probs.shape[0]):
            p = probs[row].tolist()
            out.append({"score": float(scores[row]), "raw": {
                "probs": {n: round(v, 6) for n, v in zip(names, p)}, "level_mass": round(float(mass[row]), 6)}})
        return out

    def _generate_scores(self, inputs, tpl: Template) -> list[dict[str, Any]]:
        torch = self._torch
        s = self.settings
        k = s.num_samples
        kwargs: dict[str, Any] = {"max_new_tokens": s.max_new_tokens,
                                  "pad_token_id": self.tokenizer.pad_token_id,
                                  "num_return_sequences": k}
        if s.min_new_tokens:
            kwargs["min_new_tokens"] = s.min_new_tokens
        if s.temperature > 0:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
            if s.top_k is not None:
                kwargs["top_k"] = s.top_k
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        # Sampling draws from torch's global RNG. Seed it for reproducible answers, inside a fork
        # so the caller's stream (an RL trainer sampling its policy in this process) is restored.
        # (torch.manual_seed seeds every visible GPU, so every one is forked.)
        devices = list(range(torch.cuda.device_count())) if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            if s.temperature > 0:
                torch.manual_seed(s.seed)
            new = self._new_tokens(inputs, kwargs)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        lo, hi = tpl.scale
        levels = tpl.level_map() if tpl.levels and not tpl.levels[0][0].isdigit() else None
        results = []
        for row in range(len(texts) // k):
            answers = texts[row * k:(row + 1) * k]
            parsed = [parse_score(a, lo, hi, levels=levels, key=tpl.json_key) for a in answers]
            good = [p.score for p in parsed if p.score is not None]
            if k == 1:
                p = parsed[0]
                res: dict[str, Any] = {"score": p.score, "raw": answers[0]}
                if p.score is None:
                    res.update(error=f"could not read a score from the answer ({p.error}); answer: {_clip(answers[0])}",
                               kind="parse")
            else:
                mean = sum(good) / len(good) if good else None
                spread = math.sqrt(sum((g - mean) ** 2 for g in good) / len(good)) if good else None
                res = {"score": mean, "raw": {"answers": answers, "scores": [p.score for p in parsed],
                                             "mean": mean, "std": spread, "parsed": len(good)}}
                if not good:
                    res.update(error=f"none of the {k} sampled answers held a score ({parsed[0].error})", kind="parse")
            results.append(res)
        return results

    # -- speed: vision attention, compiling, batching under a memory budget -----------------------
    # (measured step by step in benchmarks/NOTES.md)

    def _setup_speed(self) -> None:
        from .vision_attention import apply_vision_attn

        torch = self._torch
        s = self.settings
        self.vision_attn = apply_vision_attn(self.model, s.vision_attn, self.device, self.dtype)
        if s.compile_vision:
            self._compile_each("compile_vision", "visual", "blocks")
        if s.compile_language and s.mode == "logits":
            self._compile_each("compile_language", "language_model", "layers")
        self._fast_decode = False
        if s.fast_decode and s.mode == "generate":
            from .fast_decode import unsupported_reason

            why = unsupported_reason(self.model, s.temperature, s.num_samples)
            if why:
                log.warning("fast_decode: using transformers' generate() instead, because %s", why)
            self._fast_decode = why is None
        self._prep_stream = None
        if s.gpu_preprocess and self.device.startswith("cuda"):
            # The prepare thread's GPU work goes on its own stream, so it overlaps the model's.
            self._prep_stream = torch.cuda.Stream(device=self.device)
        # Prompts per forward pass: lowered after an out-of-memory error, or to fit max_memory_gb.
        self._batch_cap: int | None = None
        self._largest_ok = 0
        self._bytes_per_prompt = 0.0
        cuda = self.device.startswith("cuda")
        self._resident_bytes = torch.cuda.memory_allocated(self.device) if cuda else 0
        if s.max_memory_gb is not None and cuda and self._resident_bytes > s.max_memory_gb * 1e9:
            raise ValueError(f"max_memory_gb={s.max_memory_gb} is below what the loaded judge already holds on "
                             f"{self.device_label} ({self._resident_bytes / 1e9:.1f} GB); raise it")

    def _compile_each(self, setting: str, tower: str, blocks: str) -> None:
        """torch.compile each block of one tower: one graph serves all blocks (same code, the
        weights are inputs); shapes change with the images and prompts, hence dynamic. The language
        model is compiled for logits mode only, which keeps no KV cache: with one, each layer's
        cache object would force its own graph."""
        part = getattr(getattr(self.model, "model", self.model), tower, None)
        modules = getattr(part, blocks, None)
        if modules is None:
            raise ValueError(f"{setting}: {type(self.model).__name__} has no {tower}.{blocks} to compile")
        for module in modules:
            module.compile(dynamic=True)

    def _load_images(self, items: list[ScoreItem]) -> dict[tuple[int, str, int], concurrent.futures.Future]:
        # Decoding and resizing (PIL, which releases the GIL) on several threads: on one thread it
        # runs at ~25 images/s for 1024x768, slower than the model with the fast vision path.
        needs_source = any(t.needs_source for _, t in self.rubric.parts)
        futures = {}
        for pos, item in enumerate(items):
            for role, imgs in (("image", item.images), ("source", item.source_images if needs_source else [])):
                for k, img in enumerate(imgs or []):
                    futures[(pos, role, k)] = self._image_pool.submit(self._load_image, img)
        return futures

    def _load_image(self, img: Any) -> tuple[str | None, Any]:
        from qwen_vl_utils import fetch_image

        pil = load_pil(img, self.settings.max_image_pixels)
        resized = fetch_image({"image": pil, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels},
                              image_patch_size=self.patch_size)
        return pil.info.get("frames_note"), resized

    def _new_tokens(self, inputs, kwargs: dict[str, Any]):
        """The generated tokens after the prompt: through fast_decode's CUDA-graphed greedy loop
        when it applies (same tokens as generate()), else generate()."""
        if not self._fast_decode:
            out = self.model.generate(**inputs, **kwargs)
            return out[:, inputs["input_ids"].shape[1]:]
        from .fast_decode import greedy_generate

        gc = self.model.generation_config
        eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
        return greedy_generate(self.model, inputs, max_new_tokens=kwargs["max_new_tokens"],
                               min_new_tokens=kwargs.get("min_new_tokens", gc.min_new_tokens or 0),
                               eos_token_ids=[e for e in eos if e is not None], pad_token_id=kwargs["pad_token_id"],
                               repetition_penalty=gc.repetition_penalty, cuda_graph=self.device.startswith("cuda"))

    def _preprocess_kwargs(self) -> dict[str, Any]:
        # gpu_preprocess: the image processor (torchvision) normalises and cuts patches on the GPU.
        return {"device": self.device} if self._prep_stream is not None else {}

    def _preprocess_stream(self):
        import contextlib

        if self._prep_stream is None or threading.current_thread() is threading.main_thread():
            return contextlib.nullcontext()
        return self._torch.cuda.stream(self._prep_stream)

    def _join_preprocess_stream(self, inputs) -> None:
        """Make the model's stream wait for tensors the prepare thread made on its own stream, and
        keep their memory from being reused before the model is done with them."""
        if self._prep_stream is None:
            return
        current = self._torch.cuda.current_stream(self.device)
        current.wait_stream(self._prep_stream)
        for value in inputs.values():
            if hasattr(value, "is_cuda") and value.is_cuda:
                value.record_stream(current)

    def _batches(self, chunk: _PreparedChunk) -> Iterator[list[_Request]]:
        """The prompt batches a chunk runs as: one per template, cut to the batch limit. Lazy: the
        limit is read again after each batch has run (and measured its memory)."""
        by_template: dict[str, list[_Request]] = {}
        for req in chunk.requests:
            if req.pos not in chunk.errors:
                by_template.setdefault(req.template.name, []).append(req)
        for reqs in by_template.values():
            start = 0
            while start < len(reqs):
                n = self._batch_limit()
                yield reqs[start:start + n]
                start += n

    def _batch_limit(self) -> int:
        budget = self.settings.max_memory_gb if self.device.startswith("cuda") else None
        return batch_limit(self.settings.batch_size, self._batch_cap, budget, self._resident_bytes,
                           self._bytes_per_prompt)

    def _pre_encode(self, chunk: _PreparedChunk) -> None:
        # Run the processor here, in the prepare thread, so it overlaps the model's work on the
        # previous chunk. A batch that fails here is encoded again (and fails properly) in _encode.
        for reqs in self._batches(chunk):
            try:
                chunk.encoded[_batch_key(reqs)] = self._encode_cpu(reqs)
            except Exception:
                pass

    def _batch_memory_start(self) -> int | None:
        # Only under a budget: resetting the peak counter would hide the peak from the caller.
        if self.settings.max_memory_gb is None or not self.device.startswith("cuda"):
            return None
        self._torch.cuda.reset_peak_memory_stats(self.device)
        return self._torch.cuda.memory_allocated(self.device)

    def _batch_memory_end(self, n: int, base: int | None) -> None:
        if base is None:
            return
        extra = self._torch.cuda.max_memory_allocated(self.device) - self._resident_bytes
        self._bytes_per_prompt = max(self._bytes_per_prompt, extra / n)

    def _note_oom(self, n: int) -> None:
        # Later batches start at a size that fits instead of failing at full size first: half the
        # failed size, or the largest size that has run, whichever is larger.
        cap = max(n // 2, self._largest_ok if self._largest_ok < n else 1, 1)
        if n > 1 and (self._batch_cap is None or self._batch_cap > cap):
            self._batch_cap = cap
            log.warning("%s: batches capped at %d prompts after running out of memory", self.device_label, cap)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._image_pool.shutdown(wait=True)
        del self.model
        self._free_memory()


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


class _ItemError(Exception):
    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _inject_item_faults(items: Sequence[ScoreItem]) -> None:
    ids = {it.id for it in items if it.id is not None}
    if os.environ.get(_FAULT_SEGFAULT_ON_ID) in ids:
        import ctypes

        ctypes.string_at(0)  # reads address 0
    if os.environ.get(_FAULT_HANG_ON_ID) in ids:
        time.sleep(3600)


def _normalize_device(device: str | int) -> str:
    if isinstance(device, int):
        return f"cuda:{device}"
    device = str(device).strip()
    if device.isdigit():
        return f"cuda:{device}"
    if device == "cuda":
        return "cuda:0"
    if device != "cpu" and not device.startswith("cuda:"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def _name(item: ScoreItem, index: int) -> str:
    return f"{item.id!r} (#{index})" if item.id is not None else f"#{index}"


def _image_error(role: str, name: str, why: str) -> str:
    # "image not found: a.png" / "image a.png: aspect ratio ..."; "source image ..." for sources.
    text = why if name in why else f"image {name}: {why}"
    if role == "source":
        text = "source " + text if text.startswith("image") else f"source image {name}: {why}"
    return text


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _clip(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."
