"""The speed paths, chosen once at load: vision attention, compiling, fast decoding, GPU
preprocessing, and the memory budget's starting point. Each computes the same scores as the plain
path (measured step by step in benchmarks/NOTES.md).

Part of JudgeEngine (engine.py), as a mixin: these methods run on the engine's attributes.
"""
from __future__ import annotations

import logging
import types

from .errors import JudgeConfigError

log = logging.getLogger("src.models.reward.engine")


class SpeedPaths:
    """Choosing the speed paths at load (JudgeEngine mixin)."""

    def _setup_speed(self) -> None:
        from .vision_attention import apply_vision_attn

        torch = self._torch
        s = self.settings
        self.vision_attn = apply_vision_attn(self.model, s.vision_attn, self.device, self.dtype)
        from .text_attention import apply_text_attention

        # The text model's attention over the prompts with cuDNN's kernel first on a Hopper GPU in
        # half precision (same function; text_attention.py).
        self.text_attn = apply_text_attention(self.model, self.device, self.dtype)
        from .vision_reuse import VisionReuse

        # Each unique image through the vision tower once per chunk, and once while its features stay
        # in the store bounded by vision_cache_mb (same features; vision_reuse.py).
        self._vision_reuse = VisionReuse.install(self.model, s.vision_cache_mb * 1e6) if s.vision_reuse else None
        from .experts import install as install_experts

        # A mixture of experts' combine step through one Triton kernel on CUDA (same function; experts.py).
        self.experts = install_experts(self.model)
        self.patch_embed_matmul = patch_embed_as_matmul(self.model)
        self.vision_gelu_fused = vision_gelu_in_matmul(self.model, self.device.startswith("cuda"))
        from .rope_ahead import RopeAhead

        # Logits mode: the Qwen-VL rope positions of each batch worked out on the host as it is
        # prepared, not prompt by prompt with host syncs inside the forward pass (same positions;
        # rope_ahead.py). Not in generate mode, where it measured ~1% slower (benchmarks/NOTES.md).
        self._rope_ahead = RopeAhead.install(self.model) if s.mode == "logits" else None
        from .mask_ahead import MaskAhead

        # Logits mode: the image tokens' positions found as the batch is prepared, so that the
        # placeholder check and Qwen3-VL's deepstack layers do not sync the host (mask_ahead.py).
        self._mask_ahead = MaskAhead.install(self.model) if s.mode == "logits" else None
        self._compiled: list = []  # modules running compiled
        self._compile_pending: list[tuple[str, str, str]] = []  # automatic: compiled once enough items ran
        self._items_scored = 0
        # A judge spread over several GPUs runs eagerly: compiled graphs and the CUDA graph of
        # fast decoding assume one device (the layers' hooks move tensors between GPUs).
        spread = len(getattr(self, "devices", [self.device])) > 1
        auto = self.device.startswith("cuda") and not spread
        for setting, tower, blocks, wanted in (
                ("compile_vision", "visual", "blocks", s.compile_vision),
                ("compile_language", "language_model", "layers", s.compile_language)):
            if wanted:
                self._compile_each(setting, tower, blocks)
            elif wanted is None and auto:
                self._compile_pending.append((setting, tower, blocks))
        gc = getattr(self.model, "generation_config", None)
        if s.mode == "generate" and s.temperature > 0 and s.top_k is None and getattr(gc, "top_k", None) == 1:
            # generate() merges the checkpoint's generation_config: Qwen2.5-VL ships top_k 1, which
            # keeps only the likeliest token, so every "sample" would be the greedy answer.
            log.warning("temperature %s samples nothing: the checkpoint's generation_config sets top_k 1 and "
                        "top_k is not set, so every answer is the greedy one; set top_k (0: no top-k cut)",
                        s.temperature)
        self._decode_plan = None
        if s.fast_decode and s.mode == "generate" and spread:
            log.warning("fast_decode: using transformers' generate() instead, because the judge is spread "
                        "over %d GPUs", len(self.devices))
        elif s.fast_decode and s.mode == "generate":
            from .fast_decode import plan_for

            self._decode_plan, why = plan_for(self.model, self._generate_kwargs())
            if why:
                log.warning("fast_decode: using transformers' generate() instead, because %s", why)
        self._fast_decode = self._decode_plan is not None
        # Continuous batching (row_decode.generate_continuous): only where it gives the tokens that
        # static batches give (greedy, one answer per prompt); else static batches, as before.
        self._continuous = False
        self._continuous_timings: dict = {}
        # Free slots before prompts join (run_continuous's min_join): 1, each look's free slots at
        # once; a benchmark may try more (prefilled together, the free slots idle meanwhile).
        self._continuous_min_join = 1
        # Prompts prefilled ahead of the free slots, on a second CUDA stream while the decode runs
        # (run_continuous's stage): None, its default; 0, joins prefilled when slots free up.
        self._continuous_stage: int | None = None
        # Not under max_memory_gb: its batch sizes are learned from measured static batches.
        if self._decode_plan is not None and s.continuous_batching and s.max_memory_gb is None:
            from .row_decode import continuous_applies

            why = continuous_applies(self._decode_plan)
            self._continuous = why is None
            if why:
                log.info("continuous_batching: static batches, because %s", why)
        self._prep_stream = None
        if s.gpu_preprocess and self.device.startswith("cuda"):
            # The prepare thread's GPU work goes on its own stream, so it overlaps the model's.
            self._prep_stream = torch.cuda.Stream(device=self.device)
        # Prompts per forward pass: lowered after an out-of-memory error, or to fit max_memory_gb.
        self._batch_cap: int | None = None
        self._largest_ok = 0
        self._bytes_per_prompt = 0.0
        cuda = self.device.startswith("cuda")
        self._resident_bytes = torch.cuda.memory_allocated(self.device) if cuda else 0
        if s.max_memory_gb is not None and cuda and self._resident_bytes > s.max_memory_gb * 1e9:
            raise JudgeConfigError(f"max_memory_gb={s.max_memory_gb} is below what the loaded judge already holds on "
                                   f"{self.device_label} ({self._resident_bytes / 1e9:.1f} GB); raise it")

    def _compile_each(self, setting: str, tower: str, blocks: str) -> None:
        """torch.compile each block of one tower: one graph serves all blocks (same code, the
        weights are inputs); shapes change with the images and prompts, hence dynamic.

        The language model's whole decoder layers are compiled in logits mode, which keeps no KV
        cache. In generate mode each layer writes its own cache object, which would force a graph
        per layer, so there the parts of a layer that touch no cache are compiled instead: its
        norms (Qwen3's per-head query and key norms too) and its MLP (the experts block of a
        mixture of experts). They run in the prefill and, captured with the rest of the step, in
        fast_decode's CUDA graph."""
        part = getattr(getattr(self.model, "model", self.model), tower, None)
        modules = getattr(part, blocks, None)
        if modules is None:
            raise JudgeConfigError(f"{setting}: {type(self.model).__name__} has no {tower}.{blocks} to compile")
        if tower == "language_model" and self.settings.mode == "generate":
            modules = [m for layer in modules for m in cacheless_parts(layer)] + rotary_in_attention(modules)
        options = inductor_options(tower, self.device, getattr(self.model.config, "model_type", ""))
        for module in modules:
            compile_module(module, options)
            self._compiled.append(module)

    def _count_scored(self, n: int) -> None:
        """Automatic compiling: once the judge has scored compile_after_items items, compile what
        was left to it; the next batch pays the compile time, once."""
        self._items_scored += n
        if self._compile_pending and self._items_scored >= self.settings.compile_after_items:
            pending, self._compile_pending = self._compile_pending, []
            log.info("%s: %d items scored; compiling %s (the next batch pays the compile time, once)",
                     self.device_label, self._items_scored, " and ".join(p[0] for p in pending))
            for setting, tower, blocks in pending:
                try:
                    self._compile_each(setting, tower, blocks)
                except ValueError as e:  # an architecture without these blocks: stay eager
                    log.warning("%s", e)
            self._forget_vision_features()

    def _forget_vision_features(self) -> None:
        """Drop the vision features kept in both of vision reuse's stores: after a compile change
        they would differ from what the tower computes now by rounding; after out of memory, a
        failed decode, or on close, their memory is wanted back (batching._free_memory, close)."""
        if self._vision_reuse is not None:
            self._vision_reuse.clear()

    def _uncompile(self, why: str) -> None:
        """Back to eager after a compile failed: the same function, one warning, no retry."""
        log.warning("%s: compiling failed (%s); running eagerly from now on", self.device_label, why)
        for module in self._compiled:
            module._compiled_call_impl = None
        self._compiled = []
        self._compile_pending = []
        self._forget_vision_features()


