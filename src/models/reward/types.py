"""What goes into a judge and what comes out of it.

`ScoreItem` is one thing to score; `ScoreResult` is the answer for it. Both are plain data that
travel as JSON (results files, the worker channel, the HTTP service), so this module imports only
the standard library and, lazily, pillow.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from .errors import JudgeInputError

# An image is a file path, a PIL image, or the encoded bytes of a file (PNG, JPEG, ...).
ImageInput = Union[str, os.PathLike, bytes, "PIL.Image.Image"]  # noqa: F821


@dataclass
class ScoreItem:
    """One thing to score.

    images: the image(s) under judgement (the edited image, the generated image).
    source_images: the image(s) before the edit, for edit templates; empty otherwise.
    instruction: the edit instruction or the text-to-image prompt.
    id: the caller's name for the item; results carry it back.
    metadata: free data (category, seed, ...) carried into the result untouched.
    """

    images: list[ImageInput]
    source_images: list[ImageInput] = field(default_factory=list)
    instruction: str | None = None
    id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A single image is the common case; accept it without a list.
        if not isinstance(self.images, (list, tuple)):
            self.images = [self.images]
        if self.source_images is None:
            self.source_images = []
        elif not isinstance(self.source_images, (list, tuple)):
            self.source_images = [self.source_images]
        self.images = list(self.images)
        self.source_images = list(self.source_images)
        if self.metadata is None:
            self.metadata = {}
        elif not isinstance(self.metadata, dict):
            if not isinstance(self.metadata, Mapping):  # a list or a string would be lost on the way
                raise TypeError(f"ScoreItem {self.id!r}: {metadata_problem(self.metadata)}")
            self.metadata = dict(self.metadata)

    def to_dict(self) -> dict[str, Any]:
        """JSON form; only works when every image is a path (the worker channel's form)."""
        for img in (*self.images, *self.source_images):
            if not isinstance(img, (str, os.PathLike)):
                raise TypeError(f"item {self.id!r}: only path images have a JSON form, got {type(img).__name__}")
        return {"images": [os.fspath(p) for p in self.images],
                "source_images": [os.fspath(p) for p in self.source_images],
                "instruction": self.instruction, "id": self.id, "metadata": self.metadata}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScoreItem":
        return cls(images=d.get("images") or [], source_images=d.get("source_images") or [],
                   instruction=d.get("instruction"), id=d.get("id"), metadata=d.get("metadata") or {})


@dataclass
class ScoreResult:
    """The judge's answer for one item.

    score: the overall score on the template's scale, or None when there is none. A None score
      always comes with `error`; a score is never guessed.
    sub_scores: the named parts (for the edit rubric: `semantic_consistency`,
      `perceptual_quality`); None for a part that could not be scored.
    raw: the judge's raw answer per part (generate mode), or the level probabilities' summary
      (logits mode); kept so a researcher can see why a score is what it is.
    error: None, or a message naming the cause.
    error_kind: a short machine-readable cause (`image`, `parse`, `oom`, `worker_died`,
      `worker_timeout`, ...).
    device: which device produced it (`cuda:0`, `cpu`, `cpu#1`).
    latency_s: the model's time on the item, in seconds: the sum over its prompts (a rubric asks
      one per part) of each prompt's share of the batch that ran it. A static batch's time is
      divided among its prompts. Under continuous batching (generate mode) the decode's time is
      divided among its slots: a prompt counts the time from its prefill to its end, divided by
      the number of slots, but not the time it sat prefilled ahead waiting for a slot (the rows
      decoding meanwhile count that). Not the item's wall-clock wait: queued time is not in it.
    index: the item's position in the call's input.
    """

    index: int
    id: str | None = None
    score: float | None = None
    sub_scores: dict[str, float | None] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None
    device: str | None = None
    latency_s: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.score is not None

    def to_dict(self) -> dict[str, Any]:
        """The fields by name. The dicts, lists and tuples in them are new ones (a dataclass inside
        becomes the dict of its fields, as dataclasses.asdict makes it), so changing the dict leaves
        the result as it was; numbers and text are shared, as they cannot change. Any other value
        is a deep copy where it copies, and the value itself where it does not (a lock, a
        mappingproxy, a generator, which a judge class of the user's may put in a result: asdict
        raised TypeError on them), for the form that carries the result on to name
        (result_form.py: the job's files, the service's answers; the worker channel)."""
        return {f.name: _copied(getattr(self, f.name), {}) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScoreResult":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def failure(cls, index: int, item: ScoreItem | None, error: str, kind: str,
                device: str | None = None) -> "ScoreResult":
        return cls(index=index, id=item.id if item else None, score=None, error=error, error_kind=kind,
                   device=device, metadata=result_metadata(item))


_SHARED = (str, int, float, bool, type(None), bytes)  # values to_dict need not copy: none can change


def _copied(value: Any, memo: dict[int, Any]) -> Any:
    """`value` for ScoreResult.to_dict: plain containers made anew (a container that holds itself
    as a copy that holds itself: `memo`, by id), plain values shared, anything else deep-copied
    where it copies and kept where it does not."""
    if type(value) in _SHARED:
        return value
    if id(value) in memo:
        return memo[id(value)]
    if type(value) is tuple:
        return tuple(_copied(v, memo) for v in value)
    if type(value) is list:
        items: list[Any] = []
        memo[id(value)] = items
        items.extend(_copied(v, memo) for v in value)
        return items
    a_dataclass = dataclasses.is_dataclass(value) and not isinstance(value, type)
    if a_dataclass or type(value) is dict:
        copied: dict[Any, Any] = {}
        memo[id(value)] = copied
        pairs = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value)) if a_dataclass else value.items()
        copied.update((k, _copied(v, memo)) for k, v in pairs)
        return copied
    try:
        return copy.deepcopy(value)
    except Exception:  # it does not copy: the carrier that cannot take it says so, naming the field
        return value


