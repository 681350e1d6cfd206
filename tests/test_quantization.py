"""Quantized loading (quantization.py): the setting, its errors at load time (the packages are
really missing here), a pre-quantized FP8 checkpoint loaded as transformers loads it, and the
torch-only FP8 matmul used where transformers' kernel cannot be fetched."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, fp8_blocks, make_image
from src.models.reward import ConfigError, build_reward_model
from src.models.reward.errors import JudgeConfigError, JudgeStartError
from src.models.reward.implementations.local import QwenVLRewardModel
from src.models.reward.implementations.multi_gpu import MultiGPURewardModel
from src.models.reward.pool import WorkerStartError
from src.models.reward.quantization import QuantizationUnavailable, dequantize
from src.models.reward.settings import JudgeSettings

JUDGE = {"model_name": "tiny:qwen2_5_vl", "template": "quality", "batch_size": 2}
needs_no_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None,
                                  reason="bitsandbytes is installed here: the missing-package error cannot happen")


def test_the_setting_validates_and_changes_the_fingerprint():
    with pytest.raises(ConfigError, match=r"quantization: unknown value 'int3'; known: none, fp8, bnb-8bit, bnb-4bit"):
        build_reward_model({"class_path": "qwen_vl", "params": {**JUDGE, "quantization": "int3"}})
    plain = JudgeSettings(model_name="m")
    assert plain.fingerprint() == JudgeSettings(model_name="m", quantization="none").fingerprint()
    assert plain.fingerprint() != JudgeSettings(model_name="m", quantization="fp8").fingerprint()


@needs_no_bnb
@pytest.mark.parametrize("setting", ["bnb-8bit", "bnb-4bit"])
def test_missing_bitsandbytes_is_a_clear_error_before_anything_is_scored(setting, tiny_cache):
    with pytest.raises(QuantizationUnavailable) as err:
        QwenVLRewardModel(**JUDGE, quantization=setting)
    msg = str(err.value)
    assert f"quantization: {setting} needs the bitsandbytes package" in msg
    assert f"{sys.executable} -m pip install bitsandbytes" in msg
    assert isinstance(err.value, JudgeStartError)


@needs_no_bnb
def test_the_cli_says_which_judge_could_not_start(tiny_cache, tmp_path, capsys):
    # In-process there are no workers to blame: "the judge could not start", exit 1, no folder.
    from src.cli import main

    out = tmp_path / "out"
    rc = main(["--config", str(ROOT / "configs" / "demo.yaml"), "--set", "model.params.quantization=bnb-8bit",
               "--set", f"job.output_dir={out}"], prog="main.py", base=ROOT)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and err.startswith("error: the judge could not start: quantization: bnb-8bit needs the "
                                      "bitsandbytes package"), err
    assert not out.exists()


@needs_no_bnb
def test_a_worker_without_bitsandbytes_fails_its_start_with_that_error(tiny_cache):
    with pytest.raises(WorkerStartError, match=r"worker cpu#0 \(pid \d+\) failed to start: QuantizationUnavailable: "
                                               r"quantization: bnb-4bit needs the bitsandbytes package.*pip install bitsandbytes"):
        MultiGPURewardModel(device_ids=["cpu"], progress=False, quantization="bnb-4bit", **JUDGE)


def test_fp8_on_the_cpu_is_a_clear_error(tiny_cache):
    with pytest.raises(QuantizationUnavailable, match=r"quantization: fp8 needs a CUDA GPU of compute capability 8.9 "
                                                      r"or more .*this judge runs on cpu"):
        QwenVLRewardModel(**JUDGE, quantization="fp8")


def test_a_pre_quantized_checkpoint_loads_as_declared_and_is_reported(fp8_checkpoint):
    src, fp8 = fp8_checkpoint
    images = [make_image(i) for i in range(5)]
    with QwenVLRewardModel(model_name=src, template="quality") as plain:
        assert plain.engine.quantization == "none"
        reference = [r.score for r in plain.batch_score(images)]
    with QwenVLRewardModel(model_name=fp8, template="quality") as judge:
        assert judge.engine.quantization == ("pre-quantized checkpoint (fp8, as its config.json declares; "
                                             "transformers dequantizes it on the CPU)")
        scores = [r.score for r in judge.batch_score(images)]
    assert all(s is not None for s in scores)
    # float8 weights: close to the original, not equal to it (the weights did change)
    assert scores == pytest.approx(reference, abs=0.05)
    assert scores != reference
    with pytest.raises(JudgeConfigError, match=r"quantization: bnb-8bit was asked, but the checkpoint .* is already "
                                               r"quantized \(its config.json declares quant_method 'fp8'\)"):
        QwenVLRewardModel(model_name=fp8, quantization="bnb-8bit")


def test_a_pre_quantized_fp8_checkpoint_on_the_cpu_of_a_gpu_machine_is_dequantized_as_reported(fp8_checkpoint,
                                                                                               monkeypatch):
    """transformers dequantizes an FP8 checkpoint on the CPU only where it sees no GPU: on a machine
    with an FP8-capable GPU, a judge with device cpu kept float8 layers on the CPU, whose matmul is a
    GPU kernel (every batch failed), while the judge reported "transformers dequantizes it on the
    CPU". The GPU transformers would see is stood in for by torch.cuda's answers (this machine has
    none); nothing of this library is replaced."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    src, fp8 = fp8_checkpoint
    images = [make_image(i) for i in range(3)]
    with QwenVLRewardModel(model_name=fp8, template="quality") as judge:  # no GPU seen: dequantized
        reference = [r.score for r in judge.batch_score(images)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with QwenVLRewardModel(model_name=fp8, template="quality", device="cpu") as judge:
        assert judge.engine.quantization.endswith("transformers dequantizes it on the CPU)")
        assert not any(isinstance(m, FP8Linear) for m in judge.engine.model.modules())
        results = judge.batch_score(images)
    assert [r.error for r in results] == [None] * 3
    assert [r.score for r in results] == pytest.approx(reference, abs=1e-6)
    # below compute capability 8.9 transformers dequantizes on the GPU too, and the report says so
    from src.models.reward.quantization import plan

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert plan("none", fp8, "cuda:0", torch.bfloat16) == (
        {}, "pre-quantized checkpoint (fp8, as its config.json declares; transformers dequantizes it on this GPU, "
            "below compute capability 8.9)")


@needs_no_bnb
def test_a_bitsandbytes_checkpoint_without_bitsandbytes_is_a_clear_error(fp8_checkpoint, tmp_path):
    src, _ = fp8_checkpoint
    dst = tmp_path / "tiny_bnb"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationUnavailable, match=r"its config.json declares bitsandbytes quantization\) needs the "
                                                      r"bitsandbytes package.*pip install bitsandbytes"):
        QwenVLRewardModel(model_name=str(dst))


