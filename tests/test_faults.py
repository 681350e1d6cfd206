"""Faults with real worker processes and the tiny model: each leaves the run complete, with every
item scored or failed with its reason, and no process behind.

One module pool (two CPU workers) carries the fault plug-in (src/testing/faults.py) for poison items
(REWARD_FAULT_SEGFAULT_ON_ID, REWARD_FAULT_HANG_ON_ID), simulated CUDA out-of-memory
(REWARD_FAULT_OOM_ABOVE) and a short delay per forward pass (REWARD_FAULT_DELAY_S), so one pool
start serves most scenarios. The interrupt and parent-death scenarios run `python main.py` in a
subprocess, slowed by REWARD_FAULT_DELAY_S so the signal lands mid-run.

Micro-batches of one item (and the OOM hook splitting larger ones down to one prompt) make every
forward pass the same computation however items are grouped, retried or resumed: that is what lets
a resumed job's results.jsonl equal an uninterrupted run's byte for byte.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, assert_no_orphans, make_image, wait_until_gone, worker_processes
from src.job.runner import run_job
from src.models.reward import ScoreItem
from src.models.reward.implementations.multi_gpu import MultiGPURewardModel

JUDGE = {"model_name": "tiny:qwen2_5_vl", "template": "quality", "batch_size": 2}
N_ITEMS = 24
CHUNK = 4
BATCH_TIMEOUT_S = 6.0
FAULT_ENV = {"REWARD_FAULT_OOM_ABOVE": "1", "REWARD_FAULT_SEGFAULT_ON_ID": "poison",
             "REWARD_FAULT_HANG_ON_ID": "sleeper", "REWARD_FAULT_DELAY_S": "0.1"}


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("fault-job")
    paths = []
    with open(d / "manifest.jsonl", "w") as fh:
        for i in range(N_ITEMS):
            p = d / f"im{i:02d}.png"
            make_image(i, 48 + 8 * (i % 4), 40 + 12 * (i % 3)).save(p)
            paths.append(str(p))
            fh.write(json.dumps({"id": f"it{i:02d}", "image": p.name, "category": "odd" if i % 2 else "even"}) + "\n")
    return {"dir": d, "manifest": d / "manifest.jsonl", "paths": paths}


def job_config(data: dict, out: Path, **model_params) -> dict:
    params = {**JUDGE, "device_ids": ["cpu", "cpu"], "micro_batch": 1, "progress": False, **model_params}
    return {"model": {"class_path": "multi_gpu", "params": params},
            "job": {"manifest": str(data["manifest"]), "output_dir": str(out), "chunk_size": CHUNK}}


_OPEN_POOLS: list[MultiGPURewardModel] = []


@pytest.fixture(scope="module")
def pool(tiny_cache):
    seen: set[int] = set()
    m = MultiGPURewardModel(device_ids=["cpu", "cpu"], micro_batch=1, batch_timeout_s=BATCH_TIMEOUT_S,
                            max_retries=1, max_restarts=3, progress=False, env=FAULT_ENV, **JUDGE)
    m.seen_pids = seen  # every worker pid the module saw, checked gone at the end
    _OPEN_POOLS.append(m)
    try:
        yield m
    finally:
        _OPEN_POOLS.remove(m)
        seen.update(p for p in m.worker_pids() if p)
        m.close()
    assert_no_orphans(sorted(seen))
    assert not worker_processes([os.getpid()])


@pytest.fixture(autouse=True)
def no_stray_workers():
    """After each test: this process's only workers are the module pool's live ones."""
    yield
    live = set()
    for m in _OPEN_POOLS:
        pids = {p for p in m.worker_pids() if p}
        m.seen_pids.update(pids)
        live |= pids
    deadline = time.monotonic() + 10
    while (stray := set(worker_processes([os.getpid()])) - live) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not stray, f"stray worker processes: {sorted(stray)}"


@pytest.fixture(scope="module")
def reference(pool, data, tmp_path_factory) -> dict:
    """An uninterrupted job: the bytes every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    summary = run_job(job_config(data, out), base=ROOT, progress=False, model=pool)
    assert summary["scored"] == N_ITEMS and summary["failed"] == 0
    text = (out / "results.jsonl").read_bytes()
    records = [json.loads(x) for x in text.decode().splitlines()]
    return {"bytes": text, "score": {r["id"]: r["score"] for r in records}, "stream": out / "results.stream.jsonl"}


