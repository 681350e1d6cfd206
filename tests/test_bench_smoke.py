"""The GPU benchmark scripts must not rot: run their CPU smoke modes and check what they write.

No timing is asserted (CI machines differ); the keys, the counts and the clean exit are.
The naive loop is outside this repository; set NAIVE_HF_LOOP to its path to include it.

The smoke runs are independent processes, each about one core busy (mostly one thread
importing and loading): they start together, on the first test that needs one, and each test
waits for its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RUNS = {
    "gpu": ([str(BENCH / "bench_gpu.py"), "--smoke", "--judge", "fast_decode=true", "--judge", "vision_attn=packed",
             "--stages", "naive,logits,generate,worker,smalljobs"], {"PYTHONUNBUFFERED": "1"}, 300),
    # The Qwen3-VL and Qwen3-VL-MoE stand-ins through the library's defaults, both modes.
    # --warmup-items 16 takes the warm-up's other branch (eager items up to the count, then one
    # batch that would pay a compile), which a CPU run, having no automatic compile, skips by itself.
    "qwen3": ([str(BENCH / "bench_gpu.py"), "--smoke", "--sizes", "smoke-qwen3_vl,smoke-qwen3_vl_moe",
               "--stages", "logits,generate", "--warmup-items", "16", "--reps", "2"], {"PYTHONUNBUFFERED": "1"}, 300),
    "reuse": ([str(BENCH / "reuse_gpu.py"), "--smoke"], {"PYTHONUNBUFFERED": "1"}, 300),
    "quant": ([str(BENCH / "quant_gpu.py"), "--smoke"], {"PYTHONPATH": str(ROOT)}, 600),
    "quant_generate": ([str(BENCH / "quant_gpu.py"), "--smoke", "--mode", "generate", "--max-new-tokens", "8",
                        "--reps", "2", "--warmup-calls", "2", "--judge", "fast_decode=false",
                        "--name", "quant_generate"],
                       {"PYTHONPATH": str(ROOT)}, 600),
    "profile": ([str(BENCH / "profile_gpu.py"), "--smoke", "--modes", "logits"], {"PYTHONPATH": str(ROOT)}, 600),
    "attention": ([str(BENCH / "attention_gpu.py"), "--smoke"], {}, 300),
    "decode_attention": ([str(BENCH / "decode_attention_gpu.py"), "--smoke"], {}, 300),
    "prompt_attention": ([str(BENCH / "prompt_attention_gpu.py"), "--smoke"], {}, 300),
    "prepare": ([str(BENCH / "prepare_gpu.py"), "--smoke"], {"PYTHONPATH": str(ROOT)}, 300),
    "parts": ([str(BENCH / "profile_gpu.py"), "--smoke", "--stages", "parts,experts,patch,gaps,rope,counters,gelu,prompt_attn,vision_mk,norm_check", "--modes", "generate,logits", "--reps", "1",
               "--name", "profile_parts"], {"PYTHONPATH": str(ROOT)}, 300),
    # 5 items at batch 4: a ramped call's chunks are 1, 3 and 1 items, an unramped call's 4 and 1.
    # Logits mode: the mode every one of these stages switches something in (the interval's and
    # the threads' switches are the same code in generate mode).
    "switches": ([str(BENCH / "profile_gpu.py"), "--smoke", "--stages", "ramp,interval,threads,mask,split,gc,timeline",
                  "--modes", "logits",
                  "--reps", "1", "--n", "5", "--bs", "4", "--name", "profile_switches"], {"PYTHONPATH": str(ROOT)}, 300),
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """name -> the running smoke process, its --out folder and its log; any still running at the
    end of the module is killed."""
    runs = {}
    for name, (args, env, timeout) in RUNS.items():
        out = tmp_path_factory.mktemp(f"bench-{name}")
        log = out.parent / f"{out.name}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, *args, "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=fh, env={**os.environ, **env})
        runs[name] = SimpleNamespace(proc=proc, out=out, log=log, timeout=timeout)
    try:
        yield runs
    finally:
        for run in runs.values():
            if run.proc.poll() is None:
                run.proc.kill()
            run.proc.wait()


def finished(smoke_runs, name: str) -> Path:
    """Wait for one smoke run; it must exit 0. Returns its --out folder."""
    run = smoke_runs[name]
    try:
        rc = run.proc.wait(timeout=run.timeout)
    except subprocess.TimeoutExpired:
        run.proc.kill()
        raise AssertionError(f"{name}: no exit within {run.timeout} s:\n{run.log.read_text()[-3000:]}")
    assert rc == 0, run.log.read_text()[-3000:]
    return run.out


def test_bench_gpu_smoke(smoke_runs):
    out = finished(smoke_runs, "gpu")
    report = json.loads((out / "bench_gpu.json").read_text())
    assert report["meta"]["smoke"] is True and report["meta"]["judge_overrides"] == {"fast_decode": True,
                                                                                     "vision_attn": "packed"}
    (size,) = report["sizes"]
    assert size["checkpoint"]["arch"] == "qwen2_5_vl"
    naive = size["naive"]
    assert "skipped" in naive or "logits_bs1_img_per_s" in naive
    for mode in ("logits", "generate"):
        lib = size[f"library_{mode}"]
        assert lib["load_s"] >= 0 and lib["time_to_first_result_s"] >= lib["load_s"]
        assert lib["vision_attn"] == "packed"
        for bs in (1, 2):
            row = lib[f"bs{bs}"]
            assert row["items"] == 4 and row["img_per_s"] > 0
            assert row["images_encoded"] == 4  # the warm-up showed these images: their features are not reused
    assert size["library_logits"]["bs1"]["scored"] == 4  # logits always yields a score
    assert size["library_generate"]["settings"]["min_new_tokens"] == 4  # forced answer length
    assert size["library_generate"]["fast_decode"] is True
    # CPU: no automatic compile to wait for; then one untimed call of the timed call's 4 items
    assert size["library_logits"]["bs2"]["warmup_items"] == 2 + 4
    assert size["library_logits"]["bs2"]["settle_call_img_per_s"] > 0
    small = size["small_jobs"]
    assert set(small) == {f"{v}_{m}" for v in ("defaults", "previous_defaults") for m in ("logits", "generate")}
    assert all(s["items"] == 10 and s["ten_item_job_s"] > 0 for s in small.values())
    worker = size["library_worker"]
    assert worker["call1"]["items"] == worker["call2"]["items"] == 4
    assert worker["call2"]["scored"] == 4
    assert "worker_over_in_process_call2" in size["ratios"]
    for pid in worker["worker_pids"]:  # the worker process is gone with the benchmark
        assert pid and not Path(f"/proc/{pid}").exists()
    table = (out / "bench_gpu.md").read_text()
    assert "| logits | 2 |" in table and "one worker" in table and "10-item job" in table


def test_bench_gpu_smoke_qwen3_judges(smoke_runs):
    """The Qwen3-VL and Qwen3-VL-MoE stand-ins through the library's defaults, both modes (and
    the warm-up's eager-then-compile branch, RUNS["qwen3"])."""
    out = finished(smoke_runs, "qwen3")
    report = json.loads((out / "bench_gpu.json").read_text())
    assert [s["checkpoint"]["arch"] for s in report["sizes"]] == ["qwen3_vl", "qwen3_vl_moe"]
    for size in report["sizes"]:
        assert size["library_logits"]["bs2"]["scored"] == 4
        for mode in ("logits", "generate"):  # 11 items scored before batch size 1: 5 eager + 1 batch
            bs1 = size[f"library_{mode}"]["bs1"]
            assert bs1["warmup_items"] == 6 + 4 and bs1["warmup_eager_img_per_s"] > 0 and bs1["compile_call_s"] >= 0
            assert bs1["images_encoded"] == 4
            # two timed calls (--reps 2): the row's figure is their median, each one kept
            each = size[f"library_{mode}"]["bs2"]["img_per_s_each"]
            assert len(each) == 2 and size[f"library_{mode}"]["bs2"]["img_per_s"] == pytest.approx(2 / (1 / each[0] + 1 / each[1]), rel=1e-3)
        assert size["library_generate"]["fast_decode"] is True and size["library_generate"]["bs2"]["items"] == 4
    md = (out / "bench_gpu.md").read_text()
    assert "smoke stand-in smoke-qwen3_vl_moe" in md and "(median of " in md


