"""Quantized loading: what the `quantization` setting asks transformers for, checked before the load.

    none      the checkpoint as stored. A pre-quantized checkpoint (its config.json declares a
              quantization_config, as FP8 releases of Qwen3-VL do) loads as transformers loads it,
              and the engine reports it.
    fp8       transformers' FineGrainedFP8Config: the language model's weights cast to float8
              (128x128 blocks, one scale each) while loading; the vision tower and the output head
              stay as they are. Needs accelerate and a CUDA GPU of compute capability 8.9+.
    bnb-8bit  bitsandbytes LLM.int8 weights (BitsAndBytesConfig(load_in_8bit=True)).
    bnb-4bit  bitsandbytes NF4 weights, computing in the judge's dtype.

Every requirement (a package, a device) is checked here, in the process that loads the model
(the worker's environment), so a missing one fails the load with the setting, the package and
the install command, before any item is scored.

The FP8 matmul: transformers runs FP8 layers through a Triton kernel that it fetches from the
kernels hub (the `kernels` package and the network). Where that kernel cannot load (no `kernels`,
no network), `_dequantized_matmul` below serves the same calls with torch alone: the weights stay in
float8 (half of bf16's memory) and each layer's weight is turned back into the compute dtype for
its matmul (a speed cost, measured by benchmarks/quant_gpu.py). A mixture-of-experts judge's experts
(transformers' FP8Experts) call the kernel's grouped or batched matmul instead: the torch versions
turn a layer's experts back into the compute dtype together and run transformers' grouped matmul.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Any

from .errors import JudgeConfigError, JudgeStartError

log = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)  # Ada, Hopper and newer have float8 tensor cores
TORCH_MATMUL = "torch, weights dequantized per layer"  # the FP8 matmul where transformers' kernel cannot load


class QuantizationUnavailable(JudgeStartError):
    """The quantization asked for cannot run here (a missing package, an unsuited device)."""


def across_workers(reports: dict[str, str | None]) -> dict[str, Any]:
    """How a judge's workers loaded the weights, from each worker's own report (by device label):
    {"quantization": the report} where they agree, as for one judge; where they differ (the same
    settings fall back differently per device: an FP8 checkpoint dequantized on a GPU below compute
    capability 8.9 but not on a newer one, the torch FP8 matmul where one worker could not fetch
    transformers' kernel), {"quantization": "mixed: DEVICE: REPORT | ...", "quantization_by_worker":
    {device: report}}. A worker with no report yet (loading) is left out."""
    known = {device: q for device, q in reports.items() if q is not None}
    if len(set(known.values())) <= 1:
        return {"quantization": next(iter(known.values()), None)}
    return {"quantization": "mixed: " + " | ".join(f"{device}: {q}" for device, q in known.items()),
            "quantization_by_worker": known}


def missing_package(package: str, why: str) -> QuantizationUnavailable:
    py = sys.executable
    return QuantizationUnavailable(
        f"{why} needs the {package} package, which is not installed in this judge's environment ({py}); "
        f"install it there: {py} -m pip install {package}")


def require(package: str, why: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise missing_package(package, why)


def declared(path: str) -> dict[str, Any] | None:
    """The quantization_config the checkpoint's config.json declares, as a dict, or None."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception:  # not readable as a config: from_pretrained will say why, with its own error
        return None
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    return dict(q) if isinstance(q, dict) else q.to_dict()


