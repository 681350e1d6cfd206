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
offsets from histc): fixed shapes and no host sync, so the experts are inside the graph too.

State between steps lives in tensors that are updated in place (token, positions, attention mask,
step counter, finished rows, seen tokens, output buffer), so one captured step replays correctly.
"""
from __future__ import annotations

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

    def step() -> None:
        st.mask.index_fill_(3, slot.cumulative_length.view(1), True)  # the new token sees itself
        mask = {"full_attention": st.mask} if as_dict else st.mask
        h = lm(input_ids=st.tok, attention_mask=mask, position_ids=st.pos,
               past_key_values=cache, use_cache=True).last_hidden_state
        _pick(head(h[:, -1, :]).float(), st)
        st.pos.add_(1)

    use_graph = cuda_graph and device.type == "cuda" and steps > 3
    _register_decode_attention()
    text_config = lm.config
    plain_attn = text_config._attn_implementation
    text_config._attn_implementation_internal = _DECODE_ATTN
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
    attn = inputs.get("attention_mask")
    if attn is None:
        attn = torch.ones_like(ids)
    out = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1, :].float()
    del out
    deltas = getattr(model.model, "rope_deltas", None)
    if deltas is None:
        deltas = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
    return cache, attn, logits, deltas


def _decode(step, st: _State, steps: int, use_graph: bool, device, timings: dict | None) -> None:
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


# -- continuous batching --------------------------------------------------------------------------

_JOIN_CHECK_EVERY = 8  # replays between looks for finished rows (each look syncs with the GPU)
# Processor outputs laid end to end when prompts form one batch (one entry per image, not per prompt).
_CONCAT_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def continuous_applies(plan: Plan) -> str | None:
    """None when `generate_continuous` gives each prompt the tokens it gets decoded alone, else
    why not: a sampled row's draws depend on the rows beside it (one generator for the batch)."""
    if plan.do_sample:
        return "sampling draws from one generator shared by the batch's rows"
    if plan.num_return_sequences != 1:
        return "several answers per prompt"
    return None


def stack_inputs(rows: list[Any], pad_token_id: int) -> Any:
    """One batch from single prompts' processor outputs, laid out as the processor lays out a
    left-padded batch: per-token tensors (input_ids, attention_mask, mm_token_type_ids) padded on
    the left (input_ids with the pad token, the others with 0), the images' tensors (pixel_values,
    image_grid_thw) concatenated in prompt order. Any other key is refused rather than guessed."""
    import torch
    import torch.nn.functional as F
    from transformers import BatchFeature

    if len(rows) == 1:
        return rows[0]
    width = max(r["input_ids"].shape[1] for r in rows)
    out = {}
    for key in rows[0].keys():
        vals = [r[key] for r in rows]
        if key in _CONCAT_KEYS:
            out[key] = torch.cat(vals)
        elif all(v.dim() == 2 and v.shape == r["input_ids"].shape for v, r in zip(vals, rows)):
            if any(v.shape[0] != 1 for v in vals):
                raise ValueError("stack_inputs: each processor output must hold one prompt")
            fill = pad_token_id if key == "input_ids" else 0
            out[key] = torch.cat([F.pad(v, (width - v.shape[1], 0), value=fill) for v in vals])
        else:
            raise ValueError(f"stack_inputs: the processor output {key!r} is neither per token nor per image")
    return BatchFeature(out)


