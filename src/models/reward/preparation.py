"""Preparing items: decode and resize images (on threads), build each rubric part's prompt, and
run the processor (in the prepare thread, one chunk ahead of the model). A bad item fails alone.

Part of JudgeEngine (engine.py), as a mixin: these methods run on the engine's attributes.
"""
from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass, field
from typing import Any

from .batching import _batch_key, _PromptsTooLong
from .errors import ItemFailed
from .templates import Template
from .types import ScoreItem, describe_image, item_name, load_pil, metadata_problem
from .vision_reuse import image_key


@dataclass
class _Request:
    """One prompt: item `pos` of the chunk, asked rubric part `part`."""
    pos: int
    part: str
    template: Template
    prompt: str
    images: list[Any]  # resized PIL images, in the order the prompt shows them
    image_keys: list[str] | None = None  # their pixel digests, when vision features are reused
    max_new: int | None = None  # the item's own answer budget (metadata max_new_tokens), if lower


@dataclass
class _PreparedChunk:
    items: list[ScoreItem]
    indices: list[int]  # each item's index in the caller's input (results and errors carry it)
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)  # pos -> (message, kind)
    notes: dict[int, list[str]] = field(default_factory=dict)
    requests: list[_Request] = field(default_factory=list)
    # Processor outputs (CPU tensors) made by the prepare thread, keyed by _batch_key(requests).
    encoded: dict[tuple, Any] = field(default_factory=dict)
    source_keys: set[str] = field(default_factory=set)  # image keys shown as source images (vision_reuse.py)


