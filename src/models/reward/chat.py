"""Raw chat prompts through the scoring engine: the service's OpenAI-compatible route.

`POST /v1/chat/completions` (src/service/openai_routes.py) asks the judge a caller's own
question about the caller's images. It travels like any other item, so it reaches every host
of the engine unchanged (this process, a worker per GPU, a Ray actor) and shares the service's
batcher with the scoring requests:

    route: messages -> ScoreItem(images=[...], metadata={CHAT_KEY: spec})   (images in order)
       -> batcher -> reward model -> ... -> JudgeEngine.score -> split_chats (here)
       -> chat template -> generate() -> answer text, finish reason, per-token logprobs
       -> ScoreResult(raw={"chat": {...}})   (not a score: score is None, error None)

`spec` is plain JSON (it crosses the worker channel inside the item's metadata):

    {"messages": [{"role": "system" | "user" | "assistant",
                   "content": str | [{"type": "text", "text": str} | {"type": "image"}, ...]}],
     "max_tokens": int, "temperature": float, "top_p": float, "n": int, "seed": int | null,
     "logprobs": bool, "top_logprobs": int, "continue_final_message": bool}

Each `{"type": "image"}` part takes the next image of `item.images`; images are decoded and
resized exactly as for scoring, so asking the judge a template's question here gives the same
first-token distribution as scoring with that template in logits mode. Logprobs are those of the
model's raw next-token distribution (before temperature or top_p), as vLLM reports them.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Sequence

from .errors import ItemFailed
from .preparation import prompt_length_problem
from .types import ScoreItem, ScoreResult, describe_image, item_name

if TYPE_CHECKING:
    from .engine import JudgeEngine

CHAT_KEY = "__chat_completion__"   # the metadata key that makes an item a chat request
# Bounds on one request, whoever sent it (the route checks them first, with HTTP errors):
MAX_TOKENS = 4096       # per answer
MAX_N = 16              # answers per request
MAX_TOP_LOGPROBS = 20   # alternatives per token: OpenAI's and vLLM's default ceiling
# The lowest sampling temperature (vLLM's sampling epsilon): logits divided by a smaller one
# overflow to inf, and sampling fails on NaN probabilities. 0 is greedy.
MIN_TEMPERATURE = 1e-5
ROLES = ("system", "user", "assistant")


def is_chat(item: ScoreItem) -> bool:
    return isinstance(item.metadata, dict) and CHAT_KEY in item.metadata


def split_chats(engine: "JudgeEngine", items: Sequence[ScoreItem], indices: Sequence[int]) -> list[ScoreResult]:
    """Score the ordinary items with the engine and answer the chat items here; one result per
    item, in input order."""
    results: list[ScoreResult | None] = [None] * len(items)
    plain = [k for k, it in enumerate(items) if not is_chat(it)]
    if plain:
        for k, r in zip(plain, engine.score([items[k] for k in plain], indices=[indices[k] for k in plain])):
            results[k] = r
    chats = [k for k, it in enumerate(items) if is_chat(it)]
    for k, r in zip(chats, answer_chats(engine, [items[k] for k in chats], [indices[k] for k in chats])):
        results[k] = r
    assert all(r is not None for r in results), "split_chats lost items"  # by construction
    return results  # type: ignore[return-value]


def _check_spec(spec: Any) -> dict[str, Any]:
    """The spec with defaults filled in; ItemFailed naming the field otherwise. The route checks
    the same things with HTTP errors; this guards the engine against any other caller."""
    if not isinstance(spec, dict):
        raise ItemFailed(f"the chat request must be an object, got {type(spec).__name__}", "input")
    messages = spec.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ItemFailed("'messages' must be a non-empty list", "input")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ItemFailed(f"messages[{i}]: needs a role among {', '.join(ROLES)}", "input")
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                ok = isinstance(part, dict) and (part.get("type") == "image" or
                                                 (part.get("type") == "text" and isinstance(part.get("text"), str)))
                if not ok:
                    raise ItemFailed(f"messages[{i}].content[{j}]: expected {{'type': 'text', 'text': str}} "
                                     "or {'type': 'image'}", "input")
        elif not isinstance(content, str):
            raise ItemFailed(f"messages[{i}].content: expected a string or a list of parts", "input")
    out = {"messages": messages, "max_tokens": spec.get("max_tokens", 16), "temperature": spec.get("temperature", 0.0),
           "top_p": spec.get("top_p", 1.0), "n": spec.get("n", 1), "seed": spec.get("seed"),
           "logprobs": bool(spec.get("logprobs", False)), "top_logprobs": spec.get("top_logprobs", 0) or 0,
           "continue_final_message": bool(spec.get("continue_final_message", False))}
    for key, lo, hi in (("max_tokens", 1, MAX_TOKENS), ("n", 1, MAX_N), ("top_logprobs", 0, MAX_TOP_LOGPROBS)):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or not lo <= out[key] <= hi:
            raise ItemFailed(f"'{key}' must be an integer from {lo} to {hi}, got {out[key]!r}", "input")
    for key in ("temperature", "top_p"):
        if not isinstance(out[key], (int, float)) or isinstance(out[key], bool) or out[key] < 0:
            raise ItemFailed(f"'{key}' must be a number >= 0, got {out[key]!r}", "input")
    if 0 < out["temperature"] < MIN_TEMPERATURE:
        raise ItemFailed(f"'temperature' must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, "
                         f"got {out['temperature']!r}", "input")
    if out["continue_final_message"] and messages[-1].get("role") != "assistant":
        raise ItemFailed("continue_final_message needs the last message to be the assistant's", "input")
    return out


def _hf_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The chat template's message form, and how many images it shows."""
    out, n_images = [], 0
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p["type"] == "image":
                    parts.append({"type": "image"})
                    n_images += 1
                else:
                    parts.append({"type": "text", "text": p["text"]})
            content = parts
        out.append({"role": m["role"], "content": content})
    return out, n_images


