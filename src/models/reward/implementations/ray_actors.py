"""The judge in Ray actors: one actor per GPU (or CPU actors), on one machine or a whole cluster.

Data flow of one `RayRewardModel.score_items(items)` call:

    caller --items--> _wire_item: paths stay paths; PIL images and bytes travel as encoded bytes
                          |        inside the task (Ray objects), so no node needs the caller's disk
                          v
    Scheduler (scheduler.py, shared with the local pool): micro-batches of indices in one shared
                          |  queue, retries (items of a dead actor, one by one), result slots
                          |  a free actor gets the next micro-batch: actor.score.remote(items, indices)
                          v
    ray.wait(in-flight refs) --results by index--> Scheduler --> input order
                          |  actor died / timed out: its items go back to the Scheduler to retry
                          |  (bounded), the actor is replaced by a new one (bounded, in a row)
                          v
    _JudgeActor (a Ray actor per slot) hosting JudgeEngine (engine.py), loaded once, kept loaded

Actors:
- _JudgeActor: the Ray actor. Builds the engine at creation; a failed load is reported by `info()`
  with its traceback instead of killing the actor, so the error reaches the caller intact.
- _Slot: the driver's view of one actor: its handle and what it does (starting, idle, busy, lost).
- Scheduler (scheduler.py): the work of one call: queues, per-item attempts, result slots.
- RayRewardModel: connects to (or starts) Ray, starts every actor at once, dispatches, replaces
  dead actors, closes.

Everything runs in the caller's thread: the only waiting is `ray.wait` on in-flight refs, which
is also where death (an error on the ref) and timeouts (a deadline per slot) are detected.
"""
from __future__ import annotations

import io
import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import plugin
from ..base import BaseRewardModel
from ..errors import JudgeConfigError, JudgeStartError, JudgeUnavailable
from ..image_memo import convert_once
from ..scheduler import Restarts, Scheduler, stderr_log, unsendable, wire_item
from ..quantization import across_workers
from ..result_form import sendable
from ..settings import JudgeSettings
from ..types import ScoreItem, ScoreResult, item_name, load_pil

# The `src` package, shipped to the actors with Ray's `py_modules` so nodes need only the worker env.
_SRC_DIR = Path(__file__).resolve().parents[3]
_REPO_ROOT = _SRC_DIR.parent
RAY_PIN = "ray==2.60.0"  # as in requirements.txt; the worker env needs the same version

# The Ray connection a RayRewardModel of this process made, shared by every RayRewardModel that
# finds it open: the last of them to close shuts it down (an earlier close() would stop the Ray
# the others' actors live in).
_SHARED_LOCK = threading.Lock()
_shared = {"users": 0, "local": False, "shipped": False}


class ActorStartError(JudgeStartError):
    """An actor could not start: the message names the actor, the node, the PID, the cause and the fix."""

    who = "the judge's Ray actors"


# -- the actor (runs in the worker environment, on any node) -----------------------------------

