"""Synthetic judging tasks with known answers, for training and checking the tiny judge.

A random-weight judge proves plumbing, not scoring. These tasks have a right answer by
construction, so a judge trained on them can be checked on fresh items (another seed):

- edit instruction-following (template `edit_instruction`): a source image with one coloured
  shape, an instruction (`make the square blue`, `turn the circle into a triangle`) and an edited
  image that followed it (target 9), changed the right attribute but also another one (3), changed
  it the wrong way (1), or changed nothing (0);
- image quality (template `quality`): a scene of shapes with noise blotches over a known share
  of the image, level k of 0..9 covering k/10 of it; target 9 - k. Mild blur or faint noise is
  beyond a 112-pixel tiny vision tower; blotches of random pixels are large, local and obvious.

Public API: `edit_items`, `quality_items` (lists of `ScoreItem` carrying PIL images, with the
truth in `metadata`), `edit_accuracy`, `quality_spearman`, `spearman`, `write_demo`
(`python -m src.models.synthetic --demo data/demo` writes the demo set).
Only pillow, numpy and this package are imported.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .. import stats
from .reward.types import ScoreItem

SIZE = 112  # the judge's input size: 4 x 4 merged vision tokens per image at patch 14
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 190),
}
SHAPES = ("square", "circle", "triangle")
# Edit scenes draw one large shape (88 of 112 pixels across) near the centre (a few pixels of
# jitter), so the three shapes differ in area (square 100%, circle 79%, triangle 50%) and in how
# much of the corner and edge vision tokens they fill: cues a tiny vision tower picks up fast.
# With a 60-pixel shape anywhere in the image, or a 72-pixel one at the centre, square and circle
# fill nearly the same tokens and a CPU budget of training never told them apart.
SHAPE_RADIUS = 44
SHAPE_JITTER = 4
# Neutral and pale backgrounds, far from every shape colour.
BACKGROUNDS = ((238, 238, 238), (190, 190, 190), (70, 70, 70), (245, 235, 215), (215, 228, 242))

# The edit task's truth, on the templates' 0..9 scale.
EDIT_TARGETS = {"followed": 9, "side_effect": 3, "wrong": 1, "unchanged": 0}
COLOUR_PHRASES = ("make the {shape} {colour}", "change the {shape} to {colour}", "colour the {shape} {colour}")
SHAPE_PHRASES = ("turn the {shape} into a {new}", "replace the {shape} with a {new}")
INSTRUCTION_KINDS = ("colour", "shape")
QUALITY_LEVELS = 10  # level k covers k/10 of the image


def draw_shape(img: Image.Image, shape: str, colour: tuple[int, int, int], cx: int, cy: int, r: int) -> None:
    d = ImageDraw.Draw(img)
    if shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        d.polygon(((cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _scene(shape: str, colour: str, bg: tuple[int, int, int], cx: int, cy: int, r: int, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), bg)
    draw_shape(img, shape, COLOURS[colour], cx, cy, r)
    return img


def _other(rng: random.Random, options: Sequence[str], *exclude: str) -> str:
    return rng.choice([o for o in options if o not in exclude])


def edit_items(n: int, seed: int, size: int = SIZE, kinds: Sequence[str] = INSTRUCTION_KINDS,
               outcome_weights: Mapping[str, float] | None = None) -> list[ScoreItem]:
    """n edit cases: by default half followed the instruction and the rest split evenly over the
    three failures (`outcome_weights` changes that, e.g. for training on the hard cases);
    instructions of the given kinds (`colour`: make the square blue, `shape`: turn the square
    into a circle).

    metadata: task, kind (followed / side_effect / wrong / unchanged), instruction_kind (colour /
    shape), target (the right score), category (instruction_kind, for job summaries), source and
    edited (what each image shows, e.g. `red square`), asked (the colour or shape asked for)."""
    if outcome_weights is not None and set(outcome_weights) - set(EDIT_TARGETS):
        raise ValueError(f"outcome_weights: unknown outcome(s) {sorted(set(outcome_weights) - set(EDIT_TARGETS))}")
    unknown = set(kinds) - set(INSTRUCTION_KINDS)
    if unknown or not kinds:
        raise ValueError(f"instruction kinds {sorted(kinds)}: expected some of {INSTRUCTION_KINDS}")
    rng = random.Random(seed)
    items = []
    for i in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        bg = rng.choice(BACKGROUNDS)
        r = SHAPE_RADIUS * size // SIZE
        j = SHAPE_JITTER * size // SIZE
        cx, cy = size // 2 + rng.randint(-j, j), size // 2 + rng.randint(-j, j)
        if outcome_weights is None:
            kind = "followed" if rng.random() < 0.5 else rng.choice(("side_effect", "wrong", "unchanged"))
        else:
            kind = rng.choices(list(outcome_weights), weights=list(outcome_weights.values()))[0]
        if rng.choice(kinds) == "colour":
            ikind, new = "colour", _other(rng, list(COLOURS), colour)
            instruction = rng.choice(COLOUR_PHRASES).format(shape=shape, colour=new)
            out_shape, out_colour = {
                "followed": (shape, new),
                "side_effect": (_other(rng, SHAPES, shape), new),       # right colour, shape changed too
                "wrong": (shape, _other(rng, list(COLOURS), colour, new)),  # another colour
                "unchanged": (shape, colour),
            }[kind]
        else:
            ikind, new = "shape", _other(rng, SHAPES, shape)
            instruction = rng.choice(SHAPE_PHRASES).format(shape=shape, new=new)
            out_shape, out_colour = {
                "followed": (new, colour),
                "side_effect": (new, _other(rng, list(COLOURS), colour)),  # right shape, colour changed too
                "wrong": (_other(rng, SHAPES, shape, new), colour),        # another shape
                "unchanged": (shape, colour),
            }[kind]
        source = _scene(shape, colour, bg, cx, cy, r, size)
        edited = _scene(out_shape, out_colour, bg, cx, cy, r, size)
        items.append(ScoreItem(images=[edited], source_images=[source], instruction=instruction,
                               id=f"edit-{seed}-{i}",
                               metadata={"task": "edit", "kind": kind, "instruction_kind": ikind,
                                         "category": ikind, "target": EDIT_TARGETS[kind],
                                         "source": f"{colour} {shape}", "edited": f"{out_colour} {out_shape}",
                                         "asked": new}))
    return items


def blotch(img: Image.Image, share: float, rng: random.Random) -> tuple[Image.Image, float]:
    """Cover about `share` of the image with rectangles of random pixels; returns (image, share covered)."""
    arr = np.asarray(img, dtype=np.uint8).copy()
    h, w = arr.shape[:2]
    mask = np.zeros((h, w), dtype=bool)
    nrng = np.random.default_rng(rng.getrandbits(63))
    while mask.mean() < share - 0.02:
        bw, bh = rng.randint(w // 12, w // 3), rng.randint(h // 12, h // 3)
        x, y = rng.randint(0, w - bw), rng.randint(0, h - bh)
        mask[y:y + bh, x:x + bw] = True
    covered = float(mask.mean())
    arr[mask] = nrng.integers(0, 256, size=(int(mask.sum()), 3), dtype=np.uint8)
    return Image.fromarray(arr), covered


def quality_items(n: int, seed: int, size: int = SIZE, levels: Sequence[int] | None = None) -> list[ScoreItem]:
    """n scenes with noise over k/10 of the image, level k = levels[i] (default i mod 10, so levels
    are balanced). Half the scenes are one to three small shapes, half one large shape near the
    centre like the edit scenes (so that an edited image is a scene the judge knows: trained on
    small shapes only, it read a clean large shape as noise). metadata: task, level, covered,
    scene (shapes / single), target (9 - level), category."""
    if levels is not None and len(levels) != n:
        raise ValueError(f"levels has {len(levels)} entries for {n} items")
    rng = random.Random(seed)
    items = []
    for i in range(n):
        level = levels[i] if levels is not None else i % QUALITY_LEVELS
        if not 0 <= level < QUALITY_LEVELS:
            raise ValueError(f"quality level {level} is outside 0..{QUALITY_LEVELS - 1}")
        bg = rng.choice(BACKGROUNDS)
        scene = rng.choice(("shapes", "single"))
        if scene == "single":
            r, j = SHAPE_RADIUS * size // SIZE, SHAPE_JITTER * size // SIZE
            img = _scene(rng.choice(SHAPES), rng.choice(list(COLOURS)), bg,
                         size // 2 + rng.randint(-j, j), size // 2 + rng.randint(-j, j), r, size)
        else:
            img = Image.new("RGB", (size, size), bg)
            for _ in range(rng.randint(1, 3)):
                r = rng.randint(size // 10, size // 5)
                draw_shape(img, rng.choice(SHAPES), COLOURS[rng.choice(list(COLOURS))],
                           rng.randint(r, size - r - 1), rng.randint(r, size - r - 1), r)
        img, covered = blotch(img, level / QUALITY_LEVELS, rng)
        items.append(ScoreItem(images=[img], id=f"quality-{seed}-{i}",
                               metadata={"task": "quality", "level": level, "covered": round(covered, 4), "scene": scene,
                                         "category": f"noise{level}", "target": QUALITY_LEVELS - 1 - level}))
    return items


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get average ranks); nan when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two sequences of equal length >= 2, got {len(x)} and {len(y)}")
    rho = stats.spearman(list(x), list(y))
    return float("nan") if rho is None else rho


def edit_accuracy(scores: Sequence[float | None], items: Sequence[ScoreItem], middle: float = 4.5) -> float:
    """Share of edit items judged on the right side of `middle` (a missing score counts as wrong)."""
    right = sum(1 for s, it in zip(scores, items, strict=True)
                if s is not None and (s > middle) == (it.metadata["target"] > middle))
    return right / len(items)


def quality_spearman(scores: Sequence[float | None], items: Sequence[ScoreItem]) -> float:
    """Spearman correlation of the scores with the true quality (9 - level); needs every score."""
    missing = [it.id for s, it in zip(scores, items, strict=True) if s is None]
    if missing:
        raise ValueError(f"{len(missing)} quality item(s) have no score, e.g. {missing[:3]}")
    return spearman(scores, [it.metadata["target"] for it in items])


# ---------------------------------------------------------------------------------------------
# Demo data
# ---------------------------------------------------------------------------------------------


def write_demo(out_dir: str | Path, seed: int = 2024, n_edit: int = 8, noise_levels: Sequence[int] = (2, 5, 8),
               kinds: Sequence[str] = ("colour",)) -> Path:
    """Write a small demo set for the `edit` rubric: PNGs and a manifest.jsonl of edits (source,
    edited, instruction, category) whose truth rides along (`kind`, `target`, `noise_level`).
    `n_edit` clean edits (colour instructions, what the shipped tiny judge was trained on, by
    default), every other one followed and the rest cycling through the failures, then one edit
    per noise level that followed its instruction but came out with noise blotches (a low
    perceptual-quality score). Returns the manifest path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    failures = ("side_effect", "wrong", "unchanged")
    outcomes = ["followed" if k % 2 == 0 else failures[(k // 2) % len(failures)] for k in range(n_edit)]
    for k, outcome in enumerate(outcomes):
        it, = edit_items(1, seed * 1000 + k, kinds=kinds, outcome_weights={outcome: 1.0})
        src, dst = f"images/{k:02d}_source.png", f"images/{k:02d}_edited.png"
        it.source_images[0].save(out / src, optimize=True)
        it.images[0].save(out / dst, optimize=True)
        rows.append({"id": f"{k:02d}", "source_image": src, "image": dst, "instruction": it.instruction,
                     "category": it.metadata["kind"], "kind": it.metadata["kind"], "target": it.metadata["target"]})
    noisy = edit_items(len(noise_levels), seed + 1, kinds=kinds, outcome_weights={"followed": 1.0})
    rng = random.Random(seed + 2)
    for level, it in zip(noise_levels, noisy):
        k = len(rows)
        dst_img, covered = blotch(it.images[0], level / QUALITY_LEVELS, rng)
        src, dst = f"images/{k:02d}_source.png", f"images/{k:02d}_edited.png"
        it.source_images[0].save(out / src, optimize=True)
        dst_img.save(out / dst, optimize=True)
        rows.append({"id": f"{k:02d}", "source_image": src, "image": dst, "instruction": it.instruction,
                     "category": "noisy", "kind": "followed", "target": EDIT_TARGETS["followed"],
                     "noise_level": level, "covered": round(covered, 4)})
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m src.models.synthetic",
                                description="Write the demo set (PNGs + manifest.jsonl) of synthetic edits.")
    p.add_argument("--demo", required=True, help="output folder, e.g. data/demo")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--kinds", default="colour", help="instruction kinds: colour, shape or colour,shape")
    args = p.parse_args(argv)
    print(write_demo(args.demo, args.seed, kinds=tuple(args.kinds.split(","))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
