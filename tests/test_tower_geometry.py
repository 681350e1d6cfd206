"""The Qwen3-VL tower's per-image geometry worked out once per image size (tower_geometry.py): the
same tensors as the tower's own helpers, the same tower output and scores."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from src.models.reward import tower_geometry
from src.models.reward.implementations.local import QwenVLRewardModel
from src.models.reward.types import ScoreItem


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    sizes = [(224, 168), (120, 260), (300, 120), (224, 168)]  # two of one size: its geometry reused
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
            for w, h in (sizes * 2)[:n]]


def _judge(arch: str) -> QwenVLRewardModel:
    return QwenVLRewardModel(model_name=f"tiny:{arch}", batch_size=4, compile_vision=False, compile_language=False)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe"])
def test_the_geometry_is_the_towers_own_and_so_is_its_output(arch):
    from transformers import vision_utils as vu

    with _judge(arch) as judge:
        eng = judge.engine
        assert eng.tower_geometry is True
        tower = eng.model.model.visual
        chunk = eng._prepare([ScoreItem(images=[im]) for im in _images(4)], [0, 1, 2, 3])
        inputs = eng._encode_cpu(chunk.requests)
        grid = inputs["image_grid_thw"]
        assert len({tuple(g) for g in grid.tolist()}) == 3
        got = tower_geometry.geometry(tower, grid)
        assert sorted(tower._judge_geometry) == sorted({tuple(g) for g in grid.tolist()})
        idx, w = vu.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
            align_corners=tower.interpolation_align_corners, spatial_merge_size=tower.config.spatial_merge_size)
        cu, longest = vu.get_vision_attention_seqlens(grid, tower.config)
        assert torch.equal(got["interp_indices"], idx) and torch.equal(got["interp_weights"], w)
        assert torch.equal(got["position_ids"], vu.get_vision_position_ids(grid, tower.spatial_merge_size))
        assert torch.equal(got["cu_seqlens"], cu) and got["max_seqlen"] == longest
        pixels = inputs["pixel_values"].to(tower.dtype)
        with torch.no_grad():
            ours = tower(pixels, grid_thw=grid)
            theirs = type(tower).forward(tower, pixels, grid_thw=grid)
        assert torch.equal(ours.pooler_output, theirs.pooler_output)
        assert all(torch.equal(a, b) for a, b in zip(ours.deepstack_features, theirs.deepstack_features))


def test_scores_are_the_same_with_the_towers_own_geometry():
    items = [ScoreItem(images=[im]) for im in _images(6, seed=1)]
    with _judge("qwen3_vl") as judge:
        ours = [(r.score, r.error) for r in judge.batch_score(items)]
        assert len(judge.engine.model.model.visual._judge_geometry) == 3  # three image sizes
        tower_geometry.uninstall(judge.engine.model)
        judge.engine._forget_vision_features()
        theirs = [(r.score, r.error) for r in judge.batch_score(items)]
    assert all(e is None for _, e in ours + theirs)
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in theirs], abs=1e-6)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_other_towers_are_left_alone(arch):
    with _judge(arch) as judge:
        assert judge.engine.tower_geometry is False
        assert "forward" not in vars(judge.engine.model.model.visual)


def test_a_forward_already_on_the_tower_is_kept():
    from types import SimpleNamespace

    tower = torch.nn.Module()
    for a in ("num_grid_per_side", "interpolation_mode", "interpolation_align_corners", "spatial_merge_size",
              "deepstack_visual_indexes"):
        setattr(tower, a, 1)
    hooked = tower.forward = lambda *a, **k: None
    assert tower_geometry.install(SimpleNamespace(model=SimpleNamespace(visual=tower))) is False
    assert tower.forward is hooked
