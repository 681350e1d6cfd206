"""Less work per item (issue 17): vision features reused across a rubric's parts, and continuous
batching on answers of different lengths, each against the same library with the feature off.

Stage `edit`: the `edit` rubric (two questions, the second about the edited image the first also
shows), logits mode, `--n` items of two images (distinct sources), library defaults; the vision
reuse on (`vision_reuse: true`) vs off (`engine._vision_reuse.enabled = False` on the same loaded
judge: it computes the same features). Recorded: items/s, images through the tower, max |score diff|.

Stage `shared`: the `edit` rubric on items whose source images repeat (`--models` edits of each
source, ordered model by model), on the same loaded judge: chunks cut in input order (each source
back in every chunk; `chunk_order: input`) with the vision features kept beyond a chunk
(`vision_cache_mb`: each budget of `--cache-mb`, default the library's) vs not (0), then the
library's order (items sharing a source in one chunk) with no store and with each budget.
Recorded: items/s, images through the tower, max |score diff| against input order with no store.

Stage `lengths`: generate mode, one image per item, every item with its own answer budget drawn
uniformly from `--len-min`..`--len-max` (seeded) through the public per-item setting
metadata {"max_new_tokens": n}; min_new_tokens = max_new_tokens so that random weights, which
never write an end token on purpose, answer exactly that long. Continuous batching (true) vs
static batches (continuous_batching=false), same settings. Recorded: items/s, fraction of answers
identical between the two (bf16: batch composition can flip near-ties), and the continuous decode's
steps and joining batches.

Stage `fixed`: the same with every answer `--fixed-len` tokens (128): every row of a batch ends at
one step, so the prompts that take the freed slots join as a whole batch, as a static batch starts.
Continuous batching should cost what static batches cost here (it was off by default for this case).

Stage `staging`: the `lengths` items through one loaded judge with continuous batching, prompts
prefilled ahead on a second stream (`--stage`, default the library's) vs joins prefilled when their
slots free up (stage 0). Recorded: each run's time and decode counters, and the fraction of
identical answers: the check that staging computes the same tokens (bf16 on the GPU: batch
composition can flip near-ties, as between static and continuous; float32 on the CPU: all).

Stage `sizes` (issue 15: prompts sorted by size within a call): logits mode, the `quality`
rubric, `--n` JPEG files of six sizes and aspect ratios (scaled from `--width`: 1024x768,
768x1024, 512x384, 768x768, 1280x720, 640x640), interleaved then shuffled (seeded), on one loaded
judge: batches cut in the order given (`chunk_order: input`) vs the library's (`auto`: similar
sizes together, largest first). One untimed call in each order first (kernels for every shape),
then `--reps` timed calls of each, alternating. Recorded per order: items/s (mean and each call),
the padded share of the token positions fed to the language model (attention-mask zeros, counted
from the processor's output in the prepare thread), the share of batches whose images all have
one patch count (where `grouped` vision attention applies), and max |score diff| between the
orders. Run it with `--judge compile_after_items=64` and enough items that each size fills
batches (`--n 512`): the automatic compile then happens in the warm-up, and the timing is the
steady state (recorded: `compiled_during_timing`).

    python benchmarks/reuse_gpu.py --size qwen3_vl-8b [--stages edit,edit_shared,shared,lengths,fixed,staging,sizes] [--n 128] [--bs 32]
    python benchmarks/reuse_gpu.py --smoke      # CPU, tiny model, seconds (CI)

The device image has no qwen-vl-utils: carry its wheel (requirements-worker.txt's version) and put
it on PYTHONPATH first, or every item fails in preparation (the script then stops, saying so).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import pathlib
import random
import shutil
import statistics
import sys
import tempfile
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_gpu import make_images  # noqa: E402
from benchmarks import runs  # noqa: E402


def _check(res: list, what: str) -> dict[str, Any]:
    """Errors of a timed call; a call whose items all failed is no measurement: stop, saying why."""
    bad = [r for r in res if r.error is not None and r.error_kind != "parse"]  # random weights write no score
    if res and len(bad) == len(res):
        raise SystemExit(f"{what}: every item failed, e.g. {bad[0].error}")
    return {"errors": len(bad), "first_error": bad[0].error if bad else None}


def _edit_items(a, shared: bool) -> tuple[list, int]:
    """`--n` edit items of an edited image and its source: each its own source, or (`shared`)
    `--models` edits of each of n/models sources, ordered model by model. Returns (items, sources)."""
    from src.models.reward.types import ScoreItem

    if shared:
        n_src = a.n // a.models
        imgs = make_images(None, a.n + n_src, a.width, a.height)
        pairs = [(imgs[i], imgs[a.n + i % n_src]) for i in range(a.n)]
    else:
        n_src = a.n
        imgs = make_images(None, 2 * a.n, a.width, a.height)
        pairs = [(imgs[2 * i], imgs[2 * i + 1]) for i in range(a.n)]
    items = [ScoreItem(images=[edited], source_images=[source], instruction="make the sky red") for edited, source in pairs]
    return items, n_src


def stage_edit(model_dir: str, a, cuda: bool, shared: bool = False) -> dict[str, Any]:
    """The edit rubric on `--n` items, vision reuse off (the tower runs for each image each part
    shows: three passes an item) against on (the default), alternating on one loaded judge, the
    store emptied before each call. Each item its own source image, or with `shared` (stage
    edit_shared) `--models` edits of each of n/models sources, ordered model by model, as a
    benchmark scored for several editing models in one call."""
    from src.models.reward.implementations.local import QwenVLRewardModel

    items, n_src = _edit_items(a, shared)
    out: dict[str, Any] = {"items": a.n, "reps": a.reps, "sources": n_src}
    scores = {}
    with QwenVLRewardModel(model_name=model_dir, device=a.device, template="edit", batch_size=a.bs,
                           **{**runs.judge_settings(a), "vision_reuse": True}) as judge:
        engine = judge.engine
        reuse = engine._vision_reuse
        # Warm-up, untimed: one call of the timed shape in each setting (kernels, allocator, and the
        # automatic compile where --judge compile_after_items is under the call's items).
        for on in (True, False):
            reuse.enabled = on
            reuse.clear()
            runs.timed(judge, items, cuda)
        compiled = len(engine._compiled)
        runs_s: dict[bool, list[float]] = {True: [], False: []}
        counts: dict[bool, dict[str, Any]] = {}
        for _ in range(a.reps):  # alternating, on one loaded judge
            for on in (True, False):
                reuse.enabled = on
                reuse.clear()  # what one call saves is measured (`shared`: beyond it)
                enc0, reu0 = reuse.encoded, reuse.reused
                dt, res = runs.timed(judge, items, cuda)
                runs_s[on].append(dt)
                scores[on] = [r.score for r in res]
                counts[on] = {"images_encoded": reuse.encoded - enc0 if on else 3 * a.n,
                              "images_reused": reuse.reused - reu0,
                              **_check(res, f"edit, reuse {'on' if on else 'off'}")}
        for on in (True, False):
            each = [round(a.n / dt, 3) for dt in runs_s[on]]
            out["reuse_on" if on else "reuse_off"] = {
                "items_per_s": round(a.n * len(each) / sum(runs_s[on]), 3),
                "items_per_s_median": round(statistics.median(each), 3), "items_per_s_each": each, **counts[on]}
        out["compiled_during_timing"] = len(engine._compiled) != compiled
    diffs = [abs(x - y) for x, y in zip(scores[True], scores[False]) if x is not None and y is not None]
    out["speedup"] = round(out["reuse_on"]["items_per_s"] / out["reuse_off"]["items_per_s"], 3)
    out["speedup_median"] = round(out["reuse_on"]["items_per_s_median"] / out["reuse_off"]["items_per_s_median"], 3)
    out["max_abs_score_diff"] = max(diffs) if diffs else None
    return out


def stage_shared(model_dir: str, a, cuda: bool) -> dict[str, Any]:
    """Source images shared across chunks: the edit rubric on `--n` items, `--models` edits of each
    of n/models sources, ordered model by model (as a benchmark scored for several editing models
    in one call). On one loaded judge, each run with the store emptied first:
    - as chunks see the input (`chunk_order: input`): each source comes back once per
      chunk of `--bs` items; the store kept beyond a chunk (vision_cache_mb: each of `--cache-mb`,
      default the library's) vs none (0): what the store alone saves;
    - the library's order (items sharing a source cut into the same chunk, grouping.py), with no
      store (0) and with each budget: what grouping saves, and what the store adds to it.
    Speed-ups and score differences against the first: input order, no store."""
    from src.models.reward.implementations.local import QwenVLRewardModel

    items, n_src = _edit_items(a, shared=True)
    out: dict[str, Any] = {"items": a.n, "sources": n_src, "models": a.models, "kept": [], "grouped": []}
    with QwenVLRewardModel(model_name=model_dir, device=a.device, template="edit", batch_size=a.bs,
                           **runs.judge_settings(a)) as judge:
        engine = judge.engine
        reuse = engine._vision_reuse
        budgets = [reuse.cache_bytes] if not a.cache_mb else [float(mb) * 1e6 for mb in a.cache_mb.split(",")]
        runs.timed(judge, items[:2 * a.bs], cuda)  # warm-up (kernels, allocator; a compile due at --judge
        compiled = len(engine._compiled)        # compile_after_items <= bs happens here), untimed
        base_scores: list = []
        for grouped, cache in [(False, 0.0), *((False, c) for c in budgets), (True, 0.0), *((True, c) for c in budgets)]:
            _chunk_order(judge, "auto" if grouped else "input")  # one image size: auto is the grouping alone
            reuse.cache_bytes = cache
            reuse.clear()
            enc0, reu0 = reuse.encoded, reuse.reused
            dt, res = runs.timed(judge, items, cuda)
            scores = [r.score for r in res]
            what = f"shared, {'grouped' if grouped else 'input order'}, vision_cache_mb {cache / 1e6}"
            row = {"grouped": grouped, "vision_cache_mb": cache / 1e6, "s": round(dt, 3),
                   "items_per_s": round(a.n / dt, 3), "images_encoded": reuse.encoded - enc0,
                   "images_reused": reuse.reused - reu0, "kept_mb": round(reuse.kept_bytes / 1e6, 1),
                   **_check(res, what)}
            if not grouped and not cache:
                out["chunk_only"], base_scores = row, scores
                continue
            diffs = [abs(x - y) for x, y in zip(scores, base_scores) if x is not None and y is not None]
            row["speedup"] = round(row["items_per_s"] / out["chunk_only"]["items_per_s"], 3)
            row["max_abs_score_diff"] = max(diffs) if diffs else None
            out["grouped" if grouped else "kept"].append(row)
        out["compiled_modules"] = compiled
        out["compiled_during_timing"] = len(engine._compiled) != compiled  # then the runs are not comparable
    return out


def _chunk_order(judge, order: str) -> None:
    """The public setting `chunk_order`, changed on the loaded judge (read at each call)."""
    judge.engine.settings = dataclasses.replace(judge.engine.settings, chunk_order=order)


# Image sizes of stage `sizes`, as fractions of --width: 4:3, 3:4, a small 4:3, square, 16:9, a small square.
_SHAPES = [(1.0, 0.75), (0.75, 1.0), (0.5, 0.375), (0.75, 0.75), (1.25, 0.703125), (0.625, 0.625)]


class _Fed:
    """What the judge's prepare thread encodes for the model, batch by batch: token positions,
    padded ones (attention-mask zeros; the tokenizer's mask, a CPU tensor), and whether every image
    of the batch has one patch count (the resized images' areas, nothing read back from the GPU:
    `grouped` vision attention needs one segment length, so 1024x768 and 768x1024 go together)."""

    def __init__(self, engine):
        self.positions = self.padded = self.batches = self.uniform = 0
        real = engine._encode_cpu

        def encode(reqs, *a, **k):
            inputs = real(reqs, *a, **k)
            mask = inputs["attention_mask"]
            self.positions += int(mask.numel())
            self.padded += int(mask.numel() - mask.sum())
            self.batches += 1
            self.uniform += len({im.width * im.height for r in reqs for im in r.images}) <= 1
            return inputs
        engine._encode_cpu = encode

    def take(self) -> dict[str, Any]:
        row = {"padded_fraction": round(self.padded / max(self.positions, 1), 4), "batches": self.batches,
               "uniform_batches": round(self.uniform / max(self.batches, 1), 3)}
        self.positions = self.padded = self.batches = self.uniform = 0
        return row


def stage_sizes(model_dir: str, a, cuda: bool) -> dict[str, Any]:
    """Images of several sizes in shuffled order: chunk_order input vs auto on one loaded judge."""
    from src.models.reward.implementations.local import QwenVLRewardModel
    from src.models.reward.types import ScoreItem

    shapes = [(round(a.width * fw), round(a.width * fh)) for fw, fh in _SHAPES]
    sizes = [shapes[i % len(shapes)] for i in range(a.n)]
    random.Random(a.seed).shuffle(sizes)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="reuse-gpu-sizes-"))
    try:
        paths = []
        for i, (w, h) in enumerate(sizes):  # files, as a benchmark gives them: their headers are read
            (im,) = make_images(None, 1, w, h)
            paths.append(str(folder / f"{i:05d}.jpg"))
            im.save(paths[-1], quality=90)
        items = [ScoreItem(images=[p], id=str(i)) for i, p in enumerate(paths)]
        out: dict[str, Any] = {"items": a.n, "shapes": [f"{w}x{h}" for w, h in shapes], "reps": a.reps}
        scores: dict[str, list] = {}
        with QwenVLRewardModel(model_name=model_dir, device=a.device, batch_size=a.bs,
                               **runs.judge_settings(a)) as judge:
            fed = _Fed(judge.engine)
            for order in ("input", "auto"):  # warm-up: every shape's kernels, untimed
                _chunk_order(judge, order)
                runs.timed(judge, items, cuda)
            fed.take()
            compiled = len(judge.engine._compiled)  # the automatic compile must not fall inside the timing
            times: dict[str, list[float]] = {"input": [], "auto": []}
            for _ in range(a.reps):
                for order in ("input", "auto"):
                    _chunk_order(judge, order)
                    runs.new_images(judge)  # the last call's images: each order runs the tower for all
                    dt, res = runs.timed(judge, items, cuda)
                    times[order].append(dt)
                    scores[order] = [r.score for r in res]
                    out[order] = {"chunk_order": order, **fed.take(), **_check(res, f"sizes, chunk_order {order}")}
            out["compiled_modules"] = compiled
            out["compiled_during_timing"] = len(judge.engine._compiled) != compiled
            _chunk_order(judge, "auto")
        for order, dts in times.items():
            out[order]["items_per_s"] = round(a.n * len(dts) / sum(dts), 3)
            out[order]["items_per_s_each"] = [round(a.n / dt, 3) for dt in dts]
        diffs = [abs(x - y) for x, y in zip(scores["auto"], scores["input"]) if x is not None and y is not None]
        out["speedup"] = round(out["auto"]["items_per_s"] / out["input"]["items_per_s"], 3)
        out["max_abs_score_diff"] = max(diffs) if diffs else None
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _Count(logging.Handler):
    """Counts the engine's log records that contain `text` (a continuous decode that fell back)."""

    def __init__(self, text: str):
        super().__init__(logging.WARNING)
        self.text, self.n = text, 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += self.text in record.getMessage()

    def __enter__(self) -> "_Count":
        logging.getLogger("src.models.reward.engine").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("src.models.reward.engine").removeHandler(self)


def _generate_run(judge, items: list, budgets: list[int], a, cuda: bool, failures: _Count, what: str,
                  decode: bool = True) -> tuple[dict[str, Any], list]:
    """One timed generate call: (its row, the answers). decode: the continuous decode's counters
    too, its joining prefills summarised as their number and mean size."""
    failures.n = 0
    dt, res = runs.timed(judge, items, cuda)
    row: dict[str, Any] = {"s": round(dt, 3), "items_per_s": round(a.n / dt, 3),
                           "tokens_per_s": round(sum(budgets) / dt, 1), "fell_back_to_static": failures.n,
                           **_check(res, what)}
    if decode:
        counters = dict(judge.engine._continuous_timings)
        groups = counters.pop("join_groups", [])
        row["decode"] = dict(counters, join_batches=len(groups), mean_join_batch=round(sum(groups) / max(len(groups), 1), 2))
    return row, [r.raw for r in res]


def _same_share(x: list, y: list) -> float:
    return round(sum(p == q for p, q in zip(x, y)) / len(x), 3)


def _length_items(a) -> tuple[list, list, list[int]]:
    """(items, warm-up items, budgets): each item's own budget, drawn from len_min..len_max."""
    from src.models.reward.types import ScoreItem

    rng = random.Random(a.seed)
    budgets = [rng.randint(a.len_min, a.len_max) for _ in range(a.n)]
    imgs = make_images(None, a.n, a.width, a.height)
    items = [ScoreItem(images=[im], metadata={"max_new_tokens": b}) for im, b in zip(imgs, budgets)]
    warm = [ScoreItem(images=[im], metadata={"max_new_tokens": a.len_min}) for im in imgs[:a.bs]]
    return items, warm, budgets


def stage_lengths(model_dir: str, a, cuda: bool) -> dict[str, Any]:
    """Answers of spread lengths: each item's own budget, drawn from len_min..len_max."""
    items, warm, budgets = _length_items(a)
    return _static_vs_continuous(model_dir, a, cuda, items, warm, budgets, a.len_max)


def stage_staging(model_dir: str, a, cuda: bool) -> dict[str, Any]:
    """The lengths items, continuous batching, prompts prefilled ahead (`--stage`) vs not (0)."""
    from src.models.reward.implementations.local import QwenVLRewardModel

    items, warm, budgets = _length_items(a)
    out: dict[str, Any] = {"items": a.n, "budget_mean": round(sum(budgets) / len(budgets), 1),
                           "min_join": a.min_join, "stage": a.stage}
    answers = {}
    kw = dict(mode="generate", max_new_tokens=a.len_max, min_new_tokens=a.len_max, batch_size=a.bs,
              continuous_batching=True)
    with _Count("continuous batching failed") as failures, \
            QwenVLRewardModel(model_name=model_dir, device=a.device, **kw) as judge:
        judge.engine._continuous_min_join = a.min_join
        runs.timed(judge, warm, cuda)  # warm-up: one batch, untimed
        for name, ahead in (("staged", a.stage), ("unstaged", 0)):
            judge.engine._continuous_stage = ahead
            out[name], answers[name] = _generate_run(judge, items, budgets, a, cuda, failures,
                                                     f"continuous, stage {ahead}")
    out["speedup"] = round(out["staged"]["items_per_s"] / out["unstaged"]["items_per_s"], 3)
    out["identical_answers"] = _same_share(answers["staged"], answers["unstaged"])
    return out


def stage_fixed(model_dir: str, a, cuda: bool) -> dict[str, Any]:
    """Answers all of one length (fixed_len): every row of a batch ends at the same step, so a whole
    batch joins at once; continuous batching should cost what static batches cost."""
    from src.models.reward.types import ScoreItem

    imgs = make_images(None, a.n, a.width, a.height)
    items = [ScoreItem(images=[im]) for im in imgs]
    return _static_vs_continuous(model_dir, a, cuda, items, items[:a.bs], [a.fixed_len] * a.n, a.fixed_len)


def _static_vs_continuous(model_dir: str, a, cuda: bool, items: list, warm: list, budgets: list[int],
                          max_new: int) -> dict[str, Any]:
    from src.models.reward.implementations.local import QwenVLRewardModel

    out: dict[str, Any] = {"items": a.n, "budget_min": min(budgets), "budget_max": max(budgets),
                           "budget_mean": round(sum(budgets) / len(budgets), 1), "min_join": a.min_join,
                           "stage": a.stage}
    answers = {}
    with _Count("continuous batching failed") as failures:
        for on in (True, False):
            # min_new_tokens = max_new_tokens: random weights answer exactly their budget
            kw = dict(mode="generate", max_new_tokens=max_new, min_new_tokens=max_new, batch_size=a.bs,
                      continuous_batching=on)
            with QwenVLRewardModel(model_name=model_dir, device=a.device, **kw) as judge:
                judge.engine._continuous_min_join = a.min_join
                judge.engine._continuous_stage = a.stage
                runs.timed(judge, warm, cuda)  # warm-up: one batch, untimed
                row, answers[on] = _generate_run(judge, items, budgets, a, cuda, failures, f"continuous {on}",
                                                 decode=on)
                out["continuous" if on else "static"] = {"continuous_active": judge.engine._continuous, **row}
    out["speedup"] = round(out["continuous"]["items_per_s"] / out["static"]["items_per_s"], 3)
    out["identical_answers"] = _same_share(answers[True], answers[False])
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = [f"# Issue 17: vision reuse and continuous batching; issue 15: prompts sorted by size ({m['size']})", "",
             f"`{m['command']}` on {m['device_name']}, torch {m['torch']}, transformers {m['transformers']}, "
             f"{m['width']}x{m['height']} images, batch {m['bs']}, {m['n']} items.", ""]
    for key in ("edit", "edit_shared"):
        e = report.get(key)
        if not e:
            continue
        sources = "each item its own source" if key == "edit" else f"{e['sources']} sources, model by model"
        lines += [f"| edit rubric, logits, {sources} | items/s | images through the tower |", "|---|---|---|",
                  f"| reuse off | {e['reuse_off']['items_per_s']} | {e['reuse_off']['images_encoded']} |",
                  f"| reuse on (default) | {e['reuse_on']['items_per_s']} | {e['reuse_on']['images_encoded']} |",
                  "", f"Speed-up {e['speedup']}x by the means, {e.get('speedup_median')}x by the medians of "
                  f"{e.get('reps')} alternating calls each (items/s each: on {e['reuse_on'].get('items_per_s_each')}, "
                  f"off {e['reuse_off'].get('items_per_s_each')}); max |score diff| {e['max_abs_score_diff']}; "
                  f"compiled during timing: {e.get('compiled_during_timing')}.", ""]
    g = report.get("shared")
    if g:
        lines += [f"| edit rubric, {g['sources']} sources x {g['models']} edits, model by model | items/s | "
                  "images through the tower | speed-up | max abs score diff |", "|---|---|---|---|---|",
                  f"| chunks in input order, vision_cache_mb 0 (within a chunk) | {g['chunk_only']['items_per_s']} | "
                  f"{g['chunk_only']['images_encoded']} | 1 | |"]
        lines += [f"| {'chunks grouped by source (default)' if k['grouped'] else 'chunks in input order'}, "
                  f"vision_cache_mb {k['vision_cache_mb']:g} | {k['items_per_s']} | {k['images_encoded']} | "
                  f"{k['speedup']}x | {k['max_abs_score_diff']} |" for k in [*g["kept"], *g.get("grouped", [])]]
        lines += ["", f"Compiled modules before timing: {g.get('compiled_modules')}"
                      f"{'; a compile fell inside the timing: the rows are not comparable' if g.get('compiled_during_timing') else ''}.", ""]
    for stage, what in (("lengths", "answers of {budget_min}..{budget_max} tokens (mean {budget_mean})"),
                        ("fixed", "every answer {budget_max} tokens")):
        g = report.get(stage)
        if g:
            lines += [f"| generate, {what.format(**g)} | items/s | tokens/s |", "|---|---|---|",
                      f"| static batches | {g['static']['items_per_s']} | {g['static']['tokens_per_s']} |",
                      f"| continuous batching | {g['continuous']['items_per_s']} | {g['continuous']['tokens_per_s']} |",
                      "", f"Speed-up {g['speedup']}x; identical answers {g['identical_answers']}; continuous "
                      f"decode: {g['continuous'].get('decode')}.", ""]
    g = report.get("sizes")
    if g:
        lines += [f"| logits, {g['items']} images of {', '.join(g['shapes'])}, shuffled | items/s | "
                  "padded token share | batches of one patch count |", "|---|---|---|---|"]
        lines += [f"| chunk_order {o}{' (default)' if o == 'auto' else ''} | {g[o]['items_per_s']} | "
                  f"{g[o]['padded_fraction']} | {g[o]['uniform_batches']} |" for o in ("input", "auto")]
        lines += ["", f"Speed-up {g['speedup']}x; max |score diff| {g['max_abs_score_diff']}; compiled modules "
                  f"{g['compiled_modules']}{' (a compile fell inside the timing)' if g['compiled_during_timing'] else ''}.",
                  ""]
    g = report.get("staging")
    if g:
        lines += [f"| continuous batching, answers of mean {g['budget_mean']} tokens | items/s | tokens/s |",
                  "|---|---|---|",
                  f"| joins prefilled when slots free (stage 0) | {g['unstaged']['items_per_s']} | "
                  f"{g['unstaged']['tokens_per_s']} |",
                  f"| prefilled ahead (stage {g['staged']['decode'].get('stage')}) | {g['staged']['items_per_s']} | "
                  f"{g['staged']['tokens_per_s']} |",
                  "", f"Speed-up {g['speedup']}x; identical answers {g['identical_answers']}; decodes: staged "
                  f"{g['staged']['decode']}, unstaged {g['unstaged']['decode']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="qwen3_vl-8b")
    runs.add_checkpoint_argument(ap)
    ap.add_argument("--stages", default="edit,edit_shared,shared,lengths,fixed,staging,sizes")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--len-min", type=int, default=32)
    ap.add_argument("--len-max", type=int, default=512)
    ap.add_argument("--fixed-len", type=int, default=128, help="stage fixed: every answer this long")
    ap.add_argument("--models", type=int, default=4, help="stages shared and edit_shared: edits of each source image")
    ap.add_argument("--cache-mb", default=None,
                    help="stage shared: vision_cache_mb of the runs that keep features, comma-separated "
                         "(default: the library's)")
    ap.add_argument("--min-join", type=int, default=1,
                    help="continuous batching: free slots before prompts join (prefilled together)")
    ap.add_argument("--stage", type=int, default=None,
                    help="continuous batching: prompts prefilled ahead of the free slots (default: the "
                         "library's; 0: joins prefilled when their slots free up)")
    runs.add_judge_argument(ap, "stages edit, shared and sizes", "vision_attn=varlen")
    ap.add_argument("--reps", type=int, default=2, help="stages edit, edit_shared and sizes: timed calls of each variant")
    ap.add_argument("--seed", type=int, default=0)
    runs.add_output_arguments(ap, "reuse_gpu", "CPU, tiny model, tiny images: seconds (CI)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.size = a.size if a.size.startswith("smoke") else "smoke-qwen3_vl"
        a.device, a.n, a.bs, a.width, a.height, a.len_min, a.len_max, a.fixed_len = "cpu", 6, 2, 224, 168, 2, 8, 4
        a.models = 2  # 3 sources x 2 edits: grouped, a chunk of two is one source's edits
        a.reps = 1
    stages = {"edit": stage_edit, "edit_shared": functools.partial(stage_edit, shared=True), "shared": stage_shared,
              "lengths": stage_lengths, "fixed": stage_fixed, "staging": stage_staging, "sizes": stage_sizes}
    asked = runs.stage_names(ap, a.stages, stages)
    cuda = a.device.startswith("cuda")
    report: dict[str, Any] = {"meta": runs.meta("reuse_gpu.py", argv, a, min_join=a.min_join, stage=a.stage,
                                                judge=runs.judge_settings(a))}
    with runs.checkpoint(report, a, "reuse-gpu-") as model_dir:
        for stage in asked:
            report[stage] = stages[stage](model_dir, a, cuda)
            runs.save(report, a)
            print(json.dumps({stage: report[stage]}), flush=True)
    runs.save(report, a, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
