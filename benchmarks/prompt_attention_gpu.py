"""The language model's attention over the prompts (the prefill) at the judges' shapes: transformers'
sdpa function against the library's (`text_attention.prompt_attention`, cuDNN's kernel first).

A logits call's language model attends over 32 whole prompts per layer: ~884 tokens each for a
1024x768 image (768 image tokens and the rubric's text), query heads sharing KV heads (Qwen3-VL-8B
32 over 8, Qwen3-VL-30B-A3B 32 over 4, Qwen2.5-VL-7B 28 over 4), head_dim 128. Two cases:
- `same_length`: every prompt of one length, no mask (causal);
- `padded`: left padding of up to an eighth of the length, transformers' boolean mask (sdpa_mask).
Variants, each on the same inputs:
- `transformers`: `sdpa_attention_forward` as transformers calls it (sdpa's own kernel choice;
  with a mask, K and V repeated per query head);
- `library`: `prompt_attention` (cuDNN first, the KV heads shared, no copy);
- `library-<backend>`: the library's call with sdpa restricted to one backend (cudnn, flash,
  efficient), to see which kernel it got.
Each output's max |difference| from a float32 reference over the prompts' own positions (a
padding position's output is never read) is recorded; a variant that cannot run these inputs is
recorded with its error, not timed. Time per call by CUDA events after warm-up.

    python benchmarks/prompt_attention_gpu.py --out $OUT             # one GPU, under a minute
    python benchmarks/prompt_attention_gpu.py --smoke --out /tmp/x   # CPU, tiny shapes (CI)
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import types
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import runs  # noqa: E402

from benchmarks.decode_attention_gpu import SHAPES, SMOKE_SHAPES  # noqa: E402  the text models' heads, as decoding


def inputs(batch: int, heads: int, kv_heads: int, dim: int, length: int, padded: bool, device: str, dtype, seed: int = 0):
    """q (batch, heads, length, dim), k and v (batch, kv_heads, length, dim) laid out as the text
    attention hands them over (transposed views of (batch, length, heads, dim)); the mask (None
    for prompts of one length) and the prompts' own positions (batch, length) as booleans."""
    import torch
    from transformers.masking_utils import sdpa_mask

    g = torch.Generator(device="cpu").manual_seed(seed)

    def heads_view(h):
        return torch.randn(batch, length, h, dim, generator=g).to(device, dtype).transpose(1, 2)

    q, k, v = heads_view(heads), heads_view(kv_heads), heads_view(kv_heads)
    real = torch.ones(batch, length, dtype=torch.bool)
    mask = None
    if padded:
        pad = torch.randint(0, max(length // 8, 2), (batch,), generator=g)
        pad[0] = max(length // 8, 2) - 1  # at least one row padded
        real = torch.arange(length)[None, :] >= pad[:, None]
        mask = sdpa_mask(batch_size=batch, q_length=length, kv_length=length, attention_mask=real.to(device),
                         allow_is_causal_skip=False, device=device)
    return q, k, v, mask, real.to(device)


def reference(q, k, v, mask, real):
    """float32 softmax(q k^T) v per query head, causal and masked; padding rows zeroed."""
    import torch

    groups = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(groups, dim=1) for t in (k, v))
    length = q.shape[2]
    allowed = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        allowed = allowed & mask
    s = (q.float() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2) * real[:, :, None, None]


def variants(heads: int, kv_heads: int) -> dict[str, Callable]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from src.models.reward.text_attention import prompt_attention, see_something

    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)

    def library_on(backend):  # the library's sdpa call, sdpa restricted to one backend
        def run(q, k, v, mask):
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else see_something(mask),
                                                   is_causal=mask is None, enable_gqa=heads != kv_heads)
            return o.transpose(1, 2).contiguous()
        return run

    out: dict[str, Callable] = {
        "transformers": lambda q, k, v, mask: sdpa_attention_forward(module, q, k, v, mask)[0],
        "library": lambda q, k, v, mask: prompt_attention(module, q, k, v, mask)[0],
    }
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        out[f"library-{name}"] = library_on(backend)
    return out


def measure(shape: str, case: str, batch: int, length: int, device: str, dtype, reps: int) -> dict[str, Any]:
    import torch

    heads, kv_heads, dim = (SMOKE_SHAPES if device == "cpu" else SHAPES)[shape]
    q, k, v, mask, real = inputs(batch, heads, kv_heads, dim, length, case == "padded", device, dtype)
    ref = reference(q, k, v, mask, real)
    flop = 2 * batch * heads * length * length * dim  # QK^T and PV, causal: half of 4 b h s^2 d
    rows: dict[str, Any] = {}
    cuda = device.startswith("cuda")
    from src.models.reward import vision_attention

    for name, fn in variants(heads, kv_heads).items():
        vision_attention._cudnn_refused.discard("prompt attention")
        try:
            with torch.no_grad():
                o = fn(q, k, v, mask)
                err = float(((o.float() - ref) * real[:, :, None, None]).abs().max())
                ms = runs.ms_per_call(lambda: fn(q, k, v, mask), reps, cuda)
            rows[name] = {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1), "max_abs_err": err,
                          "finite": bool(torch.isfinite(o).all())}
            if name == "library":  # cuDNN's kernel failed and the call fell back to transformers' function
                rows[name]["fell_back"] = "prompt attention" in vision_attention._cudnn_refused
        except Exception as e:  # a backend that cannot run these inputs: recorded, not timed
            rows[name] = runs.kernel_error(e)
    return {"batch": batch, "tokens": length, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "variants": rows}


def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = ["# Prompt (prefill) attention kernels", "", f"`{m['command']}` on {m['device_name']}, torch {m['torch']}, "
             f"cuDNN {m['cudnn']}, {m['dtype']}, {m['reps']} repetitions.", ""]
    for key, r in report["shapes"].items():
        lines += [f"## {key}: {r['batch']} prompts x {r['tokens']} tokens, {r['heads']} heads over {r['kv_heads']} KV heads "
                  f"of {r['head_dim']}", "", "| variant | ms | TFLOP/s | finite | max abs err vs float32 |",
                  "|---|---|---|---|---|"]
        lines += runs.kernel_rows(r["variants"], ["ms", "tflops", "finite", "max_abs_err"])
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=884)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    runs.add_output_arguments(ap, "prompt_attention_gpu", "CPU, tiny shapes, float32: seconds (CI)")
    a = ap.parse_args(argv)
    import torch

    if a.smoke:
        a.device, a.batch, a.tokens, a.reps = "cpu", 3, 24, 2
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    report: dict[str, Any] = {"meta": runs.kernel_meta("prompt_attention_gpu.py", argv, a, dtype), "shapes": {}}
    for shape in a.shapes.split(","):
        for case in ("same_length", "padded"):
            key = f"{shape} {case}"
            report["shapes"][key] = measure(shape, case, a.batch, a.tokens, a.device, dtype, a.reps)
            print(json.dumps({key: report["shapes"][key]}), flush=True)
    runs.save(report, a, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
