"""The reward service's JSON forms: items and images in, results out.

Shared by the server (decoding, with the allowed-folder check) and by `RemoteRewardModel` (encoding),
so both ends agree on one spelling; it lives here, below both, so neither imports the other.
Standard library only: the client side must not need the server's packages.

An item on the wire::

    {"id": "a1", "images": [IMAGE, ...], "source_images": [IMAGE, ...],
     "instruction": "...", "metadata": {...}}

`images` / `source_images` may also be a single IMAGE. An IMAGE is one of:

- a data URL: ``"data:image/png;base64,iVBORw0..."``;
- raw base64 of an image file, recognised by the file signature it encodes (PNG, JPEG, GIF,
  WEBP, BMP, TIFF), or explicitly ``{"base64": "..."}``;
- a path on the server's machine: any other string, or ``{"path": "..."}``. The server reads a
  path only when it resolves (symlinks followed) inside one of its allowed folders.
"""
from __future__ import annotations

import base64
import binascii
import email.utils
import io
import os
import random
import re
import stat
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from .chat import CHAT_KEY
from .errors import JudgeInputError
from .types import ScoreItem, describe_image

ITEM_KEYS = ("id", "images", "source_images", "instruction", "metadata")
T = TypeVar("T")
R = TypeVar("R")

# Leading base64 text of the file signatures the judge can decode. Matching a signature (rather
# than "looks like base64") keeps an odd file name from being read as image bytes.
_B64_SIGNATURES = {
    "iVBORw0KGgo": "image/png",
    "/9j/": "image/jpeg",
    "R0lGOD": "image/gif",
    "UklGR": "image/webp",
    "Qk": "image/bmp",
    "SUkqAA": "image/tiff",
    "TU0AKg": "image/tiff",
}
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/=\s]+$")
_MIN_B64_LEN = 64  # shorter strings are never image files, whatever they start with


class WireError(JudgeInputError):
    """A request the server refuses: `status` is the HTTP code, the message names the item and cause."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# -- decoding (server side) -----------------------------------------------------------------

def resolve_allowed_dirs(dirs: Iterable[str | os.PathLike]) -> list[Path]:
    """Allowed folders with symlinks resolved, so a path check compares real locations."""
    return [Path(os.path.realpath(os.path.expanduser(os.fspath(d)))) for d in dirs]


def check_path(path: str, allowed: Sequence[Path], where: str) -> str:
    """The path's real location if it lies inside an allowed folder; else a 403 naming the path."""
    if "\0" in path:  # no file has one; os.path would raise ValueError (500) on it
        raise WireError(422, f"{where}: the path {path!r} contains a NUL byte")
    real = Path(os.path.realpath(os.path.expanduser(path)))
    if not any(real == d or real.is_relative_to(d) for d in allowed):
        if not allowed:
            raise WireError(403, f"{where}: path {path!r} refused: this server reads no paths "
                                 "(server.allowed_dirs is empty); send the image as base64")
        shown = ", ".join(str(d) for d in allowed)
        resolved = f" (resolves to {str(real)!r})" if str(real) != path else ""
        raise WireError(403, f"{where}: path {path!r}{resolved} is outside the allowed folders ({shown}); "
                             "send the image as base64 or move it into an allowed folder")
    return str(real)


def _b64decode(text: str, where: str) -> bytes:
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise WireError(422, f"{where}: not valid base64 ({e}), so not a readable image") from None
    if not data:
        raise WireError(422, f"{where}: the base64 image is empty")
    return data


def _sniff_b64(text: str) -> bool:
    return (len(text) >= _MIN_B64_LEN and any(text.startswith(sig) for sig in _B64_SIGNATURES)
            and _B64_CHARS.match(text[:4096]) is not None)


