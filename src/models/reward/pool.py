"""A pool of persistent judge workers, one process per device, each in its own environment.

Data flow of one `WorkerPool.run(items)` call:

    caller --items--> Scheduler (scheduler.py): micro-batches, round-robin per worker or one
                          |         shared queue; retries, "no worker left", input order
                          |            ^ results / failures / deaths, by index
                          v            |
    ThreadPoolExecutor: one thread per worker, looping take -> send -> wait -> report
                          |  Score(batch)            ^ Scored / BatchFailed
                          v                          |
    WorkerHandle  ==== framed, authenticated Unix socket (messages.py) ====  worker process
                                                                             (standalone/reward_worker.py,
                                                                              launched by python, a venv,
                                                                              `conda run`, or any prefix)

Actors:
- WorkerHandle: one worker process: launch, two-phase start (connect, then Ready after the model
  loads), request/reply, death detection during a call (channel EOF or process exit, waited on
  together in `_await`), log pump (`[GPU k]` lines), stop (Shutdown, bounded wait, SIGTERM,
  SIGKILL to its process group).
- wait_ready_all: the start of several workers at once; the first failure raises, whatever its slot.
- Scheduler (scheduler.py, shared with the Ray host): the work of one call under one lock.
- WorkerPool: starts all workers at once, runs calls, restarts dead workers (bounded), closes; its
  watcher thread notices a worker that dies between calls (health()); it records how each worker
  loaded the weights, and warns where they differ (quantization_record()).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
import socket
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge, wait
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from . import messages as msg
from .errors import JudgeConfigError, JudgeStartError, JudgeUnavailable
from .image_memo import convert_once
from .quantization import across_workers
from .scheduler import Restarts, Scheduler, stderr_log, unsendable, wire_item
from .types import ScoreItem, ScoreResult, describe_image, item_name, load_pil

WORKER_SCRIPT = Path(__file__).resolve().parents[3] / "standalone" / "reward_worker.py"
_LOG_LINES_KEPT = 40


class WorkerStartError(JudgeStartError):
    """A worker could not start: the message names the device, the PID, the cause and the fix."""

    who = "the judge's workers"


class WorkerDied(JudgeUnavailable):
    pass


class WorkerTimeout(JudgeUnavailable):
    pass


# -- launchers ----------------------------------------------------------------------------

def launch_command(launcher: Any) -> list[str]:
    """The command that starts a Python interpreter for a worker.

    None / "python"              this interpreter (sys.executable)
    "/path/to/venv/bin/python"   that interpreter
    "conda:ENV" / {"conda": ENV} conda run --no-capture-output -n ENV python
    {"python": PATH}             that interpreter
    {"prefix": [...], ...}       the prefix, then the interpreter chosen by the other keys
    ["cmd", ...]                 that command as given (it must end in a Python interpreter)
    """
    if launcher is None or launcher == "python":
        return [sys.executable]
    if isinstance(launcher, (list, tuple)):
        if not launcher:
            raise JudgeConfigError("launcher: an empty command list")
        return [str(x) for x in launcher]
    if isinstance(launcher, str):
        if launcher.startswith("conda:"):
            return launch_command({"conda": launcher[len("conda:"):]})
        return [launcher]
    if isinstance(launcher, dict):
        known = {"python", "conda", "prefix"}
        unknown = set(launcher) - known
        if unknown:
            raise JudgeConfigError(f"launcher: unknown key(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
        if "conda" in launcher and "python" in launcher:
            raise JudgeConfigError("launcher: give 'conda' or 'python', not both")
        prefix = [str(x) for x in launcher.get("prefix") or []]
        if "conda" in launcher:
            conda = os.environ.get("CONDA_EXE") or shutil.which("conda") or "conda"
            base = [conda, "run", "--no-capture-output", "-n", str(launcher["conda"]), "python"]
        else:
            base = [str(launcher.get("python") or sys.executable)]
        return prefix + base
    raise JudgeConfigError("launcher: expected null, a python path, 'conda:ENV', a mapping or a list, got "
                           f"{launcher!r}")


@dataclass(frozen=True)
class WorkerSpec:
    slot: int              # position in the pool
    device: str            # as the worker sees it
    device_label: str      # as the user knows it
    env: dict[str, str]    # extra environment (CUDA_VISIBLE_DEVICES pinning, thread counts)
    num_threads: int | None = None
    devices: tuple[str, ...] = ()  # a group of GPUs, as the worker sees them; empty: `device` alone


# -- one worker -----------------------------------------------------------------------------

class WorkerHandle:
    """One worker process and its channel."""

    def __init__(self, spec: WorkerSpec, command: list[str], settings: dict[str, Any], sock_dir: Path,
                 log: Callable[[str], None]):
        self.spec = spec
        self.command = command
        self.settings = settings
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.pid: int | None = None          # the Python worker's own pid (from Ready)
        self.load_time_s: float | None = None
        self.fingerprint: str | None = None
        self.quantization: str | None = None  # how the worker's judge loaded its weights (from Ready)
        self.lines: collections.deque[str] = collections.deque(maxlen=_LOG_LINES_KEPT)
        self._authkey = secrets.token_bytes(32)
        self._address = str(sock_dir / f"w{spec.slot}-{secrets.token_hex(4)}.sock")
        self._server: socket.socket | None = None  # the listening socket the worker connects to
        self._death: int | None = None  # a pidfd of the process: readable once it has exited
        self._fd_lock = threading.Lock()
        self._pump: threading.Thread | None = None
        self._spawner: threading.Thread | None = None
        self.ready = False  # the model is loaded: the worker reads Shutdown now, not after a load
        self.busy = False  # a batch is in flight: the worker reads Shutdown only after it
        self.stopping = False  # the pool is ending it: its exit is not a death to report
        self.exit_seen = False  # the pool's watcher has seen it exit

    @property
    def label(self) -> str:
        return self.spec.device_label

    def describe(self) -> str:
        return f"worker {self.label} (pid {self.pid or (self.proc.pid if self.proc else '?')})"

    def launch(self) -> None:
        """Phase one: spawn the process; it connects back and loads the model in the background."""
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self._address)
        self._server.listen(1)
        env = dict(os.environ)
        env.update(self.spec.env)
        env[msg.AUTHKEY_ENV] = self._authkey.hex()
        env[msg.PARENT_PID_ENV] = str(os.getpid())
        env["PYTHONUNBUFFERED"] = "1"
        cmd = self.command + [str(WORKER_SCRIPT), "--connect", self._address]
        failed: list[Exception] = []

        # Spawned from a helper thread: Ctrl-C raises in the main thread only, so it cannot land
        # between the fork and `self.proc` being set, which would leave a worker nobody stops.
        # stop() waits for this thread.
        def spawn() -> None:
            try:
                self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            except Exception as e:  # OSError mostly (no such launcher); raised in the caller below
                failed.append(e)
                return
            self._pump = threading.Thread(target=self._pump_logs, name=f"log-{self.label}", daemon=True)
            self._pump.start()

        self._spawner = threading.Thread(target=spawn, name=f"spawn-{self.label}", daemon=True)
        self._spawner.start()
        self._spawner.join()
        if self.proc is not None:
            self._death = _pidfd(self.proc.pid)
        if failed:
            raise WorkerStartError(f"worker {self.label}: cannot run {cmd[0]!r}: {failed[0]}. "
                                   "Check the launcher setting (python path, conda env name).") from None

    def _pump_logs(self) -> None:
        assert self.proc and self.proc.stdout
        prefix = f"[GPU {self.label[5:]}]" if self.label.startswith("cuda:") else f"[{self.label}]"  # [GPU 2+3]
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append(line)
            self.log(f"{prefix} {line}")

    def wait_ready(self, timeout: float) -> None:
        """Phase two: accept the connection, send Init, wait for Ready (model loaded)."""
        wait_ready_all([self], timeout)

    def _connect(self) -> None:
        """The worker is connecting (the listening socket is readable): accept, authenticate as
        multiprocessing's Listener does, send Init."""
        assert self._server
        sock, _ = self._server.accept()
        conn = Connection(sock.detach())
        try:
            deliver_challenge(conn, self._authkey)
            answer_challenge(conn, self._authkey)
        except Exception as e:  # EOFError, OSError, multiprocessing.AuthenticationError
            conn.close()
            raise WorkerStartError(f"{self.describe()}: the channel failed while connecting: {e}") from None
        self.conn = conn
        self.conn.send(msg.Init(self.settings, self.spec.device, self.spec.device_label, self.spec.num_threads,
                                list(self.spec.devices) or None))

    def _started(self, reply: Any) -> None:
        """The worker's answer to Init."""
        if isinstance(reply, msg.StartFailed):
            self.pid = reply.pid
            raise WorkerStartError(f"{self.describe()} failed to start: {reply.error}\n"
                                   f"--- worker traceback ---\n{reply.traceback.rstrip()}")
        if not isinstance(reply, msg.Ready):
            raise WorkerStartError(f"{self.describe()}: expected Ready, got {type(reply).__name__}")
        self.pid, self.load_time_s, self.fingerprint = reply.pid, reply.load_time_s, reply.fingerprint
        self.quantization = getattr(reply, "quantization", None)
        self.ready = True

    def exited(self) -> bool:
        """The process has exited (checked without waiting)."""
        return self.proc is not None and self.proc.poll() is not None

    def dup_death_fd(self) -> int | None:
        """A copy of the process's pidfd for another thread to wait on (it closes it), or None."""
        with self._fd_lock:
            return os.dup(self._death) if self._death is not None else None

    def _raise_start_death(self, when: str) -> None:
        assert self.proc
        try:
            self.proc.wait(timeout=5)  # it has exited (its pidfd said so): reap it for its exit code
        except subprocess.TimeoutExpired:
            pass
        self._drain()
        raise WorkerStartError(f"{self.describe()} exited with {_exit_text(self.proc.returncode)} {when}. "
                               f"{self._tail()}Check that the launcher's environment has torch, transformers, "
                               "qwen-vl-utils and pillow (setup_env.sh builds one).")

    def _drain(self) -> None:
        if self._pump is not None:
            self._pump.join(timeout=2.0)

    def _tail(self, n: int = 15) -> str:
        lines = list(self.lines)[-n:]
        return ("last log lines:\n  " + "\n  ".join(lines) + "\n") if lines else "it printed nothing. "

    def _await(self, timeout: float | None, doing: str) -> Any:
        """Wait for the next message, blocking on the channel and the process's exit together.
        A death met during a call (channel EOF or process exit) and the timeout raise here; the
        pool's watcher notices a death between calls."""
        assert self.proc and self.conn
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WorkerTimeout(f"{self.describe()} gave no answer within {timeout:.0f}s while {doing}")
            ready = wait(self._wait_objects(), timeout=_wait_timeout(left, self._death))
            if self.conn in ready or (ready and self.conn.poll()):  # a last message before the exit comes first
                try:
                    return self.conn.recv()
                except (EOFError, OSError, ConnectionError):
                    self._died(doing)
            elif ready or self.exited():
                self._died(doing)

    def _wait_objects(self) -> list[Any]:
        objs: list[Any] = [self.conn if self.conn is not None else self._server]
        if self._death is not None:
            objs.append(self._death)
        return objs

    def _died(self, doing: str) -> None:
        assert self.proc
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # channel closed but the launcher lingers: end it
            self.kill()
        self._drain()
        raise WorkerDied(f"{self.describe()} died with {_exit_text(self.proc.returncode)} while {doing}; "
                         + self._tail().rstrip())

    def request(self, batch_id: int, items: list[dict[str, Any]], timeout: float | None,
                indices: list[int] | None = None) -> list[dict[str, Any]]:
        assert self.conn
        self.busy = True
        try:
            try:
                self.conn.send(msg.Score(batch_id, items, indices=indices))
            except (OSError, ValueError) as e:
                self._died(f"sending a batch ({e})")
            reply = self._await(timeout, f"scoring {len(items)} item(s)")
        finally:
            self.busy = False
        if isinstance(reply, msg.BatchFailed):
            raise RuntimeError(f"{self.describe()} failed a batch: {reply.error}\n--- worker traceback ---\n{reply.traceback}")
        if not isinstance(reply, msg.Scored) or reply.batch_id != batch_id:
            raise WorkerDied(f"{self.describe()} sent an unexpected message {type(reply).__name__}")
        return reply.results

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """Shutdown message, bounded wait, then SIGTERM and SIGKILL to the process group."""
        self.stopping = True
        if self._spawner is not None:
            _join_spawner(self._spawner)  # an interrupted launch() still sets `proc`
        if self.proc is None:
            self._close_channel()
            return
        if self.proc.poll() is None and self.conn is not None:
            try:
                self.conn.send(msg.Shutdown())
            except (OSError, ValueError):
                pass
            # A worker in the middle of a batch (the call was interrupted) or of loading its model
            # (the start was) would read Shutdown only when that ends, which may be minutes on a
            # GPU: terminate it now.
            try:
                self.proc.wait(timeout=grace if self.ready and not self.busy else 0)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        self._close_channel()

    def kill(self) -> None:
        self.stopping = True
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)  # also reaps grandchildren left by a launcher
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def _signal(self, sig: int) -> None:
        assert self.proc
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _close_channel(self) -> None:
        for obj in (self.conn, self._server):
            try:
                if obj is not None:
                    obj.close()
            except OSError:
                pass
        self.conn = None
        self._server = None
        with self._fd_lock:
            if self._death is not None:
                os.close(self._death)
                self._death = None
        try:
            os.unlink(self._address)
        except OSError:
            pass
        self._drain()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "no exit code yet"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


