"""The reward service: any `BaseRewardModel` behind HTTP, for RL trainers and remote benchmarks.

    python main.py serve --config configs/server.yaml

    client --HTTP--> uvicorn event loop: auth, size limit, JSON, images (base64 / allowed paths)
                        |  submit(items) -> Future
                        v
                     MicroBatcher: one scoring thread; concurrent requests share one model call
                        |
                        v
                     the reward model (local judge, multi-GPU pool, ...), loaded in the background

Endpoints (bodies and answers in JSON; errors are `{"detail": message}`):

- GET  /health          200 when ready, 503 while loading; devices, workers alive, queue depth,
                        items scored. Open without the token so supervisors can probe it.
- POST /score           {"items": [ITEM, ...], "request_id": any} -> {"request_id", "results": [...]}
                        one ScoreResult per item, in order (wire forms in `wire.py`; a result the
                        judge returned that JSON cannot carry fails its item, and one with a score
                        beside an error is a failed item with no score: result_form.usable).
- POST /compute_reward  verl's {"data_source", "solution_str", "ground_truth", "extra_info"}, or a
                        list of them -> {"score": float | null, ...} (or a list).
- POST /get_reward      OpenRLHF's {"query", "prompts", "labels"} -> {"rewards", "scores", "extra_logs"}.
- POST /v1/chat/completions, GET /v1/models: OpenAI-compatible (openai_routes.py).

Before anything is scored a request passes `validate.py` (size, body deadline, JSON the answer can
carry back, items and decoded pixels per request): what is refused gets 4xx naming the cause, what
is accepted is answered. There is no /docs, /redoc or /openapi.json: the endpoints read their
bodies by hand (the schema would say nothing), and the wire forms are documented here, in wire.py
and in the README; so nothing but /health answers without the token.

What an RL sample is judged on: `src/rl/items.py`.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from ..models.reward.base import BaseRewardModel
from ..models.reward.errors import JudgeError
from ..models.reward.result_form import usable
from ..models.reward.settings import check_type
from ..models.reward.types import ScoreItem, ScoreResult
from ..rl.items import COMPLETION_AS, SampleError, merge_scored, openrlhf_item, to_score, verl_item
from .batcher import BatcherClosed, MicroBatcher
from .openai_routes import add_openai_routes
from .protocol import header_deadline_protocol
from .validate import check_count, check_pixels, check_sample_item, check_text, read_json
from .wire import WireError, decode_image, decode_score_request, item_name, resolve_allowed_dirs

log = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerSettings:
    """host / port: where to listen (loopback by default; port 0 picks a free one).
    token / token_env: a bearer token required on every endpoint but /health, given directly or
      as the name of an environment variable holding it.
    allowed_dirs: folders whose files may be named by path; any other path is refused (403).
    max_batch: items in one model call (set it to at least devices x batch_size); concurrent
      requests share calls, equally when more items wait than fit. max_wait_ms: how long the first
      request of a call waits for company. max_request_bytes: larger bodies get 413.
    max_items: items (or RL samples) per request; more get 413. max_request_pixels: the decoded
      pixels of all of a request's images, read from their headers; more get 413.
    max_text_chars: an item's instruction (an RL completion judged as text) longer than this is
      refused (422; an RL sample fails alone). Pair it with the model's max_prompt_tokens.
    read_timeout_s: a request's headers, then its body, must each arrive within this; a slow or
      stalled client is disconnected (headers, protocol.py) or answered 408 (body).
    completion_as: what an RL completion is (`instruction` or `image`, see src/rl/items.py).
    failed_reward: the reward /get_reward reports for a sample the judge could not score
      (OpenRLHF needs a number: null reports null, which OpenRLHF cannot take). Always flagged in
      extra_logs.judge_failed.
    access_log: one log line per request (off: RL load makes thousands).
    """

    host: str = "127.0.0.1"
    port: int = 8899
    token: str | None = None
    token_env: str | None = None
    allowed_dirs: list[str] = field(default_factory=list)
    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_request_bytes: int = 64 * 1024 * 1024
    max_items: int = 4096
    max_request_pixels: int = 1 << 28  # 256 images of 1024x1024 (eight of 10000x10000 took 45 s and 5 GB)
    max_text_chars: int = 65536
    read_timeout_s: float = 30.0
    completion_as: str = "instruction"
    failed_reward: float | None = 0.0
    log_level: str = "info"
    access_log: bool = False

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"server.max_batch: must be at least 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ValueError(f"server.max_wait_ms: must be >= 0, got {self.max_wait_ms}")
        for name in ("max_request_bytes", "max_items", "max_request_pixels", "max_text_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"server.{name}: must be at least 1, got {getattr(self, name)}")
        if not self.read_timeout_s > 0:
            raise ValueError(f"server.read_timeout_s: must be > 0, got {self.read_timeout_s}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"server.port: must be 0..65535, got {self.port}")
        if self.completion_as not in COMPLETION_AS:
            raise ValueError(f"server.completion_as: unknown value {self.completion_as!r}; "
                             f"known: {', '.join(COMPLETION_AS)}")
        if self.token is not None and self.token_env is not None:
            raise ValueError("server: give token or token_env, not both")
        if self.token is not None and not self.token:
            raise ValueError("server.token: empty; use null for no token")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> "ServerSettings":
        """From the config's `server:` section; errors name the key and the known keys."""
        import typing

        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                from ..models.reward.config import unknown_key_error
                raise ValueError(str(unknown_key_error("server", str(key), known)))
        clean = {k: check_type(f"server.{k}", v, hints[k]) for k, v in data.items()}
        if isinstance(clean.get("allowed_dirs"), str):
            raise ValueError("server.allowed_dirs: expected a list of folders")
        return cls(**clean)

    def resolved_token(self) -> str | None:
        if self.token_env is None:
            return self.token
        value = os.environ.get(self.token_env)
        if not value:
            raise ValueError(f"server.token_env names {self.token_env}, but that environment variable is "
                             "not set or empty")
        return value


