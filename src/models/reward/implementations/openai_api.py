"""A judge served elsewhere behind an OpenAI-compatible chat-completions endpoint.

vLLM (`vllm serve Qwen/Qwen2.5-VL-7B-Instruct`), SGLang, a hosted API, or this project's own
service (`main.py serve` answers /v1/chat/completions too). The judge is asked exactly what the
in-process judge is asked (the same templates and rubric, images in the same order), and its
answers are read the same way:

    items --> a thread pool (max_concurrency requests in flight, optional rate limit)
                |  per item: images -> data URLs; per rubric part: one chat request
                |  429 / 5xx / connection error -> retry with exponential backoff and jitter,
                |  honouring Retry-After; other 4xx -> that item fails with the server's message
                v
              generate: parse the answer (parsing.parse_score), as in-process
              logits:   expected value over the scale's level tokens, from the first answer
                        token's top_logprobs, renormalised over the levels present
                v
              sub-scores -> rubric.overall -> ScoreResult, one per item, in input order

    model:
      class_path: openai
      params: {base_url: "http://127.0.0.1:8000/v1", model: Qwen/Qwen2.5-VL-7B-Instruct,
               api_key_env: null, template: edit, mode: logits}
"""
from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import io
import json
import logging
import math
import os
import queue
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...tiny import bytes_to_unicode
from ..base import BaseRewardModel
from ..chat import is_chat
from ..errors import ItemFailed, JudgeConfigError, JudgeUnavailable
from ..scoring import read_answers
from ..preparation import item_max_new
from ..settings import MODES
from ..templates import Rubric, Template, resolve_rubric, rubric_fingerprint
from ..types import ScoreItem, ScoreResult, describe_image, item_name, load_pil, result_metadata
from ..wire import backoff, retry_after

_RETRY_STATUS = {408, 409, 429}         # and every 5xx
_FATAL_STATUS = {401, 403, 404}         # the same for every request: stop sending
_SAFE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_NO_PROBABILITY = -9999.0               # vLLM's floor for a logprob of -inf
_BYTE_LEVEL = bytes_to_unicode()

log = logging.getLogger(__name__)