_POLL_S = 0.5  # where the process's exit cannot be waited on (no pidfd): how often to check it


def _pidfd(pid: int) -> int | None:
    """A file descriptor that becomes readable when process `pid` exits (Linux 5.3+), or None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _wait_timeout(left: float | None, death_fd: int | None) -> float | None:
    if death_fd is not None:
        return left
    return _POLL_S if left is None else min(left, _POLL_S)


def wait_ready_all(handles: Sequence[WorkerHandle], timeout: float) -> None:
    """Phase two for launched workers, all at once: block on every worker's listening socket or
    channel and its process's exit together, so the first failure raises at once whatever its
    slot (worker 3 failing in 2 s is not reported after worker 0 has loaded a large model).
    Raises WorkerStartError, WorkerDied (died loading) or WorkerTimeout (no Ready in time)."""
    deadline = time.monotonic() + timeout
    pending = list(handles)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            h = pending[0]
            if h.conn is None:
                raise WorkerStartError(f"{h.describe()} did not connect in time; {h._tail()}")
            raise WorkerTimeout(f"{h.describe()} gave no answer within {timeout:.0f}s while loading the model")
        owner: dict[Any, WorkerHandle] = {}
        for h in pending:
            for obj in h._wait_objects():
                owner[obj] = h
        poll_s = _POLL_S if any(h._death is None for h in pending) else None
        ready = set(wait(list(owner), timeout=left if poll_s is None else min(left, poll_s)))
        for h in list(pending):
            channel = h.conn if h.conn is not None else h._server
            if channel in ready or (h.conn is not None and h.conn.poll()):
                if h.conn is None:
                    h._connect()
                    continue  # its Ready comes later
                try:
                    reply = h.conn.recv()
                except (EOFError, OSError, ConnectionError):
                    h._died("loading the model")
                h._started(reply)
                pending.remove(h)
            elif h._death in ready or h.exited():
                if h.conn is None:
                    h._raise_start_death("before it connected")
                h._died("loading the model")


# -- the pool -------------------------------------------------------------------------------

class WorkerPool:
    """Persistent workers, started together, used by many `run` calls, stopped by `close`."""

    def __init__(self, specs: Sequence[WorkerSpec], settings: dict[str, Any], launcher: Any = None,
                 start_timeout_s: float = 1800.0, batch_timeout_s: float | None = None, max_retries: int = 1,
                 max_restarts: int = 3, log: Callable[[str], None] | None = None):
        if not specs:
            raise JudgeConfigError("the pool needs at least one worker")
        self.specs = list(specs)
        self.settings = settings
        self.command = launch_command(launcher)
        self.start_timeout_s = start_timeout_s
        self.batch_timeout_s = batch_timeout_s
        self.max_retries = max_retries
        self.max_restarts = max_restarts
        self.log = log or stderr_log
        self._tmp = Path(tempfile.mkdtemp(prefix="reward-pool-"))
        self._batch_ids = itertools.count()
        self._lock = threading.Lock()
        # Guards `_closed` and `workers` between close() and a driver thread restarting a
        # worker, so no worker is launched after close() has taken its list of workers.
        self._state = threading.Lock()
        self._closed = False
        self._sched: Scheduler | None = None   # the running call's
        self._drivers: list[concurrent.futures.Future] = []  # the last call's worker threads
        self._restarts = Restarts(len(self.specs))
        self.workers: list[WorkerHandle | None] = [None] * len(self.specs)
        self._executor = concurrent.futures.ThreadPoolExecutor(len(self.specs), thread_name_prefix="reward-worker")
        # Deaths between calls, as the watcher saw them (newest last): health() reports them.
        self.idle_deaths: collections.deque[str] = collections.deque(maxlen=20)
        self._mixed_said: str | None = None  # the last mix of quantizations the log warned of
        self._wake_r, self._wake_w = os.pipe()  # wakes the watcher: a worker replaced, the pool closing
        self._watcher = threading.Thread(target=self._watch, name="reward-pool-watch", daemon=True)
        _LIVE_POOLS.add(self)
        try:
            self._start_all()
        except BaseException:
            self.close()
            raise

    @property
    def tmp_dir(self) -> Path:
        return self._tmp

    def _new_handle(self, slot: int) -> WorkerHandle:
        return WorkerHandle(self.specs[slot], self.command, self.settings, self._tmp, self.log)

    def _start_all(self) -> None:
        handles = [self._new_handle(i) for i in range(len(self.specs))]
        self.workers = list(handles)
        for h in handles:          # phase one: everything loads at once
            h.launch()
        try:                       # phase two: wait for all at once; the first failure ends it
            wait_ready_all(handles, self.start_timeout_s)
        except (WorkerDied, WorkerTimeout) as e:
            raise WorkerStartError(str(e)) from None  # close() stops the rest
        self._warn_if_mixed()
        self._watcher.start()

    def pids(self) -> list[int | None]:
        return [w.pid if w else None for w in self.workers]

    def health(self) -> dict[str, Any]:
        """The workers now: how many, how many alive, the deaths seen between calls, and how they
        loaded the weights (quantization_record)."""
        alive = sum(1 for w in self.workers if w is not None and w.alive())
        return {"workers": len(self.workers), "workers_alive": alive, "worker_deaths": list(self.idle_deaths),
                **self.quantization_record()}

    def quantization_record(self) -> dict[str, Any]:
        """How the workers loaded the weights, each as its Ready said (a restarted worker as it
        loaded them again): one report where they agree, each worker's where they differ
        (quantization.across_workers)."""
        return across_workers({w.label: w.quantization for w in list(self.workers) if w is not None and w.ready})

    def _warn_if_mixed(self) -> None:
        """Say in the log, once per mix, that the workers loaded the weights differently."""
        mixed = self.quantization_record()
        if "quantization_by_worker" in mixed and mixed["quantization"] != self._mixed_said:
            self._mixed_said = mixed["quantization"]
            self.log(f"[pool] warning: the workers loaded the weights differently, so their scores may differ: "
                     f"{mixed['quantization'].removeprefix('mixed: ')}")

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _watch(self) -> None:
        """Between calls nothing reads a worker's channel: block on every ready worker's exit
        (copies of their pidfds) and report a death when it happens (the log and health()), not
        when a call next needs that worker. Deaths during a call are the call's to report."""
        watched: dict[int, WorkerHandle] = {}
        try:
            while not self._closed:
                with self._state:
                    current = [h for h in self.workers if h is not None and h.ready]
                for fd, h in list(watched.items()):
                    if not any(h is c for c in current):
                        os.close(fd)
                        del watched[fd]
                for h in current:
                    if not h.exit_seen and not any(h is w for w in watched.values()):
                        fd = h.dup_death_fd()
                        if fd is not None:
                            watched[fd] = h
                ready = wait([self._wake_r, *watched])
                if self._wake_r in ready:
                    os.read(self._wake_r, 512)
                for fd in ready:
                    h = watched.pop(fd, None) if fd != self._wake_r else None
                    if h is None:
                        continue
                    os.close(fd)
                    h.exit_seen = True
                    if self._closed or h.busy or h.stopping:
                        continue
                    text = (f"{h.describe()} died with {_exit_text(h.proc.poll() if h.proc else None)} while idle; "
                            "it is restarted when a call needs it")
                    self.idle_deaths.append(text)
                    self.log(f"[pool] {text}")
        finally:
            for fd in watched:
                os.close(fd)

    def run(self, items: Sequence[ScoreItem], micro_batch: int, schedule: str = "round_robin",
            on_done: Callable[[int], None] | None = None) -> list[ScoreResult]:
        """Score items on all workers; one result per item, in input order."""
        with self._lock:  # one call at a time: workers hold one batch each
            if self._closed:
                raise JudgeUnavailable("the worker pool is closed")
            items = list(items)
            if not items:
                return []
            call_dir = Path(tempfile.mkdtemp(prefix="call-", dir=self._tmp))
            try:
                spilled: dict[Any, str] = {}  # one file per in-memory image, however many items show it
                names: dict[str, str] = {}  # spill file -> the image as the caller knows it
                wire = [_wire_item(it, call_dir, i, spilled, names) for i, it in enumerate(items)]
                results = self._run(items, wire, micro_batch, schedule, on_done or (lambda n: None))
                return _unspill_errors(results, names)
            finally:
                shutil.rmtree(call_dir, ignore_errors=True)

    def _run(self, items: list[ScoreItem], wire: list[dict[str, Any] | ScoreResult], micro_batch: int,
             schedule: str, on_done: Callable[[int], None]) -> list[ScoreResult]:
        sched = Scheduler(items, len(self.workers), micro_batch, schedule, self.max_retries, on_done,
                          failed=[w for w in wire if isinstance(w, ScoreResult)],  # items that failed to spill
                          closing=lambda: self._closed)
        # A call interrupted earlier (Ctrl-C caught by the caller, the pool kept) may still have
        # a thread finishing its last batch on a worker's channel: let it end first.
        concurrent.futures.wait(self._drivers)
        try:
            # Under the state lock: a close() from another thread either came first (it may have
            # stopped the threads while this call readied its items) or finds `_sched` to abort.
            with self._state:
                if self._closed:
                    raise JudgeUnavailable("the worker pool was closed during the call")
                self._sched = sched
                self._drivers = [self._executor.submit(self._drive, slot, sched, wire)
                                 for slot in range(len(self.workers))]
            for f in self._drivers:
                f.result()
        finally:
            # However the call ended (done, Ctrl-C, an error), its threads take no more work:
            # a close() that follows finds `_sched` cleared, so the abort happens here.
            sched.abort()
            self._sched = None
        if self._closed:
            raise JudgeUnavailable("the worker pool was closed during the call")
        return sched.ordered()

    def _drive(self, slot: int, sched: Scheduler, wire: list) -> None:
        """One thread per worker: take a micro-batch, send it, report what came back to the
        scheduler; a dead worker is restarted (bounded) when there is work for it."""
        try:
            self._drive_loop(slot, sched, wire)
        finally:
            sched.driver_done()

    def _drive_loop(self, slot: int, sched: Scheduler, wire: list) -> None:
        while True:
            if self._closed:  # interrupted: close() stops the workers; nothing is retried
                return
            batch = sched.take(slot, wait=True)
            if batch is None:
                return
            # Restart a dead worker only when there is work for it: a call does not wait for a
            # model load that nothing needs.
            handle = self.workers[slot]
            if handle is None or not handle.alive():
                try:
                    handle = self._restart(slot, "it was not running")
                except _PoolClosing:
                    return
                except (WorkerStartError, WorkerDied, WorkerTimeout, _RestartsExhausted) as e:
                    if self._closed:
                        return
                    sched.lost(slot, f"worker could not be restarted: {e}", held=batch)
                    return
            bid = next(self._batch_ids)
            try:
                raw = handle.request(bid, [wire[i] for i in batch], self.batch_timeout_s, indices=batch)
                sched.done(batch, [ScoreResult.from_dict(d) for d in raw], handle.describe())
                self._restarts.reset(slot)  # the bound is on restarts in a row, not per lifetime
            except (WorkerDied, WorkerTimeout) as e:
                if isinstance(e, WorkerTimeout):
                    handle.kill()
                if self._closed:  # close() ended the worker: not a death to report or retry
                    return
                self.log(f"[pool] {e}")
                sched.died(batch, str(e), "worker_timeout" if isinstance(e, WorkerTimeout) else "worker_died")
            except Exception as e:  # the worker survived but the batch raised: fail these items
                if self._closed:
                    return
                sched.failed(batch, str(e))

    @property
    def total_restarts(self) -> int:
        return self._restarts.total

    def _restart(self, slot: int, why: str) -> WorkerHandle:
        if self._closed:
            raise _PoolClosing()
        old = self.workers[slot]
        if old is not None:
            old.stop(grace=0)
        if not self._restarts.allow(slot, self.max_restarts):
            raise _RestartsExhausted(f"worker {self.specs[slot].device_label} died "
                                     f"{self._restarts.in_a_row[slot] + 1} times in a row "
                                     f"(max_restarts={self.max_restarts})")
        self.log(f"[pool] restarting worker {self.specs[slot].device_label} ({why}), "
                 f"restart {self._restarts.in_a_row[slot]}/{self.max_restarts}")
        with self._state:
            if self._closed:
                raise _PoolClosing()
            h = self._new_handle(slot)
            self.workers[slot] = h
            h.launch()
        h.wait_ready(self.start_timeout_s)
        self._warn_if_mixed()  # the new worker may have loaded the weights otherwise
        self._wake()  # the watcher watches the new worker
        return h

    def close(self) -> None:
        """Stop every worker: Shutdown, bounded wait, SIGTERM, SIGKILL. Idempotent.

        Called in the main thread, a Ctrl-C or SIGTERM that comes while it runs (the user presses
        Ctrl-C again) does not abandon it half-way: it kills the workers at once, and the signal
        is delivered again when close() returns."""
        with _signals_kill(self._kill_all):
            with self._state:
                if self._closed:
                    return
                self._closed = True
                handles = [w for w in self.workers if w is not None]
            _LIVE_POOLS.discard(self)
            sched = self._sched
            if sched is not None:  # a call is running (in another thread): it stops taking work
                sched.abort()
            stoppers = [threading.Thread(target=h.stop, daemon=True) for h in handles]
            for t in stoppers:
                t.start()
            for t in stoppers:
                t.join(timeout=30)
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._wake()
            if self._watcher.is_alive():
                self._watcher.join(timeout=5)
            if not self._watcher.is_alive():
                for fd in (self._wake_r, self._wake_w):
                    os.close(fd)
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _kill_all(self) -> None:
        self.log("[pool] interrupted again while stopping: killing the workers now")
        for h in list(self.workers):
            if h is not None and h.proc is not None:
                h._signal(signal.SIGKILL)