def plan(setting: str, path: str, device: str, dtype: Any) -> tuple[dict[str, Any], str]:
    """(extra from_pretrained arguments, a one-line report) for `setting` on `device`.
    Raises QuantizationUnavailable or JudgeConfigError naming the setting and the fix."""
    found = declared(path)
    if found is not None:
        method = str(found.get("quant_method", "unknown"))
        if setting != "none":
            raise JudgeConfigError(f"quantization: {setting} was asked, but the checkpoint {path} is already "
                                   f"quantized (its config.json declares quant_method {method!r}); "
                                   "use quantization: none to load it as it is")
        if method == "bitsandbytes":
            require("bitsandbytes", f"the checkpoint {path} (its config.json declares bitsandbytes quantization)")
            _say_bnb_casts_once()
        if method in ("bitsandbytes", "fp8"):
            require("accelerate", f"the checkpoint {path} (quantized: {method})")
        extra: dict[str, Any] = {}
        where = ""
        if method == "fp8" and device.startswith("cuda"):
            if _capability(device) < FP8_MIN_CAPABILITY:
                log.warning("%s: FP8 checkpoint on a GPU below compute capability 8.9: transformers "
                            "dequantizes it to %s", path, dtype)
                where = "; transformers dequantizes it on this GPU, below compute capability 8.9"
            else:
                _ensure_fp8_matmul()
        elif method == "fp8" and device == "cpu":
            # Said, not left to transformers, which dequantizes only where it sees no GPU: on a GPU
            # machine it kept float8 layers on the CPU, whose matmul is a GPU kernel.
            from transformers import FineGrainedFP8Config

            extra["quantization_config"] = FineGrainedFP8Config.from_dict({**found, "dequantize": True})
            where = "; transformers dequantizes it on the CPU"
        return extra, f"pre-quantized checkpoint ({method}, as its config.json declares{where})"
    if setting == "none":
        return {}, "none"
    if setting == "fp8":
        require("accelerate", "quantization: fp8")
        if not device.startswith("cuda"):
            raise QuantizationUnavailable(
                f"quantization: fp8 needs a CUDA GPU of compute capability 8.9 or more (Ada, Hopper or newer); "
                f"this judge runs on {device}. Use quantization: none there")
        cap = _capability(device)
        if cap < FP8_MIN_CAPABILITY:
            raise QuantizationUnavailable(
                f"quantization: fp8 needs a GPU of compute capability 8.9 or more; {device} has "
                f"{cap[0]}.{cap[1]}. Use bnb-8bit, or quantization: none")
        matmul = _ensure_fp8_matmul()
        return {"quantization_config": fp8_config()}, f"fp8 (language model, made at load, 128x128 blocks; matmul: {matmul})"
    if setting in ("bnb-8bit", "bnb-4bit"):
        require("bitsandbytes", f"quantization: {setting}")
        require("accelerate", f"quantization: {setting}")
        _say_bnb_casts_once()
        from transformers import BitsAndBytesConfig

        if setting == "bnb-8bit":
            return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}, "bnb-8bit (bitsandbytes int8)"
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        return {"quantization_config": config}, "bnb-4bit (bitsandbytes nf4)"
    raise JudgeConfigError(f"quantization: unknown value {setting!r}")  # settings.py checked it already


class _Once(logging.Filter):
    """Lets each of a logger's messages through the first time only."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self.seen:
            return False
        self.seen.add(record.msg)
        return True


def _say_bnb_casts_once() -> None:
    """bitsandbytes' int8 matmul logs "inputs will be cast from <dtype> to float16" on every call of
    every layer when the judge's dtype is not float16 (bf16, the default on a GPU): one line per
    layer per decoding step, thousands per batch, in the judge's and each worker's log. Once says it."""
    bnb = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in bnb.filters):
        bnb.addFilter(_Once())


def fp8_config() -> Any:
    """`quantization: fp8`'s config: the language model's layers (most of the weights and of the
    time); the vision tower, whose widths do not all tile into 128x128 blocks, and the output head
    stay in the judge's dtype."""
    from transformers import FineGrainedFP8Config

    return FineGrainedFP8Config(modules_to_not_convert=["model.visual", "lm_head"])


def check_fp8_tiles(model: Any) -> None:
    """After a `quantization: fp8` load: every float8 weight tiles into its blocks. transformers
    quantizes a weight whose sides are not multiples of the block's as it is not, leaving its float8
    layer's scales unset (whatever memory held), so such a judge would score from garbage. Raises
    QuantizationUnavailable naming the first such weight. The released judges tile (their widths
    are multiples of 128); the tiny test judges do not."""
    from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear

    bad = []
    for name, module in model.named_modules():
        block = getattr(module, "block_size", None)
        if not isinstance(module, (FP8Linear, FP8Experts)) or not block:
            continue
        for attr in ("weight", "gate_up_proj", "up_proj", "down_proj"):
            w = getattr(module, attr, None)
            if w is not None and w.dim() >= 2 and (w.shape[-2] % block[0] or w.shape[-1] % block[1]):
                bad.append(f"{name}.{attr} ({w.shape[-2]}x{w.shape[-1]}; blocks {block[0]}x{block[1]})")
    if bad:
        raise QuantizationUnavailable(
            f"quantization: fp8 makes float8 weights in blocks, and {len(bad)} of this judge's weights do not tile "
            f"into them, e.g. {bad[0]}: transformers would leave them without their scales. Use quantization: none "
            "or bnb-8bit for this judge")


