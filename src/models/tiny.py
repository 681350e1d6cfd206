"""Tiny random-weight Qwen-VL checkpoints, built offline.

Tests and demos cannot reach a model hub, so this module writes a complete checkpoint of the
REAL architecture (config, safetensors weights, tokenizer, processor, chat template) with tiny
sizes and random but deterministic weights. The result loads through the normal path::

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)

Public API:

- ``ARCHS``: the architectures this builds.
- ``build_tiny_model(arch, out_dir, seed=0, **overrides)``: write a checkpoint into ``out_dir``.
- ``resolve_model_name(name, cache_dir=None)``: ``"tiny:ARCH"`` -> path of a cached checkpoint
  (built on first use, safe against concurrent builders); any other name comes back unchanged.

CLI (from the repository root)::

    python -m src.models.tiny --arch qwen2_5_vl --out DIR [--seed 0]

Only the standard library, torch, transformers and tokenizers are imported: this module runs in
worker environments that hold just those (plus qwen-vl-utils and pillow).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import threading
from collections import Counter
from typing import Any

ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")

TINY_PREFIX = "tiny:"
# Bump when the builder's output changes, so stale cached checkpoints are not reused.
BUILDER_VERSION = 1
CACHE_ENV = "REWARD_TINY_CACHE"

# Model init draws from torch's global RNG: builds in one process run one at a time.
_BUILD_LOCK = threading.Lock()

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# Qwen's special tokens, in Qwen's order (ids follow the BPE vocabulary, as in the real models).
# (token, special): special tokens are skipped by decode(skip_special_tokens=True).
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# Q-Align-style level words: each must be ONE token, with and without a leading space.
LEVEL_WORDS = ("excellent", "good", "fair", "poor", "bad")
SINGLE_TOKEN_WORDS = tuple(LEVEL_WORDS) + tuple(" " + w for w in LEVEL_WORDS)

# Qwen2's pre-tokenizer regex: `\p{N}` matches ONE digit, so digits never merge with anything.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_CORPUS = """\
You are a helpful assistant. You are an expert in image quality assessment.
How would you rate the quality of this image? The quality of the image is excellent.
The quality of the image is good. The quality of the image is fair. The quality of the image is poor.
The quality of the image is bad. Rate the image on a scale from 1 to 10.
Please answer with a JSON object like {"score": 7} and nothing else.
{"score": 3, "reason": "the image is blurry and dark"}
{"score": 9, "reason": "sharp details, natural colors and good lighting"}
Describe the image. Is the image aligned with the prompt? Answer yes or no.
The picture shows a cat sitting on a red sofa next to a window in the afternoon light.
A photo of a dog running on the beach. A painting of a mountain lake at sunset.
Which image is better, the first one or the second one? The first image is better.
The aesthetics of this picture are excellent: composition, color, contrast and focus.
Noise, blur, compression artifacts, overexposure and underexposure lower the quality.
Score: 8/10. Overall quality: good. Technical quality: fair. Aesthetic quality: poor.
Let me think step by step about the image before I answer the question.
system user assistant system user assistant system user assistant
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (what ByteLevel pre-tokenization uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _qwen_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _train_bpe(num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Deterministic byte-level BPE training on the built-in corpus (pure Python, fast).

    Ties between equally frequent pairs break on the pair itself, so the result never depends on
    hashing or library internals. The level words are weighted heavily so they become single tokens.
    """
    pre = _qwen_pre_tokenizer()
    words: Counter[str] = Counter()
    for line in _CORPUS.splitlines(keepends=True):
        words.update(piece for piece, _ in pre.pre_tokenize_str(line))
    for w in SINGLE_TOKEN_WORDS:
        for piece, _ in pre.pre_tokenize_str(w):
            words[piece] += 1000

    vocab: dict[str, int] = {}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    # Each word as a list of symbols; digits are always single symbols (pre-tokenizer isolates them).
    splits = {w: list(w) for w in sorted(words)}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, symbols in splits.items():
            f = words[w]
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] += f
        if not pairs:
            break
        best_count = max(pairs.values())
        if best_count < 2:
            break
        best = min(p for p, c in pairs.items() if c == best_count)
        merged = best[0] + best[1]
        merges.append(best)
        vocab.setdefault(merged, len(vocab))
        for w, symbols in splits.items():
            i, out = 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            splits[w] = out
    return vocab, merges


def build_tokenizer(num_merges: int = 400):
    """A Qwen2Tokenizer (transformers) over a locally trained byte-level BPE, with Qwen's specials."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe(num_merges)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",  # registered first: Qwen's id order; eos set below
        pad_token="<|endoftext|>",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
    )
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in SPECIAL_TOKENS])
    tok.eos_token = "<|im_end|>"  # as in the Instruct checkpoints
    ids = tok.convert_tokens_to_ids([t for t, _ in SPECIAL_TOKENS])
    if ids != list(range(len(vocab), len(vocab) + len(SPECIAL_TOKENS))):
        raise AssertionError(f"special token ids out of Qwen order: {ids}")
    _check_tokenizer(tok)
    return tok