def assert_batched_scores_match(results, reference) -> None:
    """Scores of items batched otherwise than the reference's (batches of 1): every item scored,
    within 1e-5 of the reference. Another batch shape may sum floats in another order, and by how
    much that moves a float32 score depends on the CPU's kernels (README, Interrupts)."""
    assert all(r.error is None for r in results), [r.error for r in results]
    assert [r.score for r in results] == pytest.approx([reference["score"][r.id] for r in results], abs=1e-5)


def items(data, ids=None) -> list[ScoreItem]:
    return [ScoreItem(images=[data["paths"][i]], id=f"it{i:02d}") for i in (ids or range(N_ITEMS))]


def final_records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def stream_lines(out: Path) -> list[str]:
    p = out / "results.stream.jsonl"
    return p.read_text().splitlines() if p.exists() else []


def wait_for_lines(out: Path, n: int, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(stream_lines(out)) < n:
        assert proc is None or proc.poll() is None, f"the job ended early with {proc.returncode}"
        assert time.monotonic() < deadline, f"no {n} results within {timeout}s"
        time.sleep(0.05)


def start_main(cfg: dict, tmp: Path, delay_s: float | None) -> tuple[subprocess.Popen, Path]:
    """`python main.py --config` in its own process group, as a terminal would run it."""
    import yaml

    cfg_path = tmp / f"job-{time.monotonic_ns()}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REWARD_FAULT_")}
    if delay_s:
        env["REWARD_FAULT_DELAY_S"] = str(delay_s)
    log = tmp / (cfg_path.stem + ".log")  # stderr: worker logs and errors; stdout: the summary
    with open(log, "w") as err, open(log.with_suffix(".out"), "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--config", str(cfg_path), "--no-progress"],
                                stdout=out, stderr=err, env=env, start_new_session=True)
    return proc, log


# -- in the pool: out of memory, segfault, hang --------------------------------------------------

def test_simulated_cuda_oom_splits_batches_and_keeps_the_scores(pool, data, reference, ledger):
    pool.micro_batch = 4  # batches of two prompts, each "runs out of memory" (REWARD_FAULT_OOM_ABOVE=1)
    try:
        results = pool.batch_score(items(data, range(8)))
    finally:
        pool.micro_batch = 1
    assert [r.error for r in results] == [None] * 8
    assert [r.score for r in results] == [reference["score"][f"it{i:02d}"] for i in range(8)]
    splits = [line for w in pool.pool.workers for line in w.lines if "out of memory on a batch of 2" in line]
    assert splits, "the workers should have split their batches"
    ledger.fault("CUDA out of memory (simulated) -> split, retry", 8, results,
                 f"{len(splits)} batches split in halves; scores equal to unsplit")


def test_segfaulting_worker_fails_only_its_poison_item(pool, data, reference, ledger):
    batch = items(data, range(6))
    batch.insert(3, ScoreItem(images=[data["paths"][6]], id="poison"))
    pool.micro_batch = 3  # the poison shares its micro-batch with good items
    before, restarts = set(pool.worker_pids()), pool.pool.total_restarts
    try:
        results = pool.batch_score(batch)
    finally:
        pool.micro_batch = 1
    poison = results[3]
    assert poison.score is None and poison.error_kind == "worker_died"
    err = poison.error
    assert err.startswith("item 'poison' (#3): tried 2 times; the last time worker cpu#")
    assert "died with signal SIGSEGV" in err and "last log lines" in err
    assert "Fatal Python error: Segmentation fault" in err, "faulthandler's stack is quoted"
    crashed_pid = int(re.search(r"\(pid (\d+)\) died with signal SIGSEGV", err).group(1))
    others = [r for r in results if r.id != "poison"]
    assert_batched_scores_match(others, reference)
    assert pool.pool.total_restarts - restarts == 2, "two workers died of the poison, both replaced"
    dead = before - set(pool.worker_pids())
    assert crashed_pid not in pool.worker_pids() and dead
    assert_no_orphans([crashed_pid, *dead])
    pool.seen_pids.update(before)
    ledger.fault("worker segfault (SIGSEGV) on a poison item", len(batch), results,
                 f"2 workers crashed and were restarted; poison: worker_died, SIGSEGV, pid {crashed_pid}")


