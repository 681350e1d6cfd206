"""The image placeholders of a Qwen-VL batch, found on the host while the batch is prepared: the
check that their count matches the vision tower's output, and Qwen3-VL's deepstack positions,
without a host sync inside the forward pass.

Why: after the vision tower, the model's `get_placeholder_mask` counts the prompts' image tokens
on the GPU and compares the count with the features' size (`bool()` of a device tensor, and the
count formatted into the error message whether or not it is raised: host syncs that wait for the
whole tower), and Qwen3-VL's language model adds the deepstack features at the image tokens of its
first layers through a boolean mask (`hidden_states[mask]`: a `nonzero`, a host sync, in each of
three layers). After each sync the GPU idles until the host has launched work again, and while
the prepare thread prepares the next chunk the host is slow to do so (the two threads share the
interpreter). On one H200, a 128-item logits call of Qwen3-VL-30B-A3B took ~575 ms a 32-item chunk
while the next chunk was prepared beside it and 499 ms for the last chunk, prepared by then;
part of the difference is the GPU waiting after these syncs (benchmarks/NOTES.md).

What it computes: the same masks (`input_ids == image_token_id`, on the device), the count checked
on the host (the positions' number, from the processor's CPU `input_ids`, against the features'
rows, known from their shape; a mismatch goes to the model's own check and its error), and the
deepstack sums at the same positions, in the mask's order, by the same additions (integer indices
instead of a boolean mask).

Where: logits mode, as rope_ahead.py (the same carry and take, the same batches); any batch it did
not carry, or with videos, goes to the model's own code.
"""
from __future__ import annotations

from typing import Any

from .rope_ahead import ByBatch

POSITIONS = "_judge_image_positions"  # the image tokens' flat positions in (batch, tokens)


class MaskAhead:
    """Each batch's image-token positions found ahead on the host, given to the model's mask check
    and deepstack layers."""

    def __init__(self, base: Any, text: Any):
        self._base = base  # the model's inner model: get_placeholder_mask
        self._text = text  # its language model: _deepstack_process (Qwen3-VL), or None
        self._mask_original = base.get_placeholder_mask
        self._deep_original = text._deepstack_process if text is not None else None
        self._image_token = base.config.image_token_id
        self._video_token = getattr(base.config, "video_token_id", None)
        self._batches = ByBatch()  # the image tokens' positions per batch on the device, from `take`
        # The last mask made here and its positions, for the deepstack layers, which get a view of it.
        # Held, not weakly referenced: under inference mode that view does not name the tensor it
        # views, which is gone by then; held, its memory is no other tensor's.
        self._mask: tuple[Any, Any] | None = None
        self.used = 0  # forward passes whose mask check ran on the host (read by tests and benchmarks)
        self.wrap()

    @staticmethod
    def install(model: Any) -> "MaskAhead | None":
        """Wrap the loaded judge's `get_placeholder_mask` (and Qwen3-VL's `_deepstack_process`);
        None for a model without them."""
        base = getattr(model, "model", None)
        config = getattr(base, "config", None)
        if not callable(getattr(base, "get_placeholder_mask", None)) or getattr(config, "image_token_id", None) is None:
            return None
        text = getattr(base, "language_model", None)
        return MaskAhead(base, text if callable(getattr(text, "_deepstack_process", None)) else None)

    def wrap(self) -> None:
        """The model's methods through this object (again, after `uninstall`)."""
        self._base.get_placeholder_mask = self.get_placeholder_mask
        if self._text is not None:
            self._text._deepstack_process = self._deepstack_process

    def uninstall(self) -> None:
        """The model's own methods again (benchmarks switch it to compare)."""
        self._base.__dict__.pop("get_placeholder_mask", None)
        if self._text is not None:
            self._text.__dict__.pop("_deepstack_process", None)

    def carry(self, inputs: Any) -> None:
        """In the prepare thread, on the processor's output (CPU tensors): the image tokens'
        positions, kept in `inputs` for `take`. A batch without images is left alone."""
        ids = inputs.get("input_ids")
        if ids is None or inputs.get("image_grid_thw") is None:
            return
        inputs[POSITIONS] = (ids.cpu() == self._image_token).view(-1).nonzero().view(-1)

    def take(self, inputs: Any) -> Any:
        """On the main thread, with the batch on the device: take the positions out of `inputs`
        (the model must not see them) and file them under its `input_ids`."""
        positions = inputs.pop(POSITIONS, None)
        if positions is not None and self._base.__dict__.get("get_placeholder_mask") == self.get_placeholder_mask:
            self._batches.put(inputs["input_ids"], positions)
        return inputs

    def get_placeholder_mask(self, input_ids: Any, inputs_embeds: Any = None, image_features: Any = None,
                             video_features: Any = None):
        positions = self._batches.get(input_ids)
        if (positions is None or image_features is None or video_features is not None
                or self._video_token is None
                or positions.numel() * inputs_embeds.shape[-1] != image_features.numel()):
            return self._mask_original(input_ids, inputs_embeds=inputs_embeds, image_features=image_features,
                                       video_features=video_features)
        image = input_ids == self._image_token
        self._mask = (image, positions)
        self.used += 1
        return image.unsqueeze(-1), (input_ids == self._video_token).unsqueeze(-1)

    def _deepstack_process(self, hidden_states: Any, visual_pos_masks: Any, visual_embeds: Any):
        import torch

        # The model passes a view of the mask get_placeholder_mask made (image_mask[..., 0]): the same
        # memory, read the same way.
        mask, positions = self._mask if self._mask is not None else (None, None)
        if (mask is None or mask.data_ptr() != visual_pos_masks.data_ptr() or mask.device != visual_pos_masks.device
                or mask.shape != visual_pos_masks.shape or mask.stride() != visual_pos_masks.stride()):
            return self._deep_original(hidden_states, visual_pos_masks, visual_embeds)
        positions = positions.to(hidden_states.device, non_blocking=True)
        visual_embeds = visual_embeds.to(hidden_states.device, hidden_states.dtype)
        # A copy laid out row after row, whatever the strides it came with (a compiled layer's
        # output may have others), so that the rows can be indexed as one matrix.
        hidden_states = hidden_states.clone(memory_format=torch.contiguous_format)
        rows = hidden_states.view(-1, hidden_states.shape[-1])
        rows[positions] = rows[positions] + visual_embeds
        return hidden_states
