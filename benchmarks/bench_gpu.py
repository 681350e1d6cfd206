#!/usr/bin/env python3
"""The library beside the naive transformers loop, on the same GPU and the same images.

For each model size: build a random-weight checkpoint of the real size (benchmarks/checkpoints.py),
run the naive loop (a separate script: preprocess a batch inline, then run the model) on it, then
the library through its public API: QwenVLRewardModel (in this process) and MultiGPURewardModel
with one worker (device_ids [0]: the subprocess overhead made visible). Writes JSON and a markdown
table: images/s per mode and batch size, load time, time to first result, peak GPU memory, and
the ratios library/naive.

    python benchmarks/bench_gpu.py --naive PATH/naive_hf_loop.py --sizes 7b,3b --out benchmarks/results
    python benchmarks/bench_gpu.py --smoke --out /tmp/x      # CPU, tiny model, seconds (CI)

Generate mode runs exactly --new tokens per answer in both contenders (min_new_tokens): random
weights would otherwise stop at random points and make the comparison meaningless.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import runs  # noqa: E402

PROMPT_NOTE = "library: built-in `quality` template; naive: its own one-line prompt (same image, ~same tokens)"


# -- helpers ---------------------------------------------------------------------------------

class Clock:
    """Wall time with the GPU drained first, so asynchronous work is counted where it belongs."""

    def __init__(self, cuda: bool):
        import torch

        self.sync = torch.cuda.synchronize if cuda else (lambda: None)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


class GpuSampler:
    """memory.used and utilization.gpu of every GPU, read from nvidia-smi by a thread every
    `every_s`: the one view that covers worker processes (their CUDA contexts and cached blocks
    included). `samples` holds (time.perf_counter(), index, memory MiB, utilisation % or None);
    `window(t0, t1)` summarises one timed stretch. Without nvidia-smi, `reason` says why not."""

    QUERY = ["nvidia-smi", "--query-gpu=index,memory.used,utilization.gpu", "--format=csv,noheader,nounits"]

    def __init__(self, enabled: bool, every_s: float = 0.25):
        self.reason = None if enabled else "not a GPU run"
        if enabled and shutil.which("nvidia-smi") is None:
            self.reason = "nvidia-smi not found"
        self.enabled = self.reason is None
        self.every_s = every_s
        self.samples: list[tuple[float, int, int, int | None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> list[tuple[int, int, int | None]]:
        out = subprocess.run(self.QUERY, capture_output=True, text=True, timeout=10)
        rows = []
        for line in out.stdout.strip().splitlines():
            idx, mem, util = (x.strip() for x in line.split(","))
            # utilization reads "[N/A]" on some virtualised GPUs: no number rather than a zero
            rows.append((int(idx), int(mem), int(util) if util.isdigit() else None))
        return rows

    def __enter__(self):
        if self.enabled:
            def loop():
                while not self._stop.is_set():
                    try:
                        rows = self.read()
                        now = time.perf_counter()
                        self.samples.extend((now, i, m, u) for i, m, u in rows)
                    except Exception:
                        pass
                    self._stop.wait(self.every_s)
            self._thread = threading.Thread(target=loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=15)

    def peak_gb_of(self, index: int, t0: float = float("-inf"), t1: float = float("inf")) -> float | None:
        mem = [m for t, i, m, _ in list(self.samples) if i == index and t0 <= t <= t1]
        return round(max(mem) / 1024, 2) if mem else None

    def window(self, t0: float, t1: float, indices: list[int], busy_pct: float) -> dict[str, Any]:
        """Per GPU of `indices`: peak memory (GB), mean and min utilisation over the samples taken
        between t0 and t1; `every_gpu_busy`: each one's mean utilisation is at least busy_pct."""
        if not self.enabled:
            return {"per_gpu": None, "every_gpu_busy": None, "reason": self.reason}
        rows = [s for s in list(self.samples) if t0 <= s[0] <= t1]
        per_gpu = []
        for index in indices:
            utils = [u for _, i, _, u in rows if i == index and u is not None]
            per_gpu.append({"index": index, "samples": sum(1 for r in rows if r[1] == index),
                            "peak_mem_gb": self.peak_gb_of(index, t0, t1),
                            "util_mean_pct": round(sum(utils) / len(utils), 1) if utils else None,
                            "util_min_pct": min(utils) if utils else None})
        means = [g["util_mean_pct"] for g in per_gpu]
        busy = None if not per_gpu or None in means else all(m >= busy_pct for m in means)
        others = sorted({i for _, i, _, u in rows if i not in indices and u})  # busy GPUs not ours
        out: dict[str, Any] = {"per_gpu": per_gpu, "every_gpu_busy": busy, "busy_threshold_pct": busy_pct}
        if others:
            out["other_gpus_busy"] = others
        if busy is None:
            out["reason"] = "no utilisation samples in this window" if per_gpu else "no GPU"
        return out