class Preparation:
    """Preparing items into prompts and processor inputs (JudgeEngine mixin)."""

    def _prepare(self, items: list[ScoreItem], indices: list[int], mode: str | None = None,
                 encode: bool = True) -> _PreparedChunk:
        """The chunk's prompts, and (encode) their processor outputs, made ahead of the model."""
        s = self.settings
        mode = mode or s.mode
        chunk = _PreparedChunk(items=items, indices=indices)
        loading = self._load_images(items)
        for pos, item in enumerate(items):
            try:
                wrong = metadata_problem(item.metadata)  # replaced after the item was made (ScoreItem checks)
                if wrong:
                    raise ItemFailed(wrong, "input")
                text = item.instruction
                if text is not None and not isinstance(text, str):
                    raise ItemFailed(f"the instruction must be a string, got {type(text).__name__}", "input")
                held = self._special_token_in(text)
                if held:
                    raise ItemFailed(f"the instruction holds {held!r}, a special token of the judge's prompt format, "
                                     "which a prompt cannot carry as text (remove it)", "input")
                missing = self.rubric.missing_input(item.images, item.source_images, item.instruction)
                if missing:
                    raise ItemFailed(missing, "input")
                needs_source = self.rubric.needs_source
                max_new = item_max_new(item, s.max_new_tokens) if mode == "generate" else None  # no answer in logits
                loaded: dict[str, list[Any]] = {}
                keys: dict[int, str | None] = {}
                notes: list[str] = []
                for role, imgs in (("image", item.images), ("source", item.source_images)):
                    if role == "source" and not needs_source:
                        continue
                    out = []
                    for k, img in enumerate(imgs):
                        try:
                            note, resized = loading[(pos, role, k)].result()[:2]
                            if note:
                                notes.append(f"{describe_image(img)}: {note}")
                            out.append(resized)
                            keys[id(resized)] = loading[(pos, role, k)].result()[2]
                            if role == "source" and keys[id(resized)] is not None:
                                chunk.source_keys.add(keys[id(resized)])
                        except ValueError as e:
                            raise ItemFailed(_image_error(role, describe_image(img), str(e)), "image") from None
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
                    chunk.requests.append(_Request(pos, part, tpl, prompt, imgs,
                                                   [keys[id(im)] for im in imgs] if self._vision_reuse else None,
                                                   max_new))
                if notes:
                    chunk.notes[pos] = notes
            except ItemFailed as e:
                chunk.errors[pos] = (str(e), e.kind)
            except Exception as e:  # anything else about one item stays with that item
                chunk.errors[pos] = (f"could not prepare the item: {type(e).__name__}: {e}", "input")
        if encode:
            self._pre_encode(chunk)
        return chunk

    def _special_token_in(self, text: Any) -> str | None:
        """The first special token of the judge's tokenizer (the image and video placeholders, the
        chat turns' markers) that an instruction shown to the judge holds as text, or None. The
        processor would read it as the token itself: an image placeholder the prompt has no image
        for (the model then fails the whole batch), or a turn of the chat that the instruction
        ends or opens. An instruction no part of the rubric shows is not read."""
        if not isinstance(text, str) or not any(t.needs_instruction for _, t in self.rubric.parts):
            return None
        tokens = self.__dict__.get("_special_tokens")
        if tokens is None:
            tok = getattr(self.processor, "tokenizer", self.processor)
            found = [t.content for t in (getattr(tok, "added_tokens_decoder", None) or {}).values()
                     if getattr(t, "special", False)]
            found += [t for t in (getattr(self.processor, "image_token", None),
                                  getattr(self.processor, "video_token", None)) if isinstance(t, str) and t]
            tokens = self._special_tokens = tuple(dict.fromkeys(found))
        return next((t for t in tokens if t in text), None)

    def _load_images(self, items: list[ScoreItem]) -> dict[tuple[int, str, int], concurrent.futures.Future]:
        # Decoding and resizing (PIL, which releases the GIL) on several threads: on one thread it
        # runs at ~25 images/s for 1024x768, slower than the model with the fast vision path.
        needs_source = self.rubric.needs_source
        futures = {}
        for pos, item in enumerate(items):
            for role, imgs in (("image", item.images), ("source", item.source_images if needs_source else [])):
                for k, img in enumerate(imgs or []):
                    futures[(pos, role, k)] = self._image_pool.submit(self._load_image, img)
        return futures

    def _load_image(self, img: Any) -> tuple[str | None, Any, str | None]:
        from qwen_vl_utils import fetch_image

        pil = load_pil(img, self.settings.max_image_pixels)
        resized = fetch_image({"image": pil, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels},
                              image_patch_size=self.patch_size)
        # The digest names the image for vision_reuse.py (equal pixels, one pass through the tower).
        return pil.info.get("frames_note"), resized, image_key(resized) if self._vision_reuse else None

    def _pre_encode(self, chunk: _PreparedChunk) -> None:
        # Run the processor here, in the prepare thread, so it overlaps the model's work on the
        # previous chunk. A batch that fails here is encoded again (and fails properly) in _encode.
        if self._continuous:  # each prompt alone: the continuous decode batches the ones that join together
            groups = [[r] for r in chunk.requests if r.pos not in chunk.errors]
        else:
            groups = list(self._batches(chunk, evict=False))  # the kept features are the main thread's
        for reqs in groups:
            try:
                chunk.encoded[_batch_key(reqs)] = self._encode_cpu(reqs)
            except Exception:
                pass

    def _encode(self, reqs: list[_Request], encoded: dict | None = None):
        inputs = (encoded or {}).pop(_batch_key(reqs), None)
        if inputs is None:
            inputs = self._encode_cpu(reqs)
        self._join_preprocess_stream(inputs)
        inputs = inputs.to(self.device)
        # What was worked out with the batch (the rope positions, the image tokens' positions),
        # taken out for the model (rope_ahead.py, mask_ahead.py).
        for ahead in self._aheads():
            inputs = ahead.take(inputs)
        return inputs

    def _aheads(self) -> list[Any]:
        """What works out part of the forward pass on the host as a batch is prepared."""
        return [a for a in (self._rope_ahead, self._mask_ahead) if a is not None]

    def _encode_cpu(self, reqs: list[_Request]):
        images = [im for r in reqs for im in r.images]
        with self._preprocess_stream():
            inputs = self.processor(text=[r.prompt for r in reqs], images=images or None,
                                    padding=True, return_tensors="pt", **self._preprocess_kwargs())
        self._check_lengths(reqs, inputs)
        for ahead in self._aheads():
            ahead.carry(inputs)
        return inputs

    def _check_lengths(self, reqs: list[_Request], inputs) -> None:
        """Refuse, before the model runs, each prompt over max_prompt_tokens or over the judge's
        context (in generate mode the prompt and its answer budget together): _PromptsTooLong
        naming them. Cheap on every batch: the processor pads to the longest prompt, so one whose
        padded length fits, with the largest budget, reads no row."""
        s = self.settings
        budgets = [(r.max_new or s.max_new_tokens) if s.mode == "generate" else 0 for r in reqs]
        if prompt_length_problem(int(inputs["input_ids"].shape[1]), max(budgets), s.max_prompt_tokens,
                                 self._context) is None:
            return
        over = {}
        for req, n, budget in zip(reqs, inputs["attention_mask"].sum(dim=1).tolist(), budgets):
            why = prompt_length_problem(int(n), budget, s.max_prompt_tokens, self._context)
            if why is not None:
                over[_batch_key([req])[0]] = why
        if over:
            raise _PromptsTooLong(over)

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


