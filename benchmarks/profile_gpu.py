#!/usr/bin/env python3
"""Where a judge's GPU memory and GPU time go, through the library's public API (one GPU).

  memory   one call of --n items with torch's allocator history recorded: the peak of allocated
           memory, and the allocations alive at that peak (size, count, the Python lines that made
           them), largest first
  kernels  one call of --n items under torch.profiler: CUDA time per kernel name (top 30), and
           per coarse kind (GEMM, grouped GEMM, attention, elementwise, ...)
  parts    generate mode: calls of --n items with the decoding step's fused parts (cuDNN's
           decoding attention, the compiled rotary embedding) switched off in turn, alternating
  experts  a mixture of experts: calls of --n items with the library's experts (the combine in one
           Triton kernel) and transformers' grouped_mm path, alternating
  patch    calls of --n items with the vision tower's patch embedding as one matrix multiplication
           and as transformers' Conv3d, alternating
  gaps     (CUDA) one call of --n items profiled with Python stacks: the GPU's idle stretches, each
           charged to the host op and code line that launched the work ending it, and the runtime
           calls where the host waited for the GPU
  rope     calls of --n items with the rope positions worked out on the host ahead and by the
           model's walk on the GPU, alternating
  mask     calls of --n items with the image tokens' positions found on the host ahead and with the
           model's own placeholder check and deepstack masks, alternating
  split    calls of --n items with the tower's output split by the sizes known on the host and by
           the model's own method (which reads them back from the device), alternating
  gc       calls of --n items with the garbage collector as it is and with every object alive after
           the judge's compile frozen out of its sight (gc.freeze), alternating
  ramp     static batches: calls of --n items whose first chunk is a quarter chunk, a whole one, an
           eighth and a half, alternating
  interval calls of --n items with the interpreter's switch interval as found, 1 ms and 0.2 ms,
           alternating
  threads  calls of --n items with the judge's image threads and with 8, alternating
  counters generate mode: calls of --n items with the static cache's counters made on the device
           and on the CPU, alternating
  gelu     (CUDA) the vision MLP's GELU inside fc1's matrix multiplication against in a kernel of
           its own: one MLP in float32, then calls of --n items alternating
  gil      calls of --n items sampled by py-spy (`record --gil`): per thread, the time it held the
           interpreter lock and its top functions (the launches on the main thread against the
           preparation's and the image threads' Python)
  timeline calls of --n items, not profiled: per chunk, when the host and (CUDA) when the GPU
           reached its run's start and end, the towers' starts and ends and the forward pass's
           syncing points, and when the prepare thread prepared it; a call as the judge runs, and
           one with every chunk prepared before it starts
Each stage runs the judge twice (an untimed call first: allocator, kernels, shapes), in the modes
asked for (--modes logits,generate). Random weights of the real size (benchmarks/checkpoints.py).

    python benchmarks/profile_gpu.py --size qwen3_vl_moe-30b-a3b-24l --out $OUT
    python benchmarks/profile_gpu.py --smoke --out /tmp/x      # CPU, tiny model (CI)
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import statistics
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_gpu import make_images  # noqa: E402
from benchmarks import runs  # noqa: E402
from src.models.reward.experts import NAME as EXPERTS_NAME  # noqa: E402

# Kernel names to a coarse kind, first match wins.
_KINDS = [("grouped gemm", r"grouped|GroupMM|group_gemm|_grouped_mm"),
          ("attention", r"flash|fmha|attention|sdpa|softmax"),
          ("gemm", r"gemm|sm90_xmma|cutlass|cublas|nvjet|aten::mm|aten::addmm|aten::bmm|Kernel2"),
          ("sort / index", r"sort|Sort|index|gather|scatter|histc|cumsum|topk|TopK|nonzero"),
          ("conv", r"conv|Conv"),
          ("triton (compiled)", r"triton"),
          ("reduce", r"reduce|Reduce"),
          ("copy / cast", r"copy|Copy|cast|fill|Fill")]


def _kind(name: str) -> str:
    for kind, pat in _KINDS:
        if re.search(pat, name):
            return kind
    return "elementwise / other"


def _judge(model_dir: str, a, mode: str):
    from src.models.reward.implementations.local import QwenVLRewardModel

    kw: dict[str, Any] = dict(device=a.device, model_name=model_dir, mode=mode, batch_size=a.bs)
    if mode == "generate":
        kw.update(max_new_tokens=a.new, min_new_tokens=a.new)
    kw.update(runs.judge_settings(a))
    return QwenVLRewardModel(**kw)


def _where(frames: list[dict[str, Any]]) -> str:
    """The innermost lines of the library, transformers and torch.nn that made an allocation."""
    keep = [f for f in frames if any(s in f.get("filename", "") for s in ("/src/models/", "transformers/", "torch/nn/"))]
    return " <- ".join(f"{pathlib.Path(f['filename']).name}:{f['line']} {f['name']}" for f in keep[:4]) or "?"


def _alive(trace: list[dict[str, Any]], upto: int) -> dict[int, dict[str, Any]]:
    """The allocations of the trace's first `upto` events not yet freed."""
    alive: dict[int, dict[str, Any]] = {}
    for ev in trace[:upto]:
        if ev["action"] == "alloc":
            alive[ev["addr"]] = ev
        elif ev["action"] == "free_completed":
            alive.pop(ev["addr"], None)
    return alive


def _grouped(alive: dict[int, dict[str, Any]], top: int = 20) -> list[dict[str, Any]]:
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for ev in alive.values():
        groups[_where(ev.get("frames", []))].append(ev["size"])
    return [{"where": w, "gb": round(sum(s) / 1e9, 3), "count": len(s), "largest_mb": round(max(s) / 1e6, 1)}
            for w, s in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]]


def stage_memory(model_dir: str, a, images: list, mode: str) -> dict[str, Any]:
    """The allocator's history from before the judge's first call: what the first call leaves
    allocated (kept between calls), and what is alive at the peak of both calls."""
    import torch

    cuda = a.device.startswith("cuda")
    judge = _judge(model_dir, a, mode)
    try:
        if not cuda:
            judge.batch_score(images[:a.bs])
            return {"skipped": "the allocator history is CUDA's"}
        torch.cuda.synchronize()
        runs.new_images(judge)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(max_entries=4_000_000, context="alloc", stacks="python")
        judge.batch_score(images[:a.bs])
        torch.cuda.synchronize()
        after_first = torch.cuda.memory_allocated()
        first_events = len(torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()])
        runs.new_images(judge)
        res = judge.batch_score(images[:a.n])
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        peak = torch.cuda.max_memory_allocated()
    finally:
        judge.close()
    trace = snap["device_traces"][torch.cuda.current_device()]
    # The event at which allocated memory (above what was live when recording began) peaks.
    live: dict[int, int] = {}
    total = best = best_i = 0
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev["size"]
            total += ev["size"]
            if total > best:
                best, best_i = total, i
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])
    return {"mode": mode, "items": a.n, "scored": sum(r.score is not None for r in res),
            "allocated_after_load_gb": round(base / 1e9, 2),
            "allocated_after_first_call_gb": round(after_first / 1e9, 2),
            "peak_allocated_gb": round(peak / 1e9, 2), "peak_above_load_gb_from_trace": round(best / 1e9, 2),
            "trace_events": len(trace), "kept_after_first_call": _grouped(_alive(trace, first_events)),
            "alive_at_peak": _grouped(_alive(trace, best_i + 1))}


