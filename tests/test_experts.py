"""A mixture-of-experts judge's experts (experts.py): the combine kernel, and whole judges whose
experts run through it, against transformers' own grouped_mm experts path.

The Triton kernel runs here under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess so the
setting reaches nothing else); on a GPU it is the same kernel, compiled (benchmarks/NOTES.md)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from src.models.reward import experts
from src.models.reward.implementations.local import QwenVLRewardModel

ROOT = Path(__file__).resolve().parents[1]


def _images(n: int = 3) -> list[Image.Image]:
    g = torch.Generator().manual_seed(1)
    sizes = [(224, 168), (120, 260), (200, 200)]
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for w, h in sizes[:n]]


def _routed(tokens: int, hidden: int, top_k: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(tokens * top_k, hidden, generator=g).to(dtype)
    perm = torch.randperm(tokens * top_k, generator=g)
    weights = torch.rand(tokens, top_k, generator=g).to(dtype)
    return rows, perm, weights


def _loop_combine(rows, perm, weights):
    """The combine spelled out, row by row, in float64."""
    tokens, top_k = weights.shape
    out = torch.zeros(tokens, rows.shape[1], dtype=torch.float64)
    for i, pair in enumerate(perm.tolist()):
        out[pair // top_k] += weights[pair // top_k, pair % top_k].double() * rows[i].double()
    return out


def test_reference_combine_is_the_weighted_sum_of_each_tokens_rows():
    rows, perm, weights = _routed(9, 40, 3, torch.float64)
    assert torch.allclose(experts.combine_reference(rows, perm, weights), _loop_combine(rows, perm, weights),
                          rtol=0, atol=1e-12)


def test_combine_kernel_equals_the_reference_under_tritons_interpreter():
    # Shapes: the MoE's top 8 with a width that is not a multiple of the kernel's block (2 blocks,
    # the second partly masked), a narrow bf16 case, and no tokens at all.
    script = textwrap.dedent("""
        import json, sys, torch
        sys.path.insert(0, "tests")
        from src.models.reward import experts
        from test_experts import _routed, _loop_combine
        out = []
        for tokens, hidden, top_k, dtype in ((37, 1024 + 72, 8, torch.float32), (5, 96, 2, torch.bfloat16),
                                             (0, 64, 2, torch.float32)):
            rows, perm, weights = _routed(tokens, hidden, top_k, dtype, seed=tokens)
            got = experts.combine_triton(rows, perm, weights)
            ref = _loop_combine(rows, perm, weights)
            err = (got.double() - ref).abs()
            out.append({"shape": list(got.shape), "dtype": str(got.dtype),
                        "err": float(err.max()) if tokens else 0.0,
                        # error in units of one step of the result's precision at each value
                        "steps": float((err / (ref.abs() * torch.finfo(dtype).eps + 1e-30)).max()) if tokens else 0.0})
        print(json.dumps(out))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    f32, bf16, empty = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f32["shape"] == [37, 1096] and f32["dtype"] == "torch.float32" and f32["err"] < 1e-5
    assert bf16["shape"] == [5, 96] and bf16["dtype"] == "torch.bfloat16"
    assert bf16["steps"] <= 1.0  # one rounding to bf16 of a float32 sum
    assert empty["shape"] == [0, 64]


def test_a_failing_kernel_falls_back_to_the_torch_combine_once(monkeypatch, caplog):
    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise RuntimeError("no kernel today")

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernel's branch, on the CPU
    monkeypatch.setattr(experts, "combine_triton", broken)
    monkeypatch.setattr(experts, "_refused", [])
    rows, perm, weights = _routed(6, 32, 2, torch.float32)
    with caplog.at_level(logging.WARNING, logger="src.models.reward.engine"):
        first = experts.experts_combine(rows, perm, weights)
        second = experts.experts_combine(rows, perm, weights)
    assert torch.equal(first, experts.combine_reference(rows, perm, weights)) and torch.equal(first, second)
    assert len(calls) == 1  # not tried again
    warnings = [r.getMessage() for r in caplog.records if "experts combine" in r.getMessage()]
    assert len(warnings) == 1 and "no kernel today" in warnings[0]


def _numbers(raw, key="") -> dict:
    """A raw answer's numbers (level probabilities, ...) by their path in it."""
    if isinstance(raw, dict):
        return {k: v for name, sub in raw.items() for k, v in _numbers(sub, f"{key}/{name}").items()}
    return {key: raw} if isinstance(raw, (int, float)) else {}


def _scored(judge, images):
    return [(r.score, r.raw, r.error) for r in judge.batch_score(images)]


@pytest.mark.parametrize("mode", ["logits", "generate"])
def test_moe_judge_scores_as_transformers_experts_path_does(mode, monkeypatch):
    # The same loaded judge, its experts switched between experts.py and transformers' grouped_mm:
    # float32 scores within 1e-5 (logits), the same answers (generate, greedy).
    combined = []
    real = experts.combine_reference
    monkeypatch.setattr(experts, "combine_reference", lambda *a: combined.append(a[0].shape) or real(*a))
    images = _images()
    with QwenVLRewardModel(model_name="tiny:qwen3_vl_moe", mode=mode, max_new_tokens=6, batch_size=3,
                           compile_vision=False, compile_language=False) as judge:
        model = judge.engine.model
        assert judge.engine.experts == experts.NAME == model.config.text_config._experts_implementation
        ours = _scored(judge, images)
        layers = len(model.model.language_model.layers)
        assert len(combined) >= layers and len(combined) % layers == 0
        model.set_experts_implementation("grouped_mm")
        n = len(combined)
        theirs = _scored(judge, images)
        assert len(combined) == n  # transformers' path ran this time
    if mode == "logits":
        assert all(err is None for _, _, err in ours)
        for (s1, raw1, _), (s2, raw2, _) in zip(ours, theirs):
            assert s1 == pytest.approx(s2, abs=1e-5)
            assert _numbers(raw1) == pytest.approx(_numbers(raw2), abs=1e-5) and _numbers(raw1)
    else:
        # Random tiny weights write no score (a parse error); the answers' tokens are compared.
        assert ours == theirs and all(raw for _, raw, _ in ours)


def test_a_dense_judge_keeps_its_model_as_loaded():
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", batch_size=2, compile_vision=False,
                           compile_language=False) as judge:
        assert judge.engine.experts is None