class _JudgeActor:
    """One judge in a Ray actor. Ray gives a GPU actor its GPU(s) through CUDA_VISIBLE_DEVICES,
    so the engine always uses cuda:0 there."""

    def __init__(self, settings: dict[str, Any], slot: int, num_threads: int | None, cwd: str | None):
        self.pid = os.getpid()
        self.engine = None
        self.error: str | None = None
        self.traceback: str | None = None
        self.load_time_s = 0.0
        self.node = "?"
        self.label = f"actor{slot}"
        try:
            import ray

            self.node = ray.util.get_node_ip_address()
            gpus = [str(g) for g in ray.get_gpu_ids()]
            device = "cuda:0" if gpus else "cpu"
            self.label = f"actor{slot}:{'cuda:' + ','.join(gpus) if gpus else 'cpu'}@{self.node}"
            # Relative model folders and paths mean what they mean to the caller, where that
            # folder exists on this node (one machine, or a shared filesystem).
            if cwd and os.path.isdir(cwd):
                os.chdir(cwd)
            import torch

            if not gpus and num_threads:
                torch.set_num_threads(num_threads)
            from src.models.reward.engine import JudgeEngine

            plugin.install_from_env()  # the test suite's fault plug-in, when REWARD_TEST_PLUGIN names it

            self.engine = JudgeEngine(JudgeSettings.from_params(settings), device=device, device_label=self.label)
            self.load_time_s = self.engine.load_time_s
        except BaseException as e:  # reported by info(); the driver turns it into ActorStartError
            self.error = f"{type(e).__name__}: {e}"
            self.traceback = traceback.format_exc()

    def info(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"actor_id": ctx.get_actor_id(), "runtime_env": dict(ctx.runtime_env),  # as Ray merged it
                "pid": self.pid, "node": self.node, "label": self.label, "load_time_s": self.load_time_s,
                "fingerprint": self.engine.fingerprint() if self.engine is not None else None,
                "quantization": self.engine.quantization if self.engine is not None else None,
                "code": str(Path(__file__).resolve().parents[3]),  # where this project was imported from
                "error": self.error, "traceback": self.traceback}

    def score(self, items: list[ScoreItem], indices: list[int]) -> list[ScoreResult]:
        """Score items[k], which is item indices[k] of the caller's call (the engine numbers, and
        names in errors, each item by its index), in one engine call. A result Ray cannot send
        back (a value in it that does not pickle: metadata that loaded here as a lock, say), which
        would fail the whole batch, fails its item alone, naming the field (result_form.sendable)."""
        if self.engine is None:
            raise RuntimeError(f"{self.label} has no model: {self.error}")
        plugin.before_call(items)  # the test suite's fault plug-in, where one was loaded: this actor's crash or hang
        results = self.engine.score(items, indices=indices)
        from ray import cloudpickle  # what Ray pickles a task's return value with

        try:
            cloudpickle.dumps(results)
        except Exception:
            return sendable(results, results, cloudpickle.dumps, f"the Ray actor {self.label}", self.label)
        return results


# -- the driver's view of the actors -----------------------------------------------------------

@dataclass
class _Slot:
    index: int
    actor: Any = None
    state: str = "starting"            # starting | idle | busy | lost
    ref: Any = None                    # the in-flight call: info() while starting, score() while busy
    batch: list[int] | None = None     # indices of the busy call; None for a batch of an aborted call
    since: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    cause: str = ""                    # why it was lost

    def describe(self) -> str:
        label = self.info.get("label") or f"actor{self.index}"
        return f"{label} (pid {self.info.get('pid', '?')})"


# -- the reward model ----------------------------------------------------------------------------

