"""A judge running elsewhere, behind the reward service (`python main.py serve`).

A benchmark or trainer switches between a local judge and a shared service by `class_path` alone:

    model:
      class_path: remote
      params: {url: "http://127.0.0.1:8899", token_env: REWARD_SERVICE_TOKEN}
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
import weakref
from typing import Any, Iterator, Sequence

import httpcore
import httpx

from ..base import BaseRewardModel
from ..errors import JudgeConfigError, JudgeUnavailable
from ..scheduler import unsendable
from ..types import ScoreItem, ScoreResult, item_name, renumber
from ..wire import backoff, encode_item, item_name as wire_name, retry_after, send_halving

_RETRY_STATUS = (500, 502, 503, 504)
_MAX_BACKOFF_S = 30.0  # the longest wait between two attempts, Retry-After included
# Refusals one item can cause (a path outside the allowed folders, a malformed image, text over
# the limit, an item over the size limits): the request is split until the item stands alone.
_ITEM_REFUSALS = (403, 413, 422)
_CLOSED_DURING_CALL = "RemoteRewardModel was closed during the call"


class RemoteServiceError(JudgeUnavailable):
    """The service refused a request (4xx), or stayed unreachable / failing after the retries.
    `status` is the last HTTP status (None when no answer came)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RemoteRewardModel(BaseRewardModel):
    """Score items on a reward service over HTTP.

    url: the service's base URL.
    token / token_env: the bearer token, or the environment variable holding it.
    timeout_s: per request (connecting and reading); a large batch on a busy service needs minutes.
    max_retries: extra attempts after a connection error or a 5xx answer (the service loading,
      restarting, or a failing model), waiting backoff_s, 2x, 4x, ... (capped at 30 s, with jitter),
      or what the answer's Retry-After asks (the service says 5 s while its model loads). The
      defaults wait about 90 s in all: a trainer's reward call rides out a service restarting.
    batch_size: items per request. A request the service refuses for what one item can cause (a
      path outside its folders, 403; over its size limits, 413; a malformed item, 422) is split
      in halves until the refused item stands alone: that item fails with the service's reason,
      the others are scored. An item JSON cannot carry (NaN, a numpy value in metadata) fails here.
    send_paths: send path images as paths (the service must reach them inside its allowed
      folders) instead of reading them here and sending base64.
    wait_ready_s: at construction, wait up to this long for the service to report ready
      (a trainer started together with the service); 0 checks nothing.
    """

    def __init__(self, url: str = "http://127.0.0.1:8899", token: str | None = None,
                 token_env: str | None = "REWARD_SERVICE_TOKEN", timeout_s: float = 600.0,
                 max_retries: int = 8, backoff_s: float = 0.5, batch_size: int = 64, send_paths: bool = False,
                 wait_ready_s: float = 0.0):
        if batch_size < 1:
            raise JudgeConfigError(f"batch_size: must be at least 1, got {batch_size}")
        if max_retries < 0:
            raise JudgeConfigError(f"max_retries: must be >= 0, got {max_retries}")
        if not url.startswith(("http://", "https://")):
            raise JudgeConfigError(f"url: expected http://host:port or https://..., got {url!r}")
        self.url = url.rstrip("/")
        if token is None and token_env:
            token = os.environ.get(token_env) or None
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.batch_size = batch_size
        self.send_paths = send_paths
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # The connections' sockets, kept so that close() can wake a call waiting on one.
        self._sockets = _Sockets()
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s,
                                    transport=_SocketsTransport(self._sockets))
        self._closed = False
        self._busy = 0  # requests in flight (close() must not free their sockets under them)
        self._busy_lock = threading.Lock()
        if wait_ready_s > 0:
            self.wait_ready(wait_ready_s)

    # -- plumbing ---------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One JSON request with retries (`body`: a JSON value, or JSON already encoded as bytes);
        returns the decoded answer. Raises RemoteServiceError with the service's own message for
        a 4xx, or after the last retry."""
        with self._in_flight():
            return self._request(method, path, body)

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        """Around each use of the HTTP client: refused once closed; the last request in flight
        when close() came closes the client on its way out (close() only woke it)."""
        with self._busy_lock:
            if self._closed:
                raise JudgeUnavailable("RemoteRewardModel is closed")
            self._busy += 1
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy -= 1
                last = self._closed and not self._busy
            if last:
                self._client.close()

    def _request(self, method: str, path: str, body: Any) -> Any:
        last = ""
        status: int | None = None
        wait: float | None = None  # what the service's last answer asked for (Retry-After)
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = backoff(attempt, self.backoff_s, _MAX_BACKOFF_S)
                time.sleep(min(wait, _MAX_BACKOFF_S) if wait is not None else delay)
                wait = None
            if self._closed:  # close() in another thread, during this call
                raise JudgeUnavailable(_CLOSED_DURING_CALL)
            try:
                if isinstance(body, bytes):
                    resp = self._client.request(method, path, content=body,
                                                headers={"Content-Type": "application/json"})
                else:
                    resp = self._client.request(method, path, json=body)
            except httpx.TransportError as e:  # refused, reset, timed out: the service may be restarting
                if self._closed:  # or close() shut the connection down under this request
                    raise JudgeUnavailable(_CLOSED_DURING_CALL) from None
                last, status = f"{type(e).__name__}: {e}", None
                continue
            status = resp.status_code
            if status < 400:
                try:
                    return resp.json()
                except ValueError:  # a proxy's page, or something else that is not this service
                    raise RemoteServiceError(f"{method} {self.url}{path}: HTTP {status} with a body that is not JSON "
                                             f"({resp.headers.get('content-type', 'no content type')}: "
                                             f"{resp.text[:200]!r}); is {self.url} the reward service?",
                                             status) from None
            detail = _detail(resp)
            if status in _RETRY_STATUS:
                last, wait = f"HTTP {status}: {detail}", retry_after(resp.headers)
                continue
            raise RemoteServiceError(f"{method} {self.url}{path}: HTTP {status}: {detail}", status)
        raise RemoteServiceError(f"{method} {self.url}{path}: no success after {self.max_retries + 1} attempt(s); "
                                 f"last: {last}", status)

    def health(self) -> dict[str, Any]:
        """The service's /health answer (ready or not), without retries."""
        try:
            with self._in_flight():
                resp = self._client.get("/health", timeout=min(self.timeout_s, 10.0))
        except httpx.TransportError as e:
            return {"status": "unreachable", "ready": False, "error": f"{type(e).__name__}: {e}"}
        try:
            return resp.json()
        except ValueError:
            return {"status": f"HTTP {resp.status_code}", "ready": False, "error": resp.text[:300]}

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Poll /health until the service is ready; RemoteServiceError after `timeout_s` or when the
        model failed to load."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.health()
            if info.get("ready"):
                return info
            if info.get("status") == "failed":
                raise RemoteServiceError(f"{self.url}: the service's model failed to load: {info.get('error')}")
            if time.monotonic() >= deadline:
                raise RemoteServiceError(f"{self.url}: not ready after {timeout_s:.0f}s "
                                         f"(status {info.get('status')!r}: {info.get('error') or 'loading'})")
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))

    # -- scoring ----------------------------------------------------------------------------

    def score_items(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        items = list(items)
        results: list[ScoreResult | None] = [None] * len(items)
        wire: list[tuple[int, str]] = []  # (position, the item's JSON)
        for i, item in enumerate(items):
            try:
                encoded = encode_item(item, self.send_paths)
            except ValueError as e:  # an image this side cannot read fails that item alone
                results[i] = ScoreResult.failure(i, item, f"item {item_name(item, i)}: {e}", "image")
                continue
            try:
                wire.append((i, _as_json(encoded)))
            except (TypeError, ValueError) as e:  # a value JSON cannot carry fails that item alone
                why = unsendable(item, e, _as_json, "the service as JSON",
                                 "give plain JSON values (finite numbers, strings, lists, objects)")
                results[i] = ScoreResult.failure(i, item, f"item {item_name(item, i)}: {why}", "input")
        refused = lambda e: isinstance(e, RemoteServiceError) and e.status in _ITEM_REFUSALS  # noqa: E731
        for start in range(0, len(wire), self.batch_size):
            chunk = wire[start:start + self.batch_size]
            # A refused request is split in halves until the refused item stands alone: one item
            # never costs the others their score; the lone refused item keeps the refusal.
            answers = send_halving(chunk, self._send, refused, lambda e: [e])
            for (i, _), r in zip(chunk, answers):
                results[i] = (self._refusal(items[i], i, r) if isinstance(r, RemoteServiceError)
                              else renumber(r, items[i], i))
        missing = [i for i, r in enumerate(results) if r is None]
        assert not missing, f"remote scoring lost items {missing}"  # by construction
        return results  # type: ignore[return-value]

    def _send(self, chunk: Sequence[tuple[int, str]]) -> list[ScoreResult]:
        """One /score request: a result per item of `chunk`, in order."""
        request_id = uuid.uuid4().hex
        body = '{"items": [' + ", ".join(w for _, w in chunk) + '], "request_id": "' + request_id + '"}'
        answer = self.request("POST", "/score", body.encode())
        got = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(got, list) or len(got) != len(chunk) or answer.get("request_id") != request_id:
            raise RemoteServiceError(f"{self.url}/score answered a request of {len(chunk)} items with "
                                     f"{len(got) if isinstance(got, list) else 'no'} results (or another request's id)")
        return [ScoreResult.from_dict(d) for d in got]

    @staticmethod
    def _refusal(item: ScoreItem, index: int, e: RemoteServiceError) -> ScoreResult:
        """The failure of an item the service refused alone, named as the caller numbers it (the
        service's message names it as item 0 of a one-item request)."""
        detail = str(e).split(f"HTTP {e.status}: ", 1)[-1].removeprefix(f"{wire_name(0, item.id)}: ")
        return ScoreResult.failure(index, item, f"item {item_name(item, index)}: refused by the service "
                                                f"(HTTP {e.status}): {detail}", "input")

    @property
    def fingerprint(self) -> str | None:
        return self.health().get("fingerprint")

    @property
    def quantization(self) -> str | None:
        """How the served judge loaded its weights, as the service's /health reports it."""
        return self.health().get("quantization")

    @property
    def quantization_by_worker(self) -> dict[str, str] | None:
        """Where the served judge's workers loaded the weights differently, each one's (its /health)."""
        return self.health().get("quantization_by_worker")

    def close(self) -> None:
        """Close the client; a call in another thread ends with JudgeUnavailable. A request in
        flight is woken by shutting its socket down, not by closing it: a closed socket's number
        can be taken by the next socket the process opens, and the waiting request would then
        wait on that one, up to timeout_s (its client is closed once it is out)."""
        with self._busy_lock:
            if self._closed:
                return
            self._closed = True
            busy = self._busy
        if busy:
            self._sockets.shut_down()
        else:
            self._client.close()


class _SocketsTransport(httpx.BaseTransport):
    """httpx's own transport (httpx.HTTPTransport, with its defaults: HTTP/1.1, TLS verified
    against certifi's roots or SSL_CERT_FILE, 100 connections, up to 20 idle ones kept for 5 s),
    over an httpcore connection pool whose network backend is `sockets`. HTTPTransport gives no
    way to pass a backend; this is its request and response mapping, with httpcore's errors raised
    as httpx's (a TransportError for the client's retries)."""

    def __init__(self, sockets: "_Sockets") -> None:
        self._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(), max_connections=100,
                                             max_keepalive_connections=20, keepalive_expiry=5.0,
                                             network_backend=sockets)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port,
                           target=request.url.raw_path)
        # request.extensions carries the client's timeouts (connect, read, write, pool).
        req = httpcore.Request(method=request.method, url=url, headers=request.headers.raw, content=request.stream,
                               extensions=request.extensions)
        with _httpx_errors():
            resp = self._pool.handle_request(req)
        return httpx.Response(status_code=resp.status, headers=resp.headers, stream=_ResponseStream(resp.stream),
                              extensions=resp.extensions)

    def close(self) -> None:
        self._pool.close()


