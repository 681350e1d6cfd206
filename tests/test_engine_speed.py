"""The engine's speed paths on the CPU: each must give the plain path's answers.

GPU timings and the GPU-only pieces (CUDA graph replay, varlen attention, GPU preprocessing) are
measured by benchmarks/steps_gpu.py and bench_gpu.py (numbers in benchmarks/NOTES.md); the code
they run is the code tested here, minus the graph capture.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from src.models.reward import fast_decode, row_decode
from src.models.reward.batching import _batch_key, batch_limit
from src.models.reward.implementations.local import QwenVLRewardModel
from src.models.reward.settings import JudgeSettings
from src.models.reward.types import ScoreItem
from src.models.tiny import resolve_model_name


def _images(n: int = 5, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    sizes = [(224, 168), (120, 260), (300, 120), (200, 200), (90, 150)]
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
            for w, h in (sizes * 4)[:n]]


def _answers(**judge) -> list:
    with QwenVLRewardModel(model_name="tiny:qwen2_5_vl", **judge) as j:
        return [(r.score, r.raw, r.error) for r in j.batch_score(_images())]


# -- fast_decode: the same tokens as generate() -------------------------------------------------

@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
def model_and_inputs(request):
    proc, model, prompts, _ = _tiny_prompts(request.param, 3)  # different lengths: left padding is exercised
    inputs = proc(text=prompts, images=_images(3), padding=True, return_tensors="pt")
    return model, inputs, proc.tokenizer.pad_token_id


@pytest.mark.parametrize("min_new,penalty", [(0, None), (6, 1.1)])
def test_greedy_generate_equals_generate(model_and_inputs, min_new, penalty):
    model, inputs, pad = model_and_inputs
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": pad}
    if min_new:
        kw["min_new_tokens"] = min_new
    if penalty:
        kw["repetition_penalty"] = penalty
    eos = model.generation_config.eos_token_id
    with torch.inference_mode():
        ref = model.generate(**inputs, **kw)[:, inputs["input_ids"].shape[1]:]
        model.model.rope_deltas = None
        ours = fast_decode.greedy_generate(model, inputs, max_new_tokens=12, min_new_tokens=min_new,
                                           eos_token_ids=eos, pad_token_id=pad, repetition_penalty=penalty)
    n = ref.shape[1]
    assert torch.equal(ours[:, :n], ref)
    assert (ours[:, n:] == pad).all()  # generate() stops when every row ended; we may pad a little longer
    assert model.config.text_config._attn_implementation == "sdpa"  # the decode attention was put back


def test_cache_counters_made_on_the_device_before_the_prefill(model_and_inputs):
    # transformers makes each static layer's counter on the CPU and copies it to the device at the
    # layer's first write (a host sync per layer on a GPU); made there first, the write keeps it.
    from transformers import StaticCache

    model = model_and_inputs[0]
    cache = StaticCache(config=model.config, max_cache_len=16)
    assert all(layer.cumulative_length.device.type == "cpu" for layer in cache.layers)
    fast_decode.counters_on(cache, "meta")  # a device other than the CPU; no GPU here
    counters = [layer.cumulative_length for layer in cache.layers]
    assert all(c.device.type == "meta" and c.dtype == torch.int64 and c.dim() == 0 for c in counters)
    layer = cache.layers[0]
    kv = torch.empty(2, 1, 3, 8, device="meta")
    layer.lazy_initialization(kv, kv)
    assert layer.cumulative_length is counters[0]  # not replaced by a copy
    fast_decode.counters_on(cache, "cpu")  # on the CPU: made again there, value zero
    assert all(layer.cumulative_length.device.type == "cpu" and int(layer.cumulative_length) == 0
               for layer in cache.layers)


def _decode_case():
    g = torch.Generator().manual_seed(0)
    b, h, hkv, m, d = 3, 8, 2, 37, 16
    q = torch.randn(b, h, 1, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, m, d, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(b, 1, 1, m, generator=g) > 0.3
    mask[..., 0] = True
    rep = lambda t: t[:, :, None].expand(b, hkv, h // hkv, m, d).reshape(b, h, m, d)  # noqa: E731  transformers' repeat_kv
    ref = F.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=mask, scale=0.2).transpose(1, 2)
    return (q, k, v, mask), ref


@pytest.mark.parametrize("cudnn_first", [False, True])
def test_decode_gqa_attention_equals_repeated_kv(cudnn_first):
    args, ref = _decode_case()
    out, _ = fast_decode._decode_gqa_attention(None, *args, scaling=0.2, cudnn_first=cudnn_first)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_decode_attention_asks_cudnn_first_on_hopper_in_half_precision(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from src.models.reward import vision_attention as va

    assert fast_decode.decode_attention("cpu", torch.bfloat16) == fast_decode._DECODE_ATTN
    monkeypatch.setattr(va, "_hopper", lambda device: True)
    assert fast_decode.decode_attention("cuda:0", torch.float32) == fast_decode._DECODE_ATTN
    name = fast_decode.decode_attention("cuda:0", torch.bfloat16)
    assert name == fast_decode._DECODE_ATTN_CUDNN
    # the registered function tries cuDNN first (on this CPU sdpa has no cuDNN: its own choice runs)
    first = []
    real = va.cudnn_first_sdpa
    monkeypatch.setattr(va, "cudnn_first_sdpa", lambda *a: first.append(1) or real(*a))
    monkeypatch.setattr(va, "_cudnn_refused", set())
    args, ref = _decode_case()
    out, _ = ALL_ATTENTION_FUNCTIONS[name](None, *args, scaling=0.2)
    assert first == [1]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_decode_attention_falls_back_once_when_cudnn_refuses(caplog, cudnn_refuses):
    from src.models.reward import vision_attention as va

    tried = cudnn_refuses
    args, ref = _decode_case()
    with caplog.at_level("WARNING", logger="src.models.reward.engine"):
        for _ in range(2):
            out, _ = fast_decode._decode_gqa_attention(None, *args, scaling=0.2, cudnn_first=True)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert tried == [1] and va._cudnn_refused == {"decoding attention"}
    assert [r.getMessage() for r in caplog.records].count(
        "decoding attention: cuDNN's kernel failed (RuntimeError: cuDNN Frontend error: No valid execution plans "
        "built.); sdpa's own kernel choice from now on there (the same function)") == 1


@pytest.mark.parametrize("sampling", [
    {"temperature": 0.7, "top_p": 0.9, "top_k": 20},
    {"temperature": 1.3, "top_p": 1.0, "num_return_sequences": 3},  # top_k: transformers' default 50
    {"temperature": 0.5, "top_p": 0.8, "repetition_penalty": 1.2, "min_new_tokens": 5},
])
def test_sampled_generate_equals_generate(model_and_inputs, sampling):
    """Sampling: the same processors in generate()'s order and the same draw from the same seed,
    so the same tokens on the CPU; several samples per prompt share one prefill."""
    model, inputs, pad = model_and_inputs
    kw = {"max_new_tokens": 10, "do_sample": True, "pad_token_id": pad, **sampling}
    plan, why = fast_decode.plan_for(model, kw)
    assert why is None and plan.do_sample and plan.num_return_sequences == sampling.get("num_return_sequences", 1)
    assert plan.top_k == sampling.get("top_k", 50)
    with torch.inference_mode():
        torch.manual_seed(3)
        ref = model.generate(**inputs, **kw)[:, inputs["input_ids"].shape[1]:]
        model.model.rope_deltas = None
        torch.manual_seed(3)
        ours = fast_decode.generate_tokens(model, inputs, plan)
    n = ref.shape[1]
    assert ref.shape[0] == ours.shape[0] == inputs["input_ids"].shape[0] * plan.num_return_sequences
    assert torch.equal(ours[:, :n], ref)
    assert len({tuple(r) for r in ref.tolist()}) > 1  # the rows really were sampled


def test_fast_decode_judge_answers_equal_generate():
    for arch, extra in (("qwen2_5_vl", {}), ("qwen3_vl_moe", {"temperature": 0.8, "num_samples": 2})):
        base = dict(mode="generate", max_new_tokens=8, batch_size=2, **extra)
        with QwenVLRewardModel(model_name=f"tiny:{arch}", fast_decode=False, **base) as j:
            plain = [(r.score, r.raw, r.error) for r in j.batch_score(_images())]
        with QwenVLRewardModel(model_name=f"tiny:{arch}", **base) as j:  # fast_decode: on by default
            assert j.engine._fast_decode is True
            fast = [(r.score, r.raw, r.error) for r in j.batch_score(_images())]
        assert fast == plain
    forced = _answers(mode="generate", max_new_tokens=8, min_new_tokens=8, batch_size=2)
    assert forced == _answers(mode="generate", max_new_tokens=8, min_new_tokens=8, batch_size=2, fast_decode=False)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_fast_decode_prompts_without_images_equal_generate_after_prompts_with_them(arch):
    # A rubric part may show no image (a template with `images: []`). The model's forward leaves the
    # rope deltas of its last batch with images on the model for such a batch, and its own positions
    # ignore the left padding; generate() sets deltas of zero and positions from the attention mask.
    proc, model, prompts, imgs = _tiny_prompts(arch, 3)
    pad = proc.tokenizer.pad_token_id
    kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": pad}
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "say" + " more" * 3 * i}]}],
                                      add_generation_prompt=True, tokenize=False) for i in range(3)]
    text_only = proc(text=texts, padding=True, return_tensors="pt")
    assert (text_only["attention_mask"] == 0).any() and "image_grid_thw" not in text_only
    with torch.inference_mode():
        ref = model.generate(**text_only, **kw)[:, text_only["input_ids"].shape[1]:]
        for before in (prompts[:1], prompts):  # the image batch's deltas: one row, or as many rows
            with_images = proc(text=before, images=imgs[:len(before)], padding=True, return_tensors="pt")
            fast_decode.greedy_generate(model, with_images, max_new_tokens=3, eos_token_ids=(), pad_token_id=pad)
            assert model.model.rope_deltas is not None and bool((model.model.rope_deltas != 0).any())
            ours = fast_decode.greedy_generate(model, text_only, max_new_tokens=10, pad_token_id=pad,
                                               eos_token_ids=model.generation_config.eos_token_id)
            assert torch.equal(ours[:, :ref.shape[1]], ref)


def test_fast_decode_falls_back_with_a_reason(tmp_path, caplog):
    from src.models.tiny import build_tiny_model

    path = build_tiny_model("qwen3_vl", tmp_path / "judge")
    cfg = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**cfg, "no_repeat_ngram_size": 3}))
    with caplog.at_level(logging.WARNING):
        with QwenVLRewardModel(model_name=str(path), mode="generate", max_new_tokens=4) as judge:
            assert judge.engine._fast_decode is False
            assert all(r.raw is not None for r in judge.batch_score(_images(2)))
    assert "no_repeat_ngram_size=3" in caplog.text and "generate() instead" in caplog.text


def test_fast_decode_refuses_processors_it_does_not_implement(model_and_inputs):
    model = model_and_inputs[0]
    assert fast_decode.plan_for(model, {"max_new_tokens": 4, "do_sample": False})[1] is None
    assert "min_p" in fast_decode.plan_for(model, {"max_new_tokens": 4, "do_sample": True, "min_p": 0.1})[1]
    assert "num_beams" in fast_decode.plan_for(model, {"max_new_tokens": 4, "num_beams": 2})[1]
    model.generation_config.no_repeat_ngram_size = 3
    try:
        assert "no_repeat_ngram_size" in fast_decode.plan_for(model, {"max_new_tokens": 4})[1]
    finally:
        model.generation_config.no_repeat_ngram_size = None


# -- preparation: threads, processor in the prepare thread ----------------------------------------

def test_prepare_threads_and_errors_stay_per_item(tmp_path):
    missing = str(tmp_path / "nope.png")
    items = [ScoreItem(images=[im]) for im in _images(4)] + [ScoreItem(images=[missing], id="gone")]
    scores = {}
    for n in (1, 4):
        with QwenVLRewardModel(model_name="tiny:qwen2_5_vl", batch_size=2, prepare_threads=n) as judge:
            res = judge.score_items(items)
            scores[n] = [r.score for r in res]
            assert res[4].score is None and res[4].error_kind == "image" and "nope.png" in res[4].error
    assert scores[1] == scores[4]


def test_processor_runs_in_the_prepare_thread():
    with QwenVLRewardModel(model_name="tiny:qwen2_5_vl", batch_size=3) as judge:
        eng = judge.engine
        chunk = eng._prepare([ScoreItem(images=[im]) for im in _images(3)], 0)
        assert list(chunk.encoded) == [_batch_key(chunk.requests)]
        inputs = eng._encode(chunk.requests, chunk.encoded)
        assert chunk.encoded == {}  # taken, not encoded again
        assert inputs["input_ids"].shape[0] == 3


def test_a_call_starts_with_a_quarter_chunk_and_scores_the_same():
    # Batch 4, 10 items: chunks of 1, 3, 4 and 2 items (the model starts after one item's
    # preparation), the same scores as chunks of 4, 4 and 2. A call of one chunk or fewer items,
    # a batch under 4 and continuous batching (generate) are cut every batch_size items.
    items = [ScoreItem(images=[im]) for im in _images(10, seed=5)]
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", batch_size=4) as judge:
        eng = judge.engine
        assert eng._ramp_first_chunk == 4  # the default
        out = {}
        for part, want in ((4, [1, 3, 4, 2]), (0, [4, 4, 2]), (2, [2, 2, 4, 2])):
            eng._ramp_first_chunk = part
            sizes: list[int] = []
            out[part] = [r.score for r in eng.score(items, on_done=sizes.append)]
            assert sizes == want
        eng._ramp_first_chunk = 4
        assert eng._chunk_bounds(items[:4]) == [(0, 4)] and eng._chunk_bounds(items[:5]) == [(0, 1), (1, 4), (4, 5)]
    assert all(s is not None for s in out[4])
    assert out[4] == pytest.approx(out[0], abs=1e-5) and out[2] == pytest.approx(out[0], abs=1e-5)
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", batch_size=3) as judge:
        assert judge.engine._chunk_bounds(items[:7]) == [(0, 3), (3, 6), (6, 7)]
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", batch_size=4, mode="generate", max_new_tokens=4) as judge:
        assert judge.engine._continuous and judge.engine._chunk_bounds(items) == [(0, 4), (4, 8), (8, 10)]


# -- batch sizes: out of memory and the memory budget ---------------------------------------------

def test_out_of_memory_caps_later_batches(monkeypatch):
    plain = _answers(batch_size=8)
    monkeypatch.setenv("REWARD_FAULT_OOM_ABOVE", "2")
    with QwenVLRewardModel(model_name="tiny:qwen2_5_vl", batch_size=8) as judge:
        res = judge.batch_score(_images())
        assert judge.engine._batch_cap == 2  # 5 failed, 2 ran, 3 failed: later batches start at 2
        assert [r.error for r in res] == [None] * len(plain)
        # other batch compositions, other padding: equal within float rounding
        assert [r.score for r in res] == pytest.approx([p[0] for p in plain], abs=1e-5)


def test_batch_limit_under_budget():
    assert batch_limit(32, None, None, 0, 0) == 32
    assert batch_limit(32, 4, None, 0, 0) == 4
    assert batch_limit(32, None, 20.0, 16e9, 0) == 1  # nothing measured yet: one prompt first
    assert batch_limit(32, None, 20.0, 16e9, 0.5e9) == 8  # (20 - 16) GB / 0.5 GB per prompt
    assert batch_limit(32, 4, 20.0, 16e9, 0.1e9) == 4
    assert batch_limit(32, None, 20.0, 19.9e9, 0.5e9) == 1  # never below one prompt


def test_new_settings_are_checked():
    with pytest.raises(ValueError, match="max_memory_gb"):
        JudgeSettings(model_name="x", max_memory_gb=0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        JudgeSettings(model_name="x", max_new_tokens=8, min_new_tokens=9)
    with pytest.raises(ValueError, match="prepare_threads"):
        JudgeSettings(model_name="x", prepare_threads=0)
    base = JudgeSettings(model_name="x")
    assert base.fingerprint() == JudgeSettings(model_name="x", vision_attn="packed", compile_vision=True,
                                               fast_decode=True, max_memory_gb=10.0).fingerprint()
    assert base.fingerprint() != JudgeSettings(model_name="x", min_new_tokens=4).fingerprint()


# -- compiling: the plumbing, traced by dynamo (backend "eager": no C++ toolchain in the test) ------

@pytest.fixture
def compiled(monkeypatch):
    """torch.compile through dynamo's eager backend; yields the class names of what was compiled."""
    real = torch.nn.Module.compile
    names: list[str] = []

    def compile_eager(self, *args, **kwargs):
        names.append(type(self).__name__)
        return real(self, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eager)
    torch._dynamo.reset()
    try:
        yield names
    finally:
        torch._dynamo.reset()


