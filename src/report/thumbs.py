"""Thumbnails embedded in the page: each distinct image path is read and encoded once.

A page for 10,000 edits names 20,000 images, many of them shared (one source, many edits), so
thumbnails are keyed by path and the page refers to them by number. Past `max_thumbs` distinct
images the rest are listed by path without pixels, which keeps the file small enough to open;
the caller decides which paths come first (best, worst and failed items before the rest).
"""
from __future__ import annotations

import base64
import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Thumb:
    path: str                  # as the record names it
    base: Path                 # the folder of the results file that named it
    data_uri: str | None = None  # a small JPEG, or None with `reason`
    reason: str | None = None  # why there is no picture: missing, unreadable, over a limit


class ThumbCache:
    """path -> index into `thumbs`; `want()` registers, `build()` reads the registered files.

    max_pixels: an image larger than this (read from its header) is listed without a picture
    instead of being decoded: a 25000x25000 PNG of a few MB would take gigabytes. Checked here for
    each file; Pillow's process-wide guard is not relied on (nor changed).
    """

    def __init__(self, px: int = 96, quality: int = 70, max_thumbs: int = 2000, workers: int = 2,
                 max_pixels: int = 100_000_000):
        self.px = px
        self.max_pixels = max_pixels
        self.quality = quality
        self.max_thumbs = max_thumbs
        self.workers = workers
        self.thumbs: list[Thumb] = []
        self._index: dict[tuple[str, Path | None], int] = {}

    def want(self, path: str, base: Path) -> int:
        key = (path, base if not Path(path).is_absolute() else None)
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self.thumbs)
            self.thumbs.append(Thumb(path=path, base=base))
        return i

    @staticmethod
    def _resolve(t: Thumb) -> Path | None:
        # Job records hold absolute paths; a hand-made file may hold paths relative to itself.
        p = Path(t.path).expanduser()
        if p.is_absolute():
            return p if p.exists() else None
        for cand in (t.base / p, p):
            if cand.exists():
                return cand
        return None

    def _encode(self, t: Thumb) -> tuple[str | None, str | None]:
        p = self._resolve(t)
        if p is None:
            return None, "missing: file not found"
        if p.is_dir():
            return None, "missing: the path is a folder"
        try:
            from src.models.reward.types import ImageTooLarge, load_pil, open_image

            try:
                im = open_image(p, self.max_pixels)
            except ImageTooLarge as e:
                size = f"{e.pixels} pixels" if e.pixels else "too many pixels"
                return None, f"not embedded: {size}, over the thumbnail limit of {self.max_pixels} (max_pixels)"
            with im:
                # JPEG can decode at 1/2, 1/4, 1/8 size directly: far faster for big photos.
                im.draft("RGB", (self.px * 2, self.px * 2))
                im.load()
                rgb = load_pil(im.copy())
            rgb.thumbnail((self.px, self.px))
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=self.quality, optimize=True)
        except Exception as e:  # any undecodable file is one placeholder, never a failed report
            return None, f"unreadable: {type(e).__name__}: {e}"
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), None

    def build(self) -> None:
        """Encode the first `max_thumbs` registered paths (in registration order)."""
        todo = self.thumbs[:self.max_thumbs]
        for t in self.thumbs[self.max_thumbs:]:
            t.reason = f"not embedded: over the limit of {self.max_thumbs} thumbnails (max_thumbs)"
        if not todo:
            return
        try:
            import PIL  # noqa: F401
        except ImportError:  # every image would say "unreadable": say once what is missing instead
            why = f"not embedded: Pillow is not installed in this Python ({sys.executable})"
            print(f"report: no thumbnails: Pillow is not installed in {sys.executable}; "
                  "run the report with the project's environment (.venv/bin/python)", file=sys.stderr)
            for t in todo:
                t.reason = why
            return
        workers = max(1, min(self.workers, len(todo), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="thumb") as pool:
            for t, (uri, why) in zip(todo, pool.map(self._encode, todo)):
                t.data_uri, t.reason = uri, why

    def counts(self) -> dict[str, int]:
        out = {"embedded": 0, "missing": 0, "unreadable": 0, "not embedded": 0}
        for t in self.thumbs:
            if t.data_uri:
                out["embedded"] += 1
            else:
                out[(t.reason or "unreadable").split(":")[0]] += 1
        return out
