"""The Qwen3-VL vision tower's per-image geometry (position-embedding interpolation taps and
weights, rotary position ids), worked out once per image size and kept on the device, instead of
on every forward pass.

Why: at the start of every batch the tower derives these from `image_grid_thw` on the GPU: the
rotary position ids image by image (a `tolist()`, then ~8 small launches per image), the
interpolation taps through `repeat_interleave` (host syncs), and the attention segments. The GPU
has nothing else queued then, so it idles while the host makes ~300 launches and ~10 syncs per
batch (`benchmarks/profile_gpu.py --stages gaps`: `get_vision_position_ids` and
`get_vision_interpolation_indices_and_weights` on Qwen3-VL-30B-A3B, benchmarks/NOTES.md).

What it computes: the same tensors, by the same transformers functions. Each depends only on its
own image's grid (the batch's tensors are the images' concatenated, in order), so each image
size's are worked out once on the host, from a one-image CPU grid, and kept on the device; a
batch's are one concatenation per tensor, handed to the tower through the keyword arguments its
helpers take precomputed values from. The attention segments and their longest length come from
the grid's host copy, the one sync left. Only the Qwen3-VL family's tower (Qwen3-VL,
Qwen3-VL-MoE) is wrapped; other towers are left alone.
"""
from __future__ import annotations

import types
from typing import Any

_KEYS = ("interp_indices", "interp_weights", "position_ids", "cu_seqlens", "max_seqlen")
_MAX_SIZES = 4096  # image sizes kept (each ~30 KB per 1,000 patches on the device)


def install(model: Any) -> bool:
    """Wrap the loaded judge's Qwen3-VL vision tower (its own forward); True where it applied. A
    forward already set on the tower (an accelerate hook on a judge spread over GPUs) is kept."""
    tower = getattr(getattr(model, "model", model), "visual", None)
    if tower is None or "forward" in vars(tower) or not all(
            hasattr(tower, a) for a in ("num_grid_per_side", "interpolation_mode", "interpolation_align_corners",
                                        "spatial_merge_size", "deepstack_visual_indexes")):
        return False
    try:
        from transformers import vision_utils
    except ImportError:
        return False
    if not all(hasattr(vision_utils, f) for f in ("get_vision_interpolation_indices_and_weights",
                                                  "get_vision_position_ids", "get_vision_attention_seqlens")):
        return False
    tower._judge_geometry = {}
    tower.forward = types.MethodType(_forward, tower)
    return True


def uninstall(model: Any) -> None:
    """The tower's own forward again (benchmarks switch it to compare)."""
    tower = model.model.visual
    vars(tower).pop("forward", None)


def _per_image(tower: Any, grid: tuple[int, int, int], device: Any) -> tuple[Any, Any, Any]:
    """(interpolation taps, their weights, rotary position ids) of one image size, on the device."""
    import torch
    from transformers import vision_utils as vu

    kept = tower._judge_geometry
    out = kept.get(grid)
    if out is None:
        g = torch.tensor([grid], dtype=torch.long)
        idx, w = vu.get_vision_interpolation_indices_and_weights(
            g, num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
            align_corners=tower.interpolation_align_corners, spatial_merge_size=tower.config.spatial_merge_size)
        pos = vu.get_vision_position_ids(g, tower.spatial_merge_size)
        out = tuple(t.to(device) for t in (idx, w, pos))
        if len(kept) >= _MAX_SIZES:
            kept.clear()
        kept[grid] = out
    return out


def geometry(tower: Any, grid_thw: Any) -> dict[str, Any]:
    """The tower's precomputed keyword arguments for a batch of images (grid_thw: (images, 3))."""
    import torch
    from transformers import vision_utils as vu

    grids = [tuple(g) for g in grid_thw.tolist()]  # the one host sync
    parts = [_per_image(tower, g, grid_thw.device) for g in grids]
    cu_seqlens, max_seqlen = vu.get_vision_attention_seqlens(torch.tensor(grids, dtype=torch.long), tower.config)
    cat = (lambda ts: ts[0]) if len(parts) == 1 else torch.cat
    return {"interp_indices": cat([p[0] for p in parts]), "interp_weights": cat([p[1] for p in parts]),
            "position_ids": cat([p[2] for p in parts]), "cu_seqlens": cu_seqlens.to(grid_thw.device, non_blocking=True),
            "max_seqlen": max_seqlen}


def _forward(self, hidden_states, grid_thw, **kwargs):
    if not any(k in kwargs for k in _KEYS):
        kwargs.update(geometry(self, grid_thw))
    return type(self).forward(self, hidden_states, grid_thw, **kwargs)