def test_inductor_options_only_for_qwen3_vision_towers_on_cuda():
    from src.models.reward.speed import inductor_options

    want = {"triton.multi_kernel": 1, "fx_graph_cache": False}
    assert inductor_options("visual", "cuda:0", "qwen3_vl") == want == inductor_options("visual", "cuda:1", "qwen3_vl_moe")
    assert inductor_options("visual", "cpu", "qwen3_vl") == {}
    assert inductor_options("language_model", "cuda:0", "qwen3_vl") == {}
    assert inductor_options("visual", "cuda:0", "qwen2_5_vl") == {}  # not measured there
    # the options exist in this torch's inductor config (torch.compile rejects unknown ones)
    from torch._inductor import config as inductor_config

    assert set(want) <= set(inductor_config.get_config_copy())


def test_compile_options_trace_and_keep_scores(compiled):
    plain = _answers(batch_size=3, compile_vision=False, compile_language=False)
    fast = _answers(batch_size=3, compile_vision=True, compile_language=True)
    assert "Qwen2_5_VLVisionBlock" in compiled and "Qwen2_5_VLDecoderLayer" in compiled
    assert [a[0] for a in fast] == pytest.approx([a[0] for a in plain], abs=1e-5)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl", "qwen2_vl"])
def test_generate_mode_compiles_the_cacheless_parts_and_keeps_answers(compiled, arch):
    # Generate mode keeps a KV cache per layer: only each layer's norms and MLP are compiled (the
    # decoder layers themselves stay eager), and the answers are the plain ones token for token.
    def answers(**kw):
        with QwenVLRewardModel(model_name=f"tiny:{arch}", mode="generate", max_new_tokens=6, batch_size=3, **kw) as j:
            return [(r.raw, r.error) for r in j.batch_score(_images())]
    plain = answers(compile_vision=False, compile_language=False)
    fast = answers(compile_vision=True, compile_language=True)
    assert fast == plain and all(raw for raw, _ in plain)
    assert not any(name.endswith("DecoderLayer") for name in compiled)
    assert any(name.endswith("VisionBlock") for name in compiled)
    # 2 layers: input, post (and Qwen3's q, k) norms
    assert sum(name.endswith("RMSNorm") for name in compiled) == (4 if arch.startswith("qwen3") else 2) * 2
    assert sum(name.endswith(("MLP", "SparseMoeBlock")) for name in compiled) == 2
    assert compiled.count("RotaryEmbedding") == 1  # one module for every layer's rotary embedding


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_rotary_in_attention_runs_every_layer_through_one_module(arch):
    # Each layer's attention keeps its class's code; only the rotary helper it calls by name now
    # goes through the returned module: same answers, one call per layer and forward pass, and a
    # second judge in the process keeps the class's own forward.
    from src.models.reward.speed import rotary_in_attention

    with QwenVLRewardModel(model_name=f"tiny:{arch}", mode="generate", max_new_tokens=5, batch_size=3,
                           compile_vision=False, compile_language=False) as judge, \
            QwenVLRewardModel(model_name=f"tiny:{arch}", mode="generate", max_new_tokens=5, batch_size=3,
                              compile_vision=False, compile_language=False) as other:
        plain = [(r.raw, r.error) for r in judge.batch_score(_images(3))]
        layers = judge.engine.model.model.language_model.layers
        (rotary,) = rotary_in_attention(layers)
        calls = []
        # A hook, not a wrapped rotary.fn: with the `kernels` package (a dependency of transformers
        # 5.2x) transformers' helper is itself a module, which an attribute cannot replace.
        rotary.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
        routed = [(r.raw, r.error) for r in judge.batch_score(_images(3))]
        assert routed == plain and all(raw for raw, _ in plain)
        assert calls and len(calls) % len(layers) == 0
        assert any(shape[2] == 1 for shape in calls)  # the decoding steps' single new token too
        assert all("forward" in vars(layer.self_attn) for layer in layers)
        assert not any("forward" in vars(layer.self_attn) for layer in other.engine.model.model.language_model.layers)
        assert [(r.raw, r.error) for r in other.batch_score(_images(3))] == plain