def _join_spawner(spawner: threading.Thread, timeout: float = 30.0, start_wait: float = 1.0) -> None:
    """Wait for a launch's spawning thread. A Ctrl-C can land in launch() between the thread's
    creation and its start, or inside start() before the thread reports itself started: join()
    then refuses ("cannot join thread before it is started"). Such a thread either starts within
    moments (and may still launch the process, which stop() must then see) or never starts."""
    deadline = time.monotonic() + start_wait
    while True:
        try:
            spawner.join(timeout=timeout)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                return  # never started: no process will come of it
            time.sleep(0.01)


@contextlib.contextmanager
def _signals_kill(kill: Callable[[], None]) -> Iterator[None]:
    """In the main thread: SIGINT and SIGTERM call `kill` instead of raising mid-way, and are
    re-raised (to the handlers they had) on the way out. Elsewhere, or for a signal that is
    ignored or handled outside Python, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if not caught:
            kill()
        caught.append(signum)

    old: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(sig)
        if current is None or current == signal.SIG_IGN:
            continue
        try:
            old[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        if caught:
            signal.raise_signal(caught[0])


class _RestartsExhausted(RuntimeError):
    pass


class _PoolClosing(RuntimeError):
    pass


def _wire_item(item: ScoreItem, folder: Path, index: int, spilled: dict[Any, str] | None = None,
               names: dict[str, str] | None = None) -> dict[str, Any] | ScoreResult:
    """An item's channel form: paths as absolute paths, in-memory images spilled to `folder`.
    spilled: the call's memo of spilled images (image_memo.convert_once): an image that several
    items show (a source) is written once, and the worker sees one path, so its engine groups
    those items (grouping.py). names: filled with spill file -> the image's own description.
    An item the channel cannot carry (metadata that does not pickle) fails here, alone: sent, it
    would fail its whole micro-batch."""
    def path_of(img: Any, tag: str) -> str:
        if isinstance(img, (str, os.PathLike)):
            return os.path.abspath(os.fspath(img))
        path = convert_once(spilled, img, lambda: _spill(img, folder / f"{index}-{tag}"))
        if names is not None:
            names[path] = describe_image(img)
        return path

    wired = wire_item(item, index, path_of)
    if not isinstance(wired, ScoreItem):
        return wired
    wired_dict = wired.to_dict()
    try:
        # Pickled here, alone, and loaded by the worker item by item (reward_worker.load_items):
        # metadata the worker cannot load (an instance of a class in the caller's __main__) then
        # fails its item there instead of the worker's whole channel.
        wired_dict["metadata"] = bytes(ForkingPickler.dumps(wired_dict["metadata"]))
    except Exception as e:
        return ScoreResult.failure(index, item, f"item {item_name(item, index)}: "
                                   f"{unsendable(item, e, ForkingPickler.dumps, 'a worker process')}", "input")
    return wired_dict


def _unspill_errors(results: list[ScoreResult], names: dict[str, str]) -> list[ScoreResult]:
    """Errors that name a spill file (a path the caller never gave, removed when the call ends)
    name the image as the caller gave it, as the single-device class does."""
    for r in results:
        if r.error:
            for path, name in names.items():
                r.error = r.error.replace(path, name)
    return results


def _spill(img: Any, dest: Path) -> str:
    """An in-memory image written to `dest` (its suffix chosen here); the file's path."""
    if isinstance(img, (bytes, bytearray)):
        dest = dest.with_suffix(".img")
        dest.write_bytes(bytes(img))
    elif hasattr(img, "save"):
        dest = dest.with_suffix(".png")
        load_pil(img).save(dest, format="PNG")  # the pixels the engine judges: rotated, RGB
    else:
        raise ValueError(f"unsupported image type {type(img).__name__}; give a path, bytes or a PIL image")
    return str(dest)


# Pools still open at interpreter exit are closed, so no worker outlives its parent's exit.
_LIVE_POOLS: "set[WorkerPool]" = set()


def _close_live_pools() -> None:
    for pool in list(_LIVE_POOLS):
        pool.close()


import atexit  # noqa: E402

atexit.register(_close_live_pools)
