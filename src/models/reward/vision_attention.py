"""Packed attention for the Qwen-VL vision towers.

Why: without flash-attn, transformers' vision attention splits the packed patch sequence at
`cu_seqlens` and calls attention once per segment and layer. Qwen2.5-VL cuts every image into
windows of 64 patches, so a batch of 8 images of 1024x768 makes 536 tiny attention calls per
layer; the launch overhead, not the arithmetic, then sets the vision tower's speed.

The vision attention hands `cu_seqlens` to any attention function whose registered name contains
"flash" (`is_flash_attention_requested`). We register two such functions with transformers'
`AttentionInterface` and give one of them to the vision sub-config only (the language model keeps
its own implementation):

- `varlen`: `torch.nn.attention.varlen.varlen_attn`, one flash-attention call for all segments.
  CUDA only, float16/bfloat16 only.
- `packed`: pure torch, any device and dtype: segments of equal length are stacked and run
  through one `scaled_dot_product_attention` call per distinct length (a handful per layer).
  It computes exactly what the per-segment loop computes, so it is the reference for tests and
  the fast path where `varlen` cannot run (CPU, float32).
- `grouped`: when every segment has one length (Qwen3-VL's tower on images of one size: one
  segment per image; Qwen2.5-VL's full-attention layers likewise), the packed sequence is viewed,
  without a copy, as (images, heads, patches, head_dim) and runs as one sdpa call; on Hopper GPUs
  (compute capability 9.x) cuDNN's attention kernel is tried first there. Segments of several
  lengths (Qwen2.5-VL's windows, images of several sizes) go to `varlen` where it runs, else to
  `packed`. On one H200 at Qwen3-VL's shapes (32 images x 3,072 patches, 16 heads of 72) cuDNN's
  kernel took 3.8 ms per layer against flash attention's 6.2 ms (which pads head_dim 72 to 96);
  benchmarks/attention_gpu.py measures it.

`vision_attn` settings: `sdpa` (transformers' own per-segment loop, untouched), `varlen`,
`packed`, `grouped`, `auto` (`grouped` on a CUDA device in float16/bfloat16, else `sdpa`).
"""
from __future__ import annotations

import functools
import logging
from typing import Any

from .errors import JudgeConfigError
from .settings import VISION_ATTN

# Registered names: they must contain "flash" for the vision attention to pass cu_seqlens.
_NAMES = {"varlen": "flash_judge_varlen", "packed": "flash_judge_packed", "grouped": "flash_judge_grouped"}
# `grouped` on a Hopper GPU: the same function, cuDNN's attention kernel tried first.
_GROUPED_CUDNN = "flash_judge_grouped_cudnn"


def varlen_unavailable_reason(device: str, dtype: Any) -> str | None:
    """Why torch's varlen attention cannot run here, or None when it can."""
    import torch

    if not str(device).startswith("cuda"):
        return f"it needs a CUDA device (device is {device})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"it needs float16 or bfloat16 (dtype is {str(dtype).replace('torch.', '')})"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


def resolve_vision_attn(choice: str, device: str, dtype: Any) -> str:
    """`auto` -> `grouped` where varlen runs (a CUDA device, half precision), else `sdpa`; an
    explicit `varlen` that cannot run raises."""
    if choice not in VISION_ATTN:
        raise JudgeConfigError(f"vision_attn: unknown value {choice!r}; known: {', '.join(VISION_ATTN)}")
    reason = varlen_unavailable_reason(device, dtype) if choice in ("auto", "varlen") else None
    if choice == "auto":
        return "sdpa" if reason else "grouped"
    if choice == "varlen" and reason:
        raise JudgeConfigError(f"vision_attn: 'varlen' cannot run: {reason}; use 'auto', 'packed' or 'sdpa'")
    return choice


def apply_vision_attn(model: Any, choice: str, device: str, dtype: Any) -> str:
    """Give the model's vision tower the chosen attention; returns what was chosen."""
    vision_config = getattr(model.config, "vision_config", None)
    current = getattr(vision_config, "_attn_implementation", None) or ""
    if choice == "auto" and "flash" in current:
        return current  # the model was loaded with a flash implementation: it already packs
    chosen = resolve_vision_attn(choice, device, dtype)
    if chosen == "sdpa":
        return chosen
    if vision_config is None:
        raise JudgeConfigError(f"vision_attn: {type(model).__name__} has no vision_config; use vision_attn: sdpa")
    _register()
    # Only the vision sub-config changes: the text model's masks and kernels stay as loaded.
    name = _NAMES[chosen]
    if chosen == "grouped" and _hopper(device):
        name = _GROUPED_CUDNN
    vision_config._attn_implementation_internal = name
    return chosen