class RayRewardModel(BaseRewardModel):
    """The judge in `num_actors` Ray actors, each hosting the same engine as every other class,
    loaded once and kept across calls. Idle actors pull the next micro-batch; results come back
    in input order.

    address: null starts a local Ray in this process; `auto` joins the cluster this machine is part
      of (`ray start --head` / `ray start --address=...`); `host:6379` names one. close() calls
      ray.shutdown() on a connection this object made: that stops a local Ray, and only
      disconnects from a cluster. A process already connected to Ray (a Ray-based trainer) keeps
      its connection; close() then only kills the actors.
    num_actors: an integer, or `auto` for one actor per `num_gpus_per_actor` GPUs of the cluster.
    num_gpus_per_actor: 1 for one GPU per actor (a fraction packs actors on a GPU); 0 for CPU
      actors. Above 1 the GPUs are reserved but the model runs on the first.
    num_cpus_per_actor: CPUs reserved per actor (CPU actors also use this many torch threads).
    runtime_env: Ray's runtime_env for the actors, passed through: `{conda: reward-worker}` (a
      conda env name or prefix present on every node), `{pip: [...]}`, `{py_executable:
      /opt/reward-worker/bin/python}` (an unpacked `setup_env.sh --ray --pack` env at the same
      path on every node), `env_vars`, ... The worker env needs ray (the driver's version) besides
      the engine's packages.
    ship_code: upload this project's `src` package with the Ray connection (job-level
      `py_modules`, which Ray merges with the actors' runtime_env), so nodes need no checkout.
      False, or a connection this object did not make: the actors import the project from this
      checkout's path, which must then exist on every node (one machine, a shared filesystem).
    micro_batch: items per actor call (default 2 x batch_size).
    max_retries: per item, after the actor holding it died. max_restarts: replacements of one
      actor in a row before its slot is given up.
    batch_timeout_s: an actor that does not answer a micro-batch in time is killed and replaced,
      and its items retried. start_timeout_s: time for an actor to be placed and load its model.
    num_cpus, log_to_driver: for a local Ray started here (num_cpus null: every CPU).
    Judge parameters are those of `JudgeSettings` (model_name, mode, template, batch_size, ...).
    Image paths must be readable on every node; in-memory images travel with the task.
    """

    settings_cls = JudgeSettings

    def __init__(self, address: str | None = None, num_actors: int | str = "auto", num_gpus_per_actor: float = 1.0,
                 num_cpus_per_actor: float = 1.0, runtime_env: dict[str, Any] | None = None, ship_code: bool = True,
                 micro_batch: int | None = None, max_retries: int = 1, max_restarts: int = 3,
                 batch_timeout_s: float | None = 1800.0, start_timeout_s: float = 1800.0, progress: bool = True,
                 num_cpus: int | None = None, log_to_driver: bool = True, **judge: Any):
        self.settings = JudgeSettings.from_params(judge, owner=type(self).__name__)
        if num_gpus_per_actor < 0:
            raise JudgeConfigError(f"num_gpus_per_actor: must be >= 0 (0 for CPU actors), got {num_gpus_per_actor}")
        if num_cpus_per_actor <= 0:
            raise JudgeConfigError(f"num_cpus_per_actor: must be > 0, got {num_cpus_per_actor}")
        if isinstance(num_actors, str) and num_actors != "auto":
            raise JudgeConfigError(f"num_actors: expected an integer or 'auto', got {num_actors!r}")
        if isinstance(num_actors, int) and num_actors < 1:
            raise JudgeConfigError(f"num_actors: must be at least 1, got {num_actors}")
        if num_actors == "auto" and num_gpus_per_actor == 0:
            raise JudgeConfigError("num_actors: 'auto' means one actor per GPU; with num_gpus_per_actor: 0 "
                                   "(CPU actors) give a number")
        self.micro_batch = micro_batch or 2 * self.settings.batch_size
        if self.micro_batch < 1:
            raise JudgeConfigError(f"micro_batch: must be at least 1, got {micro_batch}")
        for name, value in (("max_retries", max_retries), ("max_restarts", max_restarts)):
            if value < 0:
                raise JudgeConfigError(f"{name}: must be >= 0, got {value}")
        if runtime_env is not None and not isinstance(runtime_env, dict):
            raise JudgeConfigError("runtime_env: expected a mapping (Ray's runtime_env), got "
                                   f"{type(runtime_env).__name__}")
        self.num_gpus_per_actor = float(num_gpus_per_actor)
        self.num_cpus_per_actor = float(num_cpus_per_actor)
        self.max_retries = max_retries
        self.max_restarts = max_restarts
        self.batch_timeout_s = batch_timeout_s
        self.start_timeout_s = start_timeout_s
        self.progress = progress
        # close() from any number of threads at once: one of them closes (the first to claim it
        # under _close_claim), the others return once it has (_close_done).
        self._close_claim = threading.RLock()  # reentrant: see _lock
        self._close_done = threading.Event()
        self._closer: int | None = None  # the thread of the close() that does the closing
        self._closed = False
        self._owns_connection = False   # this object called ray.init: close() calls ray.shutdown()
        self._local_ray = False         # ... and that started a local Ray (fixed resources)
        # One call at a time (each actor holds one micro-batch); close() takes it too, to shut Ray
        # down only once a call in another thread has left Ray. Reentrant: a signal handler that
        # closes the judge runs in the thread whose call it interrupted.
        self._lock = threading.RLock()
        self.slots: list[_Slot] = []
        self._restarts = Restarts(0)    # per slot, across calls

        try:
            import ray
        except ImportError:
            raise ImportError(f"RayRewardModel needs ray in this environment: pip install '{RAY_PIN}'") from None
        self._ray = ray
        _check_runtime_env_fields(runtime_env or {})
        shipped = self._connect(address, num_cpus, log_to_driver, ship_code)
        try:
            self._runtime_env = self._actor_runtime_env(runtime_env, shipped)
            self._check_py_executable()
            n = self._resolve_num_actors(num_actors)
            self._check_resources(n)
            self._actor_cls = ray.remote(_JudgeActor)
            self.slots = [_Slot(k) for k in range(n)]
            self._restarts = Restarts(n)
            self._start_all()
        except BaseException:
            self.close()
            raise

    # -- start ---------------------------------------------------------------------------------

    def _actor_runtime_env(self, runtime_env: dict[str, Any] | None, shipped: bool) -> dict[str, Any]:
        env = dict(runtime_env or {})
        if not isinstance(env.get("env_vars") or {}, dict):
            raise JudgeConfigError("runtime_env.env_vars: expected a mapping of names to values")
        env_vars = {str(k): str(v) for k, v in (env.get("env_vars") or {}).items()}  # YAML numbers too
        if not shipped:
            # The checkout must then be at the same path on every node (one machine, shared disk).
            path = env_vars.get("PYTHONPATH")
            env_vars["PYTHONPATH"] = f"{_REPO_ROOT}{os.pathsep}{path}" if path else str(_REPO_ROOT)
        if env_vars:
            env["env_vars"] = env_vars
        return env

    def _connect(self, address: str | None, num_cpus: int | None, log_to_driver: bool, ship_code: bool) -> bool:
        """Connect to Ray (or start a local one); True when the project's code is shipped to the
        actors. Ray uploads local folders only at the job level, so the code travels with the
        connection this object makes (ray.init's runtime_env), merged by Ray with the actors' own."""
        with _SHARED_LOCK:
            return self._connect_locked(address, num_cpus, log_to_driver, ship_code)

    def _connect_locked(self, address: str | None, num_cpus: int | None, log_to_driver: bool, ship_code: bool) -> bool:
        ray = self._ray
        if ray.is_initialized() and _shared["users"]:
            _shared["users"] += 1
            self._owns_connection, self._local_ray = True, bool(_shared["local"])
            self._log("[ray] using the Ray connection another RayRewardModel of this process made (its address and "
                      "num_cpus hold; Ray stops when the last of them closes)")
            return bool(_shared["shipped"])
        if ray.is_initialized():
            self._log("[ray] this process is already connected to Ray; using that connection (close() leaves it "
                      "open). The actors import this project from its path here, or from the job's own "
                      "runtime_env (py_modules / working_dir)")
            return False
        job_env = {"py_modules": [str(_SRC_DIR)]} if ship_code else None
        try:
            if address is None:
                # "local": a new Ray of our own, even where `ray start` runs a cluster on this machine.
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                         runtime_env=job_env)
                self._local_ray = True
            else:
                ray.init(address=address, log_to_driver=log_to_driver, runtime_env=job_env)
        except ConnectionError as e:
            raise ConnectionError(f"RayRewardModel: could not connect to Ray at address {address!r}: "
                                  f"{str(e).rstrip('. ')}. "
                                  "Start a cluster with `ray start --head` (then `address: auto`), or use "
                                  "`address: null` for a local Ray in this process.") from None
        self._owns_connection = True
        _shared.update(users=1, local=self._local_ray, shipped=ship_code)
        return ship_code

    def _check_py_executable(self) -> None:
        """A py_executable that is not there leaves the actor pending, Ray retrying its start, until
        start_timeout_s: refuse it now on a local Ray; on a cluster it must exist on every node."""
        exe = self._runtime_env.get("py_executable")
        if not isinstance(exe, str) or (exe.split() and shutil.which(exe.split()[0])):  # may hold arguments
            return
        text = (f"runtime_env.py_executable: {exe} does not exist or cannot be run on this machine; give the "
                "python of the unpacked worker env (setup_env.sh --ray --pack), at the same path on every node")
        if self._local_ray:
            raise JudgeConfigError(f"RayRewardModel: {text}")
        self._log(f"[ray] warning: {text} (if it is not there, the actors wait start_timeout_s="
                  f"{self.start_timeout_s:g}s)")

    def _resolve_num_actors(self, num_actors: int | str) -> int:
        if num_actors != "auto":
            return int(num_actors)
        gpus = self._ray.cluster_resources().get("GPU", 0)
        n = int(gpus // self.num_gpus_per_actor)
        if n < 1:
            raise JudgeConfigError(f"num_actors: 'auto' found {gpus:g} GPU(s) in the Ray cluster, not enough for "
                                   f"one actor with num_gpus_per_actor={self.num_gpus_per_actor:g}; for CPU actors "
                                   "set num_gpus_per_actor: 0 and num_actors to a number")
        return n

    def _check_resources(self, n: int) -> None:
        """A request the cluster can never meet would leave the actors pending forever: fail now on
        a local Ray; on a cluster (which may grow) say so and let start_timeout_s bound the wait."""
        have = self._ray.cluster_resources()
        problems = []
        for res, per in (("CPU", self.num_cpus_per_actor), ("GPU", self.num_gpus_per_actor)):
            need = n * per
            if need > have.get(res, 0) + 1e-9:
                problems.append(f"{n} actor(s) x {per:g} {res} = {need:g} {res} but Ray has {have.get(res, 0):g}")
        if not problems:
            return
        hint = ("lower num_actors or the per-actor resources"
                + ("; for CPU actors set num_gpus_per_actor: 0" if self.num_gpus_per_actor > 0 else "")
                + ("; a local Ray takes its CPU count from num_cpus" if self._local_ray else ""))
        text = "; ".join(problems)
        if self._local_ray:
            raise JudgeConfigError(f"RayRewardModel: {text}: {hint}")
        self._log(f"[ray] warning: {text}; the actors wait for the cluster to grow (up to start_timeout_s="
                  f"{self.start_timeout_s:g}s): {hint}")

    def _spawn(self, slot: _Slot) -> None:
        threads = max(1, int(self.num_cpus_per_actor))
        opts: dict[str, Any] = dict(num_cpus=self.num_cpus_per_actor, num_gpus=self.num_gpus_per_actor,
                                    max_restarts=0, max_task_retries=0)  # retries are ours: bounded, per item
        if self._runtime_env:
            opts["runtime_env"] = self._runtime_env
        slot.actor = self._actor_cls.options(**opts).remote(self.settings.to_params(), slot.index, threads, os.getcwd())
        slot.state, slot.ref, slot.batch, slot.since, slot.info = "starting", slot.actor.info.remote(), None, time.monotonic(), {}

    def _start_all(self) -> None:
        """Two phases: create every actor at once (they load in parallel), then wait for each."""
        for slot in self.slots:
            self._spawn(slot)
        deadline = time.monotonic() + self.start_timeout_s
        waiting = {slot.ref: slot for slot in self.slots}
        while waiting:
            # Short waits: a long one blocks inside Ray where Ctrl-C and signals are not seen.
            ready, _ = self._ray.wait(list(waiting), num_returns=1, timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            if not ready and time.monotonic() < deadline:
                continue
            if not ready:
                names = ", ".join(f"actor{s.index}" for s in waiting.values())
                raise ActorStartError(
                    f"{names} not ready within start_timeout_s={self.start_timeout_s:g}s: each asks for "
                    f"{self.num_cpus_per_actor:g} CPU and {self.num_gpus_per_actor:g} GPU; the cluster has "
                    f"{_resources(self._ray.cluster_resources())} ({_resources(self._ray.available_resources())} "
                    "free). Lower num_actors or the per-actor resources, or check the runtime_env (a conda or pip "
                    "env is built on first use).")
            slot = waiting.pop(ready[0])
            error = self._started(slot)
            if error:
                raise ActorStartError(error)

    def _started(self, slot: _Slot) -> str | None:
        """Collect a starting actor's info(); the error text when it failed, else None."""
        try:
            info = self._ray.get(slot.ref)
        except self._ray.exceptions.RayError as e:
            return (f"actor{slot.index} died while starting: {_reason(e)}. Check that the worker environment "
                    f"(runtime_env) has ray ({RAY_PIN}), torch, transformers, qwen-vl-utils and pillow.")
        slot.info = info
        if info.get("error"):
            return (f"{slot.describe()} on {info.get('node')} failed to start: {info['error']}\n"
                    f"--- actor traceback ---\n{(info.get('traceback') or '').rstrip()}")
        slot.state, slot.ref = "idle", None
        self._log(f"[ray] {slot.describe()} ready: model loaded in {info['load_time_s']:.1f}s")
        return None

    # -- calls ---------------------------------------------------------------------------------

    def _first_info(self, key: str) -> Any:
        """What the first actor that reported `key` at load said of it (None: none did)."""
        return next((slot.info[key] for slot in self.slots if slot.info.get(key)), None)

    @property
    def fingerprint(self) -> str | None:
        return self._first_info("fingerprint")

    def _quantization_record(self) -> dict[str, Any]:
        """How the actors loaded the weights, each as it reported at load (quantization.across_workers)."""
        return across_workers({slot.info.get("label") or f"actor{slot.index}": slot.info.get("quantization")
                               for slot in self.slots if slot.info})

    @property
    def quantization(self) -> str | None:
        """How the actors loaded the weights (`none`, `fp8 (...)`, a pre-quantized checkpoint's method);
        `mixed: ...` where they differ."""
        return self._quantization_record()["quantization"]

    @property
    def quantization_by_worker(self) -> dict[str, str] | None:
        """Each actor's report (by its label) where they differ, else None."""
        return self._quantization_record().get("quantization_by_worker")

    def actor_ids(self) -> list[str | None]:
        """Ray's id of each slot's actor (of the last one to start, for a slot being replaced)."""
        return [slot.info.get("actor_id") for slot in self.slots]

    def actor_pids(self) -> list[int | None]:
        return [slot.info.get("pid") for slot in self.slots]

    def actors(self) -> list[Any]:
        """The live actor handles, by slot (None for a slot given up)."""
        return [slot.actor if slot.state != "lost" else None for slot in self.slots]

    def score_items(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        with self._lock:  # one call at a time: each actor holds one micro-batch
            if self._closed:
                raise JudgeUnavailable("RayRewardModel is closed")
            items = list(items)
            if not items:
                return []
            if not self.progress:
                return self._run(items, lambda n: None)
            from tqdm import tqdm

            with tqdm(total=len(items), desc=f"scoring on {len(self.slots)} Ray actor(s)", unit="item") as bar:
                return self._run(items, bar.update)

    def _run(self, items: list[ScoreItem], on_done: Callable[[int], None]) -> list[ScoreResult]:
        ray = self._ray
        encoded: dict[Any, bytes] = {}  # one PNG per PIL image, however many items show it
        wire = [_wire_item(it, i, encoded) for i, it in enumerate(items)]
        sched = Scheduler(items, len(self.slots), self.micro_batch, "dynamic", self.max_retries, on_done,
                          failed=[w for w in wire if isinstance(w, ScoreResult)],  # items that could not be encoded
                          lost={s.index: s.cause for s in self.slots if s.state == "lost"}, noun="actor")
        try:
            while sched.remaining:
                self._raise_if_closed()
                for slot in self.slots:
                    if slot.state == "idle":
                        batch = sched.take(slot.index)
                        if batch is None:
                            break
                        slot.state, slot.batch, slot.since = "busy", batch, time.monotonic()
                        slot.ref = slot.actor.score.remote([wire[i] for i in batch], batch)
                flying = {s.ref: s for s in self.slots if s.state in ("starting", "busy")}
                assert flying, "items remain but no actor is working or starting"  # by construction
                ready, _ = ray.wait(list(flying), num_returns=1, timeout=self._wait_timeout())
                self._raise_if_closed()  # close() killed the actors: their errors are not deaths to retry
                for ref in ready:
                    self._collect(flying[ref], sched)
                self._check_deadlines(sched)
        except BaseException:
            # Interrupted (Ctrl-C, an error): batches still in flight belong to no call now; their
            # actors are free again once they answer, and the answers are dropped.
            for slot in self.slots:
                if slot.state == "busy":
                    slot.batch = None
            raise
        return sched.ordered()

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise JudgeUnavailable("RayRewardModel was closed during the call")

    def _wait_timeout(self) -> float:
        now = time.monotonic()
        soonest = 1.0
        for slot in self.slots:
            limit = self._limit(slot)
            if limit is not None:
                soonest = min(soonest, max(0.0, slot.since + limit - now))
        return soonest

    def _limit(self, slot: _Slot) -> float | None:
        if slot.state == "starting":
            return self.start_timeout_s
        if slot.state == "busy":
            return self.batch_timeout_s
        return None

    def _collect(self, slot: _Slot, sched: Scheduler) -> None:
        ray = self._ray
        if slot.state == "starting":
            error = self._started(slot)
            if error:
                self._log(f"[ray] {error}")
                self._replace(slot, error.splitlines()[0], sched)
            return
        batch = slot.batch
        try:
            results = ray.get(slot.ref)
        except ray.exceptions.RayTaskError as e:  # the actor lives; the batch raised: these items fail
            slot.state, slot.ref, slot.batch = "idle", None, None
            if batch is not None:
                sched.failed(batch, f"{slot.describe()} failed a batch: {e}")
            return
        except ray.exceptions.RayError as e:  # the actor died (or its node did)
            cause = f"{slot.describe()} died while scoring {len(batch or [])} item(s): {_reason(e)}"
            self._log(f"[ray] {cause}")
            if batch is not None:
                sched.died(batch, cause)
            self._replace(slot, cause, sched)
            return
        slot.state, slot.ref, slot.batch = "idle", None, None
        self._restarts.reset(slot.index)  # the bound is on restarts in a row, not per lifetime
        if batch is not None:
            sched.done(batch, results, slot.describe())

    def _check_deadlines(self, sched: Scheduler) -> None:
        now = time.monotonic()
        for slot in self.slots:
            limit = self._limit(slot)
            if limit is None or now - slot.since < limit:
                continue
            if slot.state == "starting":
                cause = f"actor{slot.index} was not ready within start_timeout_s={limit:g}s"
            else:
                cause = (f"{slot.describe()} gave no answer within batch_timeout_s={limit:g}s while scoring "
                         f"{len(slot.batch or [])} item(s)")
                if slot.batch is not None:
                    sched.died(slot.batch, cause, "worker_timeout")
            self._log(f"[ray] {cause}")
            self._replace(slot, cause, sched)

    @property
    def total_restarts(self) -> int:
        return self._restarts.total

    def _replace(self, slot: _Slot, why: str, sched: Scheduler) -> None:
        """Kill the slot's actor and start a new one (it loads while the others work), unless it
        has been replaced max_restarts times in a row; then the slot is given up (and the call's
        scheduler hands its work to the others)."""
        self._kill(slot)
        if self._closed or not self._restarts.allow(slot.index, self.max_restarts):
            slot.state, slot.ref, slot.batch = "lost", None, None
            slot.cause = (f"actor{slot.index} failed {self._restarts.in_a_row[slot.index] + 1} time(s) in a row "
                          f"(max_restarts={self.max_restarts}); last: {why}")
            self._log(f"[ray] giving up {slot.cause}")
            sched.lost(slot.index, slot.cause)
            return
        self._log(f"[ray] replacing actor{slot.index} ({why}), restart {self._restarts.in_a_row[slot.index]}"
                  f"/{self.max_restarts}")
        self._spawn(slot)

    def _kill(self, slot: _Slot) -> None:
        if slot.actor is not None:
            try:
                self._ray.kill(slot.actor, no_restart=True)
            except Exception:  # already dead, or Ray is gone
                pass

    # -- close ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill the actors; shut Ray down if this object started it. Idempotent.

        From another thread during a call: that call ends with JudgeUnavailable (its actors are
        killed first, so it does not run to its end), and close() returns once it has. From several
        threads at once: one closes, and the others return once it has (the shared Ray loses this
        judge as a user once, not once per caller)."""
        if not self._closed:  # (unlocked: the common case, a judge closed once, in one thread)
            with self._close_claim:
                first = not self._closed
                if first:
                    self._closer = threading.get_ident()  # before _closed: a signal handler may close() in this thread
                    self._closed = True  # a call in progress stops at its next wait
            if first:
                try:
                    self._close()
                finally:
                    self._close_done.set()
                return
        if self._closer != threading.get_ident():  # not a signal handler interrupting this thread's close()
            self._close_done.wait()

    def _close(self) -> None:
        ray = getattr(self, "_ray", None)
        if ray is not None and ray.is_initialized():
            for slot in self.slots:
                self._kill(slot)
        with self._lock:  # the call in progress has left Ray: its slots and Ray itself are ours now
            last = False
            if self._owns_connection:
                self._owns_connection = False  # given up once, however close() is re-entered
                with _SHARED_LOCK:
                    _shared["users"] -= 1
                    last = _shared["users"] <= 0
            if ray is None or not ray.is_initialized():
                return
            for slot in self.slots:
                self._kill(slot)  # again: an actor the call started in the meantime
                slot.state, slot.ref, slot.batch = "lost", None, None
                slot.cause = "closed"
            if last:
                ray.shutdown()  # stops a local Ray; for a cluster, only this process's connection

    _log = staticmethod(stderr_log)


# -- helpers ----------------------------------------------------------------------------------

def _wire_item(item: ScoreItem, index: int, encoded: dict[Any, bytes] | None = None) -> ScoreItem | ScoreResult:
    """The item as it travels to an actor: paths as absolute paths (read on the actor's node), PIL
    images as PNG bytes and bytes as they are (both inside the task, so no node needs this disk).
    encoded: the call's memo of PNGs (image_memo.convert_once): a source that several items show
    is encoded once, and travels as one bytes object within a batch."""
    def encode(img: Any, tag: str) -> Any:
        if isinstance(img, (str, os.PathLike)):
            return os.path.abspath(os.fspath(img))
        if isinstance(img, (bytes, bytearray)):
            return bytes(img)
        if hasattr(img, "save"):
            return convert_once(encoded, img, lambda: _png(img))
        raise ValueError(f"unsupported image type {type(img).__name__}; give a path, bytes or a PIL image")

    wired = wire_item(item, index, encode)
    if isinstance(wired, ScoreItem) and wired.metadata:
        from ray import cloudpickle  # what Ray pickles a task's arguments with

        try:  # here, alone: in the task, Ray's TypeError would leave score_items and lose the call
            cloudpickle.dumps(wired.metadata)
        except Exception as e:
            why = unsendable(item, e, cloudpickle.dumps, "a Ray actor")
            return ScoreResult.failure(index, item, f"item {item_name(item, index)}: {why}", "input")
    return wired


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    load_pil(img).save(buf, format="PNG")  # the pixels the engine judges: rotated, RGB
    return buf.getvalue()


def _reason(e: BaseException) -> str:
    """The line of a Ray error that says why (Ray's messages start with boilerplate)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("The actor is dead because"):
            return ln[:500]
    first = lines[0] if lines else type(e).__name__
    if len(lines) > 1 and "Traceback (most recent call last)" in str(e):
        # A runtime_env Ray could not build: the first line is boilerplate, the traceback's last the cause.
        first = f"{first.rstrip('.')}: {lines[-1]}"
    return first[:500]


def _check_runtime_env_fields(runtime_env: dict[str, Any]) -> None:
    """Ray takes a field it does not know for a plugin's and applies nothing: a typo would be lost."""
    import difflib

    from ray.runtime_env import RuntimeEnv

    known = sorted(k for k in RuntimeEnv.known_fields if not k.startswith("_"))
    for key in runtime_env:
        if key not in RuntimeEnv.known_fields:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise JudgeConfigError(f"runtime_env: unknown field {key!r}; {hint}Ray's fields: {', '.join(known)}")


def _resources(res: dict[str, float]) -> str:
    return ", ".join(f"{res.get(k, 0):g} {k}" for k in ("CPU", "GPU"))