def test_rotary_in_attention_keeps_the_decorators_of_a_decorated_forward():
    # transformers 5.2x wraps the text attention's forward in deprecate_kwarg (past_key_values ->
    # cache), a closure around the plain function: the helper is still routed through one module,
    # and the decorators still run around the rebuilt forward.
    import functools

    from transformers.utils.deprecation import deprecate_kwarg

    from src.models.reward.speed import rotary_in_attention

    through = []

    def counted(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            through.append(1)
            return fn(*args, **kwargs)
        return wrapper

    with QwenVLRewardModel(model_name="tiny:qwen2_5_vl", mode="generate", max_new_tokens=5, batch_size=3,
                           compile_vision=False, compile_language=False) as judge:
        plain = [(r.raw, r.error) for r in judge.batch_score(_images(3))]
        layers = judge.engine.model.model.language_model.layers
        cls = type(layers[0].self_attn)
        forward = deprecate_kwarg("old_cache", version="99.0", new_name="new_cache")(counted(cls.forward))
        decorated = type(cls.__name__, (cls,), {"forward": forward})
        for layer in layers:
            layer.self_attn.__class__ = decorated
        (rotary,) = rotary_in_attention(layers)
        calls = []
        rotary.register_forward_pre_hook(lambda module, args: calls.append(1))
        through.clear()
        assert [(r.raw, r.error) for r in judge.batch_score(_images(3))] == plain
        assert calls and len(calls) == len(through)  # each attention call went through both


def test_fast_decode_passes_the_cache_under_the_name_the_model_takes(model_and_inputs):
    # transformers 5.2x renamed the forward's past_key_values to cache (the old name warns, and is
    # to go in 5.40, when a cache passed under it would be dropped): fast_decode uses the model's name.
    import warnings

    model, inputs, pad = model_and_inputs
    with torch.inference_mode(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fast_decode.greedy_generate(model, inputs, max_new_tokens=3, eos_token_ids=model.generation_config.eos_token_id,
                                    pad_token_id=pad)
    assert not [str(w.message) for w in seen if "past_key_values" in str(w.message)]


def test_rotary_in_attention_leaves_an_attention_without_the_helper_alone():
    from types import SimpleNamespace

    from src.models.reward.speed import rotary_in_attention

    class Attention(torch.nn.Module):
        def forward(self, x):
            return x * 2

    layers = [SimpleNamespace(self_attn=Attention()) for _ in range(2)]
    assert rotary_in_attention(layers) == [] and rotary_in_attention([]) == []
    assert not any("forward" in vars(layer.self_attn) for layer in layers)


def test_automatic_compile_waits_for_enough_items(compiled, caplog):
    """compile_* unset: nothing compiles at load or for a small job; once compile_after_items have
    been scored the blocks compile (the plumbing traced by dynamo's eager backend here) and the
    scores stay the same. On the CPU the automatic compile is off; the test arms it as CUDA would."""
    plain = _answers(batch_size=2)
    with QwenVLRewardModel(model_name="tiny:qwen2_5_vl", batch_size=2, compile_after_items=4) as judge:
        eng = judge.engine
        assert eng._compile_pending == [] and not compiled  # CPU: not armed, nothing compiled
        eng._compile_pending = [("compile_vision", "visual", "blocks"), ("compile_language", "language_model", "layers")]
        with caplog.at_level(logging.INFO):
            small = judge.batch_score(_images()[:3])
            assert not compiled  # 3 items: below the threshold
            rest = judge.batch_score(_images()[3:])  # 5 scored: compiles before this call's next chunk
        assert "Qwen2_5_VLVisionBlock" in compiled and "Qwen2_5_VLDecoderLayer" in compiled
        assert eng._compile_pending == [] and "compiling compile_vision and compile_language" in caplog.text
        again = judge.batch_score(_images())  # runs compiled
    assert [r.score for r in small + rest] == pytest.approx([p[0] for p in plain], abs=1e-5)
    assert [r.score for r in again] == pytest.approx([p[0] for p in plain], abs=1e-5)


def test_a_failing_compile_falls_back_to_eager(monkeypatch, caplog):
    plain = _answers(batch_size=3)
    real = torch.nn.Module.compile

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **kw: real(self, *a, **{**kw, "backend": broken_backend}))
    torch._dynamo.reset()
    try:
        with caplog.at_level(logging.WARNING):
            fast = _answers(batch_size=3, compile_vision=True)
    finally:
        torch._dynamo.reset()
    assert [a[2] for a in fast] == [None] * len(plain)
    assert [a[0] for a in fast] == pytest.approx([a[0] for a in plain], abs=1e-5)
    assert caplog.text.count("compiling failed") == 1 and "running eagerly from now on" in caplog.text
    # the warning names the error that stopped the compile, not only torch's wrapper of it
    assert "raised: RuntimeError: no compiler here); running eagerly" in caplog.text


# -- vision_reuse: each unique image through the vision tower once per chunk ----------------------

@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_shared_vision_features_give_the_same_scores(arch):
    # The edit rubric shows the edited image to both of its parts, and items 0, 2 and 4 share one
    # source image (as a benchmark's items often do): 5 items, 5 edited + 3 distinct sources = 8
    # unique images, where the plain path encodes 5 x 3 = 15.
    imgs = _images(8, seed=1)
    sources = [imgs[5], imgs[6], imgs[5], imgs[7], imgs[5].copy()]  # a copy: equal pixels, equal name
    items = [ScoreItem(images=[imgs[i]], source_images=[sources[i]], instruction=f"make it {c}")
             for i, c in enumerate("ABCDE")]
    out = {}
    for reuse in (True, False):
        with QwenVLRewardModel(model_name=f"tiny:{arch}", template="edit", batch_size=4, vision_reuse=True) as j:
            r = j.engine._vision_reuse
            assert r is not None
            r.enabled = reuse
            out[reuse] = [res.sub_scores for res in j.batch_score(items)]
            # batch_size 4: chunks of 4 items (7 unique images of 12 shown) and 1 (2 of 3, its source
            # kept from the first chunk: vision_cache_mb): the 8 unique images encoded once each
            assert r.encoded == (7 + 1 if reuse else 0) and r.reused == (15 - 8 if reuse else 0)
    for a, b in zip(out[True], out[False]):
        assert a.keys() == b.keys() and all(v is not None for v in a.values())
        for part in a:
            assert abs(a[part] - b[part]) < 1e-5, (part, a[part], b[part])


def test_vision_reuse_keeps_no_features_after_a_call():
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", template="edit", batch_size=2, vision_reuse=True,
                           vision_cache_mb=0) as j:  # nothing kept beyond a chunk (tests/test_vision_reuse.py)
        imgs = _images(4)
        res = j.batch_score([ScoreItem(images=[imgs[i]], source_images=[imgs[3]], instruction="x") for i in range(3)])
        assert all(r.error is None for r in res)
        r = j.engine._vision_reuse
        assert not r.store and r.keys is None and r.encoded == 3 + 2 and r.reused == 9 - 5


