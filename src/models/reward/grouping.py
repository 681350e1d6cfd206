"""Items that show the same source image(s), put next to each other before a call is cut into
chunks.

Why: vision reuse (vision_reuse.py) sends each unique image of a chunk through the vision tower
once; features beyond the chunk survive only in a byte-bounded store. Benchmarks of image editing
score several editing models' outputs of the same sources in one call, ordered model by model
(item i = the edit of source i % S by model i // S), so every chunk of consecutive items shows
every source again, and the store finds it only if everything shown since fits in its budget.
Cut in grouped order instead (a source's edits side by side), a source falls in one chunk (two
where its group straddles a chunk's end), whatever the budget.

What: a stable grouping. Groups in the order of their first item; within a group, input order;
an item without sources is a group of its own, where it stood. The engine uses the order only
to cut chunks: results come back in input order, each with its own index.

An image's key is cheap and never wrong (equal keys: the same image while the call runs): a path
as given (str or os.PathLike), a digest of bytes, and for any other object (a PIL image) its
identity. Different keys for the same pixels only cost the grouping (reuse still dedups by pixel
digest).
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Hashable, Sequence

from .types import ScoreItem


def image_identity(img: Any, digests: dict[int, bytes] | None = None) -> Hashable:
    """A key for an image input: equal keys name the same image for as long as the objects live
    (the caller's call). digests: id(bytes) -> digest, so bytes shared by items are hashed once."""
    if isinstance(img, (str, os.PathLike)):
        return ("path", os.fspath(img))
    if isinstance(img, (bytes, bytearray)):  # the bytes preparation reads (a memoryview is no image input)
        d = digests.get(id(img)) if digests is not None else None
        if d is None:
            d = hashlib.blake2b(img, digest_size=16).digest()
            if digests is not None:
                digests[id(img)] = d
        return ("bytes", d)
    return ("object", id(img))  # a PIL image, an array: only while the call holds it


def source_groups(items: Sequence[ScoreItem], keys: list[tuple] | None = None) -> list[list[int]]:
    """The positions of `items` grouped by their source image(s): groups in the order of their
    first item, input order within; an item without sources is a group of its own.
    keys: the items' source keys (`_source_keys`), when the caller has them already."""
    keys = _source_keys(items) if keys is None else keys
    groups: dict[tuple, list[int]] = {}
    ordered: list[list[int]] = []
    for pos, key in enumerate(keys):
        if not key:
            ordered.append([pos])
            continue
        g = groups.get(key)
        if g is None:
            g = groups[key] = []
            ordered.append(g)
        g.append(pos)
    return ordered


def source_order(items: Sequence[ScoreItem], chunk: int) -> list[int] | None:
    """The positions of `items` in the order to cut into chunks of `chunk`: items with the same
    source image(s) side by side. None (keep the given order) when that would not show fewer
    source images per chunk, summed over the chunks: no source repeats, the call is one chunk, or
    the items are grouped already."""
    if chunk < 1 or len(items) <= chunk:
        return None
    keys = _source_keys(items)
    ordered = source_groups(items, keys)
    if len(ordered) == len(items):  # no key repeats
        return None
    order = [pos for g in ordered for pos in g]
    if _shown(keys, order, chunk) >= _shown(keys, range(len(items)), chunk):
        return None
    return order


def cut_between_sources(items: Sequence[ScoreItem], want: int, limit: int) -> int | None:
    """Where to cut `items` in two, nearest to `want` (the lower of two as near) within 1..limit,
    so that no source image shows on both sides (vision reuse encodes it once per chunk); None:
    no such place."""
    keys = [set(k) for k in _source_keys(items)]
    for k in sorted(range(1, min(limit, len(items) - 1) + 1), key=lambda k: (abs(k - want), k)):
        if not set().union(*keys[:k]) & set().union(*keys[k:]):
            return k
    return None


def _source_keys(items: Sequence[ScoreItem]) -> list[tuple]:
    digests: dict[int, bytes] = {}
    return [tuple(image_identity(im, digests) for im in it.source_images) for it in items]


def _shown(keys: list[tuple], order: Sequence[int], chunk: int) -> int:
    """Source images shown per chunk (each unique one once), summed over the chunks."""
    order = list(order)
    return sum(len({k for pos in order[s:s + chunk] for k in keys[pos]}) for s in range(0, len(order), chunk))
