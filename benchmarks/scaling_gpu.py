#!/usr/bin/env python3
"""Multi-GPU scaling of the judge: throughput with 1, 2, 4, 8 workers, both schedules, both modes.

One command measures, on a random-weight checkpoint of the real size (benchmarks/checkpoints.py)
and through the public MultiGPURewardModel only:
  - images/s for each worker count k, schedule (round_robin, dynamic), mode (logits, generate)
    and workload (uniform: N images of WxH; skewed: the same with a quarter of them 2W x 2H),
    speedup over k=1 and efficiency = speedup / k (target for the uniform workload: 0.95 k);
  - the pool start with all k workers loading at once: construction time and time to the first
    result (a first call of k items, one per worker);
  - per GPU, from nvidia-smi every --sample-s during each timed run: peak memory.used, mean and
    min utilization.gpu, and whether every used GPU was busy (mean >= --busy-pct).

    python benchmarks/scaling_gpu.py --plan --gpus 8               # stages and time estimate, no model
    python benchmarks/scaling_gpu.py --deadline-s 530 --k1-schedules round_robin --name scaling_h200x8
    python benchmarks/scaling_gpu.py --smoke --out /tmp/x          # CPU, tiny model, 2 workers (CI)

Order of work: one pool per (mode, k) serves all its timed runs (the schedule is switched between
calls; both workloads share it). Pools run by priority: k=1 and the largest k of each mode first,
then the k in between (larger first: their runs are shorter), so a run cut by --deadline-s loses
points inside the curve, not its ends. A stage whose estimated time (from what was measured so
far) does not fit before the deadline is skipped and recorded as skipped. The skewed workload
runs at k=1 and the largest k by default (--skewed-workers), in logits mode (--skewed-modes).
Generate mode writes exactly --new tokens per answer (min_new_tokens), as bench_gpu.py does.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.runs import add_judge_argument, judge_settings, parse_kv  # noqa: E402
from benchmarks.bench_gpu import GpuSampler, _f, log, make_images, summarize  # noqa: E402

# Time model for --plan and for the deadline before anything is measured (7B on one H100/H200,
# no compile; from benchmarks/NOTES.md and bench_gpu_7b.json). Replaced by measurements as they come.
ASSUMED = {
    "setup_s": 45.0,          # imports, checkpoint build and save, image files
    "pool_start_s": 25.0,     # k workers start and load at once (one took 18.8 s in bench_gpu_7b)
    "first_calls_s": 5.0,     # k items (one per worker), then the warm-up: one batch per worker
    "logits_img_s": 15.0,     # per GPU, uniform 1024x768
    "decode_step_s": 0.0125,  # one decoding step of a batch (fast_decode at batch 32: ~10 ms)
    "vision_share": 0.25,     # of a WxH item's cost: the vision tower (~5 of ~21 TFLOP), the rest the language model
    "large_vision": 4.7,      # a 2W x 2H image in the vision tower: 4x the patches, 4 full-attention blocks grow 16x
    "large_tokens": 3.6,      # its prompt against a WxH one (~4,060 tokens against ~1,115)
    "call_s": 1.5,            # per timed call: the first chunk's preparation, the last worker's tail
    "efficiency": 0.9,        # k > 1, before any k > 1 was measured
}
ASSUMED_SMOKE = {"setup_s": 8.0, "pool_start_s": 10.0, "first_calls_s": 1.0, "logits_img_s": 20.0,
                 "decode_step_s": 0.02, "vision_share": 0.25, "large_vision": 4.0, "large_tokens": 3.0,
                 "call_s": 0.3, "efficiency": 0.8}


# -- the plan ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Pool:
    mode: str
    k: int
    runs: list[tuple[str, str]]  # (workload, schedule)


def build_plan(a, max_workers: int) -> tuple[list[Pool], list[dict[str, Any]]]:
    """Pools in priority order, and the (mode, k) left out because the machine has too few devices."""
    too_many = [{"mode": m, "workers": k, "skipped": f"needs {k} devices; {max_workers} available"}
                for m in a.modes for k in a.workers if k > max_workers]
    ks = [k for k in a.workers if k <= max_workers]
    ends = sorted({k for k in ks if k == 1 or k == max(ks)}) if ks else []
    # the ends of each mode's curve first; then the points between, larger k first (cheaper runs)
    order = [(m, k) for m in a.modes for k in ends] + [(m, k) for m in a.modes for k in reversed(ks) if k not in ends]
    skewed_ks = ends if a.skewed_workers == "ends" else ks if a.skewed_workers == "all" else \
        [int(x) for x in a.skewed_workers.split(",")]
    pools = []
    for mode, k in order:
        workloads = [w for w in a.workloads if w == "uniform" or (mode in a.skewed_modes and k in skewed_ks)]
        schedules = a.k1_schedules if k == 1 else a.schedules
        pools.append(Pool(mode, k, [(w, s) for w in workloads for s in schedules]))
    return pools, too_many


class Estimator:
    """Seconds a stage will take: the assumed time model, replaced by measurements as they arrive."""

    def __init__(self, a, assumed: dict[str, float]):
        self.a, self.m = a, dict(assumed)
        self.rate: dict[tuple[str, str], float] = {}   # (mode, workload) -> images/s per GPU, measured
        self.eff: float | None = None                   # worst measured efficiency at k > 1
        self.start: dict[int, float] = {}               # k -> measured pool start + first call

    def _per_gpu(self, mode: str, workload: str) -> float:
        if (mode, workload) in self.rate:
            return self.rate[(mode, workload)]
        avg_cost = 1.0 if workload == "uniform" else self.skew_cost()
        if (mode, "uniform") in self.rate:
            return self.rate[(mode, "uniform")] / avg_cost
        per_item = 1.0 / self.m["logits_img_s"]
        if mode == "generate":
            per_item += self.a.new * self.m["decode_step_s"] / self.a.batch_size
        return 1.0 / (per_item * avg_cost)

    def skew_cost(self) -> float:
        """A skewed item's cost against a uniform one. The vision tower takes each image at its own
        size; the language model pads every prompt of a batch to the batch's longest, so one large
        item makes the whole batch pay its length (batches cut in input order)."""
        m, n, bs = self.m, self.a.n, self.a.batch_size
        large = set(large_positions(self.a))
        total = 0.0
        for start in range(0, n, bs):
            size = min(bs, n - start)
            n_large = sum(i in large for i in range(start, start + size))
            vision = size - n_large + n_large * m["large_vision"]
            language = size * (m["large_tokens"] if n_large else 1.0)
            total += m["vision_share"] * vision + (1 - m["vision_share"]) * language
        return total / n

    def run_s(self, mode: str, workload: str, k: int) -> float:
        eff = 1.0 if k == 1 else (self.eff or self.m["efficiency"])
        return self.a.n / (self._per_gpu(mode, workload) * k * eff) + self.m["call_s"]

    def pool_s(self, k: int) -> float:
        seen = [v for kk, v in self.start.items() if kk >= k] or list(self.start.values())
        return max(seen) if seen else self.m["pool_start_s"] + self.m["first_calls_s"]

    def observe_run(self, mode: str, workload: str, k: int, img_s: float) -> None:
        if k == 1:
            self.rate[(mode, workload)] = min(img_s, self.rate.get((mode, workload), img_s))
        elif (mode, workload) in self.rate:
            e = img_s / (k * self.rate[(mode, workload)])
            self.eff = min(e, self.eff or e)

    def observe_pool(self, k: int, seconds: float) -> None:
        self.start[k] = max(seconds, self.start.get(k, 0.0))


def print_plan(a, pools: list[Pool], too_many: list[dict[str, Any]], est: Estimator, devices: str) -> None:
    """The stages in run order with their estimated end times; a stage that would not fit before
    --deadline-s is skipped here as the real run would skip it (and costs nothing)."""
    deadline = float("inf") if a.deadline_s is None else a.deadline_s
    t = est.m["setup_s"]
    log(f"plan for {devices}: {a.n} items, {a.width}x{a.height} (skewed: {a.skew_fraction:.0%} at "
        f"{2 * a.width}x{2 * a.height}), generate {a.new} tokens, batch {a.batch_size}")
    log(f"assumed: {json.dumps(est.m)}")
    log(f"{t:7.0f} s  setup (checkpoint, images)")
    skipped = 0
    for p in pools:
        first = est.run_s(p.mode, p.runs[0][0], p.k) if p.runs else 0.0
        if t + est.pool_s(p.k) + first > deadline:
            log(f"{'':7}    skip {p.mode} pool of {p.k} worker(s) and its {len(p.runs)} run(s): past the deadline")
            skipped += 1 + len(p.runs)
            continue
        t += est.pool_s(p.k)
        log(f"{t:7.0f} s  {p.mode} pool of {p.k} worker(s) started, first calls done")
        for workload, schedule in p.runs:
            need = est.run_s(p.mode, workload, p.k)
            if t + need > deadline:
                log(f"{'':7}      skip {p.mode} {workload} {schedule}: past the deadline")
                skipped += 1
                continue
            t += need
            log(f"{t:7.0f} s    {p.mode} {workload} {schedule}, {a.n} items")
    for s in too_many:
        log(f"{'':7}    skip {s['mode']} with {s['workers']} workers: {s['skipped']}")
    log(f"estimated total: {t:.0f} s" + (f" (deadline {a.deadline_s:.0f} s)" if a.deadline_s is not None else "")
        + (f"; {skipped} stage(s) past the deadline" if skipped else ""))


# -- inputs -----------------------------------------------------------------------------------

def large_positions(a) -> list[int]:
    """Positions of the 2W x 2H items in the skewed workload."""
    n_large = round(a.n * a.skew_fraction)
    if a.skew_layout == "random":
        return sorted(random.Random(0).sample(range(a.n), n_large))
    if a.skew_layout == "stride":
        step = max(1, a.n // max(n_large, 1))
        return list(range(0, a.n, step))[:n_large]
    return list(range(n_large))  # block


def write_images(a, img_dir: pathlib.Path) -> tuple[list[str], list[str], list[int]]:
    """Uniform and skewed workloads as files (the workers read paths): the skewed one is the
    uniform one with the large positions replaced by 2W x 2H images."""
    img_dir.mkdir(parents=True, exist_ok=True)
    large = large_positions(a)
    n_large = len(large)
    small_imgs = make_images(None, a.n, a.width, a.height)
    big_imgs = make_images(None, n_large, 2 * a.width, 2 * a.height)
    jobs = [(img_dir / f"u{i:04d}.png", im) for i, im in enumerate(small_imgs)]
    jobs += [(img_dir / f"L{i:04d}.png", im) for i, im in zip(large, big_imgs)]

    def save(job):
        path, im = job
        if not path.exists():
            im.save(path, compress_level=1)  # fast to write and to decode; the pixels are what count

    with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as ex:
        list(ex.map(save, jobs))
    uniform = [str(img_dir / f"u{i:04d}.png") for i in range(a.n)]
    skewed = list(uniform)
    for i in large:
        skewed[i] = str(img_dir / f"L{i:04d}.png")
    return uniform, skewed, large


def get_checkpoint(a, work: pathlib.Path) -> dict[str, Any]:
    model_dir = work / f"qwen2_5_vl-{a.size}"
    made = model_dir / "random_checkpoint.json"
    if made.is_file():  # built earlier in this --work folder
        return {**json.loads(made.read_text()), "reused": True}
    if a.device == "cpu":
        from benchmarks.checkpoints import build_checkpoint

        return build_checkpoint(a.size, model_dir, device="cpu")
    # On the GPU in a child process: this one then never holds a CUDA context, whose memory would
    # count on GPU 0 beside its worker.
    proc = subprocess.run([sys.executable, "-m", "benchmarks.checkpoints", "--size", a.size, "--out", str(model_dir),
                           "--device", "cuda"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"building the {a.size} checkpoint failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- one pool ---------------------------------------------------------------------------------

def set_schedule(judge, schedule: str) -> None:
    # Benchmark-only: the schedule is read at each call (micro_batch_for, pool.run), so one pool of
    # loaded workers serves both schedules instead of a model load per schedule.
    judge.schedule = schedule


def run_pool(a, pool: Pool, res: dict[str, Any], model_dir: str, paths: dict[str, list[str]], large: set[int],
             sampler: GpuSampler, est: Estimator, left, save) -> None:
    """Start one pool of `pool.k` workers, time its runs, close it; fills `res` as it goes."""
    from src.models.reward.implementations.multi_gpu import MultiGPURewardModel

    cuda = a.device != "cpu"
    ids: list[Any] = list(range(pool.k)) if cuda else ["cpu"] * pool.k
    gpus = list(range(pool.k)) if cuda else []
    kw = dict(model_name=model_dir, mode=pool.mode, template="quality", batch_size=a.batch_size,
              max_pixels=a.max_pixels, **judge_settings(a))
    if pool.mode == "generate":
        kw.update(max_new_tokens=a.new, min_new_tokens=a.new)
    res["device_ids"] = ids
    need = est.pool_s(pool.k) + (est.run_s(pool.mode, pool.runs[0][0], pool.k) if pool.runs else 0.0)
    if need > left():
        res["skipped"] = f"deadline: start and first run need ~{need:.0f} s, {max(left(), 0):.0f} s left"
        res["runs"] = [{"workload": w, "schedule": s, "skipped": "deadline: pool not started"} for w, s in pool.runs]
        return
    t0 = time.perf_counter()
    # nvidia-smi numbers GPUs in PCI bus order; CUDA in that order too, so worker i's GPU is index i
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"} if cuda else None
    judge = MultiGPURewardModel(device_ids=ids, schedule="round_robin", progress=False, env=env, **kw)
    try:
        res["load_s"] = round(time.perf_counter() - t0, 2)
        res["worker_pids"] = judge.worker_pids()
        res["worker_load_s"] = [round(w.load_time_s, 2) if w and w.load_time_s else None for w in judge.pool.workers]
        res["settings"] = {k: v for k, v in judge.settings.to_params().items() if k != "templates"}
        # First call: k items, one per worker (round robin), so it ends with every worker's first result.
        first = judge.batch_score(paths["uniform"][:pool.k])
        res["time_to_first_result_s"] = round(time.perf_counter() - t0, 2)
        res["first_call"] = summarize(first)
        if a.warmup:  # one full batch per worker: allocator growth and kernel choice out of the timed runs
            t = time.perf_counter()
            judge.batch_score(paths["uniform"][:pool.k * a.batch_size])
            res["warmup_s"] = round(time.perf_counter() - t, 2)
        fixed_s = time.perf_counter() - t0  # what a pool costs besides its timed runs (plus closing, below)
        for workload, schedule in pool.runs:
            row: dict[str, Any] = {"workload": workload, "schedule": schedule}
            res["runs"].append(row)
            need = est.run_s(pool.mode, workload, pool.k)
            if need > left():
                row["skipped"] = f"deadline: needs ~{need:.0f} s, {max(left(), 0):.0f} s left"
                continue
            set_schedule(judge, schedule)
            items = paths[workload]
            row["micro_batch"] = judge.micro_batch_for(len(items))
            t = time.perf_counter()
            results = judge.batch_score(items)
            t1 = time.perf_counter()
            dt = t1 - t
            row.update(summarize(results), seconds=round(dt, 3), img_per_s=round(len(items) / dt, 3))
            row["items_per_device"] = _count_by_device(results)
            if workload == "skewed":
                row["large_items_per_device"] = _count_by_device([r for r in results if r.index in large])
            row["gpu"] = sampler.window(t, t1, gpus, a.busy_pct)
            est.observe_run(pool.mode, workload, pool.k, len(items) / dt)
            log(f"[{pool.mode} x{pool.k}] {workload} {schedule}: {row['img_per_s']} img/s "
                f"({row['scored']}/{row['items']} scored)")
            save()
    finally:
        t_close = time.perf_counter()
        judge.close()
        t_end = time.perf_counter()
        res["close_s"] = round(t_end - t_close, 2)
    est.observe_pool(pool.k, fixed_s + t_end - t_close)
    res["gpu_whole_pool"] = sampler.window(t0, t_end, gpus, a.busy_pct)


def _count_by_device(results) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        out[str(r.device)] = out.get(str(r.device), 0) + 1
    return dict(sorted(out.items()))


# -- speedups ---------------------------------------------------------------------------------

def speedups(report: dict[str, Any]) -> list[dict[str, Any]]:
    """For each timed run: speedup over k=1 of the same mode, workload and schedule (else the other
    schedule's k=1, named in baseline_schedule), efficiency = speedup / k, and the speedup over the
    faster k=1 schedule."""
    rate: dict[tuple, float] = {}
    for p in report["pools"]:
        for r in p.get("runs", []):
            if r.get("img_per_s"):
                rate[(p["mode"], r["workload"], r["schedule"], p["workers"])] = r["img_per_s"]
    out = []
    order = {x: i for i, x in enumerate(["logits", "generate", "uniform", "skewed", "round_robin", "dynamic"])}
    for (mode, workload, schedule, k), v in sorted(rate.items(), key=lambda kv: (*(order[x] for x in kv[0][:3]), kv[0][3])):
        k1 = {s: rate.get((mode, workload, s, 1)) for s in ("round_robin", "dynamic")}
        base_s = schedule if k1.get(schedule) else next((s for s, x in k1.items() if x), None)
        row: dict[str, Any] = {"mode": mode, "workload": workload, "schedule": schedule, "workers": k, "img_per_s": v}
        if base_s is None:
            row["speedup"] = None
            row["reason"] = "no k=1 run to compare with"
        else:
            speed = v / k1[base_s]
            row.update(baseline_schedule=base_s, baseline_img_per_s=k1[base_s], speedup=round(speed, 3),
                       efficiency=round(speed / k, 3),
                       speedup_vs_best_k1=round(v / max(x for x in k1.values() if x), 3))
            if workload == "uniform":
                row["target_speedup"] = round(0.95 * k, 2)
                row["meets_target"] = speed >= 0.95 * k
        out.append(row)
    return out


# -- output -----------------------------------------------------------------------------------

def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [f"# Multi-GPU scaling: {meta['device_name']}", "", f"`{meta['command']}`", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}; checkpoint: {meta.get('checkpoint_desc', '-')}; "
             f"{meta['n']} items of {meta['width']}x{meta['height']} (skewed: {meta['skew']['large_items']} of them "
             f"{meta['skew']['large_size']}, layout `{meta['skew']['layout']}`); max_pixels {meta['max_pixels']}; "
             f"batch {meta['batch_size']}; generate = {meta['new_tokens']} new tokens (forced); judge settings "
             f"`{json.dumps(meta['judge_overrides'])}`. Busy = mean utilization.gpu >= {meta['busy_pct']}% over the "
             f"timed run (nvidia-smi every {meta['sample_s']} s).", "",
             "| mode | workload | schedule | workers | img/s | speedup | efficiency | target (uniform) | "
             "peak GB per GPU | util % mean (lowest GPU) | every GPU busy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    runs = {(p["mode"], r["workload"], r["schedule"], p["workers"]): r for p in report["pools"] for r in p.get("runs", [])}
    for s in report.get("speedups", []):
        r = runs[(s["mode"], s["workload"], s["schedule"], s["workers"])]
        g = r.get("gpu") or {}
        per = g.get("per_gpu") or []
        peak = max((x["peak_mem_gb"] for x in per if x["peak_mem_gb"] is not None), default=None)
        means = [x["util_mean_pct"] for x in per if x["util_mean_pct"] is not None]
        util = f"{sum(means) / len(means):.0f} ({min(means):.0f})" if means else "-"
        base = "" if s.get("baseline_schedule") in (None, s["schedule"]) else f" (vs k=1 {s['baseline_schedule']})"
        target = "-" if "target_speedup" not in s else f"{s['target_speedup']}: {'met' if s['meets_target'] else 'not met'}"
        busy = {True: "yes", False: "no", None: "-"}[g.get("every_gpu_busy")]
        lines.append(f"| {s['mode']} | {s['workload']} | {s['schedule']} | {s['workers']} | {_f(s['img_per_s'])} | "
                     f"{_f(s.get('speedup'))}{base} | {_f(s.get('efficiency'))} | {target} | {_f(peak)} | {util} | {busy} |")
    lines += ["", "Pool start, all workers loading at once (first call: one item per worker):", "",
              "| mode | workers | load s | time to first result s | worker load s (min-max) | peak GB per GPU (whole pool) |",
              "|---|---|---|---|---|---|"]
    for p in report["pools"]:
        if "load_s" not in p:
            continue
        wl = [x for x in p.get("worker_load_s") or [] if x is not None]
        per = (p.get("gpu_whole_pool") or {}).get("per_gpu") or []
        peaks = " / ".join(_f(x["peak_mem_gb"]) for x in per) or "-"
        lines.append(f"| {p['mode']} | {p['workers']} | {_f(p['load_s'])} | {_f(p.get('time_to_first_result_s'))} | "
                     f"{_f(min(wl)) + '-' + _f(max(wl)) if wl else '-'} | {peaks} |")
    reason = (report.get("gpu_sampler") or {}).get("reason")
    if reason:
        lines += ["", f"GPU memory and utilisation: none ({reason})."]
    skipped = report_skipped(report)
    if skipped:
        lines += ["", "Skipped or failed:", ""] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def report_skipped(report: dict[str, Any]) -> list[str]:
    out = [f"{s['mode']}, {s['workers']} workers: {s['skipped']}" for s in report.get("skipped", [])]
    for p in report["pools"]:
        if p.get("skipped") or p.get("error"):
            out.append(f"{p['mode']}, {p['workers']} workers: {p.get('skipped') or 'error: ' + p['error'][:200]}")
            continue
        out += [f"{p['mode']}, {p['workers']} workers, {r['workload']} {r['schedule']}: {r['skipped']}"
                for r in p.get("runs", []) if r.get("skipped")]
    return out


def _write(report: dict[str, Any], out_dir: pathlib.Path, name: str) -> None:
    report["speedups"] = speedups(report)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(report))


# -- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="scaling_gpu", help="output file stem")
    ap.add_argument("--work", default=None, help="folder for the checkpoint and images (default: a temp dir)")
    ap.add_argument("--size", default="7b", help="checkpoint size (benchmarks/checkpoints.py)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: CPU workers (smoke runs)")
    ap.add_argument("--workers", default="1,2,4,8", help="worker counts; those above the devices at hand are skipped")
    ap.add_argument("--max-workers", type=int, default=None,
                    help="devices at hand (default: the visible GPUs; 2 with --device cpu)")
    ap.add_argument("--schedules", default="round_robin,dynamic")
    ap.add_argument("--k1-schedules", default=None,
                    help="schedules timed with one worker (default: --schedules); the others' speedups use these")
    ap.add_argument("--modes", default="logits,generate")
    ap.add_argument("--workloads", default="uniform,skewed")
    ap.add_argument("--skewed-modes", default="logits", help="modes that also run the skewed workload")
    ap.add_argument("--skewed-workers", default="ends",
                    help="worker counts that also run the skewed workload: 'ends' (1 and the largest), 'all', or a list")
    ap.add_argument("--n", type=int, default=512, help="items per timed run")
    ap.add_argument("--new", type=int, default=32, help="generate mode: new tokens per answer (forced)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--skew-fraction", type=float, default=0.25, help="share of items at 2W x 2H in the skewed workload")
    ap.add_argument("--skew-layout", default="random", choices=["random", "stride", "block"],
                    help="where the large items sit: random positions (seed 0), every 1/fraction-th item, or first")
    ap.add_argument("--max-pixels", type=int, default=None,
                    help="judge max_pixels (default 2W x 2H, so a large item keeps its 4x pixels)")
    add_judge_argument(ap, "every pool", "fast_decode=true")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help="no warm-up call before the timed runs")
    ap.add_argument("--busy-pct", type=float, default=50.0, help="a GPU is busy when its mean utilisation is at least this")
    ap.add_argument("--sample-s", type=float, default=0.5, help="nvidia-smi sampling period")
    ap.add_argument("--deadline-s", type=float, default=None, help="skip stages estimated to end after this")
    ap.add_argument("--assume", action="append", default=[], metavar="KEY=VALUE",
                    help=f"time model for --plan and the deadline, keys: {', '.join(ASSUMED)}")
    ap.add_argument("--gpus", type=int, default=None, help="--plan: plan for this many GPUs")
    ap.add_argument("--plan", action="store_true", help="print the stages and a time estimate; load nothing")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 workers, a few small images (CI)")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):  # defaults for CI; flags given still win
        ap.set_defaults(size="smoke", device="cpu", n=8, new=4, batch_size=2, width=224, height=168,
                        modes="logits", workers="1,2,4")
    a = ap.parse_args(argv)
    a.workers = sorted({int(x) for x in a.workers.split(",")})
    a.schedules = a.schedules.split(",")
    a.k1_schedules = a.k1_schedules.split(",") if a.k1_schedules else list(a.schedules)
    a.modes, a.workloads, a.skewed_modes = a.modes.split(","), a.workloads.split(","), a.skewed_modes.split(",")
    for name, vals, known in (("schedules", a.schedules + a.k1_schedules, ("round_robin", "dynamic")),
                              ("modes", a.modes + a.skewed_modes, ("logits", "generate")),
                              ("workloads", a.workloads, ("uniform", "skewed"))):
        bad = [v for v in vals if v not in known]
        if bad:
            ap.error(f"--{name}: unknown {bad}; known: {', '.join(known)}")
    a.max_pixels = a.max_pixels or 4 * a.width * a.height
    return a


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    a = parse_args(argv)
    assumed = {**(ASSUMED_SMOKE if a.smoke else ASSUMED), **parse_kv(a.assume)}
    est = Estimator(a, assumed)
    if a.device == "cpu":
        max_workers = a.max_workers or 2  # CPU workers share the cores: two show the pool, more only slow CI
        devices = f"{max_workers} CPU worker slots"
    else:
        from src.models.reward.implementations.multi_gpu import visible_gpus

        max_workers = a.gpus if a.plan and a.gpus else (a.max_workers or len(visible_gpus()))
        devices = f"{max_workers} GPU(s)"
    pools, too_many = build_plan(a, max_workers)
    if a.plan:
        print_plan(a, pools, too_many, est, devices)
        return 0
    if a.device == "cuda" and max_workers == 0:
        raise SystemExit("no GPU visible (use --smoke or --device cpu for a CPU run, --plan --gpus N to plan)")

    import torch
    import transformers

    deadline = t_start + (24 * 3600.0 if a.deadline_s is None else a.deadline_s)

    def left() -> float:
        return deadline - time.perf_counter()

    out_dir = pathlib.Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sampler = GpuSampler(a.device == "cuda", every_s=a.sample_s)
    gpu_names = _gpu_names() if sampler.enabled else []
    report: dict[str, Any] = {"meta": {
        "command": "python benchmarks/scaling_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device_name": (f"{len(gpu_names)} x {gpu_names[0]}" if gpu_names else
                        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"),
        "gpus": gpu_names, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "n": a.n, "width": a.width, "height": a.height, "new_tokens": a.new, "batch_size": a.batch_size,
        "max_pixels": a.max_pixels, "workers": a.workers, "max_workers": max_workers, "schedules": a.schedules,
        "k1_schedules": a.k1_schedules, "modes": a.modes, "workloads": a.workloads, "skewed_modes": a.skewed_modes,
        "skewed_workers": a.skewed_workers,
        "judge_overrides": judge_settings(a), "busy_pct": a.busy_pct, "sample_s": a.sample_s,
        "deadline_s": a.deadline_s, "warmup": a.warmup, "smoke": a.smoke, "assumed": assumed,
        "skew": {"fraction": a.skew_fraction, "layout": a.skew_layout, "large_size": f"{2 * a.width}x{2 * a.height}"}},
        "skipped": too_many, "pools": [], "gpu_sampler": {"enabled": sampler.enabled, "reason": sampler.reason}}

    def save() -> None:
        report["wall_s"] = round(time.perf_counter() - t_start, 1)
        _write(report, out_dir, a.name)

    work = pathlib.Path(a.work) if a.work else pathlib.Path(tempfile.mkdtemp(prefix="scaling-gpu-"))
    try:
        with sampler:
            ck = get_checkpoint(a, work)
            report["meta"]["checkpoint"] = ck
            report["meta"]["checkpoint_desc"] = f"Qwen2.5-VL {a.size}, {ck['params_b']} B parameters, random weights, {ck['dtype']}"
            uniform, skewed, large = write_images(a, work / "images")
            report["meta"]["skew"].update(large_items=len(large), large_positions=large)
            report["meta"]["setup_s"] = round(time.perf_counter() - t_start, 1)
            log(f"setup done in {report['meta']['setup_s']} s: {ck}")
            save()
            paths = {"uniform": uniform, "skewed": skewed}
            for pool in pools:
                res: dict[str, Any] = {"mode": pool.mode, "workers": pool.k, "runs": []}
                report["pools"].append(res)
                try:
                    run_pool(a, pool, res, ck["path"], paths, set(large), sampler, est, left, save)
                except Exception as e:  # a pool that cannot start (OOM, a bad setting) is a result too
                    res["error"] = f"{type(e).__name__}: {e}"[:3000]
                    log(f"[{pool.mode} x{pool.k}] failed: {res['error'][:500]}")
                save()
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
        elif not a.keep_checkpoints:
            shutil.rmtree(work / f"qwen2_5_vl-{a.size}", ignore_errors=True)
    # closed pools leave no worker behind; a pid still alive here is a bug worth a line in the report
    report["workers_left"] = [pid for p in report["pools"] for pid in p.get("worker_pids") or [] if pid and _alive(pid)]
    save()
    print(markdown(report))
    return 0


def _gpu_names() -> list[str]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                         timeout=30)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