def prompt_length_problem(tokens: int, answer: int, prompt_limit: int | None, context: int | None) -> str | None:
    """Why a prompt of `tokens` tokens (text and image tokens) with an answer of up to `answer`
    tokens (0 in logits mode, which writes none) must not run, or None. Over max_prompt_tokens
    (the user's limit), or over the judge's context (`context`, its language model's
    max_position_embeddings): past it the model has never been trained, so what it writes, or the
    score read from its next token, would mean nothing. An answer budget that does not fit is
    refused too rather than cut short: a budget quietly lowered for some items would change what
    they are scored under (an answer cut off gives no score, or another one)."""
    if prompt_limit is not None and tokens > prompt_limit:
        return (f"the prompt is {tokens} tokens, over max_prompt_tokens={prompt_limit} "
                "(lower max_pixels or raise the limit)")
    if context is None or tokens + answer <= context:
        return None
    where = (f"the judge's context of {context} tokens (its language model's max_position_embeddings: "
             "it was never trained on later positions)")
    fewer = "smaller images (lower max_pixels, the size images are resized to) or a shorter instruction"
    if not answer:
        return f"the prompt is {tokens} tokens (text and image tokens), over {where}; give it fewer tokens: {fewer}"
    if tokens >= context:
        return (f"the prompt is {tokens} tokens (text and image tokens), and with its answer budget of {answer} "
                f"(max_new_tokens) {tokens + answer}, over {where}; give the prompt fewer tokens: {fewer}")
    return (f"the prompt is {tokens} tokens (text and image tokens) and its answer budget {answer} (max_new_tokens): "
            f"{tokens + answer}, over {where}; lower max_new_tokens (for this item alone: metadata max_new_tokens "
            f"up to {context - tokens}), or give the prompt fewer tokens: {fewer}")


def item_max_new(item: ScoreItem, limit: int) -> int | None:
    """The item's own answer budget, metadata {"max_new_tokens": n}: 1..max_new_tokens, or None."""
    n = (item.metadata or {}).get("max_new_tokens")
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise ItemFailed(f"metadata max_new_tokens must be a whole number in 1..{limit} (the judge's "
                         f"max_new_tokens), got {n!r}", "input")
    return n if n < limit else None


def _name(item: ScoreItem, index: int) -> str:
    return item_name(item, index)


def _image_error(role: str, name: str, why: str) -> str:
    # "image not found: a.png" / "image a.png: aspect ratio ..."; "source image ..." for sources.
    text = why if name in why else f"image {name}: {why}"
    if role == "source":
        text = "source " + text if text.startswith("image") else f"source image {name}: {why}"
    return text

