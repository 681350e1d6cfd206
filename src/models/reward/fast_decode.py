"""Decoding with a static KV cache and, on CUDA, a CUDA graph of the decoding step.

Why: transformers' generate() runs each new token of a 7B Qwen-VL judge as ~1,300 small kernel
launches from Python; on an H100 a step takes ~34 ms of which the GPU is busy ~11 ms (measured,
benchmarks/NOTES.md). torch.compile of generate did not help there (static cache: no gain; per-layer
compile: recompiles per cache layer). Replaying one captured CUDA graph per step removes the launch
cost: the Python loop only calls replay().

What it computes: exactly transformers' generate() for Qwen2-VL, Qwen2.5-VL, Qwen3-VL and
Qwen3-VL-MoE (same prefill forward, same positions, same KV cache semantics), greedy or sampled,
with the logits processors a judge meets: min_new_tokens, repetition_penalty, temperature, top_k,
top_p, and num_return_sequences (`num_samples`). The generation settings are merged exactly as
generate() merges them (the call's, then the checkpoint's generation_config, then transformers'
defaults such as top_k 50); anything else that would add a processor is refused by `plan_for`,
and the engine then uses generate(). Sampling draws as torch.multinomial does for one sample
(probabilities over exponential noise, argmax), from the same generator, so on the CPU a seeded
call gives generate()'s tokens; the draw needs no host sync, so it can live in the graph.
Several samples per prompt: the prompt runs once and its KV cache is copied to each sample's row
(generate() runs the prompt, images included, once per sample). On the CPU the same step runs
eagerly, which is how tests compare it with generate() token for token.

The Qwen3-VL-MoE experts run through transformers' `grouped_mm` experts path (sorted by expert,
offsets from histc) with experts.py's combine: fixed shapes and no host sync, so the experts are
inside the graph too.

State between steps lives in tensors that are updated in place (token, positions, attention mask,
step counter, finished rows, seen tokens, output buffer), so one captured step replays correctly.

Continuous batching, where a finished row leaves and a new prompt takes its slot, is
`row_decode.py`: this module's prefill, plan and decoding attention, with a position and a step
count per row.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# Qwen3-VL's text models take no per-layer-type mask dict; they pass a prepared 4D mask through.
_MASK_AS_DICT = ("qwen2_vl", "qwen2_5_vl")

# Merged generation settings that would add a logits processor or change the search this decoder
# does not implement; with their neutral values.
_NEUTRAL = {"no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
            "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
            "forced_eos_token_id": (None,), "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
            "encoder_repetition_penalty": (None, 1.0), "renormalize_logits": (None, False),
            "remove_invalid_values": (None, False), "guidance_scale": (None, 1, 1.0), "min_length": (None, 0),
            "num_beams": (None, 1), "watermarking_config": (None,), "stop_strings": (None,),
            "assistant_model": (None,), "prompt_lookup_num_tokens": (None,)}
# Only where sampling: the warpers beyond temperature, top_k and top_p.
_NEUTRAL_SAMPLING = {"min_p": (None, 0, 0.0), "typical_p": (None, 1, 1.0), "epsilon_cutoff": (None, 0, 0.0),
                     "eta_cutoff": (None, 0, 0.0), "top_h": (None,)}

_REPLAY_CHECK_EVERY = 16  # replays between checks that every row has finished (each check syncs)
_DECODE_ATTN = "judge_decode_gqa"  # the text attention while decoding (registered with transformers)
_DECODE_ATTN_CUDNN = "judge_decode_gqa_cudnn"  # the same, cuDNN's kernel first (Hopper GPUs, half precision)


@dataclass(frozen=True)
class Plan:
    """What generate() would do with these settings, as this decoder runs it."""
    max_new_tokens: int
    min_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    repetition_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_return_sequences: int = 1


def plan_for(model: Any, gen_kwargs: dict[str, Any]) -> tuple[Plan | None, str | None]:
    """(plan, None) when this decoder computes what model.generate(**inputs, **gen_kwargs) would,
    else (None, the reason)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return None, f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    try:  # generate()'s own merge: the call's settings > the checkpoint's generation_config > defaults
        gc, _ = model._prepare_generation_config(None, **gen_kwargs)
    except Exception as e:  # a transformers without this helper: do not guess its defaults
        return None, f"transformers' generation settings could not be read ({type(e).__name__}: {e})"
    checks = dict(_NEUTRAL, **(_NEUTRAL_SAMPLING if gc.do_sample else {}))
    for name, neutral in checks.items():
        if getattr(gc, name, None) not in neutral:
            return None, f"the generation settings set {name}={getattr(gc, name)!r}"
    if gc.max_new_tokens is None:
        return None, "max_new_tokens is not set"
    eos = gc.eos_token_id if isinstance(gc.eos_token_id, (list, tuple)) else [gc.eos_token_id]
    eos = tuple(int(e) for e in eos if e is not None)
    if not eos:
        return None, "the judge has no end-of-answer token"
    pad = gc.pad_token_id if gc.pad_token_id is not None else eos[0]
    sampling = dict(do_sample=True, temperature=float(gc.temperature if gc.temperature is not None else 1.0),
                    top_k=int(gc.top_k or 0), top_p=float(gc.top_p if gc.top_p is not None else 1.0)) \
        if gc.do_sample else {}
    return Plan(max_new_tokens=int(gc.max_new_tokens), min_new_tokens=int(gc.min_new_tokens or 0),
                eos_token_ids=eos, pad_token_id=int(pad), repetition_penalty=float(gc.repetition_penalty or 1.0),
                num_return_sequences=int(gc.num_return_sequences or 1), **sampling), None


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
    plan: Plan