def _hopper(device: str) -> bool:
    """A CUDA device of compute capability 9.x, where cuDNN's attention was measured faster."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device))[0] == 9


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(_NAMES["varlen"], _varlen_forward)
    AttentionInterface.register(_NAMES["packed"], _packed_forward)
    AttentionInterface.register(_NAMES["grouped"], _grouped_forward)
    AttentionInterface.register(_GROUPED_CUDNN, functools.partial(_grouped_forward, cudnn_first=True))
    _registered = True


# -- the attention functions (transformers' AttentionInterface signature) --------------------
# query/key/value: (1, heads, tokens, head_dim), all segments packed along tokens.
# Returns ((1, tokens, heads, head_dim), None), as transformers' sdpa_attention_forward does.

def _varlen_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                    cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                    is_causal=False, **kwargs):
    _check_call(query, attention_mask, cu_seq_lens_q, cu_seq_lens_k, is_causal)
    return packed_varlen_attention(query, key, value, cu_seq_lens_q, max_length_q, scaling), None


def _packed_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                    cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                    is_causal=False, **kwargs):
    _check_call(query, attention_mask, cu_seq_lens_q, cu_seq_lens_k, is_causal)
    return packed_attention(query, key, value, cu_seq_lens_q, scaling), None


def _grouped_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                     is_causal=False, cudnn_first=False, **kwargs):
    # cudnn_first: registered as True under _GROUPED_CUDNN (Hopper GPUs)
    _check_call(query, attention_mask, cu_seq_lens_q, cu_seq_lens_k, is_causal)
    return grouped_attention(query, key, value, cu_seq_lens_q, max_length_q, scaling, cudnn_first=cudnn_first), None


def _check_call(query, attention_mask, cu_q, cu_k, is_causal) -> None:
    # These functions serve the vision towers only: bidirectional attention within segments.
    if query.shape[0] != 1 or attention_mask is not None or is_causal or cu_q is None:
        raise RuntimeError("judge vision attention: expected one packed, unmasked, non-causal sequence with "
                           "cu_seqlens (it is only meant for the Qwen-VL vision towers)")
    if cu_k is not None and cu_k is not cu_q and not bool((cu_k == cu_q).all()):
        raise RuntimeError("judge vision attention: query and key segments differ")


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int | None, scaling: float | None):
    """q, k, v: (tokens, heads, head_dim) -> (tokens, heads, head_dim), through torch's varlen_attn."""
    from torch.nn.attention.varlen import varlen_attn

    cu = cu_seqlens.to(device=q.device, dtype=_int32())
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max())
    return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, int(max_seqlen), int(max_seqlen),
                       scale=scaling)


def packed_varlen_attention(query, key, value, cu_seqlens, max_seqlen: int | None, scaling: float | None):
    """varlen_attention in the attention functions' layout: (1, heads, tokens, head_dim) ->
    (1, tokens, heads, head_dim)."""
    return varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                            cu_seqlens, max_seqlen, scaling).unsqueeze(0)


def grouped_attention(query, key, value, cu_seqlens, max_seqlen: int | None, scaling: float | None,
                      cudnn_first: bool = False):
    """query/key/value: (1, heads, tokens, head_dim) -> (1, tokens, heads, head_dim).

    Segments all of one length: one sdpa call on (segments, heads, length, head_dim) views (no
    copy for transformers' layout, whose memory is (tokens, heads, head_dim)). Whether they are is
    known without reading cu_seqlens on the host: segments no longer than max_seqlen that fill
    `tokens` with n * max_seqlen == tokens are all max_seqlen long. Otherwise `varlen` where it
    runs, else `packed`.
    """
    import torch
    import torch.nn.functional as F

    heads, total, dim = query.shape[1], query.shape[2], query.shape[3]
    n = cu_seqlens.shape[0] - 1
    if max_seqlen is not None and n > 0 and n * int(max_seqlen) == total:
        length = int(max_seqlen)

        def view(t):  # (1, heads, n * length, dim) -> (n, heads, length, dim)
            return t[0].transpose(0, 1).reshape(n, length, heads, dim).transpose(1, 2)

        q, k, v = view(query), view(key), view(value)
        if cudnn_first:
            out = sdpa_cudnn_first(q, k, v, scaling, where="vision attention")
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=scaling)
        return out.transpose(1, 2).reshape(1, total, heads, dim)
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        return packed_varlen_attention(query, key, value, cu_seqlens, max_seqlen, scaling)
    return packed_attention(query, key, value, cu_seqlens, scaling)


