"""The judge as a verl custom reward function, calling the reward service.

verl 0.7 and later (reward loop; the README shows the full command line):

    reward.custom_reward_function.path=/path/to/repo/src/rl/verl_reward.py
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.url=http://127.0.0.1:8899
    reward.reward_manager.name=naive          # or rate_limited, remote

verl 0.6 and earlier: `custom_reward_function.path/name/reward_kwargs` at the top level, with
`reward_model.reward_manager=naive` (name=compute_score) or `=batch` (name=compute_score_batch).

Each sample's `extra_info` carries its images: `image` / `images` (the image under judgement)
and `source_image` / `source_images` (before an edit), as paths, data URLs, or base64; optional
`instruction`, `completion_as`, `reward_url`. What the response is judged on: `src/rl/items.py`.
Paths are read here and sent as base64 unless `send_paths` (then the service reads them inside
its allowed folders).

Settings, first found wins: the keyword argument (verl's reward_kwargs), `extra_info`
(`reward_url` only), then the environment: REWARD_SERVICE_URL (default http://127.0.0.1:8899),
REWARD_SERVICE_TOKEN, REWARD_SERVICE_FAILED_REWARD (default 0.0), REWARD_SERVICE_SEND_PATHS (1/0),
REWARD_SERVICE_TIMEOUT_S (default 240: the time a request has, retries included). An unknown
keyword (a misspelled reward_kwargs key) is a TypeError.

Each call returns `{"score": float, "judge_failed": 0.0 | 1.0}` per sample. verl needs a number
for every sample, so a sample that could not be judged gets `failed_reward` and
`judge_failed=1.0` (verl keeps it in the reward's extra info: its mean is a validation metric,
and rollout dumps carry it per sample); the reason is logged here, naming the sample by its
place in the call and its `extra_info` index. That
covers a bad or missing image, an empty completion, a sample the service refuses (a path outside
its folders: the others in the request are still judged), and a service that stays unreachable or
failing through the retries. Only a rejected token raises: it is a configuration error that
would fail every sample of the run.

verl's environment needs this project installed (`pip install -e /path/to/repo --no-deps`). The
HTTP client is the standard library's (verl installs none this could assume), and there is no
module state: verl's `remote` manager pickles these functions into Ray workers.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Sequence

try:  # verl loads this file by path: the project must be importable in verl's environment
    import src.models.reward.wire  # noqa: F401
except ImportError as e:
    raise ImportError(f"{__file__}: cannot import this project's package ({e}); install it into verl's "
                      f"environment: pip install -e {Path(__file__).resolve().parents[2]} --no-deps") from e

log = logging.getLogger("src.rl.verl_reward")

DEFAULT_URL = "http://127.0.0.1:8899"
# The time one request has, retries included: under verl's rate_limited manager's own timeout
# (`reward.timeout`, 300 s by default), after which verl gives the sample up (see _post_json).
DEFAULT_TIMEOUT_S = 240.0
IMAGE_KEYS = ("image", "images", "source_image", "source_images")
_EXTRA_KEYS = IMAGE_KEYS + ("instruction", "completion_as", "id", "uid", "index")
_RETRY_STATUS = (500, 502, 503, 504)
_SAMPLE_PREFIX = re.compile(r"^sample \d+: ")


class RewardServiceAuthError(RuntimeError):
    """The service rejected the token (HTTP 401): a configuration error, raised into the trainer."""


def _encode_image(value: Any, send_paths: bool) -> str:
    # Imported here, not at module level: in a Ray worker (verl's remote manager) this function
    # arrives pickled by value, and the import must run there.
    from src.models.reward.wire import encode_image

    return encode_image(value, send_paths)


def _jsonable(value: Any) -> Any:
    """verl hands numpy scalars and arrays; JSON wants plain values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy array or scalar
        return _jsonable(value.tolist())
    return value


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _body(data_source: Any, solution_str: Any, ground_truth: Any, extra_info: Any, send_paths: bool) -> str:
    """One sample as the JSON text of a /compute_reward body; _SampleError when it cannot be."""
    if extra_info is not None and not isinstance(extra_info, Mapping):
        raise _SampleError(f"extra_info must be a dict, got {type(extra_info).__name__}")
    # Only what the service reads (src/rl/items.py: verl_item): the rest of extra_info (verl adds
    # its own fields, datasets theirs) is not the judge's business, and may not even be JSON.
    extra = {k: v for k, v in (extra_info or {}).items() if k in _EXTRA_KEYS}
    if not isinstance(ground_truth, str):  # only a text ground truth is read (as an instruction)
        ground_truth = None
    for key in IMAGE_KEYS:
        if extra.get(key) is None:
            continue
        value = extra[key]
        many = isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and not hasattr(value, "save")
                                                    and not isinstance(value, (str, bytes))
                                                    and getattr(value, "ndim", 1) > 0)  # a numpy scalar is one value
        # An image this side cannot read (missing file, unknown type) fails this sample here,
        # with the reason: _SampleError.
        try:
            values = list(value) if many else [value]
            encoded = [_encode_image(v, send_paths) for v in values]
        except (ValueError, TypeError, OSError) as e:
            raise _SampleError(f"{key}: {e}") from None
        extra[key] = encoded if many else encoded[0]
    if data_source is not None and not isinstance(data_source, (str, int, float, bool)):
        data_source = str(_jsonable(data_source))
    body = _jsonable({"data_source": data_source, "solution_str": solution_str, "ground_truth": ground_truth,
                      "extra_info": extra})
    try:
        return json.dumps(body, allow_nan=False)
    except (TypeError, ValueError) as e:  # an object JSON cannot carry, or a NaN
        raise _SampleError(f"the sample cannot be sent as JSON: {e}") from None