def metadata_problem(metadata: Any) -> str | None:
    """Why an item's metadata cannot be carried into its result (it is no dict), or None."""
    if isinstance(metadata, dict):
        return None
    return f"metadata must be a dict (free data carried into the result), got {type(metadata).__name__}"


def carried_metadata(item: ScoreItem | None) -> dict[str, Any]:
    """A copy of the item's metadata for its result: {} for none, or for metadata that is no
    mapping (set after the item was made; preparation fails such an item)."""
    meta = item.metadata if item is not None else None
    return dict(meta) if isinstance(meta, Mapping) else {}


def result_metadata(item: ScoreItem | None, notes: Sequence[str] = ()) -> dict[str, Any]:
    """A result's metadata: the item's (carried_metadata), with the judge's notes (with_judge_notes)."""
    meta = carried_metadata(item)
    return with_judge_notes(meta, meta, notes)


# Where a result's metadata keeps the judge's notes (a clamped score, an animated GIF's first frame)
# when the item's own metadata has a `notes` field: with_judge_notes.
JUDGE_NOTES = "judge_notes"


def with_judge_notes(metadata: dict[str, Any], own: dict[str, Any], notes: Sequence[str]) -> dict[str, Any]:
    """A result's `metadata` with the judge's `notes` added after those it holds. They go under
    `notes`; where the item's own metadata `own` has a `notes` field (a manifest's column), that
    field stays as the item gave it, and the judge's notes go under `judge_notes`, which every such
    item then has ([] when the judge has none): a reader, and a job resuming from its stream, can
    always tell the item's notes from the judge's."""
    key = JUDGE_NOTES if "notes" in (own or {}) else "notes"
    if not notes and (key == "notes" or key in metadata):
        return metadata
    have = metadata.get(key)
    have = list(have) if isinstance(have, list) else ([] if have is None else [have])
    return {**metadata, key: have + list(notes)}


def item_name(item: ScoreItem, index: int) -> str:
    """How an error names an item: its id and position, or its position."""
    return f"{item.id!r} (#{index})" if item.id is not None else f"#{index}"