def _prepare(engine: "JudgeEngine", item: ScoreItem) -> tuple[dict[str, Any], str, list[Any]]:
    spec = _check_spec(item.metadata.get(CHAT_KEY))
    messages, n_images = _hf_messages(spec["messages"])
    if n_images != len(item.images):
        raise ItemFailed(f"the messages show {n_images} image(s) but {len(item.images)} came with them", "input")
    images = []
    for k, img in enumerate(item.images):
        try:
            images.append(engine._load_image(img)[1])
        except ValueError as e:
            raise ItemFailed(f"image {k} ({describe_image(img)}): {e}", "image") from None
    if spec["continue_final_message"]:
        prompt = engine.processor.apply_chat_template(messages, add_generation_prompt=False,
                                                      continue_final_message=True, tokenize=False)
    else:
        prompt = engine.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return spec, prompt, images


def answer_chats(engine: "JudgeEngine", items: Sequence[ScoreItem], indices: Sequence[int]) -> list[ScoreResult]:
    """Answer chat items: batches of up to batch_size prompts that share their sampling settings;
    a batch that fails (out of memory, a bad prompt) is retried one prompt at a time, so a
    failure stays with its own item."""
    results: list[ScoreResult | None] = [None] * len(items)
    groups: dict[tuple, list[tuple[int, dict[str, Any], str, list[Any]]]] = {}
    for k, item in enumerate(items):
        try:
            spec, prompt, images = _prepare(engine, item)
        except ItemFailed as e:
            results[k] = _failure(item, indices[k], str(e), e.kind, engine)
            continue
        except Exception as e:  # anything else about one request stays with it
            results[k] = _failure(item, indices[k], f"{type(e).__name__}: {e}", "input", engine)
            continue
        key = tuple(spec[f] for f in ("max_tokens", "temperature", "top_p", "n", "seed", "logprobs", "top_logprobs"))
        groups.setdefault(key, []).append((k, spec, prompt, images))
    bs = max(1, engine.settings.batch_size)
    for members in groups.values():
        for start in range(0, len(members), bs):
            _run_batch(engine, members[start:start + bs], items, indices, results)
    assert all(r is not None for r in results), "answer_chats lost items"  # by construction
    return results  # type: ignore[return-value]


def _run_batch(engine: "JudgeEngine", batch: list[tuple[int, dict[str, Any], str, list[Any]]],
               items: Sequence[ScoreItem], indices: Sequence[int], results: list[ScoreResult | None]) -> None:
    torch = engine._torch
    t0 = time.perf_counter()
    try:
        answers = _generate(engine, batch)
    except Exception as e:
        if isinstance(e, torch.OutOfMemoryError):
            engine._free_memory()
        if len(batch) > 1:
            for member in batch:
                _run_batch(engine, [member], items, indices, results)
            return
        k = batch[0][0]
        if isinstance(e, ItemFailed):
            msg, kind = str(e), e.kind
        elif isinstance(e, torch.OutOfMemoryError):
            msg, kind = f"out of memory on {engine.device_label}: {str(e).splitlines()[0][:300]}", "oom"
        else:
            msg, kind = f"model failed: {type(e).__name__}: {e}", "model"
        results[k] = _failure(items[k], indices[k], msg, kind, engine)
        return
    dt = (time.perf_counter() - t0) / len(batch)
    for (k, _, _, _), answer in zip(batch, answers):
        results[k] = ScoreResult(index=indices[k], id=items[k].id, score=None, raw={"chat": answer},
                                 device=engine.device_label, latency_s=dt)