class GpuMemorySampler(GpuSampler):
    """Peak memory.used of one GPU (a one-worker run's view)."""

    def __init__(self, enabled: bool, index: int = 0, every_s: float = 0.25):
        super().__init__(enabled, every_s)
        self.index = index

    @property
    def peak_gb(self) -> float | None:
        return self.peak_gb_of(self.index)


def load_naive(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location("naive_hf_loop", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_images(naive_path: pathlib.Path | None, n: int, w: int, h: int):
    """The naive loop's own images when its script is at hand (same pixels for both contenders)."""
    if naive_path is not None:
        return load_naive(naive_path).make_images(n, w, h)
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        im = Image.fromarray((rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)).resize((w, h))
        ImageDraw.Draw(im).rectangle([i % 50, 20, 200 + i % 50, 300], fill=(200, 30, 30))
        out.append(im)
    return out


def run_naive(naive_path: pathlib.Path | None, model_dir: str, device: str, n: int, bs: list[int], new: int,
              w: int, h: int, timeout_s: float) -> dict[str, Any]:
    if naive_path is None:
        return {"skipped": "no --naive script given or found"}
    cmd = [sys.executable, str(naive_path), "--model", model_dir, "--device", device, "--n", str(n),
           "--bs", ",".join(map(str, bs)), "--new", str(new), "--width", str(w), "--height", str(h)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {timeout_s:.0f} s", "stdout_tail": (e.stdout or "")[-2000:]
                if isinstance(e.stdout, str) else ""}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    res = json.loads(lines[-1])
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["command"] = " ".join(cmd[1:])
    return res


def set_batch_size(judge, bs: int) -> None:
    # Benchmark-only: one loaded judge serves every batch size instead of one load per size.
    # batch_size is read at scoring time, so swapping the settings record is enough.
    judge.engine.settings = dataclasses.replace(judge.engine.settings, batch_size=bs)


def summarize(results) -> dict[str, Any]:
    scores = [r.score for r in results if r.score is not None]
    errors = [r.error for r in results if r.error]
    out = {"items": len(results), "scored": len(scores), "failed": len(errors)}
    if errors:
        out["first_error"] = errors[0][:300]
    if scores:
        out["score_mean"] = round(sum(scores) / len(scores), 4)
    return out


# -- the library -------------------------------------------------------------------------------

def bench_in_process(model_dir: str, device: str, mode: str, judge_kw: dict[str, Any], images: list,
                     bs_list: list[int], n_for_bs, new: int, cuda: bool, extra_runs=None,
                     warmup_items: int | None = None, reps: int = 1) -> dict[str, Any]:
    """Load, first result, a 10-item call, then per batch size: a warm-up call and `reps` timed
    calls (the row's figure: their median).
    warmup_items: at least this many items are scored before the first timed call, so the
    defaults' automatic compile (compile_after_items) has happened and is counted in the warm-up."""
    import torch

    from src.models.reward.implementations.local import QwenVLRewardModel

    clock = Clock(cuda)
    kw = dict(judge_kw)
    if mode == "generate":
        kw.update(max_new_tokens=new, min_new_tokens=new)
    t0 = clock.now()
    judge = QwenVLRewardModel(device=device, model_name=model_dir, mode=mode, batch_size=max(bs_list), **kw)
    load_s = clock.now() - t0
    eng = judge.engine
    out: dict[str, Any] = {"load_s": round(load_s, 2), "vision_attn": eng.vision_attn, "text_attn": eng.text_attn,
                           "fast_decode": eng._fast_decode,
                           "settings": {k: v for k, v in judge.settings.to_params().items() if k != "templates"}}
    try:
        set_batch_size(judge, 1)
        first = judge.batch_score(images[:1])
        out["time_to_first_result_s"] = round(clock.now() - t0, 2)
        out["first_result"] = summarize(first)
        set_batch_size(judge, max(bs_list))
        t = clock.now()
        judge.batch_score([images[i % len(images)] for i in range(1, 11)])
        out["ten_items_call_s"] = round(clock.now() - t, 2)
        for bs in bs_list:
            set_batch_size(judge, bs)
            n = n_for_bs(bs)
            w0 = clock.now()
            want = max(bs, (warmup_items or 0) - eng._items_scored)
            extra: dict[str, Any] = {}
            if want > bs:  # eager up to the automatic compile, then one batch that pays it
                judge.batch_score([images[i % len(images)] for i in range(want)])
                extra["warmup_eager_img_per_s"] = round(want / (clock.now() - w0), 3)
                w1 = clock.now()
                judge.batch_score(images[:bs])
                extra["compile_call_s"] = round(clock.now() - w1, 2)
                want += bs
            else:
                judge.batch_score([images[i % len(images)] for i in range(want)])  # allocator, kernels, shapes
            # One untimed call of the timed call's shape: what a new call shape costs once (the
            # compiled blocks recompile for its shapes, e.g. a continuous join of a few prompts:
            # ~2.7 s on the MoE, benchmarks/NOTES.md) is recorded here, not in the steady state.
            runs.new_images(judge)
            w2 = clock.now()
            judge.batch_score(images[:n])
            extra["settle_call_img_per_s"] = round(n / (clock.now() - w2), 3)
            want += n
            warm = clock.now() - w0
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times, encoded = [], []
            for _ in range(reps):  # the median of the timed calls: one call varies by a few percent
                enc = runs.new_images(judge)  # the warm-up's images: their features are not handed back
                t = clock.now()
                res = judge.batch_score(images[:n])
                times.append(clock.now() - t)
                encoded.append(runs.encoded_since(judge, enc))
            dt = statistics.median(times)
            row = {"items": n, "seconds": round(dt, 3), "img_per_s": round(n / dt, 3),
                   "img_per_s_each": [round(n / t, 3) for t in times], "warmup_s": round(warm, 2),
                   "warmup_items": want, **extra, "compiled_modules": len(eng._compiled),
                   "images_encoded": min(encoded), **summarize(res)}
            if cuda:
                row["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            out[f"bs{bs}"] = row
        if extra_runs:
            out.update(extra_runs(judge, clock))
    finally:
        judge.close()
        if cuda:
            torch.cuda.empty_cache()
    return out


def bench_small_jobs(model_dir: str, device: str, images: list, cuda: bool, variants: dict[str, dict]) -> dict:
    """A small job per judge-settings variant, each on a fresh load: time to the first result
    (load + one item) and to the end of a 10-item job (load + ten items), in both modes."""
    from src.models.reward.implementations.local import QwenVLRewardModel

    clock = Clock(cuda)
    out: dict[str, Any] = {}
    if cuda:  # one untimed load first: the process's CUDA start is not charged to the first variant
        with QwenVLRewardModel(device=device, model_name=model_dir) as judge:
            judge.batch_score(images[:1])
    for name, kw in variants.items():
        for mode in ("logits", "generate"):
            extra = {"max_new_tokens": 128} if mode == "generate" else {}
            t0 = clock.now()
            with QwenVLRewardModel(device=device, model_name=model_dir, mode=mode, **extra, **kw) as judge:
                judge.batch_score(images[:1])
                first = clock.now() - t0
            t0 = clock.now()
            with QwenVLRewardModel(device=device, model_name=model_dir, mode=mode, **extra, **kw) as judge:
                res = judge.batch_score([images[i % len(images)] for i in range(10)])
                job = clock.now() - t0
            out[f"{name}_{mode}"] = {"time_to_first_result_s": round(first, 2), "ten_item_job_s": round(job, 2),
                                     **summarize(res)}
            log(f"small job {name} {mode}: {out[f'{name}_{mode}']}")
    return out


def bench_worker(model_dir: str, device_ids: list, judge_kw: dict[str, Any], paths: list[str], bs: int,
                 micro_batch: int | None, cuda: bool) -> dict[str, Any]:
    from src.models.reward.implementations.multi_gpu import MultiGPURewardModel

    clock = Clock(False)  # the GPU work is in the worker; its answer arriving is the end
    out: dict[str, Any] = {"device_ids": device_ids, "micro_batch": micro_batch}
    with GpuMemorySampler(cuda) as mem:
        t0 = clock.now()
        judge = MultiGPURewardModel(device_ids=device_ids, model_name=model_dir, mode="logits", batch_size=bs,
                                    micro_batch=micro_batch, progress=False, **judge_kw)
        out["load_s"] = round(clock.now() - t0, 2)
        out["worker_pids"] = judge.worker_pids()
        try:
            for call in (1, 2):
                t = clock.now()
                res = judge.batch_score(paths)
                dt = clock.now() - t
                out[f"call{call}"] = {"items": len(paths), "seconds": round(dt, 3),
                                      "img_per_s": round(len(paths) / dt, 3), **summarize(res)}
        finally:
            judge.close()
    out["peak_gpu_mem_used_gb_nvidia_smi"] = mem.peak_gb
    return out


def in_process_path_runs(paths: list[str], bs: int):
    """Two calls on files, as the one-worker runs get them: the in-process side of that comparison."""
    def run(judge, clock) -> dict[str, Any]:
        set_batch_size(judge, bs)
        out = {}
        for call in (1, 2):
            t = clock.now()
            res = judge.batch_score(paths)
            dt = clock.now() - t
            out[f"paths_call{call}"] = {"items": len(paths), "seconds": round(dt, 3),
                                        "img_per_s": round(len(paths) / dt, 3), **summarize(res)}
        return out
    return run


# -- one model size ---------------------------------------------------------------------------

def bench_size(size: str, a, naive_path: pathlib.Path | None, work: pathlib.Path, deadline: float,
               res: dict[str, Any], save) -> dict[str, Any]:
    """Fill `res` stage by stage, calling save() after each, so a run cut short keeps what it measured."""
    import torch

    from benchmarks.checkpoints import build_checkpoint

    cuda = a.device.startswith("cuda")

    def left() -> float:
        return deadline - time.perf_counter()

    model_dir = work / size
    made = model_dir / "random_checkpoint.json"
    if made.is_file():  # built earlier in this --work folder (benchmarks/checkpoints.py)
        res["checkpoint"] = {**json.loads(made.read_text()), "reused": True}
    else:
        res["checkpoint"] = build_checkpoint(size, model_dir, device=a.device)
    log(f"[{size}] checkpoint: {res['checkpoint']}")

    images = make_images(naive_path, max(a.n_worker, a.n), a.width, a.height)
    img_dir = work / "images"
    img_dir.mkdir(exist_ok=True)
    paths = []
    for i, im in enumerate(images[:a.n_worker]):
        p = img_dir / f"{i:04d}.png"
        if not p.exists():
            im.save(p)
        paths.append(str(p))

    if "naive" in a.stages and left() > 60:
        res["naive"] = run_naive(naive_path, str(model_dir), a.device, a.n, a.bs, a.new, a.width, a.height,
                                 timeout_s=max(60.0, left() - 60))
        log(f"[{size}] naive: {res['naive']}")
        save()

    judge_kw = runs.judge_settings(a)
    gen_n = lambda bs: min(a.n, max(2 * bs, 8))  # two batches: the second one's preparation overlaps  # noqa: E731
    if "logits" in a.stages and left() > 60:
        res["library_logits"] = bench_in_process(
            str(model_dir), a.device, "logits", judge_kw, images, a.bs,
            lambda bs: a.n_worker if bs == max(a.bs) else a.n, a.new, cuda,
            extra_runs=in_process_path_runs(paths, max(a.bs)) if "worker" in a.stages else None,
            warmup_items=a.warmup_items if a.warmup_items is not None else _auto_compile_items(judge_kw, a.device),
            reps=a.reps)
        log(f"[{size}] library logits: {res['library_logits']}")
        save()
    if "generate" in a.stages and left() > 60:
        res["library_generate"] = bench_in_process(
            str(model_dir), a.device, "generate", judge_kw, images, a.bs, gen_n, a.new, cuda,
            warmup_items=a.warmup_items if a.warmup_items is not None else _auto_compile_items(judge_kw, a.device),
            reps=a.reps)
        log(f"[{size}] library generate: {res['library_generate']}")
        save()
    if "smalljobs" in a.stages and left() > 60:
        old = {"fast_decode": False, "gpu_preprocess": False, "compile_vision": False, "compile_language": False}
        res["small_jobs"] = bench_small_jobs(str(model_dir), a.device, images, cuda,
                                             {"defaults": judge_kw, "previous_defaults": {**judge_kw, **old}})
        save()
    ids = ["cpu"] if not cuda else [int(a.device.split(":")[1]) if ":" in a.device else 0]
    for mb in a.micro_batch:
        key = "library_worker" if mb is None else f"library_worker_mb{mb}"
        if "worker" in a.stages and left() > 60:
            res[key] = bench_worker(str(model_dir), ids, judge_kw, paths, max(a.bs), mb, cuda)
            log(f"[{size}] library one worker (micro_batch {mb or 'default'}): {res[key]}")
            save()
    res["ratios"] = ratios(res, a)
    if cuda:
        torch.cuda.empty_cache()
    if not a.keep_checkpoints:
        shutil.rmtree(model_dir, ignore_errors=True)
    return res


def _auto_compile_items(judge_kw: dict[str, Any], device: str) -> int:
    """Items the defaults score before their automatic compile, or 0 without one (the judge
    compiles automatically on CUDA only: a CPU run has nothing to wait for)."""
    from src.models.reward.settings import JudgeSettings

    s = JudgeSettings(model_name="x", **judge_kw)
    auto = device.startswith("cuda") and (s.compile_vision is None or s.compile_language is None)
    return s.compile_after_items if auto else 0


def ratios(res: dict[str, Any], a) -> dict[str, Any]:
    naive = res.get("naive") or {}
    out: dict[str, Any] = {}
    for mode, key in (("logits", "logits_bs{bs}_img_per_s"), ("generate", f"generate{a.new}_bs{{bs}}_img_per_s")):
        lib = res.get(f"library_{mode}") or {}
        for bs in a.bs:
            n_v, l_v = naive.get(key.format(bs=bs)), (lib.get(f"bs{bs}") or {}).get("img_per_s")
            if n_v and l_v:
                out[f"{mode}_bs{bs}_library_over_naive"] = round(l_v / n_v, 2)
    lib = res.get("library_logits") or {}
    for key in [k for k in res if k.startswith("library_worker")]:
        wk = res[key]
        for call in (1, 2):
            ip, w = (lib.get(f"paths_call{call}") or {}).get("img_per_s"), (wk.get(f"call{call}") or {}).get("img_per_s")
            if ip and w:
                tag = key.replace("library_worker", "worker")
                out[f"{tag}_over_in_process_call{call}"] = round(w / ip, 3)
    return out


# -- output -----------------------------------------------------------------------------------

def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [f"# Benchmark: library vs naive transformers loop ({meta['device_name']})", "",
             f"`{meta['command']}`", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, {meta['width']}x{meta['height']} images, "
             f"generate = {meta['new_tokens']} new tokens (forced), random weights of the real size. "
             f"Judge settings: `{json.dumps(meta['judge_overrides'])}`. {PROMPT_NOTE}.", ""]
    for r in report["sizes"]:
        if "checkpoint" not in r:
            continue
        size, naive = r["size"], r.get("naive") or {}
        lines += [f"## {_judge_name(size)} ({r['checkpoint']['params_b']} B parameters)", "",
                  "| mode | batch | naive img/s | library img/s | library / naive | naive peak GB | library peak GB "
                  "| library warm-up s (items) |",
                  "|---|---|---|---|---|---|---|---|"]
        for mode, key in (("logits", "logits_bs{bs}_img_per_s"), ("generate", f"generate{meta['new_tokens']}_bs{{bs}}_img_per_s")):
            lib = r.get(f"library_{mode}") or {}
            for bs in meta["batch_sizes"]:
                row = lib.get(f"bs{bs}") or {}
                n_v, l_v = naive.get(key.format(bs=bs)), row.get("img_per_s")
                ratio = f"{l_v / n_v:.2f}x" if n_v and l_v else "-"
                each = row.get("img_per_s_each") or []
                calls = f" (median of {', '.join(_f(v) for v in each)})" if len(each) > 1 else ""
                lines.append(f"| {mode if mode == 'logits' else 'generate' + str(meta['new_tokens'])} | {bs} | "
                             f"{_f(n_v)} | {_f(l_v)}{calls} | {ratio} | {_f(naive.get('peak_gpu_mem_gb'))} (max of run) | "
                             f"{_f(row.get('peak_gpu_mem_gb'))} | {_f(row.get('warmup_s'))} ({row.get('warmup_items', '-')}) |")
        lines.append("")
        ll, lg, wk = r.get("library_logits") or {}, r.get("library_generate") or {}, r.get("library_worker") or {}
        small = r.get("small_jobs") or {}
        if small:
            lines += ["Small jobs, each on a fresh load (load + 1 item; load + 10 items):", "",
                      "| settings | mode | time to first result s | 10-item job s |", "|---|---|---|---|"]
            for key, v in small.items():
                name, _, mode = key.rpartition("_")
                lines.append(f"| {name.replace('_', ' ')} | {mode} | {_f(v.get('time_to_first_result_s'))} | "
                             f"{_f(v.get('ten_item_job_s'))} |")
            lines.append("")
        lines += ["| | load s | time to first result s |", "|---|---|---|",
                  f"| naive loop | {_f(naive.get('load_s'))} | - |",
                  f"| library logits (in-process) | {_f(ll.get('load_s'))} | {_f(ll.get('time_to_first_result_s'))} |",
                  f"| library generate (in-process) | {_f(lg.get('load_s'))} | {_f(lg.get('time_to_first_result_s'))} |",
                  f"| library one worker (subprocess) | {_f(wk.get('load_s'))} | - |", ""]
        workers = [k for k in r if k.startswith("library_worker")]
        if workers:
            n_items = (r[workers[0]].get("call1") or {}).get("items")
            lines += [f"Same {n_items} image files, logits, batch {max(meta['batch_sizes'])}; call 1 of a worker includes "
                      "its first-batch warm-up (compiling), call 2 does not:", "",
                      "| | load s | call 1 s | call 1 img/s | call 2 s | call 2 img/s | call 2 / in-process | peak GPU GB |",
                      "|---|---|---|---|---|---|---|---|"]
            c1, c2 = ll.get("paths_call1") or {}, ll.get("paths_call2") or {}
            lines.append(f"| in-process | {_f(ll.get('load_s'))} | {_f(c1.get('seconds'))} | {_f(c1.get('img_per_s'))} | "
                         f"{_f(c2.get('seconds'))} | {_f(c2.get('img_per_s'))} | 1 | - |")
            for key in workers:
                d = r[key]
                c1, c2 = d.get("call1") or {}, d.get("call2") or {}
                tag = key.replace("library_worker", "worker")
                ratio = r.get("ratios", {}).get(f"{tag}_over_in_process_call2")
                lines.append(f"| one worker, micro_batch {d.get('micro_batch') or 'default'} | {_f(d.get('load_s'))} | "
                             f"{_f(c1.get('seconds'))} | {_f(c1.get('img_per_s'))} | {_f(c2.get('seconds'))} | "
                             f"{_f(c2.get('img_per_s'))} | {_f(ratio)} | {_f(d.get('peak_gpu_mem_used_gb_nvidia_smi'))} |")
            lines += ["", "(peak GPU for a worker: nvidia-smi memory.used, CUDA context and cached blocks included)", ""]
    return "\n".join(lines) + "\n"


def _judge_name(size: str) -> str:
    names = {"7b": "Qwen2.5-VL-7B", "3b": "Qwen2.5-VL-3B", "qwen3_vl-8b": "Qwen3-VL-8B",
             "qwen3_vl_moe-30b-a3b-24l": "Qwen3-VL-30B-A3B, 24 of its 48 layers"}
    return names.get(size, f"smoke stand-in {size}")


def _f(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) and abs(v) < 100 else str(v)


def log(text: str) -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="7b")
    ap.add_argument("--naive", default=os.environ.get("NAIVE_HF_LOOP"), help="path of naive_hf_loop.py")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="bench_gpu", help="output file stem")
    ap.add_argument("--work", default=None, help="folder for checkpoints and images (default: a temp dir)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--n", type=int, default=64, help="images per timed run (the naive loop's --n)")
    ap.add_argument("--n-worker", type=int, default=256, help="images for the in-process vs one-worker runs")
    ap.add_argument("--reps", type=int, default=1,
                    help="the library's timed calls per mode and batch size; the tables show their median")
    ap.add_argument("--bs", default="1,8,32")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--micro-batch", default="default",
                    help="MultiGPURewardModel micro_batch values to run, comma-separated ('default': its own)")
    ap.add_argument("--stages", default="naive,logits,generate,worker")
    runs.add_judge_argument(ap, "the library runs", "compile_vision=true")
    ap.add_argument("--deadline-s", type=float, default=None, help="skip stages that would start after this")
    ap.add_argument("--warmup-items", type=int, default=None,
                    help="items scored before timing, per mode (default: the judge's compile_after_items when its "
                         "compile is automatic, so the timed call sees the defaults' steady state)")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, tiny images: seconds (CI)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.sizes = a.sizes if a.sizes.startswith("smoke") else "smoke"
        a.device, a.n, a.n_worker, a.bs, a.new = "cpu", 4, 4, "1,2", 4
        a.width, a.height = 224, 168
    a.bs = [int(x) for x in a.bs.split(",")]
    a.micro_batch = [None if x == "default" else int(x) for x in a.micro_batch.split(",")]
    a.stages = set(a.stages.split(","))
    naive_path = pathlib.Path(a.naive) if a.naive else None
    if naive_path is not None and not naive_path.is_file():
        raise SystemExit(f"--naive: {naive_path} is not a file")

    import torch
    import transformers

    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU (use --smoke for a CPU run)")
    deadline = time.perf_counter() + (a.deadline_s or 24 * 3600.0)
    out_dir = pathlib.Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"meta": {
        "command": "python benchmarks/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device_name": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "width": a.width, "height": a.height,
        "new_tokens": a.new, "batch_sizes": a.bs, "n": a.n, "n_worker": a.n_worker,
        "judge_overrides": runs.judge_settings(a), "smoke": a.smoke, "naive_script": str(naive_path) if naive_path else None},
        "sizes": []}
    work = pathlib.Path(a.work) if a.work else pathlib.Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        for size in a.sizes.split(","):
            res: dict[str, Any] = {"size": size}
            report["sizes"].append(res)
            bench_size(size, a, naive_path, work, deadline, res, lambda: _write(report, out_dir, a.name))
            _write(report, out_dir, a.name)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    _write(report, out_dir, a.name)
    print(markdown(report))
    return 0


def _write(report: dict[str, Any], out_dir: pathlib.Path, name: str) -> None:
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