def renumber(result: ScoreResult, item: ScoreItem, index: int) -> ScoreResult:
    """`result`, scored as item `result.index` of a batch of its own (requests joined, one split,
    a part sent alone), moved to place `index` of its caller's call: its error, which names the
    item by its place in that batch, names it by `index`. An error that is no text, from a judge
    class of the user's, is left as it is: its carrier fails the item (result_form.error_problem)."""
    if isinstance(result.error, str) and result.error and result.index != index:
        old = item_name(item, result.index)
        for lead in ("item ", "chat request "):
            if result.error.startswith(lead + old):
                result.error = lead + item_name(item, index) + result.error[len(lead + old):]
                break
    result.index = index
    return result


def describe_image(img: ImageInput) -> str:
    """A short name for an image in error messages."""
    if isinstance(img, (str, os.PathLike)):
        return os.fspath(img)
    if isinstance(img, (bytes, bytearray)):
        return f"<{len(img)} bytes>"
    return f"<{type(img).__name__}>"


def as_items(images: Sequence[Any], original_images: Sequence[Any] | None = None,
             instructions: Sequence[str | None] | None = None,
             ids: Sequence[str | None] | None = None) -> list[ScoreItem]:
    """Build items from parallel lists: the image-editing benchmarks' call shape.

    Each entry of `images` (and of `original_images`) is one image or a list of images.
    """
    n = len(images)
    for name, seq in (("original_images", original_images), ("instructions", instructions), ("ids", ids)):
        if seq is not None and len(seq) != n:
            raise JudgeInputError(f"{name} has {len(seq)} entries but there are {n} images; they must match one to one")
    return [ScoreItem(images=images[i],
                      source_images=(original_images[i] if original_images is not None else []),
                      instruction=(instructions[i] if instructions is not None else None),
                      id=(ids[i] if ids is not None else None))
            for i in range(n)]


def _source(img: ImageInput, name: str) -> Any:
    """What `Image.open` reads for a path or bytes input; ValueError naming the image otherwise."""
    if isinstance(img, (str, os.PathLike)):
        if "\0" in os.fspath(img):
            raise ValueError(f"image path contains a NUL byte: {name!r}")
        p = Path(img)
        try:
            if not p.exists():
                raise ValueError(f"image not found: {name}")
            if p.is_dir():
                raise ValueError(f"image path is a folder: {name}")
            if p.stat().st_size == 0:
                raise ValueError(f"image file is empty: {name}")
        except OSError as e:  # a name the OS refuses (too long), or a folder it may not search
            raise ValueError(f"cannot read image path ({e.strerror or e}): {name}") from None
        return p
    if isinstance(img, (bytes, bytearray)):
        if not img:
            raise ValueError("image bytes are empty")
        return io.BytesIO(img)
    raise ValueError(f"unsupported image type {type(img).__name__}; give a path, bytes or a PIL image")


_PILLOW_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+)")


class ImageTooLarge(JudgeInputError):
    """An image refused for its size, from its header; `pixels` is its width x height (None when
    only Pillow's own guard knows it is over)."""

    def __init__(self, message: str, pixels: int | None):
        super().__init__(message)
        self.pixels = pixels


def _too_large(w: int, h: int, limit: int, name: str) -> ImageTooLarge:
    return ImageTooLarge(f"image too large: {w}x{h} = {w * h} pixels, over max_image_pixels={limit} "
                         f"(a decompression-bomb guard; raise max_image_pixels to allow it): {name}", w * h)


# Formats Pillow reads only by running another program: EPS runs Ghostscript (`gs`, where it is
# installed) on the file, so a client of the service could hand PostScript to it.
_REFUSED_FORMATS = ("EPS",)


def _accepted_formats() -> list[str]:
    from PIL import Image

    Image.init()  # registers every plug-in, as Image.open would
    return [f for f in Image.OPEN if f not in _REFUSED_FORMATS]


def _postscript(src: Any) -> bool:
    """Whether a path or stream starts as PostScript or a DOS EPS file does."""
    try:
        if isinstance(src, io.BytesIO):
            head = src.getvalue()[:4]
        else:
            with open(src, "rb") as fh:
                head = fh.read(4)
    except OSError:
        return False
    return head in (b"%!PS", b"\xc5\xd0\xd3\xc6")


