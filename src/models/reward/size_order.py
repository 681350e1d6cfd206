"""A call's items ordered by the size of their prompts before it is cut into chunks (the setting
`chunk_order: auto`; engine.py asks for the order, results still come back in input order).

Why: a static batch runs every prompt at the length of its longest (left padding, which the
language model computes like any other token), and the vision tower's `grouped` attention
(vision_attention.py) runs only when every image of a batch has one patch count (other batches
go through varlen). Image-editing and text-to-image benchmarks show images of many sizes and
aspect ratios, and with `max_pixels` unset the Qwen processors keep them near their native
resolution, so a call's prompts differ in length a lot: cut in input order, nearly every batch
pays for its largest image. Ordered by size, a chunk holds prompts of similar length and, where
the call has enough images of one size, one patch grid.

What: an item's key is the patches its images will have once resized as preparation resizes them
(qwen-vl-utils' smart_resize, with the judge's patch size, min_pixels and max_pixels), then the
images' grids (so that items of equal sizes stand together), then the instruction's length. Each
image's size is read without decoding it: a path's or bytes' header (PIL.Image.open reads the
header alone), a PIL image's .size; an EXIF quarter turn held in the header (JPEG) swaps the
sides, as load_pil's exif_transpose does. No pixel is decoded here, and nothing is refused here:
max_image_pixels is enforced in preparation, which still fails an oversized image alone with its
own error. An image whose size cannot be read (a missing file, a URL, which preparation does not
fetch either, unreadable bytes, another type) makes its item's key unknown; where the others are
sorted, such items go last, in input order, and fail in preparation with the error they get in
any order. Items that share a source image (grouping.py, where vision reuse can use it) stay
together as one unit keyed by its largest member. Units go largest first (stable): the first
batches show the call's peak memory, so an out-of-memory split or the max_memory_gb budget is
learned on the largest prompts, not after them.

Cost: one header read per distinct image of the call, on the engine's image threads in slices:
measured (size_order.prompt_keys, 200 local 1024x768 files, page cache warm, a shared 2-core CPU)
~0.1 ms per PNG and ~0.17 ms per JPEG, against 4-35 ms to decode one; the threads gain nothing
there (the parsing holds the GIL), they are for cold or network disks, where a read waits. So
1,000 items of two images cost ~0.2-0.3 s before the first chunk, under 1% of the GPU time they
take. Nothing at all for a call that is one chunk; when every item that can be sized shows
images of the same sizes the order is grouping.py's alone (the input order where grouping cannot
help).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from .grouping import source_groups, source_order
from .types import ScoreItem, open_image

# EXIF orientations that turn the picture a quarter (exif_transpose swaps its sides).
_QUARTER_TURNS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112
_SLICE = 32  # header reads per task on the image threads: the pool's overhead stays small


@dataclass(frozen=True)
class Resize:
    """The resize preparation gives every image (preparation.py: qwen-vl-utils' fetch_image with
    the judge's patch size, min_pixels and max_pixels, loading.py)."""

    patch_size: int
    min_pixels: int
    max_pixels: int

    def grid(self, width: int, height: int) -> tuple[int, int] | None:
        """(rows, columns) of patches of a width x height image once resized; None where the resize
        refuses it (an extreme aspect ratio: preparation fails that item)."""
        from qwen_vl_utils.vision_process import SPATIAL_MERGE_SIZE, smart_resize

        try:
            h, w = smart_resize(height, width, factor=self.patch_size * SPATIAL_MERGE_SIZE,
                                min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except (ValueError, ArithmeticError, AssertionError):
            return None
        return h // self.patch_size, w // self.patch_size


class HeaderSize:
    """Resize's stand-in where the judge's resize is not at hand (a job's host, whose judge may
    live in worker processes): an image's grid is its header's (height, width) as it is, so items
    sort by their images' pixel counts. The judge orders each call again by its exact resize."""

    def grid(self, width: int, height: int) -> tuple[int, int]:
        return height, width


def image_size(img: Any) -> tuple[int, int] | None:
    """(width, height) of an image input as preparation will see it, read without decoding a
    pixel; None when it cannot be read (never raises)."""
    from PIL import Image

    try:
        if isinstance(img, Image.Image):
            return _turned(img.size, img.info)
        if isinstance(img, (str, os.PathLike)) and "://" in os.fspath(img):
            return None  # a URL: not fetched here (preparation does not fetch it either)
        with open_image(img, None) as opened:  # Image.open: the header only
            return _turned(opened.size, opened.info)
    except Exception:
        return None


def _turned(size: tuple[int, int], info: dict) -> tuple[int, int]:
    """The size after EXIF orientation, where the header already holds the EXIF block. (getexif()
    is not called: on a PNG it would decode the image to look for a late EXIF chunk.)"""
    data = info.get("exif")
    if data:
        from PIL import Image

        try:
            exif = Image.Exif()
            exif.load(data)
            if exif.get(_EXIF_ORIENTATION) in _QUARTER_TURNS:
                return size[1], size[0]
        except Exception:  # a malformed EXIF block: preparation ignores it too
            pass
    return size


def prompt_keys(items: Sequence[ScoreItem], resize: Resize | HeaderSize, with_sources: bool,
                map_fn: Callable[..., Iterable] = map) -> list[tuple | None]:
    """Each item's size key: (patches of its images, their grids, instruction length), or None
    when one of its images cannot be sized. with_sources: the rubric shows the source images.
    map_fn: how the header reads run (the engine's image threads); each distinct image once."""
    def shown(item: ScoreItem) -> list[Any]:
        return [*item.images, *(item.source_images if with_sources else [])]

    distinct: dict[Any, Any] = {}
    for item in items:
        for img in shown(item):
            distinct.setdefault(_memo_key(img), img)
    images = list(distinct.values())
    slices = [images[k:k + _SLICE] for k in range(0, len(images), _SLICE)]
    sizes = dict(zip(distinct, (s for part in map_fn(_sizes, slices) for s in part)))
    grids: dict[Any, tuple[int, int] | None] = {k: resize.grid(*wh) if wh else None for k, wh in sizes.items()}
    keys: list[tuple | None] = []
    for item in items:
        shape = [grids[_memo_key(img)] for img in shown(item)]
        if any(g is None for g in shape):
            keys.append(None)
        else:
            keys.append((sum(r * c for r, c in shape), tuple(shape), _text_length(item.instruction)))
    return keys


def chunk_order(items: Sequence[ScoreItem], chunk: int, resize: Resize | HeaderSize, *, with_sources: bool,
                group_sources: bool, map_fn: Callable[..., Iterable] = map) -> list[int] | None:
    """The positions of `items` in the order to cut into chunks of `chunk`: largest prompts first,
    items sharing a source together (group_sources), unknown sizes last; None: the input order.
    A call of one chunk is left as given without reading anything; when every item whose images
    can be sized shows images of the same sizes, the order is grouping.py's (source_order) alone,
    whatever the instructions, and an item of unknown size stays where it is."""
    n = len(items)
    if chunk < 1 or n <= chunk:
        return None
    keys = prompt_keys(items, resize, with_sources, map_fn)
    if len({k[:2] for k in keys if k is not None}) <= 1:  # one size of images (or none known): no gain
        return source_order(items, chunk) if group_sources else None
    units = source_groups(items) if group_sources else [[pos] for pos in range(n)]

    def unit_key(unit: list[int]) -> tuple:
        known = [keys[pos] for pos in unit if keys[pos] is not None]
        return (1, max(known)) if known else (0,)  # reversed below: unknown last

    order = [pos for unit in sorted(units, key=unit_key, reverse=True) for pos in unit]
    return None if order == list(range(n)) else order


def _text_length(text: Any) -> int:
    # Read before any item is prepared: an instruction that is not text (a number, a table's NaN)
    # fails its own item in preparation, and must not take the call down here.
    return len(text) if isinstance(text, str) else 0


def _memo_key(img: Any) -> Any:
    # Cheap and never wrong while the call holds its items: a path as given, else the very object.
    if isinstance(img, (str, os.PathLike)):
        return ("path", os.fspath(img))
    return ("object", id(img))


def _sizes(images: list[Any]) -> list[tuple[int, int] | None]:
    return [image_size(img) for img in images]