_ROTARY = "apply_rotary_pos_emb"  # transformers' helper that the text attention's forward calls by name


def rotary_in_attention(layers) -> list:
    """The text attention's rotary embedding, made compilable where the attention itself cannot be
    (generate mode: it writes the KV cache). Each layer's attention gets its class's own forward,
    the same code, whose one change is where the name `apply_rotary_pos_emb` leads: to a module
    that calls transformers' function, shared by the layers, so compiling it compiles one graph
    (a decoding step's ~10 elementwise kernels per layer for q and k become one or two). Only this
    judge's model changes; the function and other models are left as they are. Returns [that
    module] to be compiled, or [] where a forward does not call the helper by that name (one warning).
    A forward that transformers decorates (later releases rename `past_key_values` to `cache` through
    `deprecate_kwarg`) keeps its decorators: each is rebuilt around the changed function."""
    import torch

    attns = [getattr(layer, "self_attn", None) for layer in layers]
    if not attns or any(a is None or type(a) is not type(attns[0]) for a in attns):
        return []
    decorated = type(attns[0]).forward
    plain = _innermost(decorated)
    code = getattr(plain, "__code__", None)
    if code is None or plain.__closure__ or _ROTARY not in code.co_names or _ROTARY not in plain.__globals__:
        log.warning("compile_language: the rotary embedding stays eager, because %s.forward %s",
                    type(attns[0]).__name__, "is wrapped in a way this library does not know" if plain is None
                    else f"does not call transformers' {_ROTARY} by that name")
        return []

    class RotaryEmbedding(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, *args, **kwargs):
            return self.fn(*args, **kwargs)

    rotary = RotaryEmbedding(plain.__globals__[_ROTARY])
    forward = _with_globals(decorated, {**plain.__globals__, _ROTARY: rotary})
    for attn in attns:
        attn.forward = types.MethodType(forward, attn)
    return [rotary]


