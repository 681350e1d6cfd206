"""The text model's attention over the prompts with cuDNN's kernel first (text_attention.py): the
same function as transformers' sdpa attention, checked on the CPU in float32, where torch picks
its own kernel for the library's call."""
from __future__ import annotations

import types

import pytest
import torch
from transformers import AutoModelForImageTextToText
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from src.models.reward import text_attention as ta
from src.models.reward import vision_attention as va
from src.models.tiny import resolve_model_name


def _inputs(batch=3, heads=4, kv_heads=2, length=10, dim=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def heads_view(h):  # as the attention layer hands them over: transposed (batch, length, heads, dim)
        return torch.randn(batch, length, h, dim, generator=g, dtype=dtype).transpose(1, 2)

    return heads_view(heads), heads_view(kv_heads), heads_view(kv_heads)


def _padded_mask(batch, length, pads):
    real = torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]
    return sdpa_mask(batch_size=batch, q_length=length, kv_length=length, attention_mask=real,
                     allow_is_causal_skip=False), real


def _module(heads, kv_heads):
    return types.SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (3, 3)])
def test_prompts_of_one_length_equal_transformers(heads, kv_heads):
    q, k, v = _inputs(heads=heads, kv_heads=kv_heads)
    module = _module(heads, kv_heads)
    want = sdpa_attention_forward(module, q, k, v, None)[0]
    got = ta.prompt_attention(module, q, k, v, None)[0]
    assert got.shape == want.shape == (3, 10, heads, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # with a scale of its own, and the key longer than the query (a prefill into a static cache)
    k_long, v_long = (torch.cat([t, torch.randn_like(t)], dim=2) for t in (k, v))
    want = sdpa_attention_forward(module, q, k_long, v_long, None, scaling=0.2)[0]
    got = ta.prompt_attention(module, q, k_long, v_long, None, scaling=0.2)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_padded_prompts_equal_transformers_where_an_output_is_read():
    # Left padding: a padding position sees no key at all. The library lets it see every key
    # (a kernel may give such a row NaN); the prompts' own positions give transformers' outputs.
    pads = [0, 3, 9]
    q, k, v = _inputs(heads=4, kv_heads=2)
    mask, real = _padded_mask(3, 10, pads)
    assert not bool(mask[2, 0, 0].any())  # the test needs rows that see nothing
    module = _module(4, 2)
    want = sdpa_attention_forward(module, q, k, v, mask)[0]
    got = ta.prompt_attention(module, q, k, v, mask)[0]
    assert torch.isfinite(got).all()
    keep = real[:, :, None, None]
    torch.testing.assert_close(got * keep, want * keep, rtol=1e-5, atol=1e-6)
    # float64 reference over the prompts' own positions
    groups = 2
    kk, vv = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    s = q.double() @ kk.transpose(-1, -2) * 8 ** -0.5
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    ref = (p @ vv).transpose(1, 2)
    torch.testing.assert_close(got.double() * keep, ref * keep, rtol=1e-5, atol=1e-6)


def test_see_something_changes_only_rows_that_see_nothing():
    mask, _ = _padded_mask(2, 6, [0, 4])
    fixed = ta.see_something(mask)
    empty = ~mask.any(dim=-1)
    assert bool(empty.any())
    assert bool(fixed[empty].all())  # such a row now sees every key
    assert torch.equal(fixed[~empty], mask[~empty])  # every other row as it was


def test_what_it_does_not_take_goes_to_transformers_unchanged(monkeypatch):
    # one query token (a decoding step), a float mask, dropout: transformers' function as called
    seen = []
    monkeypatch.setattr(va, "cudnn_first_sdpa", lambda *a, **kw: seen.append(1))
    q, k, v = _inputs()
    module = _module(4, 2)
    step = q[:, :, -1:]
    torch.testing.assert_close(ta.prompt_attention(module, step, k, v, None)[0],
                               sdpa_attention_forward(module, step, k, v, None)[0], rtol=0, atol=0)
    additive = torch.zeros(3, 1, 10, 10)
    torch.testing.assert_close(ta.prompt_attention(module, q, k, v, additive)[0],
                               sdpa_attention_forward(module, q, k, v, additive)[0], rtol=0, atol=0)
    assert seen == []


def test_a_cudnn_failure_falls_back_once_with_one_warning(monkeypatch, caplog, cudnn_refuses):
    q, k, v = _inputs()
    module = _module(4, 2)
    want = sdpa_attention_forward(module, q, k, v, None)[0]
    with caplog.at_level("WARNING", logger="src.models.reward.engine"):
        for _ in range(2):
            torch.testing.assert_close(ta.prompt_attention(module, q, k, v, None)[0], want, rtol=0, atol=0)
    assert len(cudnn_refuses) == 1 and va._cudnn_refused == {"prompt attention"}
    warnings = [r.getMessage() for r in caplog.records if "cuDNN" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("prompt attention: cuDNN's kernel failed")
    # running out of memory is not a kernel's refusal: it goes up to the engine
    monkeypatch.setattr(va, "_cudnn_refused", set())
    monkeypatch.setattr(va, "cudnn_first_sdpa", lambda *a, **kw: (_ for _ in ()).throw(
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    with pytest.raises(RuntimeError, match="out of memory"):
        ta.prompt_attention(module, q, k, v, None)


def test_applied_only_on_a_hopper_gpu_in_half_precision(monkeypatch):
    path = resolve_model_name("tiny:qwen3_vl")
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa")
    text = model.config.text_config
    assert ta.apply_text_attention(model, "cpu", torch.bfloat16) == "sdpa"
    monkeypatch.setattr(va, "_hopper", lambda device: True)
    assert ta.apply_text_attention(model, "cuda:0", torch.float32) == "sdpa"
    assert text._attn_implementation == "sdpa"
    assert ta.apply_text_attention(model, "cuda:0", torch.bfloat16) == ta.NAME
    assert text._attn_implementation == ta.NAME
    assert model.config.vision_config._attn_implementation != ta.NAME  # the vision tower keeps its own
    eager = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager")
    assert ta.apply_text_attention(eager, "cuda:0", torch.bfloat16) == "eager"  # a choice made at load is kept


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl"])
def test_a_real_text_model_gives_the_same_logits_through_it(arch):
    # The registered name through the model's own code: its masks are made as for sdpa, and padded
    # prompts' logits equal sdpa's at every position a prompt owns (float32, CPU).
    path = resolve_model_name(f"tiny:{arch}")
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval()
    lm = model.model.language_model
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 200, (3, 12), generator=g)
    attn = torch.ones(3, 12, dtype=torch.long)
    attn[1, :4] = 0
    attn[2, :11] = 0

    def run(a):
        with torch.inference_mode():
            return lm(input_ids=ids, attention_mask=a).last_hidden_state

    plain = {"same": run(None), "padded": run(attn)}
    ta.register()
    text = model.config.text_config
    calls = []
    real = va.cudnn_first_sdpa
    try:
        text._attn_implementation_internal = ta.NAME
        va_calls = pytest.MonkeyPatch()
        va_calls.setattr(va, "cudnn_first_sdpa", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        fast = {"same": run(None), "padded": run(attn)}
    finally:
        va_calls.undo()
        text._attn_implementation_internal = "sdpa"
    assert len(calls) == 2 * model.config.text_config.num_hidden_layers  # every layer, both calls
    torch.testing.assert_close(fast["same"], plain["same"], rtol=1e-5, atol=1e-5)
    keep = attn.bool()[:, :, None]
    assert torch.isfinite(fast["padded"]).all()
    torch.testing.assert_close(fast["padded"] * keep, plain["padded"] * keep, rtol=1e-5, atol=1e-5)
