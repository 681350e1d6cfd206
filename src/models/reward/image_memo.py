"""One call's memo of in-memory images in the form they travel in to where the engine runs: the
multi-GPU pool (pool.py) spills each to a file, the Ray host (implementations/ray_actors.py)
encodes each PIL image as PNG bytes; both through png_ready, which keeps the pixels the engine
would see in memory.

Why: an image that several items show (an edit's source, shown with every editing model's output)
is then converted once per call, not once per item, and every item showing it carries the same
result (one path, one bytes object), so the engine on the other side sees one image and puts
those items side by side (grouping.py).
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, MutableMapping, TypeVar

from .grouping import image_identity

T = TypeVar("T")


def convert_once(memo: MutableMapping[Hashable, T] | None, img: Any, convert: Callable[[], T]) -> T:
    """convert() for `img`, or what it gave for the same image earlier in the call.

    memo: the call's, keyed by grouping.image_identity (bytes by content, a PIL image by object:
    the keys hold only while the call holds its images, so a memo lives for one call); None: no
    memo, convert every time. A conversion that raises leaves nothing behind: the next item that
    shows the image tries again, and fails with its own error."""
    if memo is None:
        return convert()
    key = image_identity(img)
    if key not in memo:
        memo[key] = convert()
    return memo[key]


# Modes PIL writes to PNG as they are (16-bit greyscale too, which load_pil maps on reading).
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"}


def png_ready(img: Any) -> Any:
    """A PIL image as a PNG can carry the pixels the judge would see in memory (both hosts send
    in-memory PIL images to the engine as PNG). PIL writes no EXIF to PNG, so the rotation is
    applied here, as load_pil does; a mode PNG cannot store (CMYK, YCbCr, float, 32-bit) goes
    through load_pil's own conversion to RGB here, so the worker or actor reads the very pixels
    the single-device class judges."""
    from PIL import ImageOps

    from .types import load_pil

    if img.mode not in _PNG_MODES:
        return load_pil(img)  # EXIF rotation, bit-depth mapping, alpha on white, RGB
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block must not cost the image (load_pil skips it too)
        return img
