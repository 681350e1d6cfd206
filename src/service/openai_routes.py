"""The service's OpenAI-compatible routes: the judge for tools that speak chat completions.

    POST /v1/chat/completions   image + text messages -> the judge's answer, in OpenAI's shape
    GET  /v1/models             the served judge's name

Evaluation harnesses and the official `openai` client point `base_url` at
`http://HOST:PORT/v1` and ask the judge their own question about their images. The request runs
through the same batcher and engine as /score (src/models/reward/chat.py): one model, every GPU
of the multi-GPU judge, scoring and chat requests batched together.

What a request may hold (anything else is refused by name, never ignored silently):
- messages: roles system (or developer), user, assistant; content a string or a list of parts
  `{"type": "text", "text"}` and `{"type": "image_url", "image_url": {"url"}}`, where the url is
  a data URL (base64) or a path (`file://` or plain) inside server.allowed_dirs. The service
  fetches nothing from the network.
- max_tokens (or max_completion_tokens), temperature, top_p, n, seed: sampling. Unset
  temperature and top_p take the served judge's settings (greedy by default), as vLLM takes a
  checkpoint's generation config.
- logprobs, top_logprobs (<= 20): per generated token, from the model's raw next-token
  distribution; the first token's is what logits-mode scoring reads.
- continue_final_message (vLLM's name): the last, assistant message is continued instead of a new
  answer started (an answer prefix, as templates with `logits_prefix` need).
- stream must be false; stop, penalties and logit_bias only at their neutral values.

Authorisation, readiness and the body-size limit are the service's own (`begin`); errors come in
OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Awaitable, Callable, Mapping, Sequence

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

from ..models.reward.chat import CHAT_KEY, MAX_N, MAX_TOKENS, MAX_TOP_LOGPROBS, MIN_TEMPERATURE
from ..models.reward.types import ScoreItem
from .validate import MAX_IMAGES_PER_ITEM as MAX_IMAGES  # a request is one item
from .wire import WireError, check_path, decode_image

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed",
          "logprobs", "top_logprobs", "stream", "continue_final_message", "add_generation_prompt",
          # accepted at their neutral values only:
          "stop", "frequency_penalty", "presence_penalty", "logit_bias", "response_format",
          # informational, ignored:
          "user", "metadata", "store", "stream_options"}
_CLIENT_ERRORS = {"image", "input", "prompt_too_long"}


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def _error(status: int, message: str, param: str | None = None, headers: Mapping[str, str] | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=dict(headers or {}))


def _served_name(model: Any) -> str:
    settings = getattr(model, "settings", None)
    return str(getattr(settings, "model_name", None) or type(model).__name__)


def _int(body: Mapping[str, Any], key: str, lo: int, hi: int, default: int | None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _BadRequest(f"'{key}' must be an integer from {lo} to {hi}, got {v!r}", key)
    return v


def _num(body: Mapping[str, Any], key: str, lo: float, hi: float, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise _BadRequest(f"'{key}' must be a number from {lo:g} to {hi:g}, got {v!r}", key)
    return float(v)


def _image(url: Any, allowed: Sequence[Any], where: str) -> bytes | str:
    if not isinstance(url, str) or not url:
        raise _BadRequest(f"{where}: 'url' must be a non-empty string", where)
    if url.startswith(("http://", "https://")):
        raise _BadRequest(f"{where}: this service fetches no images from the network; send a data URL "
                          "(data:image/png;base64,...) or a path inside server.allowed_dirs", where)
    try:
        if url.startswith("file://"):
            return check_path(url[len("file://"):], allowed, where)
        return decode_image(url, allowed, where)
    except WireError as e:
        raise _BadRequest(e.message, where, 403 if e.status == 403 else 400) from None


def chat_item(body: Any, allowed: Sequence[Any], model: Any, request_id: str) -> tuple[ScoreItem, dict[str, Any]]:
    """A chat-completions body -> (the item the engine answers, the sampling settings).
    _BadRequest names the field."""
    if not isinstance(body, Mapping):
        raise _BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise _BadRequest(f"unsupported field(s) {unknown}; this judge supports: "
                          f"{', '.join(sorted(_KNOWN))}", unknown[0])
    if not isinstance(body.get("model"), str):
        raise _BadRequest("'model' must be a string (any name; GET /v1/models gives the served one)", "model")
    if body.get("stream"):
        raise _BadRequest("streaming is not supported; send stream: false", "stream")
    for key, neutral in (("stop", (None, [], "")), ("frequency_penalty", (None, 0, 0.0)),
                         ("presence_penalty", (None, 0, 0.0)), ("logit_bias", (None, {}))):
        if body.get(key) not in neutral:
            raise _BadRequest(f"'{key}' is not supported by this judge (only its neutral value)", key)
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise _BadRequest("'response_format' other than {\"type\": \"text\"} is not supported", "response_format")
    settings = getattr(model, "settings", None)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise _BadRequest("give max_tokens or max_completion_tokens, not both", "max_tokens")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, 1, MAX_TOKENS, min(int(getattr(settings, "max_new_tokens", 256)), MAX_TOKENS))
    temperature = _num(body, "temperature", 0.0, 2.0, float(getattr(settings, "temperature", 0.0)))
    if 0 < temperature < MIN_TEMPERATURE:
        raise _BadRequest(f"'temperature' must be 0 (greedy) or from {MIN_TEMPERATURE:g} to 2, got {temperature!r}",
                          "temperature")
    top_p = _num(body, "top_p", 0.0, 1.0, float(getattr(settings, "top_p", 1.0)))
    if top_p == 0.0:
        raise _BadRequest("'top_p' must be above 0", "top_p")
    n = _int(body, "n", 1, MAX_N, 1)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise _BadRequest(f"'seed' must be an integer, got {seed!r}", "seed")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _BadRequest(f"'logprobs' must be true or false, got {logprobs!r}", "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
    if top and not logprobs:
        raise _BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    cont = body.get("continue_final_message", False)
    agp = body.get("add_generation_prompt")
    if not isinstance(cont, bool) or (agp is not None and not isinstance(agp, bool)):
        raise _BadRequest("'continue_final_message' and 'add_generation_prompt' must be true or false")
    if agp is not None and agp == cont:
        raise _BadRequest("add_generation_prompt must be the opposite of continue_final_message "
                          "(a new answer, or the last assistant message continued)", "add_generation_prompt")

    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _BadRequest("'messages' must be a non-empty list", "messages")
    messages: list[dict[str, Any]] = []
    images: list[bytes | str] = []
    for i, m in enumerate(raw_messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise _BadRequest(f"{where}: expected an object with 'role' and 'content'", where)
        given = m.get("role")
        role = _ROLES.get(given) if isinstance(given, str) else None  # a list or an object is no role (nor a key)
        if role is None:
            raise _BadRequest(f"{where}: role {repr(given)[:80]} is not supported; known: {', '.join(_ROLES)}", where)
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise _BadRequest(f"{where}: unsupported key(s) {sorted(extra)}", where)
        content = m.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise _BadRequest(f"{where}.content: expected a string or a non-empty list of parts", where)
        parts: list[dict[str, Any]] = []
        for j, p in enumerate(content):
            pw = f"{where}.content[{j}]"
            kind = p.get("type") if isinstance(p, Mapping) else None
            if kind == "text" and isinstance(p.get("text"), str):
                parts.append({"type": "text", "text": p["text"]})
            elif kind == "image_url":
                ref = p.get("image_url")
                url = ref.get("url") if isinstance(ref, Mapping) else ref
                if len(images) >= MAX_IMAGES:
                    raise _BadRequest(f"{pw}: more than {MAX_IMAGES} images in one request", pw)
                images.append(_image(url, allowed, f"{pw}.image_url"))
                parts.append({"type": "image"})
            else:
                raise _BadRequest(f"{pw}: expected {{\"type\": \"text\", \"text\": ...}} or "
                                  f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}, got type {kind!r}", pw)
        messages.append({"role": role, "content": parts})
    if cont and messages[-1]["role"] != "assistant":
        raise _BadRequest("continue_final_message needs the last message to be the assistant's", "messages")
    spec = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "n": n,
            "seed": seed, "logprobs": bool(logprobs), "top_logprobs": top, "continue_final_message": cont}
    return ScoreItem(images=images, id=request_id, metadata={CHAT_KEY: spec}), spec


def _logprobs(entries: list[dict[str, Any]], top: int) -> dict[str, Any]:
    def one(e: dict[str, Any]) -> dict[str, Any]:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode("utf-8"))}
    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e.get("top", [])[:top]]} for e in entries],
            "refusal": None}


def completion(answer: Mapping[str, Any], spec: Mapping[str, Any], request_id: str, model_name: str) -> dict[str, Any]:
    """The engine's answer in OpenAI's chat.completion shape."""
    choices = []
    for i, c in enumerate(answer["choices"]):
        choices.append({"index": i, "message": {"role": "assistant", "content": c["text"], "refusal": None},
                        "logprobs": _logprobs(c["logprobs"], spec["top_logprobs"]) if spec["logprobs"] else None,
                        "finish_reason": c["finish_reason"]})
    prompt, done = int(answer["prompt_tokens"]), int(answer["completion_tokens"])
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": choices, "usage": {"prompt_tokens": prompt, "completion_tokens": done,
                                          "total_tokens": prompt + done}}


def add_openai_routes(app: Any, service: Any, begin: Callable[[Request], Awaitable[Any]],
                      authorize: Callable[[Request], None]) -> None:
    """Add /v1/chat/completions and /v1/models to the service's app. `begin` authorises, checks
    readiness and reads the JSON body within the size limit; `service.score` runs the batcher."""

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        try:
            body = await begin(request)
        except HTTPException as e:
            return _error(e.status_code, str(e.detail), headers=e.headers)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            item, spec = await asyncio.to_thread(chat_item, body, service.allowed, service.model, request_id)
        except _BadRequest as e:
            return _error(e.status, e.message, e.param)
        try:
            result = (await service.score([item], request))[0]
        except HTTPException as e:
            return _error(e.status_code, str(e.detail), headers=e.headers)
        if result.error:
            status = 400 if result.error_kind in _CLIENT_ERRORS else 500
            return _error(status, result.error)
        answer = (result.raw or {}).get("chat")
        if not isinstance(answer, Mapping):
            return _error(501, f"the service's model ({type(service.model).__name__}) does not run the judge "
                               "engine here, so it cannot answer chat completions")
        return JSONResponse(completion(answer, spec, request_id, _served_name(service.model)))

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        try:
            authorize(request)
            service.check_ready()
        except HTTPException as e:
            return _error(e.status_code, str(e.detail), headers=e.headers)
        return JSONResponse({"object": "list", "data": [
            {"id": _served_name(service.model), "object": "model", "created": 0, "owned_by": "reward-service"}]})