def test_reuse_gpu_smoke(smoke_runs):
    out = finished(smoke_runs, "reuse")
    report = json.loads((out / "reuse_gpu.json").read_text())
    edit, lengths = report["edit"], report["lengths"]
    # 6 edit items: 12 distinct images shown 18 times; the same scores either way
    assert edit["reuse_on"]["images_encoded"] == 12 and edit["reuse_on"]["images_reused"] == 6
    assert edit["max_abs_score_diff"] < 1e-5 and edit["reuse_on"]["errors"] == 0 and edit["reuse_off"]["errors"] == 0
    # the same, 3 sources x 2 edits: 6 edited images and 3 sources through the tower, against 18
    edit_shared = report["edit_shared"]
    assert edit_shared["sources"] == 3 and edit_shared["reuse_off"]["images_encoded"] == 18
    assert edit_shared["reuse_on"]["images_encoded"] == 9 and edit_shared["max_abs_score_diff"] < 1e-5
    assert edit_shared["reuse_on"]["errors"] == 0 and edit_shared["reuse_off"]["errors"] == 0
    # shared: 3 sources x 2 edits, model by model, chunks of 2. In input order each chunk shows two
    # sources (6 + 6 edits); kept beyond the chunk, each source is encoded once (3 + 6). Grouped
    # (the library's order), a chunk is one source's two edits: 3 + 6 with no store at all, and
    # with the store. The same scores.
    shared = report["shared"]
    assert shared["chunk_only"]["images_encoded"] == 12 and shared["chunk_only"]["grouped"] is False
    (kept,) = shared["kept"]
    assert kept["images_encoded"] == 9 and not kept["grouped"] and kept["vision_cache_mb"] == 1024
    no_store, with_store = shared["grouped"]
    assert no_store["grouped"] and no_store["vision_cache_mb"] == 0 and no_store["images_encoded"] == 9
    assert with_store["grouped"] and with_store["vision_cache_mb"] == 1024 and with_store["images_encoded"] == 9
    for row in (kept, no_store, with_store):
        assert row["max_abs_score_diff"] < 1e-5 and row["errors"] == 0
    assert lengths["continuous"]["errors"] == 0 and lengths["static"]["first_error"] is None
    assert lengths["continuous"]["continuous_active"] and not lengths["static"]["continuous_active"]
    assert lengths["continuous"]["fell_back_to_static"] == 0
    assert lengths["identical_answers"] == 1.0  # float32 on the CPU: the same tokens
    # fixed: 6 answers of 4 tokens, batch 2; both rows end together, the next two join as one batch
    fixed = report["fixed"]
    assert fixed["identical_answers"] == 1.0 and fixed["continuous"]["errors"] == 0
    assert fixed["continuous"]["decode"]["join_batches"] == 2 and fixed["continuous"]["decode"]["mean_join_batch"] == 2
    assert fixed["continuous"]["decode"]["joined"] == 4 and fixed["continuous"]["fell_back_to_static"] == 0
    # staging: the same items prefilled ahead (the default, two slots: two ahead) vs when slots free
    staging = report["staging"]
    assert staging["identical_answers"] == 1.0  # float32: the same tokens
    staged, unstaged = staging["staged"]["decode"], staging["unstaged"]["decode"]
    assert staged["stage"] == 2 and staged["staged_rows"] == staged["joined"] == 4 and staged["sync_joins"] == 0
    assert unstaged["stage"] == 0 and unstaged["staged_rows"] == 0 and unstaged["sync_joins"] > 0
    assert staging["staged"]["errors"] == staging["unstaged"]["errors"] == 0
    assert staging["staged"]["fell_back_to_static"] == staging["unstaged"]["fell_back_to_static"] == 0
    # sizes: 6 files of six sizes, shuffled, batches of 2; chunk_order auto pairs neighbouring sizes
    # (largest first), so its batches pad less than the given order's; the same scores
    sizes = report["sizes"]
    assert sizes["items"] == 6 and len(sizes["shapes"]) == 6 and sizes["max_abs_score_diff"] < 1e-5
    for order in ("input", "auto"):
        row = sizes[order]
        assert row["chunk_order"] == order and row["errors"] == 0 and row["batches"] == 3 and row["items_per_s"] > 0
    assert 0 <= sizes["auto"]["padded_fraction"] < sizes["input"]["padded_fraction"]
    assert sizes["compiled_during_timing"] is False
    md = (out / "reuse_gpu.md").read_text()
    assert md.startswith("# Issue 17") and "prefilled ahead (stage 2)" in md
    assert "| chunks grouped by source (default), vision_cache_mb 0 | " in md
    assert "| chunk_order auto (default) | " in md


