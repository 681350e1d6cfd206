#!/usr/bin/env python3
"""How far bitsandbytes' int8 and NF4 weights move the trained tiny judge's scores, on the CPU.

The demo's 11 edits (`data/demo`, the `edit` rubric) scored by `tiny:judge` with `quantization`
none, bnb-8bit and bnb-4bit, each on a fresh load; per quantization the largest and mean score
change against the full-precision scores and their Spearman correlation. bitsandbytes comes from
`.venv/quant` (setup_env.sh installs it there from requirements-quant.txt, beside .venv and not in
it), so the scoring runs in a child process with that folder on its path. The figures depend on
the CPU's kernels a little (bitsandbytes' CPU int8 rounds by the instruction set it finds).

    python benchmarks/bnb_cpu.py --out benchmarks/results/issue20
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import runs  # noqa: E402
from benchmarks.quant_gpu import agreement  # noqa: E402

QUANT_SITE = ROOT / ".venv" / "quant"
VARIANTS = ("none", "bnb-8bit", "bnb-4bit")

PROBE = '''
import json, sys
from pathlib import Path
from src.models.reward.implementations.local import QwenVLRewardModel
from src.models.reward.types import ScoreItem
demo = Path("data/demo")
rows = [json.loads(l) for l in (demo / "manifest.jsonl").read_text().splitlines() if l.strip()]
items = [ScoreItem(id=r["id"], images=[str(demo / r["image"])], source_images=[str(demo / r["source_image"])],
                   instruction=r["instruction"]) for r in rows]
out = {}
for q in sys.argv[1:]:
    with QwenVLRewardModel(model_name="tiny:judge", template="edit", quantization=q, batch_size=4, device="cpu") as j:
        res = j.batch_score(items)
        out[q] = {"report": j.engine.quantization, "ids": [r.id for r in res], "scores": [r.score for r in res],
                  "errors": [r.error for r in res]}
print("RESULT " + json.dumps(out))
'''


def score(variants: tuple[str, ...] = VARIANTS, timeout: int = 900) -> dict[str, Any]:
    """{quantization: {"report", "ids", "scores", "errors"}}, scored in one child process."""
    if not (QUANT_SITE / "bitsandbytes").is_dir():
        raise SystemExit(f"{QUANT_SITE} is missing: bash setup_env.sh installs it (requirements-quant.txt)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(QUANT_SITE), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", PROBE, *variants], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"the scoring process failed:\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = [f"# bitsandbytes on the CPU: the tiny judge's scores ({m['cpu']})", "", f"`{m['command']}`", "",
             f"bitsandbytes {m['bitsandbytes']}, torch {m['torch']}; the demo's {m['items']} edits, `edit` rubric, "
             "`tiny:judge`, against `quantization: none`.", "",
             "| quantization | weights | scored | max abs diff | mean abs diff | Spearman |", "|---|---|---|---|---|---|"]
    for q, row in report["variants"].items():
        c = row["vs_none"]
        scored = sum(s is not None for s in row["scores"])
        rho = c.get("spearman")
        lines.append(f"| {q} | {row['report']} | {scored} | {c.get('max_abs_diff')} | {c.get('mean_abs_diff')} | "
                     f"{rho if rho is None else round(rho, 4)} |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for bnb_cpu.json and bnb_cpu.md")
    ap.set_defaults(name="bnb_cpu")
    a = ap.parse_args(argv)
    out = score()
    ref = out["none"]["scores"]
    from importlib import metadata

    bnb_version = next((d.version for d in metadata.distributions(path=[str(QUANT_SITE)])
                        if d.metadata["Name"] == "bitsandbytes"), "?")
    import torch

    command = "python benchmarks/bnb_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"meta": {"command": command,
                       "cpu": runs.cpu_name(), "torch": torch.__version__,
                       "bitsandbytes": bnb_version, "items": len(ref), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
              "variants": {q: {**row, "vs_none": agreement(ref, row["scores"])} for q, row in out.items()}}
    runs.save(report, a, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