# -- continuous batching: finished rows leave, new prompts join ------------------------------------

@pytest.mark.parametrize("arch, check_every, align, stage", [
    ("qwen2_5_vl", None, 64, 0), ("qwen3_vl_moe", None, 64, None), ("qwen2_5_vl", 8, 64, None), ("qwen3_vl", 8, 1, None)])
def test_continuous_batching_gives_each_prompt_its_alone_tokens(arch, check_every, align, stage):
    # check_every=8: finished rows are looked for every 8 steps, as the CUDA graph path does, so a
    # row that ended keeps stepping up to 7 times before its slot is freed. align=1: a cache with no
    # slack past the longest prompt plus the longest answer, so a finished row that kept moving its
    # write position while others decode would index past the cache's end (the GPU's device assert).
    # stage: None, the default (prompts prefilled ahead, then copied into slots as they free up);
    # 0, every join prefilled when its slots are free.
    proc, model, prompts, imgs = _tiny_prompts(arch, 6)
    alone_inputs = [proc(text=[p], images=[im], return_tensors="pt") for p, im in zip(prompts, imgs)]
    pad = proc.tokenizer.pad_token_id
    base = fast_decode.Plan(max_new_tokens=16, min_new_tokens=0, eos_token_ids=(pad,), pad_token_id=pad)
    with torch.inference_mode():
        free = [fast_decode.generate_tokens(model, x, base)[0] for x in alone_inputs]
        # An end token that each answer meets at a different step: rows finish at different times.
        counts = {}
        for row in free:
            for t in set(row[1:12].tolist()):
                counts[t] = counts.get(t, 0) + 1
        eos = max(counts, key=counts.get)
        plan = fast_decode.Plan(max_new_tokens=16, min_new_tokens=2, eos_token_ids=(eos,), pad_token_id=pad,
                                repetition_penalty=1.1)
        alone = [fast_decode.generate_tokens(model, x, plan)[0] for x in alone_inputs]
        alone = [row[:(row == eos).nonzero()[0, 0] + 1] if (row == eos).any() else row for row in alone]
        lengths = [len(a) for a in alone]
        assert min(lengths) < 16 and len(set(lengths)) > 1, lengths
        limits = [16, 16, 5, 16, 16, 9]  # two prompts with their own, lower, limit
        first = proc(text=prompts[:2], images=imgs[:2], padding=True, return_tensors="pt")
        timings = {}
        got = row_decode.generate_continuous(model, first, alone_inputs[2:], plan, limits=limits, timings=timings,
                                              check_every=check_every, cache_align=align, stage=stage)
    assert timings["joined"] == 4
    if stage == 0:
        assert timings["staged_rows"] == 0 and timings["sync_joins"] == len(timings["join_groups"]) > 0
    else:
        assert timings["staged_rows"] == 4 and timings["sync_joins"] == 0 and timings["stage"] == 2  # at most the slots
    for i, (a, g) in enumerate(zip(alone, got)):
        assert g.tolist() == a[:limits[i]].tolist(), (i, g.tolist(), a.tolist())