def test_the_torch_fp8_matmul_serves_transformers_fp8_layers():
    """Without the kernels hub (no `kernels` package here), transformers' own FP8Linear runs through
    the torch matmul this library installs: float8 weights, the product of their dequantized values."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    from src.models.reward import quantization

    if importlib.util.find_spec("kernels") is not None:
        pytest.skip("the kernels package is installed: transformers' kernel is used instead")
    assert quantization._ensure_fp8_matmul() == "torch, weights dequantized per layer"
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    q, scale_inv = fp8_blocks(w, 32)
    layer = FP8Linear(64, 96, block_size=(32, 32), has_bias=True)
    with torch.no_grad():
        layer.weight.copy_(q)
        layer.weight_scale_inv.copy_(scale_inv)
        layer.bias.copy_(torch.linspace(-1, 1, 96))
    x = torch.randn(3, 5, 64)
    deq = dequantize(q, scale_inv, (32, 32), torch.float32)
    assert deq.shape == w.shape and (deq - w).abs().max() < 0.1 * w.abs().max()  # float8 is coarse, not wrong
    out = layer(x)
    assert out.shape == (3, 5, 96)
    torch.testing.assert_close(out, x @ deq.T + layer.bias, rtol=1e-5, atol=1e-5)


def test_the_job_summary_and_the_workers_report_how_weights_were_loaded(fp8_checkpoint, tmp_path):
    """A job on the pre-quantized checkpoint (in-process) and one on the plain one (a worker
    process, which reports through its Ready message) each record it in summary.json."""
    from src.job.runner import run_job

    src, fp8 = fp8_checkpoint
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        make_image(i).save(images / f"{i}.png")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"id": str(i), "image": str(images / f"{i}.png")}) + "\n"
                                              for i in range(3)))
    for class_path, model_name, extra, expected in (
            ("qwen_vl", fp8, {}, "pre-quantized checkpoint (fp8, as its config.json declares; "
                                 "transformers dequantizes it on the CPU)"),
            ("multi_gpu", src, {"device_ids": ["cpu"], "progress": False}, "none")):
        out = tmp_path / class_path
        cfg = {"model": {"class_path": class_path, "params": {"model_name": model_name, "template": "quality", **extra}},
               "job": {"manifest": str(tmp_path / "m.jsonl"), "output_dir": str(out)}}
        summary = run_job(cfg, base=tmp_path, progress=False)
        assert summary["scored"] == 3
        assert summary["quantization"] == expected
        assert json.loads((out / "summary.json").read_text())["quantization"] == expected


@pytest.mark.parametrize("arch", ["tiny:qwen2_5_vl", "tiny:qwen3_vl"])
def test_fp8_turns_the_language_layers_into_fp8_and_leaves_the_vision_tower(arch, tiny_cache):
    """transformers' own FP8 quantizer, given `quantization: fp8`'s config, on the real model
    classes (built on the meta device: no weights, no GPU): which layers become FP8Linear."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.integrations.finegrained_fp8 import FP8Linear
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    from src.models.reward.quantization import fp8_config
    from src.models.tiny import resolve_model_name

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(resolve_model_name(arch)))
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantizer = FineGrainedFP8HfQuantizer(fp8_config())
    quantizer.pre_quantized = False
    quantizer._process_model_before_weight_loading(model)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    language = {n for n in linear if n.startswith("model.language_model.")}
    assert fp8 == language and fp8
    assert not any(n.startswith("model.visual") or n == "lm_head" for n in fp8)