def test_hung_worker_is_killed_restarted_and_its_items_retried_elsewhere(pool, data, reference, ledger):
    batch = items(data, range(5))
    batch.insert(1, ScoreItem(images=[data["paths"][7]], id="sleeper"))
    pool.micro_batch = 3
    before, restarts = set(pool.worker_pids()), pool.pool.total_restarts
    t0 = time.monotonic()
    try:
        results = pool.batch_score(batch)
    finally:
        pool.micro_batch = 1
    elapsed = time.monotonic() - t0
    sleeper = results[1]
    assert sleeper.score is None and sleeper.error_kind == "worker_timeout"
    assert f"gave no answer within {BATCH_TIMEOUT_S:.0f}s while scoring 1 item(s)" in sleeper.error
    assert sleeper.error.startswith("item 'sleeper' (#1): tried 2 times")
    others = [r for r in results if r.id != "sleeper"]
    assert_batched_scores_match(others, reference)  # batch-mates retried and scored
    # The first kill left work to do, so that worker was replaced at once; after the second kill
    # nothing was left, so the call returned without waiting for a model load nobody needed.
    assert pool.pool.total_restarts - restarts == 1
    hung = before - set(pool.worker_pids())
    assert hung, "the hung worker was replaced"
    assert_no_orphans(hung)
    assert elapsed < 2 * BATCH_TIMEOUT_S + 120
    killed = [w.pid for w in pool.pool.workers if not w.alive()]
    assert len(killed) == 1
    again = pool.batch_score(items(data, range(4)))  # the next call brings the killed slot back
    assert [r.score for r in again] == [reference["score"][r.id] for r in again]
    assert pool.pool.total_restarts - restarts == 2 and all(w.alive() for w in pool.pool.workers)
    assert_no_orphans(killed)
    before.update(killed)
    pool.seen_pids.update(before)
    ledger.fault("hung worker (batch_timeout_s) -> killed, restarted", len(batch), results,
                 f"killed after {BATCH_TIMEOUT_S:.0f}s twice; batch-mates scored elsewhere; sleeper: worker_timeout")


# -- in the job: a worker killed, a cut results file, a changed manifest -----------------------------

def test_worker_sigkill_mid_job_loses_nothing(pool, data, reference, tmp_path, ledger):
    out = tmp_path / "out"
    done: dict = {}

    def job():
        try:
            done["summary"] = run_job(job_config(data, out), base=ROOT, progress=False, model=pool)
        except BaseException as e:  # reported below, in the test's thread
            done["error"] = e

    restarts = pool.pool.total_restarts
    t = threading.Thread(target=job)
    t.start()
    wait_for_lines(out, CHUNK)
    victim = pool.worker_pids()[1]
    os.kill(victim, signal.SIGKILL)
    pool.seen_pids.add(victim)
    t.join(timeout=240)
    assert not t.is_alive() and "error" not in done, done.get("error")
    assert done["summary"]["failed"] == 0 and done["summary"]["scored"] == N_ITEMS
    assert pool.pool.total_restarts - restarts == 1
    assert (out / "results.jsonl").read_bytes() == reference["bytes"], "retried items score exactly the same"
    assert_no_orphans([victim])
    ledger.fault("worker SIGKILL mid-batch, in a job", N_ITEMS, final_records(out),
                 "1 restart; results.jsonl identical to an uninterrupted run's")


