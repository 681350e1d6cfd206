"""Continuous batching for fast_decode's judges (greedy): a finished row leaves the batch and the
next prompt takes its slot.

Each row has its own write position, step count and rotary position; finished rows are looked
for every few replays (one host sync), and prompts prefilled on their own are copied into the
free slots. Those prompts are prefilled ahead, on a second CUDA stream of lower priority while
the decode's graph replays (a prefill is compute-bound, a decode step memory-bound), and wait,
staged, until slots free up. The prefill, the decoding attention and the generation settings
(`Plan`) are fast_decode's; the engine's side (feeding a whole call through one decode) is
continuous.py.
"""
from __future__ import annotations

import collections
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

from .fast_decode import _MASK_AS_DICT, Plan, _prefill, cache_kwarg, decode_attention

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
    image_grid_thw) concatenated in prompt order. Any other key is refused rather than guessed.
    Rows may differ in the images they carry (a rubric part that shows no image joins beside one
    that does): each images' tensor is laid out from every row that has it."""
    import torch
    import torch.nn.functional as F
    from transformers import BatchFeature

    if len(rows) == 1:
        return rows[0]
    width = max(r["input_ids"].shape[1] for r in rows)
    out = {}
    for key in dict.fromkeys(k for r in rows for k in r.keys()):
        if key in _CONCAT_KEYS:
            out[key] = torch.cat([r[key] for r in rows if key in r])
            continue
        if any(key not in r for r in rows):
            raise ValueError(f"stack_inputs: a row has no {key!r} (only images' tensors may be missing from a row)")
        vals = [r[key] for r in rows]
        if all(v.dim() == 2 and v.shape == r["input_ids"].shape for v, r in zip(vals, rows)):
            if any(v.shape[0] != 1 for v in vals):
                raise ValueError("stack_inputs: each processor output must hold one prompt")
            fill = pad_token_id if key == "input_ids" else 0
            out[key] = torch.cat([F.pad(v, (width - v.shape[1], 0), value=fill) for v in vals])
        else:
            raise ValueError(f"stack_inputs: the processor output {key!r} is neither per token nor per image")
    return BatchFeature(out)