# -- bitsandbytes for real: installed by setup_env.sh into .venv/quant (requirements-quant.txt) ------

def test_bitsandbytes_8bit_and_4bit_judges_score_like_the_full_precision_one(tmp_path):
    # The trained tiny judge on the demo's 11 edits, on the CPU: int8 and nf4 weights through
    # bitsandbytes, installed beside .venv (not in it: the missing-package tests need it absent).
    # The script the README's figures come from (benchmarks/bnb_cpu.py), run as they were made.
    root = Path(__file__).resolve().parents[1]
    if not (root / ".venv" / "quant" / "bitsandbytes").is_dir():
        raise AssertionError(".venv/quant is missing: bash setup_env.sh installs it (requirements-quant.txt)")
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bnb_cpu.py"), "--out", str(tmp_path)], cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    variants = json.loads((tmp_path / "bnb_cpu.json").read_text())["variants"]
    ref = variants["none"]["scores"]
    assert variants["bnb-8bit"]["report"] == "bnb-8bit (bitsandbytes int8)"
    assert variants["bnb-4bit"]["report"] == "bnb-4bit (bitsandbytes nf4)"
    for q, max_diff, min_rho in (("bnb-8bit", 0.25, 0.95), ("bnb-4bit", 2.0, 0.9)):
        row = variants[q]
        assert all(e is None for e in row["errors"]) and all(s is not None for s in row["scores"]), row
        assert row["vs_none"]["items_compared"] == len(ref) == 11
        assert row["vs_none"]["max_abs_diff"] < max_diff, (q, ref, row["scores"])
        assert row["vs_none"]["spearman"] >= min_rho, (q, ref, row["scores"])
    assert variants["bnb-8bit"]["scores"] != ref  # the weights really were quantized
    assert "| bnb-4bit | bnb-4bit (bitsandbytes nf4) | 11 |" in (tmp_path / "bnb_cpu.md").read_text()