def generate_continuous(model: Any, first: Any, more: list[Any], plan: Plan, *, limits: list[int] | None = None,
                        cuda_graph: bool = True, cache_align: int = 64, check_every: int | None = None,
                        min_join: int = 1, before_join: Any = None, timings: dict | None = None) -> list[Any]:
    """Greedy decoding where a finished row leaves the batch and the next prompts take the free slots.

    `first`: the processor's inputs (on the device) of the prompts that start, one slot each;
    `more`: the inputs of the prompts that join as slots free up, one prompt each (on the CPU or
    the device), in order. `limits`: each prompt's own max_new_tokens (<= plan.max_new_tokens),
    first's then more's. Returns each prompt's new tokens (a 1-D CPU tensor, up to and including
    the end-of-answer token), in the same order. The prompts that fill the slots free at one look
    join as one batch (`stack_inputs`); `before_join(indices)`, if given, returns the inputs of
    those prompts of `more` as one batch on the device (the engine's hook: stream hand-over,
    vision reuse). See `run_continuous` for why the tokens are those of each prompt decoded alone.
    """
    import torch

    n_total = first["input_ids"].shape[0] + len(more)
    limits = list(limits) if limits is not None else [plan.max_new_tokens] * n_total
    if len(limits) != n_total or any(not 1 <= m <= plan.max_new_tokens for m in limits):
        raise ValueError("limits: one per prompt, each in 1..max_new_tokens")
    slots = n_total - len(more)
    device = first["input_ids"].device
    taken = [0]

    def take(n: int):
        idx = list(range(taken[0], min(taken[0] + n, len(more))))
        if not idx:
            return None
        taken[0] += len(idx)
        inputs = before_join(idx) if before_join is not None else \
            stack_inputs([more[i] for i in idx], plan.pad_token_id).to(device)
        return inputs, [limits[slots + i] for i in idx]

    results: list[Any] = [None] * n_total
    with torch.inference_mode():
        run_continuous(model, first, limits[:slots], take, plan, on_done=results.__setitem__,
                       max_new=max(limits), cuda_graph=cuda_graph, cache_align=cache_align,
                       check_every=check_every, min_join=min_join, timings=timings)
    return results