def open_image(img: ImageInput, max_image_pixels: int | None, name: str | None = None):
    """`Image.open` for a path or bytes, with the size checked from the header before any pixel is
    decoded. Returns the open (lazy) image; the caller closes it.

    PostScript (EPS) is not read: Pillow would run Ghostscript on it (`_REFUSED_FORMATS`).
    The check is explicit and per call: this never changes Pillow's process-wide
    `Image.MAX_IMAGE_PIXELS` (other threads, the report's thumbnails and the caller's own code rely
    on it). Pillow's own guard stays in force as well: it refuses images over twice that global
    (178,956,970 pixels by default), whatever `max_image_pixels` says.
    """
    from PIL import Image

    name = describe_image(img) if name is None else name
    src = _source(img, name)
    try:
        opened = Image.open(src, formats=_accepted_formats())
    except Image.DecompressionBombError as e:
        m = _PILLOW_BOMB.search(str(e))
        pixels = int(m.group(1)) if m else None
        if max_image_pixels is not None and (pixels is None or pixels > max_image_pixels):
            shown = pixels if pixels is not None else f"more than {m.group(2) if m else '?'}"
            raise ImageTooLarge(f"image too large: {shown} pixels, over max_image_pixels={max_image_pixels} "
                                f"(a decompression-bomb guard; raise max_image_pixels to allow it): {name}",
                                pixels) from None
        raise ImageTooLarge(f"image too large: {e} Pillow refuses it whatever max_image_pixels says "
                            f"(PIL.Image.MAX_IMAGE_PIXELS, a process-wide setting, decides): {name}", pixels) from None
    except (OSError, SyntaxError) as e:
        if _postscript(src):
            raise ValueError(f"cannot decode image {name}: PostScript (EPS) images are not read (Pillow would "
                             "run Ghostscript on them); convert it to PNG") from None
        raise ValueError(f"cannot decode image {name}: {e}") from None
    w, h = opened.size
    if max_image_pixels is not None and w * h > max_image_pixels:
        opened.close()
        raise _too_large(w, h, max_image_pixels, name)
    return opened


def image_pixels(img: ImageInput) -> int | None:
    """Width x height, read from the file's header (no pixels decoded), or None when the input is
    not a readable image; a PIL image gives its own size."""
    from PIL import Image

    if isinstance(img, Image.Image):
        return img.width * img.height
    try:
        with open_image(img, None) as opened:
            return opened.width * opened.height
    except ImageTooLarge as e:  # over Pillow's own guard: its message holds the count
        return e.pixels
    except ValueError:
        return None


def load_pil(img: ImageInput, max_image_pixels: int | None = None):
    """Open an image input as an RGB PIL image, applying EXIF rotation.

    max_image_pixels: larger images are refused from their header, before decoding (a PIL image
    given directly is already decoded and is checked too).
    Raises ValueError with a message naming the image and the cause; the judge turns it into
    that item's error.
    """
    from PIL import Image, ImageOps

    name = describe_image(img)
    if isinstance(img, Image.Image):
        im = img
        if max_image_pixels is not None and im.width * im.height > max_image_pixels:
            raise _too_large(im.width, im.height, max_image_pixels, name)
    else:
        opened = open_image(img, max_image_pixels, name)
        try:
            with opened:
                frames = getattr(opened, "n_frames", 1)
                opened.seek(0)
                opened.load()
                im = opened.copy()
                if frames > 1:
                    im.info["frames_note"] = f"first of {frames} frames used"
        except (OSError, SyntaxError, EOFError) as e:
            raise ValueError(f"cannot decode image {name}: {e}") from None
    note = im.info.get("frames_note")
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a malformed EXIF block must not cost the image
        pass
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: map the bit depth's range onto 8 bits, as a viewer does, instead of
        # clipping everything to white. Not by the image's own maximum: that would brighten a dark
        # image. A 32-bit image holding 8- or 16-bit values is read as such; wider ones by their max.
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        top = arr.max()
        if im.mode.startswith("I;16") or 255 < top <= 65535:
            full = 65535.0
        elif top <= 255:
            full = 255.0
        else:
            full = top
        im = Image.fromarray((arr * (255.0 / full)).round().clip(0, 255).astype("uint8"), mode="L")
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        # Composite transparency on white, the way a viewer shows it.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    im = im.convert("RGB")
    if note:
        im.info["frames_note"] = note
    return im