def greedy_generate(model: Any, inputs: Any, *, max_new_tokens: int, min_new_tokens: int = 0,
                    eos_token_ids: list[int], pad_token_id: int, repetition_penalty: float | None = None,
                    cuda_graph: bool = True, cache_align: int = 64, timings: dict | None = None) -> Any:
    """generate(do_sample=False)'s new tokens (see `generate_tokens`)."""
    plan = Plan(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, eos_token_ids=tuple(eos_token_ids),
                pad_token_id=pad_token_id, repetition_penalty=float(repetition_penalty or 1.0))
    return generate_tokens(model, inputs, plan, cuda_graph=cuda_graph, cache_align=cache_align, timings=timings)


def generate_tokens(model: Any, inputs: Any, plan: Plan, *, cuda_graph: bool = True, cache_align: int = 64,
                    timings: dict | None = None) -> Any:
    """The new tokens, (batch x num_return_sequences, n <= max_new_tokens), rows in generate()'s
    order (each prompt's samples together); rows that finished early are padded with the pad
    token. `timings`, if given, receives where the time went."""

    import torch

    ids = inputs["input_ids"]
    batch, prompt_len = ids.shape
    device = ids.device
    k = plan.num_return_sequences
    max_new_tokens = plan.max_new_tokens
    # Cache length rounded up: aligned rows let attention kernels take the mask without padding it.
    cache_len = -(-(prompt_len + max_new_tokens) // cache_align) * cache_align
    cache, attn, logits, deltas = _prefill(model, inputs, cache_len)
    if k > 1:  # each prompt's samples: copies of its cache, rows in generate()'s order
        for layer in cache.layers:
            layer.keys = layer.keys.repeat_interleave(k, dim=0)
            layer.values = layer.values.repeat_interleave(k, dim=0)
            layer.batch_size = layer.keys.shape[0]
        logits, ids, attn, deltas = (t.repeat_interleave(k, dim=0) for t in (logits, ids, attn, deltas))
        batch *= k
    # generate(): text position of a new token = number of real tokens before it; rotary
    # position = that + the prompt's rope delta (images take fewer positions than tokens).
    first_pos = attn.long().sum(-1, keepdim=True) + deltas
    vocab = logits.shape[-1]
    st = _State(
        tok=torch.empty(batch, 1, dtype=torch.long, device=device),
        pos=first_pos.view(1, batch, 1).expand(3, batch, 1).contiguous(),
        mask=torch.zeros(batch, 1, 1, cache_len, dtype=torch.bool, device=device),
        step=torch.zeros((), dtype=torch.long, device=device),
        unfinished=torch.ones(batch, dtype=torch.bool, device=device),
        seen=(torch.zeros(batch, vocab, dtype=torch.bool, device=device).scatter_(1, ids, True)
              if plan.repetition_penalty != 1.0 else None),
        out=torch.full((batch, max_new_tokens), plan.pad_token_id, dtype=torch.long, device=device),
        eos=torch.tensor(plan.eos_token_ids, dtype=torch.long, device=device),
        plan=plan)
    st.mask[:, 0, 0, :prompt_len] = attn.bool()
    _pick(logits, st)
    del logits
    steps = max_new_tokens - 1
    lm, head = model.model.language_model, model.lm_head
    as_dict = model.config.model_type in _MASK_AS_DICT
    slot = cache.layers[0]  # every layer writes the same slot; its counter says which
    cache_arg = {cache_kwarg(lm): cache}

    def step() -> None:
        st.mask.index_fill_(3, slot.cumulative_length.view(1), True)  # the new token sees itself
        mask = {"full_attention": st.mask} if as_dict else st.mask
        h = lm(input_ids=st.tok, attention_mask=mask, position_ids=st.pos, use_cache=True, **cache_arg).last_hidden_state
        _pick(head(h[:, -1, :]).float(), st)
        st.pos.add_(1)

    use_graph = cuda_graph and device.type == "cuda" and steps > 3
    text_config = lm.config
    plain_attn = text_config._attn_implementation
    text_config._attn_implementation_internal = decode_attention(device, model.dtype)
    try:
        _decode(step, st, steps, use_graph, device, timings)
    finally:
        text_config._attn_implementation_internal = plain_attn
    n = int(st.step)
    return st.out[:, :n]


def _prefill(model: Any, inputs: Any, cache_len: int) -> tuple[Any, Any, Any, Any]:
    """The prompts' forward pass into a new static cache of `cache_len` slots: (cache, attention
    mask, last-position logits in float32, rope deltas (batch, 1))."""
    import torch
    from transformers import StaticCache

    ids = inputs["input_ids"]
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    counters_on(cache, ids.device)
    attn = inputs.get("attention_mask")
    if attn is None:
        attn = torch.ones_like(ids)
    extra = {}
    # A batch without images (a rubric part that shows none): the model's forward would leave the
    # rope deltas of its last batch with images on the model (read below) and number the tokens
    # from the left edge, padding included. generate() gives such a batch its text positions from
    # the attention mask, for the text and the three rope sections, and deltas of zero.
    text_only = inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None
    if text_only and inputs.get("position_ids") is None:
        pos = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 0)
        extra["position_ids"] = pos[None].expand(4, *pos.shape)
    out = model(**inputs, **extra, **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1, :].float()
    del out
    deltas = None if text_only else getattr(model.model, "rope_deltas", None)
    if deltas is None:
        deltas = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
    return cache, attn, logits, deltas