class _SampleError(ValueError):
    """A sample this side cannot send (an image it cannot read, a value JSON cannot carry)."""


class _Refused(Exception):
    """A 4xx answer other than 401: the request (or one of its samples) is refused."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _post_json(url: str, data: bytes, token: str | None, timeout_s: float, max_retries: int) -> Any:
    """POST one JSON request with retries on connection errors and 5xx, all within `timeout_s`
    (verl's rate_limited manager gives a sample up after its own `reward.timeout`, with a result
    its reward loop cannot join to the others: the hook must answer first). Returns the decoded
    answer; raises _Refused (4xx), RewardServiceAuthError (401), or ConnectionError (unreachable
    or failing after the retries, or no answer in time)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    # The service is reached directly, never through an HTTP proxy named in the environment. (Built
    # per call, not kept in the module: see the module docstring on pickling.)
    from src.models.reward.wire import backoff  # here: see _encode_image

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    last = ""
    deadline = time.monotonic() + timeout_s
    attempts = 0
    for attempt in range(max_retries + 1):
        if attempt:
            pause = backoff(attempt, 0.5, 30.0)
            if time.monotonic() + pause >= deadline:
                break
            time.sleep(pause)
        left = deadline - time.monotonic()
        if left <= 0:
            break
        attempts += 1
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with opener.open(req, timeout=left) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = _detail(e)
            if e.code == 401:
                raise RewardServiceAuthError(f"POST {url}: HTTP 401: {detail} (check the token: reward_kwargs "
                                             "token or REWARD_SERVICE_TOKEN)") from None
            if e.code in _RETRY_STATUS:
                last = f"HTTP {e.code}: {detail}"
                continue
            raise _Refused(e.code, detail) from None
        except (OSError, ValueError, http.client.HTTPException) as e:  # refused, reset, timed out, garbled
            last = f"{type(e).__name__}: {e}"
            continue
    raise ConnectionError(f"POST {url}: no answer after {attempts} attempt(s) in {timeout_s:g} s; last: {last}")


