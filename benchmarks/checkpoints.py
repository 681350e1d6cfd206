"""Random-weight Qwen2.5-VL checkpoints of the real sizes, for benchmarks without a model hub.

The configs are written from the published hyper-parameters of Qwen2.5-VL-7B/3B-Instruct; the
tokenizer and processor are the offline ones of src/models/tiny.py (single-token digits, Qwen's
special tokens, whose ids the config takes). The embedding and output layers keep the real vocab
size, so the compute per token is the real model's; ids the small tokenizer lacks decode to
nothing. Weights are drawn on the target device in the target dtype (seconds on a GPU), then
saved with save_pretrained, so every contender loads the same folder through from_pretrained.

    python -m benchmarks.checkpoints --size 7b --out DIR [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

# Published hyper-parameters (config.json of Qwen/Qwen2.5-VL-{7B,3B}-Instruct).
SIZES: dict[str, dict[str, Any]] = {
    "7b": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False},
    "3b": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
           "num_attention_heads": 16, "num_key_value_heads": 2, "tie_word_embeddings": True},
    # A small stand-in with the real vision window layout, for CPU smoke runs.
    "smoke": {"vocab_size": None, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
}
VISION_7B_3B = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112}
VISION_SMOKE = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                "fullatt_block_indexes": [1, 3], "window_size": 112}
# The real processor's pixel bounds (min 4 x 28^2 ... max 16384 x 28^2).
PIXELS = {"min_pixels": 3136, "max_pixels": 12845056}
PIXELS_SMOKE = {"min_pixels": 3136, "max_pixels": 64 * 28 * 28}


def build_config(size: str, tokenizer):
    from src.models import tiny

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    t = dict(SIZES[size])
    v = dict(VISION_SMOKE if size == "smoke" else VISION_7B_3B)
    token_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok, _ in tiny.SPECIAL_TOKENS}
    vocab = t.pop("vocab_size") or -(-len(tokenizer) // 64) * 64
    tie = t.pop("tie_word_embeddings")
    spec = tiny._spec({
        "hidden_size": t["hidden_size"], "intermediate_size": t["intermediate_size"],
        "num_hidden_layers": t["num_hidden_layers"], "num_attention_heads": t["num_attention_heads"],
        "num_key_value_heads": t["num_key_value_heads"], "vision_hidden_size": v["hidden_size"],
        "vision_depth": v["depth"], "vision_num_heads": v["num_heads"],
        "vision_config": {"intermediate_size": v["intermediate_size"],
                          "fullatt_block_indexes": v["fullatt_block_indexes"], "window_size": v["window_size"]},
        "text_config": {"max_position_embeddings": 128000, "tie_word_embeddings": tie},
    })
    config = tiny.make_config("qwen2_5_vl", vocab, token_ids, spec)
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
    pixels = PIXELS_SMOKE if size == "smoke" else PIXELS
    processor = tiny.make_processor("qwen2_5_vl", tokenizer, {**spec, **pixels})
    processor.save_pretrained(out)
    del model
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    info = {"size": size, "arch": "qwen2_5_vl", "params_b": round(n_params / 1e9, 3), "dtype": str(dtype).replace("torch.", ""),
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