def _with_bitsandbytes(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a Python script with bitsandbytes (.venv/quant) on its path, in a process of its own."""
    root = Path(__file__).resolve().parents[1]
    quant = root / ".venv" / "quant"
    if not (quant / "bitsandbytes").is_dir():
        raise AssertionError(".venv/quant is missing: bash setup_env.sh installs it (requirements-quant.txt)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(quant), str(root)]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bitsandbytes_int8_says_its_float16_cast_once_not_on_every_matmul(tiny_qwen25):
    # bitsandbytes' int8 matmul logs "inputs will be cast from <dtype> to float16" on every call of
    # every layer where the judge's dtype is not float16 (float32 here; bf16, the default, on a GPU):
    # each decoding step of each batch, one line per layer, which flooded the judge's (and each
    # worker's) log. The judge lets the line through once.
    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from PIL import Image\n"
        "from src.models.reward.implementations.local import QwenVLRewardModel\n"
        "images = [Image.new('RGB', (64 + 8 * i, 48), (40 * i, 90, 160)) for i in range(3)]\n"
        "with QwenVLRewardModel(model_name=sys.argv[1], template='quality', mode='generate', max_new_tokens=4,\n"
        "                       batch_size=2, quantization='bnb-8bit') as judge:\n"
        "    for _ in range(2):\n"
        "        print('SCORES', [r.score is not None or r.error_kind == 'parse' for r in judge.batch_score(images)])\n")
    proc = _with_bitsandbytes(script, tiny_qwen25)
    assert proc.stdout.count("SCORES [True, True, True]") == 2, proc.stdout  # every item answered, none crashed
    casts = [line for line in proc.stderr.splitlines() if "MatMul8bitLt: inputs will be cast" in line]
    assert len(casts) == 1, f"{len(casts)} lines:\n" + "\n".join(casts[:5])


def test_a_bitsandbytes_judge_on_the_cpu_of_a_gpu_machine_stays_on_the_cpu():
    # Without a device_map, transformers loads bitsandbytes weights onto the first GPU it sees:
    # a judge with device cpu on a GPU machine was quantized on cuda:0 (taking that GPU's memory).
    # The GPU is stood in for by torch.cuda's answer (this machine has none, so asking it which GPU
    # is current raises); nothing of this library is replaced. The trained tiny judge, not the
    # random tiny Qwen2.5-VL: on a CPU with AVX512-BF16 (an AMD EPYC of this suite's machines),
    # bitsandbytes repacks 4-bit weights in blocks of 64 inputs, and the random model's vision
    # layers have 32 (every item failed there: "shape '[96, 0]' is invalid"); a real judge's
    # layers have thousands.
    script = (
        "import json, sys, torch\n"
        "from PIL import Image\n"
        "from src.models.reward.implementations.local import QwenVLRewardModel\n"
        "images = [Image.new('RGB', (64 + 8 * i, 48), (40 * i, 90, 160)) for i in range(3)]\n"
        "def scores(q):\n"
        "    with QwenVLRewardModel(model_name=sys.argv[1], template='quality', quantization=q, device='cpu') as j:\n"
        "        assert {p.device.type for p in j.engine.model.parameters()} == {'cpu'}\n"
        "        return [r.score for r in j.batch_score(images)]\n"
        "plain = {q: scores(q) for q in ('bnb-8bit', 'bnb-4bit')}\n"
        "torch.cuda.is_available = lambda: True\n"
        "print('RESULT ' + json.dumps({'plain': plain, 'gpu_seen': {q: scores(q) for q in plain}}))\n")
    proc = _with_bitsandbytes(script, "tiny:judge")
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["gpu_seen"] == out["plain"] and all(s is not None for v in out["plain"].values() for s in v), out


def test_an_fp8_mixture_of_experts_judge_runs_its_experts_through_the_torch_matmuls():
    """`quantization: fp8` on a Qwen3-VL-MoE judge without transformers' FP8 kernel: its experts
    (transformers' FP8Experts) call the kernel's grouped matmul (batched under `batched_mm`), which
    the torch versions serve. The library's own experts path, written for unquantized experts, is
    left out for float8 ones (it would name an implementation the FP8 experts do not know).

    Made by transformers' own FP8 quantizer from the tiny MoE judge, with 32x32 blocks (the tiny
    widths do not tile into 128x128 ones, which transformers then leaves unquantized). The
    quantizer refuses to start without a GPU, though what it does is torch code that runs on the
    CPU: its device check is answered here. Compared with the same model holding the dequantized
    weights in float32, unquantized."""
    from unittest import mock

    from transformers import AutoModelForImageTextToText, FineGrainedFP8Config

    from src.models.reward import experts, quantization
    from src.models.tiny import resolve_model_name

    if importlib.util.find_spec("kernels") is not None:
        pytest.skip("the kernels package is installed: transformers' kernel is used instead")
    assert quantization._ensure_fp8_matmul() == "torch, weights dequantized per layer"
    path = resolve_model_name("tiny:qwen3_vl_moe")
    config = FineGrainedFP8Config(weight_block_size=(32, 32), modules_to_not_convert=["model.visual", "lm_head"])
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)):
        fp8 = AutoModelForImageTextToText.from_pretrained(path, quantization_config=config, dtype=torch.float32,
                                                          device_map="cpu")
    plain = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    original = dict(plain.named_parameters())
    dequantized = {}
    for name, module in fp8.named_modules():
        for weight in ("weight", "gate_up_proj", "down_proj"):
            scale = getattr(module, "weight_scale_inv" if weight == "weight" else f"{weight}_scale_inv", None)
            if scale is not None:
                w = getattr(module, weight)
                assert w.dtype == torch.float8_e4m3fn
                dequantized[f"{name}.{weight}"] = dequantize(w, scale, module.block_size, torch.float32)
    expert_weights = [k for k in dequantized if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(expert_weights) == 4  # two layers' experts, quantized with their scales
    for key, deq in dequantized.items():  # float8 is coarse, not wrong: every block's scale was made
        assert (deq - original[key]).abs().max() < 0.1 * original[key].abs().max(), key
    assert not plain.load_state_dict(dequantized, strict=False).unexpected_keys

    assert experts.install(fp8) == "grouped_mm"  # as loaded: transformers' FP8 experts forward
    assert experts.install(plain) == experts.NAME
    ids = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        grouped = fp8.model.language_model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(grouped, plain.model.language_model(input_ids=ids).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
        fp8.set_experts_implementation("batched_mm")
        torch.testing.assert_close(fp8.model.language_model(input_ids=ids).last_hidden_state, grouped,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [128, 32])
def test_fp8_on_a_judge_whose_widths_do_not_tile_is_refused_at_load(block, tiny_cache, monkeypatch):
    """`quantization: fp8` in 128x128 blocks on a judge whose layers are 64 wide (the tiny one):
    transformers would keep those weights unquantized and their float8 layers' scales unset, so
    the load is refused, naming a weight. With 32x32 blocks the same judge loads and scores
    through the torch matmul, close to its full-precision scores (~4.4 here, 0.02 apart across
    the images, 0.001 from fp8's). The load runs on the CPU: the GPU checks (the library's plan
    and transformers' quantizer) are answered here, and the plan gives the block."""
    from unittest import mock

    from transformers import FineGrainedFP8Config

    from src.models.reward import quantization

    if importlib.util.find_spec("kernels") is not None:
        pytest.skip("the kernels package is installed: transformers' kernel is used instead")
    config = FineGrainedFP8Config(weight_block_size=(block, block), modules_to_not_convert=["model.visual", "lm_head"])
    monkeypatch.setattr(quantization, "plan", lambda *a: ({"quantization_config": config},
                                                           f"fp8 (matmul: {quantization._ensure_fp8_matmul()})"))
    images = [make_image(i) for i in range(3)]
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)):
        if block == 128:
            with pytest.raises(QuantizationUnavailable, match=r"quantization: fp8 makes float8 weights in blocks, and "
                               r"\d+ of this judge's weights do not tile into them, e.g. model\.language_model\.layers\."
                               r"0\.\S+ \(\d+x\d+; blocks 128x128\)"):
                QwenVLRewardModel(**JUDGE, device="cpu", quantization="fp8")
            return
        with QwenVLRewardModel(**JUDGE, device="cpu", quantization="fp8") as judge:
            assert judge.quantization == "fp8 (matmul: torch, weights dequantized per layer)"
            fp8 = judge.batch_score(images)
    monkeypatch.undo()  # the plan as it is: no quantization
    with QwenVLRewardModel(**JUDGE) as judge:
        plain = judge.batch_score(images)
    assert all(r.error is None for r in fp8 + plain)
    assert max(abs(a.score - b.score) for a, b in zip(fp8, plain)) < 0.05


@pytest.mark.parametrize("shape", [(96, 64), (4, 64, 96), (70, 50)])
def test_dequantize_multiplies_each_block_by_its_scale(shape):
    """Whole blocks (a 2-D layer, a layer's experts) and partial edge blocks (70x50 in 32x32
    blocks, as a pre-quantized checkpoint may hold): each value is its float8 weight times its
    block's scale, the product taken in the compute dtype, against a loop over the blocks."""
    torch.manual_seed(0)
    w = (torch.randn(*shape) * 8).to(torch.float8_e4m3fn)
    blocks = (-(-shape[-2] // 32), -(-shape[-1] // 32))
    scale = torch.rand(*shape[:-2], *blocks) + 0.5
    for dtype in (torch.float32, torch.bfloat16):
        got = dequantize(w, scale, (32, 32), dtype)
        want = w.to(dtype)
        for i in range(blocks[0]):
            for j in range(blocks[1]):
                part = want[..., 32 * i:32 * (i + 1), 32 * j:32 * (j + 1)]
                part.mul_(scale[..., i, j, None, None].to(dtype))
        assert got.dtype == dtype and got.shape == w.shape
        assert torch.equal(got, want)