def test_attention_gpu_smoke(smoke_runs):
    out = finished(smoke_runs, "attention")
    report = json.loads((out / "attention_gpu.json").read_text())
    for shape in ("qwen3_vl", "qwen2_5_vl_full"):
        rows = report["shapes"][shape]["kernels"]
        # float32 on the CPU: the library's packed attention and the grouped view give the reference
        assert rows["packed"]["max_abs_err"] < 1e-5 and rows["grouped-math"]["max_abs_err"] < 1e-5
        assert rows["packed"]["ms"] > 0
        assert "error" in rows["grouped-cudnn"]  # a CUDA-only backend: recorded with its error, not timed
    assert (out / "attention_gpu.md").read_text().startswith("# Vision-tower attention kernels")


def test_decode_attention_gpu_smoke(smoke_runs):
    out = finished(smoke_runs, "decode_attention")
    report = json.loads((out / "decode_attention_gpu.json").read_text())
    for shape in ("qwen3_vl-8b", "qwen3_vl_moe", "qwen2_5_vl-7b"):
        rows = report["shapes"][shape]["variants"]
        # float32 on the CPU: transformers' path, the library's and two matmuls give the float64 reference
        for name in ("repeat", "folded", "matmul"):
            assert rows[name]["max_abs_err"] < 1e-5 and rows[name]["us_per_call"] > 0
        assert "error" in rows["folded-cudnn"] and "flex" not in rows  # GPU-only: recorded with its error / not run
    assert (out / "decode_attention_gpu.md").read_text().startswith("# Decoding-step attention kernels")