class OpenAIRewardModel(BaseRewardModel):
    """Score items through an OpenAI-compatible chat-completions endpoint.

    base_url: the endpoint's base, ending in /v1 (`http://127.0.0.1:8000/v1` for vLLM).
    model: the served model's name (vLLM: the name given to `vllm serve`).
    api_key_env: the environment variable holding the API key (never the key itself in a config);
      null for a server that needs none (then a placeholder is sent).
    mode: `logits` (expected value over the level tokens, from top_logprobs of the first answer
      token; the server must return logprobs) or `generate` (the answer is parsed).
    template / templates: as for every judge (src/models/reward/templates.py).
    max_new_tokens, temperature, top_p, num_samples (`n`), seed: generate mode's sampling.
    top_logprobs: alternatives asked for per token in logits mode (servers cap it, usually at 20);
      at least the number of levels, so every level can show up.
    max_concurrency: requests in flight at once. requests_per_minute: a rate limit (null: none).
    max_retries / backoff_s / max_backoff_s: retries after 429, 5xx or a connection error, waiting
      backoff_s * 2^k (with jitter, capped), or what the server's Retry-After says. A request out of
      retries (the server down, a quota spent) fails the call's remaining items at once with its
      cause, instead of each waiting through the same retries; a re-run resumes them.
    timeout_s: per request.
    max_image_pixels: larger images are refused here, before any upload (as in-process).
    extra_body: extra request fields for the server (vLLM: `{mm_processor_kwargs: {max_pixels: ...}}`).

    Resume fingerprints cover the model name and everything that changes the judgement, not the
    URL: the same model behind another address keeps its stored results.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 mode: str = "logits", template: str = "quality", templates: dict[str, Any] | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, num_samples: int = 1,
                 seed: int | None = 0, top_logprobs: int = 20, max_concurrency: int = 8,
                 requests_per_minute: float | None = None, max_retries: int = 5, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0, timeout_s: float = 300.0, max_image_pixels: int = 100_000_000,
                 extra_body: dict[str, Any] | None = None, progress: bool = False):
        try:
            import openai
        except ImportError as e:
            raise JudgeConfigError(f"the openai judge needs the `openai` package ({e}); "
                                   "setup_env.sh installs it") from None
        if not base_url.startswith(("http://", "https://")):
            raise JudgeConfigError(f"base_url: expected http://host:port/v1 or https://..., got {base_url!r}")
        if mode not in MODES:
            raise JudgeConfigError(f"mode: unknown value {mode!r}; known: {', '.join(MODES)}")
        for name, value, lo in (("max_new_tokens", max_new_tokens, 1), ("num_samples", num_samples, 1),
                                ("max_concurrency", max_concurrency, 1), ("max_retries", max_retries, 0),
                                ("top_logprobs", top_logprobs, 1)):
            if value < lo:
                raise JudgeConfigError(f"{name}: must be at least {lo}, got {value}")
        for name, value in (("temperature", temperature), ("backoff_s", backoff_s), ("max_backoff_s", max_backoff_s)):
            if value < 0:
                raise JudgeConfigError(f"{name}: must be >= 0, got {value}")
        if not 0 < top_p <= 1:
            raise JudgeConfigError(f"top_p: must be in (0, 1], got {top_p}")
        if timeout_s <= 0:
            raise JudgeConfigError(f"timeout_s: must be above 0, got {timeout_s}")
        if requests_per_minute is not None and requests_per_minute <= 0:
            raise JudgeConfigError("requests_per_minute: must be above 0 (or null for no limit), got "
                                   f"{requests_per_minute}")
        if num_samples > 1 and temperature == 0:
            raise JudgeConfigError("num_samples > 1 needs temperature > 0 (greedy answers would all be the same)")
        self.rubric: Rubric = resolve_rubric(template, templates or {})
        self.rubric.check_mode(mode)
        if mode == "logits":
            for _, tpl in self.rubric.parts:
                if top_logprobs < len(tpl.levels):
                    raise JudgeConfigError(f"top_logprobs: {top_logprobs} is fewer than the {len(tpl.levels)} "
                                           f"levels of template {tpl.name!r}; ask for at least that many")
        key = "EMPTY"  # what vLLM documents for a server started without --api-key
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise JudgeConfigError(f"api_key_env: the environment variable {api_key_env} is not set or empty; "
                                       "set it to the API key, or use api_key_env: null for a server that needs "
                                       "no key")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.mode = mode
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.num_samples = num_samples
        self.seed = seed
        self.top_logprobs = top_logprobs
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_image_pixels = max_image_pixels
        self.extra_body = dict(extra_body or {})
        self.progress = progress
        self.device = self.base_url  # what results name as their device
        self._openai = openai
        # Retries are ours (counted, logged in the error, with the policy above), not the client's.
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=timeout_s)
        self._pool = _DaemonPool(max_concurrency)
        # A judge dropped without close() (a notebook cell run again) stops its threads too.
        self._stop_pool = weakref.finalize(self, self._pool.shutdown)
        self._limiter = _RateLimiter(requests_per_minute)
        self._closed = False
        # The answer budget's field: `max_tokens`, which vLLM, SGLang and most servers read; OpenAI's
        # reasoning models refuse it and ask for `max_completion_tokens`, taken from then on.
        self._budget_field = "max_tokens"

    @property
    def fingerprint(self) -> str:
        data = {"class": "openai", "model": self.model, "mode": self.mode, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "num_samples": self.num_samples,
                "seed": self.seed, "extra_body": self.extra_body, "rubric": rubric_fingerprint(self.rubric)}
        if self.mode == "logits":  # which levels come back, so what is renormalised over
            data["top_logprobs"] = self.top_logprobs
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # -- scoring ----------------------------------------------------------------------------

    def score_items(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        if self._closed:
            raise JudgeUnavailable("OpenAIRewardModel is closed")
        items = list(items)
        call = _Call()
        futures = [self._pool.submit(self._score_one, i, item, call) for i, item in enumerate(items)]
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(items), desc=f"scoring on {self.base_url}", unit="item")
        results: list[ScoreResult | None] = [None] * len(items)
        try:
            for fut in concurrent.futures.as_completed(futures):
                if fut.cancelled():  # close() (from another thread) dropped this call's queued requests
                    raise JudgeUnavailable("OpenAIRewardModel was closed during the call")
                r = fut.result()
                results[r.index] = r
                if bar is not None:
                    bar.update(1)
        except BaseException:  # Ctrl-C: queued requests are dropped, running ones finish
            call.cancelled = True
            for f in futures:
                f.cancel()
            raise
        finally:
            if bar is not None:
                bar.close()
        missing = [i for i, r in enumerate(results) if r is None]
        assert not missing, f"openai judge lost items {missing}"  # by construction
        return results  # type: ignore[return-value]

    def _score_one(self, index: int, item: ScoreItem, call: "_Call") -> ScoreResult:
        name = item_name(item, index)
        t0 = time.perf_counter()
        try:
            if is_chat(item):
                raise ItemFailed("a raw chat request cannot be forwarded by the openai judge; "
                                 "serve an in-process or multi-GPU judge instead", "input")
            budget = self._answer_budget(item)
            urls = self._image_urls(item)
        except ItemFailed as e:
            return ScoreResult.failure(index, item, f"item {name}: {e}", e.kind, self.device)
        sub: dict[str, float | None] = {}
        raw: dict[str, Any] = {}
        errors: list[tuple[str, str]] = []
        notes: list[str] = []
        for part, tpl in self.rubric.parts:
            try:
                out = self._ask(tpl, item, urls, call, budget)
            except ItemFailed as e:
                sub[part] = None
                errors.append((f"{part}: {e}", e.kind))
                continue
            sub[part] = out["score"]
            raw[part] = out["raw"]
            if out.get("error"):
                errors.append((f"{part}: {out['error']}", out["kind"]))
            if out.get("note"):
                notes.append(f"{part}: {out['note']}")
        score = self.rubric.overall(sub)
        r = ScoreResult(index=index, id=item.id, score=score, sub_scores=sub, raw=raw, device=self.device,
                        latency_s=time.perf_counter() - t0, metadata=result_metadata(item, notes))  # an item's own `notes` stays
        if score is None:
            r.error = f"item {name}: " + "; ".join(m for m, _ in errors or [("no score", "parse")])
            r.error_kind = errors[0][1] if errors else "parse"
        return r

    def _image_urls(self, item: ScoreItem) -> dict[str, list[str]]:
        missing = self.rubric.missing_input(item.images, item.source_images, item.instruction)
        if missing:
            raise ItemFailed(missing, "input")
        needs_source = self.rubric.needs_source
        out: dict[str, list[str]] = {"image": [], "source": []}
        for role, imgs in (("image", item.images), ("source", item.source_images if needs_source else [])):
            for img in imgs:
                try:
                    out[role].append(image_data_url(img, self.max_image_pixels))
                except ValueError as e:
                    raise ItemFailed(_image_error(role, describe_image(img), str(e)), "image") from None
        return out

    def messages(self, tpl: Template, item: ScoreItem, urls: Mapping[str, list[str]]) -> list[dict[str, Any]]:
        """The chat messages for one rubric part: what the in-process judge is shown (system
        prompt, images in the template's order, the question), with the answer prefix of a
        logits-mode template as a final assistant message to continue."""
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}}
                                         for role in tpl.images for u in urls[role]]
        content.append({"type": "text", "text": tpl.question(item.instruction, self.mode)})
        msgs: list[dict[str, Any]] = [{"role": "system", "content": tpl.system}] if tpl.system else []
        msgs.append({"role": "user", "content": content})
        if self.mode == "logits" and tpl.logits_prefix:
            msgs.append({"role": "assistant", "content": tpl.logits_prefix})
        return msgs

    def _answer_budget(self, item: ScoreItem) -> int:
        """max_new_tokens for this item's answers: the judge's, or the item's own lower one
        (metadata max_new_tokens, checked as the in-process judge checks it)."""
        if self.mode != "generate":
            return self.max_new_tokens  # logits mode asks for one token whatever the item says
        return item_max_new(item, self.max_new_tokens) or self.max_new_tokens

    def _ask(self, tpl: Template, item: ScoreItem, urls: Mapping[str, list[str]], call: "_Call",
             budget: int) -> dict[str, Any]:
        extra = dict(self.extra_body)
        if self.mode == "logits":
            kwargs: dict[str, Any] = {self._budget_field: 1, "temperature": 0.0, "logprobs": True,
                                      "top_logprobs": self.top_logprobs}
            if tpl.logits_prefix:  # vLLM's (and this service's) way to continue an answer prefix
                extra.update(continue_final_message=True, add_generation_prompt=False)
        else:
            kwargs = {self._budget_field: budget, "temperature": self.temperature, "n": self.num_samples}
            if self.temperature > 0:
                kwargs["top_p"] = self.top_p
        if self.seed is not None:
            kwargs["seed"] = self.seed
        if extra:
            kwargs["extra_body"] = extra
        messages = self.messages(tpl, item, urls)
        try:
            choices = self._choices(call, messages, kwargs)
            if self.mode == "logits":
                return logits_score(choices[0], tpl, self.top_logprobs)
            asked, first = self.num_samples, len(choices)
            requests = 1
            while len(choices) < asked:
                # A server that ignores `n` (or caps it) answers fewer samples than asked: the rest
                # are asked for again, with the seed moved on, so that a seeded server does not
                # repeat the same answer; the mean is never taken over fewer answers than asked.
                kwargs["n"] = asked - len(choices)
                if self.seed is not None:
                    kwargs["seed"] = self.seed + requests
                choices += self._choices(call, messages, kwargs)
                requests += 1
            out = self._generate_score(choices[:asked], tpl)
            if requests > 1:
                said = (f"the server answered {first} of the {asked} samples asked for (n); "
                        f"the rest took {requests - 1} more request(s)")
                out["note"] = f"{out['note']}; {said}" if out.get("note") else said
            return out
        except (AttributeError, TypeError, IndexError) as e:
            # The client builds its objects from the JSON unchecked: a field missing, null or of
            # another type than OpenAI's fails this item, not the call.
            raise ItemFailed(f"the server's answer is not a chat completion as OpenAI's API defines it "
                             f"({type(e).__name__}: {e})", "api") from None

    def _choices(self, call: "_Call", messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> list[Any]:
        """One request's choices; a body that is not a chat completion with choices fails the part."""
        resp = self._request(call, model=self.model, messages=messages, **kwargs)
        if isinstance(resp, str):  # the client hands back a body that is not JSON as its text
            raise ItemFailed(f"the server's answer is not a JSON chat completion: {resp.strip()[:300]!r} (does "
                             "base_url name the API, ending in /v1?)", "api")
        choices = getattr(resp, "choices", None)
        if not choices:  # an error some servers send with status 200
            said = _body_message(resp.to_dict()) if hasattr(resp, "to_dict") else None
            raise ItemFailed("the server answered with no choices" + (f": {said}" if said else ""), "api")
        return list(choices)

    def _generate_score(self, choices: list[Any], tpl: Template) -> dict[str, Any]:
        # The same reading as the in-process engine's generate mode (scoring.read_answers). A null
        # message (a content filter) is an empty answer; a hosted API's refusal is the answer given.
        # finish_reason "length": max_tokens ended the answer, not the judge.
        return read_answers([(c.message and (c.message.content or getattr(c.message, "refusal", None))) or ""
                             for c in choices], tpl,
                            [getattr(c, "finish_reason", None) == "length" for c in choices])

    # -- the protocol: retries, backoff, rate limit -----------------------------------------

    def _request(self, call: "_Call", **kwargs: Any) -> Any:
        openai = self._openai
        last, kind = "", "api"
        for attempt in range(self.max_retries + 1):
            if call.fatal:
                raise ItemFailed(f"not sent: an earlier request of this call failed ({call.fatal[0]})", call.fatal[1])
            if call.cancelled or self._closed:
                raise ItemFailed("not sent: the call was interrupted or the judge closed", "api")
            self._limiter.wait()
            wait: float | None = None
            try:
                return self._client.chat.completions.create(**kwargs)
            except openai.APIStatusError as e:
                status = e.status_code
                last, kind = f"HTTP {status}: {_server_message(e)}", "api"
                if status == 400 and "max_tokens" in kwargs and _asks_for_completion_tokens(e):
                    # Not a retry: the same request with the budget under the field the server names.
                    self._budget_field = "max_completion_tokens"
                    kwargs["max_completion_tokens"] = kwargs.pop("max_tokens")
                    log.info("%s refuses max_tokens; sending max_completion_tokens from now on", self.base_url)
                    return self._request(call, **kwargs)
                if status in _FATAL_STATUS:
                    call.fatal = call.fatal or (last, "api")
                    raise ItemFailed(f"{self.base_url}: {last}", "api") from None
                if not (status in _RETRY_STATUS or status >= 500):
                    raise ItemFailed(f"{self.base_url}: {last}", "api") from None
                wait = retry_after(e.response.headers)
            except openai.APIConnectionError as e:  # refused, reset, timed out
                cause = e.__cause__ or e
                last, kind = f"{type(e).__name__}: {cause}", "connection"
            except ValueError as e:  # a 200 whose JSON body does not parse (a proxy cut it short)
                raise ItemFailed(f"{self.base_url}: the server's answer is not a JSON chat completion "
                                 f"({type(e).__name__}: {e})", "api") from None
            if attempt < self.max_retries:
                if wait is None:
                    wait = backoff(attempt + 1, self.backoff_s, self.max_backoff_s)
                time.sleep(min(wait, self.max_backoff_s))
        message = f"{self.base_url}: no answer after {self.max_retries + 1} attempt(s); last: {last}"
        # The server is down or out of quota: the call's other requests would wait through the same
        # retries, so they fail at once (a re-run of the job resumes them).
        call.fatal = call.fatal or (message, kind)
        raise ItemFailed(message, kind)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            # Queued requests are dropped; one still waiting for its answer is not waited for
            # (closing after Ctrl-C must not wait out a request's timeout), and sends nothing more.
            self._stop_pool()
            self._client.close()


class _DaemonPool:
    """`n` daemon threads running submitted calls. Unlike ThreadPoolExecutor's threads, which the
    interpreter joins at exit, these do not hold up the exit after Ctrl-C while a request to a
    hung server waits out its timeout."""

    def __init__(self, n: int):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # submit and shutdown: nothing is queued after the threads' stop
        self._shut = False
        self._threads = [threading.Thread(target=self._run, name=f"openai-judge-{k}", daemon=True) for k in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Any, *args: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if not self._shut:
                self._queue.put((fut, fn, args))
                return fut
        _cancel(fut)  # no thread would run it
        return fut

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fut, fn, args = job
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:
                    fut.set_exception(e)
            # A job's function is a judge's bound method: held here while waiting, it would keep a
            # judge nobody closed alive, and these threads with it (ThreadPoolExecutor drops it too).
            del job, fut, fn, args

    def shutdown(self) -> None:
        """Cancel what is queued, stop each thread after its current call; waits for nothing."""
        with self._lock:
            if self._shut:
                return
            self._shut = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                _cancel(job[0])
        for _ in self._threads:
            self._queue.put(None)


def _cancel(fut: concurrent.futures.Future) -> None:
    """Cancel a future no thread has started, waking as_completed() and wait() on it: cancel()
    alone wakes only result(); the waiters hear of it from set_running_or_notify_cancel(), which
    an executor calls when it takes the job up, and no thread will."""
    fut.cancel()
    fut.set_running_or_notify_cancel()


class _Call:
    """State shared by the requests of one score_items call."""

    def __init__(self) -> None:
        # Set by a 401/403/404 or a request out of retries: the rest are not sent. (message, kind)
        self.fatal: tuple[str, str] | None = None
        self.cancelled = False


class _RateLimiter:
    """At most `per_minute` request starts a minute, evenly spaced, across all threads."""

    def __init__(self, per_minute: float | None):
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


def logits_score(choice: Any, tpl: Template, asked: int) -> dict[str, Any]:
    """The expected value over the template's levels from the first answer token's top_logprobs,
    as the in-process engine computes it from the full distribution: each level is the token the
    level's text is (a leading space where the answer prefix ends without one), and the
    probabilities are renormalised over the levels. A level missing from the alternatives has
    less probability than every one returned; when the server returned fewer alternatives than
    asked for and levels are missing, or none at all, the item fails instead.

    What servers really send: a token as its raw vocabulary piece ("Ġgood", "▁good": vLLM 0.8-0.9)
    is the level it spells; a logprob that is no number (null: orjson's -inf or NaN; NaN) counts as
    absent; vLLM's floor -9999 (its -inf) is no probability, so levels that all have none fail."""
    lp = getattr(choice, "logprobs", None)
    content = getattr(lp, "content", None) if lp is not None else None
    if not content:
        raise ItemFailed("the server returned no logprobs (it may not support them for this model; "
                         "use mode: generate)", "logprobs")
    top = content[0].top_logprobs or []
    if not top:
        raise ItemFailed("the server returned no top_logprobs for the first answer token (it may cap them at 0; "
                         "use mode: generate)", "logprobs")
    lead_space = bool(tpl.logits_prefix) and not tpl.logits_prefix[-1].isspace()
    by_token: dict[str, float] = {}
    for alt in top:
        value = alt.logprob
        if isinstance(value, (int, float)) and not math.isnan(value):
            by_token.setdefault(alt.token, float(value))
    shown = ", ".join(repr(a.token) for a in top[:10])
    if not by_token:
        raise ItemFailed(f"the server's {len(top)} top_logprobs carry no number (null or NaN logprobs: the judge's "
                         "logits may not be finite, e.g. a float16 judge overflowing)", "logprobs")
    logps: dict[str, float] = {}
    values: dict[str, float] = {}
    for text, value in tpl.levels:
        piece = (" " + text) if lead_space else text
        found = [by_token[s] for s in _spellings(piece) if s in by_token]
        if found:
            logps[text] = found[0]
            values[text] = value
    missing = [t for t, _ in tpl.levels if t not in logps]
    if not logps:
        raise ItemFailed(f"none of the levels ({', '.join(t for t, _ in tpl.levels)}) is among the first answer "
                         f"token's {len(top)} top_logprobs (the judge's likeliest: {shown})", "logprobs")
    if missing and len(top) < asked:
        raise ItemFailed(f"the server returned only {len(top)} of the {asked} top_logprobs asked for and levels "
                         f"{', '.join(missing)} are not among them (it may cap top_logprobs: vLLM's --max-logprobs)",
                         "logprobs")
    best = max(logps.values())
    if best <= _NO_PROBABILITY:
        raise ItemFailed(f"the server gives the levels no probability (logprobs {best:g}: vLLM writes -inf as -9999); "
                         "no score can be read from them", "logprobs")
    # Renormalised in log space, as the engine's softmax over the level logits: levels far in the
    # tail (logprob -800) still give their expected value instead of 0/0.
    rel = {t: math.exp(v - best) for t, v in logps.items() if v > _NO_PROBABILITY}
    total = sum(rel.values())
    score = sum(values[t] * p for t, p in rel.items()) / total
    mass = sum(math.exp(v) for v in logps.values())
    raw: dict[str, Any] = {"probs": {t: round(rel.get(t, 0.0) / total, 6) for t in logps}, "level_mass": round(mass, 6)}
    if missing:
        raw["levels_missing"] = missing
    return {"score": float(score), "raw": raw}


def _spellings(piece: str) -> list[str]:
    """How servers write the token `piece` in top_logprobs: as its text, or as the raw vocabulary
    piece (byte-level BPE maps each UTF-8 byte to a printable character, " " to "Ġ"; SentencePiece
    writes a leading space as "▁")."""
    byte_level = "".join(_BYTE_LEVEL[b] for b in piece.encode("utf-8"))
    out = [piece, byte_level]
    if piece.startswith(" "):
        out.append("▁" + piece[1:])
    return list(dict.fromkeys(out))


def image_data_url(img: Any, max_image_pixels: int | None) -> str:
    """An image as a data URL holding the pixels the in-process judge would see: the file's own
    bytes where a server's plain RGB decode gives those pixels (RGB PNG/JPEG/WEBP, upright, one
    frame), else a PNG of the image as load_pil reads it (EXIF rotation applied, transparency on
    white, 16-bit mapped to 8). Raises ValueError naming the image."""
    from PIL import Image

    pil = load_pil(img, max_image_pixels)  # checks and decodes: a bad image fails here, not remotely
    data: bytes | None = None
    if isinstance(img, (str, os.PathLike)):
        data = Path(img).read_bytes()
    elif isinstance(img, (bytes, bytearray)):
        data = bytes(img)
    if data is not None:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, frames = im.format, im.mode, getattr(im, "n_frames", 1)
            orientation = im.getexif().get(0x0112, 1)
        if fmt in _SAFE_FORMATS and mode == "RGB" and frames == 1 and orientation == 1:
            return f"data:{_SAFE_FORMATS[fmt]};base64,{base64.b64encode(data).decode()}"
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"


def _asks_for_completion_tokens(e: Any) -> bool:
    """A refusal of `max_tokens` that names `max_completion_tokens` instead (OpenAI's reasoning
    models: "Unsupported parameter: 'max_tokens' ... Use 'max_completion_tokens' instead.")."""
    said = _server_message(e)
    return "max_completion_tokens" in said and "max_tokens" in said.replace("max_completion_tokens", "")


def _server_message(e: Any) -> str:
    return _body_message(getattr(e, "body", None)) or str(getattr(e, "message", e))[:500]


def _body_message(body: Any) -> str | None:
    """The message of an error body: OpenAI's {"error": {"message"}}, vLLM's and SGLang's
    {"object": "error", "message"}, FastAPI's {"detail"}."""
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, Mapping) and err.get("message"):
            return str(err["message"])[:500]
        if isinstance(body.get("detail"), str):
            return body["detail"][:500]
        if isinstance(body.get("message"), str):
            return body["message"][:500]
    return None


def _image_error(role: str, name: str, why: str) -> str:
    # Worded as the in-process engine words it: "image not found: a.png", "source image ...".
    text = why if name in why else f"image {name}: {why}"
    if role == "source":
        text = "source " + text if text.startswith("image") else f"source image {name}: {why}"
    return text

