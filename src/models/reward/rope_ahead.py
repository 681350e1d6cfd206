"""The Qwen-VL judges' multimodal rope positions of a batch, worked out on the host while the batch
is prepared, instead of on the GPU inside the forward pass.

Why: the model's `get_rope_index` walks the batch prompt by prompt on the device tensors: per
prompt a boolean mask of its tokens, a `tolist()` of its token types, three `item()` calls per
image, a dozen small tensors and an indexed write. Each `tolist()`, `item()` and mask is a host
sync, and the walk runs between the vision tower and the language model, so the GPU waits for it:
on an H200, a profiled Qwen3-VL-8B logits call of one batch of 32 prompts had 1,716 idle stretches,
most ended by this walk's small launches; with the walk done ahead, a call of two batches had 619
(`benchmarks/profile_gpu.py --stages gaps`, benchmarks/NOTES.md).

What it computes: the same positions and deltas, by the same method. The model's own
`get_rope_index` runs on the processor's CPU tensors (integers only: the result is identical),
in the prepare thread, while the GPU works on the previous batch. Its results travel with the
batch's processor output under two private keys (`carry`), which the engine takes out once the
batch is on the device (`take`), filed under that batch's `input_ids` tensor for as long as it
lives. The wrapped `get_rope_index` on the loaded model returns them, on the device, when it is
asked about that exact tensor, as the model's forward pass asks; for any other tensor it runs
the original.

Where: logits mode, whose batches are one forward pass each, so the walk sat between the vision
tower and the language model of every batch (measured: 1.026x on Qwen3-VL-30B-A3B, neutral on
the 8B). Not generate mode: there the walk runs once per prompt at its prefill, and doing it
ahead measured ~1% slower on the 8B under continuous batching (benchmarks/NOTES.md).
"""
from __future__ import annotations

import inspect
import logging
import weakref
from typing import Any

log = logging.getLogger("src.models.reward.engine")

POSITIONS = "_judge_rope_positions"  # (3, batch, tokens), as get_rope_index gives them
DELTAS = "_judge_rope_deltas"  # (batch, 1)
_FROM_INPUTS = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts",
                "attention_mask")


class RopeAhead:
    """The rope positions of each batch worked out ahead on the host, given back to the model."""

    def __init__(self, base: Any):
        self._base = base
        self._original = base.get_rope_index
        params = inspect.signature(self._original).parameters
        self._args = [k for k in _FROM_INPUTS if k in params]
        self._ready = ByBatch()  # (positions, deltas) per batch on the device
        self._failed = False  # carry failed once: warned
        self.used = 0  # forward passes given positions worked out ahead (read by tests and benchmarks)
        self.wrap()

    @staticmethod
    def install(model: Any) -> "RopeAhead | None":
        """Wrap the loaded judge's `get_rope_index` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE);
        None for a model without one."""
        base = getattr(model, "model", None)
        if base is None or not callable(getattr(base, "get_rope_index", None)):
            return None
        return RopeAhead(base)

    def wrap(self) -> None:
        """The model's `get_rope_index` through this object (again, after `uninstall`)."""
        self._base.get_rope_index = self.get_rope_index

    def uninstall(self) -> None:
        """The model's own `get_rope_index` again (benchmarks switch it to compare)."""
        self._base.__dict__.pop("get_rope_index", None)

    def carry(self, inputs: Any) -> None:
        """In the prepare thread, on the processor's output (CPU tensors): work out the batch's
        positions and deltas, and keep them in `inputs` for `take`. A batch without images is
        left alone (the model computes text positions without the walk)."""
        import torch

        if inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None:
            return
        kwargs = {k: inputs[k] for k in self._args if inputs.get(k) is not None}
        kwargs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        try:
            positions, deltas = self._original(**kwargs)
        except Exception as e:  # the model works them out itself, as without this module
            if not self._failed:
                log.warning("rope positions on the host failed (%s: %s); the model works them out on the GPU",
                            type(e).__name__, e)
            self._failed = True
            return
        inputs[POSITIONS], inputs[DELTAS] = positions, deltas

    def take(self, inputs: Any) -> Any:
        """On the main thread, with the batch on the device: take the results `carry` kept out of
        `inputs` (the model must not see them) and file them under its `input_ids`."""
        positions, deltas = inputs.pop(POSITIONS, None), inputs.pop(DELTAS, None)
        if positions is not None and self._base.__dict__.get("get_rope_index") == self.get_rope_index:
            self._ready.put(inputs["input_ids"], (positions, deltas))
        return inputs

    def get_rope_index(self, input_ids: Any, *args: Any, **kwargs: Any):
        ready = self._ready.get(input_ids)
        if ready is None:
            return self._original(input_ids, *args, **kwargs)
        positions, deltas = ready
        self.used += 1
        device = input_ids.device
        return (positions.to(device, non_blocking=True), deltas.to(device, non_blocking=True))


class ByBatch:
    """Values filed under a batch's `input_ids` tensor on the device, for as long as that tensor
    lives, and found by that very tensor (another with equal values is another batch). Keyed by
    id() with a weak reference to check it: not a WeakKeyDictionary, which compares keys with ==,
    which a tensor answers elementwise. (mask_ahead.py files its positions here too.)"""

    def __init__(self) -> None:
        self._table: dict[int, tuple[Any, Any]] = {}

    def put(self, ids: Any, value: Any) -> None:
        self._table = {k: v for k, v in self._table.items() if v[0]() is not None}  # batches gone
        self._table[id(ids)] = (weakref.ref(ids), value)

    def get(self, ids: Any) -> Any:
        """The value filed under this tensor, or None."""
        ref, value = self._table.get(id(ids), (None, None))
        return value if ref is not None and ref() is ids else None