_cudnn_refused: set[str] = set()  # where cuDNN's kernel failed once in this process: sdpa's own choice there since


def sdpa_cudnn_first(q, k, v, scaling: float | None, attn_mask=None, where: str = "vision attention",
                     fallback=None, **kw):
    """sdpa with cuDNN's attention kernel tried first, until it fails once in this process for
    `where` (then, after one warning, `fallback()` there, by default sdpa's own choice on the same
    inputs). Running out of memory is not a kernel's refusal: it goes up, to the engine (smaller
    batches). kw: sdpa's is_causal, enable_gqa."""
    import torch
    import torch.nn.functional as F

    if where not in _cudnn_refused:
        if torch.compiler.is_compiling():
            return cudnn_first_sdpa(q, k, v, scaling, attn_mask, **kw)
        try:
            return cudnn_first_sdpa(q, k, v, scaling, attn_mask, **kw)
        except RuntimeError as e:  # a shape cuDNN turns down when it runs
            if "out of memory" in str(e):
                raise
            _cudnn_gave_up(e, where)
    if fallback is not None:
        return fallback()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scaling, **kw)


def cudnn_first_sdpa(q, k, v, scaling: float | None, attn_mask=None, **kw):
    """sdpa with cuDNN's attention kernel first (then flash, memory-efficient, math), only for
    this call: the process's kernel priority is left as found. kw: sdpa's is_causal, enable_gqa."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scaling, **kw)


def _cudnn_gave_up(e: BaseException, where: str) -> None:
    _cudnn_refused.add(where)
    logging.getLogger("src.models.reward.engine").warning(
        "%s: cuDNN's kernel failed (%s: %s); sdpa's own kernel choice from now on there (the same function)",
        where, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")


def packed_attention(query, key, value, cu_seqlens, scaling: float | None):
    """query/key/value: (1, heads, tokens, head_dim) -> (1, tokens, heads, head_dim).

    Attention within each segment [cu[i], cu[i+1]); segments of the same length run as one batch
    of sdpa, so the number of calls is the number of distinct lengths, not of segments.
    """
    import torch
    import torch.nn.functional as F

    bounds = [int(x) for x in cu_seqlens.tolist()]
    heads, total, dim = query.shape[1], query.shape[2], query.shape[3]
    if bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise RuntimeError(f"judge vision attention: cu_seqlens {bounds[:4]}... do not tile {total} tokens")
    q, k, v = query[0], key[0], value[0]  # (heads, tokens, dim)
    out = torch.empty((total, heads, dim), dtype=query.dtype, device=query.device)
    by_len: dict[int, list[int]] = {}
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            by_len.setdefault(b - a, []).append(a)
    for length, starts in by_len.items():
        idx = (torch.tensor(starts, device=query.device)[:, None]
               + torch.arange(length, device=query.device)[None, :]).reshape(-1)
        n = len(starts)

        def gather(t):  # (heads, tokens, dim) -> (n, heads, length, dim)
            return t.index_select(1, idx).reshape(heads, n, length, dim).transpose(0, 1)

        o = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), scale=scaling)
        out.index_copy_(0, idx, o.transpose(1, 2).reshape(n * length, heads, dim))
    return out.unsqueeze(0)


def reference_attention(query, key, value, cu_seqlens, scaling: float | None):
    """The per-segment loop transformers runs without flash (one sdpa call per segment), in the
    same layout as packed_attention: for tests and equivalence checks."""
    import torch
    import torch.nn.functional as F

    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    outs = [F.scaled_dot_product_attention(q, k, v, scale=scaling).transpose(1, 2)
            for q, k, v in zip(*(torch.split(t, lengths, dim=2) for t in (query, key, value)))]
    return torch.cat(outs, dim=1)


def _int32():
    import torch

    return torch.int32
