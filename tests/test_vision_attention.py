"""The packed vision attention: same function as transformers' per-window loop, chosen cleanly.

torch's varlen_attn (the GPU fast path) runs only on CUDA in half precision; its equivalence is
measured on the GPU by benchmarks/steps_gpu.py (numbers in benchmarks/NOTES.md). Here, on the CPU:
the pure-torch `packed` path against the loop (op level with real window layouts, vision tower,
whole judge), the selection logic and its errors, and that the language model is left alone.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.vision_utils import get_vision_window_index

from src.models.reward import vision_attention as va
from src.models.reward.implementations.local import QwenVLRewardModel
from src.models.reward.settings import JudgeSettings
from src.models.tiny import resolve_model_name


def _qkv(total: int, heads: int = 3, dim: int = 8, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, total, dim, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("lengths", [[5], [4, 4, 4], [7, 3, 7, 1, 3, 7], [2, 0, 5, 0]])
def test_packed_equals_per_segment_loop(lengths):
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v = _qkv(int(cu[-1]))
    ref = va.reference_attention(q, k, v, cu, 0.3)
    out = va.packed_attention(q, k, v, cu, 0.3)
    assert out.shape == (1, int(cu[-1]), 3, 8)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cudnn_first", [False, True])
@pytest.mark.parametrize("lengths", [[5], [4, 4, 4], [7, 3, 7, 1, 3, 7], [2, 0, 5, 0]])
def test_grouped_equals_per_segment_loop(lengths, cudnn_first):
    # one length: the no-copy view and one sdpa call; several: the packed path (this is a CPU)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v = _qkv(int(cu[-1]))
    ref = va.reference_attention(q, k, v, cu, 0.3)
    out = va.grouped_attention(q, k, v, cu, max(lengths), 0.3, cudnn_first=cudnn_first)
    assert out.shape == (1, int(cu[-1]), 3, 8)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_grouped_on_transformers_layout_leaves_the_kernel_order_alone():
    # transformers hands over q, k, v whose memory is (tokens, heads, dim), v a slice of the fused
    # qkv projection; the grouped view of 4 images of 6 patches must read them right
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(24, 3, 2, 8, generator=g)
    q, k, v = (qkv[:, i].transpose(0, 1).unsqueeze(0) for i in range(3))
    cu = torch.arange(0, 25, 6, dtype=torch.int32)
    before = torch._C._get_sdp_priority_order()
    out = va.grouped_attention(q, k, v, cu, 6, None, cudnn_first=True)
    assert torch._C._get_sdp_priority_order() == before  # cuDNN first only inside the call
    torch.testing.assert_close(out, va.reference_attention(q, k, v, cu, None), rtol=1e-5, atol=1e-6)


def test_a_cudnn_failure_falls_back_once_with_one_warning(monkeypatch, caplog, cudnn_refuses):
    # cuDNN can turn a shape down when it runs (not only in sdpa's checks): the call then gets
    # sdpa's own kernel, and so does every later call, after one warning
    q, k, v = _qkv(12)
    cu = torch.tensor([0, 4, 8, 12], dtype=torch.int32)
    tried = cudnn_refuses
    ref = va.reference_attention(q, k, v, cu, 0.3)
    with caplog.at_level("WARNING", logger="src.models.reward.engine"):
        for _ in range(2):
            out = va.grouped_attention(q, k, v, cu, 4, 0.3, cudnn_first=True)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert len(tried) == 1 and va._cudnn_refused == {"vision attention"}
    warnings = [r.getMessage() for r in caplog.records if "cuDNN" in r.getMessage()]
    assert len(warnings) == 1 and "No valid execution plans" in warnings[0]
    # running out of memory is not a kernel's refusal: it goes up to the engine
    monkeypatch.setattr(va, "_cudnn_refused", set())
    monkeypatch.setattr(va, "cudnn_first_sdpa", lambda *a, **kw: (_ for _ in ()).throw(
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    with pytest.raises(RuntimeError, match="out of memory"):
        va.grouped_attention(q, k, v, cu, 4, 0.3, cudnn_first=True)


def test_the_hopper_registration_runs_cudnn_first(monkeypatch):
    # apply_vision_attn gives Hopper GPUs the `grouped` function under its own name, with cuDNN's
    # kernel tried first; the same function otherwise
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    va._register()
    q, k, v = _qkv(12)
    cu = torch.tensor([0, 6, 12], dtype=torch.int32)
    first = []
    real = va.cudnn_first_sdpa
    monkeypatch.setattr(va, "cudnn_first_sdpa", lambda *a: first.append(1) or real(*a))
    monkeypatch.setattr(va, "_cudnn_refused", set())
    outs = [ALL_ATTENTION_FUNCTIONS[name](None, q, k, v, scaling=0.3, cu_seq_lens_q=cu, max_length_q=6)[0]
            for name in (va._NAMES["grouped"], va._GROUPED_CUDNN)]
    assert len(first) == 1  # only the Hopper name asked for cuDNN first
    for out in outs:
        torch.testing.assert_close(out, va.reference_attention(q, k, v, cu, 0.3), rtol=0, atol=1e-12)


def test_packed_on_real_window_layout_float32():
    # Qwen2.5-VL's window layout for two images of different sizes: windows of several lengths.
    grid = torch.tensor([[1, 20, 34], [1, 14, 10]])
    _, cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=112, patch_size=14)
    lengths = set((cu[1:] - cu[:-1]).tolist())
    assert len(lengths) > 2  # the test needs uneven windows
    q, k, v = _qkv(int(cu[-1]), heads=4, dim=16, dtype=torch.float32, seed=1)
    ref64 = va.reference_attention(q.double(), k.double(), v.double(), cu, 0.25)
    out = va.packed_attention(q, k, v, cu, 0.25)
    loop = va.reference_attention(q, k, v, cu, 0.25)
    err = ((out.double() - ref64).norm() / ref64.norm()).item()
    err_loop = ((loop.double() - ref64).norm() / ref64.norm()).item()
    assert err < 1e-6 and err_loop < 1e-6


def test_packed_rejects_what_it_is_not_for():
    q, k, v = _qkv(6)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="unmasked"):
        va._packed_forward(None, q, k, v, attention_mask=torch.ones(1, 1, 6, 6), cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        va._packed_forward(None, q, k, v, cu_seq_lens_q=None)
    with pytest.raises(RuntimeError, match="do not tile"):
        va.packed_attention(q, k, v, torch.tensor([0, 3, 5]), None)


def test_selection_and_errors():
    assert va.resolve_vision_attn("auto", "cpu", torch.float32) == "sdpa"
    assert va.resolve_vision_attn("packed", "cpu", torch.float32) == "packed"
    assert va.resolve_vision_attn("sdpa", "cuda:0", torch.bfloat16) == "sdpa"
    assert va.resolve_vision_attn("auto", "cuda:0", torch.bfloat16) == "grouped"  # no GPU needed to decide
    assert va.resolve_vision_attn("grouped", "cpu", torch.float32) == "grouped"  # runs anywhere
    assert va.resolve_vision_attn("auto", "cuda:0", torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        va.resolve_vision_attn("varlen", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        va.resolve_vision_attn("varlen", "cuda:0", torch.float32)
    with pytest.raises(ValueError, match="unknown value 'flash'"):
        JudgeSettings(model_name="x", vision_attn="flash")


def _images():
    sizes = [(224, 168), (300, 120), (120, 260)]
    g = torch.Generator().manual_seed(3)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for w, h in sizes]


@pytest.mark.parametrize("choice,sizes", [("packed", "mixed"), ("grouped", "mixed"), ("grouped", "one")])
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_vision_tower_packed_equals_sdpa(arch, choice, sizes, monkeypatch):
    path = resolve_model_name(f"tiny:{arch}")
    proc = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval()
    images = _images() if sizes == "mixed" else [im.resize((224, 168)) for im in _images()]
    inputs = proc.image_processor(images=images, return_tensors="pt")
    visual = model.model.visual

    def run():
        with torch.inference_mode():
            return visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output

    plain = run()
    calls, fallbacks = [], []
    real, real_packed = getattr(va, f"{choice}_attention"), va.packed_attention
    monkeypatch.setattr(va, f"{choice}_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    if choice == "grouped":  # segments of several lengths fall back to packed on the CPU
        monkeypatch.setattr(va, "packed_attention", lambda *a, **k: fallbacks.append(1) or real_packed(*a, **k))
    assert va.apply_vision_attn(model, choice, "cpu", torch.float32) == choice
    assert model.config.vision_config._attn_implementation == f"flash_judge_{choice}"
    assert model.config.text_config._attn_implementation == "sdpa"  # the language model is untouched
    fast = run()
    depth = model.config.vision_config.depth
    assert len(calls) == depth  # every layer went through it
    if choice == "grouped":
        # Qwen3-VL and Qwen2-VL attend per image: one size, one sdpa call per layer and no fallback;
        # Qwen2.5-VL's windowed layers have windows of several lengths even then
        one_call = sizes == "one" and arch != "qwen2_5_vl"
        assert (len(fallbacks) == 0) if one_call else (0 < len(fallbacks) <= depth)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_judge_scores_equal_with_packed_vision(arch):
    # three images of three sizes and, for `grouped`'s one-size path, the same three at one size
    items = _images() + [im.resize((224, 168)) for im in _images()]
    scores = {}
    for choice in ("sdpa", "packed", "grouped"):
        with QwenVLRewardModel(model_name=f"tiny:{arch}", vision_attn=choice, batch_size=3) as judge:
            assert judge.engine.vision_attn == choice
            scores[choice] = [r.score for r in judge.batch_score(items)]
    assert all(s is not None for s in scores["sdpa"])
    assert scores["packed"] == pytest.approx(scores["sdpa"], abs=1e-5)
    assert scores["grouped"] == pytest.approx(scores["sdpa"], abs=1e-5)


def test_auto_keeps_a_flash_implementation_the_model_was_loaded_with():
    path = resolve_model_name("tiny:qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa")
    va._register()
    model.config.vision_config._attn_implementation_internal = "flash_judge_packed"
    assert va.apply_vision_attn(model, "auto", "cpu", torch.float32) == "flash_judge_packed"
