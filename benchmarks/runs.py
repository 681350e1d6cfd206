"""What the one-GPU benchmark scripts (reuse_gpu, quant_gpu, profile_gpu) do around their stages:
the report's meta block, a random-weight checkpoint of the asked size in a temporary folder, and
the report written as JSON (after every stage, so a run cut short keeps what it measured) and
markdown (at the end)."""
from __future__ import annotations

import contextlib
import json
import pathlib
import platform
import shutil
import sys
import tempfile
import time
from typing import Any, Iterator

from benchmarks.checkpoints import build_checkpoint


def meta(script: str, argv: list[str] | None, a: Any, **extra: Any) -> dict[str, Any]:
    """The command, the machine, the versions and the run's sizes (a: the parsed arguments, with
    size, n, bs, width, height, device and smoke)."""
    import torch
    import transformers

    cuda = a.device.startswith("cuda")
    return {"command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device_name": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, {cpu_name()})",
            "torch": torch.__version__, "transformers": transformers.__version__, "size": a.size, "n": a.n,
            "bs": a.bs, "width": a.width, "height": a.height, "smoke": a.smoke, **extra,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def kernel_meta(script: str, argv: list[str] | None, a: Any, dtype: Any, **extra: Any) -> dict[str, Any]:
    """The command, the machine, torch's and cuDNN's versions, the dtype and the repetitions of a
    kernel benchmark (a: the parsed arguments, with device and reps)."""
    import torch

    return {"command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "dtype": str(dtype).replace("torch.", ""),
            "reps": a.reps, **extra, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else the machine type."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def parse_kv(pairs: list[str]) -> dict[str, Any]:
    """["key=value", ...] -> {key: value}, each value read as JSON where it parses (numbers,
    true/false, null), else kept as text: judge settings given on a command line."""
    out = {}
    for p in pairs:
        k, _, v = p.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def add_judge_argument(ap: Any, applies_to: str, example: str) -> None:
    """--judge KEY=VALUE, repeatable: a judge setting for the runs `applies_to` names (each script
    says which), read back by judge_settings."""
    ap.add_argument("--judge", action="append", default=[], metavar="KEY=VALUE",
                    help=f"a judge setting for {applies_to}, e.g. {example}; the value is read as JSON where "
                         "it parses, else as text (repeatable)")


def judge_settings(a: Any) -> dict[str, Any]:
    """The --judge settings (add_judge_argument) as the judge's keyword arguments."""
    return parse_kv(a.judge)


def stage_names(ap: Any, given: str, known: Any) -> list[str]:
    """The --stages a run asked for, each one of `known`: a misspelt name stops the run with the
    known ones before any checkpoint is built (minutes on a GPU), not after."""
    names = [s for s in given.split(",") if s]
    unknown = [s for s in names if s not in known]
    if unknown or not names:
        ap.error(f"--stages: unknown {', '.join(map(repr, unknown)) or 'nothing given'}; known: {', '.join(known)}")
    return names


def add_output_arguments(ap: Any, name: str, smoke: str) -> None:
    """--device (default cuda:0), --out (default benchmarks/results), --name (the output files'
    stem, default `name`) and --smoke (`smoke`: what the CI run does instead)."""
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results"))
    ap.add_argument("--name", default=name)
    ap.add_argument("--smoke", action="store_true", help=smoke)


def add_checkpoint_argument(ap: Any) -> None:
    ap.add_argument("--checkpoint", default=None,
                    help="a checkpoint of --size built earlier (bench_gpu.py --work W --keep-checkpoints: W/SIZE), "
                         "used as it is instead of building one")


@contextlib.contextmanager
def checkpoint(report: dict[str, Any], a: Any, prefix: str) -> Iterator[str]:
    """A checkpoint of size a.size (built on a.device when it is a GPU), its folder removed after;
    what the builder reports goes into report["checkpoint"]. With a.checkpoint, that folder, kept."""
    if getattr(a, "checkpoint", None):
        made = pathlib.Path(a.checkpoint) / "random_checkpoint.json"  # written by benchmarks/checkpoints.py
        report["checkpoint"] = {"path": a.checkpoint, "prebuilt": True,
                                **(json.loads(made.read_text()) if made.is_file() else {})}
        yield a.checkpoint
        return
    work = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    try:
        device = a.device if a.device.startswith("cuda") else "cpu"
        report["checkpoint"] = build_checkpoint(a.size, work / "judge", device=device)
        yield str(work / "judge")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def timed(judge, items: list, cuda: bool) -> tuple[float, list]:
    """One call of `items`, timed to the GPU's end (cuda): (seconds, results)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = judge.batch_score(items)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, res


def new_images(judge) -> int:
    """Before a measured call that shows images the judge has seen (a warm-up's): empty its store
    of vision features (`vision_cache_mb`), which would otherwise hand their features back without
    running the vision tower. Returns the tower's count of encoded images so far (0 without vision
    reuse), to subtract from the count after the call."""
    reuse = judge.engine._vision_reuse
    if reuse is None:
        return 0
    reuse.clear()
    return reuse.encoded


def encoded_since(judge, before: int) -> int:
    """Images through the vision tower since new_images returned `before`."""
    reuse = judge.engine._vision_reuse
    return (reuse.encoded if reuse is not None else 0) - before


def ms_per_call(fn: Any, reps: int, cuda: bool, warmup: int = 2) -> float:
    """fn() run `warmup` times, then `reps` times timed: milliseconds per call, by CUDA events on a
    GPU (the kernels' time, launches queued back to back), by the host's clock on the CPU."""
    import torch

    for _ in range(warmup):
        fn()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def kernel_error(e: BaseException) -> dict[str, str]:
    """A kernel table's row for a variant that could not run its inputs: the error's type and first
    line, recorded instead of a time (kernel_rows shows it)."""
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def kernel_rows(rows: dict[str, dict[str, Any]], columns: list[str]) -> list[str]:
    """Markdown rows of a kernel table: name, then each column's value (`max_abs_err` as 1.23e-04);
    a kernel that could not run shows '-' and its error in the last column."""
    out = []
    for name, row in rows.items():
        if "error" in row:
            out.append(f"| {name} | " + " | ".join(["-"] * (len(columns) - 1)) + f" | {row['error']} |")
        else:
            out.append(f"| {name} | " + " | ".join(f"{row[c]:.2e}" if c == "max_abs_err" else str(row[c])
                                                 for c in columns) + " |")
    return out


def save(report: dict[str, Any], a: Any, markdown: str | None = None) -> None:
    """a.out/a.name.json, and with `markdown` a.out/a.name.md (also printed)."""
    out_dir = pathlib.Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{a.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    if markdown is not None:
        (out_dir / f"{a.name}.md").write_text(markdown)
        print(markdown)