def counters_on(cache: Any, device: Any) -> None:
    """Each static layer's token counter made on `device` before the prefill. transformers makes
    it on the CPU and moves it at the layer's first write, a copy from pageable memory, which
    waits for everything queued on the GPU (the vision tower, the layers before, a batch still
    decoding): one host sync per layer and prefill, 36 on Qwen3-VL-8B. A new cache's counters are
    zero, so a zero made on the device (a fill, queued like any kernel) is the same value."""
    import torch

    for layer in getattr(cache, "layers", ()):
        count = getattr(layer, "cumulative_length", None)
        if isinstance(count, torch.Tensor) and count.device != torch.device(device):
            layer.cumulative_length = torch.zeros_like(count, device=device)


_cache_kwargs: dict[type, str] = {}


def cache_kwarg(module: Any) -> str:
    """The name under which module's forward takes the KV cache: `past_key_values`, or `cache` in
    transformers releases that renamed it (5.2x, where the old name warns and is to go in 5.40)."""
    cls = type(module)
    if cls not in _cache_kwargs:
        import inspect

        try:
            params = inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):
            params = {}
        _cache_kwargs[cls] = "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"
    return _cache_kwargs[cls]


def _decode(step, st: _State, steps: int, use_graph: bool, device, timings: dict | None) -> None:
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