def generate_continuous(model: Any, first: Any, more: list[Any], plan: Plan, *, limits: list[int] | None = None,
                        cuda_graph: bool = True, cache_align: int = 64, check_every: int | None = None,
                        min_join: int = 1, stage: int | None = None, before_join: Any = None,
                        timings: dict | None = None) -> list[Any]:
    """Greedy decoding where a finished row leaves the batch and the next prompts take the free slots.

    `first`: the processor's inputs (on the device) of the prompts that start, one slot each;
    `more`: the inputs of the prompts that join as slots free up, one prompt each (on the CPU or
    the device), in order. `limits`: each prompt's own max_new_tokens (<= plan.max_new_tokens),
    first's then more's. Returns each prompt's new tokens (a 1-D CPU tensor, up to and including
    the end-of-answer token), in the same order. The prompts taken together (prefilled ahead,
    `stage`, or those that fill the slots free at one look) are prefilled as one batch
    (`stack_inputs`); `before_join(indices)`, if given, returns the inputs of those prompts of
    `more` as one batch on the device (the engine's hook: stream hand-over, vision reuse). See
    `run_continuous` for why the tokens are those of each prompt decoded alone.
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
        run_continuous(model, first, limits[:slots], take, plan,
                       on_done=lambda i, tokens, waited_s: results.__setitem__(i, tokens),
                       max_new=max(limits), cuda_graph=cuda_graph, cache_align=cache_align,
                       check_every=check_every, min_join=min_join, stage=stage, timings=timings)
    return results


def run_continuous(model: Any, first: Any, first_limits: list[int], take: Any, plan: Plan, *, on_done: Any,
                   max_new: int | None = None, cuda_graph: bool = True, cache_align: int = 64,
                   check_every: int | None = None, min_join: int = 1, stage: int | None = None,
                   timings: dict | None = None) -> None:
    """The continuous decode. `first` (device inputs) start, one slot each, with `first_limits`
    (each prompt's max_new_tokens); `take(n)` is asked for up to n next prompts and returns (their
    inputs as one left-padded batch on the device, their limits), or None once there are no more.
    `on_done(i, tokens, waited_s)` receives prompt i's new tokens (a 1-D CPU tensor, up to and
    including the end token) as it finishes, and the seconds it sat prefilled ahead (staged) before
    a slot took it (0.0 for a prompt that entered a slot as soon as it was prefilled): time in which
    the model worked for the rows in the slots, not for it. Prompts are numbered in the order take
    returned them, first's before. `max_new`: the largest limit to expect (sizes the cache; default
    plan.max_new_tokens). The cache grows if a joining batch is longer than it allows.

    `stage`: how many prompts to keep prefilled ahead of the free slots (default max(min_join, 4),
    at most the slot count; 0: none). After the decode's next steps are queued, `take` is asked for
    enough prompts to bring the staged ones up to that number and they are prefilled at once; on
    CUDA on a second stream, of low priority, while the decode replays on a high-priority one (a
    decode step is memory-bound, a prefill compute-bound: the prefill uses what the decode leaves).
    Staged prompts take free slots first, oldest first; a staged batch may fill slots over several
    looks. `take` is called inside that stream's context, so what it puts on the device is ordered
    on the staging stream. Only when slots are free and nothing is staged (at the start, or when
    staging falls behind) do prompts join synchronously, and only once `min_join` slots are free
    (or every slot is), so that they are prefilled together; the free slots idle meanwhile.

    The same tokens as decoding each prompt alone: a joining batch is prefilled on its own (staged
    or not: the same function) and each row's KV cache copied into its slot, set up exactly as the
    first batch's rows (attention mask from its attention mask, rotary position = its real token
    count + its rope delta, write position = the padded length); every row keeps its own write
    position, step count and rotary position, and attends only to its own slots.

    `timings`, if given, receives: steps, joined (prompts after the first batch), join_groups (the
    size of each joining prefill, in take order), cache_grown, stage (the target), staged_groups /
    staged_rows (prefills made ahead / prompts that entered a slot from them), sync_joins (joins
    that made the decode wait for their prefill), stage_waits (staged prefills not yet done when
    their rows were needed: the decode waited on them), stage_launch_ms (host time per staged
    prefill, in which the decode lives on the steps queued before it) and extra_replays (steps
    queued beyond `check_every` so that the decode does not run dry during those launches).
    """
    import torch

    why = continuous_applies(plan)
    if why:
        raise ValueError(f"continuous batching does not apply: {why}")
    slots = first["input_ids"].shape[0]
    device = first["input_ids"].device
    if len(first_limits) != slots or any(not 1 <= m <= plan.max_new_tokens for m in first_limits):
        raise ValueError("first_limits: one per prompt, each in 1..max_new_tokens")
    stage = max(min_join, _STAGE_AHEAD) if stage is None else stage
    if stage < 0:
        raise ValueError(f"stage must be >= 0, got {stage}")
    streams = _stage_streams(device) if stage and device.type == "cuda" else None
    caller = torch.cuda.current_stream(device) if streams else None
    if streams:
        streams[0].wait_stream(caller)  # the caller made `first` on its stream
    try:
        with torch.cuda.stream(streams[0]) if streams else contextlib.nullcontext():
            dec = _ContinuousDecode(model, first, first_limits, take, plan, on_done=on_done,
                                    max_new=max_new or plan.max_new_tokens, cuda_graph=cuda_graph,
                                    cache_align=cache_align, check_every=check_every, min_join=min_join,
                                    stage=min(stage, slots), side=streams[1] if streams else None)
            dec.run()
    finally:
        if streams:
            with contextlib.suppress(Exception):  # after a device fault this raises too; the fault is the error
                caller.wait_stream(streams[0])
    if timings is not None:
        timings.update(dec.timings())


_STAGE_AHEAD = 4  # prompts kept prefilled ahead of the free slots (benchmarks/NOTES.md, issue 17: staged joins)
_stream_pairs: dict[int, tuple[Any, Any]] = {}


def _stage_streams(device) -> tuple[Any, Any]:
    """(decode stream, staging stream) of a CUDA device, made once per process: streams made per
    call would each hold their own cached memory blocks in the allocator."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _stream_pairs:
        # Lower number, higher priority: the decode's kernels are scheduled first when both wait.
        _stream_pairs[index] = (torch.cuda.Stream(index, priority=-1), torch.cuda.Stream(index, priority=0))
    return _stream_pairs[index]