def _profiled_call(model_dir: str, a, images: list, mode: str, with_stack: bool = False):
    """Two untimed calls (the second pays an automatic compile when compile_after_items <= bs) and
    one of --n items (a call of more than one batch starts with a quarter batch: its shapes seen
    once before), the store of vision features emptied, then one call of --n items under
    torch.profiler (CPU, and CUDA on a GPU). Returns the profiler, the results, the call's wall
    time and the images the tower encoded in it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = a.device.startswith("cuda")
    judge = _judge(model_dir, a, mode)
    try:
        for _ in range(2):
            judge.batch_score(images[:a.bs])
        judge.batch_score(images[:a.n])
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        enc = runs.new_images(judge)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with profile(activities=acts, with_stack=with_stack) as prof:
            res = judge.batch_score(images[:a.n])
            if cuda:
                torch.cuda.synchronize()
        wall = time.perf_counter() - t
        encoded = runs.encoded_since(judge, enc)
    finally:
        judge.close()
    return prof, res, wall, encoded


def stage_kernels(model_dir: str, a, images: list, mode: str) -> dict[str, Any]:
    import torch

    cuda = a.device.startswith("cuda")
    prof, res, wall, encoded = _profiled_call(model_dir, a, images, mode)
    per_name: dict[str, list[float]] = collections.defaultdict(list)
    for ev in prof.events():  # on the CPU (smoke runs): the operators' own CPU time instead
        if cuda and ev.device_type == torch.autograd.DeviceType.CUDA:
            per_name[ev.name].append(ev.device_time / 1e3)  # ms
        elif not cuda and ev.device_type == torch.autograd.DeviceType.CPU and ev.name.startswith("aten::"):
            per_name[ev.name].append(ev.self_cpu_time_total / 1e3)
    total = sum(sum(v) for v in per_name.values())
    kinds: dict[str, float] = collections.defaultdict(float)
    for name, ts in per_name.items():
        kinds[_kind(name)] += sum(ts)
    top = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:30]
    return {"mode": mode, "items": a.n, "scored": sum(r.score is not None for r in res), "images_encoded": encoded,
            "wall_s_profiled": round(wall, 3), "gpu_kernel_ms": round(total, 1),
            "by_kind_ms": {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:140], "ms": round(sum(ts), 2), "count": len(ts)} for n, ts in top]}


def gpu_gaps(kernels: list[tuple[float, float, int]], ops: dict[int, tuple[str, str]], min_gap_us: float = 20.0,
             top: int = 15) -> dict[str, Any]:
    """Where the GPU waited on the host. kernels: (start us, end us, id of the host op that launched
    it) for every GPU activity of a call, on any stream; ops: host op id -> (name, where in the
    Python code). Each stretch longer than min_gap_us in which no GPU activity runs is charged to
    the host op that launched the activity ending it: the host was late with that launch (it was
    busy, or waiting on a sync, before it). Returns the call's GPU span, its idle time and share,
    and the charges by op and place, largest first."""
    ks = sorted(kernels)
    if not ks:
        return {"span_ms": 0.0, "idle_ms": 0.0, "idle_share": 0.0, "gaps": 0, "by_launch": []}
    charged: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    busy_until = ks[0][1]
    for start, end, op in ks[1:]:
        if start - busy_until > min_gap_us:
            charged[ops.get(op, ("?", "?"))].append(start - busy_until)
        busy_until = max(busy_until, end)
    span = busy_until - ks[0][0]
    idle = sum(sum(v) for v in charged.values())
    rows = sorted(charged.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"span_ms": round(span / 1e3, 2), "idle_ms": round(idle / 1e3, 2),
            "idle_share": round(idle / span, 4) if span else 0.0, "gaps": sum(len(v) for v in charged.values()),
            "by_launch": [{"op": op, "where": where, "idle_ms": round(sum(g) / 1e3, 2), "gaps": len(g),
                           "largest_ms": round(max(g) / 1e3, 2)} for (op, where), g in rows]}


def _code_line(stack: list[str]) -> str:
    """The innermost frames of the library or transformers in a Python stack, innermost first
    (frames as the profiler names them, 'path(line): function')."""
    keep = [f for f in stack if "models/reward/" in f or "transformers/" in f]
    return " <- ".join(pathlib.Path(f.split("(")[0]).name + "(" + f.split("(", 1)[1] if "(" in f else f
                       for f in keep[:2]) or "?"


_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def timeline(trace: list[dict[str, Any]]) -> tuple[list[tuple[float, float, int]], dict[int, tuple[str, str]],
                                                   list[tuple[int, str, float]]]:
    """A profiled call's Chrome trace events (torch.profiler with Python stacks) as gpu_gaps and
    host_waits take them: the GPU's activities (start us, end us, the external id of the host op
    that launched them), the host ops (external id -> name, the library or transformers code line
    around it: the innermost Python frames open on its thread when it began) and the runtime calls
    that can block the host (synchronize, copies: the launching op's id, the call, its us)."""
    gpu, runtime, ops = [], [], {}
    by_thread: dict[Any, list[tuple[float, int, dict[str, Any]]]] = collections.defaultdict(list)
    for e in trace:
        cat, args = e.get("cat"), e.get("args") or {}
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            gpu.append((e["ts"], e["ts"] + e.get("dur", 0), args.get("External id", 0)))
        elif cat == "cuda_runtime" and e["name"].startswith(_SYNCS):
            runtime.append((args.get("External id", 0), e["name"], e.get("dur", 0)))
        elif cat in ("cpu_op", "python_function"):  # a frame sorts before an op starting with it
            by_thread[(e.get("pid"), e.get("tid"))].append((e["ts"], 0 if cat == "python_function" else 1, e))
    for events in by_thread.values():
        frames: list[tuple[float, str]] = []  # open Python frames: (end, name), outermost first
        for ts, is_op, e in sorted(events, key=lambda t: (t[0], t[1], -t[2].get("dur", 0))):
            while frames and frames[-1][0] <= ts:
                frames.pop()
            if is_op:
                ops[(e.get("args") or {}).get("External id", 0)] = (e["name"], _code_line([f for _, f in reversed(frames)]))
            else:
                frames.append((ts + e.get("dur", 0), e["name"]))
    ops.pop(0, None)
    return gpu, ops, runtime


def host_waits(runtime: list[tuple[int, str, float]], ops: dict[int, tuple[str, str]], top: int = 12) -> list[dict[str, Any]]:
    """The runtime calls where the host can wait for the GPU (a synchronize, a copy to the host),
    grouped by the op and code line that made them, most frequent first."""
    by: dict[tuple[str, str, str], list[float]] = collections.defaultdict(list)
    for op, name, us in runtime:
        by[(name,) + ops.get(op, ("?", "?"))].append(us)
    rows = sorted(by.items(), key=lambda kv: -len(kv[1]))[:top]
    return [{"call": call, "op": op, "where": where, "count": len(v), "ms": round(sum(v) / 1e3, 2)}
            for (call, op, where), v in rows]


def stage_gaps(model_dir: str, a, images: list, mode: str) -> dict[str, Any]:
    """One call of --n items under torch.profiler with Python stacks (_profiled_call): the GPU's
    idle stretches between its activities, each charged to the host op (and its library or
    transformers code line) that launched what ended it (gpu_gaps), and the runtime calls where the
    host may have waited for the GPU (host_waits): a host sync is what turns host work into GPU
    idle time."""
    if not a.device.startswith("cuda"):
        return {"skipped": "the GPU's idle time needs a CUDA device"}
    import tempfile

    prof, _, wall, encoded = _profiled_call(model_dir, a, images, mode, with_stack=True)
    with tempfile.TemporaryDirectory() as d:  # the Python frames are in the Chrome trace only
        prof.export_chrome_trace(f"{d}/trace.json")
        gpu, ops, runtime = timeline(json.loads(pathlib.Path(f"{d}/trace.json").read_text())["traceEvents"])
    gaps = gpu_gaps(gpu, ops)
    return {"mode": mode, "items": a.n, "images_encoded": encoded, "wall_s_profiled": round(wall, 3),
            "outside_span_ms": round(wall * 1e3 - gaps["span_ms"], 1), **gaps, "host_waits": host_waits(runtime, ops)}


def _switch_parts(engine, cudnn: bool, rotary: bool, saved: dict) -> None:
    """The decoding step's two fused parts on or off, on the loaded judge (benchmark-only
    switches of the library's internals): cuDNN's decoding attention (off: its once-per-process
    refusal, sdpa's own choice) and the compiled rotary embedding (off: the module runs eagerly).
    A generate call captures its step afresh, so the next call runs as switched."""
    from src.models.reward import vision_attention as va

    (va._cudnn_refused.discard if cudnn else va._cudnn_refused.add)("decoding attention")
    for m in engine._compiled:
        if type(m).__name__ == "RotaryEmbedding":
            saved.setdefault(id(m), m._compiled_call_impl)
            m._compiled_call_impl = saved[id(m)] if rotary else None


def stage_timeline(model_dir: str, a, images: list, mode: str) -> dict[str, Any]:
    """Calls of --n items, not profiled, with a clock reading and (CUDA) an event at each chunk's
    run (start, and end after its results were read), the vision tower's and the language model's
    start and end, the placeholder check and the deepstack layers, and clock readings around each
    chunk's preparation (the prepare thread). Per point: when the host got there and when the GPU
    did. Where the GPU gets to a point as soon as the host does, it had run out of work and waited
    for the host; the GPU's time from one chunk's end to the next one's first point is idle but for
    that chunk's input copies. Two calls: `beside`, as the judge runs (each chunk prepared while
    the one before runs), and `prepared_first`, every chunk prepared before the call starts (the
    same chunks): what the preparation beside the model costs the model."""
    import threading

    import torch

    cuda = a.device.startswith("cuda")
    judge = _judge(model_dir, a, mode)
    engine = judge.engine
    marks: list[tuple[int, str, float, Any]] = []  # (chunk, point, host clock, event or None)
    count = {"run": -1, "prep": -1}
    sizes: dict[int, int] = {}
    lock = threading.Lock()

    def mark(chunk: int, point: str, event: bool = True) -> None:
        ev = None
        if event and cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
        marks.append((chunk, point, time.perf_counter(), ev))

    prepare, run_chunk = engine._prepare, engine._run_chunk
    asked: list[tuple[tuple, dict]] = []  # the chunks a call prepares, in order
    ready: list[Any] = []  # prepared_first: those chunks, prepared before the call

    def timed_prepare(*args, **kwargs):
        with lock:
            count["prep"] += 1
            k = count["prep"]
        if ready:
            return ready[k]
        mark(k, "prep_start", event=False)
        out = prepare(*args, **kwargs)
        mark(k, "prep_end", event=False)
        return out

    def asking(*args, **kwargs):
        asked.append((args, kwargs))
        return prepare(*args, **kwargs)

    def timed_run(chunk):
        count["run"] += 1
        sizes[count["run"]] = len(chunk.items)
        mark(count["run"], "run_start")
        out = run_chunk(chunk)
        mark(count["run"], "run_end")
        return out

    inner = engine.model.model
    hooks = []
    for name in ("visual", "language_model"):
        module = getattr(inner, name)
        hooks.append(module.register_forward_pre_hook(lambda m, args, n=name: mark(count["run"], f"{n}_start")))
        hooks.append(module.register_forward_hook(lambda m, args, out, n=name: mark(count["run"], f"{n}_end")))
    # The placeholder check after the tower and the deepstack layers' sums: where the forward pass may sync.
    patched = [(owner, name, vars(owner).get(name)) for owner, name in
               ((inner, "get_placeholder_mask"), (inner.language_model, "_deepstack_process")) if hasattr(owner, name)]

    def timed_method(fn, name):
        def timed(*args, **kwargs):
            mark(count["run"], f"{name}_start")
            out = fn(*args, **kwargs)
            mark(count["run"], f"{name}_end")
            return out
        return timed

    # The cyclic garbage collector's passes: each stops every thread of the process while it runs.
    import gc

    collections_seen: list[tuple[int, int, float, float, str]] = []  # (chunk, generation, start, ms, thread)
    started: dict[int, float] = {}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[threading.get_ident()] = time.perf_counter()
        else:
            t = started.pop(threading.get_ident(), None)
            if t is not None:
                collections_seen.append((count["run"], info["generation"], t, (time.perf_counter() - t) * 1e3,
                                         threading.current_thread().name))

    calls: dict[str, dict[str, Any]] = {}
    gc.callbacks.append(on_gc)
    try:
        for _ in range(2):  # the second call pays an automatic compile when compile_after_items <= bs
            judge.batch_score(images[:a.bs])
        engine._prepare = asking
        judge.batch_score(images[:a.n])  # a ramped call's batch shapes seen, and its chunks noted
        ahead = engine._mask_ahead
        for owner, name, _ in patched:
            timed = timed_method(getattr(owner, name), name)
            setattr(owner, name, timed)
            if ahead is not None and owner is inner and name == "get_placeholder_mask":
                # mask_ahead.take recognises its own check by this attribute: without it the
                # model's check (and its host sync) would run in the timed calls.
                ahead.get_placeholder_mask = timed
        engine._prepare, engine._run_chunk = timed_prepare, timed_run
        for variant in ("beside", "prepared_first"):
            runs.new_images(judge)
            ready[:] = [prepare(*args, **kwargs) for args, kwargs in asked] if variant == "prepared_first" else []
            marks.clear()
            collections_seen.clear()
            count.update(run=-1, prep=-1)
            ref = None
            if cuda:
                torch.cuda.synchronize()
                ref = torch.cuda.Event(enable_timing=True)
                ref.record()
            t0 = time.perf_counter()
            used = ahead.used if ahead is not None else 0
            res = judge.batch_score(images[:a.n])
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            mask_checks_ahead = (ahead.used - used) if ahead is not None else None
            calls[variant] = {"scored": sum(r.score is not None for r in res), "wall_ms": round(wall * 1e3, 1),
                              "mask_checks_on_host": mask_checks_ahead,
                              **_timeline_chunks(marks, sizes, ref, t0),
                              "gc_passes": [{"chunk": k, "generation": g, "host_ms": round((t - t0) * 1e3, 2),
                                             "ms": round(ms, 2), "thread": name}
                                            for k, g, t, ms, name in collections_seen],
                              "gc_ms": round(sum(c[3] for c in collections_seen), 2)}
            ready.clear()
    finally:
        gc.callbacks.remove(on_gc)
        for h in hooks:
            h.remove()
        if engine._mask_ahead is not None:
            vars(engine._mask_ahead).pop("get_placeholder_mask", None)
        for owner, name, own in patched:
            if own is None:
                vars(owner).pop(name, None)
            else:
                setattr(owner, name, own)
        judge.close()
    return {"mode": mode, "items": a.n, **calls}


def stage_gil(model_dir: str, a, images: list, mode: str) -> dict[str, Any]:
    """Who holds the interpreter lock in calls of --n items: after the warm-up and the automatic
    compile, py-spy (`--py-spy`, its `record --gil --threads --nonblocking`) samples this process
    at `--rate` Hz over --reps calls; it records only the thread that holds the lock at each
    sample, so samples / rate is the time the lock was held. Per thread (the main thread
    launches the GPU work; `judge-prepare` prepares the next chunk; `judge-image` read images),
    the lock held in seconds and as a share of the calls' wall time, and each thread's top
    functions, innermost (self) and inclusive of the library's and transformers' frames."""
    import shutil
    import signal
    import subprocess
    import tempfile

    spy = a.py_spy or shutil.which("py-spy")
    if not spy:
        return {"skipped": "py-spy is not installed (pip install py-spy, or --py-spy PATH)"}
    cuda = a.device.startswith("cuda")
    judge = _judge(model_dir, a, mode)
    try:
        for _ in range(2):  # the second call pays an automatic compile when compile_after_items <= bs
            judge.batch_score(images[:a.bs])
        judge.batch_score(images[:a.n])  # the timed calls' batch shapes
        with tempfile.TemporaryDirectory() as d:
            raw = pathlib.Path(d) / "gil.txt"
            proc = subprocess.Popen([spy, "record", "--pid", str(os.getpid()), "--gil", "--threads", "--nonblocking",
                                     "-r", str(a.rate), "-f", "raw", "-o", str(raw)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(2.0)  # attached (the main thread sleeps: no samples)
            walls = []
            for _ in range(a.reps):
                wall, res, _ = _timed_call(judge, images[:a.n], cuda)
                walls.append(wall)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            said = proc.communicate(timeout=120)[0]
            if not raw.is_file():
                return {"error": f"py-spy wrote nothing: {said[-1500:]}"}
            text = raw.read_text()
    finally:
        judge.close()
    wall = sum(walls)
    return {"mode": mode, "items": a.n, "reps": a.reps, "rate_hz": a.rate, "scored": sum(r.score is not None for r in res),
            "call_s": [round(w, 3) for w in walls], "items_per_s": round(a.n * a.reps / wall, 3),
            **gil_holders(text, a.rate, wall)}


def gil_holders(raw: str, rate: float, wall_s: float, top: int = 25) -> dict[str, Any]:
    """py-spy's raw output (`thread (TID): NAME;frame;frame COUNT` per line, frames outermost
    first) read as time holding the interpreter lock: per thread name (numbered pool threads
    merged by their prefix), seconds and share of `wall_s`, and its `top` functions by self time
    and by inclusive time (frames of the library, transformers and torch only, each counted once
    per stack)."""
    per: dict[str, dict[str, Any]] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0].partition(":")[2].strip() or frames[0]
        thread = re.sub(r"_\d+$", "", thread)  # judge-image_0..3 -> judge-image
        t = per.setdefault(thread, {"samples": 0, "self": collections.Counter(), "inclusive": collections.Counter()})
        n = int(count)
        t["samples"] += n
        body = frames[1:]
        if body:
            t["self"][body[-1]] += n
        for f in {re.sub(r":\d+\)$", ")", f) for f in body}:  # a function once per stack, whatever its line
            if any(k in f for k in ("src/models/", "transformers/", "torch/", "PIL/", "qwen_vl_utils/")):
                t["inclusive"][f] += n
    threads = {}
    for name, t in sorted(per.items(), key=lambda kv: -kv[1]["samples"]):
        held = t["samples"] / rate
        threads[name] = {"held_s": round(held, 3), "share_of_wall": round(held / wall_s, 3) if wall_s else None,
                         "self": [{"frame": f[:160], "s": round(c / rate, 3)} for f, c in t["self"].most_common(top)],
                         "inclusive": [{"frame": f[:160], "s": round(c / rate, 3)} for f, c in t["inclusive"].most_common(top)]}
    total = sum(t["samples"] for t in per.values()) / rate
    return {"wall_s": round(wall_s, 3), "held_s": round(total, 3), "held_share": round(total / wall_s, 3) if wall_s else None,
            "threads": threads}


def _timeline_chunks(marks: list[tuple[int, str, float, Any]], sizes: dict[int, int], ref: Any, t0: float) -> dict[str, Any]:
    """stage_timeline's points per chunk (a point reached again is named _2, _3, ...), and the
    GPU's time between chunks."""
    chunks: dict[int, dict[str, Any]] = collections.defaultdict(dict)
    for k, point, t, ev in marks:
        n = 1
        while (point if n == 1 else f"{point}_{n}") in chunks[k]:
            n += 1
        at = chunks[k].setdefault(point if n == 1 else f"{point}_{n}", {"host_ms": round((t - t0) * 1e3, 2)})
        if ev is not None and ref is not None:
            at["gpu_ms"] = round(ref.elapsed_time(ev), 2)
            at["gpu_behind_ms"] = round(at["gpu_ms"] - at["host_ms"], 2)
    rows = []
    prev_end = None
    for k in sorted(chunks):
        c = chunks[k]
        row: dict[str, Any] = {"chunk": k, "items": sizes.get(k), **c}
        first = min((c[p]["gpu_ms"] for p in c if "gpu_ms" in c[p] and p != "run_start"), default=None)
        if "prep_end" in c:  # after the last chunk's end (the first chunk: after the call's start)
            since = prev_end["host_ms"] if prev_end is not None else 0.0
            row["main_waited_for_prep_ms"] = round(max(0.0, c["prep_end"]["host_ms"] - since), 2)
        if prev_end is not None and first is not None:
            row["gpu_from_last_chunk_end_ms"] = round(first - prev_end["gpu_ms"], 2)
        if "run_end" in c:
            prev_end = c["run_end"]
        rows.append(row)
    return {"first_point_gpu_ms": min((r["visual_start"]["gpu_ms"] for r in rows if "gpu_ms" in r.get("visual_start", {})),
                                      default=None),
            "gpu_between_chunks_ms": round(sum(r.get("gpu_from_last_chunk_end_ms", 0.0) for r in rows), 2),
            "chunks": rows}


def _timed_call(judge, items: list, cuda: bool) -> tuple[float, list, int]:
    """One call of `items` with the judge's store of vision features emptied first, timed to the
    GPU's end: (seconds, results, images the tower encoded)."""
    enc = runs.new_images(judge)
    wall, res = runs.timed(judge, items, cuda)
    return wall, res, runs.encoded_since(judge, enc)


def _alternate(judge, a, images: list, variants: dict[str, Any], switch, mode: str) -> dict[str, Any]:
    """Calls of --n items on one loaded judge after its automatic compile (run with --judge
    compile_after_items=BS), `switch(engine, variants[name])` before each: one untimed call of --n
    items of every variant first (a switch may make the compiled blocks recompile), then --reps
    timed calls of each, alternating. Recorded: items/s per variant, the images the tower encoded, and the
    answers' agreement with the first variant's (bf16: a kernel's rounding can flip a near-tie)."""
    cuda = a.device.startswith("cuda")
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    encoded: dict[str, list[int]] = {k: [] for k in names}
    results: dict[str, list] = {}
    try:
        for _ in range(2):  # the second call pays an automatic compile when compile_after_items <= bs
            judge.batch_score(images[:a.bs])
        compiled = len(judge.engine._compiled)
        for name in names:  # of the timed calls' size: a ramped call's batch shapes included
            switch(judge.engine, variants[name])
            judge.batch_score(images[:a.n])
        graphs = _graphs_made()
        for _ in range(a.reps):
            for name in names:
                switch(judge.engine, variants[name])
                wall, results[name], enc = _timed_call(judge, images[:a.n], cuda)
                times[name].append(wall)
                encoded[name].append(enc)
        switch(judge.engine, variants[names[0]])
        extra = {"rotary_compiled": any(type(m).__name__ == "RotaryEmbedding" for m in judge.engine._compiled),
                 "compiled_modules": compiled, "compiled_during_timing": len(judge.engine._compiled) != compiled,
                 "graphs_compiled_during_timing": _graphs_made() - graphs}
    finally:
        judge.close()
    out: dict[str, Any] = {"mode": mode, "items": a.n, "new_tokens": a.new if mode == "generate" else None,
                           "reps": a.reps, "variants": names, **extra}
    first = results[names[0]]
    for name, ts in times.items():
        res = results[name]
        diffs = [abs(r.score - f.score) for r, f in zip(res, first) if r.score is not None and f.score is not None]
        out[name] = {"items_per_s": round(a.n * len(ts) / sum(ts), 3), "items_per_s_each": [round(a.n / t, 3) for t in ts],
                     "images_encoded_each": encoded[name],
                     f"identical_to_{names[0]}": round(sum(r.raw == f.raw for r, f in zip(res, first)) / max(len(res), 1), 3),
                     "max_score_diff": round(max(diffs), 6) if diffs else None}
    return _with_medians(out)


def _graphs_made() -> int:
    """Graphs torch.compile has made in this process so far (a recompile counts one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _with_medians(st: dict[str, Any]) -> dict[str, Any]:
    """Each variant's median items/s and the first variant's speed-up over it, by means and by
    medians: the first timed call after a switch has run slow in some variants (a one-off, e.g.
    9.6 against ~16 items/s), and the median of three calls leaves it out."""
    first = st["variants"][0]
    for name in st["variants"]:
        st[name]["items_per_s_median"] = round(statistics.median(st[name]["items_per_s_each"]), 3)
    for name in st["variants"]:
        st[name][f"speedup_of_{first}"] = round(st[first]["items_per_s"] / st[name]["items_per_s"], 3)
        st[name][f"median_speedup_of_{first}"] = round(st[first]["items_per_s_median"] / st[name]["items_per_s_median"], 3)
    return st


def stage_parts(model_dir: str, a, images: list, mode: str) -> dict[str, Any]:
    """Generate mode: the decoding step's fused parts switched off in turn (_alternate): all on
    (the defaults), cuDNN's decoding attention off, the rotary embedding eager, both off."""
    if mode != "generate":
        return {"skipped": "the decoding step's parts: generate mode only"}
    saved: dict = {}
    variants = {"defaults": (True, True), "cudnn_off": (False, True), "rotary_eager": (True, False),
                "both_off": (False, False)}
    return _alternate(_judge(model_dir, a, mode), a, images, variants,
                      lambda engine, v: _switch_parts(engine, *v, saved), mode)


def _switch_experts(engine, name: str, saved: dict) -> None:
    """A mixture of experts' experts: the library's (experts.py, the combine in one Triton kernel;
    the default) or transformers' grouped_mm path, on the loaded judge."""
    engine.model.set_experts_implementation(name)


def _switch_patch_embed(engine, matmul: bool, saved: dict) -> None:
    """The vision tower's patch embedding as one matrix multiplication (the default) or as
    transformers' Conv3d (the module's class forward), on the loaded judge."""
    from src.models.reward.speed import patch_embed_as_matmul

    if matmul:
        patch_embed_as_matmul(engine.model)
    else:
        vars(engine.model.model.visual.patch_embed).pop("forward", None)


def _switch_ahead(attr: str):
    """A switch for what the engine works out on the host ahead (engine.<attr>: rope_ahead.py's
    rope positions, mask_ahead.py's image tokens; the default) against the model's own code
    (its methods unwrapped, nothing carried), on the loaded judge."""
    def switch(engine, ahead: bool, saved: dict) -> None:
        obj = saved.setdefault(attr, getattr(engine, attr))
        if ahead:
            obj.wrap()
        else:
            obj.uninstall()
        setattr(engine, attr, obj if ahead else None)
    return switch


_switch_rope = _switch_ahead("_rope_ahead")
_switch_mask = _switch_ahead("_mask_ahead")


def _switch_split(engine, here: bool, saved: dict) -> None:
    """The tower's output split per image by the sizes the store of vision features knows (the
    default) or by the model's method, which reads them back from the device (vision_reuse.py)."""
    saved.setdefault("split", engine._vision_reuse._split_here)
    engine._vision_reuse._split_here = here and saved["split"]


def _switch_gc(engine, frozen: bool, saved: dict) -> None:
    """The objects alive now moved out of the cyclic garbage collector's sight (a full collection,
    then gc.freeze()) or back in its sight (gc.unfreeze())."""
    import gc

    if frozen:
        gc.collect()
        gc.freeze()
    else:
        gc.unfreeze()


def _switch_ramp(engine, part: int, saved: dict) -> None:
    """A call's first chunk: 1/part of a chunk, then the rest (4, the default), or a whole chunk (0)."""
    engine._ramp_first_chunk = part


def _switch_interval(engine, seconds: float | None, saved: dict) -> None:
    """The interpreter's thread switch interval (sys.setswitchinterval; None: the one found, 5 ms
    by default): how long the thread launching the model's kernels can wait for the interpreter
    while the prepare thread runs Python."""
    found = saved.setdefault("interval", sys.getswitchinterval())
    sys.setswitchinterval(found if seconds is None else seconds)


def _switch_threads(engine, n: int | None, saved: dict) -> None:
    """The image threads (prepare_threads): the judge's own pool (None) or one of n threads."""
    import concurrent.futures

    pools = saved.setdefault("pools", {None: engine._image_pool})
    if n not in pools:
        pools[n] = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="judge-image")
    engine._image_pool = pools[n]


def _switch_prep(engine, on_gpu: bool, saved: dict) -> None:
    """gpu_preprocess: the prepare thread normalises and cuts the images' patches on the GPU, on its
    own stream (the default on a GPU), or on the CPU (the prepare thread makes no CUDA calls)."""
    stream = saved.setdefault("stream", engine._prep_stream)
    engine._prep_stream = stream if on_gpu else None


def _switch_counters(engine, on_device: bool, saved: dict) -> None:
    """Generate mode: the static cache's counters made on the device before each prefill
    (defaults) or left to transformers (made on the CPU, copied at each layer's first write)."""
    from src.models.reward import fast_decode

    own = saved.setdefault("counters_on", fast_decode.counters_on)
    fast_decode.counters_on = own if on_device else (lambda cache, device: None)


def _switch_gelu(engine, fused: bool, saved: dict) -> None:
    """The vision MLP's GELU inside fc1's matrix multiplication (defaults, where it applied) or in a
    kernel of its own (the class's forward)."""
    mlps = [b.mlp for b in engine.model.model.visual.blocks]
    for mlp in mlps:
        if "forward" in vars(mlp):
            saved.setdefault(id(mlp), vars(mlp)["forward"])
    for mlp in mlps:
        if id(mlp) in saved:
            if fused:
                mlp.forward = saved[id(mlp)]
            else:
                vars(mlp).pop("forward", None)


def _switch_prompt_attn(engine, library: bool, saved: dict) -> None:
    """The text model's attention over the prompts: the library's, cuDNN's kernel first (defaults,
    text_attention.py), or transformers' sdpa function (sdpa's own kernel choice). A compiled
    decoder layer reads the name: the first call after a switch compiles its graph once."""
    from src.models.reward.text_attention import NAME

    text_config = getattr(engine.model.config, "text_config", engine.model.config)
    text_config._attn_implementation_internal = NAME if library else "sdpa"


def _switch_vision_inductor(engine, options: dict, saved: dict) -> None:
    """The vision blocks compiled with inductor `options` ({}: none): each option set is its own
    graph, made on the first call after the first switch to it and taken again on later switches
    (torch.compile keys its graphs by the options)."""
    from src.models.reward.speed import compile_module

    blocks = list(engine.model.model.visual.blocks)
    if not all(b in engine._compiled for b in blocks):
        raise RuntimeError("the vision blocks are not compiled (run with --judge compile_after_items=BS)")
    for b in blocks:
        compile_module(b, options)


def stage_vision_mk(model_dir: str, a, images: list, mode: str) -> dict[str, Any]:
    """The vision blocks' reductions (their layer norms over 1,152 or 1,280 features, above
    inductor's 1,024 for a persistent reduction): as the library compiles them (defaults:
    multi_kernel for Qwen3-VL's tower, both kernels made and the faster taken when first run)
    against the other way (looped reductions only; for Qwen2.5-VL's tower, multi_kernel)."""
    import torch

    from src.models.reward.speed import MULTI_KERNEL, inductor_options

    if not a.device.startswith("cuda"):
        return {"skipped": "inductor's Triton kernels: a CUDA device only"}
    judge = _judge(model_dir, a, mode)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    saved: dict = {}
    defaults = inductor_options("visual", a.device, judge.engine.model.config.model_type)
    # a tower compiled without multi_kernel by default (Qwen2.5-VL's) against with it
    other = ("looped", {}) if defaults else ("multi_kernel", MULTI_KERNEL)
    variants = {"defaults": defaults, other[0]: other[1]}
    return _alternate(judge, a, images, variants, lambda engine, v: _switch_vision_inductor(engine, v, saved), mode)


def stage_norm_check(model_dir: str, a, images: list, mode: str) -> dict[str, Any]:
    """Float32: a vision block's residual add and layer norm (32 images of 3,072 patches, 1,152
    features, the tower's eps) compiled with the vision tower's inductor options and without,
    against eager: the largest differences (no judge is loaded)."""
    import torch
    import torch.nn.functional as F

    from src.models.reward.speed import MULTI_KERNEL

    if not a.device.startswith("cuda"):
        return {"skipped": "inductor's Triton kernels: a CUDA device only"}
    g = torch.Generator(a.device).manual_seed(0)
    x, r = (torch.randn(32 * 3072, 1152, device=a.device, generator=g) for _ in range(2))
    w = 1 + 0.1 * torch.randn(1152, device=a.device, generator=g)
    b = 0.1 * torch.randn(1152, device=a.device, generator=g)

    def add_norm(x, r):
        h = x + r
        return h, F.layer_norm(h, (1152,), w, b, 1e-6)

    want = add_norm(x, r)[1]
    out: dict[str, Any] = {"output_max_abs": float(want.abs().max())}
    for name, options in (("multi_kernel", MULTI_KERNEL), ("looped", {})):
        torch._dynamo.reset()
        fn = torch.compile(add_norm, dynamic=True, **({"options": options} if options else {}))
        for _ in range(2):
            got = fn(x, r)[1]
        out[f"{name}_max_abs_diff_vs_eager"] = float((got - want).abs().max())
    return out


def stage_gelu(model_dir: str, a, images: list, mode: str) -> dict[str, Any]:
    """The vision MLP's GELU inside fc1's matrix multiplication against in a kernel of its own: first
    one block's MLP in float32 on random inputs (the largest difference of the two forwards, and
    the outputs' scale), then calls of --n items alternating (_alternate)."""
    import torch

    judge = _judge(model_dir, a, mode)
    if not judge.engine.vision_gelu_fused:
        judge.close()
        return {"skipped": "the vision MLP's GELU is in a kernel of its own here"}
    mlp = judge.engine.model.model.visual.blocks[0].mlp
    fused = vars(mlp)["forward"]
    m32 = type(mlp)(judge.engine.model.config.vision_config).to(mlp.linear_fc1.weight.device)
    m32.load_state_dict({k: v.float() for k, v in mlp.state_dict().items()})
    x = torch.randn(4096, m32.linear_fc1.in_features, device=m32.linear_fc1.weight.device,
                    generator=torch.Generator(m32.linear_fc1.weight.device).manual_seed(0))
    with torch.no_grad():
        want = type(m32).forward(m32, x)
        got = fused.__func__(m32, x)
    check = {"float32_max_abs_diff": float((got - want).abs().max()), "float32_output_max_abs": float(want.abs().max())}
    del m32
    saved: dict = {}
    return {"float32_check": check, **_alternate(judge, a, images, {"defaults": True, "gelu_kernel": False},
                                                  lambda engine, v: _switch_gelu(engine, v, saved), mode)}


# Stages that switch one default path on a loaded judge (_alternate): the variants (defaults
# first), the switch, why a judge has nothing to switch (None: it has), and the table's title.
SWITCHED = {
    "experts": ({"defaults": EXPERTS_NAME, "transformers_grouped_mm": "grouped_mm"}, _switch_experts,
                lambda engine: None if engine.experts is not None else "not a mixture-of-experts judge",
                "The experts: the library's combine kernel (defaults) against transformers' grouped_mm path"),
    "patch": ({"defaults": True, "conv3d": False}, _switch_patch_embed, lambda engine: None,
              "The patch embedding: one matrix multiplication (defaults) against transformers' Conv3d"),
    "rope": ({"defaults": True, "model_walk": False}, _switch_rope,
             lambda engine: None if engine._rope_ahead is not None else
             "the rope positions are worked out ahead in logits mode only",
             "The rope positions: worked out on the host ahead (defaults) against the model's walk on the GPU"),
    "mask": ({"defaults": True, "model_mask": False}, _switch_mask,
             lambda engine: None if engine._mask_ahead is not None else "the image tokens are found ahead in logits mode only",
             "The image tokens: found on the host ahead (defaults) against the model's placeholder check and masks"),
    "split": ({"defaults": True, "model_split": False}, _switch_split,
              lambda engine: None if engine._vision_reuse is not None and engine._vision_reuse._split_here else
              "the tower's output is split by the model's own method here",
              "The tower's output: split by the sizes known on the host (defaults) against the model's method"),
    "gc": ({"defaults": False, "frozen": True}, _switch_gc, lambda engine: None,
           "The garbage collector: as it is (defaults) against the judge's objects frozen out of its sight"),
    "ramp": ({"defaults": 4, "whole_first_chunk": 0, "eighth_first": 8, "half_first": 2}, _switch_ramp,
             lambda engine: None if not engine._continuous else "a call of static batches only",
             "A call's first chunk: a quarter chunk first (defaults) against a whole, an eighth and a half"),
    "prep": ({"defaults": True, "cpu_preprocess": False}, _switch_prep,
             lambda engine: None if engine._prep_stream is not None else "the images are prepared on the CPU already",
             "The images' patches: cut on the GPU by the prepare thread (defaults) against on the CPU"),
    "threads": ({"defaults": None, "image_threads_8": 8}, _switch_threads, lambda engine: None,
                "The image threads: the judge's prepare_threads (defaults) against 8"),
    "counters": ({"defaults": True, "counters_on_cpu": False}, _switch_counters,
                 lambda engine: None if engine.settings.mode == "generate" else "a static cache in generate mode only",
                 "The static cache's counters: made on the device (defaults) against on the CPU"),
    "prompt_attn": ({"defaults": True, "transformers_sdpa": False}, _switch_prompt_attn,
                    lambda engine: None if engine.text_attn == _prompt_attn_name() else
                    "the text model's prompt attention is transformers' here (cuDNN first on a Hopper GPU in half precision only)",
                    "The prompts' attention: cuDNN's kernel first (defaults) against transformers' sdpa function"),
    "interval": ({"defaults": None, "interval_1ms": 0.001, "interval_0_2ms": 0.0002}, _switch_interval,
                 lambda engine: None, "The interpreter's switch interval: as found (defaults) against 1 and 0.2 ms"),
}


def _prompt_attn_name() -> str:
    from src.models.reward.text_attention import NAME

    return NAME


def stage_switched(name: str):
    """The stage function of SWITCHED[name]."""
    variants, switch, missing, _ = SWITCHED[name]

    def stage(model_dir: str, a, images: list, mode: str) -> dict[str, Any]:
        judge = _judge(model_dir, a, mode)
        why = missing(judge.engine)
        if why:
            judge.close()
            return {"skipped": why}
        saved: dict = {}
        return _alternate(judge, a, images, variants, lambda engine, v: switch(engine, v, saved), mode)

    return stage


def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = [f"# Where GPU memory and time go ({m['size']}, {m['device_name']})", "", f"`{m['command']}`", "",
             f"batch {m['bs']}, {m['n']} items of {m['width']}x{m['height']}, judge settings {m['judge']}", ""]
    for key, st in report.items():
        if key.startswith("memory_") and "alive_at_peak" in st:
            lines += [f"## Memory, {st['mode']} mode", "",
                      f"allocated after load {st['allocated_after_load_gb']} GB, after the first call "
                      f"{st['allocated_after_first_call_gb']} GB; peak {st['peak_allocated_gb']} GB", ""]
            for title, key2 in (("kept after the first call", "kept_after_first_call"), ("alive at the peak", "alive_at_peak")):
                lines += [f"| {title}, made at | GB | count | largest MB |", "|---|---|---|---|"]
                lines += [f"| `{g['where']}` | {g['gb']} | {g['count']} | {g['largest_mb']} |" for g in st[key2][:12]]
                lines.append("")
        if key.startswith("kernels_") and "by_kind_ms" in st:
            lines += [f"## GPU time, {st['mode']} mode", "",
                      f"kernels {st['gpu_kernel_ms']} ms in a call of {st['wall_s_profiled']} s (profiled), "
                      f"{st.get('images_encoded', '?')} images through the vision tower", "",
                      "| kind | ms |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in st["by_kind_ms"].items()]
            lines += ["", "| kernel | ms | count |", "|---|---|---|"]
            lines += [f"| `{k['name']}` | {k['ms']} | {k['count']} |" for k in st["top_kernels"][:15]]
            lines.append("")
        if key.startswith("gaps_") and "by_launch" in st:
            lines += [f"## Where the GPU waits on the host, {st['mode']} mode", "",
                      f"GPU span {st['span_ms']} ms of a {st['wall_s_profiled']} s profiled call; idle {st['idle_ms']} ms "
                      f"({100 * st['idle_share']:.1f}%) in {st['gaps']} stretches over 20 us, each charged to the host "
                      "op that launched the GPU work ending it", "",
                      "| launched by | at | idle ms | stretches | largest ms |", "|---|---|---|---|---|"]
            lines += [f"| `{g['op'][:80]}` | `{g['where'][:120]}` | {g['idle_ms']} | {g['gaps']} | {g['largest_ms']} |"
                      for g in st["by_launch"]]
            lines += ["", f"Outside the GPU's span (host work before its first and after its last activity): "
                          f"{st.get('outside_span_ms', '?')} ms.", ""]
            if st.get("host_waits"):
                lines += ["| runtime call that can block the host | made by | at | count | ms |", "|---|---|---|---|---|"]
                lines += [f"| `{w['call']}` | `{w['op'][:60]}` | `{w['where'][:120]}` | {w['count']} | {w['ms']} |"
                          for w in st["host_waits"]]
            lines.append("")
        if key.startswith("timeline_") and "beside" in st:
            points = ("run_start", "visual_start", "visual_end", "get_placeholder_mask_start", "get_placeholder_mask_end",
                      "language_model_start", "_deepstack_process_start", "_deepstack_process_end_3", "language_model_end",
                      "run_end")
            for variant in ("beside", "prepared_first"):
                v = st[variant]
                lines += [f"## A call's chunks, host and GPU clocks, {st['mode']} mode, {variant.replace('_', ' ')}", "",
                          f"{st['items']} items in {v['wall_ms']} ms; the GPU's first point at {v['first_point_gpu_ms']} ms; "
                          f"from each chunk's end to the next one's first point {v['gpu_between_chunks_ms']} ms in all. "
                          "Each point: the host's time, then how far behind it the GPU got there (ms from the call's "
                          "start; ~0: the GPU waited for the host). "
                          f"Garbage collector passes: {len(v.get('gc_passes', []))}, {v.get('gc_ms', 0)} ms in all"
                          + "".join(f"; generation {c['generation']} for {c['ms']} ms at {c['host_ms']} ms (chunk {c['chunk']}, "
                                    f"{c['thread']})" for c in v.get("gc_passes", []) if c["ms"] >= 1 or c["generation"] == 2)
                          + ".", "",
                          "| chunk | items | prepared (host) | main waited for it | GPU from last chunk's end | "
                          + " | ".join(points) + " |", "|---" * (5 + len(points)) + "|"]
                for r in v["chunks"]:
                    cells = [f"{r[p]['host_ms']} (+{r[p].get('gpu_behind_ms', '?')})" if p in r else "" for p in points]
                    prep = f"{r['prep_start']['host_ms']}-{r['prep_end']['host_ms']}" if "prep_end" in r else ""
                    lines.append(f"| {r['chunk']} | {r.get('items')} | {prep} | {r.get('main_waited_for_prep_ms', '')} | "
                                 f"{r.get('gpu_from_last_chunk_end_ms', '')} | " + " | ".join(cells) + " |")
                lines.append("")
        if key.startswith("norm_check_") and "output_max_abs" in st:
            lines += ["## Float32: a vision block's residual add and layer norm, compiled against eager", "",
                      f"With the vision tower's inductor options: largest difference {st['multi_kernel_max_abs_diff_vs_eager']:.2e}; "
                      f"without: {st['looped_max_abs_diff_vs_eager']:.2e} (outputs up to {st['output_max_abs']:.2f}).", ""]
        if key.startswith(("parts_", "gelu_", "vision_mk_", *(f"{k}_" for k in SWITCHED))) and "defaults" in st:
            title = {"parts": "The decoding step's fused parts",
                     "gelu": "The vision MLP's GELU: inside fc1's matrix multiplication (defaults) against a kernel of its own",
                     "vision_mk": "The vision blocks' reductions: as compiled (defaults) against with or without "
                                  "inductor's multi_kernel",
                     **{k: v[3] for k, v in SWITCHED.items()}}[key.rsplit("_", 1)[0]]
            if "float32_check" in st:
                lines += [f"Float32, one block's MLP on random inputs: largest difference {st['float32_check']['float32_max_abs_diff']:.2e} "
                          f"(outputs up to {st['float32_check']['float32_output_max_abs']:.2f}).", ""]
            lines += [f"## {title}, {st['mode']} mode"
                      f"{', generate-' + str(st['new_tokens']) if st['new_tokens'] else ''}, {st['items']} items, "
                      f"{st['reps']} calls of each", "",
                      "| variant | items/s, median (mean) | defaults' speed-up over it, medians (means) "
                      "| answers identical to the defaults' | largest score difference |", "|---|---|---|---|---|"]
            lines += [f"| {name} | {st[name]['items_per_s_median']} ({st[name]['items_per_s']}) | "
                      f"{st[name]['median_speedup_of_defaults']}x ({st[name]['speedup_of_defaults']}x) | "
                      f"{st[name]['identical_to_defaults']} | {st[name]['max_score_diff']} |" for name in st["variants"]]
            lines += ["", f"Rotary embedding compiled: {st['rotary_compiled']}; compiled modules {st['compiled_modules']}"
                          f"{'; a compile fell inside the timing' if st['compiled_during_timing'] else ''}"
                          f"; graphs compiled during the timed calls: {st.get('graphs_compiled_during_timing', '?')}.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="qwen3_vl_moe-30b-a3b-24l")
    runs.add_checkpoint_argument(ap)
    ap.add_argument("--stages", default="memory,kernels")
    ap.add_argument("--modes", default="logits,generate")
    ap.add_argument("--n", type=int, default=None, help="items per timed call (default 32; --smoke: 2)")
    ap.add_argument("--reps", type=int, default=3, help="the switching stages: timed calls of each variant")
    ap.add_argument("--bs", type=int, default=None, help="batch size (default 32; --smoke: 2)")
    ap.add_argument("--new", type=int, default=128, help="generate mode: answer tokens (forced)")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--rate", type=int, default=500, help="stage gil: py-spy's samples per second")
    ap.add_argument("--py-spy", default=None, help="stage gil: the py-spy executable (default: on PATH)")
    runs.add_judge_argument(ap, "every stage", "compile_after_items=1")
    runs.add_output_arguments(ap, "profile_gpu", "CPU, tiny model, tiny images: seconds (CI)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.size = a.size if a.size.startswith("smoke") else "smoke-qwen3_vl_moe"
        a.device, a.new, a.width, a.height = "cpu", 4, 224, 168
    stages = {"memory": stage_memory, "kernels": stage_kernels, "parts": stage_parts, "gaps": stage_gaps,
              "timeline": stage_timeline, "gil": stage_gil, "gelu": stage_gelu, "vision_mk": stage_vision_mk,
              "norm_check": stage_norm_check, **{k: stage_switched(k) for k in SWITCHED}}
    asked = runs.stage_names(ap, a.stages, stages)
    a.n = a.n or (2 if a.smoke else 32)
    a.bs = a.bs or (2 if a.smoke else 32)
    import torch

    cuda = a.device.startswith("cuda")
    report: dict[str, Any] = {"meta": runs.meta("profile_gpu.py", argv, a, judge=a.judge)}
    with runs.checkpoint(report, a, "profile-gpu-") as model_dir:
        images = make_images(None, max(a.n, a.bs), a.width, a.height)
        for stage in asked:
            fn = stages[stage]
            for mode in a.modes.split(","):
                try:
                    report[f"{stage}_{mode}"] = fn(model_dir, a, images, mode)
                except Exception as e:  # one stage's failure must not lose the others' figures
                    report[f"{stage}_{mode}"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                if cuda:
                    torch.cuda.empty_cache()
                runs.save(report, a)
                print(json.dumps({f"{stage}_{mode}": report[f"{stage}_{mode}"]})[:3000], flush=True)
    runs.save(report, a, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