def test_prompt_attention_gpu_smoke(smoke_runs):
    out = finished(smoke_runs, "prompt_attention")
    report = json.loads((out / "prompt_attention_gpu.json").read_text())
    for shape in ("qwen3_vl-8b", "qwen3_vl_moe", "qwen2_5_vl-7b"):
        for case in ("same_length", "padded"):
            rows = report["shapes"][f"{shape} {case}"]["variants"]
            # float32 on the CPU: transformers' function and the library's give the reference
            # at every position a prompt owns, and nothing that is not finite
            for name in ("transformers", "library"):
                assert rows[name]["max_abs_err"] < 1e-5 and rows[name]["finite"] and rows[name]["ms"] > 0
            assert rows["library"]["fell_back"] is False
            assert "error" in rows["library-cudnn"]  # a CUDA-only backend: recorded with its error, not timed
    assert (out / "prompt_attention_gpu.md").read_text().startswith("# Prompt (prefill) attention kernels")


def test_profile_parts_smoke(smoke_runs):
    # On the CPU nothing compiles automatically and there is no cuDNN: the four variants run the
    # same function, so every answer is the defaults'; logits mode says it has no decoding step.
    out = finished(smoke_runs, "parts")
    report = json.loads((out / "profile_parts.json").read_text())
    parts = report["parts_generate"]
    assert parts["rotary_compiled"] is False and parts["compiled_during_timing"] is False
    for name in ("defaults", "cudnn_off", "rotary_eager", "both_off"):
        assert parts[name]["identical_to_defaults"] == 1.0 and len(parts[name]["items_per_s_each"]) == 1
        assert parts[name]["images_encoded_each"] == [2]  # every timed call runs the tower: no features kept
    assert report["parts_logits"] == {"skipped": "the decoding step's parts: generate mode only"}
    md = (out / "profile_parts.md").read_text()
    assert "## The decoding step's fused parts, generate mode" in md
    # The MoE stand-in's experts, the library's and transformers': the same function in float32.
    for mode in ("generate", "logits"):
        st = report[f"experts_{mode}"]
        assert st["variants"] == ["defaults", "transformers_grouped_mm"]
        other = st["transformers_grouped_mm"]
        assert other["images_encoded_each"] == [2] and other["items_per_s"] > 0
        if mode == "generate":
            assert other["identical_to_defaults"] == 1.0
        else:
            assert other["max_score_diff"] is not None and other["max_score_diff"] < 1e-5
        assert f"## The experts: the library's combine kernel (defaults) against transformers' grouped_mm path, {mode} mode" in md
    assert report["gaps_logits"] == {"skipped": "the GPU's idle time needs a CUDA device"}
    # The patch embedding as a matrix multiplication and as the Conv3d: the same function in float32.
    patch = report["patch_logits"]
    assert patch["variants"] == ["defaults", "conv3d"] and patch["conv3d"]["max_score_diff"] < 1e-5
    assert report["patch_generate"]["conv3d"]["identical_to_defaults"] == 1.0
    assert "## The patch embedding: one matrix multiplication (defaults) against transformers' Conv3d, logits mode" in md
    # The rope positions worked out ahead and by the model's walk: the same positions, the same scores.
    rope = report["rope_logits"]
    assert rope["variants"] == ["defaults", "model_walk"] and rope["model_walk"]["max_score_diff"] < 1e-6
    assert report["rope_generate"] == {"skipped": "the rope positions are worked out ahead in logits mode only"}
    assert "## The rope positions: worked out on the host ahead (defaults) against the model's walk on the GPU, logits mode" in md
    # The static cache's counters on the device or the CPU (here both the CPU): the same answers.
    counters = report["counters_generate"]
    assert counters["variants"] == ["defaults", "counters_on_cpu"]
    assert counters["counters_on_cpu"]["identical_to_defaults"] == 1.0
    assert report["counters_logits"] == {"skipped": "a static cache in generate mode only"}
    assert report["gelu_logits"] == {"skipped": "the vision MLP's GELU is in a kernel of its own here"}  # CUDA only
    # cuDNN's prompt attention and inductor's Triton options: a Hopper GPU / a CUDA device only
    for mode in ("generate", "logits"):
        assert report[f"prompt_attn_{mode}"]["skipped"].startswith("the text model's prompt attention is transformers' here")
        assert report[f"vision_mk_{mode}"] == {"skipped": "inductor's Triton kernels: a CUDA device only"}
        assert report[f"norm_check_{mode}"] == {"skipped": "inductor's Triton kernels: a CUDA device only"}