@dataclass
class _Prefilled:
    """Prompts prefilled on their own (one left-padded batch), waiting for slots: what copying a row
    into a slot needs. Rows are consumed in order, `used` of them so far."""
    cache: Any          # StaticCache of the batch's padded length
    attn: Any           # (g, n) attention mask
    logits: Any         # (g, vocab) float32, last position
    deltas: Any         # (g, 1) rope deltas
    ids: Any            # (g, n) input ids (the repetition penalty's seen tokens), or None
    limits: list[int]   # each prompt's max_new_tokens
    numbers: list[int]  # each prompt's number for on_done
    event: Any = None   # CUDA: recorded on the staging stream after the prefill
    used: int = 0
    ready_at: float = 0.0  # host clock when its prefill was made (launched, on CUDA): its wait for slots begins


class _ContinuousDecode:
    """One run_continuous decode: the slots' state, the staged prompts, the loop."""

    def __init__(self, model: Any, first: Any, first_limits: list[int], take: Any, plan: Plan, *, on_done: Any,
                 max_new: int, cuda_graph: bool, cache_align: int, check_every: int | None, min_join: int,
                 stage: int, side: Any):
        import torch

        self.torch, self.model, self.take, self.plan, self.on_done = torch, model, take, plan, on_done
        ids = first["input_ids"]
        self.slots, first_len = ids.shape
        slots = self.slots
        self.device = device = ids.device
        self.max_new, self.align, self.min_join, self.target, self.side = max_new, cache_align, min_join, stage, side
        self.use_graph = cuda_graph and device.type == "cuda"
        self.every = check_every or (_JOIN_CHECK_EVERY if self.use_graph else 1)
        self.cache_len = self._aligned(first_len + max(max_new, max(first_limits)))
        cache, attn, logits, deltas = _prefill(model, first, self.cache_len)
        self.vocab = vocab = logits.shape[-1]
        ar = torch.arange(slots, device=device)
        self.st = st = _RowState(
            tok=torch.empty(slots, 1, dtype=torch.long, device=device),
            pos=(attn.long().sum(-1, keepdim=True) + deltas).view(1, slots, 1).expand(3, slots, 1).contiguous(),
            mask=torch.zeros(slots, 1, 1, self.cache_len, dtype=torch.bool, device=device),
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
        self.cache = cache
        self.layers = cache.layers
        self.lm, self.head = model.model.language_model, model.lm_head
        self.cache_arg = cache_kwarg(self.lm)
        self.as_dict = model.config.model_type in _MASK_AS_DICT
        self.text_config = self.lm.config
        self.plain_attn = self.text_config._attn_implementation
        self.decode_attn = decode_attention(device, model.dtype)
        self.plain_updates = [layer.update for layer in self.layers]
        self.owner: list[int | None] = list(range(slots))  # the prompt each slot decodes
        self.waited = [0.0] * slots  # the seconds that prompt sat prefilled ahead before it took the slot
        self.next_number = slots
        self.staged: collections.deque[_Prefilled] = collections.deque()
        self.retired: list[_Prefilled] = []  # consumed; kept until the decode stream has copied them
        self.last_event = None  # the staging stream's last prefill
        self.more = True
        self.groups: list[int] = []
        self.steps = self.grown = self.joined = self.sync_joins = 0
        self.staged_groups = self.staged_rows = self.stage_waits = self.extra_replays = 0
        self.launch_s = 0.0
        self.launch_rows = 0

    def _aligned(self, n: int) -> int:  # cache length rounded up: aligned rows need no padding in attention
        return -(-n // self.align) * self.align

    # -- the decoding step and the model's two modes --

    def _write(self, layer):  # this layer's cache update while decoding: one token per row, at its own slot
        st = self.st

        def update(key_states, value_states, cache_kwargs=None, *args, **kwargs):
            layer.keys[st.ar, :, st.wpos] = key_states[:, :, 0]
            layer.values[st.ar, :, st.wpos] = value_states[:, :, 0]
            return layer.keys, layer.values
        return update

    def _decoding(self) -> None:
        for layer in self.layers:
            layer.update = self._write(layer)
        self.text_config._attn_implementation_internal = self.decode_attn

    @contextlib.contextmanager
    def _plain(self):
        """A prefill runs as the first batch's did: the usual cache writes, and the usual attention
        (its mask is made for that attention: left padding); decoding's again afterwards."""
        for layer, upd in zip(self.layers, self.plain_updates):
            layer.update = upd
        self.text_config._attn_implementation_internal = self.plain_attn
        try:
            yield
        finally:
            self._decoding()

    def _step(self) -> None:
        st = self.st
        st.mask[st.ar, 0, 0, st.wpos] = st.yes  # the new token sees itself (a tensor: no host value in the graph)
        mask = {"full_attention": st.mask} if self.as_dict else st.mask
        h = self.lm(input_ids=st.tok, attention_mask=mask, position_ids=st.pos, use_cache=True,
                    **{self.cache_arg: self.cache}).last_hidden_state
        _pick_rows(self.head(h[:, -1, :]).float(), st)
        # Only rows still decoding move on. A finished row whose slot waits for the next look (or
        # stays empty once no prompt is left) keeps stepping; advancing it would run its write
        # position past the cache's end while the longest rows still decode.
        live = st.unfinished.long()
        st.pos.add_(live.view(1, -1, 1))
        st.wpos.add_(live)

    def _grow(self, new_len: int) -> None:  # a longer prompt joins: a larger cache (and a new graph)
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_zeros(old.shape[0], old.shape[1], new_len, old.shape[3])
                new[:, :, :self.cache_len] = old
                setattr(layer, name, new)
            layer.max_cache_len = new_len
        mask = self.st.mask.new_zeros(self.slots, 1, 1, new_len)
        mask[..., :self.cache_len] = self.st.mask
        self.st.mask = mask
        self.cache_len = new_len
        self.grown += 1

    # -- prompts in: taken, prefilled, copied into slots --

    def _take_prefill(self, n: int) -> _Prefilled | None:
        """The next (up to) n prompts from `take`, numbered, prefilled on their own (on the current
        stream), or None once there are none."""
        got = self.take(n)
        if got is None:
            self.more = False
            return None
        inputs, limits = got
        ids = inputs["input_ids"]
        if not 1 <= len(limits) <= n or ids.shape[0] != len(limits):
            raise ValueError(f"take({n}) returned {ids.shape[0]} prompts with {len(limits)} limits")
        numbers = list(range(self.next_number, self.next_number + len(limits)))
        self.next_number += len(limits)
        self.groups.append(len(limits))
        cache, attn, logits, deltas = _prefill(self.model, inputs, ids.shape[1])
        return _Prefilled(cache, attn, logits, deltas, ids if self.st.seen is not None else None, list(limits), numbers)

    def _enter(self, g: _Prefilled, free: list[int], where: Any, waited: float = 0.0) -> None:
        """g's next len(free) rows into the slots `free`. `where`: (2, m) long tensor on the device,
        the slots and the rows' limits, made by the caller before any wait was queued (copying a
        host list to the device waits for the stream). `waited`: seconds g sat staged until now."""
        torch, st = self.torch, self.st
        m, n = len(free), g.attn.shape[1]
        a, b = g.used, g.used + len(free)
        if n + max(g.limits[a:b]) > self.cache_len:
            self._grow(self._aligned(n + max(self.max_new, max(g.limits[a:b]))))
        idx = where[0]
        for big, small in zip(self.layers, g.cache.layers):
            big.keys[idx, :, :n] = small.keys[a:b]
            big.values[idx, :, :n] = small.values[a:b]
        am = g.attn[a:b]
        st.mask[idx] = False
        st.mask[idx, 0, 0, :n] = am.bool()
        st.pos[:, idx] = (am.long().sum(-1, keepdim=True) + g.deltas[a:b].view(m, 1)).view(1, m, 1)
        st.wpos[idx] = n
        st.step[idx] = 0
        st.limit[idx] = where[1]
        st.unfinished[idx] = True
        st.out[idx] = self.plan.pad_token_id
        if st.seen is not None:  # as the first batch's rows: the padded prompt's tokens
            seen = torch.zeros(m, self.vocab, dtype=torch.bool, device=self.device)
            st.seen[idx] = seen.scatter_(1, g.ids[a:b], True)
        _pick_rows(g.logits[a:b], st, rows=idx)  # (writes into those logits rows: they are not read again)
        for slot, number in zip(free, g.numbers[a:b]):
            self.owner[slot] = number
            self.waited[slot] = waited
        g.used = b
        self.joined += m

    def _where(self, free: list[int], limits: list[int]) -> Any:
        return self.torch.tensor([free, limits], dtype=self.torch.long, device=self.device)

    def _fill_from_stage(self, free: list[int]) -> list[int]:
        """Staged rows, oldest first, into the free slots; the slots still free."""
        torch = self.torch
        plan, rest = [], list(free)
        for g in self.staged:
            m = min(len(rest), len(g.limits) - g.used)
            if m == 0:
                break
            plan.append((g, rest[:m]))
            rest = rest[m:]
        if not plan:
            return rest
        now = time.perf_counter()
        where = self._where([s for _, use in plan for s in use],
                            [lim for g, use in plan for lim in g.limits[g.used:g.used + len(use)]])
        k = 0
        for g, use in plan:
            if g.event is not None:  # the decode's stream waits for that prefill, the host does not
                if not g.event.query():
                    self.stage_waits += 1
                torch.cuda.current_stream(self.device).wait_event(g.event)
            self._enter(g, use, where[:, k:k + len(use)], waited=now - g.ready_at)
            k += len(use)
            self.staged_rows += len(use)
            if g.used == len(g.limits):
                self.retired.append(self.staged.popleft())
        return rest

    def _join_now(self, free: list[int]) -> None:
        """Prompts for the free slots, prefilled now on the decode's stream (which waits for it)."""
        if self.last_event is not None:  # e.g. vision features a staged prefill made, reused here
            self.torch.cuda.current_stream(self.device).wait_event(self.last_event)
        with self._plain():
            g = self._take_prefill(len(free))
        if g is not None:
            use = free[:len(g.limits)]
            self._enter(g, use, self._where(use, g.limits))
            self.sync_joins += 1

    def _launch(self, k: int) -> None:
        """Up to k prompts prefilled ahead, on the staging stream (CUDA) or now (CPU)."""
        torch = self.torch
        t0 = time.perf_counter()
        with torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext(), self._plain():
            g = self._take_prefill(k)
            if g is not None and self.side is not None:
                g.event = torch.cuda.Event()
                g.event.record(self.side)
                self.last_event = g.event
        if g is not None:
            g.ready_at = time.perf_counter()
            self.staged.append(g)
            self.staged_groups += 1
            self.launch_s += g.ready_at - t0
            self.launch_rows += len(g.limits)

    def _ahead(self, k: int, replay_ms: float | None) -> int:
        """Steps to queue before launching k staged prompts: enough that the decode does not run dry
        while the host is held in that prefill's host syncs (Qwen-VL's vision and rope code read
        values back; each waits for the staging stream), judged from the launches so far."""
        if replay_ms is None or not self.launch_rows:
            return self.every
        need_ms = self.launch_s * 1000 / self.launch_rows * k * 1.25
        return min(4 * self.every, max(self.every, math.ceil(need_ms / replay_ms)))

    def _staged_count(self) -> int:
        return sum(len(g.limits) - g.used for g in self.staged)

    # -- the loop --

    def run(self) -> None:
        torch, st, device = self.torch, self.st, self.device
        self._decoding()
        graph = None
        warm = 0  # eager steps since the state's tensors were (re)made; a graph is captured after 2
        clock = None  # CUDA events around the last look's graph replays: the time a step takes now
        replay_ms = None
        try:
            while True:
                free = (~st.unfinished).nonzero().view(-1).tolist()  # waits for the decode's stream
                self.retired.clear()  # their copies have run
                if clock is not None:
                    replay_ms = clock[0].elapsed_time(clock[1]) / clock[2]
                    clock = None
                for slot in free:
                    if self.owner[slot] is not None:
                        n = int(st.step[slot])
                        self.on_done(self.owner[slot], st.out[slot, :n].clone().cpu(),  # the slot is reused
                                     self.waited[slot])
                        self.owner[slot] = None
                grown = self.grown
                free = self._fill_from_stage(free)
                if free and self.more and not self.staged and len(free) >= min(self.min_join, self.slots):
                    self._join_now(free)
                if self.grown != grown:
                    graph, warm = None, 0
                if all(o is None for o in self.owner) and not self.staged:
                    break
                # Prefill ahead if the staged prompts run short and the staging stream is idle: a
                # launch while it is busy would hold the host in its syncs until that work is done.
                k = self.target - self._staged_count()
                launch = self.target > 0 and self.more and k > 0 and \
                    (self.last_event is None or self.last_event.query())
                ahead = self.every
                if launch and self.side is not None:
                    # The staged prefill runs after this look's copies and joins (the memory they
                    # free, the vision features they made), not after the steps queued below.
                    self.side.wait_stream(torch.cuda.current_stream(device))
                    if graph is not None:
                        ahead = self._ahead(k, replay_ms)
                        self.extra_replays += ahead - self.every
                if graph is not None:
                    clock = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), ahead)
                    clock[0].record()
                for _ in range(ahead):
                    if self.use_graph and graph is None and warm >= 2:
                        torch.cuda.synchronize(device)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            self._step()  # recorded, not run
                    if graph is not None:
                        graph.replay()
                    elif self.use_graph:
                        warm_stream = torch.cuda.Stream(device)
                        warm_stream.wait_stream(torch.cuda.current_stream(device))
                        with torch.cuda.stream(warm_stream):  # warm-up steps before capture, as CUDA graphs need
                            self._step()
                        torch.cuda.current_stream(device).wait_stream(warm_stream)
                        warm += 1
                    else:
                        self._step()
                    self.steps += 1
                if clock is not None:
                    clock[1].record()
                if launch:
                    self._launch(k)
        except BaseException:
            if self.side is not None:  # nothing of this decode may still run when its memory is reused
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize(device)
            raise
        finally:
            for layer, upd in zip(self.layers, self.plain_updates):
                layer.update = upd
            self.text_config._attn_implementation_internal = self.plain_attn
            self.staged.clear()
            self.retired.clear()
            del graph

    def timings(self) -> dict:
        return dict(steps=self.steps, joined=self.joined, join_groups=self.groups, cache_grown=self.grown,
                    stage=self.target, staged_groups=self.staged_groups, staged_rows=self.staged_rows,
                    sync_joins=self.sync_joins, stage_waits=self.stage_waits,
                    stage_launch_ms=round(self.launch_s * 1000 / max(self.staged_groups, 1), 2),
                    extra_replays=self.extra_replays)


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
