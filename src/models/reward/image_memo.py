"""One call's memo of in-memory images in the form they travel in to where the engine runs: the
multi-GPU pool (pool.py) spills each to a file, the Ray host (implementations/ray_actors.py)
encodes each PIL image as PNG bytes; both save types.load_pil's RGB image, the very pixels the
engine judges of an image in memory (EXIF rotation applied, modes PNG cannot store converted).

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

