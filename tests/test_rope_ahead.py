"""The rope positions of a batch worked out on the host as it is prepared (rope_ahead.py): the same
positions as the model's own walk, the same scores and answers, and the model's own walk whenever
a tensor was not prepared that way."""
from __future__ import annotations

import logging
import threading

import pytest
import torch
from PIL import Image

from src.models.reward.batching import _batch_key
from src.models.reward.implementations.local import QwenVLRewardModel
from src.models.reward.rope_ahead import DELTAS, POSITIONS, RopeAhead
from src.models.reward.types import ScoreItem

ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    sizes = [(224, 168), (120, 260), (300, 120), (200, 200), (90, 150)]  # prompts of different lengths
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
            for w, h in (sizes * 2)[:n]]


def _judge(arch: str, **kw) -> QwenVLRewardModel:
    return QwenVLRewardModel(model_name=f"tiny:{arch}", batch_size=3, compile_vision=False, compile_language=False, **kw)


def _padded_batch(judge, n: int):
    """The requests and the processor's CPU output for n prompts of different lengths, left-padded,
    through the engine's own preparation (which carries the positions)."""
    eng = judge.engine
    chunk = eng._prepare([ScoreItem(images=[im]) for im in _images(n)], list(range(n)))
    reqs = [r for r in chunk.requests if r.pos not in chunk.errors]
    assert len(reqs) == n
    return reqs, eng._encode_cpu(reqs)


@pytest.mark.parametrize("arch", ARCHS)
def test_positions_worked_out_ahead_are_the_models_own(arch):
    with _judge(arch) as judge:
        rope = judge.engine._rope_ahead
        assert isinstance(rope, RopeAhead)
        reqs, inputs = _padded_batch(judge, 3)
        mask = inputs["attention_mask"]
        assert (mask == 0).any(), "the batch must be padded"
        kwargs = {k: inputs[k] for k in rope._args if inputs.get(k) is not None}
        want_pos, want_deltas = rope._original(**kwargs)  # the model's own walk
        assert torch.equal(inputs[POSITIONS], want_pos) and torch.equal(inputs[DELTAS], want_deltas)
        # Taken out for the model, and given back for this input_ids tensor only.
        ready = judge.engine._encode(reqs, {_batch_key(reqs): inputs})  # as a batch is run
        assert POSITIONS not in ready and DELTAS not in ready
        base = judge.engine.model.model
        pos, deltas = base.get_rope_index(ready["input_ids"], **{k: v for k, v in kwargs.items() if k != "input_ids"})
        assert rope.used == 1 and torch.equal(pos, want_pos) and torch.equal(deltas, want_deltas)
        copy = ready["input_ids"].clone()  # equal values, another tensor: the model's own walk
        pos2, _ = base.get_rope_index(copy, **{k: v for k, v in kwargs.items() if k != "input_ids"})
        assert rope.used == 1 and torch.equal(pos2, want_pos)


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_are_the_same_with_the_models_own_positions(arch):
    items = [ScoreItem(images=[im]) for im in _images(5, seed=1)]
    with _judge(arch) as judge:
        rope = judge.engine._rope_ahead
        ahead = [(r.score, r.error) for r in judge.batch_score(items)]
        assert rope.used == 2  # two batches of at most 3
        rope.uninstall()
        judge.engine._forget_vision_features()
        own = [(r.score, r.error) for r in judge.batch_score(items)]
        assert rope.used == 2
    assert all(err is None for _, err in ahead + own)
    assert [s for s, _ in ahead] == pytest.approx([s for s, _ in own], abs=1e-6)


def test_generate_mode_leaves_the_walk_to_the_model():
    # Generate mode walks once per prompt at its prefill; worked out ahead it measured slower there.
    with _judge("qwen3_vl", mode="generate", max_new_tokens=4) as judge:
        assert judge.engine._rope_ahead is None
        assert "get_rope_index" not in vars(judge.engine.model.model)
        base = judge.engine.model.model
        assert base.rope_deltas is None
        res = judge.batch_score([ScoreItem(images=[im]) for im in _images(2)])
        assert len(res) == 2 and base.rope_deltas is not None  # the model's own walk ran


def test_a_failure_on_the_host_leaves_the_positions_to_the_model(caplog):
    with _judge("qwen3_vl") as judge:
        rope = judge.engine._rope_ahead
        own = rope._original

        def broken_in_preparation(*args, **kwargs):  # the model's own walk, on the main thread, still runs
            if threading.current_thread() is not threading.main_thread():
                raise ValueError("no walk today")
            return own(*args, **kwargs)

        rope._original = broken_in_preparation
        items = [ScoreItem(images=[im]) for im in _images(4)]
        with caplog.at_level(logging.WARNING, logger="src.models.reward.engine"):
            res = judge.batch_score(items)
        assert all(r.error is None and r.score is not None for r in res) and rope.used == 0
        warned = [r for r in caplog.records if "rope positions on the host failed" in r.getMessage()]
        assert len(warned) == 1 and "no walk today" in warned[0].getMessage()


def test_a_model_without_the_walk_is_left_alone():
    from types import SimpleNamespace

    assert RopeAhead.install(SimpleNamespace()) is None
    assert RopeAhead.install(SimpleNamespace(model=SimpleNamespace())) is None
