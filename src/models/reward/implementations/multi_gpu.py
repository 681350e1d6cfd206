"""The judge on every GPU of a machine: one persistent worker process per device."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ..base import BaseRewardModel
from ..errors import JudgeConfigError, JudgeUnavailable
from ..pool import WorkerPool, WorkerSpec
from ..scheduler import SCHEDULES
from ..settings import JudgeSettings
from ..types import ScoreItem, ScoreResult


class MultiGPURewardModel(BaseRewardModel):
    """Split items across `device_ids`, one worker process per device (times
    `workers_per_device`), and merge the results in input order.

    device_ids: GPU ids (`[0, 1, 2, 3]`), `auto` for every visible GPU, or `cpu` entries
      (`[cpu, cpu]`) for CPU workers on a machine without a GPU.
    launcher: how to start each worker's Python: null (this interpreter), a path to a venv's
      python, `conda:ENV` / `{conda: ENV}`, `{prefix: [...], python: ...}`, or a full command list.
    schedule: `round_robin` (item i goes to worker i mod n, the classic split) or `dynamic`
      (idle workers pull the next micro-batch: better for uneven work). Same results either way.
    micro_batch: items per request to a worker. Default (null): per call, each worker's share
      for round_robin and a quarter of it for dynamic, kept within [batch_size, 8 x batch_size].
      Each request pays its first chunk's preparation before the GPU starts, so few large
      requests run as fast as the in-process class; smaller ones balance uneven work better.
    batch_timeout_s: a worker that does not answer a micro-batch in time is killed, restarted and
      its items retried elsewhere. max_retries: per item, after a worker died holding it.
    max_restarts: restarts of one worker in a row before it is given up.
    gpus_per_worker: k > 1 spreads each worker's judge over a group of k GPUs, for a judge larger
      than one GPU: `device_ids` [0..7] with k=2 gives 4 workers, on GPUs 0+1, 2+3, 4+5, 6+7, each
      pinned to its group with CUDA_VISIBLE_DEVICES; transformers' device_map places the layers
      (within max_memory_per_gpu_gb per GPU, when set) and inputs go to the group's first GPU.
      Data parallel over the groups, as over single GPUs. `cpu` entries group the same way: one
      CPU worker per k entries, with their threads.
    Judge parameters are those of `JudgeSettings` (model_name, mode, template, batch_size, ...).
    """

    settings_cls = JudgeSettings

    def __init__(self, device_ids: list[int | str] | str = "auto", workers_per_device: int = 1,
                 launcher: Any = None, schedule: str = "round_robin", micro_batch: int | None = None,
                 batch_timeout_s: float | None = 1800.0, start_timeout_s: float = 1800.0, max_retries: int = 1,
                 max_restarts: int = 3, progress: bool = True, env: dict[str, str] | None = None,
                 gpus_per_worker: int = 1, **judge: Any):
        self.settings = JudgeSettings.from_params(judge, owner=type(self).__name__)
        if schedule not in SCHEDULES:
            raise JudgeConfigError(f"schedule: unknown value {schedule!r}; known: {', '.join(SCHEDULES)}")
        if workers_per_device < 1:
            raise JudgeConfigError(f"workers_per_device: must be at least 1, got {workers_per_device}")
        self.schedule = schedule
        if micro_batch is not None and micro_batch < 1:
            raise JudgeConfigError(f"micro_batch: must be at least 1, got {micro_batch}")
        self.micro_batch = micro_batch
        self.progress = progress
        self.device_ids = resolve_device_ids(device_ids)
        groups = device_groups(self.device_ids, gpus_per_worker)
        if self.settings.max_memory_per_gpu_gb is not None and not any(len(g) > 1 and g[0] != "cpu" for g in groups):
            raise JudgeConfigError("max_memory_per_gpu_gb: places a judge spread over a group of GPUs; set "
                                   "gpus_per_worker > 1 with GPU device_ids, or leave it unset")
        specs = worker_specs(self.device_ids, workers_per_device, env or {}, gpus_per_worker)
        self._closed = False
        self.pool = WorkerPool(specs, self.settings.to_params(), launcher=launcher,
                               start_timeout_s=start_timeout_s, batch_timeout_s=batch_timeout_s,
                               max_retries=max_retries, max_restarts=max_restarts)

    @property
    def fingerprint(self) -> str | None:
        return self.pool.workers[0].fingerprint if self.pool.workers and self.pool.workers[0] else None

    @property
    def quantization(self) -> str | None:
        """How the workers loaded the weights (`none`, `fp8 (...)`, a pre-quantized checkpoint's
        method), as each reported it; where they differ, `mixed: ` and each worker's."""
        return self.pool.quantization_record()["quantization"]

    @property
    def quantization_by_worker(self) -> dict[str, str] | None:
        """Where the workers loaded the weights differently, each one's report by device; else None."""
        return self.pool.quantization_record().get("quantization_by_worker")

    def worker_pids(self) -> list[int | None]:
        return self.pool.pids()

    def score_items(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        if self._closed:
            raise JudgeUnavailable("MultiGPURewardModel is closed")
        items = list(items)
        if not self.progress or not items:
            return self.pool.run(items, self.micro_batch_for(len(items)), self.schedule)
        from tqdm import tqdm

        labels = ",".join(s.device_label for s in self.pool.specs)
        with tqdm(total=len(items), desc=f"scoring on {labels}", unit="item") as bar:
            return self.pool.run(items, self.micro_batch_for(len(items)), self.schedule, on_done=bar.update)

    def micro_batch_for(self, n_items: int) -> int:
        """Items per worker request for a call of `n_items` (see `micro_batch`)."""
        if self.micro_batch:
            return self.micro_batch
        bs = self.settings.batch_size
        n_workers = len(self.pool.specs)
        parts = n_workers if self.schedule == "round_robin" else 4 * n_workers
        share = -(-max(n_items, 1) // parts)
        return max(bs, min(share, 8 * bs))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.pool.close()


def resolve_device_ids(device_ids: list[int | str] | str | int) -> list[str]:
    """Normalise to a list of 'cpu' or GPU id strings."""
    if isinstance(device_ids, int):
        device_ids = [device_ids]
    if isinstance(device_ids, str):
        if device_ids == "auto":
            gpus = visible_gpus()
            if not gpus:
                raise JudgeConfigError("device_ids: 'auto' found no GPU (nvidia-smi sees none and "
                                       "CUDA_VISIBLE_DEVICES is empty); use device_ids: [cpu] to run on the CPU")
            return gpus
        device_ids = [x.strip() for x in device_ids.split(",") if x.strip()]
    if not device_ids:
        raise JudgeConfigError("device_ids: empty; give GPU ids, 'auto', or 'cpu' entries")
    out = []
    for d in device_ids:
        s = str(d).strip()
        if s.startswith("cuda:"):
            s = s[5:]
        if s != "cpu" and not s.isdigit():
            raise JudgeConfigError(f"device_ids: {d!r} is neither a GPU id nor 'cpu'")
        out.append(s)
    return out


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [x.strip() for x in env.split(",") if x.strip() and x.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()]


def worker_pythonpath(root: Path | None = None) -> str:
    """PYTHONPATH for a worker: the folder holding the `src` package this process imported
    (the checkout, for the editable install setup_env.sh makes), before any PYTHONPATH already
    set. A worker runs in another environment (a venv, `conda run`, a command prefix) where this
    project is not installed; this way it imports the same code as its parent.

    Installed as a plain (non-editable) package, that folder is a site-packages, which must not
    shadow the worker environment's own torch and transformers: the worker then gets a folder
    holding links to `src` and `standalone` alone."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[4]
    code = root
    if root.name in ("site-packages", "dist-packages"):
        tag = hashlib.sha256(str(root).encode()).hexdigest()[:12]
        code = Path(tempfile.gettempdir()) / f"reward-code-{os.getuid()}-{tag}"
        code.mkdir(mode=0o700, exist_ok=True)
        for name in ("src", "standalone"):
            link = code / name
            if not link.is_symlink():
                try:
                    link.symlink_to(root / name)
                except FileExistsError:  # another process made it at the same moment
                    pass
    old = os.environ.get("PYTHONPATH")
    return f"{code}{os.pathsep}{old}" if old else str(code)


def device_groups(device_ids: list[str], gpus_per_worker: int = 1) -> list[list[str]]:
    """`device_ids` cut into consecutive groups of `gpus_per_worker`, one worker each:
    ['0'..'7'] with 2 -> [['0', '1'], ['2', '3'], ['4', '5'], ['6', '7']]."""
    k = gpus_per_worker
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise JudgeConfigError(f"gpus_per_worker: must be an integer of at least 1, got {k!r}")
    if len(device_ids) % k:
        raise JudgeConfigError(f"gpus_per_worker: {k} does not divide the {len(device_ids)} device_ids "
                               f"({', '.join(device_ids)}); give a multiple of {k} devices or another gpus_per_worker")
    groups = [device_ids[i:i + k] for i in range(0, len(device_ids), k)]
    for g in groups:
        if "cpu" in g and any(d != "cpu" for d in g):
            raise JudgeConfigError(f"gpus_per_worker: the group {', '.join(g)} mixes cpu and GPUs; keep cpu "
                                   f"entries and GPU ids in separate groups of {k}")
        if g[0] != "cpu" and len(set(g)) < len(g):
            raise JudgeConfigError(f"gpus_per_worker: the group {', '.join(g)} names a GPU twice; a worker "
                                   "spreads its judge over distinct GPUs")
    return groups


def worker_specs(device_ids: list[str], workers_per_device: int, extra_env: dict[str, str],
                 gpus_per_worker: int = 1) -> list[WorkerSpec]:
    """One WorkerSpec per worker: `workers_per_device` workers per group of `gpus_per_worker`
    devices, each pinned to its group's GPUs with CUDA_VISIBLE_DEVICES (it sees them as cuda:0..)."""
    code_path = worker_pythonpath()
    groups = device_groups(device_ids, gpus_per_worker)
    n_cpu_workers = sum(g[0] == "cpu" for g in groups) * workers_per_device
    threads = max(1, (os.cpu_count() or 1) // max(n_cpu_workers, 1))
    specs = []
    cpu_seen = 0
    for group in groups:
        for k in range(workers_per_device):
            slot = len(specs)
            env = {"PYTHONPATH": code_path, **{str(a): str(b) for a, b in extra_env.items()}}
            if group[0] == "cpu":
                label = f"cpu#{cpu_seen}"
                cpu_seen += 1
                env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads))
                specs.append(WorkerSpec(slot, "cpu", label, env, num_threads=threads))
            else:
                label = "cuda:" + "+".join(group) + (f"#{k}" if workers_per_device > 1 else "")
                env["CUDA_VISIBLE_DEVICES"] = ",".join(group)  # the worker sees its group, as cuda:0..k-1
                seen = tuple(f"cuda:{i}" for i in range(len(group))) if len(group) > 1 else ()
                specs.append(WorkerSpec(slot, "cuda:0", label, env, devices=seen))
    return specs
