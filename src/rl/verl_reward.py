"""The judge as a verl custom reward function, calling the reward service.

verl config (the batched form needs `reward_model.reward_manager=batch`):

    custom_reward_function:
      path: /path/to/repo/src/rl/verl_reward.py
      name: compute_score_batch            # or compute_score with the naive manager
      reward_kwargs: {url: "http://127.0.0.1:8899"}

Each sample's `extra_info` carries its images: `image` / `images` (the image under judgement)
and `source_image` / `source_images` (before an edit), as paths, data URLs, or base64; optional
`instruction`, `completion_as`, `reward_url`. What the response is judged on: `src/rl/items.py`.
Paths are read here and sent as base64 unless `send_paths` (then the service reads them inside
its allowed folders).

Settings, first found wins: the keyword argument (verl's reward_kwargs), `extra_info`
(`reward_url` only), then the environment: REWARD_SERVICE_URL (default http://127.0.0.1:8899),
REWARD_SERVICE_TOKEN, REWARD_SERVICE_FAILED_REWARD (default 0.0), REWARD_SERVICE_SEND_PATHS (1/0),
REWARD_SERVICE_TIMEOUT_S.

Each call returns `{"score": float, "judge_failed": 0.0 | 1.0}` per sample. verl needs a number
for every sample, so a sample the judge could not score gets `failed_reward` and
`judge_failed=1.0` (verl logs it with the other reward metrics); the reason is logged here.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    # verl loads this file by path, outside any package: the project must be importable in
    # verl's environment (installed: `pip install -e /path/to/repo --no-deps`).
    try:
        from src.models.reward.implementations.remote import RemoteRewardModel, RemoteServiceError
        from src.service.wire import encode_image
    except ImportError as e:
        raise ImportError(f"{__file__}: cannot import this project's package ({e}); install it into verl's "
                          f"environment: pip install -e {Path(__file__).resolve().parents[2]} --no-deps") from e
else:
    from ..models.reward.implementations.remote import RemoteRewardModel, RemoteServiceError
    from ..service.wire import encode_image

log = logging.getLogger("src.rl.verl_reward")

DEFAULT_URL = "http://127.0.0.1:8899"
IMAGE_KEYS = ("image", "images", "source_image", "source_images")
_clients: dict[tuple, RemoteRewardModel] = {}
_clients_lock = threading.Lock()


def _client(url: str, token: str | None, timeout_s: float) -> RemoteRewardModel:
    key = (url, token, timeout_s)
    with _clients_lock:  # one HTTP client per service and process, reused across steps
        if key not in _clients:
            _clients[key] = RemoteRewardModel(url, token=token, token_env=None, timeout_s=timeout_s)
        return _clients[key]


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


def _body(data_source: Any, solution_str: Any, ground_truth: Any, extra_info: Any, send_paths: bool) -> dict[str, Any]:
    extra = dict(extra_info or {})
    extra.pop("reward_url", None)
    for key in IMAGE_KEYS:
        if extra.get(key) is None:
            continue
        value = extra[key]
        many = isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and not hasattr(value, "save")
                                                    and not isinstance(value, (str, bytes)))
        values = list(value) if many else [value]
        # An image this side cannot read is left as given: the service then fails that sample
        # (or refuses a path outside its folders) with the reason.
        encoded = []
        for v in values:
            try:
                encoded.append(encode_image(v, send_paths))
            except ValueError:
                encoded.append(str(v))
        extra[key] = encoded if many else encoded[0]
    return _jsonable({"data_source": data_source, "solution_str": solution_str, "ground_truth": ground_truth,
                      "extra_info": extra})


def compute_score_batch(data_sources: Sequence[Any], solution_strs: Sequence[str], ground_truths: Sequence[Any],
                        extra_infos: Sequence[Any] | None = None, *, url: str | None = None,
                        token: str | None = None, failed_reward: float | None = None, send_paths: bool | None = None,
                        timeout_s: float | None = None, batch_size: int = 64, **_: Any) -> list[dict[str, float]]:
    """verl's batched reward: one `{"score", "judge_failed"}` per sample, in order."""
    n = len(solution_strs)
    extra_infos = list(extra_infos) if extra_infos is not None else [None] * n
    if not (len(data_sources) == len(ground_truths) == len(extra_infos) == n):
        raise ValueError(f"compute_score_batch: {len(data_sources)} data_sources, {n} solution_strs, "
                         f"{len(ground_truths)} ground_truths and {len(extra_infos)} extra_infos; they must match")
    if failed_reward is None:
        failed_reward = float(os.environ.get("REWARD_SERVICE_FAILED_REWARD", "0.0"))
    if send_paths is None:
        send_paths = _env_flag("REWARD_SERVICE_SEND_PATHS")
    token = token or os.environ.get("REWARD_SERVICE_TOKEN") or None
    timeout_s = timeout_s or float(os.environ.get("REWARD_SERVICE_TIMEOUT_S", "600"))
    groups: dict[str, list[int]] = {}
    for i, extra in enumerate(extra_infos):
        target = url or (extra or {}).get("reward_url") or os.environ.get("REWARD_SERVICE_URL") or DEFAULT_URL
        groups.setdefault(str(target), []).append(i)
    answers: list[dict[str, Any] | None] = [None] * n
    for target, indices in groups.items():
        client = _client(target, token, timeout_s)
        bodies = [_body(data_sources[i], solution_strs[i], ground_truths[i], extra_infos[i], send_paths) for i in indices]
        for start in range(0, len(indices), batch_size):
            _post(client, indices[start:start + batch_size], bodies[start:start + batch_size], answers)
    out = []
    failures = []
    for i, a in enumerate(answers):
        assert a is not None, f"verl reward lost sample {i}"  # by construction
        ok = a.get("score") is not None
        if not ok:
            failures.append(f"sample {i}: {a.get('error')}")
        out.append({"score": float(a["score"]) if ok else float(failed_reward), "judge_failed": 0.0 if ok else 1.0})
    if failures:
        log.warning("%d of %d samples unscored (reward %s given); first: %s", len(failures), n, failed_reward,
                    failures[0])
    return out


def _post(client: RemoteRewardModel, indices: list[int], bodies: list[dict[str, Any]],
          answers: list[dict[str, Any] | None]) -> None:
    try:
        got = client.request("POST", "/compute_reward", bodies)
    except RemoteServiceError as e:
        if e.status == 413 and len(bodies) > 1:  # over the service's size limit: halve and retry
            half = len(bodies) // 2
            _post(client, indices[:half], bodies[:half], answers)
            _post(client, indices[half:], bodies[half:], answers)
            return
        raise
    if not isinstance(got, list) or len(got) != len(bodies):
        raise RemoteServiceError(f"{client.url}/compute_reward answered {len(bodies)} samples with "
                                 f"{len(got) if isinstance(got, list) else 'a non-list'}")
    for i, a in zip(indices, got):
        answers[i] = a


def compute_score(data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None,
                  **kwargs: Any) -> dict[str, float]:
    """verl's per-sample reward (naive reward manager): `{"score", "judge_failed"}`."""
    return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info], **kwargs)[0]
