#!/usr/bin/env python3
"""The worker: one judge on one device, in its own process and environment.

It needs only torch, transformers, qwen-vl-utils and pillow (plus this repository's
`src/models/reward` plain-data modules and engine), so it runs in a lean environment built by
`setup_env.sh`, a conda env (`conda run -n ENV`), or a conda-pack'ed env on another machine.

Persistent mode (what the multi-GPU pool starts; the channel is described in messages.py):

    python standalone/reward_worker.py --connect /tmp/pool-x/w0.sock
        (authkey in $REWARD_WORKER_AUTHKEY, parent pid in $REWARD_PARENT_PID)

One-shot mode, for debugging a task file by hand:

    python standalone/reward_worker.py --tasks in.json --output out.json [--device cuda:0]
        (--device: auto by default, the first CUDA GPU or else the CPU)

It imports the project's `src` package: the pool puts the folder holding it on the worker's
PYTHONPATH; by hand, in an environment where the project is not installed, run it as
`PYTHONPATH=/path/to/repo python standalone/reward_worker.py ...`.

where in.json is {"settings": {...JudgeSettings...}, "items": [{"images": [...], ...}, ...]}.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shutil
import sys
import threading
import time
import traceback
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

from src.models.reward import messages as msg
from src.models.reward import plugin
from src.models.reward.devices import FORMS, check_device
from src.models.reward.errors import JudgeConfigError
from src.models.reward.result_form import cannot_send_back, sendable
from src.models.reward.settings import JudgeSettings
from src.models.reward.types import ScoreItem, ScoreResult, item_name


def _log(text: str) -> None:
    try:
        print(text, flush=True)
    except (OSError, ValueError):  # the parent that read our logs is gone: nobody to tell
        pass


def _parent_alive(parent_pid: int) -> bool:
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # a killed parent stays a zombie until its own parent reaps it
        with open(f"/proc/{parent_pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _remove_pool_dir(pool_dir: str) -> None:
    # A parent killed outright could not remove its pool folder (sockets, spilled images).
    if os.path.basename(pool_dir).startswith("reward-pool-"):
        shutil.rmtree(pool_dir, ignore_errors=True)


def _channel_lost(parent: str | None, address: str) -> int:
    """The channel closed without a Shutdown. If that is because the parent died, clean up
    after it (its zombie may linger a moment until reaped)."""
    _log("channel closed by the parent; exiting")
    if parent:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and _parent_alive(int(parent)):
            time.sleep(0.1)
        if not _parent_alive(int(parent)):
            _remove_pool_dir(os.path.dirname(address))
    return 0


def _watch_parent(parent_pid: int, pool_dir: str, interval: float = 1.0) -> None:
    """Exit when the parent is gone. The channel's EOF tells the same while the worker waits for
    work; this thread also catches it in the middle of a long batch."""
    def loop() -> None:
        while True:
            time.sleep(interval)
            if not _parent_alive(parent_pid):
                _log(f"parent {parent_pid} is gone; exiting")
                _remove_pool_dir(pool_dir)
                os._exit(3)
    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def _build_engine(settings: dict, device: str, device_label: str, num_threads: int | None,
                  devices: list[str] | None = None):
    import torch

    plugin.install_from_env()  # the test suite's fault plug-in, when REWARD_TEST_PLUGIN names it
    if num_threads:
        torch.set_num_threads(num_threads)
    from src.models.reward.engine import JudgeEngine

    return JudgeEngine(JudgeSettings.from_params(settings), device=device, device_label=device_label, devices=devices)


def serve(address: str) -> int:
    from multiprocessing.connection import Client

    # A crash in native code (a CUDA kernel, a C extension) then leaves the Python stack in the
    # log, which the pool quotes in the error of the items the worker held.
    faulthandler.enable(all_threads=False)
    authkey = bytes.fromhex(os.environ.pop(msg.AUTHKEY_ENV, ""))
    parent = os.environ.get(msg.PARENT_PID_ENV)
    if parent:
        _watch_parent(int(parent), os.path.dirname(address))
    conn = Client(address, family="AF_UNIX", authkey=authkey)
    init = conn.recv()
    if not isinstance(init, msg.Init):
        _log(f"expected Init, got {type(init).__name__}; exiting")
        return 2
    # What this worker was pinned to, in its log (the pool quotes it when the start fails).
    _log(f"worker {init.device_label}: CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, "
         f"judge on {', '.join(getattr(init, 'devices', None) or [init.device])}")
    try:
        engine = _build_engine(init.settings, init.device, init.device_label, init.num_threads,
                               getattr(init, "devices", None))
    except BaseException as e:
        conn.send(msg.StartFailed(os.getpid(), f"{type(e).__name__}: {e}", traceback.format_exc()))
        return 1
    _log(f"model loaded on {init.device_label} in {engine.load_time_s:.1f}s (pid {os.getpid()}); "
         f"quantization: {engine.quantization}")
    conn.send(msg.Ready(os.getpid(), engine.load_time_s, engine.fingerprint(), engine.quantization))
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            return _channel_lost(parent, address)
        if isinstance(req, msg.Shutdown):
            engine.close()
            return 0
        if not isinstance(req, msg.Score):
            _log(f"ignoring unexpected message {type(req).__name__}")
            continue
        try:
            reply = scored_reply(req.batch_id, score_request(engine, req), init.device_label)
        except Exception as e:
            reply = ForkingPickler.dumps(msg.BatchFailed(req.batch_id, f"{type(e).__name__}: {e}",
                                                         traceback.format_exc()))
        try:
            conn.send_bytes(reply)  # what conn.send(message) sends, pickled here first
        except OSError:
            return _channel_lost(parent, address)


def scored_reply(batch_id: int, results: list[ScoreResult], label: str) -> Any:
    """The Scored reply to a Score request, pickled for the channel. A result the channel cannot
    carry (a value in it that does not pickle: metadata that loaded here as a lock, say) fails its
    item alone, naming the field (result_form.sendable); the others are sent as they are, and the
    worker serves on. The results are pickled together, and each alone only when that fails."""
    forms = [_channel_form(r, label) for r in results]
    try:
        return ForkingPickler.dumps(msg.Scored(batch_id, forms))
    except Exception:
        return ForkingPickler.dumps(msg.Scored(batch_id, sendable(forms, results, ForkingPickler.dumps,
                                                                  _sender(label), label, ScoreResult.to_dict)))


def _sender(label: str) -> str:
    return f"the worker on {label}"


def _channel_form(result: ScoreResult, label: str) -> dict[str, Any]:
    try:
        return result.to_dict()
    except Exception as e:  # a value nested deeper than Python's stack
        return cannot_send_back(result, _sender(label), label, f"the result ({type(e).__name__}: {e})",
                                "model").to_dict()


def load_items(dicts: list[dict], indices: list[int]) -> tuple[list[ScoreItem], list[int], list[ScoreResult]]:
    """The request's items, their indices, and the failed results of those whose metadata (sent
    pickled, item by item) cannot be loaded here: a class this process cannot import fails its
    item, not the batch or the worker."""
    import pickle

    items, kept, failed = [], [], []
    for d, i in zip(dicts, indices):
        meta = d.get("metadata")
        if isinstance(meta, (bytes, bytearray)):
            try:
                d = {**d, "metadata": pickle.loads(meta)}
            except Exception as e:
                item = ScoreItem(images=[], id=d.get("id"))
                failed.append(ScoreResult.failure(
                    i, item, f"item {item_name(item, i)}: its metadata cannot be loaded in the worker process "
                    f"({type(e).__name__}: {e}); give metadata values of importable types (plain data)", "input"))
                continue
        items.append(ScoreItem.from_dict(d))
        kept.append(i)
    return items, kept, failed


def _score(engine, items: list[ScoreItem], **kwargs) -> list:
    """One engine call. The test suite's fault plug-in, where this process loaded one, sees the
    call's items first: a crash or a hang of this worker process is simulated here, at its
    boundary, not in the engine."""
    plugin.before_call(items)
    return engine.score(items, **kwargs)


def score_request(engine, req: msg.Score) -> list:
    """One result per item of `req`, in its order."""
    indices = list(req.indices) if req.indices is not None else list(range(len(req.items)))
    items, kept, failed = load_items(req.items, indices)
    results = _score(engine, items, indices=kept) if items else []
    position = {ix: k for k, ix in enumerate(indices)}
    return sorted([*results, *failed], key=lambda r: position[r.index])


def one_shot(tasks: Path, output: Path, device: str) -> int:
    data = json.loads(tasks.read_text())
    if not isinstance(data, dict) or "settings" not in data or "items" not in data:
        raise SystemExit(f"{tasks}: expected a JSON object with 'settings' and 'items'")
    engine = _build_engine(data["settings"], device, None, None)  # labelled with the device `auto` settled on
    try:
        results = _score(engine, [ScoreItem.from_dict(d) for d in data["items"]])
    finally:
        engine.close()
    output.write_text(json.dumps([r.to_dict() for r in results], indent=1))
    ok = sum(r.score is not None for r in results)
    _log(f"scored {ok}/{len(results)} items on {engine.device}; results in {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connect", help="Unix socket of the parent pool (persistent mode)")
    ap.add_argument("--tasks", type=Path, help="task file (one-shot mode)")
    ap.add_argument("--output", type=Path, help="where one-shot mode writes results")
    ap.add_argument("--device", default="auto", help=f"one-shot mode's device: {FORMS}")
    args = ap.parse_args(argv)
    if args.connect:
        return serve(args.connect)
    if args.tasks and args.output:
        try:
            device = check_device(args.device, "--device")
        except JudgeConfigError as e:
            ap.error(str(e))
        return one_shot(args.tasks, args.output, device)
    ap.error("give --connect (persistent mode) or --tasks and --output (one-shot mode)")
    return 2


if __name__ == "__main__":
    code = main()
    # Skip the interpreter's teardown: with torch and transformers loaded it takes seconds (more
    # on a busy machine), which every close() and Ctrl-C would wait for, and it does nothing a
    # worker needs. The pool still ends anything the worker started (SIGKILL to its group).
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
