"""Ctrl-C and SIGTERM at any moment of a `multi_gpu` job: `main.py` exits promptly, says so, and
leaves no worker behind.

Each trial starts `python main.py --config` (two CPU workers, the tiny model, enough items to be
mid-run) in its own process group, as a terminal runs it, waits a random moment (seeded) of one
phase, and signals the group as Ctrl-C does:

  start-up  up to 0.4 s after the launch: Python starting, imports, the config, workers spawning
  loading   up to 1.5 s after the first worker process appeared: workers importing and loading
  scoring   up to 1 s after the first results reached the stream (some trials press Ctrl-C twice)

A phase names where the delay starts, not where the signal must land: on a fast or a slow machine
a delay may run into the next phase, and every moment is a valid one. What must hold whatever the
moment: the job exits within 10 s of the signal with 130 and says it was interrupted (or it had
already finished, complete, or Python itself was still starting and died of the SIGINT before
main.py ran); no worker process of it is left; results on disk are whole lines.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, assert_no_orphans, make_image, wait_until_gone, worker_processes
from src.models.reward import ScoreItem
from src.models.reward.scheduler import Scheduler

N_ITEMS = 400
EXIT_WITHIN_S = 10.0
MAIN_RAN = r'main\.py", line \d+, in (main|cmd_\w+)$|/src/'  # a traceback frame of main() or the library


@pytest.fixture(scope="module")
def job_files(tmp_path_factory, tiny_cache) -> dict:
    from src.models.tiny import resolve_model_name

    d = tmp_path_factory.mktemp("interrupts")
    model = resolve_model_name("tiny:qwen2_5_vl", cache_dir=tiny_cache)  # built once, before any trial
    images = []
    for i in range(4):
        images.append(d / f"im{i}.png")
        make_image(i, 48, 40).save(images[-1])
    with open(d / "manifest.jsonl", "w") as fh:
        for i in range(N_ITEMS):
            fh.write(json.dumps({"id": f"it{i:03d}", "image": str(images[i % 4])}) + "\n")
    return {"dir": d, "manifest": d / "manifest.jsonl", "model": model}


def _config(job_files: dict, out: Path) -> Path:
    # Calls of 4 items (chunk_size) over two workers, one item per request: each call ends with
    # one worker waiting for the other's last item, the moment a Ctrl-C once hung the job.
    cfg = {"model": {"class_path": "multi_gpu",
                     "params": {"model_name": job_files["model"], "template": "quality", "batch_size": 2,
                                "device_ids": ["cpu", "cpu"], "micro_batch": 1, "progress": False}},
           "job": {"manifest": str(job_files["manifest"]), "output_dir": str(out), "chunk_size": 4}}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stream(out: Path) -> list[str]:
    p = out / "results.stream.jsonl"
    return p.read_text().splitlines() if p.exists() else []


def _exit_code(proc: subprocess.Popen) -> int | None:
    """The job's exit status, or None when it has not exited within EXIT_WITHIN_S."""
    try:
        return proc.wait(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        return None


def _trial(job_files: dict, name: str, phase: str, delay_s: float, signals: list[tuple[int, float]]) -> dict:
    """One run of main.py, interrupted as described; returns what was observed."""
    out = job_files["dir"] / name
    cfg = _config(job_files, out)
    err_path = out.with_suffix(".err")
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--config", str(cfg), "--no-progress"],
                                cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    seen: set[int] = set()

    def wait_for(cond, what: str) -> None:
        deadline = time.monotonic() + 180
        while not cond():
            seen.update(worker_processes([proc.pid]))
            assert proc.poll() is None, f"{name}: the job ended ({proc.returncode}) before {what}: " \
                                        f"{err_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"{name}: no {what} within 180 s"
            time.sleep(0.1)

    try:
        if phase == "loading":
            wait_for(lambda: worker_processes([proc.pid]), "a worker process")
        elif phase == "scoring":
            wait_for(lambda: _stream(out), "a result")
        time.sleep(delay_s)
        seen.update(worker_processes([proc.pid]))
        t0 = time.monotonic()
        for sig, after in signals:
            time.sleep(after)
            try:
                os.killpg(proc.pid, sig)  # the terminal's Ctrl-C goes to the foreground group
            except ProcessLookupError:
                pass
        rc = _exit_code(proc)
        exit_s = time.monotonic() - t0
        lost_before_main = None
        err = err_path.read_text()
        if rc is None and phase == "start-up" and not re.search(MAIN_RAN, err, re.M) and "interrupted" not in err:
            # CPython itself can lose a SIGINT that lands while the interpreter starts, before
            # main.py's first statement: the KeyboardInterrupt is raised in importlib's lock
            # cleanup, where it can only be printed ("Exception ignored in ... _get_module_lock";
            # reproduced about once in 200 launches signalled in their first 60 ms). From
            # main.py's first statement on, src/interrupts.py keeps such a Ctrl-C (tested below).
            # Seen from here, a loss before main.py and one after it look alike (nothing of
            # main.py printed), so a start-up trial whose first Ctrl-C did nothing gets a second,
            # as the user would press, and must then stop as any other.
            lost_before_main = err[-1000:]
            os.killpg(proc.pid, signal.SIGINT)
            t0 = time.monotonic()
            rc = _exit_code(proc)
            exit_s = time.monotonic() - t0
        # Found by their parent's pid in their environment, so a worker re-parented after the job
        # exited is found too, and a pid reused by another process is not.
        deadline = time.monotonic() + 2  # exited just now: let the kernel finish reaping
        while (left := worker_processes([proc.pid])) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in worker_processes([proc.pid]):  # never leave one behind for the rest of the suite
            os.kill(p, signal.SIGKILL)
    return {"name": name, "phase": phase, "rc": rc, "exit_s": exit_s, "workers_seen": len(seen),
            "lost_before_main": lost_before_main,
            "left": left, "stderr": err_path.read_text(),
            "stream": _stream(out), "final": (out / "results.jsonl").exists(), "signals": signals}


def _check(t: dict) -> None:
    name, rc, text = t["name"], t["rc"], t["stderr"]
    own_lines = [line for line in text.splitlines() if not line.startswith("[cpu#")]  # not workers' logs
    assert rc is not None, \
        f"{name} ({t['phase']}): still running {EXIT_WITHIN_S:.0f} s after the signal:\n{text[-3000:]}"
    assert t["exit_s"] < EXIT_WITHIN_S
    assert not t["left"], f"{name}: worker processes {t['left']} outlived the job:\n{text[-3000:]}"
    for line in t["stream"]:  # the results so far are whole
        assert json.loads(line)["score"] is not None, (name, line)
    if len(t["stream"]) == N_ITEMS:  # it had scored everything before the signal took effect
        assert rc in (0, 130, -signal.SIGINT, -signal.SIGTERM), (name, text[-3000:])
    elif rc == -signal.SIGINT and len(t["signals"]) > 1:
        # A second Ctrl-C that lands after the workers were stopped (as main.py is about to print
        # its message) ends Python at once, which is what it is for; the checks above still hold.
        pass
    elif t["lost_before_main"] is not None:
        # The first SIGINT was lost inside CPython's start-up (see _trial); the second stopped it.
        assert rc == 130 and any(line.startswith("interrupted") for line in own_lines), (name, text[-3000:])
        assert not t["final"]
    elif rc != 130 and t["phase"] == "start-up" and not re.search(MAIN_RAN, text, re.M):
        # Python itself, or main.py's first imports, were still starting (`Fatal Python error:
        # init_import_site`, or a KeyboardInterrupt before main() could catch it): no worker
        # yet, nothing written.
        assert rc != 0 and t["workers_seen"] == 0 and not t["stream"], (name, text[-3000:])
    else:
        assert rc == 130, f"{name}: exit {rc}:\n{text[-3000:]}"
        assert any(line.startswith("interrupted") for line in own_lines), (name, text[-3000:])
        assert not any(line.startswith("Traceback") for line in own_lines), (name, text[-3000:])
        assert not t["final"]


def test_interrupts_at_random_moments_always_exit_promptly_and_leave_no_worker(job_files, sigint_default):
    rng = random.Random(20261129)
    plan = []
    for k in range(12):  # four of each phase, half of the scoring ones with a second Ctrl-C
        phase = ("start-up", "loading", "scoring")[k % 3]
        delay = rng.uniform(0, {"start-up": 0.4, "loading": 1.5, "scoring": 1.0}[phase])
        signals = [(signal.SIGINT, 0.0)]
        if phase == "scoring" and k % 2:  # the user presses Ctrl-C again while workers stop
            signals.append((signal.SIGINT, rng.uniform(0, 0.3)))
        plan.append((f"t{k:02d}", phase, delay, signals))
    plan.append(("sigterm", "loading", rng.uniform(0, 1.5), [(signal.SIGTERM, 0.0)]))
    # Two at a time: each trial has its own output folder, its own workers (told apart by their
    # parent's pid) and its own pool folder.
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        trials = list(ex.map(lambda p: _trial(job_files, *p), plan))
    for t in trials:
        print(f"{t['name']} {t['phase']:<8} rc={t['rc']} exit {t['exit_s']:.1f}s workers_seen={t['workers_seen']} "
              f"{'first SIGINT lost before main.py ran, ' if t['lost_before_main'] is not None else ''}"
              f"stream={len(t['stream'])} signals={[s for s, _ in t['signals']]}")
    for t in trials:
        _check(t)
    sigterm = trials[-1]
    assert sigterm["rc"] == 130 or len(sigterm["stream"]) == N_ITEMS, sigterm["stderr"][-3000:]


# -- a Ctrl-C that Python loses: it lands in a weakref callback while main.py starts -------------

# Put on the job's PYTHONPATH by the test only: when main.py (or what it imports) begins to import
# LOSE_CTRL_C_AT, a real SIGINT arrives while a weakref callback runs, as it does when Ctrl-C lands
# in the callback with which importlib drops a module's lock at the end of every import. Python
# can only print such a KeyboardInterrupt ("Exception ignored in ...") and goes on; the job once
# ran to its end this way. The variable is taken out of the environment, so workers are untouched.
LOSE_CTRL_C = """
import os, signal, sys, weakref

_at = os.environ.pop("LOSE_CTRL_C_AT", None)


class _LoseCtrlC:
    def find_spec(self, name, path=None, target=None):
        global _at
        if name == _at:
            _at = None

            class Lock:
                pass

            def cb(ref):
                try:
                    signal.raise_signal(signal.SIGINT)
                except KeyboardInterrupt:
                    print(f"ctrl-c in a weakref callback while importing {name}", file=sys.stderr, flush=True)
                    raise

            lock = Lock()
            ref = weakref.ref(lock, cb)
            del lock
        return None


if _at:
    sys.meta_path.insert(0, _LoseCtrlC())
"""


@pytest.mark.parametrize("module", ["src.cli",  # main.py's own import
                                    "src.job.runner",  # the run command's
                                    "concurrent.futures.thread"])  # as the pool is built, just before its workers start
def test_a_ctrl_c_python_could_not_raise_still_stops_the_job(job_files, sigint_default, tmp_path, module):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(LOSE_CTRL_C)
    out = tmp_path / "out"
    cfg = _config(job_files, out)
    env = {**os.environ, "PYTHONPATH": str(site), "LOSE_CTRL_C_AT": module}
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--config", str(cfg), "--no-progress"],
                            cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        left = wait_until_gone([proc.pid], timeout=5)
        for p in left:
            os.kill(p, signal.SIGKILL)
    own_lines = [line for line in err.splitlines() if not line.startswith("[cpu#")]
    assert f"ctrl-c in a weakref callback while importing {module}" in own_lines, err[-3000:]
    assert proc.returncode == 130, f"exit {proc.returncode}:\n{err[-3000:]}"
    assert any(line.startswith("interrupted") for line in own_lines), err[-3000:]
    assert not any(line.startswith(("Traceback", "Exception ignored")) for line in own_lines), err[-3000:]
    if module == "concurrent.futures.thread":  # the workers had started: they were stopped, not never born
        assert sum("model loaded" in line for line in err.splitlines()) == 2, err[-3000:]
    assert not left, f"worker processes {left} outlived the job"
    assert not _stream(out) and not (out / "results.jsonl").exists()


# -- the exact moment that hung: one worker waits for the other's last item ---------------------

def test_ctrl_c_while_a_worker_waits_for_another_ends_every_thread(job_files, sigint_default):
    """Worker 0 has finished its share and waits in take() for worker 1, which is stuck on its
    item, when Ctrl-C reaches the caller; close() must then end every worker thread of the pool
    (the interpreter joins them at exit), and every worker process."""
    import threading

    from src.models.reward import ScoreItem
    from src.models.reward.implementations.multi_gpu import MultiGPURewardModel

    image = str(job_files["dir"] / "im0.png")
    items = [ScoreItem(images=[image], id="quick"), ScoreItem(images=[image], id="stuck")]
    model = MultiGPURewardModel(device_ids=["cpu", "cpu"], model_name=job_files["model"], template="quality",
                                micro_batch=1, progress=False, env={"REWARD_FAULT_HANG_ON_ID": "stuck"})
    pids = model.worker_pids()
    try:
        # Ctrl-C comes with the store of worker 0's result, so worker 0 is about to wait.
        pressed = []

        def ctrl_c(n: int) -> None:
            if not pressed:  # a real SIGINT: it wakes the main thread's wait, as Ctrl-C does
                pressed.append(n)
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

        with pytest.raises(KeyboardInterrupt):
            model.pool.run(items, micro_batch=1, on_done=ctrl_c)
        assert any(t.name.startswith("reward-worker") for t in threading.enumerate())
    finally:
        model.close()
    deadline = time.monotonic() + EXIT_WITHIN_S
    while (left := [t.name for t in threading.enumerate() if t.name.startswith("reward-worker")]) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"threads {left} would keep the interpreter from exiting"
    assert_no_orphans(pids)


# -- the scheduler's own rule: a worker thread never waits forever --------------------------------

def _dispatch(n_items: int, closing=lambda: False) -> Scheduler:
    items = [ScoreItem(images=["x.png"]) for _ in range(n_items)]
    return Scheduler(items, n_workers=2, micro_batch=1, schedule="round_robin", closing=closing)


def test_take_returns_when_the_call_is_aborted_the_pool_closes_or_no_other_thread_is_left():
    d = _dispatch(2)
    assert d.take(0, wait=True) == [0]
    d.abort()
    assert d.take(0, wait=True) is None and d.take(1, wait=True) is None

    closing = []
    d = _dispatch(2, closing=lambda: bool(closing))
    assert d.take(0, wait=True) == [0]
    closing.append(True)  # the pool closed without reaching this call (no abort)
    assert d.take(0, wait=True) is None

    d = _dispatch(2)
    assert d.take(0, wait=True) == [0] and d.take(1, wait=True) == [1]
    d.driver_done()  # worker 1's thread left holding item 1 (the pool was closing)
    t0 = time.monotonic()
    assert d.take(0, wait=True) is None, "nothing can come back: no other thread is left"
    assert time.monotonic() - t0 < 0.1


def test_a_ctrl_c_python_can_only_report_as_unraisable_is_raised_at_the_next_safe_point():
    # A KeyboardInterrupt raised in a __del__ (as in importlib's module-lock cleanup) cannot
    # propagate; with keep_lost_ctrl_c() it is kept and raised again by raise_lost_ctrl_c(), once.
    # Another unraisable exception is still reported as Python reports it.
    script = (
        "import sys\n"
        "from src.interrupts import keep_lost_ctrl_c, raise_lost_ctrl_c\n"
        "keep_lost_ctrl_c(); keep_lost_ctrl_c()\n"
        "class Lost:\n"
        "    def __init__(self, exc): self.exc = exc\n"
        "    def __del__(self): raise self.exc\n"
        "Lost(ValueError('reported'))\n"
        "raise_lost_ctrl_c()\n"
        "print('nothing lost yet', flush=True)\n"
        "Lost(KeyboardInterrupt('pressed'))\n"
        "print('carried on', flush=True)\n"
        "try:\n"
        "    raise_lost_ctrl_c()\n"
        "except KeyboardInterrupt as e:\n"
        "    print('raised', e.args, flush=True)\n"
        "raise_lost_ctrl_c()\n"
        "print('once', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["nothing lost yet", "carried on", "raised ('pressed',)", "once"]
    assert "ValueError: reported" in proc.stderr and "KeyboardInterrupt" not in proc.stderr