def _innermost(fn):
    """The function under fn's decorators (those that keep it in their closure, as functools.wraps
    wrappers do), or None where a decorator does not."""
    while getattr(fn, "__wrapped__", None) is not None:
        if _cell_of(fn, fn.__wrapped__) is None:
            return None
        fn = fn.__wrapped__
    return fn


def _cell_of(wrapper, inner) -> int | None:
    """The index of the closure cell of `wrapper` that holds `inner`, if exactly one does."""
    found = []
    for i, cell in enumerate(getattr(wrapper, "__closure__", None) or ()):
        try:
            if cell.cell_contents is inner:
                found.append(i)
        except ValueError:  # an empty cell
            continue
    return found[0] if len(found) == 1 else None


def _with_globals(fn, globals_: dict):
    """A copy of fn whose innermost function (under its decorators, _innermost) reads `globals_`;
    each decorator's wrapper is copied around the new function, its own globals kept."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        new = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__)
    else:
        at = _cell_of(fn, inner)
        inner = _with_globals(inner, globals_)
        closure = tuple(types.CellType(inner) if i == at else cell for i, cell in enumerate(fn.__closure__))
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
        new.__dict__.update(fn.__dict__)
        new.__wrapped__ = inner
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    return new


def inductor_options(tower: str, device: str, model_type: str = "") -> dict:
    """Inductor options for compiling one tower's blocks.

    Qwen3-VL's vision tower on CUDA: `multi_kernel`, with which inductor makes a reduction both as
    a looped and as a persistent kernel and runs the faster once it has timed both. The tower's
    layer norms run over rows of 1,152 features, above the 1,024 under which inductor makes
    persistent reductions; looped, such a norm reads its row twice. On the MoE judge's logits on
    an H100 the calls ran 1.039x faster with it (benchmarks/NOTES.md). The same function: only the
    order of a row's sums differs (float32, 1.4e-6 from eager either way). Qwen2.5-VL's tower
    (1,280 features) keeps inductor's defaults: with multi_kernel its logits ran no faster on an
    H100 (benchmarks/NOTES.md, 2026-12-05 #7, call 3).

    `fx_graph_cache` off for those graphs: torch 2.11 loads a multi_kernel graph back from inductor's
    on-disk cache broken ("'NoneType' object does not support the context manager protocol"), so
    every process after the first on a machine fell back to eager, 0.72x on the 8B judge's logits
    (benchmarks/NOTES.md, calls J to L). Compiled afresh in each process, they run."""
    if tower == "visual" and str(device).startswith("cuda") and model_type in ("qwen3_vl", "qwen3_vl_moe"):
        return dict(MULTI_KERNEL)
    return {}


MULTI_KERNEL = {"triton.multi_kernel": 1, "fx_graph_cache": False}  # inductor_options for Qwen3-VL's tower


def compile_module(module, options: dict) -> None:
    """torch.compile one block as the judge does: shapes change with the images and prompts, hence
    dynamic; inductor's options where there are any."""
    module.compile(dynamic=True, **({"options": options} if options else {}))


def cacheless_parts(layer) -> list:
    """The submodules of a decoder layer that hold no KV cache: its norms and its MLP."""
    attn = getattr(layer, "self_attn", None)
    names = [(layer, "input_layernorm"), (layer, "post_attention_layernorm"), (layer, "mlp"),
             (attn, "q_norm"), (attn, "k_norm")]
    return [getattr(owner, name) for owner, name in names if owner is not None and getattr(owner, name, None) is not None]


def patch_embed_as_matmul(model) -> bool:
    """The vision tower's patch embedding as one matrix multiplication. It is a Conv3d whose kernel
    equals its stride and whose input is already cut into patches, so each output is the dot
    product of one flattened patch with one flattened filter: F.linear computes exactly that. On
    an H200 the convolution ran as cuDNN's implicit-GEMM fallback, 16.5 ms for 32 images of
    1024x768 (~98k patches), about 20 TFLOP/s (benchmarks/NOTES.md). Only this judge's module
    changes (its own forward); True where it applied. A forward already set on the module (an
    accelerate hook of a judge spread over several GPUs, which moves the inputs) is kept."""
    import torch

    embed = getattr(getattr(getattr(model, "model", model), "visual", None), "patch_embed", None)
    proj = getattr(embed, "proj", None)
    if not isinstance(proj, torch.nn.Conv3d) or list(proj.kernel_size) != list(proj.stride) or \
            any(proj.padding) or any(d != 1 for d in proj.dilation) or proj.groups != 1 or "forward" in vars(embed):
        return False

    def forward(self, hidden_states):
        weight = self.proj.weight
        patches = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
        return torch.nn.functional.linear(patches, weight.reshape(weight.shape[0], -1), self.proj.bias)

    embed.forward = types.MethodType(forward, embed)
    return True


def vision_gelu_in_matmul(model, cuda: bool) -> int:
    """Qwen3-VL's vision MLP (fc1, the tanh GELU, fc2) with the GELU done inside fc1's matrix
    multiplication: on CUDA, torch's `_addmm_activation(use_gelu=True)` computes bias + x W^T and
    the tanh GELU in cuBLASLt's epilogue, on the float32 accumulator, instead of writing fc1's
    output and reading it back in a GELU kernel of its own (the MoE judge, 32 images of 1024x768
    on an H100: 27 such kernels, 16 ms of a 510-ms logits call; benchmarks/NOTES.md). Compiled,
    the op stays one call (inductor keeps it as an external kernel). CUDA only: on the CPU that
    op's GELU is the exact (erf) one, another function. Only blocks whose MLP is exactly
    fc2(GELUTanh(fc1(x))), fc1 a plain Linear with a bias, change (Qwen2-VL's and Qwen2.5-VL's
    towers do not), and not one whose forward is already set on the MLP or fc1 (an accelerate
    hook of a judge spread over several GPUs). Returns the number of blocks changed."""
    import functools

    import torch

    if not cuda:
        return 0
    try:
        from transformers.activations import GELUTanh
    except ImportError:
        return 0
    blocks = getattr(getattr(getattr(model, "model", model), "visual", None), "blocks", None) or []

    def forward(self, hidden_state):
        fc1 = self.linear_fc1
        flat = hidden_state.reshape(-1, hidden_state.shape[-1])
        h = torch._addmm_activation(fc1.bias, flat, fc1.weight.t(), use_gelu=True)
        return self.linear_fc2(h.reshape(*hidden_state.shape[:-1], h.shape[-1]))

    changed = 0
    for block in blocks:
        mlp = getattr(block, "mlp", None)
        fc1, fc2, act = (getattr(mlp, k, None) for k in ("linear_fc1", "linear_fc2", "act_fn"))
        tanh = isinstance(act, GELUTanh) and isinstance(act.act, functools.partial) and \
            act.act.func is torch.nn.functional.gelu and act.act.keywords == {"approximate": "tanh"}
        # Exactly torch's Linear (a quantized layer subclasses it with packed weights), no hook.
        plain = type(fc1) is torch.nn.Linear and fc1.bias is not None and fc1.weight.is_floating_point()
        if not (tanh and plain and "forward" not in vars(mlp) and "forward" not in vars(fc1)):
            continue
        mlp.forward = types.MethodType(forward, mlp)
        changed += 1
    return changed