def _tiny_prompts(arch: str, n: int, seed: int = 2):
    path = resolve_model_name(f"tiny:{arch}")
    proc = AutoProcessor.from_pretrained(path)
    proc.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval()
    prompts = [proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "rate this" + " please" * i}]}], add_generation_prompt=True,
        tokenize=False) for i in range(n)]
    return proc, model, prompts, _images(n, seed=seed)


@pytest.mark.parametrize("arch, forced, align, min_join, stage", [
    ("qwen3_vl", True, 1, 1, 0), ("qwen2_vl", False, 64, 1, 0), ("qwen2_5_vl", True, 64, 1, None),
    ("qwen3_vl_moe", False, 1, 1, None), ("qwen3_vl", False, 64, 3, 0)])
def test_continuous_batching_joins_free_slots_as_one_batch(arch, forced, align, min_join, stage):
    # The prompts that fill the slots free at one look are prefilled as one left-padded batch (their
    # prompt lengths differ: other image sizes, other texts) and each row's cache copied into its
    # slot. forced: every answer exactly 5 tokens, so a whole batch finishes at one step and the next
    # three prompts join at once (as a static batch would start). Else limits end rows in twos and
    # threes. align=1: joining prompts longer than the first batch's make the cache grow. min_join=3:
    # free slots wait until three are free (or the prompts run out), so each joining batch is three.
    # stage=None (the default): three prompts prefilled ahead, the next batch as soon as they are in.
    proc, model, prompts, imgs = _tiny_prompts(arch, 9)
    pad = proc.tokenizer.pad_token_id
    if forced:
        plan = fast_decode.Plan(max_new_tokens=5, min_new_tokens=5, eos_token_ids=(pad,), pad_token_id=pad,
                                repetition_penalty=1.1)
        limits = [5] * 9
    else:
        plan = fast_decode.Plan(max_new_tokens=6, min_new_tokens=0, eos_token_ids=(pad,), pad_token_id=pad)
        limits = [2, 2, 2, 6, 3, 3, 4, 4, 4]
    singles = [proc(text=[p], images=[im], return_tensors="pt") for p, im in zip(prompts, imgs)]
    assert len({x["input_ids"].shape[1] for x in singles}) == 9  # nine prompt lengths
    with torch.inference_mode():
        alone = [fast_decode.generate_tokens(model, x, plan)[0] for x in singles]
    alone = [row[:(row == pad).nonzero()[0, 0] + 1] if (row == pad).any() else row for row in alone]
    first = proc(text=prompts[:3], images=imgs[:3], padding=True, return_tensors="pt")
    # The stacked single outputs are what the processor makes of the prompts as one batch.
    stacked = row_decode.stack_inputs(singles[:3], pad)
    assert stacked.keys() == first.keys()
    for key in first:
        assert torch.equal(stacked[key], first[key]), key
    asked, timings = [], {}

    def before_join(idx):
        asked.append(idx)
        return row_decode.stack_inputs([singles[3 + i] for i in idx], pad)

    got = row_decode.generate_continuous(model, first, singles[3:], plan, limits=limits, check_every=1,
                                          cache_align=align, min_join=min_join, stage=stage,
                                          before_join=before_join, timings=timings)
    for i, (a, g) in enumerate(zip(alone, got)):
        assert g.tolist() == a[:limits[i]].tolist(), (i, g.tolist(), a.tolist())
    assert [len(i) for i in asked] == timings["join_groups"] and sum(timings["join_groups"]) == 6
    assert [i for idx in asked for i in idx] == list(range(6))
    if forced or min_join == 3:
        assert timings["join_groups"] == [3, 3]
    else:
        assert max(timings["join_groups"]) >= 2
    if align == 1:
        assert timings["cache_grown"] > 0
    assert timings["staged_rows"] == (0 if stage == 0 else 6)