def decode_image(value: Any, allowed: Sequence[Path], where: str) -> bytes | str:
    """One wire IMAGE -> encoded image bytes, or a checked real path."""
    if isinstance(value, Mapping):
        keys = set(value)
        if keys == {"base64"} and isinstance(value["base64"], str):
            return _b64decode(value["base64"], where)
        if keys == {"path"} and isinstance(value["path"], str):
            return check_path(value["path"], allowed, where)
        raise WireError(422, f"{where}: an image object must be {{\"base64\": str}} or {{\"path\": str}}, "
                             f"got keys {sorted(keys)}")
    if not isinstance(value, str):
        raise WireError(422, f"{where}: an image must be a data URL, base64 text or a path, "
                             f"got {type(value).__name__}")
    if not value:
        raise WireError(422, f"{where}: empty image string")
    if value[:5].lower() == "data:":  # a URL's scheme is case-insensitive (RFC 3986), so DATA: too
        head, sep, payload = value.partition(",")
        if not sep or not head.lower().endswith(";base64"):
            raise WireError(422, f"{where}: a data URL must be base64 (data:image/...;base64,...)")
        return _b64decode(payload, where)
    if _sniff_b64(value):
        return _b64decode(value, where)
    try:
        return check_path(value, allowed, where)
    except WireError:
        if _meant_as_b64(value):  # not a refused path: base64 whose start is no image signature
            return _b64decode(value, where)  # 422 when it does not decode; else the item fails as an image
        raise


def _meant_as_b64(text: str) -> bool:
    """Long text of base64 characters only (no '.', so no file name with an extension), or long
    text that starts like an image in base64 and is no file name (cut, or URL-safe base64)."""
    if len(text) < _MIN_B64_LEN:
        return False
    return _B64_CHARS.match(text[:4096]) is not None or (
        "." not in text and any(text.startswith(sig) for sig in _B64_SIGNATURES))


def _image_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    return [value]


def item_name(index: int, item_id: Any) -> str:
    return f"item {index}" + (f" (id {item_id!r})" if item_id is not None else "")


def decode_item(obj: Any, index: int, allowed: Sequence[Path]) -> ScoreItem:
    """One wire item -> ScoreItem; WireError (422 malformed, 403 path refused) names the item."""
    if not isinstance(obj, Mapping):
        raise WireError(422, f"item {index}: expected an object with 'images', got {type(obj).__name__}")
    name = item_name(index, obj.get("id"))
    unknown = set(obj) - set(ITEM_KEYS)
    if unknown:
        raise WireError(422, f"{name}: unknown key(s) {sorted(unknown)}; known: {', '.join(ITEM_KEYS)}")
    item_id = obj.get("id")
    if item_id is not None and not isinstance(item_id, (str, int)):
        raise WireError(422, f"{name}: 'id' must be a string or an integer")
    instruction = obj.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise WireError(422, f"{name}: 'instruction' must be a string or null")
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise WireError(422, f"{name}: 'metadata' must be an object")
    if CHAT_KEY in metadata:  # reserved: it marks the OpenAI route's chat requests
        raise WireError(422, f"{name}: metadata key {CHAT_KEY!r} is reserved; use /v1/chat/completions")
    if "images" not in obj:
        raise WireError(422, f"{name}: missing 'images'")
    images = [decode_image(v, allowed, f"{name}: images[{k}]")
              for k, v in enumerate(_image_list(obj["images"]))]
    sources = [decode_image(v, allowed, f"{name}: source_images[{k}]")
               for k, v in enumerate(_image_list(obj.get("source_images")))]
    return ScoreItem(images=images, source_images=sources, instruction=instruction,
                     id=str(item_id) if item_id is not None else None, metadata=dict(metadata))


def decode_score_request(body: Any, allowed: Sequence[Path]) -> tuple[list[ScoreItem], Any]:
    """A /score body -> (items, request_id)."""
    if not isinstance(body, Mapping):
        raise WireError(422, f"the body must be an object {{\"items\": [...]}}, got {type(body).__name__}")
    unknown = set(body) - {"items", "request_id"}
    if unknown:
        raise WireError(422, f"unknown key(s) {sorted(unknown)} in the body; known: items, request_id")
    items = body.get("items")
    if not isinstance(items, list):
        raise WireError(422, "the body needs 'items': a list of items")
    return [decode_item(obj, i, allowed) for i, obj in enumerate(items)], body.get("request_id")


# -- encoding (client side) -----------------------------------------------------------------

def _mime_of(data: bytes) -> str:
    head = base64.b64encode(data[:12]).decode()
    for sig, mime in _B64_SIGNATURES.items():
        if head.startswith(sig):
            return mime
    return "application/octet-stream"


def data_url(data: bytes) -> str:
    return f"data:{_mime_of(data)};base64,{base64.b64encode(data).decode()}"