def _check_tokenizer(tok) -> None:
    for d in "0123456789":
        ids = tok.encode(d, add_special_tokens=False)
        if len(ids) != 1:
            raise AssertionError(f"digit {d!r} is not a single token: {ids}")
    for w in SINGLE_TOKEN_WORDS:
        ids = tok.encode(w, add_special_tokens=False)
        if len(ids) != 1:
            raise AssertionError(f"word {w!r} is not a single token: {ids}")
    for t, _ in SPECIAL_TOKENS:
        if len(tok.encode(t, add_special_tokens=False)) != 1:
            raise AssertionError(f"special token {t!r} is not a single token")
    for merge_token in tok.get_vocab():
        if len(merge_token) > 1 and any(c.isdigit() for c in merge_token) and not merge_token.startswith("<"):
            raise AssertionError(f"merged token {merge_token!r} contains a digit")
    text = '{"score": 7}'
    if tok.decode(tok.encode(text, add_special_tokens=False)) != text:
        raise AssertionError("JSON text does not round-trip")


# ---------------------------------------------------------------------------------------------
# Chat template (Qwen style; no default system message)
# ---------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + image_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' + video_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}"
    "{{- content['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

# Knobs accepted as **overrides by build_tiny_model (anything else raises TypeError).
DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,  # text width; also the vision tower's output width
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # text head_dim = 16
    "num_key_value_heads": 2,  # GQA, as in the real models
    "vision_hidden_size": 32,  # vision tower width
    "vision_depth": 2,
    "vision_num_heads": 2,
    "num_experts": 4,  # qwen3_vl_moe only
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "num_merges": 400,  # BPE merges of the tokenizer
    "min_pixels": None,  # None -> per-arch default below
    "max_pixels": None,
    "text_config": None,  # dicts merged last into the sub-configs, for anything not covered above
    "vision_config": None,
}


def _patch_size(arch: str) -> int:
    return 16 if arch.startswith("qwen3") else 14


def _mrope_section(head_dim: int, arch: str) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) in the real models' proportions."""
    half = head_dim // 2
    if arch.startswith("qwen3"):  # real: [24, 20, 20] of 64
        hw = (half * 20) // 64
        return [half - 2 * hw, hw, hw]
    t = (half * 16) // 64  # real qwen2/2.5: [16, 24, 24] of 64
    h = (half - t) // 2
    return [t, h, half - t - h]


def make_config(arch: str, vocab_size: int, token_ids: dict[str, int], spec: dict[str, Any]):
    """The real config class of `arch` with tiny sizes; token ids taken from the tokenizer."""
    from transformers import AutoConfig

    hidden = spec["hidden_size"]
    heads = spec["num_attention_heads"]
    head_dim = hidden // heads
    if head_dim % 2 or hidden % heads:
        raise ValueError("hidden_size must split into num_attention_heads even-sized heads")
    vdepth = spec["vision_depth"]
    vwidth = spec["vision_hidden_size"]
    section = _mrope_section(head_dim, arch)
    assert sum(section) == head_dim // 2, section

    text: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": spec["intermediate_size"],
        "num_hidden_layers": spec["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": spec["num_key_value_heads"],
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
    }
    vision: dict[str, Any] = {
        "depth": vdepth,
        "num_heads": spec["vision_num_heads"],
        "in_channels": 3,
        "patch_size": _patch_size(arch),
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section}
        text["use_sliding_window"] = False
        text["max_window_layers"] = spec["num_hidden_layers"]
    if arch == "qwen2_vl":
        # Qwen2-VL: embed_dim is the tower width, hidden_size the output (= text width).
        vision.update(embed_dim=vwidth, hidden_size=hidden, mlp_ratio=4, hidden_act="quick_gelu")
    elif arch == "qwen2_5_vl":
        # Qwen2.5-VL: hidden_size is the tower width, out_hidden_size the output.
        vision.update(
            hidden_size=vwidth,
            intermediate_size=2 * vwidth,
            out_hidden_size=hidden,
            hidden_act="silu",
            window_size=112,
            tokens_per_second=2,
            fullatt_block_indexes=[vdepth - 1],  # must be < depth
        )
    else:  # qwen3_vl, qwen3_vl_moe
        text["head_dim"] = head_dim
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": section,
            "mrope_interleaved": True,
        }
        vision.update(
            hidden_size=vwidth,
            intermediate_size=2 * vwidth,
            out_hidden_size=hidden,
            hidden_act="gelu_pytorch_tanh",
            num_position_embeddings=64,  # 8 x 8 learned grid (real: 48 x 48), interpolated
            deepstack_visual_indexes=[0] if vdepth < 2 else [0, vdepth - 1],  # must be < depth
        )
        if arch == "qwen3_vl_moe":
            text.update(
                num_experts=spec["num_experts"],
                num_experts_per_tok=spec["num_experts_per_tok"],
                moe_intermediate_size=spec["moe_intermediate_size"],
                decoder_sparse_step=1,
                mlp_only_layers=[],
                tie_word_embeddings=False,  # the text config's default is True; keep both levels agreeing
            )
    text.update(spec.get("text_config") or {})
    vision.update(spec.get("vision_config") or {})

    config = AutoConfig.for_model(
        arch,
        text_config=text,
        vision_config=vision,
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        # Qwen2/2.5 real configs carry the token ids on the top-level config too.
        config.bos_token_id = text["bos_token_id"]
        config.eos_token_id = text["eos_token_id"]
        config.pad_token_id = text["pad_token_id"]
    return config


# ---------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------


def make_processor(arch: str, tokenizer, spec: dict[str, Any]):
    """The arch's real processor class with its real image and video processors, small pixel limits."""
    from transformers import Qwen2VLImageProcessor

    patch = _patch_size(arch)
    factor = patch * 2  # merge size 2
    min_pixels = spec["min_pixels"] or 4 * factor * factor  # >= 2 x 2 merged tokens
    max_pixels = spec["max_pixels"] or 64 * factor * factor  # <= 64 tokens per image
    if arch.startswith("qwen3"):
        mean = std = [0.5, 0.5, 0.5]
    else:
        mean = [0.48145466, 0.4578275, 0.40821073]
        std = [0.26862954, 0.26130258, 0.27577711]
    # Pass fresh `size` dicts: passing min_pixels/max_pixels makes transformers mutate the class's
    # default `size` dict in place.
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=patch,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=mean,
        image_std=std,
    )
    video_size = {"shortest_edge": min_pixels, "longest_edge": 4 * max_pixels}
    if arch.startswith("qwen3"):
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        video_processor = Qwen3VLVideoProcessor(
            size=video_size, patch_size=patch, temporal_patch_size=2, merge_size=2, image_mean=mean, image_std=std,
            cap_pixels_per_frame=True,  # qwen-vl-utils' behaviour; also silences a v5 deprecation warning
        )
        cls = Qwen3VLProcessor
    else:
        from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(
            size=video_size, patch_size=patch, temporal_patch_size=2, merge_size=2, image_mean=mean, image_std=std,
            cap_pixels_per_frame=True,
        )
        cls = Qwen2VLProcessor if arch == "qwen2_vl" else Qwen2_5_VLProcessor
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


