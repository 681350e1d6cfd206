"""The language model's attention over the prompts (the prefill), with cuDNN's kernel first on
Hopper GPUs.

Why: a logits call's language model attends over each whole prompt once per layer. transformers'
sdpa function leaves the kernel to torch's own order, which on the device's torch picks flash
attention 2 for prompts of one length (no mask) and the memory-efficient kernel for padded ones (a
mask). On a Hopper GPU cuDNN's kernel (the one the vision tower and the decoding step already take
first, vision_attention.py and fast_decode.py) is built for that chip's tensor cores.

What runs is the same function as transformers' `sdpa_attention_forward`: softmax(q k^T) v per
query head, causal where no mask is given, the key and value heads shared by their query heads
(`enable_gqa`, no copy of them per head). One change to a mask, which changes no output that is
read: a query that may see no key at all (a padding position before a left-padded prompt) is let
see every key, since a kernel may give such a row NaN where torch's own kernels give 0, and a NaN
in a padding position would reach the prompt's tokens through the next layer (0 x NaN in p v).
Nothing reads a padding position's output: every real token's mask excludes it.

One step (a query of one token, the decoding step) and anything transformers' function handles
that this does not (a position bias) go to transformers' function unchanged. A cuDNN failure
(a shape it turns down) falls back to transformers' function for the rest of the process, with
one warning; running out of memory goes up to the engine. Used on a CUDA device of compute
capability 9.x in float16/bfloat16, where the text model runs sdpa.
"""
from __future__ import annotations

from typing import Any

NAME = "judge_prompt_sdpa_cudnn"  # registered with transformers' attention and mask interfaces
_WHERE = "prompt attention"
_registered = False


def apply_text_attention(model: Any, device: str, dtype: Any) -> str:
    """Give the text model cuDNN-first prompt attention where it applies (a Hopper GPU, half
    precision, the text model on sdpa); returns the text model's attention implementation."""
    import torch

    from .vision_attention import _hopper

    text_config = getattr(model.config, "text_config", model.config)
    current = getattr(text_config, "_attn_implementation", None) or ""
    if current != "sdpa" or dtype not in (torch.float16, torch.bfloat16) or not _hopper(str(device)):
        return current
    register()
    text_config._attn_implementation_internal = NAME
    return NAME


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, prompt_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the masks sdpa takes, made as for sdpa
    _registered = True


def prompt_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """transformers' attention signature: query (batch, heads, q, head_dim), key and value (batch,
    kv_heads, k, head_dim), attention_mask None or (batch, 1, q, k) boolean -> ((batch, q, heads,
    head_dim), None)."""
    import torch

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from .vision_attention import _cudnn_refused, sdpa_cudnn_first

    def transformers_attention():
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)[0]

    mask = attention_mask
    if (query.shape[2] == 1 or _WHERE in _cudnn_refused or kwargs.get("position_bias") is not None
            or kwargs.get("output_attentions") or dropout or (mask is not None and mask.dtype != torch.bool)):
        return transformers_attention(), None
    causal = mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    k, v = key, value
    if causal and k.shape[2] > query.shape[2]:  # a prefill into an empty static cache, as transformers crops it
        k, v = k[:, :, :query.shape[2]], v[:, :, :query.shape[2]]
    out = sdpa_cudnn_first(query, k, v, scaling, attn_mask=None if mask is None else see_something(mask),
                           where=_WHERE, is_causal=bool(causal), enable_gqa=query.shape[1] != k.shape[1],
                           # transformers' layout (batch, q, heads, head_dim) back to sdpa's
                           fallback=lambda: transformers_attention().transpose(1, 2))
    return out.transpose(1, 2).contiguous(), None


def see_something(mask):
    """A boolean attention mask (..., q, k) in which a query that sees no key sees every key."""
    return mask | ~mask.any(dim=-1, keepdim=True)