def encode_image(img: Any, send_paths: bool = False) -> str:
    """An image input (path, bytes, PIL image, a datasets `{"bytes", "path"}` record, or the
    `{"image": ...}` entry and `file://` path of qwen-vl-utils, which verl's datasets write) ->
    wire IMAGE. Paths are read and inlined unless `send_paths` (then the server must be able to
    read them inside its allowed folders). Raises ValueError naming the image."""
    if isinstance(img, Mapping) and ("bytes" in img or "path" in img or "image" in img):
        img = img.get("bytes") or (img["image"] if img.get("image") is not None else img.get("path"))
    if isinstance(img, (str, os.PathLike)):
        path = os.fspath(img)
        if path.startswith("file://"):  # as qwen-vl-utils reads it: the rest is the path
            path = path[len("file://"):]
        if path.startswith("data:") or _sniff_b64(path):
            return path  # already on the wire form
        if send_paths:
            return os.path.abspath(path)
        return data_url(_read_image_file(path))
    if isinstance(img, (bytes, bytearray)):
        if not img:
            raise ValueError("image bytes are empty")
        return data_url(bytes(img))
    if hasattr(img, "save"):  # a PIL image: PNG keeps it lossless
        buf = io.BytesIO()
        im = img if img.mode in ("RGB", "RGBA", "L", "LA", "P", "I;16", "I") else img.convert("RGB")
        im.save(buf, format="PNG")
        return data_url(buf.getvalue())
    raise ValueError(f"unsupported image type {describe_image(img)}; give a path, bytes or a PIL image")


# The largest image file inlined into a request: the service's default body limit
# (server.max_request_bytes), which a larger file could not pass once base64-encoded anyway.
MAX_INLINE_BYTES = 64 * 1024 * 1024


def _read_image_file(path: str) -> bytes:
    """An image file's bytes, to inline; ValueError naming it for what cannot be sent (a device
    such as /dev/zero, a folder, an empty or oversized file): read whole, /dev/zero filled memory."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before opening: a FIFO's open waits for a writer
            raise ValueError(f"cannot read image {path}: not a regular file")
        with open(path, "rb") as f:
            data = f.read(MAX_INLINE_BYTES + 1)
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e.strerror or e}") from None
    if not data:
        raise ValueError(f"image file is empty: {path}")
    if len(data) > MAX_INLINE_BYTES:
        raise ValueError(f"image {path} is over {MAX_INLINE_BYTES // 2**20} MiB, more than a request to the service "
                         "carries (server.max_request_bytes); give a smaller file, or send_paths if the service "
                         "can read it")
    return data


def encode_item(item: ScoreItem, send_paths: bool = False) -> dict[str, Any]:
    return {"id": item.id, "instruction": item.instruction, "metadata": item.metadata,
            "images": [encode_image(im, send_paths) for im in item.images],
            "source_images": [encode_image(im, send_paths) for im in item.source_images]}


def send_halving(chunk: Sequence[T], send: Callable[[Sequence[T]], list[R]], too_big: Callable[[Exception], bool],
                 alone: Callable[[Exception], list[R]] | None = None) -> list[R]:
    """`send(chunk)`: one answer per element, in order. A request the service refuses (`too_big(e)`
    is true of the error: a 413, or any refusal where one bad sample refuses its request) is split
    in halves, each sent alone, until the refused elements stand alone, so one element never costs
    the others their answer; a lone refused element is answered by `alone(e)`, or raises.
    The one rule for every client of the service (the remote judge, verl's hook)."""
    try:
        return send(chunk)
    except Exception as e:
        if not too_big(e):
            raise
        if len(chunk) > 1:
            half = len(chunk) // 2
            return send_halving(chunk[:half], send, too_big, alone) + send_halving(chunk[half:], send, too_big, alone)
        if alone is None:
            raise
        return alone(e)


def backoff(retry: int, base_s: float, cap_s: float) -> float:
    """The pause before retry number `retry` (1, 2, ...): `base_s` doubling with each retry, capped
    at `cap_s`, times a random factor of 0.5..1.5 so that clients turned away together do not come
    back together. The clients' one schedule."""
    return min(base_s * 2 ** (retry - 1), cap_s) * (0.5 + random.random())


def retry_after(headers: Any) -> float | None:
    """Seconds to wait from an answer's Retry-After (seconds or an HTTP date) or retry-after-ms
    header; None when it has neither (or an unreadable one). The clients' one reading of it."""
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None
