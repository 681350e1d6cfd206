"""The image tokens of a batch found on the host as it is prepared (mask_ahead.py): the same masks
and deepstack sums as the model's own code, the same scores, the model's own check (and its
error) when the features do not match, and the model's own code for any batch not prepared so."""
from __future__ import annotations

import pytest
import torch

from src.models.reward.batching import _batch_key
from src.models.reward.mask_ahead import POSITIONS, MaskAhead
from src.models.reward.types import ScoreItem
from test_rope_ahead import ARCHS, _images, _judge, _padded_batch


def _on_device(judge, n: int = 3):
    """A padded batch of n prompts as the model gets it (positions taken out), and its embeddings."""
    reqs, inputs = _padded_batch(judge, n)
    assert POSITIONS in inputs
    ready = judge.engine._encode(reqs, {_batch_key(reqs): inputs})
    assert POSITIONS not in ready
    base = judge.engine.model.model
    return ready, base.get_input_embeddings()(ready["input_ids"])


@pytest.mark.parametrize("arch", ARCHS)
def test_the_mask_and_deepstack_sums_are_the_models_own(arch):
    with _judge(arch) as judge:
        ahead = judge.engine._mask_ahead
        assert isinstance(ahead, MaskAhead)
        ready, embeds = _on_device(judge)
        ids = ready["input_ids"]
        n_image = int((ids == ahead._image_token).sum())
        features = torch.randn(n_image, embeds.shape[-1])
        image, video = judge.engine.model.model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
        assert ahead.used == 1
        want_image, want_video = ahead._mask_original(ids, inputs_embeds=embeds, image_features=features)
        assert torch.equal(image, want_image) and torch.equal(video, want_video)
        if ahead._text is None:
            assert arch.startswith("qwen2")  # no deepstack layers
            return
        hidden = torch.randn(*ids.shape, embeds.shape[-1])
        deep = torch.randn(n_image, embeds.shape[-1])
        got = judge.engine.model.model.language_model._deepstack_process(hidden, image[..., 0], deep)
        want = ahead._deep_original(hidden, want_image[..., 0], deep)
        assert torch.equal(got, want) and not torch.equal(got, hidden)
        # Hidden states laid out otherwise (a compiled layer may return any strides): the same sums.
        odd = hidden.transpose(0, 1).contiguous().transpose(0, 1)
        assert not odd.is_contiguous()
        got = judge.engine.model.model.language_model._deepstack_process(odd, image[..., 0], deep)
        assert torch.equal(got, want)
        # A mask the model did not get from this batch's check: the model's own code.
        calls = []
        own = ahead._deep_original
        ahead._deep_original = lambda *a: calls.append(1) or own(*a)
        again = judge.engine.model.model.language_model._deepstack_process(hidden, want_image[..., 0].clone(), deep)
        assert calls == [1] and torch.equal(again, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_are_the_same_with_the_models_own_mask(arch):
    items = [ScoreItem(images=[im]) for im in _images(5, seed=2)]
    with _judge(arch) as judge:
        ahead = judge.engine._mask_ahead
        own_deep, own_calls = ahead._deep_original, []
        if own_deep is not None:  # Qwen3-VL: the deepstack layers take the positions, not the mask
            ahead._deep_original = lambda *a: own_calls.append(1) or own_deep(*a)
        found = [(r.score, r.error) for r in judge.batch_score(items)]
        assert ahead.used == 2 and own_calls == []  # two batches of at most 3
        ahead.uninstall()
        judge.engine._forget_vision_features()
        own = [(r.score, r.error) for r in judge.batch_score(items)]
        assert ahead.used == 2
    assert all(err is None for _, err in found + own)
    assert [s for s, _ in found] == pytest.approx([s for s, _ in own], abs=1e-6)


def test_features_that_do_not_match_get_the_models_own_error():
    with _judge("qwen3_vl") as judge:
        ready, embeds = _on_device(judge)
        ids = ready["input_ids"]
        n_image = int((ids == judge.engine._mask_ahead._image_token).sum())
        with pytest.raises(ValueError, match="Image features and image tokens do not match"):
            judge.engine.model.model.get_placeholder_mask(ids, inputs_embeds=embeds,
                                                          image_features=torch.randn(n_image - 1, embeds.shape[-1]))
        assert judge.engine._mask_ahead.used == 0
        # Another tensor with the same values: not a batch prepared here, the model's own check.
        copy = ids.clone()
        judge.engine.model.model.get_placeholder_mask(copy, inputs_embeds=embeds,
                                                      image_features=torch.randn(n_image, embeds.shape[-1]))
        assert judge.engine._mask_ahead.used == 0


def test_generate_mode_and_models_without_the_check_are_left_alone():
    from types import SimpleNamespace

    with _judge("qwen3_vl", mode="generate", max_new_tokens=4) as judge:
        assert judge.engine._mask_ahead is None
        assert "get_placeholder_mask" not in vars(judge.engine.model.model)
        assert "_deepstack_process" not in vars(judge.engine.model.model.language_model)
    assert MaskAhead.install(SimpleNamespace()) is None
    assert MaskAhead.install(SimpleNamespace(model=SimpleNamespace(get_placeholder_mask=lambda: None,
                                                                   config=SimpleNamespace()))) is None