def _generate(engine: "JudgeEngine", batch: list[tuple[int, dict[str, Any], str, list[Any]]]) -> list[dict[str, Any]]:
    torch = engine._torch
    spec = batch[0][1]
    images = [im for _, _, _, ims in batch for im in ims]
    inputs = engine.processor(text=[p for _, _, p, _ in batch], images=images or None, padding=True,
                              return_tensors="pt")
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    longest = int(max(lengths))
    # The rule every prompt of the judge follows: max_prompt_tokens, then the judge's context with
    # the answer budget (max_tokens) included.
    why = prompt_length_problem(longest, spec["max_tokens"], engine.settings.max_prompt_tokens, engine._context)
    if why:
        if len(batch) == 1:
            raise ItemFailed(why, "prompt_too_long")
        raise RuntimeError("a prompt in the batch is too long")  # each is run again alone, and fails alone
    inputs = inputs.to(engine.device)
    n = spec["n"]
    sampling = spec["temperature"] > 0
    reps = n if sampling else 1  # greedy answers are all the same: compute one, return it n times
    tok = engine.tokenizer
    kwargs: dict[str, Any] = {"max_new_tokens": spec["max_tokens"], "num_return_sequences": reps,
                              "pad_token_id": tok.pad_token_id, "return_dict_in_generate": True,
                              "output_logits": spec["logprobs"]}
    if sampling:
        kwargs.update(do_sample=True, temperature=float(spec["temperature"]), top_p=float(spec["top_p"]), top_k=None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    devices = list(range(torch.cuda.device_count())) if engine.device.startswith("cuda") else []
    with torch.inference_mode(), torch.random.fork_rng(devices=devices):
        if spec["temperature"] > 0:
            torch.manual_seed(spec["seed"] if spec["seed"] is not None else engine.settings.seed)
        out = engine.model.generate(**inputs, **kwargs)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    gc = engine.model.generation_config
    eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
    eos_ids = {e for e in eos if e is not None}
    answers = []
    for b in range(len(batch)):
        choices = []
        for j in range(n):
            row = b * reps + (j if sampling else 0)
            ids = new[row].tolist()
            stop = next((t for t, tid in enumerate(ids) if tid in eos_ids), None)
            kept = ids if stop is None else ids[:stop]
            choice: dict[str, Any] = {"text": tok.decode(kept, skip_special_tokens=True),
                                      "finish_reason": "length" if stop is None else "stop",
                                      "tokens": len(kept)}
            if spec["logprobs"]:
                steps = len(ids) if stop is None else stop + 1  # the stop token's distribution too
                choice["logprobs"] = [_token_logprobs(torch, tok, out.logits[t][row], ids[t], spec["top_logprobs"])
                                      for t in range(steps)]
            choices.append(choice)
        answers.append({"choices": choices, "prompt_tokens": int(lengths[b]),
                        "completion_tokens": sum(c["tokens"] for c in choices)})
    return answers


def _token_logprobs(torch: Any, tok: Any, logits: Any, chosen: int, top: int) -> dict[str, Any]:
    logp = torch.log_softmax(logits.float(), dim=-1)
    entry: dict[str, Any] = {"token": tok.decode([chosen]), "token_id": chosen, "logprob": float(logp[chosen])}
    if top:
        vals, ids = torch.topk(logp, min(top, logp.shape[-1]))
        entry["top"] = [{"token": tok.decode([int(i)]), "token_id": int(i), "logprob": float(v)}
                        for v, i in zip(vals.tolist(), ids.tolist())]
    else:
        entry["top"] = []
    return entry


def _failure(item: ScoreItem, index: int, message: str, kind: str, engine: "JudgeEngine") -> ScoreResult:
    name = item_name(item, index)
    return ScoreResult(index=index, id=item.id, score=None, error=f"chat request {name}: {message}",
                       error_kind=kind, device=engine.device_label)
