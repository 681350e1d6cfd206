"""Each unique image through the vision tower once per chunk of a call, and once while its
features stay in a byte-bounded store that outlives the chunk and the call.

Why: a rubric's parts often show the same image (the `edit` rubric asks two questions of the edited
image), and items often share one (a benchmark's source images, shown again for each editing model
scored). Each prompt batch used to run the vision tower on every image it shows, so an edit item
paid for three images where two are involved, and a source image shown by items of different
chunks or calls was encoded once in each of them.

Which items share a chunk: the engine cuts a call's chunks with the items that share source
images side by side (grouping.py), so a source shown again for each editing model scored in one
call meets its edits in one chunk (two where its group straddles a chunk's end) and goes through
the tower once there, whatever the kept store below holds (a benchmark's hundreds of sources
overflow it). The kept store is for the rest: a source shown again in a later call, by the next
chunk, or as another item's image.

What it computes: the same features. The Qwen-VL vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Qwen3-VL-MoE) encode each image on its own (attention runs within one image's patches: segments of
cu_seqlens, or windows inside it), so an image's features do not depend on which other images
share its forward pass. The model's `get_image_features` is wrapped on the loaded instance: the
images of a batch are named by a digest of their resized pixels (which is all the processor reads),
the ones not yet encoded run through the tower in one call, and every image's features (and
Qwen3-VL's deepstack features) are put back together in the batch's order. Where the model's method
is transformers' as this module knows it (`_encode`), the tower runs here and its output is split by
the sizes known on the host, which the method would read back from the GPU right after launching
the tower (a host sync); any other method runs as it is.

Where features are kept, between the batches that show an image:
    chunk store   while a later batch of the same chunk (under continuous batching: of the call's
                  chunks pulled so far) still shows the image; no byte bound: it is what the
                  chunk's remaining batches need, as views into the batch's feature tensors.
    kept          (`vision_cache_mb`) features that left the chunk store, or the chunk, go here,
                  each copied to its own tensors so its bytes are what it holds; least recently
                  used first out once the bytes would exceed the budget (an image larger than the
                  budget is not kept), images under judgement before source images: an image
                  under judgement makes room only by pushing out others under judgement, and is
                  not kept when the rest is sources. A benchmark shows its source images again
                  for every editing model it scores, while an edited image rarely comes back
                  after its item; by recency alone, a pass over S sources and their S edits that
                  overflows the budget would push each source out just before its next showing.
                  A lookup tries the chunk store, then this one; a hit moves the features back
                  into use (and, when they leave again, to the most recent end) and counts as
                  reused. It lives across calls: the digests name resized pixels,
                  and the loaded judge's weights do not change (code that trains a judge's weights
                  in place must not keep features: vision_cache_mb 0, or `clear()` after each step).
                  Emptied on close(), when reuse is switched off (`enabled = False`), on any out of
                  memory (before the retry), when the tower starts or stops running compiled, and,
                  under max_memory_gb, as far as a full batch needs the room (batching.py counts the
                  kept bytes as resident).

It saves tower passes (`encoded` counts them, `reused` counts images served from a store);
benchmarks/NOTES.md (issue 17) has the kept store's measured effect on a GPU, and the grouping's
prediction.

Where it does not apply (another model type, a transformers whose method looks different, a call
the engine did not announce) the original method runs unchanged; where the model calls the method
with arguments this module does not know, it runs unchanged after one warning.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter, OrderedDict
from typing import Any

log = logging.getLogger("src.models.reward.engine")

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# Arguments the model's forward hands get_image_features that do not change an image's features
# (transformers 5.2x's Qwen3-VL-MoE hands it the text router's output_router_logits); any other
# argument and the original method runs unchanged, after one warning.
_PASSED = ("return_dict", "use_cache", "output_router_logits")

# One image's features: the pooled features, and Qwen3-VL's deepstack features (None elsewhere).
Features = tuple[Any, "list[Any] | None"]


def image_key(image: Any) -> str:
    """A name for a resized PIL image: equal for equal pixels (size, mode and bytes)."""
    h = hashlib.blake2b(image.tobytes(), digest_size=16)
    h.update(f"{image.size}{image.mode}".encode())
    return h.hexdigest()


class VisionReuse:
    """The feature stores of one loaded model, and the wrapper around its get_image_features.

    cache_bytes: the byte budget of the store kept across chunks and calls (0: none kept)."""

    def __init__(self, model: Any, cache_bytes: float = 0):
        self.inner = model.model
        self.original = self.inner.get_image_features  # bound method of the instance's class
        self.merge = int(self.inner.visual.spatial_merge_size)
        self.cache_bytes = cache_bytes
        self._enabled = True
        self.keys: list[str] | None = None  # the images of the forward about to run, in order
        self.remaining: Counter = Counter()  # uses still to come in this chunk, per image
        self.store: dict[str, Features] = {}  # the chunk store
        # (features, bytes, shown as a source image), oldest use first
        self.kept: OrderedDict[str, tuple[Features, int, bool]] = OrderedDict()
        self.sources: set[str] = set()  # images shown as source images by the chunk (the call, continuous)
        self.kept_bytes = 0
        self.output_type: type | None = None
        self.encoded = 0  # images run through the tower (for tests and the benchmark)
        self.reused = 0   # images whose features came from a store
        form = _known_form(type(self.inner))
        self._split_here = form is not None
        # How the model's forward takes Qwen3-VL's deepstack features: one tensor per layer, all
        # images together (transformers <= 5.17), or per layer a tuple of per-image tensors (later
        # releases). Known from the method's form, else from the first output of the method itself.
        self._deep_per_image: bool | None = form
        self._refused: str | None = None  # why an announced forward ran the original method (warned once)
        self.inner.get_image_features = self.get_image_features

    @staticmethod
    def install(model: Any, cache_bytes: float = 0) -> "VisionReuse | None":
        if getattr(model.config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            return None
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "get_image_features") or \
                not hasattr(getattr(inner, "visual", None), "spatial_merge_size"):
            return None
        return VisionReuse(model, cache_bytes)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        """Off: the original method runs, and nothing is kept."""
        self._enabled = bool(on)
        if not on:
            self.clear()

    def clear(self) -> None:
        """Drop every kept feature (both stores); what is shown next is encoded again."""
        self.store.clear()
        self.kept.clear()
        self.kept_bytes = 0

    def shrink_to(self, nbytes: float, sources: bool = True) -> bool:
        """Evict kept features until they hold at most nbytes: the least recently used image under
        judgement first, then (only if `sources`) the least recently used source image. Returns
        whether they now fit."""
        while self.kept and self.kept_bytes > nbytes:
            key = next((k for k, (_, _, src) in self.kept.items() if not src), None)
            if key is None:
                if not sources:
                    return False
                key = next(iter(self.kept))
            _, n, _ = self.kept.pop(key)
            self.kept_bytes -= n
        return self.kept_bytes <= nbytes

    def begin_chunk(self, keys: list[str], sources: set[str] | frozenset = frozenset()) -> None:
        """A chunk starts: `keys` its prompts' images (one per showing), `sources` the ones shown as
        source images."""
        self._release_chunk()
        self.remaining = Counter(keys)
        self.sources = set(sources)

    def add_uses(self, keys: list[str], sources: set[str] | frozenset = frozenset()) -> None:
        """More prompts to come show these images (continuous batching pulls a call's chunks into
        one decode): features already kept stay while any prompt still to come shows them."""
        self.remaining.update(keys)
        self.sources.update(sources)

    def end_chunk(self) -> None:
        self._release_chunk()
        self.remaining.clear()
        self.sources = set()
        self.keys = None

    def _release_chunk(self) -> None:
        # Features the chunk kept for uses that never came (a prompt that failed before its forward)
        # go to the kept store. Their writes are done: the chunk's batches have run, or the decode
        # that ran them has returned (or failed, and then engine._free_memory emptied the stores).
        for k, f in list(self.store.items()):
            self._keep(k, f)
        self.store.clear()

    def _keep(self, key: str, feats: Features) -> None:
        """Into the kept store, as the most recently used; the oldest leave while over the budget
        (images under judgement first; an image under judgement is not kept where only source
        images could make room for it)."""
        old = self.kept.pop(key, None)
        if old is not None:
            self.kept_bytes -= old[1]
        if self.cache_bytes <= 0:
            return
        source = key in self.sources or (old is not None and old[2])
        pooled, deep = feats
        # Own tensors: a view into the batch's features would hold the whole batch's memory.
        own = [t if t.untyped_storage().nbytes() == t.nbytes else t.clone() for t in (pooled, *(deep or ()))]
        n = sum(t.nbytes for t in own)
        if n > self.cache_bytes or not self.shrink_to(self.cache_bytes - n, sources=source):
            return
        self.kept[key] = ((own[0], own[1:] if deep is not None else None), n, source)
        self.kept_bytes += n

    def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
        keys, self.keys = self.keys, None
        if not self._enabled or keys is None:
            return self.original(pixel_values, image_grid_thw, **kwargs)
        other = sorted(k for k in kwargs if k not in _PASSED)
        if image_grid_thw is None or len(keys) != len(image_grid_thw) or other or \
                kwargs.get("return_dict", True) is not True:
            why = (f"the model passes it {', '.join(other)}" if other else "return_dict is not True"
                   if image_grid_thw is not None and len(keys) == len(image_grid_thw)
                   else "its images are not the batch's")
            if self._refused is None:
                self._refused = why
                log.warning("vision_reuse: the vision tower encodes every image of each batch instead, because "
                            "%s.get_image_features is called differently than this library knows: %s",
                            type(self.inner).__name__, why)
            return self.original(pixel_values, image_grid_thw, **kwargs)
        import torch

        for k in keys:
            self.remaining[k] -= 1
        patches = image_grid_thw.prod(-1).tolist()
        starts = [0]
        for n in patches:
            starts.append(starts[-1] + n)
        held: dict[str, Features] = {}  # features from a store: this chunk's, else the kept one
        first: dict[str, int] = {}  # images to encode: their first row in the batch
        for i, k in enumerate(keys):
            if k in held or k in first:
                continue
            if k in self.store:
                held[k] = self.store[k]
            elif k in self.kept:
                f, n, src = self.kept.pop(k)  # in use again: back in the kept store when it leaves (as newest)
                self.kept_bytes -= n
                if src:
                    self.sources.add(k)  # still a source image when it is kept again
                held[k] = f
            else:
                first[k] = i
        fresh: dict[str, Features] = {}
        if first:
            rows = list(first.values())
            pix = pixel_values if len(rows) == len(keys) else \
                torch.cat([pixel_values[starts[i]:starts[i + 1]] for i in rows])
            sizes = [patches[i] // self.merge ** 2 for i in rows]
            out = self._encode(pix, image_grid_thw[rows], sizes, dict(kwargs, return_dict=True))
            self.output_type = type(out)
            deep = getattr(out, "deepstack_features", None)
            if deep is not None and self._deep_per_image is None:
                self._deep_per_image = not isinstance(deep[0], torch.Tensor)
            # Per layer, each image's rows: split here, or already split by the method.
            deep_split = [torch.split(d, sizes) if isinstance(d, torch.Tensor) else d for d in deep] \
                if deep is not None else None
            for j, k in enumerate(first):
                fresh[k] = (out.pooler_output[j], [d[j] for d in deep_split] if deep_split is not None else None)
            self.encoded += len(rows)
        live = {k: fresh[k] if k in fresh else held[k] for k in dict.fromkeys(keys)}  # the batch's order
        feats = [live[k] for k in keys]
        self.reused += len(keys) - len(first)
        if pixel_values.is_cuda:
            # Kept features may come from a forward on another stream (continuous batching prefills
            # prompts ahead on a second stream), in this chunk or an earlier one: their memory must
            # not be handed out again before this stream has read them, even if they leave a store
            # (evicted, or copied into the kept store) below. (That this stream reads them only
            # after they were written is the decode's part within a call, row_decode.run_continuous;
            # across chunks and calls the writes are done: their results were read back.)
            stream = torch.cuda.current_stream(pixel_values.device)
            for pooled, deep in held.values():
                for t in (pooled, *(deep or ())):
                    t.record_stream(stream)
        for k, f in live.items():  # the kept store's recency follows the batch's order
            if self.remaining[k] > 0:
                self.store[k] = f
            else:
                self.store.pop(k, None)
                self._keep(k, f)
        result = {"pooler_output": tuple(f[0] for f in feats)}
        if feats[0][1] is not None:
            layers = range(len(feats[0][1]))
            result["deepstack_features"] = [tuple(f[1][d] for f in feats) for d in layers] if self._deep_per_image \
                else [torch.cat([f[1][d] for f in feats]) for d in layers]
        return self.output_type(**result)

    def _encode(self, pixel_values, grid, sizes: list[int], kwargs: dict[str, Any]):
        """The original method on these images: its tower, and its output split per image. The
        four judges' method reads the split sizes back from the device grid (`.tolist()`) right
        after launching the tower, a host sync that waits for the whole tower while the host could
        be launching the language model; the sizes are known here, so where the method is that one
        the tower runs and its output is split here, as the method does."""
        if not self._split_here:
            return self.original(pixel_values, grid, **kwargs)
        import torch

        visual = self.inner.visual
        passed = {k: v for k, v in kwargs.items() if k != "return_dict"}  # the method's decorator takes it
        out = visual(pixel_values.type(visual.dtype), grid_thw=grid, return_dict=True, **passed)
        out.pooler_output = torch.split(out.pooler_output, sizes)
        if self._deep_per_image and getattr(out, "deepstack_features", None) is not None:
            out.deepstack_features = [torch.split(d, sizes) for d in out.deepstack_features]
        return out


def _splits_after_the_tower(cls: type) -> bool:
    """Whether cls.get_image_features is transformers' method of the four judges as this module
    knows it (5.x): the tower on the pixels in its dtype, its pooled output (and Qwen3-VL's
    deepstack features, in later releases) split by the grid's sizes, nothing else. Compared
    statement by statement; any other method runs as it is."""
    return _known_form(cls) is not None


def _known_form(cls: type) -> bool | None:
    """None where cls.get_image_features is not a method this module knows (_splits_after_the_tower),
    else whether it splits the deepstack features per image too."""
    import ast
    import inspect
    import textwrap

    try:
        fn = ast.parse(textwrap.dedent(inspect.getsource(cls.get_image_features))).body[0]
    except (AttributeError, OSError, TypeError, SyntaxError, IndexError):
        return None
    body = [st for st in getattr(fn, "body", []) if not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))]
    return _SPLIT_AFTER_THE_TOWER.get("; ".join(ast.unparse(st) for st in body))


_SPLIT = "split_sizes = (image_grid_thw.prod(-1) // self.visual.spatial_merge_size ** 2).tolist()"
_QWEN3_TOWER = ("pixel_values = pixel_values.type(self.visual.dtype); "
                "vision_output: BaseModelOutputWithDeepstackFeatures = self.visual(pixel_values, "
                "grid_thw=image_grid_thw, return_dict=True, **kwargs); image_embeds = vision_output.pooler_output; "
                + _SPLIT + "; ")
# The known methods' statements -> whether the method splits the deepstack features per image too.
_SPLIT_AFTER_THE_TOWER = {
    # Qwen2-VL, Qwen2.5-VL, transformers <= 5.17
    "pixel_values = pixel_values.type(self.visual.dtype); "
    "vision_outputs = self.visual(pixel_values, grid_thw=image_grid_thw, **kwargs); " + _SPLIT + "; "
    "image_embeds = torch.split(vision_outputs.pooler_output, split_sizes); "
    "vision_outputs.pooler_output = image_embeds; return vision_outputs": False,
    # Qwen2-VL, Qwen2.5-VL, later releases (5.25)
    "pixel_values = pixel_values.type(self.visual.dtype); "
    "vision_outputs = self.visual(pixel_values, grid_thw=image_grid_thw, **kwargs); " + _SPLIT + "; "
    "vision_outputs.pooler_output = torch.split(vision_outputs.pooler_output, split_sizes); "
    "return vision_outputs": False,
    # Qwen3-VL, Qwen3-VL-MoE, transformers <= 5.17: the deepstack features stay whole
    _QWEN3_TOWER + "image_embeds = torch.split(image_embeds, split_sizes); vision_output.pooler_output = image_embeds; "
    "return vision_output": False,
    # Qwen3-VL, Qwen3-VL-MoE, later releases (5.25): the deepstack features split per image too
    _QWEN3_TOWER + "vision_output.pooler_output = torch.split(image_embeds, split_sizes); "
    "vision_output.deepstack_features = [torch.split(feat, split_sizes) for feat in vision_output.deepstack_features]; "
    "return vision_output": True,
}
