"""Greedy decoding with a static KV cache and, on CUDA, a CUDA graph of the decoding step.

Why: transformers' generate() runs each new token of a 7B Qwen-VL judge as ~1,300 small kernel
launches from Python; on an H100 a step takes ~34 ms of which the GPU is busy ~11 ms (measured,
benchmarks/NOTES.md). torch.compile of generate did not help there (static cache: no gain; per-layer
compile: recompiles per cache layer). Replaying one captured CUDA graph per step removes the launch
cost: the Python loop only calls replay().

What it computes: exactly transformers' greedy search for the Qwen2-VL / Qwen2.5-VL families (same prefill forward, same positions, same KV cache semantics), with the logits
processors a judge's greedy decoding meets: min_new_tokens and repetition_penalty. Anything else
(sampling, other processors in the checkpoint's generation_config) is refused by
`unsupported_reason`, and the engine then uses generate(). On the CPU the same step runs eagerly,
which is how tests compare it with generate() token for token.

State between steps lives in tensors that are updated in place (token, positions, attention mask,
step counter, finished rows, seen tokens, output buffer), so one captured step replays correctly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Qwen3-VL's text model builds its own mask from a 2D one and does not take the prepared mask.
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

# generation_config fields that add logits processors this decoder does not implement; with their
# neutral values.
_NEUTRAL = {"no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "suppress_tokens": (None,),
            "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
            "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
            "encoder_repetition_penalty": (None, 1.0), "renormalize_logits": (None, False),
            "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "min_length": (None, 0),
            "max_length": None}  # max_length: generate() uses max_new_tokens when both are set

_REPLAY_CHECK_EVERY = 16  # replays between checks that every row has finished (each check syncs)
_DECODE_ATTN = "judge_decode_gqa"  # the text attention while decoding (registered with transformers)


def unsupported_reason(model: Any, temperature: float, num_samples: int) -> str | None:
    """Why this decoder cannot stand in for generate() here, or None."""
    if temperature > 0 or num_samples != 1:
        return "it decodes greedily only (temperature 0, num_samples 1)"
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    gc = model.generation_config
    for name, neutral in _NEUTRAL.items():
        if neutral is None:
            continue
        if getattr(gc, name, None) not in neutral:
            return f"the checkpoint's generation_config sets {name}={getattr(gc, name)!r}"
    return None


@dataclass
class _State:
    tok: Any          # (B, 1) the token fed to the next step
    pos: Any          # (3, B, 1) its rotary positions
    mask: Any         # (B, 1, 1, cache_len) bool: which cache slots each row attends to
    step: Any         # () number of tokens generated so far
    unfinished: Any   # (B,) bool
    seen: Any         # (B, vocab) bool, tokens already in the sequence (repetition penalty) or None
    out: Any          # (B, max_new_tokens) generated tokens
    eos: Any          # (n_eos,) long
    pad: int
    min_new: int
    penalty: float


def greedy_generate(model: Any, inputs: Any, *, max_new_tokens: int, min_new_tokens: int = 0,
                    eos_token_ids: list[int], pad_token_id: int, repetition_penalty: float | None = None,
                    cuda_graph: bool = True, additive_mask: bool = False, cache_align: int = 64,
                    timings: dict | None = None) -> Any:
    """The new tokens, (batch, n <= max_new_tokens): generate(do_sample=False)'s answer, rows that
    finished early padded with pad_token_id. `timings`, if given, receives where the time went."""

    import torch
    from transformers import StaticCache

    ids = inputs["input_ids"]
    batch, prompt_len = ids.shape
    device = ids.device
    # Cache length rounded up: aligned rows let attention kernels take the mask without padding it.
    cache_len = -(-(prompt_len + max_new_tokens) // cache_align) * cache_align
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    attn = inputs.get("attention_mask")
    if attn is None:
        attn = torch.ones_like(ids)
    out = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1, :].float()
    deltas = getattr(model.model, "rope_deltas", None)
    if deltas is None:
        deltas = torch.zeros(batch, 1, dtype=torch.long, device=device)
    # generate(): text position of a new token = number of real tokens before it; rotary
    # position = that + the prompt's rope delta (images take fewer positions than tokens).
    first_pos = attn.long().sum(-1, keepdim=True) + deltas
    penalty = float(repetition_penalty or 1.0)
    vocab = logits.shape[-1]
    st = _State(
        tok=torch.empty(batch, 1, dtype=torch.long, device=device),
        pos=first_pos.view(1, batch, 1).expand(3, batch, 1).contiguous(),
        mask=torch.zeros(batch, 1, 1, cache_len, dtype=torch.bool, device=device),
        step=torch.zeros((), dtype=torch.long, device=device),
        unfinished=torch.ones(batch, dtype=torch.bool, device=device),
        seen=(torch.zeros(batch, vocab, dtype=torch.bool, device=device).scatter_(1, ids, True)
              if penalty != 1.0 else None),
        out=torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device),
        eos=torch.tensor(eos_token_ids, dtype=torch.long, device=device),
        pad=pad_token_id, min_new=min_new_tokens, penalty=penalty)
    st.mask[:, 0, 0, :prompt_len] = attn.bool()
    _pick(logits, st)
    # The mask the layers see: the bool one, or an additive one kept in step with it.
    dtype = next(model.parameters()).dtype
    add = torch.zeros(st.mask.shape, dtype=dtype, device=device) if additive_mask else None
    neg = torch.finfo(dtype).min
    steps = max_new_tokens - 1
    lm, head = model.model.language_model, model.lm_head
    slot = cache.layers[0]  # every layer writes the same slot; its counter says which

    def step() -> None:
        st.mask.index_fill_(3, slot.cumulative_length.view(1), True)  # the new token sees itself
        mask = st.mask
        if add is not None:
            add.copy_(st.mask.logical_not().to(add.dtype) * neg)
            mask = add
        h = lm(input_ids=st.tok, attention_mask={"full_attention": mask}, position_ids=st.pos,
               past_key_values=cache, use_cache=True).last_hidden_state
        _pick(head(h[:, -1, :]).float(), st)
        st.pos.add_(1)

    done = 0
    use_graph = cuda_graph and device.type == "cuda" and steps > 3
    _register_decode_attention()
    text_config = lm.config
    plain_attn = text_config._attn_implementation
    text_config._attn_implementation_internal = _DECODE_ATTN
    try:
        done = _decode(step, st, steps, use_graph, device, timings)
    finally:
        text_config._attn_implementation_internal = plain_attn
    n = int(st.step)
    return st.out[:, :n]


def _decode(step, st: _State, steps: int, use_graph: bool, device, timings: dict | None) -> int:
    import time

    import torch

    done = 0
    if use_graph:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up steps (real ones) before capture, as CUDA graphs need
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        done = 2
        t0 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()  # recorded, not run
        torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        while done < steps:
            graph.replay()
            done += 1
            if done % _REPLAY_CHECK_EVERY == 0 and not bool(st.unfinished.any()):
                break
        torch.cuda.synchronize(device)
        if timings is not None:
            timings.update(capture_s=round(t1 - t0, 4), replays=done - 2,
                           replay_ms=round((time.perf_counter() - t1) / max(done - 2, 1) * 1000, 3))
        del graph
    else:
        while done < steps and bool(st.unfinished.any()):
            step()
            done += 1
    return done


_attn_registered = False


def _register_decode_attention() -> None:
    global _attn_registered
    if not _attn_registered:
        from transformers import AttentionInterface

        AttentionInterface.register(_DECODE_ATTN, _decode_gqa_attention)
        _attn_registered = True


def _decode_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """One new token per row against a grouped-query KV cache, without copying the cache per head.

    transformers' sdpa path repeats K and V for every query head when a mask is given (it must,
    for torch's fused kernels); for one query token that copy is most of the step (16 of 29 ms on
    a 7B judge at batch 32, measured). Here the query heads that share a KV head become that
    head's "query length": the same softmax(q k^T) v per query head, the cache read once.
    """
    import torch.nn.functional as F

    b, h, q_len, d = query.shape
    hkv = key.shape[1]
    if q_len != 1 or h % hkv:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    # Query head i uses KV head i // (h / hkv), as transformers' repeat_kv lays them out.
    q = query.reshape(b, hkv, h // hkv, d)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, h, 1, d).transpose(1, 2), None


def _pick(logits, st: _State) -> None:
    """One greedy choice with generate()'s processors, written into the state in place."""
    import torch

    if st.seen is not None:  # RepetitionPenaltyLogitsProcessor
        logits = torch.where(st.seen, torch.where(logits < 0, logits * st.penalty, logits / st.penalty), logits)
    if st.min_new > 0:  # MinNewTokensLengthLogitsProcessor: no end before min_new tokens
        eos_scores = logits[:, st.eos]
        logits[:, st.eos] = torch.where(st.step < st.min_new, torch.full_like(eos_scores, float("-inf")), eos_scores)
    nxt = logits.argmax(dim=-1)
    nxt = torch.where(st.unfinished, nxt, torch.full_like(nxt, st.pad))
    st.unfinished &= ~torch.isin(nxt, st.eos)
    if st.seen is not None:
        st.seen.scatter_(1, nxt[:, None], True)
    st.out.index_copy_(1, st.step.view(1), nxt[:, None])
    st.tok.copy_(nxt[:, None])
    st.step.add_(1)