def test_profile_switches_smoke(smoke_runs):
    # A call's first chunk, a quarter, whole, an eighth (batch 4: none) or a half, and the
    # interpreter's switch interval: the same scores (float32), every image encoded; the switch
    # interval is put back as it was found.
    out = finished(smoke_runs, "switches")
    report = json.loads((out / "profile_switches.json").read_text())
    ramp = report["ramp_logits"]
    assert ramp["variants"] == ["defaults", "whole_first_chunk", "eighth_first", "half_first"] and ramp["items"] == 5
    for name in ramp["variants"]:
        assert ramp[name]["max_score_diff"] < 1e-5 and ramp[name]["images_encoded_each"] == [5]
    st = report["interval_logits"]
    assert st["variants"] == ["defaults", "interval_1ms", "interval_0_2ms"]
    assert all(st[name]["identical_to_defaults"] == 1.0 for name in st["variants"])
    # 8 image threads, the image tokens found ahead or by the model, the tower's output split here
    # or by the model, the garbage collector frozen or not: the same scores; the image tokens
    # ahead in logits mode only
    for stage, other in (("threads", "image_threads_8"), ("mask", "model_mask"), ("split", "model_split"),
                         ("gc", "frozen")):
        st = report[f"{stage}_logits"]
        assert st["variants"] == ["defaults", other] and st[other]["identical_to_defaults"] == 1.0, st
    # The timeline: every chunk of both calls (1, 3 and 1 items) reached each of its points in order
    # on the host, and the chunks prepared first have no preparation of their own in the call.
    tl = report["timeline_logits"]
    for variant in ("beside", "prepared_first"):
        call = tl[variant]
        assert call["scored"] == 5 and [c["items"] for c in call["chunks"]] == [1, 3, 1], call
        # The timing wrappers leave the judge's own placeholder check in place (the model's syncs)
        assert call["mask_checks_on_host"] == 3, call
        for c in call["chunks"]:
            order = [c[p]["host_ms"] for p in ("run_start", "visual_start", "visual_end", "get_placeholder_mask_end",
                                               "language_model_start", "language_model_end", "run_end")]
            assert order == sorted(order), c
            assert ("prep_end" in c) is (variant == "beside")
        assert call["gc_ms"] == pytest.approx(sum(p["ms"] for p in call["gc_passes"]), abs=0.05)
    md = (out / "profile_switches.md").read_text()
    assert "## A call's first chunk: a quarter chunk first (defaults) against a whole, an eighth and a half, logits mode" in md
    assert "## The interpreter's switch interval: as found (defaults) against 1 and 0.2 ms, logits mode" in md
    assert "## A call's chunks, host and GPU clocks, logits mode, prepared first" in md


def test_switches_name_why_a_judge_has_nothing_to_switch():
    from benchmarks.profile_gpu import SWITCHED

    generate = SimpleNamespace(_continuous=True, _mask_ahead=None, _rope_ahead=None, _vision_reuse=None, experts=None)
    assert SWITCHED["ramp"][2](generate) == "a call of static batches only"
    assert SWITCHED["prep"][2](SimpleNamespace(_prep_stream=None)) == "the images are prepared on the CPU already"
    assert SWITCHED["prep"][2](SimpleNamespace(_prep_stream=object())) is None
    assert SWITCHED["mask"][2](generate) == "the image tokens are found ahead in logits mode only"
    assert SWITCHED["rope"][2](generate) == "the rope positions are worked out ahead in logits mode only"
    assert SWITCHED["split"][2](generate) == "the tower's output is split by the model's own method here"
    assert SWITCHED["experts"][2](generate) == "not a mixture-of-experts judge"


