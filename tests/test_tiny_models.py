"""Tiny random-weight Qwen-VL checkpoints: build, load through the Auto classes, run them.

Random weights write junk text, so these tests assert shapes, finiteness, determinism and
batched == one-by-one, never what the model says.
"""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch
from PIL import Image
from qwen_vl_utils import process_vision_info
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from src.models import tiny
from src.models.tiny import ARCHS, build_tiny_model, resolve_model_name

PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_vl_moe": 16}


def _image(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy())


CONVERSATIONS = [
    [
        {"role": "system", "content": "You are an image quality judge."},
        {"role": "user", "content": [
            {"type": "image", "image": _image(64, 48, 1)},
            {"type": "text", "text": "Rate the quality of this image."},
        ]},
    ],
    [
        {"role": "user", "content": [
            {"type": "image", "image": _image(40, 72, 2)},
            {"type": "text", "text": 'How good is it? Answer {"score": N}.'},
        ]},
    ],
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """arch -> checkpoint directory, each built once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def loaded(built):
    """arch -> (processor, model, loading_info), each loaded once through the Auto classes."""
    out = {}
    for arch, path in built.items():
        processor = AutoProcessor.from_pretrained(path)
        model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
        out[arch] = (processor, model.eval(), info)
    return out


def _inputs(processor, arch, conversations):
    """The processor's WHOLE output for a left-padded batch (mm_token_type_ids included)."""
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    images, videos = process_vision_info(conversations, image_patch_size=PATCH[arch])
    assert videos is None
    return processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_real_classes_without_missing_weights(arch, built, loaded):
    processor, model, info = loaded[arch]
    assert {k: v for k, v in info.items() if v} == {}, info
    expected = {
        "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
        "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
        "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
        "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    }[arch]
    got = (type(model).__name__, type(processor).__name__, type(processor.video_processor).__name__)
    assert got == expected
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert processor.image_processor.patch_size == PATCH[arch]
    assert processor.image_processor.merge_size == 2

    tok = processor.tokenizer
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.text_config.vocab_size >= len(tok)
    head_dim = getattr(cfg.text_config, "head_dim", None) or cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    if arch == "qwen3_vl_moe":
        assert (cfg.text_config.num_experts, cfg.text_config.num_experts_per_tok) == (4, 2)

    size = sum(f.stat().st_size for f in built[arch].iterdir())
    assert size < 4 * 2**20, size


def test_tokenizer(loaded):
    tok = loaded["qwen2_5_vl"][0].tokenizer
    for d in "0123456789":
        assert len(tok.encode(d, add_special_tokens=False)) == 1
    assert not [t for t in tok.get_vocab() if len(t) > 1 and not t.startswith("<") and any(c.isdigit() for c in t)]
    for w in ("excellent", "good", "fair", "poor", "bad"):
        assert len(tok.encode(w, add_special_tokens=False)) == 1
        assert len(tok.encode(" " + w, add_special_tokens=False)) == 1
    for p in "{}\":":
        assert p in tok.get_vocab()
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    for text in ('{"score": 7}', '{"score": 10, "reason": "sharp"}', "Score: 3/5, quality poor"):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # "10" is two digit tokens: digits never merge.
    assert tok.convert_ids_to_tokens(tok.encode("10", add_special_tokens=False)) == ["1", "0"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_chat_template(loaded):
    processor = loaded["qwen2_5_vl"][0]
    messages = [
        {"role": "system", "content": "Be strict."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which?"}]},
        {"role": "assistant", "content": "The first."},
        {"role": "user", "content": "Why?"},
    ]
    vis = "<|vision_start|><|image_pad|><|vision_end|>"
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nBe strict.<|im_end|>\n"
        f"<|im_start|>user\n{vis}{vis}Which?<|im_end|>\n"
        "<|im_start|>assistant\nThe first.<|im_end|>\n"
        "<|im_start|>user\nWhy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "text"}]}]
    assert processor.apply_chat_template(one, add_generation_prompt=False, tokenize=False) == (
        f"<|im_start|>user\n{vis}text<|im_end|>\n"
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_generate_and_batching(arch, loaded):
    processor, model, _ = loaded[arch]
    inputs = _inputs(processor, arch, CONVERSATIONS)
    assert set(inputs) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    assert inputs["attention_mask"][:, -1].all(), "left padding"
    assert inputs["image_grid_thw"][0].tolist() != inputs["image_grid_thw"][1].tolist()

    with torch.no_grad():
        logits = model(**inputs).logits
        again = model(**inputs).logits
    assert logits.shape == (2, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, again)

    # Batched (left-padded) == one-by-one at the last position, in float32.
    for i, conversation in enumerate(CONVERSATIONS):
        single = _inputs(processor, arch, [conversation])
        with torch.no_grad():
            one = model(**single).logits[0, -1]
        torch.testing.assert_close(logits[i, -1], one, atol=1e-4, rtol=0)

    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 5
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("arch", ARCHS)
def test_build_is_deterministic(arch, built, tmp_path):
    again = build_tiny_model(arch, tmp_path / "again", seed=0)
    a = load_file(built[arch] / "model.safetensors")
    b = load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (built[arch] / name).read_bytes() == (again / name).read_bytes(), name
    if arch == "qwen2_5_vl":
        other = load_file(build_tiny_model(arch, tmp_path / "other", seed=1) / "model.safetensors")
        assert not all(torch.equal(a[k], other[k]) for k in a)


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("qwen2_vl", tmp_path / "m", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_overrides(tmp_path):
    path = build_tiny_model("qwen3_vl", tmp_path / "m", num_hidden_layers=1, vision_depth=1, max_pixels=32 * 32 * 16)
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert model.config.text_config.num_hidden_layers == 1
    assert model.config.vision_config.deepstack_visual_indexes == [0]
    assert AutoProcessor.from_pretrained(path).image_processor.size["longest_edge"] == 32 * 32 * 16
    with pytest.raises(TypeError):
        build_tiny_model("qwen3_vl", tmp_path / "x", hidden=3)
    with pytest.raises(ValueError):
        build_tiny_model("llava", tmp_path / "y")


def test_resolve_model_name(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = resolve_model_name("tiny:qwen2_5_vl", cache_dir=cache)
    assert os.path.isdir(first) and os.path.dirname(first) == str(cache)
    assert [p.name for p in cache.iterdir()] == [os.path.basename(first)], "no temporary dirs left"
    mtime = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached tiny model")

    monkeypatch.setattr(tiny, "build_tiny_model", no_rebuild)
    assert resolve_model_name("tiny:qwen2_5_vl", cache_dir=cache) == first
    assert os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns == mtime

    monkeypatch.setenv(tiny.CACHE_ENV, str(cache))
    assert resolve_model_name("tiny:qwen2_5_vl") == first

    for name in ("Qwen/Qwen2.5-VL-7B-Instruct", "/models/local", "tinyllama"):
        assert resolve_model_name(name, cache_dir=cache) == name
    with pytest.raises(ValueError):
        resolve_model_name("tiny:nope", cache_dir=cache)


def _resolve_in_child(cache, queue):
    queue.put(resolve_model_name("tiny:qwen2_vl", cache_dir=cache))


def test_resolve_model_name_concurrent_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")  # forks after the heavy imports: fast
    queue = ctx.Queue()
    procs = [ctx.Process(target=_resolve_in_child, args=(tmp_path, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    paths = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(set(paths)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(paths[0])]
    AutoModelForImageTextToText.from_pretrained(paths[0])


def test_cli(tmp_path, capsys):
    assert tiny.main(["--arch", "qwen3_vl_moe", "--out", str(tmp_path / "cli")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert (tmp_path / "cli" / "model.safetensors").is_file()