def _detail(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read()
        data = json.loads(raw)
        return str(data.get("detail", data)) if isinstance(data, dict) else str(data)[:500]
    except (OSError, ValueError):
        return e.reason if isinstance(e.reason, str) else f"HTTP {e.code}"


def _score(url: str, bodies: list[str], token: str | None, timeout_s: float,
           max_retries: int) -> list[dict[str, Any]]:
    """One answer per body, in order. A refused request of several samples is split until the
    refused samples stand alone, so one bad sample never costs the others their score."""
    from src.models.reward.wire import send_halving  # here: see _encode_image

    def send(part: Sequence[str]) -> list[dict[str, Any]]:
        try:
            data = ("[" + ",".join(part) + "]").encode()
            got = _post_json(f"{url.rstrip('/')}/compute_reward", data, token, timeout_s, max_retries)
        except ConnectionError as e:
            return [{"score": None, "error": str(e)} for _ in part]
        if not isinstance(got, list) or len(got) != len(part) or not all(isinstance(a, dict) for a in got):
            message = f"{url}/compute_reward answered {len(part)} samples with a malformed answer"
            return [{"score": None, "error": message} for _ in part]
        return got

    return send_halving(bodies, send, lambda e: isinstance(e, _Refused),
                        lambda e: [{"score": None, "error": f"{e.detail} (HTTP {e.status})"}])


def compute_score_batch(data_sources: Sequence[Any], solution_strs: Sequence[str], ground_truths: Sequence[Any],
                        extra_infos: Sequence[Any] | None = None, *, url: str | None = None,
                        token: str | None = None, failed_reward: float | None = None, send_paths: bool | None = None,
                        timeout_s: float | None = None, batch_size: int = 64, max_retries: int = 3,
                        reward_router_address: Any = None, reward_model_tokenizer: Any = None
                        ) -> list[dict[str, float]]:
    """verl's batched reward: one `{"score", "judge_failed"}` per sample, in order.
    `reward_router_address` / `reward_model_tokenizer` are what verl passes when it also hosts a
    reward model; they are not used here."""
    n = len(solution_strs)
    extra_infos = list(extra_infos) if extra_infos is not None else [None] * n
    if not (len(data_sources) == len(ground_truths) == len(extra_infos) == n):
        raise ValueError(f"compute_score_batch: {len(data_sources)} data_sources, {n} solution_strs, "
                         f"{len(ground_truths)} ground_truths and {len(extra_infos)} extra_infos; they must match")
    if batch_size < 1:
        raise ValueError(f"compute_score_batch: batch_size must be at least 1, got {batch_size}")
    if failed_reward is None:
        failed_reward = float(os.environ.get("REWARD_SERVICE_FAILED_REWARD", "0.0"))
    if send_paths is None:
        send_paths = _env_flag("REWARD_SERVICE_SEND_PATHS")
    token = token or os.environ.get("REWARD_SERVICE_TOKEN") or None
    timeout_s = timeout_s or float(os.environ.get("REWARD_SERVICE_TIMEOUT_S", str(DEFAULT_TIMEOUT_S)))
    groups: dict[str, list[int]] = {}
    for i, extra in enumerate(extra_infos):
        own = extra.get("reward_url") if isinstance(extra, Mapping) else None
        target = url or own or os.environ.get("REWARD_SERVICE_URL") or DEFAULT_URL
        groups.setdefault(str(target), []).append(i)
    answers: list[dict[str, Any] | None] = [None] * n
    for target, indices in groups.items():
        ready: list[int] = []
        bodies: list[str] = []
        for i in indices:
            try:
                bodies.append(_body(data_sources[i], solution_strs[i], ground_truths[i], extra_infos[i], send_paths))
                ready.append(i)
            except _SampleError as e:
                answers[i] = {"score": None, "error": str(e)}
        for start in range(0, len(ready), batch_size):
            chunk = ready[start:start + batch_size]
            for i, a in zip(chunk, _score(target, bodies[start:start + batch_size], token, timeout_s, max_retries)):
                answers[i] = a
    out = []
    failures = []
    for i, a in enumerate(answers):
        assert a is not None, f"verl reward lost sample {i}"  # by construction
        score = a.get("score")
        ok = isinstance(score, (int, float)) and not isinstance(score, bool)
        if not ok:
            # The service numbers samples within its request; name them by their place in this call
            # (verl 0.7+ calls one sample at a time) and the dataset's index when there is one.
            extra = extra_infos[i] if isinstance(extra_infos[i], Mapping) else {}
            index = next((extra[k] for k in ("index", "id", "uid") if extra.get(k) is not None), None)
            name = f"sample {i}" + (f" (index {_jsonable(index)})" if index is not None else "")
            failures.append(f"{name}: {_SAMPLE_PREFIX.sub('', str(a.get('error')))}")
        out.append({"score": float(score) if ok else float(failed_reward), "judge_failed": 0.0 if ok else 1.0})
    if failures:
        log.warning("%d of %d samples unscored (reward %s given); first: %s", len(failures), n, failed_reward,
                    failures[0])
    return out


def compute_score(data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None,
                  **kwargs: Any) -> dict[str, float]:
    """verl's per-sample reward (naive, rate_limited and remote managers): `{"score", "judge_failed"}`.
    Takes the keywords of `compute_score_batch`."""
    return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info], **kwargs)[0]
