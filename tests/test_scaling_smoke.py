"""The multi-GPU scaling benchmark must not rot: run its CPU smoke mode (two CPU workers, a tiny
model) and check what it writes, its deadline skipping, and its --plan.

No timing is asserted (CI machines differ): the keys, the counts, the skips and the clean exit are.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import assert_no_orphans, worker_processes

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "scaling_gpu.py")


def _run(args: list[str], timeout: float = 240) -> tuple[int, str]:
    """Run the script; returns its pid (its workers carry it as their parent) and its stdout."""
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return proc.pid, out


def test_scaling_smoke(tmp_path):
    pid, _ = _run(["--smoke", "--out", str(tmp_path), "--name", "scal"])
    report = json.loads((tmp_path / "scal.json").read_text())
    meta = report["meta"]
    assert meta["smoke"] is True and meta["gpus"] == [] and meta["max_workers"] == 2
    assert meta["skew"]["large_items"] == 2 and meta["max_pixels"] == 4 * 224 * 168  # the large items stay large
    # k=4 asks for more workers than the two CPU slots: recorded as skipped, not silently dropped
    assert report["skipped"] == [{"mode": "logits", "workers": 4, "skipped": "needs 4 devices; 2 available"}]

    pools = {p["workers"]: p for p in report["pools"]}
    assert sorted(pools) == [1, 2]
    for k, p in pools.items():
        assert "error" not in p and "skipped" not in p
        assert p["device_ids"] == ["cpu"] * k and len(p["worker_pids"]) == k
        assert 0 < p["load_s"] <= p["time_to_first_result_s"]
        assert p["first_call"] == {**p["first_call"], "items": k, "scored": k}  # one item per worker
        assert [(r["workload"], r["schedule"]) for r in p["runs"]] == [
            ("uniform", "round_robin"), ("uniform", "dynamic"), ("skewed", "round_robin"), ("skewed", "dynamic")]
        for r in p["runs"]:
            assert r["items"] == r["scored"] == 8 and r["img_per_s"] > 0 and r["seconds"] > 0
            assert sum(r["items_per_device"].values()) == 8 and len(r["items_per_device"]) == k
            # no nvidia-smi readings on a CPU run: null with the reason, never a made-up zero
            assert r["gpu"] == {"per_gpu": None, "every_gpu_busy": None, "reason": "not a GPU run"}
        assert sum(p["runs"][2]["large_items_per_device"].values()) == 2
    assert report["gpu_sampler"]["reason"] == "not a GPU run"

    speed = {(s["workload"], s["schedule"], s["workers"]): s for s in report["speedups"]}
    assert len(speed) == 8
    for (workload, schedule, k), s in speed.items():
        assert s["baseline_schedule"] == schedule and s["speedup"] > 0
        assert abs(s["efficiency"] - s["speedup"] / k) < 1e-2
        assert ("target_speedup" in s) == (workload == "uniform")
    assert speed[("uniform", "dynamic", 1)]["speedup"] == 1.0

    assert report["workers_left"] == []
    pids = [pid for p in report["pools"] for pid in p["worker_pids"]]
    assert_no_orphans(pids)
    assert worker_processes([pid]) == []

    table = (tmp_path / "scal.md").read_text()
    assert "| logits | uniform | round_robin | 2 |" in table and "| logits | skewed | dynamic | 2 |" in table
    assert "logits, 4 workers: needs 4 devices; 2 available" in table
    assert "GPU memory and utilisation: none (not a GPU run)" in table


def test_scaling_deadline_skips_and_plan(tmp_path):
    """A deadline that has passed skips every pool and run, each recorded with its reason; --plan
    loads nothing and lists the same stages."""
    _run(["--smoke", "--workers", "1,2", "--deadline-s", "0", "--out", str(tmp_path), "--name", "late"])
    report = json.loads((tmp_path / "late.json").read_text())
    assert [p["workers"] for p in report["pools"]] == [1, 2]
    for p in report["pools"]:
        assert p["skipped"].startswith("deadline:") and "load_s" not in p
        assert len(p["runs"]) == 4 and all(r["skipped"] == "deadline: pool not started" for r in p["runs"])
    assert report["speedups"] == [] and report["workers_left"] == []
    table = (tmp_path / "late.md").read_text()
    assert "logits, 2 workers: deadline:" in table

    plan_out = tmp_path / "plan"
    plan = _run(["--plan", "--gpus", "8", "--deadline-s", "530", "--k1-schedules", "round_robin",
                 "--out", str(plan_out)], timeout=60)[1]
    assert "plan for 8 GPU(s)" in plan and "logits pool of 8 worker(s) started" in plan
    assert "generate pool of 1 worker(s) started" in plan and "logits uniform dynamic" in plan
    assert "estimated total:" in plan
    assert not plan_out.exists()  # a plan measures and writes nothing


def test_gpu_sampler_reads_every_gpu(tmp_path, monkeypatch):
    """The sampler's thread, parsing and per-GPU summary, against an nvidia-smi stand-in (this
    machine has none) that answers the sampler's query the way the real one does: GPU 0 busy,
    GPU 1 busy but with utilisation the driver cannot read ("[N/A]"), GPU 2 idle."""
    from benchmarks.bench_gpu import GpuMemorySampler, GpuSampler

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0, 20480, 97\\n1, 30720, [N/A]\\n2, 3, 0\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with GpuSampler(True, every_s=0.02) as sampler:
        t0 = time.perf_counter()
        while len({s[0] for s in sampler.samples}) < 3 and time.perf_counter() - t0 < 10:
            time.sleep(0.02)
        t1 = time.perf_counter()
    assert sampler.enabled and sampler.reason is None
    w = sampler.window(t0, t1, [0], busy_pct=50)
    (g0,) = w["per_gpu"]
    assert g0["peak_mem_gb"] == 20.0 and g0["util_mean_pct"] == 97.0 and g0["util_min_pct"] == 97
    assert w["every_gpu_busy"] is True and "other_gpus_busy" not in w
    w = sampler.window(t0, t1, [0, 2], busy_pct=50)
    assert w["every_gpu_busy"] is False and w["per_gpu"][1]["util_mean_pct"] == 0.0
    w = sampler.window(t0, t1, [1], busy_pct=50)  # no number is not a zero
    assert w["per_gpu"][0]["util_mean_pct"] is None and w["every_gpu_busy"] is None and "reason" in w
    assert sampler.window(t1 + 10, t1 + 20, [0], 50)["per_gpu"][0]["samples"] == 0
    with GpuMemorySampler(True, index=1, every_s=0.02) as mem:  # bench_gpu.py's one-GPU view
        while not mem.samples:
            time.sleep(0.02)
    assert mem.peak_gb == 30.0

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    off = GpuSampler(True)
    assert not off.enabled and off.reason == "nvidia-smi not found"
    assert off.window(0, 1, [0], 50) == {"per_gpu": None, "every_gpu_busy": None, "reason": "nvidia-smi not found"}
