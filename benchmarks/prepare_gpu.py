#!/usr/bin/env python3
"""How long a call's first chunk takes to prepare, by part: the time every call waits before its
first batch reaches the GPU.

The preparation does not depend on the model's weights, only on its processor, so the tiny judge
of the same architecture stands in for the real one, at the real image size (--max-pixels). Per
repetition, on one loaded judge: the images decoded, resized and named (the image threads), the
prompts, the processor (on the GPU with the default gpu_preprocess), and logits mode's rope
positions (rope_ahead.py); then the whole `_prepare` of a chunk, as a call runs it, and of a
quarter chunk (what a call of more than one chunk waits for, batching.py); and one `_prepare`
under cProfile (its largest cumulative entries).

    python benchmarks/prepare_gpu.py --out $OUT            # CUDA, 32 images of 1024x768
    python benchmarks/prepare_gpu.py --smoke --out /tmp/x  # CPU, small images (CI)
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pathlib
import pstats
import statistics
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import runs  # noqa: E402
from benchmarks.bench_gpu import make_images  # noqa: E402


def measure(a) -> dict[str, Any]:
    import torch

    from src.models.reward.implementations.local import QwenVLRewardModel
    from src.models.reward.types import ScoreItem

    cuda = a.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    items = [ScoreItem(images=[im]) for im in make_images(None, a.n, a.width, a.height)]
    idx = list(range(a.n))
    parts: dict[str, list[float]] = {k: [] for k in ("images", "prompts_and_processor", "rope", "prepare",
                                                     "prepare_quarter")}
    with QwenVLRewardModel(model_name=a.model, device=a.device, batch_size=a.n, max_pixels=a.max_pixels,
                           compile_vision=False, compile_language=False, **runs.judge_settings(a)) as judge:
        eng = judge.engine
        quarter = max(1, a.n // eng._ramp_first_chunk)  # a call's first chunk when it has more than one (batching.py)
        rope = eng._rope_ahead
        eng._prepare(items, idx)  # untimed: threads, caches, the processor's first call
        for _ in range(a.reps):
            sync()
            t = time.perf_counter()
            for f in eng._load_images(items).values():
                f.result()
            parts["images"].append(time.perf_counter() - t)
            eng._rope_ahead = None
            sync()
            t = time.perf_counter()
            chunk = eng._prepare(items, idx)  # images again, then the prompts and the processor
            sync()
            parts["prompts_and_processor"].append(time.perf_counter() - t - parts["images"][-1])
            eng._rope_ahead = rope
            inputs = chunk.encoded[next(iter(chunk.encoded))]
            t = time.perf_counter()
            if rope is not None:
                rope.carry(inputs)
            parts["rope"].append(time.perf_counter() - t)
            sync()
            t = time.perf_counter()
            eng._prepare(items, idx)
            sync()
            parts["prepare"].append(time.perf_counter() - t)
            t = time.perf_counter()
            eng._prepare(items[:quarter], idx[:quarter])
            sync()
            parts["prepare_quarter"].append(time.perf_counter() - t)
        prof = cProfile.Profile()
        prof.enable()
        eng._prepare(items, idx)
        sync()
        prof.disable()
        tokens = int(inputs["input_ids"].shape[1])
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(25)
    return {"tokens_per_prompt": tokens,
            "median_s": {k: round(statistics.median(v), 4) for k, v in parts.items()},
            "each_s": {k: [round(x, 4) for x in v] for k, v in parts.items()},
            "profile_top": [line for line in text.getvalue().splitlines() if "(" in line][:25]}


def markdown(report: dict[str, Any]) -> str:
    m, r = report["meta"], report["result"]
    lines = [f"# Preparing a call's first chunk ({m['device_name']})", "", f"`{m['command']}`", "",
             f"{m['n']} images of {m['width']}x{m['height']}, {r['tokens_per_prompt']} tokens a prompt, "
             f"judge {m['model']} {json.dumps(m['judge'])}, median of {m['reps']}", "", "| part | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r["median_s"].items()]
    lines += ["", "One `_prepare` under cProfile, largest cumulative entries:", "", "```"]
    lines += r["profile_top"] + ["```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny:qwen3_vl")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--max-pixels", type=int, default=1024 * 768)
    ap.add_argument("--reps", type=int, default=3)
    runs.add_judge_argument(ap, "the judge", "prepare_threads=8")
    runs.add_output_arguments(ap, "prepare_gpu", "CPU, 4 small images (CI)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.device, a.n, a.width, a.height, a.max_pixels, a.reps = "cpu", 4, 224, 168, 224 * 168, 1
    a.size, a.bs = a.model, a.n
    report: dict[str, Any] = {"meta": runs.meta("prepare_gpu.py", argv, a, model=a.model, reps=a.reps,
                                                judge=runs.judge_settings(a))}
    report["result"] = measure(a)
    runs.save(report, a, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