@pytest.mark.parametrize("arch, check_every", [("qwen3_vl", 1), ("qwen3_vl", 8), ("qwen2_5_vl", 8)])
def test_staged_prompts_enter_slots_in_order_even_a_batch_at_a_time(monkeypatch, arch, check_every):
    # Prompts prefilled ahead (stage 3, three slots) take the slots as they free up, in the order
    # they were taken. The first three answers end in different looks (5, 13, 21 tokens), so a
    # staged batch of three is copied into slots a row or two at a time while the rest of it waits.
    # A row's cache, logits, rope positions, seen tokens, limit and number must travel together:
    # every prompt's answer differs from the others', so a row put in the wrong slot, started from
    # another row's logits or positions, or numbered out of order, shows as a wrong answer.
    # align=1: the later, longer prompts make the cache grow as they are copied in.
    proc, model, prompts, imgs = _tiny_prompts(arch, 9)
    pad = proc.tokenizer.pad_token_id
    plan = fast_decode.Plan(max_new_tokens=24, min_new_tokens=2, eos_token_ids=(pad,), pad_token_id=pad,
                            repetition_penalty=1.1)
    limits = [5, 13, 21, 8, 24, 6, 10, 24, 24]
    singles = [proc(text=[p], images=[im], return_tensors="pt") for p, im in zip(prompts, imgs)]
    with torch.inference_mode():
        alone = [fast_decode.generate_tokens(model, x, plan)[0][:n] for x, n in zip(singles, limits)]
    assert len({tuple(a.tolist()) for a in alone}) == 9
    entered = []  # (prompt numbers copied into slots at once, size of their prefilled batch)
    real_enter = row_decode._ContinuousDecode._enter

    def spy(self, g, free, where, **kw):
        entered.append((g.numbers[g.used:g.used + len(free)], len(g.numbers)))
        return real_enter(self, g, free, where, **kw)

    monkeypatch.setattr(row_decode._ContinuousDecode, "_enter", spy)
    timings = {}
    got = row_decode.generate_continuous(model, row_decode.stack_inputs(singles[:3], pad), singles[3:], plan,
                                          limits=limits, check_every=check_every, cache_align=1, stage=3,
                                          timings=timings)
    for i, (a, g) in enumerate(zip(alone, got)):
        assert g.tolist() == a.tolist(), (i, g.tolist(), a.tolist())
    assert [i for numbers, _ in entered for i in numbers] == list(range(3, 9))
    assert any(len(numbers) < size for numbers, size in entered)  # a staged batch copied in part
    assert timings["staged_rows"] == 6 and timings["sync_joins"] == 0 and timings["staged_groups"] >= 2
    assert timings["join_groups"][0] == 3 and timings["cache_grown"] > 0


def test_stack_inputs_refuses_what_it_cannot_lay_out():
    a = {"input_ids": torch.ones(1, 3, dtype=torch.long), "pixel_values": torch.zeros(4, 2)}
    b = {"input_ids": torch.ones(1, 2, dtype=torch.long), "pixel_values": torch.zeros(4, 2)}
    out = row_decode.stack_inputs([a, b], 7)
    assert out["input_ids"].tolist() == [[1, 1, 1], [7, 1, 1]] and out["pixel_values"].shape == (8, 2)
    with pytest.raises(ValueError, match="'extra' is neither per token nor per image"):
        row_decode.stack_inputs([dict(a, extra=torch.zeros(5)), dict(b, extra=torch.zeros(5))], 7)


