"""What a request must pass before anything is scored.

    body bytes --read_json-->  size limit, a deadline for the whole body (slow or stalled clients),
                               JSON without NaN/Infinity, RecursionError or oversized integers
               --check_json--> nesting depth, finite numbers, strings the answer can encode
               --check_count / check_pixels--> per-request limits on items and decoded pixels

Whatever passes is answerable: the answer echoes ids, request ids and metadata, so a value that
cannot be written back (a lone surrogate, NaN, a 1,000-deep object) is refused here, with 4xx,
before the judge spends time on it, instead of failing with 500 after scoring.
"""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Iterable

from fastapi import HTTPException

from ..models.reward.types import ScoreItem, image_pixels
from .wire import WireError

MAX_DEPTH = 32  # nesting of objects and arrays in a body; real bodies use 4 or 5
# Images of one item (a chat request is one item). The judge decodes and encodes each before it
# can tell the prompt is too long: 20,000 one-pixel images (236 kB of JSON) held it for 65 s.
MAX_IMAGES_PER_ITEM = 64
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; send a finite number or null")


async def read_json(request: Any, limit: int, timeout_s: float) -> Any:
    """The request body as JSON, or HTTPException: 413 over `limit` bytes, 408 when the whole body
    has not arrived within `timeout_s` (a client announcing more than it sends is not held open),
    400 when it is not JSON this service accepts."""
    too_big = (f"the request body is over the limit of {limit} bytes (server.max_request_bytes); "
               "send fewer items per request, or paths instead of base64 images")
    length = request.headers.get("content-length")
    if length is not None:
        try:
            announced = int(length)
        except ValueError:
            raise HTTPException(400, f"bad Content-Length header {length[:40]!r}") from None
        if announced > limit:
            raise HTTPException(413, too_big)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, too_big)
                chunks.append(chunk)
    except TimeoutError:
        promised = f" of the {length} announced" if length is not None else ""
        raise HTTPException(408, f"the request body did not arrive within {timeout_s:g} s "
                                 f"(server.read_timeout_s): {size} bytes received{promised}",
                            headers={"Connection": "close"}) from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise HTTPException(400, "the request body is empty; send JSON")
    return await asyncio.to_thread(_parse_checked, raw)


def _parse_checked(raw: bytes) -> Any:
    body = parse_json(raw)
    try:
        check_json(body)
    except WireError as e:
        raise HTTPException(e.status, e.message) from None
    return body


def parse_json(raw: bytes) -> Any:
    """json.loads that refuses what the answer could not carry back, with 400 and the reason."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise HTTPException(400, f"the request body is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise HTTPException(400, f"the request body is not valid JSON: not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise HTTPException(400, f"the request body is nested too deeply; at most {MAX_DEPTH} levels "
                                 "of objects and arrays are accepted") from None
    except ValueError as e:  # NaN/Infinity (above), or an integer over Python's digit limit
        text = str(e)
        if "digits" in text:
            text = "a number in the body has too many digits (" + text.split(";")[0] + ")"
        raise HTTPException(400, f"the request body is not valid JSON: {text}") from None


def _where(path: list[Any]) -> str:
    out = "the body"
    for step in path:
        out = f"{out}[{step}]" if isinstance(step, int) else (f"{out}.{step}" if out != "the body" else str(step))
    return out


def check_json(body: Any, max_depth: int = MAX_DEPTH) -> None:
    """Every value of the body can be written back in an answer: nesting at most `max_depth`,
    finite numbers, strings (and keys) without lone surrogates. WireError 422 names the place."""
    stack: list[tuple[Any, list[Any]]] = [(body, [])]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                raise WireError(422, f"{_where(path)}: the string holds a lone UTF-16 surrogate, which "
                                     "cannot be encoded; send valid Unicode")
        elif isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise WireError(422, f"{_where(path)}: the number {value} is out of range (not finite)")
        elif isinstance(value, (dict, list)):
            if len(path) >= max_depth:
                raise WireError(422, f"{_where(path)}: nested more than {max_depth} levels deep")
            if isinstance(value, dict):
                for k, v in value.items():
                    if not k.isascii() and _SURROGATE.search(k):
                        raise WireError(422, f"{_where(path)}: a key holds a lone UTF-16 surrogate, which "
                                             "cannot be encoded; send valid Unicode")
                    stack.append((v, path + [k]))
            else:
                stack.extend((v, path + [i]) for i, v in enumerate(value))


def check_count(n: int, limit: int, what: str = "items") -> None:
    """413 when a request holds more than `limit` items (server.max_items)."""
    if n > limit:
        raise WireError(413, f"the request holds {n} {what}, over the limit of {limit} per request "
                             f"(server.max_items); split it into requests of at most {limit}")


def check_pixels(items: Iterable[ScoreItem], limit: int) -> int:
    """The decoded size of every image of the request, read from the headers (no pixels decoded);
    413 when the total is over `limit` (server.max_request_pixels). An image whose header cannot
    be read counts 0 here: it fails as its item's error when scored."""
    total, largest = 0, (0, "")
    for i, item in enumerate(items):
        for role, images in (("images", item.images), ("source_images", item.source_images)):
            for k, img in enumerate(images):
                px = image_pixels(img) or 0
                total += px
                if px > largest[0]:
                    largest = (px, f"item {i} {role}[{k}]")
    if total > limit:
        raise WireError(413, f"the request's images hold {total} pixels when decoded, over the limit of "
                             f"{limit} per request (server.max_request_pixels; the largest is "
                             f"{largest[1]} with {largest[0]}); send fewer or smaller images per request")
    return total


def check_text(item: ScoreItem, where: str, max_chars: int) -> ScoreItem:
    """422 when the item's text (instruction, or an RL completion judged as one) is over
    `max_chars` (server.max_text_chars): the judge would tokenize and run it whole, and one such
    item can hold the model for minutes or run the host out of memory. Its images, likewise, are
    at most MAX_IMAGES_PER_ITEM."""
    n_images = len(item.images) + len(item.source_images)
    if n_images > MAX_IMAGES_PER_ITEM:
        raise WireError(422, f"{where}: {n_images} images, over the limit of {MAX_IMAGES_PER_ITEM} per item")
    if isinstance(item.instruction, str) and len(item.instruction) > max_chars:
        raise WireError(422, f"{where}: the instruction is {len(item.instruction)} characters, over the limit of "
                             f"{max_chars} (server.max_text_chars)")
    return item


def check_sample_item(item: ScoreItem, where: str, max_chars: int) -> ScoreItem:
    """An item built from an RL sample has the types the judge expects (the sample's fields come
    from free-form trainer data: a label's `instruction` may be a number) and text within the
    limit; 422 naming the sample."""
    if item.instruction is not None and not isinstance(item.instruction, str):
        raise WireError(422, f"{where}: the instruction must be a string, got {type(item.instruction).__name__}")
    if item.id is not None and not isinstance(item.id, str):
        raise WireError(422, f"{where}: the id must be a string, got {type(item.id).__name__}")
    return check_text(item, where, max_chars)