def test_gil_holders_reads_py_spy_raw_output():
    # py-spy's raw format: `thread (TID): NAME;outer frame;...;inner frame COUNT`, frames as
    # `function (file:line)`; pool threads numbered, merged by their prefix.
    from benchmarks.profile_gpu import gil_holders

    raw = "\n".join([
        "thread (11): MainThread;run (src/models/reward/batching.py:10);mm (torch/nn/functional.py:5) 300",
        "thread (12): judge-prepare_0;_prepare (src/models/reward/preparation.py:40);flatten (transformers/x.py:7) 150",
        "thread (12): judge-prepare_0;_prepare (src/models/reward/preparation.py:41);groupby (transformers/y.py:9) 50",
        "thread (13): judge-image_0;load_pil (src/models/reward/types.py:337) 30",
        "thread (14): judge-image_3;load_pil (src/models/reward/types.py:337) 20",
        "not a sample line",
    ])
    g = gil_holders(raw, rate=100.0, wall_s=10.0)
    assert g["held_s"] == 5.5 and g["held_share"] == 0.55
    assert list(g["threads"]) == ["MainThread", "judge-prepare", "judge-image"]
    prep = g["threads"]["judge-prepare"]
    assert prep["held_s"] == 2.0 and prep["share_of_wall"] == 0.2
    assert prep["self"][0] == {"frame": "flatten (transformers/x.py:7)", "s": 1.5}
    # the same function at two lines: one inclusive entry, counted once per stack
    assert prep["inclusive"][0] == {"frame": "_prepare (src/models/reward/preparation.py)", "s": 2.0}
    assert g["threads"]["judge-image"]["held_s"] == 0.5


def test_the_garbage_collector_is_put_back():
    import gc

    from benchmarks.profile_gpu import _switch_gc

    assert gc.get_freeze_count() == 0
    try:
        _switch_gc(None, True, {})
        assert gc.get_freeze_count() > 0
        _switch_gc(None, False, {})
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_switch_interval_is_put_back():
    from benchmarks.profile_gpu import _switch_interval

    found = sys.getswitchinterval()
    saved: dict = {}
    try:
        _switch_interval(None, 0.0002, saved)
        assert sys.getswitchinterval() == pytest.approx(0.0002)
        _switch_interval(None, None, saved)
        assert sys.getswitchinterval() == found
    finally:
        sys.setswitchinterval(found)


def test_prepare_gpu_smoke(smoke_runs):
    # A call's first chunk prepared by part, on the CPU with small images: each part measured, the
    # whole preparation at least its images' part, the cProfile entries of the engine's _prepare.
    out = finished(smoke_runs, "prepare")
    report = json.loads((out / "prepare_gpu.json").read_text())
    r = report["result"]
    assert report["meta"]["smoke"] is True and report["meta"]["model"] == "tiny:qwen3_vl"
    assert set(r["median_s"]) == {"images", "prompts_and_processor", "rope", "prepare", "prepare_quarter"}
    assert all(len(v) == 1 and v[0] > 0 for k, v in r["each_s"].items() if k != "prompts_and_processor")
    assert r["median_s"]["prepare"] >= r["median_s"]["images"] and r["tokens_per_prompt"] > 10
    assert any("preparation.py" in line and "_prepare" in line for line in r["profile_top"])
    assert "| prepare |" in (out / "prepare_gpu.md").read_text()


def test_quant_gpu_smoke(smoke_runs):
    out = finished(smoke_runs, "quant")
    report = json.loads((out / "quant_gpu.json").read_text())
    assert report["meta"]["smoke"] is True and report["meta"]["template"] == "edit"
    none = report["variants"]["none"]
    assert none["quantization"] == "none" and none["errors"] == 0
    assert len(none["scores"]) == report["meta"]["n"] == 6 and all(s is not None for s in none["scores"])
    # the reference agrees with itself exactly: the agreement arithmetic is checked on known input
    assert none["vs_none"]["items_compared"] == 6 and none["vs_none"]["max_abs_diff"] == 0.0
    assert (out / "quant_gpu.md").read_text().startswith("# Issue 20: quantized judges")


