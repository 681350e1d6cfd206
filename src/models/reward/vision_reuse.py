"""Each unique image through the vision tower once per chunk of a call.

Why: a rubric's parts often show the same image (the `edit` rubric asks two questions of the edited
image), and items often share one (a benchmark's source images). Each prompt batch used to run the
vision tower on every image it shows, so an edit item paid for three images where two are involved.

What it computes: the same features. The Qwen-VL vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Qwen3-VL-MoE) encode each image on its own (attention runs within one image's patches: segments of
cu_seqlens, or windows inside it), so an image's features do not depend on which other images
share its forward pass. The model's `get_image_features` is wrapped on the loaded instance: the
images of a batch are named by a digest of their resized pixels (which is all the processor reads),
the ones not yet encoded run through the original method in one call, and every image's features
(and Qwen3-VL's deepstack features) are put back together in the batch's order. Features are kept
only while a later batch of the same chunk still shows that image, so the memory held is what the
chunk's remaining batches need, and nothing outlives the chunk.

Where it does not apply (another model type, a transformers whose method looks different, a call
the engine did not announce) the original method runs unchanged.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Any

log = logging.getLogger("src.models.reward.engine")

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# Arguments the model's forward hands get_image_features that do not change an image's features;
# any other argument and the original method runs unchanged.
_PASSED = ("return_dict", "use_cache")


def image_key(image: Any) -> str:
    """A name for a resized PIL image: equal for equal pixels (size, mode and bytes)."""
    h = hashlib.blake2b(image.tobytes(), digest_size=16)
    h.update(f"{image.size}{image.mode}".encode())
    return h.hexdigest()


class VisionReuse:
    """The feature store of one loaded model, and the wrapper around its get_image_features."""

    def __init__(self, model: Any):
        self.inner = model.model
        self.original = self.inner.get_image_features  # bound method of the instance's class
        self.merge = int(self.inner.visual.spatial_merge_size)
        self.enabled = True
        self.keys: list[str] | None = None  # the images of the forward about to run, in order
        self.remaining: Counter = Counter()  # uses still to come in this chunk, per image
        self.store: dict[str, tuple[Any, list[Any] | None]] = {}
        self.output_type: type | None = None
        self.encoded = 0  # images run through the tower (for tests and the benchmark)
        self.reused = 0   # images whose features came from the store
        self.inner.get_image_features = self.get_image_features

    @staticmethod
    def install(model: Any) -> "VisionReuse | None":
        if getattr(model.config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            return None
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "get_image_features") or \
                not hasattr(getattr(inner, "visual", None), "spatial_merge_size"):
            return None
        return VisionReuse(model)

    def begin_chunk(self, keys: list[str]) -> None:
        self.remaining = Counter(keys)
        self.store.clear()

    def add_uses(self, keys: list[str]) -> None:
        """More prompts to come show these images (continuous batching pulls a call's chunks into
        one decode): features already kept stay while any prompt still to come shows them."""
        self.remaining.update(keys)

    def end_chunk(self) -> None:
        self.remaining.clear()
        self.store.clear()
        self.keys = None

    def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
        keys, self.keys = self.keys, None
        if (not self.enabled or keys is None or image_grid_thw is None or len(keys) != len(image_grid_thw)
                or any(k not in _PASSED for k in kwargs) or kwargs.get("return_dict", True) is not True):
            return self.original(pixel_values, image_grid_thw, **kwargs)
        import torch

        for k in keys:
            self.remaining[k] -= 1
        patches = image_grid_thw.prod(-1).tolist()
        starts = [0]
        for n in patches:
            starts.append(starts[-1] + n)
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in self.store:
                first.setdefault(k, i)
        fresh: dict[str, tuple[Any, list[Any] | None]] = {}
        if first:
            rows = list(first.values())
            pix = pixel_values if len(rows) == len(keys) else \
                torch.cat([pixel_values[starts[i]:starts[i + 1]] for i in rows])
            out = self.original(pix, image_grid_thw[rows], **dict(kwargs, return_dict=True))
            self.output_type = type(out)
            sizes = [patches[i] // self.merge ** 2 for i in rows]
            deep = getattr(out, "deepstack_features", None)
            deep_split = [torch.split(d, sizes) for d in deep] if deep is not None else None
            for j, k in enumerate(first):
                fresh[k] = (out.pooler_output[j], [d[j] for d in deep_split] if deep_split is not None else None)
            self.encoded += len(rows)
        feats = [fresh.get(k) or self.store[k] for k in keys]
        self.reused += len(keys) - len(first)
        if pixel_values.is_cuda:
            # Kept features may come from a forward on another stream (continuous batching prefills
            # prompts ahead on a second stream): their memory must not be handed out again before
            # this stream has read them, even if they leave the store below. (That this stream reads
            # them only after they were written is the decode's part: fast_decode.run_continuous.)
            stream = torch.cuda.current_stream(pixel_values.device)
            for k in set(keys) - fresh.keys():
                pooled, deep = self.store[k]
                for t in (pooled, *(deep or ())):
                    t.record_stream(stream)
        for k, f in fresh.items():
            if self.remaining[k] > 0:
                self.store[k] = f
        for k in set(keys):
            if self.remaining[k] <= 0:
                self.store.pop(k, None)
        result = {"pooler_output": tuple(f[0] for f in feats)}
        if feats[0][1] is not None:
            result["deepstack_features"] = [torch.cat([f[1][d] for f in feats]) for d in range(len(feats[0][1]))]
        return self.output_type(**result)