def test_stream_cut_mid_line_resumes_and_rescores_that_item(pool, data, reference, tmp_path, ledger):
    out = tmp_path / "out"
    out.mkdir()
    lines = reference["stream"].read_text().splitlines(keepends=True)
    kept, cut = lines[:10], lines[10]
    (out / "results.stream.jsonl").write_text("".join(kept) + cut[: len(cut) // 2])  # a crash mid-write
    cut_id = json.loads(cut)["id"]
    summary = run_job(job_config(data, out), base=ROOT, progress=False, model=pool)
    assert summary["resumed_from_disk"] == 10 and summary["failed"] == 0
    assert (out / "results.jsonl").read_bytes() == reference["bytes"]
    stream = stream_lines(out)
    assert stream[10] == cut[: len(cut) // 2], "the broken fragment stays one line of its own"
    assert [json.loads(x)["id"] for x in stream[11:]].count(cut_id) == 1, "the cut item was scored again"
    ledger.fault("results stream cut mid-line -> resume", N_ITEMS, final_records(out),
                 f"resumed 10, rescored {cut_id} and the rest; results.jsonl identical")


def test_resume_rescores_an_item_whose_manifest_row_changed(pool, data, reference, tmp_path):
    """A stored result counts only for the inputs it was scored on."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(reference["stream"], out / "results.stream.jsonl")
    rows = [json.loads(x) for x in data["manifest"].read_text().splitlines()]
    rows[5]["image"] = rows[6]["image"]  # it05 now names it06's picture
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({**r, "image": str(data["dir"] / r["image"])}) + "\n" for r in rows))
    cfg = job_config(data, out)
    cfg["job"]["manifest"] = str(manifest)
    summary = run_job(cfg, base=ROOT, progress=False, model=pool)
    assert summary["resumed_from_disk"] == N_ITEMS - 1
    got = {r["id"]: r["score"] for r in final_records(out)}
    assert got["it05"] == reference["score"]["it06"]
    assert all(got[k] == v for k, v in reference["score"].items() if k != "it05")


# -- main.py: broken environment, Ctrl-C, SIGTERM, the parent killed ---------------------------------

def test_broken_worker_environment_fails_the_start_with_its_cause(data, tmp_path, ledger):
    out = tmp_path / "out"
    # `python -S`: an interpreter that cannot see the installed packages (torch among them)
    cfg = job_config(data, out, launcher=[sys.executable, "-S"])
    t0 = time.monotonic()
    proc, log = start_main(cfg, tmp_path, None)
    rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 1, text
    # Both workers start at once and the first to fail is reported: either may be first.
    assert re.search(r"error: the judge's workers could not start: worker cpu#[01] \(pid \d+\)", text), text
    assert "ModuleNotFoundError: No module named 'torch'" in text and "Traceback" in text  # the worker's
    assert "main.py" not in text, "no traceback of main.py itself"
    assert time.monotonic() - t0 < 60
    assert not wait_until_gone([proc.pid], 10)
    assert stream_lines(out) == [], "no result is claimed"
    ledger.fault("broken worker environment at start", 0, [],
                 "job refused to start: exit 1, the worker's ImportError quoted; nothing written")


def _interrupt_mid_run(data, tmp_path, send) -> tuple[Path, int, float]:
    """Start main.py slowed down, wait for two chunks on disk, `send` a signal; returns the output
    folder, the number of results it had streamed, and seconds until the workers were all gone."""
    out = tmp_path / "out"
    proc, log = start_main(job_config(data, out), tmp_path, delay_s=0.3)
    try:
        wait_for_lines(out, 2 * CHUNK, proc)
        workers = worker_processes([proc.pid])
        assert len(workers) == 2
        t0 = time.monotonic()
        send(proc)
        rc = proc.wait(timeout=10)
        alive = wait_until_gone([proc.pid], max(0.0, 10 - (time.monotonic() - t0)))
        gone_after = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert f"interrupted: the judge stopped (its workers too, if it has any); the results so far are in {out}, and " \
           "running the same command again resumes" in text
    assert not alive and gone_after < 10, f"workers {alive} outlived the interrupt by {gone_after:.1f}s"
    assert_no_orphans(workers, timeout=1)
    assert "restarting worker" not in text, "no worker may be started after the interrupt"
    lines = stream_lines(out)
    assert 2 * CHUNK <= len(lines) < N_ITEMS and len(lines) % CHUNK == 0
    assert all(json.loads(x)["score"] is not None for x in lines), "results so far are on disk, whole"
    assert not (out / "results.jsonl").exists()
    return out, len(lines), gone_after


def test_ctrl_c_mid_run_stops_workers_and_a_rerun_resumes_identically(pool, data, reference, tmp_path, ledger,
                                                                   sigint_default):
    out, n, gone_after = _interrupt_mid_run(data, tmp_path, lambda p: os.killpg(p.pid, signal.SIGINT))
    # The same job again, on the module's workers (a fresh main.py resuming a cut stream is
    # test_cli.py's resume test; one finishing a multi_gpu job, test_newcomer.py's qwen-judge run).
    summary = run_job(job_config(data, out), base=ROOT, progress=False, model=pool)
    assert summary["resumed_from_disk"] == n and summary["failed"] == 0
    assert (out / "results.jsonl").read_bytes() == reference["bytes"]
    ledger.fault("Ctrl-C (SIGINT) to main.py mid-run, then re-run", N_ITEMS, final_records(out),
                 f"exit 130, workers gone in {gone_after:.1f}s, {n} on disk; re-run identical")


def test_sigterm_mid_run_stops_workers_and_resume_is_identical(pool, data, reference, tmp_path, ledger):
    out, n, gone_after = _interrupt_mid_run(data, tmp_path, lambda p: os.kill(p.pid, signal.SIGTERM))
    summary = run_job(job_config(data, out), base=ROOT, progress=False, model=pool)
    assert summary["resumed_from_disk"] == n and summary["failed"] == 0
    assert (out / "results.jsonl").read_bytes() == reference["bytes"]
    ledger.fault("SIGTERM to main.py mid-run, then resume", N_ITEMS, final_records(out),
                 f"exit 130, workers gone in {gone_after:.1f}s, {n} on disk; resume identical")


def test_main_killed_with_sigkill_its_workers_exit_on_their_own(pool, data, reference, tmp_path, ledger):
    out = tmp_path / "out"
    proc, _ = start_main(job_config(data, out), tmp_path, delay_s=0.3)
    try:
        wait_for_lines(out, CHUNK, proc)
        workers = worker_processes([proc.pid])
        assert len(workers) == 2
        # the killed parent cannot remove its pool folder; its workers do as they exit
        argv = open(f"/proc/{workers[0]}/cmdline", "rb").read().split(b"\0")
        sock_dir = Path(argv[argv.index(b"--connect") + 1].decode()).parent
        t0 = time.monotonic()
        proc.kill()  # no handler, no atexit, no close(): only the workers' parent watch is left
        proc.wait(timeout=10)
        alive = wait_until_gone([proc.pid], 15)
        gone_after = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their killed parent"
    assert_no_orphans(workers, timeout=1)
    assert not sock_dir.exists(), f"the killed parent's pool folder {sock_dir} was left behind"
    n = len(stream_lines(out))
    summary = run_job(job_config(data, out), base=ROOT, progress=False, model=pool)
    assert summary["failed"] == 0
    assert (out / "results.jsonl").read_bytes() == reference["bytes"]
    ledger.fault("SIGKILL to main.py: workers exit on their own", N_ITEMS, final_records(out),
                 f"workers gone {gone_after:.1f}s after; {n} lines on disk; resume identical")