def test_quant_gpu_generate_smoke(smoke_runs):
    out = finished(smoke_runs, "quant_generate")
    report = json.loads((out / "quant_generate.json").read_text())
    assert report["meta"]["mode"] == "generate" and report["meta"]["judge"] == {"fast_decode": False}
    none = report["variants"]["none"]
    # Random weights write no score: each item's parse error is expected and not counted, and the
    # answers are recorded (compared across variants), one per item, each part's text
    assert none["errors"] == 0 and len(none["answers"]) == 6 and len(none["items_per_s_each"]) == 2
    assert all(isinstance(a, dict) and a and all(isinstance(x, str) for x in a.values()) for a in none["answers"])
    with_text = none["answers_with_text"]
    assert 0 <= with_text <= 6 and none["answers_identical"] == (1.0 if with_text else None)
    assert "| answers identical |" in (out / "quant_generate.md").read_text()


def test_quant_gpu_agreement_statistics():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quant_gpu import agreement

    ag = agreement([1.0, 2.0, 3.0, None, 5.0], [1.5, 2.0, 2.5, 4.0, 10.0])
    assert ag["items_compared"] == 4 and ag["max_abs_diff"] == 5.0 and ag["mean_abs_diff"] == 1.5
    assert ag["spearman"] == 1.0 and 0.9 < ag["pearson"] < 1.0


def test_quant_gpu_answers_compared_only_where_there_is_text():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quant_gpu import answers_compared

    ref = [{"a": "7"}, {"a": "x"}, {"a": ""}, {"a": "y"}]
    assert answers_compared(ref, [{"a": "7"}, {"a": "z"}, {"a": ""}, {"a": ""}]) == {
        "answers_with_text": 2, "answers_identical": 0.5}
    # empty answers on both sides (random weights' ids the tiny tokenizer cannot spell): nothing compared
    assert answers_compared([{"a": ""}] * 3, [{"a": ""}] * 3) == {"answers_with_text": 0, "answers_identical": None}


def test_profile_gpu_smoke(smoke_runs):
    # On the CPU the memory stage says why it has nothing (the allocator history is CUDA's) and the
    # kernels stage profiles the operators' CPU time instead of kernels: the tiny MoE's forward.
    out = finished(smoke_runs, "profile")
    report = json.loads((out / "profile_gpu.json").read_text())
    assert report["meta"]["smoke"] is True and report["meta"]["size"] == "smoke-qwen3_vl_moe"
    assert report["memory_logits"] == {"skipped": "the allocator history is CUDA's"}
    kernels = report["kernels_logits"]
    assert kernels["scored"] == kernels["items"] == kernels["images_encoded"] == 2  # the warm-up's features not kept
    names = [k["name"] for k in kernels["top_kernels"]]
    assert names and all(n.startswith("aten::") for n in names) and kernels["by_kind_ms"]
    assert "## GPU time, logits mode" in (out / "profile_gpu.md").read_text()


def test_gpu_gaps_charges_each_idle_stretch_to_the_launch_that_ended_it():
    # Two streams (kernels 2 and 3 overlap: no gap between them), a 5 us stretch (under the 20 us
    # threshold), and two long stretches ended by kernels the same host op launched, one by another.
    from benchmarks.profile_gpu import _code_line, gpu_gaps

    kernels = [(0, 100, 1), (100, 300, 2), (150, 400, 3), (405, 500, 4), (600, 700, 5), (1000, 1100, 5),
               (1150, 1200, 6)]
    ops = {1: ("aten::mm", "a"), 2: ("aten::mm", "a"), 3: ("aten::add", "b"), 4: ("aten::mul", "c"),
           5: ("aten::nonzero", "modeling_qwen3_vl.py(1): get_rope_index"), 6: ("aten::cat", "d")}
    out = gpu_gaps(list(reversed(kernels)), ops)  # any order in, the GPU's order used
    assert out["span_ms"] == 1.2 and out["idle_ms"] == 0.45 and out["gaps"] == 3
    assert out["idle_share"] == 0.375
    first, second = out["by_launch"]
    assert (first["op"], first["idle_ms"], first["gaps"], first["largest_ms"]) == ("aten::nonzero", 0.4, 2, 0.3)
    assert (second["op"], second["where"], second["idle_ms"]) == ("aten::cat", "d", 0.05)
    assert gpu_gaps([], ops)["by_launch"] == []
    stack = ["/x/torch/nn/modules/module.py(10): _call_impl",
             "/y/site-packages/transformers/models/qwen3_vl/modeling_qwen3_vl.py(1234): get_rope_index",
             "/w/src/models/reward/scoring.py(88): _logits", "/w/src/models/reward/engine.py(5): run"]
    assert _code_line(stack) == "modeling_qwen3_vl.py(1234): get_rope_index <- scoring.py(88): _logits"
    assert _code_line(["/x/torch/nn/functional.py(1): linear"]) == "?"
    # The report's table, as the device run would render it.
    from benchmarks.profile_gpu import markdown

    meta = {"size": "s", "device_name": "d", "command": "c", "bs": 32, "n": 32, "width": 1, "height": 1, "judge": []}
    md = markdown({"meta": meta, "gaps_logits": {"mode": "logits", "items": 32, "wall_s_profiled": 1.0, **out}})
    assert "## Where the GPU waits on the host, logits mode" in md and "idle 0.45 ms (37.5%) in 3 stretches" in md
    assert "| `aten::nonzero` | `modeling_qwen3_vl.py(1): get_rope_index` | 0.4 | 2 | 0.3 |" in md