def test_stack_inputs_keeps_the_images_of_rows_after_a_row_without_any():
    # Under continuous batching the prompts that join together come from every rubric part; a part
    # that shows no image gives a row without pixel_values. The images of the other rows are laid
    # out whichever row comes first (taken from the first row's keys, they were dropped: the image
    # prompts answered without their images, silently; or a KeyError when the first row had some).
    text = {"input_ids": torch.ones(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    image = {"input_ids": torch.full((1, 3), 5), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "pixel_values": torch.rand(4, 2), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    for rows in ([text, image, text], [image, text]):
        out = row_decode.stack_inputs(rows, 7)
        assert torch.equal(out["pixel_values"], image["pixel_values"])
        assert torch.equal(out["image_grid_thw"], image["image_grid_thw"])
        assert out["input_ids"].shape == (len(rows), 3) and out["attention_mask"].sum() == 3 + 2 * (len(rows) - 1)
    with pytest.raises(ValueError, match="a row has no 'attention_mask'"):
        row_decode.stack_inputs([image, {"input_ids": torch.ones(1, 2, dtype=torch.long)}], 7)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_continuous_batching_a_rubric_with_a_part_that_shows_no_image(arch, caplog):
    # Text-only prompts (a part asking about the instruction alone) and image prompts join one
    # decode: the same answers as static batches and as generate(), and the decode does not fail.
    templates = {"instruction_only": {"text": "Is this a clear edit instruction: {instruction}?", "images": []},
                 "both": {"parts": {"text": "instruction_only", "image": "edit_quality"}, "combine": "mean"}}
    items = [ScoreItem(images=[im], instruction="make it" + " red" * k) for k, im in enumerate(_images(5, seed=4))]
    base = dict(mode="generate", max_new_tokens=6, template="both", templates=templates, batch_size=2)
    out = {}
    for name, extra in (("continuous", {}), ("static", {"continuous_batching": False}), ("generate()", {"fast_decode": False})):
        with QwenVLRewardModel(model_name=f"tiny:{arch}", **base, **extra) as j:
            assert j.engine._continuous is (name == "continuous")
            out[name] = [r.raw for r in j.batch_score(items)]
    assert out["continuous"] == out["static"] == out["generate()"]
    assert "continuous batching failed" not in caplog.text


def test_continuous_batching_judge_gives_the_static_answers(caplog):
    # 7 items, batch 2: two start, five join as answers end; items' own budgets spread the lengths.
    imgs = _images(7, seed=3)
    budgets = [12, 3, 7, None, 2, 12, 5]
    items = [ScoreItem(images=[im], metadata={"max_new_tokens": b} if b else {}) for im, b in zip(imgs, budgets)]
    base = dict(mode="generate", max_new_tokens=12, batch_size=2)
    out = {}
    for on in (True, False):
        with QwenVLRewardModel(model_name="tiny:qwen3_vl", continuous_batching=on, **base) as j:
            assert j.engine._continuous is on and j.engine._chunk_items() == 2
            out[on] = [(r.raw, r.error_kind) for r in j.batch_score(items)]
    assert out[True] == out[False]
    assert "continuous batching failed" not in caplog.text  # it ran, not its static fallback
    assert len(out[True][4][0]["quality"]) < len(out[True][0][0]["quality"])  # budgets bit: random weights never stop
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", **base) as j:
        bad = j.batch_score([ScoreItem(images=[imgs[0]], metadata={"max_new_tokens": 13})])[0]
    assert bad.error_kind == "input" and "max_new_tokens must be a whole number in 1..12" in bad.error


def test_continuous_batching_one_decode_spans_the_call(monkeypatch, tmp_path):
    # 9 items, batch 2: five chunks of two items, one decode for the whole call (finished answers
    # leave, prompts of later chunks join). The edit rubric asks two questions (two templates in one
    # decode), the second shows the edited image again (vision reuse across the pulled chunks). Item
    # 3's image is missing (fails in preparation); item 6's prompt is over max_prompt_tokens (its
    # processor output fails in the prepare thread: it runs alone after the decode, and fails alone).
    imgs = _images(9, seed=4)
    budgets = [12, 3, 7, None, 2, 12, 5, 9, 1]
    items = [ScoreItem(images=[im], source_images=[imgs[(i + 1) % 9]], instruction="make it red",
                       metadata={"max_new_tokens": b} if b else {}) for i, (im, b) in enumerate(zip(imgs, budgets))]
    items[3] = ScoreItem(images=[str(tmp_path / "missing.png")], source_images=[imgs[0]], instruction="x")
    items[6] = ScoreItem(images=[imgs[6]], source_images=[imgs[7]], instruction="red " * 2000)
    base = dict(mode="generate", max_new_tokens=12, batch_size=2, template="edit", max_prompt_tokens=1000)
    decodes = []
    real = row_decode.run_continuous
    monkeypatch.setattr(row_decode, "run_continuous", lambda *a, **k: decodes.append(1) or real(*a, **k))
    out = {}
    for on in (True, False):
        with QwenVLRewardModel(model_name="tiny:qwen3_vl", continuous_batching=on, **base) as j:
            assert j.engine._continuous is on and j.engine._chunk_items() == 2
            res = j.batch_score(items)
            out[on] = [(r.index, r.raw, r.sub_scores, r.error, r.error_kind) for r in res]
            assert j.engine._items_scored == 9  # every chunk counted once (automatic compiling)
            # One item, two prompts: nothing would join, so a static batch (of the stacked prompts)
            small = j.batch_score(items[:1])[0]
            out[on].append((small.raw, small.error_kind))
            reuse = j.engine._vision_reuse
            assert not reuse.store and reuse.keys is None and reuse.reused > 0
    assert decodes == [1]
    assert out[True] == out[False]
    assert out[True][3][4] == "image" and out[True][6][4] == "prompt_too_long"
    assert all(o[4] in (None, "parse") for i, o in enumerate(out[True][:9]) if i not in (3, 6))  # random weights: junk
    assert out[True][9][0] == out[True][0][1]
    assert len(out[True][8][1]["semantic_consistency"]) < len(out[True][0][1]["semantic_consistency"])  # budgets bit


@pytest.mark.parametrize("stage", [None, 0])
def test_continuous_batching_counts_a_prompt_from_its_prefill_not_its_wait_for_a_slot(monkeypatch, stage):
    # latency_s under continuous batching is a prompt's prefill and its share of the decode (one of
    # the slots, from its prefill to its end), the same whether it started, joined as a slot freed
    # (stage 0) or was prefilled ahead and waited for a slot (staged): the wait is not counted. The
    # clock here is the decode itself: time.perf_counter reads a counter that the language model's
    # decoding steps advance (a torch forward hook; a prefill feeds embeddings, a step token ids),
    # so the measure is exact, whatever the machine. Every answer is as long as its budget (min ==
    # max new tokens): a prompt of n tokens decodes n - 1 steps after the token of its prefill.
    import time

    imgs = _images(7, seed=3)
    budgets = [12, 3, 7, None, 2, 12, 5]
    items = [ScoreItem(images=[im], metadata={"max_new_tokens": b} if b else {}) for im, b in zip(imgs, budgets)]
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", mode="generate", max_new_tokens=12, min_new_tokens=12,
                           batch_size=2, continuous_batching=True) as j:
        j.engine._continuous_stage = stage
        steps = [0.0]

        def count_step(module, args, kwargs):
            if kwargs.get("input_ids") is not None:
                steps[0] += 1

        hook = j.engine.model.model.language_model.register_forward_pre_hook(count_step, with_kwargs=True)
        monkeypatch.setattr(time, "perf_counter", lambda: steps[0])
        try:
            results = j.batch_score(items)
        finally:
            monkeypatch.undo()
            hook.remove()
        timings = j.engine._continuous_timings
    assert timings["joined"] == 5 and steps[0] == timings["steps"]  # one decode, every step counted
    if stage is None:
        assert timings["staged_rows"] == 5  # every prompt that joined had waited, prefilled
    else:
        assert timings["staged_rows"] == 0 and timings["sync_joins"] > 0
    slots = 2
    assert [r.latency_s * slots for r in results] == [(b or 12) - 1 for b in budgets]


class _FailsThirdForward:
    """For faults.on_forward: the third forward pass of the call (a joining batch) raises."""

    def __init__(self):
        self.sizes: list[int] = []

    def before_forward(self, n_prompts: int) -> None:
        self.sizes.append(n_prompts)
        if len(self.sizes) == 3:
            raise RuntimeError("simulated fault while prompts join")


@pytest.mark.parametrize("stage", [0, None])
def test_continuous_batching_falls_back_for_the_unfinished_prompts_only(caplog, stage):
    from src.testing import faults

    imgs = _images(7, seed=3)
    budgets = [12, 3, 7, None, 2, 12, 5]
    items = [ScoreItem(images=[im], metadata={"max_new_tokens": b} if b else {}) for im, b in zip(imgs, budgets)]
    base = dict(mode="generate", max_new_tokens=12, batch_size=2)
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", continuous_batching=False, **base) as j:
        static = [(r.raw, r.error_kind) for r in j.batch_score(items)]
    plugin = _FailsThirdForward()
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", continuous_batching=True, **base) as j:
        j.engine._continuous_stage = stage
        hook = faults.on_forward(plugin.before_forward, j.engine.model)
        try:
            with caplog.at_level(logging.WARNING):
                got = [(r.raw, r.error_kind) for r in j.batch_score(items)]
        finally:
            hook.remove()
        assert j.engine._items_scored == 7
    assert got == static  # nothing lost, nothing changed
    assert "continuous batching failed" in caplog.text and "simulated fault while prompts join" in caplog.text
    # Before the fault: the first batch (2) and one join; the prompts rerun in static batches are
    # the ones not finished (the fault's own batch among them), not the whole call.
    assert plugin.sizes[0] == 2 and 0 < sum(plugin.sizes[3:]) < 7
    if stage is None:
        # Prefilled ahead (two slots: two staged): items 2 and 3 as one batch. Item 1 ends first,
        # item 2 takes its slot, and one prompt is taken to refill the stage (the fault) while item
        # 3 waits staged, in no slot: it reruns with every other prompt not finished (all but 1).
        assert plugin.sizes[1:3] == [2, 1] and sum(plugin.sizes[3:]) == 6


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_patch_embedding_as_one_matmul_is_the_conv3d(arch):
    # The module alone in float64 (the same products, summed in another order), then a whole judge
    # with its patch embedding as loaded (the matmul) and as the class's Conv3d: float32 scores
    # within 1e-5. A second judge in the process keeps the class's forward untouched.
    from src.models.reward.speed import patch_embed_as_matmul

    with QwenVLRewardModel(model_name=f"tiny:{arch}", batch_size=3, compile_vision=False,
                           compile_language=False) as judge:
        assert judge.engine.patch_embed_matmul is True
        embed = judge.engine.model.model.visual.patch_embed
        assert "forward" in vars(embed)
        conv = type(embed).forward
        x = torch.randn(40, embed.proj.weight[0].numel(), generator=torch.Generator().manual_seed(0))
        dtype = embed.proj.weight.dtype
        with torch.no_grad():
            embed64 = embed.double()
            assert torch.allclose(embed64(x.double()), conv(embed64, x.double()), rtol=0, atol=1e-12)
            embed.to(dtype)
        ours = [(r.score, r.error) for r in judge.batch_score(_images(3))]
        del embed.forward  # back to the class's Conv3d
        judge.engine._forget_vision_features()
        theirs = [(r.score, r.error) for r in judge.batch_score(_images(3))]
    assert all(err is None for _, err in ours)
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in theirs], abs=1e-5)


