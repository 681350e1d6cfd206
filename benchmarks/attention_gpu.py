"""The vision towers' attention kernels at the judges' shapes (issue 15): which one is fastest.

Qwen3-VL's vision tower attends within each image (no windows): 16 heads of head_dim 72, 3,072
patches for a 1024x768 image; Qwen2.5-VL's full-attention layers: 16 heads of 80, 3,888 patches
(1008x756 at patch 14). The inputs are laid out as transformers hands them to the attention
function: one packed sequence (1, heads, tokens, head_dim) whose memory is (tokens, heads,
head_dim), the value a slice of the fused qkv projection, the images' bounds in cu_seqlens.

Kernels timed (CUDA events, after warm-up), each on the same inputs:
- `varlen`: torch's varlen flash attention over the packed sequence (the library's `varlen`).
- `packed`: the library's `packed` attention (images of one length gathered into one batch,
  torch's default choice of sdpa kernel).
- `grouped-<backend>`: images of one length viewed, without a copy, as (images, heads, patches,
  head_dim), through sdpa restricted to one backend (flash, efficient, cudnn).
Each output's max |difference| from a float32 reference (the first two images) is recorded; a
backend that cannot run these inputs is recorded with its error, not timed.

    python benchmarks/attention_gpu.py --out $OUT          # one GPU, about a minute
    python benchmarks/attention_gpu.py --smoke --out /tmp/att   # CPU, tiny shapes (CI)
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import runs  # noqa: E402

# name -> (heads, head_dim, patches per image)
SHAPES = {"qwen3_vl": (16, 72, 3072), "qwen2_5_vl_full": (16, 80, 3888)}
SMOKE_SHAPES = {"qwen3_vl": (2, 8, 48), "qwen2_5_vl_full": (2, 8, 40)}


def packed_inputs(n: int, heads: int, dim: int, length: int, device: str, dtype):
    """q, k, v as transformers' vision attention passes them, and cu_seqlens."""
    import torch

    tokens = n * length
    g = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(tokens, 3, heads, dim, generator=g).to(device=device, dtype=dtype)
    q = qkv[:, 0].contiguous()  # the rotary embedding makes new tensors of q and k
    k = qkv[:, 1].contiguous()
    v = qkv[:, 2]               # a slice of the fused projection
    cu = torch.arange(0, tokens + 1, length, device=device, dtype=torch.int32)
    return [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)], cu


def grouped_view(t, n: int, length: int):
    """(1, heads, n*length, dim) with memory (tokens, heads, dim) -> (n, heads, length, dim), no copy."""
    heads, dim = t.shape[1], t.shape[3]
    return t[0].transpose(0, 1).view(n, length, heads, dim).transpose(1, 2)


def kernels(n: int, length: int, scaling: float) -> dict[str, Callable]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from src.models.reward import vision_attention as va

    def grouped(backend):
        def run(q, k, v, cu):
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(grouped_view(q, n, length), grouped_view(k, n, length),
                                                   grouped_view(v, n, length), scale=scaling)
            return o.transpose(1, 2).reshape(1, n * length, q.shape[1], q.shape[3])
        return run

    out: dict[str, Callable] = {
        "varlen": lambda q, k, v, cu: va.packed_varlen_attention(q, k, v, cu, length, scaling),
        "packed": lambda q, k, v, cu: va.packed_attention(q, k, v, cu, scaling),
    }
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
        out[f"grouped-{name}"] = grouped(backend)
    return out


def measure(shape: str, n: int, device: str, dtype, reps: int) -> dict[str, Any]:
    import torch

    heads, dim, length = (SMOKE_SHAPES if device == "cpu" else SHAPES)[shape]
    (q, k, v), cu = packed_inputs(n, heads, dim, length, device, dtype)
    scaling = dim ** -0.5
    # float32 reference on the first two images
    ref_n = min(2, n)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(grouped_view(t, n, length)[:ref_n].float() for t in (q, k, v)), scale=scaling).transpose(1, 2)
    flop = 4 * n * heads * length * length * dim  # QK^T and PV
    rows: dict[str, Any] = {}
    cuda = device.startswith("cuda")
    for name, fn in kernels(n, length, scaling).items():
        if name == "grouped-math" and cuda:
            continue  # the reference kernel; far slower and memory-hungry at these sizes on a GPU
        if name == "varlen" and not cuda:
            continue
        try:
            o = fn(q, k, v, cu)
            err = float((o[0, :ref_n * length].float().view(ref_n, length, heads, dim) - ref).abs().max())
            ms = runs.ms_per_call(lambda: fn(q, k, v, cu), reps, cuda)
            rows[name] = {"ms": round(ms, 3), "tflops": round(flop / ms / 1e9, 1), "max_abs_err": err}
        except Exception as e:  # a backend that cannot run these inputs: recorded, not timed
            rows[name] = runs.kernel_error(e)
    return {"images": n, "heads": heads, "head_dim": dim, "patches": length, "kernels": rows}


def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = ["# Vision-tower attention kernels", "", f"`{m['command']}` on {m['device_name']}, torch {m['torch']}, "
             f"{m['dtype']}, {m['reps']} repetitions.", ""]
    for shape, r in report["shapes"].items():
        lines += [f"## {shape}: {r['images']} images x {r['patches']} patches, {r['heads']} heads of {r['head_dim']}", "",
                  "| kernel | ms | TFLOP/s | max abs err vs float32 |", "|---|---|---|---|"]
        lines += runs.kernel_rows(r["kernels"], ["ms", "tflops", "max_abs_err"])
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32, help="images per call (a batch of 32 one-image prompts)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    runs.add_output_arguments(ap, "attention_gpu", "CPU, tiny shapes, float32: seconds (CI)")
    a = ap.parse_args(argv)
    import torch

    if a.smoke:
        a.device, a.images, a.reps = "cpu", 3, 2
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    report: dict[str, Any] = {"meta": runs.kernel_meta("attention_gpu.py", argv, a, dtype), "shapes": {}}
    for shape in a.shapes.split(","):
        report["shapes"][shape] = measure(shape, a.images, a.device, dtype, a.reps)
        print(json.dumps({shape: report["shapes"][shape]}), flush=True)
    runs.save(report, a, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