_attn_registered = False


def decode_attention(device, dtype) -> str:
    """The attention the text model runs while decoding (registered with transformers on first
    use): cuDNN's kernel first on a Hopper GPU in half precision (the step's attention measured
    1.25x (8B) to 1.6x (MoE) faster there than sdpa's own choice, benchmarks/NOTES.md), else sdpa's
    own choice; the same function either way."""
    import torch

    from .vision_attention import _hopper

    global _attn_registered
    if not _attn_registered:
        from transformers import AttentionInterface

        AttentionInterface.register(_DECODE_ATTN, _decode_gqa_attention)
        AttentionInterface.register(_DECODE_ATTN_CUDNN, _decode_gqa_attention_cudnn)
        _attn_registered = True
    half = dtype in (torch.float16, torch.bfloat16)
    return _DECODE_ATTN_CUDNN if half and _hopper(str(device)) else _DECODE_ATTN


def _decode_gqa_attention_cudnn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    return _decode_gqa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 cudnn_first=True, **kwargs)


def _decode_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          cudnn_first: bool = False, **kwargs):
    """One new token per row against a grouped-query KV cache, without copying the cache per head.

    transformers' sdpa path repeats K and V for every query head when a mask is given (it must,
    for torch's fused kernels); for one query token that copy is most of the step (16 of 29 ms on
    a 7B judge at batch 32, measured). Here the query heads that share a KV head become that
    head's "query length": the same softmax(q k^T) v per query head, the cache read once.
    cudnn_first: cuDNN's kernel tried first (until it fails once in the process): with a mask,
    sdpa's own order picks the memory-efficient kernel, ~60% of the bandwidth cuDNN's reaches here.
    """
    import torch.nn.functional as F

    from .vision_attention import sdpa_cudnn_first

    b, h, q_len, d = query.shape
    hkv = key.shape[1]
    if q_len != 1 or h % hkv:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    # Query head i uses KV head i // (h / hkv), as transformers' repeat_kv lays them out.
    q = query.reshape(b, hkv, h // hkv, d)
    if cudnn_first:
        out = sdpa_cudnn_first(q, key, value, scaling, attn_mask=attention_mask, where="decoding attention")
    else:
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, h, 1, d).transpose(1, 2), None


def _pick(logits, st: _State) -> None:
    """One choice per row with generate()'s processors, in its order, written into the state in place."""
    import torch

    p = st.plan
    if st.seen is not None:  # RepetitionPenaltyLogitsProcessor
        logits = torch.where(st.seen, torch.where(logits < 0, logits * p.repetition_penalty,
                                                  logits / p.repetition_penalty), logits)
    if p.min_new_tokens > 0:  # MinNewTokensLengthLogitsProcessor: no end before min_new tokens
        eos_scores = logits[:, st.eos]
        logits[:, st.eos] = torch.where(st.step < p.min_new_tokens, torch.full_like(eos_scores, float("-inf")),
                                        eos_scores)
    if p.do_sample:
        if p.temperature != 1.0:  # TemperatureLogitsWarper
            logits = logits / p.temperature
        if p.top_k:  # TopKLogitsWarper
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1]))[0][..., -1, None]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:  # TopPLogitsWarper
            sorted_logits, sorted_idx = torch.sort(logits, descending=False)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cum <= (1 - p.top_p)
            drop[..., -1:] = False
            logits = logits.masked_fill(drop.scatter(1, sorted_idx, drop), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        # torch.multinomial(probs, 1), as it computes one sample (argmax of p / Exp(1) noise),
        # without its validity checks, which read the tensor back to the host.
        nxt = (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)
    else:
        nxt = logits.argmax(dim=-1)
    nxt = torch.where(st.unfinished, nxt, torch.full_like(nxt, p.pad_token_id))
    st.unfinished &= ~torch.isin(nxt, st.eos)
    if st.seen is not None:
        st.seen.scatter_(1, nxt[:, None], True)
    st.out.index_copy_(1, st.step.view(1), nxt[:, None])
    st.tok.copy_(nxt[:, None])
    st.step.add_(1)