def test_timeline_links_gpu_work_and_host_syncs_to_the_op_that_made_them(tmp_path):
    # A real CPU profile's Chrome trace gives the host ops their code lines (the Python frames
    # open around them); GPU activities and runtime calls, which a CPU profile lacks, are added
    # in the trace's shape: each carries the external id of the host op that made it.
    import json

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers.activations import GELUActivation

    from benchmarks.profile_gpu import gpu_gaps, host_waits, timeline

    gelu = GELUActivation()
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        gelu(torch.ones(4)).sum().item()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())["traceEvents"]
    op = next(e for e in trace if e.get("cat") == "cpu_op" and e["name"] == "aten::gelu")
    item = next(e for e in trace if e.get("cat") == "cpu_op" and e["name"] == "aten::item")
    gid, iid = op["args"]["External id"], item["args"]["External id"]
    trace += [{"ph": "X", "cat": "kernel", "name": "gelu_kernel", "ts": 3.0, "dur": 47.0, "args": {"External id": gid}},
              {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 1.0, "dur": 48.0,
               "args": {"External id": iid, "correlation": 99}},
              {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 1.0, "dur": 2.0, "args": {"External id": gid}},
              {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH", "ts": 85.0, "dur": 1.0, "args": {"External id": iid}}]
    gpu, ops, runtime = timeline(trace)
    assert sorted(gpu) == [(3.0, 50.0, gid), (85.0, 86.0, iid)]
    assert ops[gid][0] == "aten::gelu" and ops[gid][1].startswith("activations.py(") and "forward" in ops[gid][1]
    assert ops[iid] == ("aten::item", "?")  # called from the test, outside the library and transformers
    assert runtime == [(iid, "cudaMemcpyAsync", 48.0)]  # a launch cannot block the host: not listed
    waits = host_waits(runtime + [(iid, "cudaMemcpyAsync", 2.0)], ops)
    assert waits == [{"call": "cudaMemcpyAsync", "op": "aten::item", "where": "?", "count": 2, "ms": 0.05}]
    row, = gpu_gaps(gpu, ops)["by_launch"]  # the 35 us between the kernel and the copy, charged to the copy's op
    assert (row["op"], row["largest_ms"]) == ("aten::item", 0.04)
    from benchmarks.profile_gpu import markdown

    meta = {"size": "s", "device_name": "d", "command": "c", "bs": 32, "n": 32, "width": 1, "height": 1, "judge": []}
    md = markdown({"meta": meta, "gaps_logits": {"mode": "logits", "items": 32, "wall_s_profiled": 1.0,
                                                 "outside_span_ms": 7.5, "host_waits": waits, **gpu_gaps(gpu, ops)}})
    assert "Outside the GPU's span (host work before its first and after its last activity): 7.5 ms." in md
    assert "| `cudaMemcpyAsync` | `aten::item` | `?` | 2 | 0.05 |" in md


@pytest.mark.parametrize("script, stages", [("reuse_gpu", "edit,lenghts"), ("profile_gpu", "timline")])
def test_a_misspelt_stage_stops_a_benchmark_before_it_builds_a_checkpoint(script, stages, tmp_path, capsys, monkeypatch):
    # On a GPU the checkpoint takes a minute or more to build; a typo in --stages was found after it.
    import importlib

    from benchmarks import runs

    module = importlib.import_module(f"benchmarks.{script}")
    built = []
    monkeypatch.setattr(runs, "checkpoint", lambda *args, **kwargs: built.append(args) or pytest.fail("built"))
    with pytest.raises(SystemExit) as e:
        module.main(["--smoke", "--stages", stages, "--out", str(tmp_path)])
    assert e.value.code == 2 and not built and not list(tmp_path.iterdir())
    assert f"--stages: unknown '{stages.split(',')[-1]}'; known:" in capsys.readouterr().err