# ---------------------------------------------------------------------------------------------
# Build / resolve
# ---------------------------------------------------------------------------------------------


def _spec(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown tiny-model overrides {unknown}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **overrides}


def build_tiny_model(arch: str, out_dir: str | os.PathLike, seed: int = 0, **overrides) -> pathlib.Path:
    """Build a tiny random-weight checkpoint (config, weights, tokenizer, processor with chat template) in out_dir.

    `overrides` change the tiny sizes (see DEFAULTS); `text_config=` / `vision_config=` dicts are
    merged into the sub-configs last. Same arch, seed and overrides -> identical files' contents.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    spec = _spec(overrides)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(spec["num_merges"])
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t, _ in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64  # >= tokenizer size, rounded up like the real models
    config = make_config(arch, vocab_size, token_ids, spec)

    # Model init draws from the global RNG: seed it, and restore the caller's RNG state after.
    with _BUILD_LOCK:
        rng_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
        finally:
            torch.random.set_rng_state(rng_state)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=token_ids["<|endoftext|>"],
        eos_token_id=[token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
        pad_token_id=token_ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out)
    processor = make_processor(arch, tokenizer, spec)
    processor.save_pretrained(out)
    (out / "tiny_model.json").write_text(
        json.dumps({"arch": arch, "seed": seed, "builder_version": BUILDER_VERSION, "overrides": overrides},
                   indent=2, sort_keys=True, default=str) + "\n"
    )
    return out


REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _default_cache_dir() -> pathlib.Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return pathlib.Path(env)
    return REPO_ROOT / ".cache" / "tiny_models"


TRAINED_JUDGE = "judge"  # 'tiny:judge': the trained tiny judge shipped in models/tiny_judge


def trained_judge_path() -> pathlib.Path:
    return REPO_ROOT / "models" / "tiny_judge"


def resolve_model_name(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """'tiny:qwen2_5_vl' (or 'tiny:ARCH') -> path of a cached tiny checkpoint, built on first use;
    'tiny:judge' -> the trained tiny judge shipped in models/tiny_judge (see its CARD.md), from any
    working directory; anything else returned unchanged.

    cache_dir default: env REWARD_TINY_CACHE, else <repo root>/.cache/tiny_models. The checkpoint is
    built in a temporary directory next to its final place and renamed into place atomically, so
    several processes resolving at once are safe (one rename wins, the others use its result).
    """
    if not isinstance(name, str) or not name.startswith(TINY_PREFIX):
        return name
    arch = name[len(TINY_PREFIX):]
    if arch == TRAINED_JUDGE:
        path = trained_judge_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name!r}: the trained tiny judge is missing from {path}; "
                                    "retrain it with scripts/train_tiny_judge.py --out models/tiny_judge")
        return str(path)
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny model {name!r}; expected 'tiny:judge' or 'tiny:ARCH' with ARCH in {ARCHS}")
    root = pathlib.Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    final = root / f"{arch}-seed0-v{BUILDER_VERSION}"
    if final.is_dir():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        build_tiny_model(arch, tmp, seed=0)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.models.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, choices=ARCHS)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_model(args.arch, args.out, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
