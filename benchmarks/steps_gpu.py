#!/usr/bin/env python3
"""Step-by-step measurements behind benchmarks/NOTES.md (one GPU, one call).

Where the time goes in the library's path, and whether each fast path computes the same thing:
  prep      CPU preparation of a batch (decode, resize, chat template, processor), per image
  vision    the vision tower alone, per vision attention (sdpa loop, packed, varlen), 8 and 32 images
  forward   the whole logits forward pass at batch 32, per vision attention, and with compile_vision
  equiv     last-position logits of each path against the plain sdpa path, in bfloat16 and in
            float32 (the model upcast in place), plus each bf16 path against the fp32 reference;
            the attention op alone against a float64 reference
  decode    generate: prefill alone, then per-step decode time, dynamic cache vs static cache
            (compiled by transformers), batch 32
  gpuprep   the image processor on the GPU (device=cuda) against the CPU
  prep_threads  preparation rate with 4, 8 and 12 image threads
  fast_decode   fast_decode.py: step time without a graph, with one, and sampled; generate-128;
                bf16 tokens against generate() (fast_decode32: also in float32, model upcast)
  compile, compile_lm  the vision blocks compiled, then the language layers too (logits mode)

    python benchmarks/steps_gpu.py --model DIR --out results.json [--steps prep,vision,...]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
import traceback
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], reps: int = 3, warmup: int = 1) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t)
    return {"median_s": round(statistics.median(ts), 4), "min_s": round(min(ts), 4), "max_s": round(max(ts), 4)}


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--naive", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", default="prep,vision,forward,decode,decode_static,gpuprep,compile,equiv")
    ap.add_argument("--deadline-s", type=float, default=480)
    ap.add_argument("--device", default="cuda:0", help="cpu: a dry run of the script itself (varlen skipped)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", default="1024x768")
    a = ap.parse_args(argv)
    steps = a.steps.split(",")
    t_start = time.perf_counter()

    import torch

    from benchmarks.bench_gpu import make_images
    from src.models.reward.engine import JudgeEngine
    from src.models.reward.settings import JudgeSettings
    from src.models.reward.types import ScoreItem
    from src.models.reward.vision_attention import (_NAMES, _register, packed_attention, reference_attention,
                                                    varlen_attention)

    dev = a.device
    cuda = dev.startswith("cuda")
    out: dict[str, Any] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if cuda else "cpu"}
    path = pathlib.Path(a.out)

    def save():
        path.write_text(json.dumps(out, indent=2) + "\n")

    def left():
        return a.deadline_s - (time.perf_counter() - t_start)

    naive = pathlib.Path(a.naive) if a.naive else None
    w, h = (int(x) for x in a.size.split("x"))
    nb = a.images
    images = make_images(naive, nb, w, h)
    t = time.perf_counter()
    eng = JudgeEngine(JudgeSettings(model_name=a.model, mode="logits", vision_attn="sdpa", batch_size=nb), dev)
    out["load_s"] = round(time.perf_counter() - t, 2)
    model = eng.model
    vcfg = model.config.vision_config
    _register()
    impls = {"sdpa": "sdpa", "packed": _NAMES["packed"], "varlen": _NAMES["varlen"]}
    fast = "varlen" if cuda else "packed"

    def use(name):
        vcfg._attn_implementation_internal = impls[name]

    items = [ScoreItem(images=[im]) for im in images]
    # -- prep --------------------------------------------------------------------------------
    t = time.perf_counter()
    chunk = eng._prepare(items, 0)
    prep_s = time.perf_counter() - t
    reqs = chunk.requests
    t = time.perf_counter()
    enc = eng._encode_cpu(reqs)
    enc_s = time.perf_counter() - t
    n_tok = int(enc["attention_mask"].sum()) / len(reqs)
    out["prep"] = {"images": len(reqs), "prepare_s": round(prep_s, 3), "processor_s": round(enc_s, 3),
                   "img_per_s": round(len(reqs) / (prep_s + enc_s), 1), "tokens_per_prompt": round(n_tok, 1),
                   "patches_per_image": int(enc["pixel_values"].shape[0]) // len(reqs)}
    if cuda and "prep_threads" in steps:
        import concurrent.futures

        for n_thr in (4, 8, 12):
            eng._image_pool = concurrent.futures.ThreadPoolExecutor(n_thr)
            eng._prepare(items, 0)
            t = time.perf_counter()
            eng._prepare(items, 0)
            out["prep"][f"prepare_threads{n_thr}_img_per_s"] = round(len(items) / (time.perf_counter() - t), 1)
    print("prep", out["prep"], flush=True)
    save()
    gpu = {k: v.to(dev) for k, v in enc.items()}
    b8 = eng._encode_cpu(reqs[:8])
    gpu8 = {k: v.to(dev) for k, v in b8.items()}
    visual = model.model.visual

    def vision(inp):
        with torch.inference_mode():
            return visual(inp["pixel_values"].to(model.dtype), grid_thw=inp["image_grid_thw"]).pooler_output

    def forward(inp):
        with torch.inference_mode():
            return model(**inp, logits_to_keep=1, use_cache=False).logits[:, -1, :].float()

    # -- vision tower per attention ----------------------------------------------------------
    if "vision" in steps:
        res = {}
        for name in ("sdpa", "packed", fast):
            use(name)
            for label, inp in (("8", gpu8), (str(nb), gpu)):
                if name == "sdpa" and label != "8" and left() < 200:
                    continue
                r = timed(lambda: vision(inp), reps=3 if name != "sdpa" else 2)
                r["img_per_s"] = round(len(inp["image_grid_thw"]) / r["median_s"], 2)
                res[f"{name}_{label}"] = r
                print("vision", name, label, r, flush=True)
        out["vision"] = res
        save()

    # -- whole forward, logits, batch 32 ------------------------------------------------------
    if "forward" in steps:
        res = {}
        for name in ("sdpa", fast):
            use(name)
            r = timed(lambda: forward(gpu), reps=3 if name != "sdpa" else 2)
            r["img_per_s"] = round(nb / r["median_s"], 2)
            res[name] = r
            print("forward", name, r, flush=True)
        # the language model's share: the whole forward less the vision tower alone
        use(fast)
        rv = timed(lambda: vision(gpu), reps=3)
        res[f"vision_only_{fast}"] = rv
        res["lm_share_s"] = round(res[fast]["median_s"] - rv["median_s"], 4)
        out["forward"] = res
        save()

    # -- attention op equivalence vs float64 --------------------------------------------------
    if "equiv" in steps:
        from transformers.vision_utils import get_vision_window_index

        g = gpu8["image_grid_thw"]
        _, cu_w = get_vision_window_index(g, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        cu_w = cu_w.to(dev)
        total = int(cu_w[-1])
        heads, dim = vcfg.num_heads, vcfg.hidden_size // vcfg.num_heads
        op = {"tokens": total, "segments": int(cu_w.numel() - 1),
              "distinct_lengths": sorted({int(x) for x in (cu_w[1:] - cu_w[:-1]).tolist()})}
        gen = torch.Generator(device=dev).manual_seed(1)
        q, k, v = (torch.randn(1, heads, total, dim, device=dev, generator=gen, dtype=torch.float64) for _ in range(3))
        sc = dim ** -0.5
        ref = reference_attention(q, k, v, cu_w, sc)
        for dt in (torch.float32, torch.bfloat16):
            tag = str(dt).replace("torch.", "")
            op[f"packed_{tag}"] = rel(packed_attention(q.to(dt), k.to(dt), v.to(dt), cu_w, sc), ref)
            op[f"sdpa_loop_{tag}"] = rel(reference_attention(q.to(dt), k.to(dt), v.to(dt), cu_w, sc), ref)
        qb4, kb4, vb4 = (t_.to(torch.bfloat16) for t_ in (q, k, v))
        op["time_sdpa_loop_s"] = timed(lambda: reference_attention(qb4, kb4, vb4, cu_w, sc), reps=5)["median_s"]
        op["time_packed_s"] = timed(lambda: packed_attention(qb4, kb4, vb4, cu_w, sc), reps=5)["median_s"]
        if cuda:
            qb, kb, vb = (t_[0].transpose(0, 1).to(torch.bfloat16) for t_ in (q, k, v))
            vo = varlen_attention(qb, kb, vb, cu_w, None, sc)
            op["varlen_bfloat16"] = rel(vo.unsqueeze(0), ref)
            op["varlen_finite"] = bool(torch.isfinite(vo).all())
            op["time_varlen_s"] = timed(lambda: varlen_attention(qb, kb, vb, cu_w, None, sc), reps=5)["median_s"]
        out["equiv_op"] = op
        print("equiv op", op, flush=True)
        save()

        # model level, bf16 then fp32 (the same weights upcast)
        res: dict[str, Any] = {}
        ids = eng._level_ids["quality"][0]
        logits = {}
        if not cuda:
            model.to(torch.bfloat16)
        paths = ("sdpa", "packed", fast) if cuda else ("sdpa", "packed")
        for name in paths:
            use(name)
            logits[f"{name}_bf16"] = forward(gpu8)
        use("sdpa")
        logits["sdpa_bf16_again"] = forward(gpu8)
        for name in paths[1:] + ("sdpa_bf16_again",):
            key = name if name.endswith("again") else f"{name}_bf16"
            res[f"{key}_vs_sdpa_bf16"] = rel(logits[key], logits["sdpa_bf16"])
        if left() > 150:
            model.float()
            gpu8f = dict(gpu8)
            for name in ("sdpa", "packed"):
                use(name)
                logits[f"{name}_fp32"] = forward(gpu8f)
            res["packed_fp32_vs_sdpa_fp32"] = rel(logits["packed_fp32"], logits["sdpa_fp32"])
            for name in paths:
                res[f"{name}_bf16_vs_sdpa_fp32"] = rel(logits[f"{name}_bf16"], logits["sdpa_fp32"])

            def score(lg):
                p = torch.softmax(lg[:, ids], dim=-1)
                return (p * torch.arange(len(ids), device=p.device)).sum(-1)
            ref_s = score(logits["sdpa_fp32"])
            for key in ("packed_fp32",) + tuple(f"{p}_bf16" for p in paths):
                res[f"score_maxabs_{key}_vs_sdpa_fp32"] = float((score(logits[key]) - ref_s).abs().max())
            res["score_range_sdpa_fp32"] = [float(ref_s.min()), float(ref_s.max())]
            model.to(eng.dtype)
        out["equiv_model"] = res
        print("equiv model", res, flush=True)
        save()

    # -- compile the vision blocks --------------------------------------------------------------
    if "compile" in steps and left() > 150 and cuda:
        use(fast)
        res = {}
        try:
            t = time.perf_counter()
            for blk in visual.blocks:
                blk.compile(dynamic=True)
            vision(gpu8)
            torch.cuda.synchronize()
            res["compile_first_s"] = round(time.perf_counter() - t, 1)
            r = timed(lambda: vision(gpu), reps=3)
            r["img_per_s"] = round(nb / r["median_s"], 2)
            res["vision_compiled"] = r
            r = timed(lambda: forward(gpu), reps=3)
            r["img_per_s"] = round(nb / r["median_s"], 2)
            res["forward_compiled"] = r
            # same function? compiled vs eager on the same batch (bf16)
            lg_c = forward(gpu8)
            for blk in visual.blocks:
                blk._compiled_call_impl = None
            lg_e = forward(gpu8)
            res["compiled_vs_eager_bf16"] = rel(lg_c, lg_e)
            if "compile32" in steps and left() > 90:
                # the same check in float32 (packed attention: varlen has no float32), where a
                # different function would show far above rounding
                model.float()
                use("packed")
                lg_e = forward(gpu8)
                for blk in visual.blocks:
                    blk.compile(dynamic=True)
                lg_c = forward(gpu8)
                res["compiled_vs_eager_fp32_packed"] = rel(lg_c, lg_e)
                for blk in visual.blocks:
                    blk._compiled_call_impl = None
                model.to(eng.dtype)
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"[:1500]
            traceback.print_exc()
        out["compile"] = res
        print("compile", res, flush=True)
        save()

    # -- compile the language model's decoder layers too (logits mode: no KV cache) ---------------
    if "compile_lm" in steps and left() > 120 and cuda:
        use(fast)
        res = {}
        layers = model.model.language_model.layers
        try:
            t = time.perf_counter()
            for blk in visual.blocks:
                blk.compile(dynamic=True)
            for layer in layers:
                layer.compile(dynamic=True)
            forward(gpu8)
            forward(gpu)
            _sync()
            res["compile_first_s"] = round(time.perf_counter() - t, 1)
            r = timed(lambda: forward(gpu), reps=3)
            r["img_per_s"] = round(nb / r["median_s"], 2)
            res["forward_compiled_vision_and_lm"] = r
            print("compile_lm", res, flush=True)
            if "compile_lm32" in steps and left() > 90:
                model.float()
                use("packed")
                lg_c = forward(gpu8)
                for m_ in list(visual.blocks) + list(layers):
                    m_._compiled_call_impl = None
                lg_e = forward(gpu8)
                res["compiled_vision_and_lm_vs_eager_fp32"] = rel(lg_c, lg_e)
                model.to(eng.dtype)
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"[:1500]
            traceback.print_exc()
        finally:
            for m_ in list(visual.blocks) + list(layers):
                m_._compiled_call_impl = None
        out["compile_lm"] = res
        print("compile_lm", res, flush=True)
        save()

    # -- fast_decode: the CUDA-graphed greedy loop against generate() ----------------------------
    if "fast_decode" in steps and left() > 60:
        from src.models.reward.fast_decode import greedy_generate

        res = {}
        pad = eng.tokenizer.pad_token_id
        gc = model.generation_config
        eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]

        def hf(inp, n):
            with torch.inference_mode():
                return model.generate(**inp, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=pad)[:, inp["input_ids"].shape[1]:]

        def ours(inp, n, graph=True, timings=None, **kw):
            with torch.inference_mode():
                return greedy_generate(model, inp, max_new_tokens=n, min_new_tokens=n, eos_token_ids=eos,
                                       pad_token_id=pad, repetition_penalty=gc.repetition_penalty, cuda_graph=graph,
                                       timings=timings, **kw)

        def same(x, y):
            return float((x == y).float().mean())
        try:
            if "fast_decode32" in steps:
                # correctness in float32, where rounding cannot flip a greedy choice by chance
                model.float()
                use("packed")
                a_, b_, c_ = hf(gpu8, 24), ours(gpu8, 24), ours(gpu8, 24, graph=False)
                res["fp32_8x24_same_tokens"] = {"hf_vs_graph": same(a_, b_), "hf_vs_eager": same(a_, c_),
                                                "graph_vs_eager": same(b_, c_)}
                model.to(eng.dtype)
                use(fast)
                print("fast_decode", res, flush=True)
            use(fast)
            a_, b_ = hf(gpu, 32), ours(gpu, 32)
            res["bf16_32x32_same_tokens_hf_vs_graph"] = same(a_, b_)
            r = timed(lambda: hf(gpu, 17), reps=1)
            r1 = timed(lambda: hf(gpu, 1), reps=1)
            res["generate_step_ms"] = round((r["median_s"] - r1["median_s"]) / 16 * 1000, 2)
            from src.models.reward.fast_decode import generate_tokens, plan_for

            sampled, _ = plan_for(model, {"max_new_tokens": 17, "min_new_tokens": 17, "do_sample": True,
                                          "temperature": 0.7, "top_p": 0.8, "top_k": 20, "pad_token_id": pad})

            def ours_sampled(inp, n, timings=None):
                import dataclasses

                with torch.inference_mode():
                    p_ = dataclasses.replace(sampled, max_new_tokens=n, min_new_tokens=n)
                    return generate_tokens(model, inp, p_, timings=timings)
            for name, fn in (("eager", lambda n, tm: ours(gpu, n, graph=False, timings=tm)),
                             ("graph", lambda n, tm: ours(gpu, n, timings=tm)),
                             ("graph_sampled", lambda n, tm: ours_sampled(gpu, n, timings=tm))):
                tm: dict = {}
                t1 = timed(lambda: fn(1, None), reps=1)["median_s"]
                t17 = timed(lambda: fn(17, tm), reps=2)["median_s"]
                res[f"{name}_step_ms"] = round((t17 - t1) / 16 * 1000, 2)
                res[f"{name}_timings"] = tm
                res["prefill_s"] = t1
                print("fast_decode", name, res[f"{name}_step_ms"], tm, flush=True)
            try:
                from torch.profiler import ProfilerActivity, profile

                def kernels(n):
                    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                        ours(gpu, n)
                        _sync()
                    return {e.key: (e.device_time_total, e.count) for e in prof.key_averages() if e.device_time_total > 0}
                k1, k17 = kernels(1), kernels(17)
                diff = {k: ((v[0] - k1.get(k, (0, 0))[0]) / 16 / 1000, (v[1] - k1.get(k, (0, 0))[1]) / 16)
                        for k, v in k17.items()}
                top = sorted(diff.items(), key=lambda kv: -kv[1][0])[:12]
                res["graph_step_gpu_ms"] = round(sum(v[0] for v in diff.values() if v[0] > 0), 2)
                res["graph_step_top_kernels_ms_count"] = [(k[:90], round(v[0], 3), v[1]) for k, v in top]
            except Exception as e:
                res["profile_error"] = f"{type(e).__name__}: {e}"[:300]
            r = timed(lambda: ours(gpu, 128), reps=1)
            res["new128_s"] = r["median_s"]
            res["generate128_img_per_s_model_only"] = round(nb / r["median_s"], 2)
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"[:1500]
            traceback.print_exc()
        out["fast_decode"] = res
        print("fast_decode", res, flush=True)
        save()

    # -- decode -----------------------------------------------------------------------------
    if "decode" in steps and left() > 120:
        use(fast)
        res = {}
        pad = eng.tokenizer.pad_token_id

        def gen(n, inp=None, **kw):
            with torch.inference_mode():
                return model.generate(**(inp or gpu), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=pad, **kw)
        res["prefill_only_s"] = timed(lambda: gen(1), reps=2)["median_s"]
        res["new17_dynamic_s"] = timed(lambda: gen(17), reps=2)["median_s"]
        res["dynamic_step_ms"] = round((res["new17_dynamic_s"] - res["prefill_only_s"]) / 16 * 1000, 2)
        # GPU busy time per decode step: kernel time of 17 tokens less 1 token, over 16
        try:
            from torch.profiler import ProfilerActivity, profile

            def kernel_time(n):
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    gen(n)
                    _sync()
                evs = [e for e in prof.events() if e.device_type.name == "CUDA"]
                return sum(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
                           for e in evs) / 1000.0, len(evs)
            k1, n1 = kernel_time(1)
            k17, n17 = kernel_time(17)
            res["dynamic_step_gpu_busy_ms"] = round((k17 - k1) / 16, 2)
            res["dynamic_step_kernels"] = round((n17 - n1) / 16, 1)
        except Exception as e:
            res["profile_error"] = f"{type(e).__name__}: {e}"[:500]
        print("decode dynamic", res, flush=True)
        out["decode"] = res
        save()
        if "decode_layers" in steps and left() > 150:
            # compile each decoder layer (default mode: fused kernels, no CUDA graphs), dynamic cache
            try:
                layers = model.model.language_model.layers
                t = time.perf_counter()
                for layer in layers:
                    layer.compile(dynamic=True)
                gen(3)
                _sync()
                res["layers_compile_first_s"] = round(time.perf_counter() - t, 1)
                res["layers_prefill_s"] = timed(lambda: gen(1), reps=2)["median_s"]
                res["layers_new17_s"] = timed(lambda: gen(17), reps=2)["median_s"]
                res["layers_step_ms"] = round((res["layers_new17_s"] - res["layers_prefill_s"]) / 16 * 1000, 2)
                toks_c = gen(17)
                for layer in layers:
                    layer._compiled_call_impl = None
                toks_e = gen(17)
                n_in = gpu["input_ids"].shape[1]
                res["layers_same_tokens_frac"] = float((toks_c[:, n_in:] == toks_e[:, n_in:]).float().mean())
            except Exception as e:
                res["layers_error"] = f"{type(e).__name__}: {e}"[:1000]
                traceback.print_exc()
                for layer in model.model.language_model.layers:
                    layer._compiled_call_impl = None
            print("decode layers", res, flush=True)
            save()
        if "decode_static" in steps and left() > 150:
            try:
                import logging

                torch._logging.set_logs(recompiles=True, graph_breaks=True, perf_hints=True, cudagraphs=True)
                logging.getLogger("torch").setLevel(logging.INFO)
                t = time.perf_counter()
                gen(17, cache_implementation="static")
                res["static_first_call_s"] = round(time.perf_counter() - t, 1)
                res["new17_static_s"] = timed(lambda: gen(17, cache_implementation="static"), reps=2, warmup=0)["median_s"]
                res["static_prefill_s"] = timed(lambda: gen(1, cache_implementation="static"), reps=2, warmup=1)["median_s"]
                res["static_step_ms"] = round((res["new17_static_s"] - res["static_prefill_s"]) / 16 * 1000, 2)
                from torch._dynamo.utils import counters
                res["dynamo_counters"] = {k: dict(v) for k, v in counters.items() if v}
            except Exception as e:
                res["static_error"] = f"{type(e).__name__}: {e}"[:1000]
                traceback.print_exc()
            finally:
                torch._logging.set_logs()
            print("decode static", res, flush=True)
        save()

    # -- image processor on the GPU ----------------------------------------------------------
    if "gpuprep" in steps:
        res = {}
        ims = [r.images[0] for r in reqs]
        prompts = [r.prompt for r in reqs]
        proc = eng.processor
        t = time.perf_counter()
        proc(text=prompts, images=ims, padding=True, return_tensors="pt")
        res["cpu_s"] = round(time.perf_counter() - t, 3)
        try:
            proc(text=prompts[:2], images=ims[:2], padding=True, return_tensors="pt", device=dev)
            _sync()
            t = time.perf_counter()
            o = proc(text=prompts, images=ims, padding=True, return_tensors="pt", device=dev)
            _sync()
            res["gpu_s"] = round(time.perf_counter() - t, 3)
            res["gpu_pixel_device"] = str(o["pixel_values"].device)
            res["gpu_vs_cpu_pixel_maxabs"] = float((o["pixel_values"].cpu() - enc["pixel_values"]).abs().max())
        except Exception as e:
            res["gpu_error"] = f"{type(e).__name__}: {e}"[:500]
        out["gpuprep"] = res
        print("gpuprep", res, flush=True)
        save()

    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    save()
    eng.close()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