def run_continuous(model: Any, first: Any, first_limits: list[int], take: Any, plan: Plan, *, on_done: Any,
                   max_new: int | None = None, cuda_graph: bool = True, cache_align: int = 64,
                   check_every: int | None = None, min_join: int = 1, timings: dict | None = None) -> None:
    """The continuous decode. `first` (device inputs) start, one slot each, with `first_limits`
    (each prompt's max_new_tokens); whenever slots are free, `take(n)` is asked for up to n next
    prompts and returns (their inputs as one left-padded batch on the device, their limits), or
    None once there are no more. `on_done(i, tokens)` receives prompt i's new tokens (a 1-D CPU
    tensor, up to and including the end token) as it finishes; prompts are numbered in the order
    they entered, first's then take's. `max_new`: the largest limit to expect (sizes the cache;
    default plan.max_new_tokens). The cache grows if a joining batch is longer than it allows.
    `min_join`: prompts join only once that many slots are free (or every slot is), so that they
    are prefilled together; the free slots idle meanwhile.

    The same tokens as decoding each prompt alone: a joining batch is prefilled on its own and
    each row's KV cache copied into its slot, set up exactly as the first batch's rows (attention
    mask from its attention mask, rotary position = its real token count + its rope delta, write
    position = the padded length); every row keeps its own write position, step count and rotary
    position, and attends only to its own slots.
    """
    import torch

    why = continuous_applies(plan)
    if why:
        raise ValueError(f"continuous batching does not apply: {why}")
    ids = first["input_ids"]
    slots, first_len = ids.shape
    device = ids.device
    max_new = max_new or plan.max_new_tokens
    if len(first_limits) != slots or any(not 1 <= m <= plan.max_new_tokens for m in first_limits):
        raise ValueError("first_limits: one per prompt, each in 1..max_new_tokens")
    cache_len = -(-(first_len + max(max_new, max(first_limits))) // cache_align) * cache_align
    cache, attn, logits, deltas = _prefill(model, first, cache_len)
    vocab = logits.shape[-1]
    ar = torch.arange(slots, device=device)
    st = _RowState(
        tok=torch.empty(slots, 1, dtype=torch.long, device=device),
        pos=(attn.long().sum(-1, keepdim=True) + deltas).view(1, slots, 1).expand(3, slots, 1).contiguous(),
        mask=torch.zeros(slots, 1, 1, cache_len, dtype=torch.bool, device=device),
        wpos=torch.full((slots,), first_len, dtype=torch.long, device=device),
        step=torch.zeros(slots, dtype=torch.long, device=device),
        limit=torch.tensor(first_limits, dtype=torch.long, device=device),
        unfinished=torch.ones(slots, dtype=torch.bool, device=device),
        seen=(torch.zeros(slots, vocab, dtype=torch.bool, device=device).scatter_(1, ids, True)
              if plan.repetition_penalty != 1.0 else None),
        out=torch.full((slots, plan.max_new_tokens), plan.pad_token_id, dtype=torch.long, device=device),
        eos=torch.tensor(plan.eos_token_ids, dtype=torch.long, device=device),
        ar=ar, yes=torch.ones(slots, dtype=torch.bool, device=device), plan=plan)
    st.mask[:, 0, 0, :first_len] = attn.bool()
    _pick_rows(logits, st)
    del logits
    layers = cache.layers

    def write(layer):  # this layer's cache update while decoding: one token per row, at its own slot
        def update(key_states, value_states, cache_kwargs=None, *args, **kwargs):
            layer.keys[ar, :, st.wpos] = key_states[:, :, 0]
            layer.values[ar, :, st.wpos] = value_states[:, :, 0]
            return layer.keys, layer.values
        return update

    lm, head = model.model.language_model, model.lm_head
    as_dict = model.config.model_type in _MASK_AS_DICT

    def step() -> None:
        st.mask[ar, 0, 0, st.wpos] = st.yes  # the new token sees itself (a tensor: no host value in the graph)
        mask = {"full_attention": st.mask} if as_dict else st.mask
        h = lm(input_ids=st.tok, attention_mask=mask, position_ids=st.pos,
               past_key_values=cache, use_cache=True).last_hidden_state
        _pick_rows(head(h[:, -1, :]).float(), st)
        # Only rows still decoding move on. A finished row whose slot waits for the next look (or
        # stays empty once no prompt is left) keeps stepping; advancing it would run its write
        # position past the cache's end while the longest rows still decode.
        live = st.unfinished.long()
        st.pos.add_(live.view(1, -1, 1))
        st.wpos.add_(live)

    def grow(new_len: int) -> None:  # a longer prompt joins: a larger cache (and a new graph)
        nonlocal cache_len
        for layer in layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_zeros(old.shape[0], old.shape[1], new_len, old.shape[3])
                new[:, :, :cache_len] = old
                setattr(layer, name, new)
            layer.max_cache_len = new_len
        mask = st.mask.new_zeros(slots, 1, 1, new_len)
        mask[..., :cache_len] = st.mask
        st.mask = mask
        cache_len = new_len

    def join(free: list[int], inputs: Any, limits: list[int]) -> bool:
        """Prefill `inputs` (one batch) on its own, each row into its slot of `free`; True if the
        cache had to grow."""
        g, n = inputs["input_ids"].shape
        grew = n + max(limits) > cache_len
        if grew:
            grow(-(-(n + max(max_new, max(limits))) // cache_align) * cache_align)
        own, am, logits, d = _prefill(model, inputs, n)
        idx = torch.tensor(free, dtype=torch.long, device=device)
        for big, small in zip(layers, own.layers):
            big.keys[idx, :, :n] = small.keys
            big.values[idx, :, :n] = small.values
        del own
        st.mask[idx] = False
        st.mask[idx, 0, 0, :n] = am.bool()
        st.pos[:, idx] = (am.long().sum(-1, keepdim=True) + d.view(g, 1)).view(1, g, 1)
        st.wpos[idx] = n
        st.step[idx] = 0
        st.limit[idx] = torch.tensor(limits, dtype=torch.long, device=device)
        st.unfinished[idx] = True
        st.out[idx] = plan.pad_token_id
        if st.seen is not None:  # as the first batch's rows: the padded prompt's tokens
            st.seen[idx] = torch.zeros(g, vocab, dtype=torch.bool, device=device).scatter_(1, inputs["input_ids"], True)
        _pick_rows(logits, st, rows=idx)
        return grew

    owner: list[int | None] = list(range(slots))  # the prompt each slot decodes
    entered = slots
    groups: list[int] = []
    use_graph = cuda_graph and device.type == "cuda"
    every = check_every or (_JOIN_CHECK_EVERY if use_graph else 1)
    _register_decode_attention()
    text_config = lm.config
    plain_attn = text_config._attn_implementation
    text_config._attn_implementation_internal = _DECODE_ATTN
    plain_updates = [layer.update for layer in layers]
    for layer in layers:
        layer.update = write(layer)
    graph = None
    warm = 0  # eager steps since the state's tensors were (re)made; a graph is captured after 2
    steps = grown = 0
    more = True
    try:
        while True:
            free = (~st.unfinished).nonzero().view(-1).tolist()
            for slot in free:
                if owner[slot] is not None:
                    n = int(st.step[slot])
                    on_done(owner[slot], st.out[slot, :n].clone().cpu())  # the slot is reused
                    owner[slot] = None
            if free and more and len(free) >= min(min_join, slots):
                got = take(len(free))
                if got is None:
                    more = False
                else:
                    inputs, limits = got
                    if not 1 <= len(limits) <= len(free) or inputs["input_ids"].shape[0] != len(limits):
                        raise ValueError(f"take({len(free)}) returned {inputs['input_ids'].shape[0]} prompts "
                                         f"with {len(limits)} limits")
                    use = free[:len(limits)]
                    # A joining prefill runs as the first batch's did: the usual cache writes, and the
                    # usual attention (its mask is made for that attention: left padding).
                    for layer, upd in zip(layers, plain_updates):
                        layer.update = upd
                    text_config._attn_implementation_internal = plain_attn
                    try:
                        if join(use, inputs, limits):
                            graph, warm, grown = None, 0, grown + 1
                    finally:
                        for layer in layers:
                            layer.update = write(layer)
                        text_config._attn_implementation_internal = _DECODE_ATTN
                    for slot in use:
                        owner[slot] = entered
                        entered += 1
                    groups.append(len(use))
            if all(o is None for o in owner):
                break
            for _ in range(every):
                if use_graph and graph is None and warm >= 2:
                    torch.cuda.synchronize(device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        step()  # recorded, not run
                if graph is not None:
                    graph.replay()
                elif use_graph:
                    side = torch.cuda.Stream(device)
                    side.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(side):  # warm-up steps before capture, as CUDA graphs need
                        step()
                    torch.cuda.current_stream(device).wait_stream(side)
                    warm += 1
                else:
                    step()
                steps += 1
    finally:
        for layer, upd in zip(layers, plain_updates):
            layer.update = upd
        text_config._attn_implementation_internal = plain_attn
        del graph
    if timings is not None:
        timings.update(steps=steps, joined=entered - slots, join_groups=groups, cache_grown=grown)


@dataclass
class _RowState:
    tok: Any          # (B, 1) the token fed to the next step
    pos: Any          # (3, B, 1) its rotary positions
    mask: Any         # (B, 1, 1, cache_len) bool: which cache slots each row attends to
    wpos: Any         # (B,) the cache slot each row writes next
    step: Any         # (B,) tokens each row has generated
    limit: Any        # (B,) each row's max_new_tokens
    unfinished: Any   # (B,) bool
    seen: Any         # (B, vocab) bool or None (repetition penalty)
    out: Any          # (B, max_new_tokens) generated tokens
    eos: Any
    ar: Any           # arange(B)
    yes: Any          # (B,) True
    plan: Plan


def _pick_rows(logits, st: _RowState, rows: Any = None) -> None:
    """_pick for greedy decoding with a step count per row; `rows` (an index tensor): only those
    rows (prompts that just joined), from their own prefill's logits."""
    import torch

    p = st.plan
    rows = st.ar if rows is None else rows
    seen = st.seen[rows] if st.seen is not None else None
    step = st.step[rows]
    if seen is not None:
        logits = torch.where(seen, torch.where(logits < 0, logits * p.repetition_penalty,
                                               logits / p.repetition_penalty), logits)
    if p.min_new_tokens > 0:
        eos_scores = logits[:, st.eos]
        logits[:, st.eos] = torch.where((step < p.min_new_tokens)[:, None], torch.full_like(eos_scores, float("-inf")),
                                        eos_scores)
    nxt = logits.argmax(dim=-1)
    active = st.unfinished[rows]
    nxt = torch.where(active, nxt, torch.full_like(nxt, p.pad_token_id))
    idx = step.clamp(max=st.out.shape[1] - 1)
    st.out[rows, idx] = torch.where(active, nxt, st.out[rows, idx])
    st.unfinished[rows] = active & ~torch.isin(nxt, st.eos) & (step + 1 < st.limit[rows])
    if st.seen is not None:
        st.seen[rows, nxt] = st.yes[:len(nxt)]
    st.tok[rows] = nxt[:, None]
    st.step[rows] = step + active.long()