class _ResponseStream(httpx.SyncByteStream):
    """A response body read from httpcore, its errors raised as httpx's."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _httpx_errors():
            yield from self._stream

    def close(self) -> None:
        if hasattr(self._stream, "close"):
            self._stream.close()


# httpcore's errors and httpx's of the same name; an error is raised as its most specific one.
_HTTPX_ERRORS = {getattr(httpcore, name): getattr(httpx, name) for name in (
    "TimeoutException", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "NetworkError",
    "ConnectError", "ReadError", "WriteError", "ProxyError", "UnsupportedProtocol", "ProtocolError",
    "LocalProtocolError", "RemoteProtocolError")}


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    try:
        yield
    except tuple(_HTTPX_ERRORS) as e:
        mapped = next(_HTTPX_ERRORS[cls] for cls in type(e).__mro__ if cls in _HTTPX_ERRORS)
        raise mapped(str(e)) from e


class _Sockets:
    """httpcore's synchronous network backend, keeping (weakly) the sockets it opens, so that
    close() can shut them down under a request waiting on one."""

    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()
        self._socks: "weakref.WeakSet[socket.socket]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._shut = False

    def connect_tcp(self, *args: Any, **kwargs: Any) -> Any:
        return self._keep(self._backend.connect_tcp(*args, **kwargs))

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> Any:
        return self._keep(self._backend.connect_unix_socket(*args, **kwargs))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)

    def _keep(self, stream: Any) -> Any:
        sock = stream.get_extra_info("socket")
        with self._lock:
            if sock is not None:
                self._socks.add(sock)
            shut = self._shut
        if shut:  # opened by a request that was already under way when close() came
            _shut_down(sock)
        return stream

    def shut_down(self) -> None:
        with self._lock:
            self._shut = True
            socks = list(self._socks)
        for sock in socks:
            _shut_down(sock)


def _shut_down(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # a recv waiting on it returns at once; the number stays taken
    except OSError:  # already closed, or never connected
        pass


def _detail(resp: Any) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])
    return str(data)[:500]


def _as_json(value: Any) -> str:
    """JSON as the service reads it: NaN and infinity are no JSON values."""
    return json.dumps(value, allow_nan=False)
