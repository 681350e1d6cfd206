"""The judge's settings: one typed record shared by every host of the scoring engine.

The single-device class, each worker process, each Ray actor and the HTTP service build the
engine from the same `JudgeSettings`, so a config moves between them unchanged.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import JudgeConfigError

MODES = ("logits", "generate")
DTYPES = ("auto", "bfloat16", "float16", "float32")
VISION_ATTN = ("auto", "sdpa", "varlen", "packed", "grouped")  # see vision_attention.py
QUANTIZATIONS = ("none", "fp8", "bnb-8bit", "bnb-4bit")  # see quantization.py
CHUNK_ORDERS = ("auto", "input")  # see size_order.py

# The names verl users know for the same settings (its generative reward model's rollout and
# micro-batch keys). Accepted on input, stored under the judge's own names.
PARAM_ALIASES = {
    "response_length": "max_new_tokens",
    "prompt_length": "max_prompt_tokens",
    "micro_batch_size_per_gpu": "batch_size",
}


@dataclass(frozen=True)
class JudgeSettings:
    """model_name: a checkpoint folder, a hub name, or `tiny:ARCH` for an offline random-weight model.
    mode: `logits` (expected value over the scale's level tokens; one forward pass) or `generate`.
    template: a template or rubric name (`quality`, `edit`, `edit_instruction`, `edit_quality`,
      `alignment`, `qalign_quality`, or one defined under `templates`).
    templates: YAML overrides and new templates/rubrics (see templates.resolve_rubric).
    dtype: `auto` is bfloat16 on CUDA and float32 on the CPU.
    min_pixels / max_pixels: image resize bounds (None: the checkpoint's processor defaults).
    batch_size: prompts per forward pass; a batch that runs out of memory is split and retried.
    chunk_order: the order a call's items are cut into batches from (results always come back in
      input order, each with its own index): `auto` (default) puts prompts of similar size
      together, largest first (sizes read from the image files' headers, no pixel decoded;
      size_order.py), so that a batch pads its prompts less and, with images of one size, runs
      the vision tower's one-size attention; and, with vision_reuse on a rubric that shows
      source images, keeps the items that share a source side by side (grouping.py). `input`:
      batches cut in the order given. Scores are the same within float rounding (a prompt's
      padding changes), so, like batch_size, it is no part of the resume fingerprint.
    max_new_tokens, temperature (0 = greedy), top_p, top_k, num_samples: generate mode. top_k: None
      takes the checkpoint's generation_config (Qwen2.5-VL ships top_k 1), 0 cuts nothing.
    max_prompt_tokens: prompts longer than this (text and image tokens) fail with a clear error
      instead of running; never truncated, since cutting a prompt would cut its image tokens.
      The judge's context (its language model's max_position_embeddings) is a limit too, always:
      in generate mode it holds the prompt and its answer budget (max_new_tokens) together.
    verl's names are accepted too: response_length (max_new_tokens), prompt_length
      (max_prompt_tokens), micro_batch_size_per_gpu (batch_size).
    max_image_pixels: larger decoded images are refused (decompression-bomb guard).
    seed: sampling seed.
    vision_attn: attention of the vision tower: `auto` (`grouped` on a CUDA device in
      bfloat16/float16, else `sdpa`), `grouped` (images of one size in one attention call, cuDNN's
      kernel first on Hopper GPUs; other layouts through `varlen`, or `packed` where it cannot run),
      `varlen` (torch's varlen flash attention), `packed` (pure torch, any device) or `sdpa`
      (transformers' per-window loop). Same scores within rounding; see vision_attention.py.
    compile_vision: torch.compile the vision tower's blocks (fuses its small ops; the batch after
      the switch pays the compile time once). None (default): automatic, on CUDA (both modes)
      once the judge has scored compile_after_items items, so that small jobs and the first result
      never pay it; true: at load; false: never. A compile that fails is undone with one warning.
    prepare_threads: threads that decode and resize images (the next chunk's, while the model runs).
    compile_after_items: items a judge scores before the automatic compile (compile_vision /
      compile_language None) starts; see benchmarks/NOTES.md for where it repays.
    max_memory_gb: GPU memory budget of this judge (weights included): batches are cut to the
      largest number of prompts that fits, learned from measured peaks. None: no budget.
    compile_language: torch.compile the language model's decoder layers (None, true, false as
      compile_vision): in logits mode whole layers; in generate mode each layer's norms and MLP,
      the parts that hold no KV cache (they also run inside fast_decode's CUDA graph). Fused small
      ops, fewer kernel launches competing with the prepare thread for the CPU.
    fast_decode: generate mode (on by default): decode through a static KV cache and, on CUDA, a
      CUDA graph of the decoding step (fast_decode.py), greedy or sampled, for every supported
      judge (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE); the same tokens as generate(). Where
      it does not apply (another architecture, a generation setting it does not implement),
      generate() runs, with one warning at load saying why.
    gpu_preprocess: on CUDA (on by default), the image processor normalises and cuts patches on
      the GPU (a side stream of the prepare thread) instead of the CPU; same pixels. No effect on
      the CPU.
    min_new_tokens: generate mode, for benchmarks: force at least this many new tokens (0: stop at
      the end-of-answer token as usual).
    continuous_batching: generate mode, greedy with fast_decode: a finished answer leaves the batch
      and the next prompts take the free slots (row_decode.run_continuous): one decode per call,
      fed from the prepared chunks (continuous.py), the prompts that fill the slots free at one
      look prefilled together, so a batch does not wait for its longest answer; the same tokens as
      static batches in float32 on the CPU, and on an H200 in bf16 (benchmarks/NOTES.md, issue 17).
      On by default: 1.52x on answers of 32..512 tokens (512 items; 1.25x on 256 before prompts
      were prefilled ahead) and 1.01x when every answer has the same length (Qwen3-VL-8B, one
      H200; README). Sampling and several answers per prompt use static batches.
    vision_reuse: each unique image through the vision tower once per chunk (vision_reuse.py; items
      that share a source image are cut into one chunk, grouping.py, results in input order), on
      by default: the same features (float32 on the CPU within 1e-5; bf16 scores identical on an
      H200), 1.14x (Qwen3-VL-8B) to 1.2x (Qwen3-VL-30B-A3B) on the edit rubric. An item may
      lower its own answer budget with metadata {"max_new_tokens": n} (generate mode, any mode of
      decoding; logits mode writes no answer and leaves it alone).
    vision_cache_mb: with vision_reuse, the budget in MB (1e6 bytes) of the vision features kept
      beyond the chunk that encoded them, for later chunks and later calls of the same loaded
      judge (least recently used out first, images under judgement before source images; emptied
      on close and on out of memory; counted as resident under max_memory_gb): an image shown again there is not encoded again. Same
      features, so it is no part of the resume fingerprint. 0: nothing kept beyond a chunk. The
      default, 1024, holds the features of ~40 1024x768 images on Qwen3-VL-8B (768 tokens x 4096
      x 2 bytes, x4 with its three deepstack layers: ~25 MB each) or ~140 on Qwen2.5-VL-7B (~1,000
      tokens x 3584 x 2 bytes: ~7 MB): the source images a benchmark's neighbouring items share,
      for ~1% of an 80 GB GPU's memory (CPU memory on the CPU). Within a call the items that
      share a source are in one chunk already (vision_reuse), so the store serves later calls, a
      source's group cut by a chunk's end, and images shared otherwise; an image is found again
      only if the features of the images shown since its last showing fit. Code that changes a
      loaded judge's weights in place (training it) must set 0: kept features would be the old
      weights'.
    quantization: how the weights are loaded (quantization.py): `none` (default: as the checkpoint
      stores them; a pre-quantized checkpoint, such as an FP8 release, loads as its config.json
      declares), `fp8` (8-bit float weights made at load, transformers' FineGrainedFP8Config; a
      CUDA GPU of compute capability 8.9 or more), `bnb-8bit` / `bnb-4bit` (bitsandbytes, which
      must be installed in the worker environment). A missing package or an unsuited device fails
      at load, before any item is scored.
    max_memory_per_gpu_gb: weights budget per GPU of a worker spread over a group of GPUs
      (multi_gpu's gpus_per_worker > 1): transformers' device_map places the layers within it.
      None: the layers are balanced over the group's GPUs.
    """

    model_name: str
    mode: str = "logits"
    template: str = "quality"
    templates: Mapping[str, Any] = field(default_factory=dict)
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    min_pixels: int | None = None
    max_pixels: int | None = None
    batch_size: int = 8
    chunk_order: str = "auto"
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    num_samples: int = 1
    max_prompt_tokens: int | None = None
    max_image_pixels: int = 100_000_000
    seed: int = 0
    vision_attn: str = "auto"
    compile_vision: bool | None = None
    compile_language: bool | None = None
    compile_after_items: int = 1024
    fast_decode: bool = True
    gpu_preprocess: bool = True
    prepare_threads: int = 4
    max_memory_gb: float | None = None
    min_new_tokens: int = 0
    continuous_batching: bool = True
    vision_reuse: bool = True
    vision_cache_mb: float = 1024.0
    quantization: str = "none"
    max_memory_per_gpu_gb: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise JudgeConfigError(f"mode: unknown value {self.mode!r}; known: {', '.join(MODES)}")
        if self.dtype not in DTYPES:
            raise JudgeConfigError(f"dtype: unknown value {self.dtype!r}; known: {', '.join(DTYPES)}")
        for name in ("batch_size", "max_new_tokens", "num_samples", "max_image_pixels", "prepare_threads",
                     "compile_after_items"):
            if getattr(self, name) < 1:
                raise JudgeConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.temperature < float("inf"):  # NaN fails too (it read as greedy: NaN > 0 is False)
            raise JudgeConfigError(f"temperature: must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:  # else every sampled batch failed in torch.topk
            raise JudgeConfigError("top_k: must be >= 0 (0: no top-k cut; None: the checkpoint's setting), got "
                                   f"{self.top_k}")
        if not 0 < self.top_p <= 1:
            raise JudgeConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.num_samples > 1 and self.mode == "generate" and self.temperature == 0:
            raise JudgeConfigError("num_samples > 1 needs temperature > 0: greedy answers would all be the same")
        if self.vision_attn not in VISION_ATTN:
            raise JudgeConfigError(f"vision_attn: unknown value {self.vision_attn!r}; known: {', '.join(VISION_ATTN)}")
        if self.chunk_order not in CHUNK_ORDERS:
            raise JudgeConfigError(f"chunk_order: unknown value {self.chunk_order!r}; known: {', '.join(CHUNK_ORDERS)}")
        if self.quantization not in QUANTIZATIONS:
            raise JudgeConfigError(f"quantization: unknown value {self.quantization!r}; known: "
                                   f"{', '.join(QUANTIZATIONS)}")
        if self.max_memory_per_gpu_gb is not None and self.max_memory_per_gpu_gb <= 0:
            raise JudgeConfigError(f"max_memory_per_gpu_gb: must be > 0 GB, got {self.max_memory_per_gpu_gb}")
        if self.max_memory_gb is not None and self.max_memory_gb <= 0:
            raise JudgeConfigError(f"max_memory_gb: must be > 0 GB, got {self.max_memory_gb}")
        if not 0 <= self.vision_cache_mb < float("inf"):  # NaN fails too
            raise JudgeConfigError(f"vision_cache_mb: must be a number of MB >= 0 (0: no vision features kept beyond "
                                   f"a chunk), got {self.vision_cache_mb}")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise JudgeConfigError(f"min_new_tokens: must be in 0..max_new_tokens ({self.max_new_tokens}), "
                                   f"got {self.min_new_tokens}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise JudgeConfigError(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        # The template and its overrides, read now: a mistake in them stops every host here, before
        # a worker starts or a model loads.
        from .templates import resolve_rubric

        resolve_rubric(self.template, self.templates).check_mode(self.mode)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_params(cls, params: Mapping[str, Any], owner: str = "judge") -> "JudgeSettings":
        """Build from a config mapping, with errors that name the key, the expected type and the
        known keys (close matches first)."""
        known = cls.names()
        params = dict(params)
        for alias, name in PARAM_ALIASES.items():
            if alias in params:
                if name in params:
                    raise JudgeConfigError(f"{owner}: give '{name}' or its alias '{alias}', not both")
                params[name] = params.pop(alias)
        for key in params:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise JudgeConfigError(f"{owner}: unknown parameter '{key}'.{hint} Known: {', '.join(known)}")
        if "model_name" not in params:
            raise JudgeConfigError(f"{owner}: missing required parameter 'model_name'")
        hints = typing.get_type_hints(cls)
        clean = {k: check_type(f"{owner}.{k}", v, hints[k]) for k, v in params.items()}
        return cls(**clean)

    def to_params(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["templates"] = dict(self.templates)
        return d

    def fingerprint(self, rubric_data: Any = None) -> str:
        """A short hash of everything that changes scores: resume skips an item only when its
        stored result has the same fingerprint. Batch size, the order batches are cut from
        (chunk_order), device, attention kernels, compiling and the memory budget are left out: they
        change speed, not the judgement."""
        keys = ("model_name", "mode", "dtype", "min_pixels", "max_pixels", "max_new_tokens", "temperature",
                "top_p", "top_k", "num_samples", "max_prompt_tokens", "seed")
        data = {k: getattr(self, k) for k in keys}
        if self.min_new_tokens:  # forced answer length changes the answers; 0 keeps old fingerprints
            data["min_new_tokens"] = self.min_new_tokens
        if self.quantization != "none":  # quantized weights score differently; none keeps old fingerprints
            data["quantization"] = self.quantization
        data["rubric"] = rubric_data
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def judge_fingerprint(self) -> str:
        """fingerprint() with this judge's rubric: what a loaded judge reports (engine.fingerprint),
        and what a finished job works out without loading one (src/job/runner.py)."""
        from .templates import resolve_rubric, rubric_fingerprint

        return self.fingerprint(rubric_fingerprint(resolve_rubric(self.template, self.templates)))


JudgeSettings.PARAM_ALIASES = PARAM_ALIASES  # type: ignore[attr-defined]  # read by config.accepted_params


def check_type(key: str, value: Any, hint: Any) -> Any:
    """Check a config value against a type hint (the simple hints used by settings here),
    converting ints to floats where a float is expected. Raises TypeError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Annotated:  # a type and its checks (devices.Device): each check(value, key)
        value = check_type(key, value, args[0])
        for check in args[1:]:
            value = check(value, key)
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        errors = []
        for arg in args:
            try:
                return check_type(key, value, arg)
            except TypeError as e:
                errors.append(str(e))
        names = " or ".join(_type_name(a) for a in args)
        raise JudgeConfigError(f"{key}: expected {names}, got {type(value).__name__} {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise JudgeConfigError(f"{key}: expected None, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise JudgeConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise JudgeConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise JudgeConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise JudgeConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        if isinstance(value, (list, tuple)):
            if args and args[0] is not Ellipsis:
                return [check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
            return list(value)
        raise JudgeConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
    if origin in (dict, Mapping, typing.Mapping) or hint in (dict,) or origin is getattr(__import__("collections.abc").abc, "Mapping"):
        if isinstance(value, Mapping):
            return dict(value)
        raise JudgeConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise JudgeConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    return value


def _type_name(t: Any) -> str:
    if t is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(t, getattr(t, "__name__", str(t)))
