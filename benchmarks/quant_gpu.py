"""Quantized judges (issue 20): the same items scored by one random-weight checkpoint of a real size
loaded in bf16 and with `quantization: fp8` (and any other variants named), each against bf16.

Recorded per variant: items/s (timed after --warmup-calls untimed calls of one batch each; with
--reps, each timed call and their median), weight memory (GPU memory held once loaded), peak GPU memory of the timed calls
(above what was allocated before the load), and agreement with bf16's scores (max and mean |diff|,
Pearson and Spearman over the items). The `edit` rubric, `--n` items of two `--width`x`--height`
images, logits mode; or `--mode generate`, where random weights write no score (each item's parse
error is expected, not counted) and the variants are compared by their answers instead: the share
of items whose answers are identical to the reference's. `--judge KEY=VALUE` passes settings, e.g.
`compile_after_items=16` with `--warmup-calls 2`, so that the compile happens in the second
warm-up call and every timed call runs compiled (generate: fast_decode's CUDA
graph, continuous batching and the compile, all on by default, then run on the quantized layers).

    python benchmarks/quant_gpu.py --size qwen3_vl-8b [--variants none,fp8] [--n 64] [--bs 16]
    python benchmarks/quant_gpu.py --size qwen3_vl-8b --mode generate --max-new-tokens 32 --reps 3 \
        --judge compile_after_items=16 --warmup-calls 2
    python benchmarks/quant_gpu.py --smoke      # CPU, tiny model, quantization none only (CI)

The device image has no qwen-vl-utils: carry its wheel (requirements-worker.txt's version) and put
it on PYTHONPATH first, or every item fails in preparation (the script then stops, saying so).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import pathlib
import statistics
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_gpu import make_images  # noqa: E402
from benchmarks import runs  # noqa: E402

from src.stats import pearson, spearman  # noqa: E402


def agreement(ref: list[float | None], other: list[float | None]) -> dict[str, Any]:
    pairs = [(x, y) for x, y in zip(ref, other) if x is not None and y is not None]
    if not pairs:
        return {"items_compared": 0}
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    diffs = [abs(x - y) for x, y in pairs]
    return {"items_compared": len(pairs), "max_abs_diff": round(max(diffs), 6),
            "mean_abs_diff": round(sum(diffs) / len(diffs), 6), "pearson": pearson(xs, ys),
            "spearman": spearman(xs, ys), "ref_score_std": round(
                math.sqrt(sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / len(xs)), 6)}


def answers_compared(ref: list[dict], other: list[dict]) -> dict[str, Any]:
    """The share of items whose answers (each part's text) are identical to the reference's, over the
    items where both wrote some text. A random-weight checkpoint's tokenizer knows a few hundred of
    its vocabulary's ids (benchmarks/checkpoints.py), so its answers may decode to empty text: then
    there is nothing to compare, and the share is None rather than a vacuous 1.0."""
    pairs = [(x, y) for x, y in zip(ref, other) if any(x.values()) and any(y.values())]
    return {"answers_with_text": sum(bool(any(y.values())) for y in other),
            "answers_identical": round(sum(x == y for x, y in pairs) / len(pairs), 4) if pairs else None}


def run_variant(model_dir: str, variant: str, items: list, a, cuda: bool) -> dict[str, Any]:
    import torch

    from src.models.reward.implementations.local import QwenVLRewardModel

    if cuda:
        gc.collect()  # the previous variant's judge: its memory must not count towards this one's
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    gen = {"max_new_tokens": a.max_new_tokens} if a.mode == "generate" else {}
    with QwenVLRewardModel(model_name=model_dir, device=a.device, template=a.template, mode=a.mode,
                           batch_size=a.bs, quantization=variant, **gen, **runs.judge_settings(a)) as judge:
        load_s = time.perf_counter() - t0
        weights = (torch.cuda.memory_allocated() - before) if cuda else None
        footprint = judge.engine.model.get_memory_footprint()
        for _ in range(a.warmup_calls):  # warm-up (kernels, allocator, a compile that falls due), untimed
            judge.batch_score(items[:a.bs])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        each = []
        for _ in range(a.reps):
            dt, res = runs.timed(judge, items, cuda)
            each.append(dt)
        # Random weights write no score in generate mode: a parse error is what such an answer gets.
        bad = [r for r in res if r.error is not None and not (a.mode == "generate" and r.error_kind == "parse")]
        if len(bad) == len(res):
            raise SystemExit(f"{variant}: every item failed, e.g. {bad[0].error}")
        dt = statistics.median(each)
        out = {"quantization": judge.engine.quantization, "load_s": round(load_s, 2), "s": round(dt, 3),
               "items_per_s": round(len(items) / dt, 3),
               "items_per_s_each": [round(len(items) / s, 3) for s in each],
               "weights_gb": round(weights / 1e9, 3) if weights is not None else None,
               "model_footprint_gb": round(footprint / 1e9, 3),
               "peak_gb": round((torch.cuda.max_memory_allocated() - before) / 1e9, 3) if cuda else None,
               "allocated_before_load_gb": round(before / 1e9, 3) if cuda else None,
               "errors": len(bad), "first_error": bad[0].error if bad else None,
               "scores": [r.score for r in res], "answers": [r.raw for r in res] if a.mode == "generate" else None}
    gc.collect()
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = [f"# Issue 20: quantized judges ({m['size']})", "",
             f"`{m['command']}` on {m['device_name']}, torch {m['torch']}, transformers {m['transformers']}, "
             f"{m.get('mode', 'logits')} mode, `{m['template']}` rubric, {m['n']} items of two {m['width']}x{m['height']} images, "
             f"batch {m['bs']}, random weights.", "",
             "| quantization | items/s | weights GB | peak GB | max abs diff | mean abs diff | Pearson | Spearman "
             "| answers identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, v in report["variants"].items():
        ag = v.get("vs_none", {})
        lines.append(f"| {name} ({v['quantization']}) | {v['items_per_s']} | {v['weights_gb']} | {v['peak_gb']} | "
                     f"{ag.get('max_abs_diff', '-')} | {ag.get('mean_abs_diff', '-')} | {ag.get('pearson', '-')} | "
                     f"{ag.get('spearman', '-')} | {v.get('answers_identical', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="qwen3_vl-8b")
    runs.add_checkpoint_argument(ap)
    ap.add_argument("--variants", default="none,fp8", help="quantization settings; the first is the reference")
    ap.add_argument("--template", default="edit")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--mode", choices=("logits", "generate"), default="logits")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="generate mode")
    ap.add_argument("--reps", type=int, default=1, help="timed calls of each variant (items/s: their median)")
    ap.add_argument("--warmup-calls", type=int, default=1,
                    help="untimed calls of one batch before the timed ones (2 with --judge compile_after_items=BATCH: "
                         "the compile happens in the second)")
    runs.add_judge_argument(ap, "every variant", "compile_after_items=16")
    runs.add_output_arguments(ap, "quant_gpu", "CPU, tiny model, tiny images, quantization none: seconds (CI)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.size = a.size if a.size.startswith("smoke") else "smoke-qwen3_vl"
        a.device, a.n, a.bs, a.width, a.height, a.variants = "cpu", 6, 2, 224, 168, "none"
    from src.models.reward.types import ScoreItem

    cuda = a.device.startswith("cuda")
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    report: dict[str, Any] = {"meta": runs.meta("quant_gpu.py", argv, a, template=a.template, mode=a.mode,
                                                judge=runs.judge_settings(a)), "variants": {}}
    imgs = make_images(None, 2 * a.n, a.width, a.height)
    items = [ScoreItem(images=[imgs[2 * i]], source_images=[imgs[2 * i + 1]], instruction="make the sky red")
             for i in range(a.n)]
    # bf16 on disk, as the releases are: fp8 is made from it at load.
    with runs.checkpoint(report, a, "quant-gpu-") as model_dir:
        for v in variants:
            try:
                out = run_variant(model_dir, v, items, a, cuda)
            except Exception as e:  # one variant that cannot run here is recorded, the others still run
                out = {"quantization": v, "failed": f"{type(e).__name__}: {e}"}
                print(f"{v}: {out['failed']}", flush=True)
            report["variants"][v] = out
            ref = report["variants"][variants[0]]
            if "scores" in out and "scores" in ref:
                out["vs_none"] = agreement(ref["scores"], out["scores"])
            if out.get("answers") and ref.get("answers"):
                out.update(answers_compared(ref["answers"], out["answers"]))
            runs.save(report, a)
            print(json.dumps({v: {k: x for k, x in out.items() if k not in ("scores", "answers")}}), flush=True)
    ok = {k: v for k, v in report["variants"].items() if "items_per_s" in v}
    runs.save(report, a, markdown({**report, "variants": ok}))
    failed = [k for k in report["variants"] if k not in ok]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