def test_patch_embedding_left_alone_when_it_is_not_a_patchwise_conv():
    from types import SimpleNamespace

    from src.models.reward.speed import patch_embed_as_matmul

    overlapping = torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 2, 2))
    model = SimpleNamespace(model=SimpleNamespace(visual=SimpleNamespace(patch_embed=SimpleNamespace(proj=overlapping))))
    assert patch_embed_as_matmul(model) is False
    assert patch_embed_as_matmul(SimpleNamespace(model=SimpleNamespace())) is False
    # A forward already on the module (an accelerate hook on a judge spread over GPUs) stays.
    embed = torch.nn.Module()
    embed.proj = torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4))
    hooked = embed.forward = lambda x: x
    assert patch_embed_as_matmul(SimpleNamespace(model=SimpleNamespace(visual=SimpleNamespace(patch_embed=embed)))) is False
    assert embed.forward is hooked


def test_vision_gelu_inside_the_matmul_where_it_applies():
    # Qwen3-VL's vision MLP gets fc1 and its tanh GELU as one `_addmm_activation` call on CUDA
    # only (on the CPU that op's GELU is the exact one). Here, without a GPU: the judge leaves
    # every tower alone; asked as for CUDA, the Qwen3 towers' blocks change and the others' do not,
    # nor a hooked or quantized fc1. The changed forward's arithmetic, checked against the CPU
    # op's own GELU (erf) in float64: fc1 with its bias, the activation, fc2, shapes kept. The
    # CUDA op's tanh GELU against the model's is checked on the GPU (benchmarks/NOTES.md).
    from src.models.reward.speed import vision_gelu_in_matmul

    def build_tiny_model(arch):
        return AutoModelForImageTextToText.from_pretrained(resolve_model_name(f"tiny:{arch}")).eval()

    with QwenVLRewardModel(model_name="tiny:qwen3_vl", compile_vision=False, compile_language=False) as judge:
        assert judge.engine.vision_gelu_fused == 0
        assert all("forward" not in vars(b.mlp) for b in judge.engine.model.model.visual.blocks)
    for arch, applies in (("qwen3_vl", True), ("qwen3_vl_moe", True), ("qwen2_5_vl", False), ("qwen2_vl", False)):
        model = build_tiny_model(arch)
        blocks = model.model.visual.blocks
        assert vision_gelu_in_matmul(model, cuda=False) == 0
        assert vision_gelu_in_matmul(model, cuda=True) == (len(blocks) if applies else 0), arch
        if applies:
            mlp = blocks[0].mlp.double()
            x = torch.randn(2, 7, mlp.linear_fc1.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                want = mlp.linear_fc2(torch.nn.functional.gelu(mlp.linear_fc1(x)))
                got = mlp(x)
            assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=1e-12)
    model = build_tiny_model("qwen3_vl")
    first, second = model.model.visual.blocks[:2]
    hooked = first.mlp.linear_fc1.forward = lambda x: x  # an accelerate hook moving inputs between GPUs
    second.mlp.linear_fc1.__class__ = type("Linear4bit", (torch.nn.Linear,), {})  # a quantized layer
    assert vision_gelu_in_matmul(model, cuda=True) == len(model.model.visual.blocks) - 2
    assert "forward" not in vars(first.mlp) and first.mlp.linear_fc1.forward is hooked
    assert "forward" not in vars(second.mlp)


def test_continuous_batching_lists_a_rubrics_parts_in_rubric_order():
    # Under continuous batching an item's two edit-rubric prompts finish in the order their answers
    # end: the item's raw answers and its error must still list the parts in the rubric's order,
    # as a static batch does (item 5's second part ends first here).
    imgs = _images(7, seed=3)
    budgets = [1, 12, 3, None, 1, 12, 5]
    items = [ScoreItem(images=[im], source_images=[imgs[(i + 1) % 7]], instruction="make it red",
                       metadata={"max_new_tokens": b} if b else {}) for i, (im, b) in enumerate(zip(imgs, budgets))]
    base = dict(mode="generate", max_new_tokens=12, batch_size=2, template="edit")
    out = {}
    for on in (True, False):
        with QwenVLRewardModel(model_name="tiny:qwen2_5_vl", continuous_batching=on, **base) as j:
            parts = [p for p, _ in j.engine.rubric.parts]
            res = j.batch_score(items)
        assert all(list(r.raw) == parts for r in res), [list(r.raw) for r in res]
        out[on] = [(r.error, json.dumps(r.raw)) for r in res]
    assert out[True] == out[False]
    assert any(e and e.index(parts[0]) < e.index(parts[1]) for e, _ in out[True])  # both parts failed somewhere