class _Service:
    """The app's state: the model (loading / ready / failed), its batcher and the counters."""

    def __init__(self, model: BaseRewardModel | Callable[[], BaseRewardModel], settings: ServerSettings,
                 on_load_error: Callable[[str], None] | None = None):
        self.settings = settings
        self.token = settings.resolved_token()
        self.allowed = resolve_allowed_dirs(settings.allowed_dirs)
        self.on_load_error = on_load_error
        self.model: BaseRewardModel | None = None
        self.batcher: MicroBatcher | None = None
        self.status = "loading"
        self.error: str | None = None
        self.load_time_s: float | None = None
        self.fingerprint: str | None = None
        self.quantization: str | None = None
        self.quantization_by_worker: dict[str, str] | None = None
        self.started = time.monotonic()
        self.requests = 0
        self._lock = threading.Lock()
        self._loader: threading.Thread | None = None
        if isinstance(model, BaseRewardModel):
            self._factory = None
            self._owns_model = False  # the caller built it and closes it
            self._ready(model, 0.0)
        elif callable(model):
            self._factory = model
            self._owns_model = True
        else:
            raise TypeError(f"create_app needs a BaseRewardModel or a function building one, got {type(model).__name__}")

    def start(self) -> None:
        if self._factory is not None and self._loader is None:
            self._loader = threading.Thread(target=self._load, name="reward-model-loader", daemon=True)
            self._loader.start()

    def _ready(self, model: BaseRewardModel, load_time: float) -> None:
        s = self.settings
        self.model = model
        self.batcher = MicroBatcher(model.score_items, max_batch=s.max_batch, max_wait_s=s.max_wait_ms / 1000.0,
                                    judge=f"the judge ({type(model).__name__})")
        self.load_time_s = load_time
        try:  # read once: a remote model's fingerprint is an HTTP call, too slow for every /health
            self.fingerprint = getattr(model, "fingerprint", None)
            self.quantization = getattr(model, "quantization", None)
            self.quantization_by_worker = getattr(model, "quantization_by_worker", None)  # where they differ
        except Exception:  # informative only
            self.fingerprint = self.quantization = self.quantization_by_worker = None
        self.status = "ready"

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            model = self._factory()  # type: ignore[misc]
        except BaseException as e:
            self.error = f"{type(e).__name__}: {e}"
            self.status = "failed"
            if isinstance(e, JudgeError):  # its message names the device, PID and fix: no traceback
                log.error("the reward model failed to load: %s", e)
            else:
                log.error("the reward model failed to load:\n%s", traceback.format_exc())
            if self.on_load_error is not None:
                self.on_load_error(self.error)
            return
        with self._lock:
            if self.status == "closed":  # shut down while loading: nobody will use it
                model.close()
                return
            self._ready(model, time.perf_counter() - t0)
        print(f"reward service: model ready in {self.load_time_s:.1f}s", flush=True)

    def close(self) -> None:
        with self._lock:
            previous, self.status = self.status, "closed"
        if self.batcher is not None:
            self.batcher.close()
        if self.model is not None and self._owns_model and previous != "closed":
            self.model.close()
        if self._loader is not None:
            self._loader.join(timeout=1.0)

    def health(self) -> dict[str, Any]:
        b = self.batcher
        info: dict[str, Any] = {
            "status": self.status, "ready": self.status == "ready", "error": self.error,
            "model": type(self.model).__name__ if self.model is not None else None,
            "devices": [], "workers": None, "workers_alive": None,
            "queue_depth": b.queue_depth if b else 0, "in_flight": b.in_flight if b else 0,
            "items_scored": b.items_scored if b else 0, "requests_scored": b.requests_done if b else 0,
            "batches": b.batches if b else 0, "requests": self.requests,
            "max_batch": self.settings.max_batch, "max_wait_ms": self.settings.max_wait_ms,
            "load_time_s": self.load_time_s, "uptime_s": round(time.monotonic() - self.started, 3),
            "fingerprint": self.fingerprint, "quantization": self.quantization,
        }
        if self.quantization_by_worker:
            info["quantization_by_worker"] = self.quantization_by_worker
        if self.model is not None:
            info.update(_describe_model(self.model))
        return info

    def check_ready(self) -> None:
        if self.status == "loading":
            raise HTTPException(503, "the reward model is still loading; retry shortly (GET /health says when it is ready)",
                                headers={"Retry-After": "5"})
        if self.status == "failed":
            raise HTTPException(500, f"the reward model failed to load: {self.error}")
        if self.status == "closed":
            raise HTTPException(503, "the reward service is shutting down")

    async def score(self, items: Sequence[ScoreItem], request: Request | None = None) -> list[ScoreResult]:
        """The items' results from the batcher. When `request`'s client disconnects first (a
        timeout, a Ctrl-C), its items leave the queue instead of being scored for nobody."""
        assert self.batcher is not None
        try:
            fut = self.batcher.submit(items)
        except BatcherClosed as e:
            raise HTTPException(503, str(e)) from None
        scored = asyncio.wrap_future(fut)
        gone = asyncio.ensure_future(_disconnected(request)) if request is not None else None
        try:
            await asyncio.wait([scored] if gone is None else [scored, gone], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this handler cancelled (shutdown): nobody waits for the items
            self.batcher.cancel(fut)
            raise
        finally:
            if gone is not None:
                gone.cancel()
        if not scored.done():
            self.batcher.cancel(fut)
            raise HTTPException(499, "the client closed the connection before its answer")
        try:
            results = scored.result()
        except BatcherClosed as e:
            raise HTTPException(503, str(e)) from None
        except Exception as e:  # the model itself failed (not one item: those are results)
            raise HTTPException(500, f"the reward model failed: {type(e).__name__}: {e}") from None
        return usable(results, items, f"the judge ({type(self.model).__name__})", "the service",
                      "the service cannot send", "not sent")

    async def score_prepared(self, prepared: list[ScoreItem | ScoreResult],
                             request: Request | None = None) -> list[ScoreResult]:
        """Score the items among `prepared`; entries that are already results (samples that
        could not become items) keep their place."""
        todo = to_score(prepared)
        return merge_scored(prepared, await self.score(todo, request) if todo else [])


async def _disconnected(request: Request) -> None:
    """Returns when the client of `request`, whose body has been read, disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _describe_model(model: BaseRewardModel) -> dict[str, Any]:
    """Devices and workers of the hosted model, read from the implementations' public parts."""
    info: dict[str, Any] = {}
    pool = getattr(model, "pool", None)
    if pool is not None and hasattr(pool, "specs"):
        info["devices"] = [s.device_label for s in pool.specs]
        if hasattr(pool, "health"):  # counts, and the workers that died between calls
            info.update(pool.health())
        else:
            workers = list(getattr(pool, "workers", []))
            info["workers"] = len(workers)
            info["workers_alive"] = sum(1 for w in workers if w is not None and w.alive())
    elif getattr(model, "device", None) is not None:
        info["devices"] = [str(model.device)]
    return info


# -- request helpers ----------------------------------------------------------------------

def _wire_http(e: WireError) -> Exception:
    return HTTPException(e.status, e.message)


def _decode_sample_images(item: ScoreItem, allowed: Sequence[Any], where: str, from_completion: bool) -> ScoreItem:
    """Check and decode the image references of an RL sample. Images the trainer's data supplied
    are checked like /score's (a refused path refuses the request); an image the policy named in
    its completion is untrusted output, so its problems fail only that sample."""
    def conv(values: list[Any], role: str, completion_role: bool) -> list[Any]:
        out = []
        for k, v in enumerate(values):
            if not isinstance(v, (str, Mapping)):
                raise WireError(422, f"{where}: {role}[{k}] must be a path, data URL or base64 string")
            try:
                out.append(decode_image(v, allowed, f"{where}: {role}[{k}]"))
            except WireError as e:
                if completion_role:  # the caller prefixes `where` to a sample's error
                    raise SampleError(e.message.removeprefix(f"{where}: ")) from None
                raise
        return out

    return dataclasses.replace(item, images=conv(item.images, "image", from_completion),
                               source_images=conv(item.source_images, "source_image", False))


def _failure(index: int, item: ScoreItem | None, message: str) -> ScoreResult:
    return ScoreResult.failure(index, item, message, "input")


def _verl_answer(r: ScoreResult) -> dict[str, Any]:
    return {"score": r.score, "sub_scores": r.sub_scores, "error": r.error, "error_kind": r.error_kind,
            "id": r.id, "raw": r.raw}


_VERL_KEYS = ("data_source", "solution_str", "ground_truth", "extra_info")


def create_app(model: BaseRewardModel | Callable[[], BaseRewardModel],
               settings: ServerSettings | Mapping[str, Any] | None = None,
               on_load_error: Callable[[str], None] | None = None):
    """The FastAPI app serving `model`: a built reward model (the caller closes it), or a function
    that builds one (called in the background at startup; the app closes it at shutdown)."""
    if settings is None:
        settings = ServerSettings()
    elif not isinstance(settings, ServerSettings):
        settings = ServerSettings.from_mapping(settings)
    service = _Service(model, settings, on_load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.close)

    app = FastAPI(title="reward service", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.reward = service

    def authorize(request: Request) -> None:
        service.requests += 1
        if service.token is None:
            return
        scheme, _, cred = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not cred.strip():
            raise HTTPException(401, "missing bearer token: send the header 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(cred.strip().encode(), service.token.encode()):
            raise HTTPException(401, "wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def begin(request: Request) -> Any:
        authorize(request)
        service.check_ready()
        return await read_json(request, settings.max_request_bytes, settings.read_timeout_s)

    def decode_score(body: Any) -> tuple[list[ScoreItem], Any]:
        if isinstance(body, Mapping) and isinstance(body.get("items"), list):
            check_count(len(body["items"]), settings.max_items)
        items, request_id = decode_score_request(body, service.allowed)
        for i, item in enumerate(items):
            check_text(item, item_name(i, item.id), settings.max_text_chars)
        check_pixels(items, settings.max_request_pixels)
        return items, request_id

    def check_prepared(prepared: list[ScoreItem | ScoreResult]) -> list[ScoreItem | ScoreResult]:
        check_pixels([p for p in prepared if isinstance(p, ScoreItem)], settings.max_request_pixels)
        return prepared

    add_openai_routes(app, service, begin, authorize)  # /v1/chat/completions, /v1/models

    @app.get("/health")
    async def health() -> JSONResponse:
        info = service.health()
        return JSONResponse(info, status_code=200 if info["ready"] else 503)

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        body = await begin(request)
        try:
            items, request_id = await asyncio.to_thread(decode_score, body)
        except WireError as e:
            raise _wire_http(e) from None
        results = await service.score(items, request)
        return JSONResponse({"request_id": request_id, "results": [r.to_dict() for r in results]})

    def prepare_verl(bodies: list[Any], single: bool) -> list[ScoreItem | ScoreResult]:
        check_count(len(bodies), settings.max_items, "samples")
        prepared: list[ScoreItem | ScoreResult] = []
        for i, b in enumerate(bodies):
            try:
                prepared.append(prepare_verl_sample(i, b))
            except WireError as e:
                # In a list (an RL batch) a malformed sample or a refused path fails that sample
                # alone: a trainer cannot use an answer that drops the whole batch. A single sample
                # keeps the HTTP status (403 for a path outside the folders: a configuration problem).
                if single:
                    raise
                prepared.append(_failure(i, None, e.message))
        return check_prepared(prepared)

    def prepare_verl_sample(i: int, b: Any) -> ScoreItem | ScoreResult:
        where = f"sample {i}"
        if not isinstance(b, Mapping):
            raise WireError(422, f"{where}: expected an object with 'solution_str', got {type(b).__name__}")
        unknown = set(b) - set(_VERL_KEYS)
        if unknown:
            raise WireError(422, f"{where}: unknown key(s) {sorted(unknown)}; known: {', '.join(_VERL_KEYS)}")
        if not isinstance(b.get("solution_str"), str):
            raise WireError(422, f"{where}: 'solution_str' must be a string")
        extra = b.get("extra_info")
        if extra is not None and not isinstance(extra, Mapping):
            raise WireError(422, f"{where}: 'extra_info' must be an object or null")
        mode = (extra or {}).get("completion_as") or settings.completion_as
        try:
            item = verl_item(b["solution_str"], b.get("ground_truth"), extra, settings.completion_as,
                             b.get("data_source"))
            item = check_sample_item(item, where, settings.max_text_chars)
            return _decode_sample_images(item, service.allowed, where, mode == "image")
        except SampleError as e:
            return _failure(i, None, f"{where}: {e}")
        except ValueError as e:  # an unknown completion_as in extra_info
            if isinstance(e, WireError):
                raise
            raise WireError(422, f"{where}: {e}") from None

    @app.post("/compute_reward")
    async def compute_reward(request: Request) -> JSONResponse:
        body = await begin(request)
        single = isinstance(body, Mapping)
        bodies = [body] if single else body
        if not isinstance(bodies, list):
            raise HTTPException(422, "the body must be a verl reward object or a list of them")
        try:
            prepared = await asyncio.to_thread(prepare_verl, bodies, single)
        except WireError as e:
            raise _wire_http(e) from None
        answers = [_verl_answer(r) for r in await service.score_prepared(prepared, request)]
        return JSONResponse(answers[0] if single else answers)

    def prepare_openrlhf(body: Any) -> list[ScoreItem | ScoreResult]:
        if not isinstance(body, Mapping):
            raise WireError(422, "the body must be an object {\"query\": [...], \"prompts\": [...], \"labels\": [...]}")
        unknown = set(body) - {"query", "prompts", "labels"}
        if unknown:
            raise WireError(422, f"unknown key(s) {sorted(unknown)}; known: query, prompts, labels")
        queries = body.get("query")
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise WireError(422, "'query' must be a list of strings (prompt + response)")
        n = len(queries)
        check_count(n, settings.max_items, "samples")
        prompts = body.get("prompts")
        labels = body.get("labels")
        for key, seq in (("prompts", prompts), ("labels", labels)):
            if seq is not None and (not isinstance(seq, list) or len(seq) != n):
                raise WireError(422, f"'{key}' must be a list of {n} entries, one per query")
        prepared: list[ScoreItem | ScoreResult] = []
        for i, q in enumerate(queries):
            where = f"sample {i}"
            try:
                try:
                    item = openrlhf_item(q, prompts[i] if prompts else None, labels[i] if labels else None,
                                         settings.completion_as)
                except (RecursionError, ValueError) as e:  # a JSON label nested too deep, or a huge number
                    if isinstance(e, SampleError):
                        raise
                    raise WireError(422, f"{where}: the label's JSON cannot be read (nested too deeply, or a "
                                         f"number too long: {type(e).__name__})") from None
                item = check_sample_item(item, where, settings.max_text_chars)
                prepared.append(_decode_sample_images(item, service.allowed, where,
                                                      settings.completion_as == "image"))
            except SampleError as e:
                prepared.append(_failure(i, None, f"{where}: {e}"))
            except WireError as e:
                # Unlike /score and /compute_reward, a refused path (403) fails its sample alone here:
                # OpenRLHF sends one sample per request and turns any 4xx into a missing reward,
                # which its trainer cannot take.
                prepared.append(_failure(i, None, e.message if e.message.startswith(where) else f"{where}: {e.message}"))
        return check_prepared(prepared)

    @app.post("/get_reward")
    async def get_reward(request: Request) -> JSONResponse:
        body = await begin(request)
        try:
            prepared = await asyncio.to_thread(prepare_openrlhf, body)
        except WireError as e:
            raise _wire_http(e) from None
        results = await service.score_prepared(prepared, request)
        fallback = settings.failed_reward
        rewards = [r.score if r.score is not None else fallback for r in results]
        answer = {"rewards": rewards, "scores": rewards,
                  "extra_logs": {"judge_failed": [0.0 if r.score is not None else 1.0 for r in results]},
                  "judge_scores": [r.score for r in results], "errors": [r.error for r in results]}
        if request.query_params.get("extra_logs") == "0":
            # OpenRLHF 0.8 concatenates extra_logs as tensors, which JSON cannot carry: its users
            # point it at /get_reward?extra_logs=0 (the failures stay in judge_scores / errors).
            del answer["extra_logs"]
        return JSONResponse(answer)

    return app


def serve_from_config(cfg: Mapping[str, Any], base: str | os.PathLike | None = None) -> int:
    """`python main.py serve`: build the app from a config's `model:` and `server:` sections and
    serve until SIGINT/SIGTERM. Config errors raise ConfigError at once; the model loads in the
    background. Relative `server.allowed_dirs` are read from `base` (default: the current folder).
    Returns 0 after a clean shutdown, 1 when the model failed to load."""
    from ..models.reward.config import ConfigError, model_param_paths, resolve_spec, unknown_key_error

    for key in cfg:
        if key == "job":
            raise ConfigError("serve: config: a 'job' section is for a scoring job: run it with "
                              "`main.py run --config ...` (or `main.py --config ...`); a service config has the keys "
                              "model, server")
        if key not in ("model", "server"):
            elsewhere = {**{f.name: f"server.{f.name}" for f in dataclasses.fields(ServerSettings)},
                         **model_param_paths(cfg.get("model"))}
            raise unknown_key_error("serve: config", str(key), ["model", "server"], elsewhere)
    if "model" not in cfg:
        raise ConfigError("serve: the config needs a 'model' section (class_path and params)")
    try:
        settings = ServerSettings.from_mapping(cfg.get("server"))
        settings.resolved_token()
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if base is not None:
        settings = dataclasses.replace(settings, allowed_dirs=[
            d if os.path.isabs(os.path.expanduser(d)) else os.path.join(os.fspath(base), d)
            for d in settings.allowed_dirs])
    class_path, cls, params = resolve_spec(cfg["model"])  # errors now, not after a load

    def build() -> BaseRewardModel:
        try:
            return cls(**params)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"Problem with class_path '{class_path}': {e}") from None

    for folder in settings.allowed_dirs:
        if not os.path.isdir(os.path.expanduser(folder)):
            print(f"warning: server.allowed_dirs names {folder!r}, which is not a folder here", file=sys.stderr, flush=True)
    if settings.host not in _LOOPBACK and settings.token is None and settings.token_env is None:
        print(f"warning: serving on {settings.host} without a token: anyone who can reach this port can "
              "use the judge and make it read files in server.allowed_dirs", file=sys.stderr, flush=True)
    try:
        info = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as e:
        raise ConfigError(f"server: cannot listen on {settings.host}:{settings.port}: {e}") from None
    host, port = sock.getsockname()[:2]

    failed: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_error(message: str) -> None:
        failed.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(build, settings, on_load_error=on_load_error)
    config = uvicorn.Config(app, log_level=settings.log_level, access_log=settings.access_log,
                            timeout_graceful_shutdown=30, http=header_deadline_protocol(settings.read_timeout_s))
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in str(host) else host
    print(f"reward service: listening on http://{shown}:{port} ({class_path} loading in the background; "
          "GET /health says when it is ready)", flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler it
    # found; with this one in place the re-raised signal ends the run instead of the process, so
    # a stop by a supervisor or Ctrl-C exits 0 after the model (and any workers) are closed.
    stopped_by: list[int] = []
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: stopped_by.append(signum))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped_by:
        print(f"reward service: stopped by {signal.Signals(stopped_by[0]).name}", flush=True)
    if failed:
        print(f"error: the reward model failed to load: {failed[0]}", file=sys.stderr, flush=True)
        return 1
    return 0