def _capability(device: str) -> tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def _ensure_fp8_matmul() -> str:
    """Make sure FP8 layers have a matmul: transformers' kernel when it loads, else torch's."""
    from transformers.integrations import finegrained_fp8 as f8

    installed = getattr(f8, "_FINEGRAINED_FP8", None)
    if installed is not None and installed.matmul is _dequantized_matmul:  # an earlier load in this process
        return TORCH_MATMUL
    try:
        f8.load_finegrained_fp8_kernel()
        return "transformers' finegrained-fp8 kernel"
    except Exception as e:  # ImportError without `kernels`; a network error without the hub
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    if not (hasattr(f8, "_FINEGRAINED_FP8") and hasattr(f8, "FineGrainedFP8")):
        raise QuantizationUnavailable(
            f"quantization: fp8: transformers' FP8 kernel cannot load ({why}), and this transformers version "
            "has no place for the torch fallback; install the `kernels` package with network access, "
            "or use quantization: none")
    f8._FINEGRAINED_FP8 = f8.FineGrainedFP8(matmul=_dequantized_matmul, batched_matmul=_dequantized_batched_matmul,
                                            grouped_matmul=_dequantized_grouped_matmul)
    log.warning("quantization fp8: transformers' FP8 kernel is not available (%s); FP8 layers dequantize "
                "their weights for each matmul (torch only: same memory saving, slower)", why)
    return TORCH_MATMUL


def dequantize(weight: Any, scale_inv: Any, block_size: Any, dtype: Any) -> Any:
    """float8 weight (N, K) and its per-block inverse scales -> a (N, K) tensor of `dtype`."""
    import torch

    if weight.dtype == torch.int8:
        raise NotImplementedError("FP4-packed weights need transformers' FP8 kernel (the kernels package)")
    w = weight.to(dtype)
    scale = scale_inv.to(torch.float32).to(dtype)
    if block_size is None or scale.numel() == 1:
        return w * scale.reshape(())
    n, k = weight.shape[-2:]
    bn, bk = int(block_size[0]), int(block_size[1])
    full = scale.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return w * full


def _dequantized_matmul(input: Any, weight: Any, weight_scale_inv: Any, block_size: Any, output_dtype: Any = None,
                        activation_scale: Any = None) -> Any:
    """The kernel's `matmul_2d(input, weight, scale_inv, block_size, out_dtype)`, in torch: input
    (..., K) @ weight.T. Activations stay in their dtype (no activation quantization)."""
    import torch.nn.functional as F

    dtype = output_dtype or input.dtype
    return F.linear(input.to(dtype), dequantize(weight, weight_scale_inv, block_size, dtype))


def _dequantized_grouped_matmul(input: Any, weight: Any, weight_scale_inv: Any, offsets: Any, tokens_per_expert: Any = None,
                                block_size: Any = None, **_: Any) -> Any:
    """The kernel's `matmul_grouped`, in torch: input (S, K), its rows sorted by expert, expert e's rows
    ending at offsets[e], times weight[e].T of the float8 weights (E, N, K): (S, N). All of the layer's
    experts are dequantized at once (a transient (E, N, K) tensor in the compute dtype), then
    transformers' grouped matmul runs as it does for unquantized experts."""
    import torch
    from transformers.integrations.moe import _grouped_linear

    w = dequantize(weight, weight_scale_inv, block_size, input.dtype)
    return _grouped_linear(input, w, offsets.to(torch.int32))


def _dequantized_batched_matmul(input: Any, weight: Any, weight_scale_inv: Any, block_size: Any = None,
                                expert_ids: Any = None, **_: Any) -> Any:
    """The kernel's `matmul_batched`, in torch: row i of input (S, K) times weight[expert_ids[i]].T:
    (S, N). The rows are sorted by expert and run as the grouped matmul, then put back in order."""
    import torch

    num_experts = weight.shape[0]
    ids, perm = torch.sort(expert_ids)
    # histc, not bincount: no host sync (floats on the CPU, integers on CUDA)
    counts = torch.histc(ids.int() if ids.is_cuda else ids.float(), bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    rows = _dequantized_grouped_matmul(input[perm], weight, weight_scale_inv, offsets, block_size=block_size)
    return torch.empty_like(rows).index_copy_(0, perm, rows)
