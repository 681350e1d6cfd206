"""Shared fixtures: tiny offline models, real image files, and the no-orphan check."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# The suite is the CPU suite (CI has no GPU): a judge built without `device` takes `auto`, which
# on a GPU machine would be cuda:0 in bf16, and the tests' expectations are the CPU's. GPU runs are
# the benchmarks' (benchmarks/). Set before torch is imported; workers the tests start inherit it.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

# The failure tests' fault plug-in (src/testing/faults.py): every worker and Ray actor the suite
# starts loads it (REWARD_TEST_PLUGIN, inherited), and this process's judges get its forward
# faults (out of memory, delay). It acts only when a REWARD_FAULT_* variable is set; the library
# itself never loads it.
from src.models.reward.plugin import PLUGIN_ENV as _PLUGIN_ENV  # noqa: E402
from src.testing import faults as _faults  # noqa: E402

os.environ[_PLUGIN_ENV] = _faults.PLUGIN
_faults.watch_forwards()


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One cache of tiny checkpoints for the whole run; workers find it through the env var."""
    cache = Path(os.environ.get("REWARD_TINY_CACHE") or (ROOT / ".cache" / "tiny_models"))
    os.environ["REWARD_TINY_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_qwen25(tiny_cache) -> str:
    from src.models.tiny import resolve_model_name

    return resolve_model_name("tiny:qwen2_5_vl", cache_dir=tiny_cache)


SHORT_CONTEXT = 300  # tokens: an image and a short instruction fit, 40 repeats of one do not


@pytest.fixture(scope="session")
def short_context_judge(tiny_cache, tmp_path_factory) -> str:
    """The tiny Qwen2-VL checkpoint with a context (its language model's max_position_embeddings)
    of SHORT_CONTEXT tokens, for prompts longer than the judge's context."""
    import json
    import shutil

    from src.models.tiny import resolve_model_name

    path = tmp_path_factory.mktemp("short context") / "qwen2_vl"
    shutil.copytree(resolve_model_name("tiny:qwen2_vl", cache_dir=tiny_cache), path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = SHORT_CONTEXT
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def fp8_blocks(w, block: int):
    """A weight in the FP8 checkpoint format (float8_e4m3fn, one inverse scale per block):
    (the float8 weight, its inverse scales)."""
    import torch

    n, k = w.shape
    blocks = w.float().reshape(n // block, block, k // block, block)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale_inv[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(n, k)
    return q, scale_inv


@pytest.fixture(scope="session")
def fp8_checkpoint(tiny_cache, tmp_path_factory) -> tuple[str, str]:
    """The tiny judge written as FP8 releases are: its language layers' weights in float8 with
    32x32 block scales, and config.json declaring quant_method fp8. (the plain folder, the FP8 one)"""
    import json
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    from src.models.tiny import resolve_model_name

    src = Path(resolve_model_name("tiny:qwen2_5_vl"))
    dst = tmp_path_factory.mktemp("fp8") / "tiny_fp8"
    shutil.copytree(src, dst)
    quantized = 0
    for f in dst.glob("*.safetensors"):
        out = {}
        for k, v in load_file(f).items():
            if re.fullmatch(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight", k):
                out[k], out[k[:-len("weight")] + "weight_scale_inv"] = fp8_blocks(v, 32)
                quantized += 1
            else:
                out[k] = v
        save_file(out, f, metadata={"format": "pt"})
    assert quantized
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [32, 32], "modules_to_not_convert": ["model.visual", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(config))
    return str(src), str(dst)


def set_chunk_order(engine, order: str) -> None:
    """The public setting `chunk_order`, changed on a loaded judge's engine (read at each call)."""
    import dataclasses

    engine.settings = dataclasses.replace(engine.settings, chunk_order=order)


def chunks_seen(engine) -> list[list[int]]:
    """The indices of each chunk a loaded engine prepares, in the order it prepares them (its
    `_prepare` wrapped for the rest of the test)."""
    seen: list[list[int]] = []
    real = engine._prepare

    def wrapped(items, indices, *a, **k):
        seen.append(list(indices))
        return real(items, indices, *a, **k)
    engine._prepare = wrapped
    return seen


@pytest.fixture
def cudnn_refuses(monkeypatch) -> list:
    """cuDNN's attention kernel turns every call down when it runs, as it can for a shape its
    checks let through; no earlier refusal recorded. Returns the list of tries (one 1 each)."""
    from src.models.reward import vision_attention as va

    tried: list = []

    def refuse(*a, **kw):
        tried.append(1)
        raise RuntimeError("cuDNN Frontend error: No valid execution plans built.")
    monkeypatch.setattr(va, "cudnn_first_sdpa", refuse)
    monkeypatch.setattr(va, "_cudnn_refused", set())
    return tried


def make_image(seed: int, w: int = 64, h: int = 48):
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    im = Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))
    ImageDraw.Draw(im).rectangle([seed % 7, 5, 20 + seed % 11, 30], fill=(200, 30, 30))
    return im


@pytest.fixture(scope="session")
def image_files(tmp_path_factory) -> list[str]:
    """Twelve real PNG files of a few different sizes."""
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(12):
        p = d / f"img_{i:02d}.png"
        make_image(i, 48 + 8 * (i % 4), 40 + 12 * (i % 3)).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture
def sigint_default():
    """Processes started by the test get Ctrl-C's default disposition, as from a terminal, even
    when pytest itself runs in the background of a script, which starts it with SIGINT ignored
    (an ignored signal stays ignored across exec; a handled one is reset to the default)."""
    old = signal.getsignal(signal.SIGINT)
    if old == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if old == signal.SIG_IGN:
            signal.signal(signal.SIGINT, old)


def call_in_thread(fn, *args, name: str | None = None):
    """Start fn(*args) in a thread of its own: (the thread, a dict whose "result" is fn's return
    value, or the exception it raised, once the thread has ended)."""
    import threading

    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn(*args)
        except Exception as e:
            out["result"] = e
    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread, out


class LoadsAs:
    """Metadata that pickles here and loads in a worker process or a Ray actor as `factory(*args)`:
    a value the worker then holds in the item's result, which carries the item's metadata back."""

    def __init__(self, factory, *args):
        self.factory, self.args = factory, args

    def __reduce__(self):
        return self.factory, self.args


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it has exited but not been reaped.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def descendants(root: int) -> dict[int, str]:
    """The live processes below `root` in the process tree (children, their children...), each with
    its command line, from one `ps` (-ww: whole lines, which Ray's processes need to be told apart)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    args: dict[int, str] = {}
    for line in out.splitlines()[1:]:
        parts = line.split(None, 2)
        if len(parts) == 3:
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
            args[int(parts[0])] = parts[2]
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and not pid_gone(child):
                found[child] = args[child]
                todo.append(child)
    return found


def assert_no_orphans(pids, timeout: float = 15.0) -> None:
    """Every pid (and every process whose command line names our worker script) is gone."""
    deadline = time.monotonic() + timeout
    pids = [p for p in pids if p]
    while time.monotonic() < deadline:
        if all(pid_gone(p) for p in pids):
            break
        time.sleep(0.1)
    alive = [p for p in pids if not pid_gone(p)]
    assert not alive, f"worker processes still alive: {alive}"


def worker_processes(parent_pids=None) -> list[int]:
    """Live persistent reward_worker.py processes whose pool lived in this process (or in one of
    `parent_pids`), by their REWARD_PARENT_PID: found even after they were re-parented, and blind
    to other test runs' workers on a shared machine. Read from /proc: `ps` cuts its lines at 80
    columns when not on a terminal, which hid every worker's `--connect`."""
    parents = {str(p) for p in (parent_pids if parent_pids is not None else [os.getpid()])}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
            if not (any(a.endswith(b"reward_worker.py") for a in args) and b"--connect" in args):
                continue
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(b"REWARD_PARENT_PID=") and e.split(b"=", 1)[1].decode() in parents for e in env):
            found.append(int(entry))
    return [p for p in found if not pid_gone(p)]


def wait_until_gone(parent_pids, timeout: float) -> list[int]:
    """Wait up to `timeout` s for the workers of `parent_pids` to exit; returns those still alive."""
    deadline = time.monotonic() + timeout
    while (alive := worker_processes(parent_pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


# -- the fault-suite ledger ------------------------------------------------------------------
# test_bad_inputs.py and test_faults.py record here what they observed (never what they
# expected); the table printed at the end of the run is computed from these records.

class FaultLedger:
    def __init__(self) -> None:
        self.bad_inputs: list[dict] = []
        self.faults: list[dict] = []
        self.requests: list[dict] = []   # bad requests sent to the service, and its answers
        self.generated: dict[str, dict] = {}  # property-based bodies per endpoint

    def bad_input(self, case: str, item_id: str, record: dict, hide: str = "") -> None:
        """One bad input and the result record the job wrote for it (`hide`: a folder prefix
        left out of the printed error)."""
        def short(text):
            return text.replace(hide, "") if (text and hide) else text
        self.bad_inputs.append({"case": case, "id": item_id, "score": record.get("score"),
                                "kind": record.get("error_kind"), "error": short(record.get("error")),
                                "notes": [short(n) for n in (record.get("metadata") or {}).get("notes") or []]})

    def fault(self, case: str, items: int, results: list, note: str = "") -> None:
        """One injected fault and the results of the run it hit (ScoreResults or job records).
        An item is lost when it has no result, or a result with neither a score nor an error."""
        def get(r, k):
            return r.get(k) if isinstance(r, dict) else getattr(r, k)
        scored = sum(get(r, "score") is not None and get(r, "error") is None for r in results)
        failed = sum(get(r, "score") is None and bool(get(r, "error")) for r in results)
        self.faults.append({"case": case, "items": items, "scored": scored, "failed": failed,
                            "lost": items - scored - failed, "note": note})

    def request(self, case: str, status: int, detail: str, items: int = 0, answered: int = 0) -> None:
        """One bad request to a live service: the status it got and what it said; `items` accepted
        items in it, `answered` how many came back with a score or an error."""
        self.requests.append({"case": case, "status": status, "detail": detail, "items": items,
                              "answered": answered})

    def generated_body(self, endpoint: str, status: int, items: int = 0, answered: int = 0) -> None:
        g = self.generated.setdefault(endpoint, {"bodies": 0, "statuses": {}, "items": 0, "answered": 0})
        g["bodies"] += 1
        g["statuses"][status] = g["statuses"].get(status, 0) + 1
        g["items"] += items
        g["answered"] += answered

    def five_xx(self) -> int:
        return (sum(r["status"] >= 500 for r in self.requests)
                + sum(n for g in self.generated.values() for st, n in g["statuses"].items() if st >= 500))

    def lost(self) -> int:
        lost_inputs = sum(1 for b in self.bad_inputs if b["score"] is None and not b["error"])
        return (lost_inputs + sum(f["lost"] for f in self.faults)
                + sum(r["items"] - r["answered"] for r in self.requests)
                + sum(g["items"] - g["answered"] for g in self.generated.values()))


LEDGER = FaultLedger()


@pytest.fixture(scope="session")
def ledger() -> FaultLedger:
    return LEDGER


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not (LEDGER.bad_inputs or LEDGER.faults or LEDGER.requests or LEDGER.generated):
        return
    tr = terminalreporter
    tr.section("fault-injection table (observed)")
    if LEDGER.bad_inputs:
        tr.write_line(f"{'bad input':<44} {'outcome':<8} {'kind':<10} detail")
        for b in LEDGER.bad_inputs:
            outcome = "scored" if b["score"] is not None else ("failed" if b["error"] else "LOST")
            if b["score"] is not None:
                detail = "; ".join([f"score {b['score']:.4f}", *(b["notes"] or [])])
            else:
                detail = b["error"] or ""
            detail = " ".join(detail.split())
            tr.write_line(f"{b['case'][:44]:<44} {outcome:<8} {b['kind'] or '-':<10} {detail[:110]}")
        tr.write_line("")
    if LEDGER.faults:
        tr.write_line(f"{'fault injected':<52} {'items':>5} {'scored':>6} {'failed':>6} {'lost':>4}  observed")
        for f in LEDGER.faults:
            tr.write_line(f"{f['case'][:52]:<52} {f['items']:>5} {f['scored']:>6} {f['failed']:>6} {f['lost']:>4}  "
                          f"{' '.join(f['note'].split())[:100]}")
        tr.write_line("")
    if LEDGER.requests:
        tr.write_line(f"{'bad request to the service':<48} {'status':>6} {'items':>5} {'answered':>8}  answer")
        for r in LEDGER.requests:
            tr.write_line(f"{r['case'][:48]:<48} {r['status']:>6} {r['items']:>5} {r['answered']:>8}  "
                          f"{' '.join(r['detail'].split())[:100]}")
        tr.write_line("")
    if LEDGER.generated:
        tr.write_line(f"{'generated bodies (hypothesis)':<30} {'bodies':>6} {'items':>6} {'answered':>8}  statuses")
        for ep, g in LEDGER.generated.items():
            statuses = ", ".join(f"{st}: {n}" for st, n in sorted(g["statuses"].items()))
            tr.write_line(f"{ep:<30} {g['bodies']:>6} {g['items']:>6} {g['answered']:>8}  {statuses}")
        tr.write_line("")
    bad = len(LEDGER.bad_inputs) + len(LEDGER.requests)
    tr.write_line(f"bad inputs tried: {bad}   faults injected: {len(LEDGER.faults)}   "
                  f"generated bodies: {sum(g['bodies'] for g in LEDGER.generated.values())}   "
                  f"items lost: {LEDGER.lost()}   5xx answers: {LEDGER.five_xx()}")
