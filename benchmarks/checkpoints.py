"""Random-weight Qwen-VL checkpoints of the real sizes, for benchmarks without a model hub.

The configs are written from the published hyper-parameters of Qwen2.5-VL-7B/3B-Instruct,
Qwen3-VL-8B-Instruct and Qwen3-VL-30B-A3B-Instruct (at 24 of its 48 layers); the
tokenizer and processor are the offline ones of src/models/tiny.py (single-token digits, Qwen's
special tokens, whose ids the config takes). The embedding and output layers keep the real vocab
size, so the compute per token is the real model's; ids the small tokenizer lacks decode to
nothing. Weights are drawn on the target device in the target dtype (seconds on a GPU), then
saved with save_pretrained, so every contender loads the same folder through from_pretrained.

    python -m benchmarks.checkpoints --size qwen3_vl-8b --out DIR [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

# Published hyper-parameters (config.json of the Instruct models). Each size names its architecture.
SIZES: dict[str, dict[str, Any]] = {
    "7b": {"arch": "qwen2_5_vl", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
           "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False},
    "3b": {"arch": "qwen2_5_vl", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
           "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2, "tie_word_embeddings": True},
    # Qwen3-VL-8B-Instruct.
    "qwen3_vl-8b": {"arch": "qwen3_vl", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
                    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "tie_word_embeddings": False},
    # Qwen3-VL-30B-A3B-Instruct at 24 of its 48 layers (the full 62 GB does not fit the benchmark
    # machine's disk twice); every layer sparse, so the per-layer cost is the real one.
    "qwen3_vl_moe-30b-a3b-24l": {"arch": "qwen3_vl_moe", "vocab_size": 151936, "hidden_size": 2048,
                                 "intermediate_size": 6144, "num_hidden_layers": 24, "num_attention_heads": 32,
                                 "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                                 "num_experts_per_tok": 8, "moe_intermediate_size": 768, "tie_word_embeddings": False},
    # Small stand-ins with the real vision layouts, for CPU smoke runs.
    "smoke": {"arch": "qwen2_5_vl", "vocab_size": None, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
    "smoke-qwen3_vl": {"arch": "qwen3_vl", "vocab_size": None, "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                       "tie_word_embeddings": False},
    "smoke-qwen3_vl_moe": {"arch": "qwen3_vl_moe", "vocab_size": None, "hidden_size": 64, "intermediate_size": 128,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                           "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                           "tie_word_embeddings": False},
}
VISION = {
    "qwen2_5_vl": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                   "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112},
    # The same tower for both Qwen3-VL judges; out_hidden_size follows the text width.
    "qwen3_vl": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                 "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]},
}
VISION_SMOKE = {
    "qwen2_5_vl": {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                   "fullatt_block_indexes": [1, 3], "window_size": 112},
    "qwen3_vl": {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                 "num_position_embeddings": 64, "deepstack_visual_indexes": [1, 3]},
}
# The real processors' pixel bounds: Qwen2.5-VL min 4 x 28^2 ... max 16384 x 28^2; Qwen3-VL
# 65536 ... 16777216 (its preprocessor_config.json).
PIXELS = {"qwen2_5_vl": {"min_pixels": 3136, "max_pixels": 12845056},
          "qwen3_vl": {"min_pixels": 65536, "max_pixels": 16777216}}
PIXELS_SMOKE = {"qwen2_5_vl": {"min_pixels": 3136, "max_pixels": 64 * 28 * 28},
                "qwen3_vl": {"min_pixels": 4 * 32 * 32, "max_pixels": 64 * 32 * 32}}


def _family(arch: str) -> str:
    return "qwen3_vl" if arch.startswith("qwen3") else arch


def arch_of(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    return SIZES[size]["arch"]


def build_config(size: str, tokenizer):
    from src.models import tiny

    arch = arch_of(size)
    t = dict(SIZES[size])
    t.pop("arch")
    fam = _family(arch)
    v = dict((VISION_SMOKE if size.startswith("smoke") else VISION)[fam])
    token_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok, _ in tiny.SPECIAL_TOKENS}
    vocab = t.pop("vocab_size") or -(-len(tokenizer) // 64) * 64
    tie = t.pop("tie_word_embeddings")
    text_extra: dict[str, Any] = {"max_position_embeddings": 128000, "tie_word_embeddings": tie}
    if "head_dim" in t:  # Qwen3-VL-MoE: head_dim 128 with hidden 2048 and 32 heads
        head_dim = t.pop("head_dim")
        half = head_dim // 2
        hw = (half * 20) // 64
        text_extra.update(head_dim=head_dim, rope_parameters={
            "rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [half - 2 * hw, hw, hw],
            "mrope_interleaved": True})
    moe = {k: t.pop(k) for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size") if k in t}
    vision_extra = {k: v[k] for k in v if k not in ("depth", "hidden_size", "num_heads")}
    spec = tiny._spec({
        "hidden_size": t["hidden_size"], "intermediate_size": t["intermediate_size"],
        "num_hidden_layers": t["num_hidden_layers"], "num_attention_heads": t["num_attention_heads"],
        "num_key_value_heads": t["num_key_value_heads"], "vision_hidden_size": v["hidden_size"],
        "vision_depth": v["depth"], "vision_num_heads": v["num_heads"], **moe,
        "vision_config": vision_extra, "text_config": text_extra,
    })
    config = tiny.make_config(arch, vocab, token_ids, spec)
    config.tie_word_embeddings = tie
    return config, spec


def build_checkpoint(size: str, out_dir: str | pathlib.Path, device: str = "cuda", seed: int = 0) -> dict[str, Any]:
    """Write a random-weight checkpoint of `size` into out_dir; returns what it built and how long it took."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from src.models import tiny

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokenizer = tiny.build_tokenizer()
    config, spec = build_config(size, tokenizer)
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok, _ in tiny.SPECIAL_TOKENS}
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"], do_sample=False)
    n_params = sum(p.numel() for p in model.parameters())
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    t_init = time.perf_counter() - t0
    model.save_pretrained(out)
    arch = arch_of(size)
    pixels = (PIXELS_SMOKE if size.startswith("smoke") else PIXELS)[_family(arch)]
    processor = tiny.make_processor(arch, tokenizer, {**spec, **pixels})
    processor.save_pretrained(out)
    del model
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    info = {"size": size, "arch": arch, "params_b": round(n_params / 1e9, 3), "dtype": str(dtype).replace("torch.", ""),
            "init_s": round(t_init, 1), "build_s": round(time.perf_counter() - t0, 1), "path": str(out),
            "vocab_size": config.text_config.vocab_size, "tokenizer_size": len(tokenizer)}
    (out / "random_checkpoint.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", required=True, choices=sorted(SIZES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args(argv)
    print(json.dumps(build_checkpoint(a.size, a.out, a.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
