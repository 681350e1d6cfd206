"""The decoding step's attention at the judges' shapes (issue 15): which kernel is fastest.

While a batch decodes, each layer attends one new token per row to a static KV cache: batch 32,
a cache of 1,024 slots (a ~884-token prompt plus 128 answer tokens, rounded up to 64), left
padding, and slots not written yet masked out (a boolean mask of (batch, 1, 1, slots)). Query
heads share KV heads (grouped-query attention): Qwen3-VL-8B 32 over 8, Qwen3-VL-30B-A3B 32 over 4,
Qwen2.5-VL-7B 28 over 4; head_dim 128.

Variants, each on the same inputs, timed as the step runs them: `--layers` calls (one per
layer, each on its own cache) captured in one CUDA graph and replayed, CUDA events around the
replays; the time is per call.
- `repeat`: transformers' sdpa path (K and V repeated per query head, then sdpa with the mask).
- `folded`: the library's decoding attention (`fast_decode._decode_gqa_attention`: the query heads
  of a KV head become its query length; sdpa's own kernel choice), then the same folded inputs
  through sdpa restricted to one backend (`folded-efficient`, `folded-cudnn`).
- `matmul`: two batched matrix products with the softmax between them in float32.
- `flex` (GPU only): torch's flex attention, compiled, the mask as a block mask.
Each output's max |difference| from a float32 reference is recorded; a variant that cannot run
these inputs is recorded with its error, not timed. Bytes: K and V read once per call, the floor.

    python benchmarks/decode_attention_gpu.py --out $OUT             # one GPU, under a minute
    python benchmarks/decode_attention_gpu.py --smoke --out /tmp/x   # CPU, tiny shapes (CI)
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import runs  # noqa: E402

# name -> (query heads, KV heads, head_dim)
SHAPES = {"qwen3_vl-8b": (32, 8, 128), "qwen3_vl_moe": (32, 4, 128), "qwen2_5_vl-7b": (28, 4, 128)}
SMOKE_SHAPES = {"qwen3_vl-8b": (4, 2, 8), "qwen3_vl_moe": (4, 1, 8), "qwen2_5_vl-7b": (6, 2, 8)}


def inputs(batch: int, heads: int, kv_heads: int, dim: int, slots: int, layers: int, device: str, dtype, seed: int = 0):
    """Per layer (q, k, v), and the mask shared by the layers: row i's prompt starts at its own
    left padding, and the slots after the current step are not written yet."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    per_layer = []
    for _ in range(layers):
        q = torch.randn(batch, heads, 1, dim, generator=g).to(device, dtype)
        k = torch.randn(batch, kv_heads, slots, dim, generator=g).to(device, dtype)
        v = torch.randn(batch, kv_heads, slots, dim, generator=g).to(device, dtype)
        per_layer.append((q, k, v))
    pad = torch.randint(0, max(slots // 8, 1), (batch,), generator=g)
    written = slots - max(slots // 16, 1)
    pos = torch.arange(slots)
    mask = ((pos >= pad[:, None]) & (pos < written)).view(batch, 1, 1, slots).to(device)
    return per_layer, mask


def variants(scaling: float, cuda: bool) -> dict[str, Callable]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from src.models.reward import fast_decode

    class _Module:  # what transformers' attention functions read from the attention module
        is_causal = False
        training = False

        def __init__(self, groups):
            self.num_key_value_groups = groups

    def repeat(q, k, v, mask):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(_Module(q.shape[1] // k.shape[1]), q, k, v, mask, scaling=scaling)[0]

    def library(q, k, v, mask):
        return fast_decode._decode_gqa_attention(_Module(q.shape[1] // k.shape[1]), q, k, v, mask, scaling=scaling)[0]

    def folded(backend):
        def run(q, k, v, mask):
            b, h, _, d = q.shape
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(q.reshape(b, k.shape[1], h // k.shape[1], d), k, v,
                                                   attn_mask=mask, scale=scaling)
            return o.reshape(b, h, 1, d).transpose(1, 2)
        return run

    def matmul(q, k, v, mask):
        b, h, _, d = q.shape
        qf = q.reshape(b, k.shape[1], h // k.shape[1], d)
        s = torch.matmul(qf, k.transpose(-1, -2)).float() * scaling
        p = s.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
        return torch.matmul(p, v).reshape(b, h, 1, d).transpose(1, 2)

    out = {"repeat": repeat, "folded": library,
           "folded-efficient": folded(SDPBackend.EFFICIENT_ATTENTION),
           "folded-cudnn": folded(SDPBackend.CUDNN_ATTENTION), "matmul": matmul}
    if cuda:
        out["flex"] = flex_decoding(scaling)
    return out


def flex_decoding(scaling: float) -> Callable:
    """torch's flex attention, compiled (its decoding kernel for short queries, KV heads shared
    natively), the mask as a block mask over the cache's slots, built once per mask."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    masks: dict[int, Any] = {}

    def run(q, k, v, mask):
        b, slots = mask.shape[0], mask.shape[-1]
        if id(mask) not in masks:
            valid = mask.view(b, slots)
            masks[id(mask)] = create_block_mask(lambda bi, h, qi, kv: valid[bi, kv], B=b, H=None, Q_LEN=q.shape[2],
                                                KV_LEN=slots, device=q.device)
        o = compiled(q, k, v, block_mask=masks[id(mask)], scale=scaling, enable_gqa=True)
        return o.transpose(1, 2)
    return run


def measure(shape: str, batch: int, slots: int, layers: int, device: str, dtype, reps: int) -> dict[str, Any]:
    import torch

    heads, kv_heads, dim = (SMOKE_SHAPES if device == "cpu" else SHAPES)[shape]
    per_layer, mask = inputs(batch, heads, kv_heads, dim, slots, layers, device, dtype)
    scaling = dim ** -0.5
    q0, k0, v0 = (t.double() for t in per_layer[0])
    kr, vr = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k0, v0))
    s = (q0 @ kr.transpose(-1, -2)) * scaling
    ref = (s.masked_fill(~mask, float("-inf")).softmax(-1) @ vr).transpose(1, 2)
    bytes_per_call = 2 * batch * kv_heads * slots * dim * per_layer[0][1].element_size()
    cuda = device.startswith("cuda")
    rows: dict[str, Any] = {}
    for name, fn in variants(scaling, cuda).items():
        try:
            o = fn(*per_layer[0], mask)
            err = float((o.double() - ref).abs().max())

            def step():
                for q, k, v in per_layer:
                    fn(q, k, v, mask)
            if cuda:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    step()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                graph.replay()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(reps):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                us = start.elapsed_time(end) * 1e3 / reps / layers
                del graph
            else:
                step()
                t0 = time.perf_counter()
                for _ in range(reps):
                    step()
                us = (time.perf_counter() - t0) * 1e6 / reps / layers
            rows[name] = {"us_per_call": round(us, 2), "gb_per_s": round(bytes_per_call / us / 1e3, 1),
                          "max_abs_err": err}
        except Exception as e:  # a variant that cannot run these inputs: recorded, not timed
            rows[name] = runs.kernel_error(e)
    return {"batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "slots": slots, "layers": layers,
            "kv_mb_per_call": round(bytes_per_call / 1e6, 2), "variants": rows}


def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = ["# Decoding-step attention kernels", "", f"`{m['command']}` on {m['device_name']}, torch {m['torch']}, "
             f"{m['dtype']}, {m['reps']} replays of a graph of {m['layers']} calls.", ""]
    for shape, r in report["shapes"].items():
        lines += [f"## {shape}: batch {r['batch']}, {r['heads']} query heads over {r['kv_heads']} KV heads of "
                  f"{r['head_dim']}, {r['slots']} cache slots ({r['kv_mb_per_call']} MB of K and V per call)", "",
                  "| variant | us per call | GB/s of K and V | max abs err vs float64 |", "|---|---|---|---|"]
        lines += runs.kernel_rows(r["variants"], ["us_per_call", "gb_per_s", "max_abs_err"])
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--slots", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    runs.add_output_arguments(ap, "decode_attention_gpu", "CPU, tiny shapes, float32: seconds (CI)")
    a = ap.parse_args(argv)
    import torch

    if a.smoke:
        a.device, a.batch, a.slots, a.layers, a.reps = "cpu", 3, 40, 2, 2
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    report: dict[str, Any] = {"meta": runs.kernel_meta("decode_attention_gpu.py", argv, a, dtype, layers=a.layers), "shapes": {}}
    for shape in a.shapes.split(","):
        report["shapes"][shape] = measure(shape, a.batch, a.slots, a.layers, a.device, dtype, a.reps)
        print(json.dumps({shape: report["shapes"][shape]}), flush=True)
    runs.save(report, a, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
