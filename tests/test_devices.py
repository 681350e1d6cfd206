"""The single-device judge's `device`: `auto` by default (the first CUDA GPU, else the CPU), settled
in one place (src/models/reward/devices.py) and reported as the device chosen; a misspelt device is
a config error naming the value and the forms. This machine has no GPU: where one is needed,
torch.cuda's answers stand in for it (nothing of this library is replaced)."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import make_image
from src.models.reward import ConfigError, JudgeConfigError, ScoreItem, build_reward_model
from src.models.reward.config import resolve_spec
from src.models.reward.devices import check_device, resolve_device
from src.models.reward.implementations.local import QwenVLRewardModel

no_gpu_here = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: auto picks it")
FORMS = "expected 'auto' (the first CUDA GPU, else the CPU), 'cpu', 'cuda', 'cuda:N' or a GPU index N"


@no_gpu_here
def test_a_judge_built_without_a_device_scores_on_the_cpu_here_and_says_so(tiny_cache, caplog):
    """The default is `auto`: on this machine (no GPU) the CPU, logged once with the reason, and
    the judge and every result name `cpu`, never `auto`."""
    caplog.set_level(logging.INFO, logger="src.models.reward.devices")
    items = [ScoreItem(images=[make_image(k)], id=f"i{k}") for k in range(3)]
    with QwenVLRewardModel(model_name="tiny:judge", template="quality", batch_size=2) as judge:
        results = judge.score_items(items)
        assert judge.device == "cpu" and judge.engine.device_label == "cpu"
    with QwenVLRewardModel(model_name="tiny:judge", template="quality", batch_size=2, device="cpu") as judge:
        explicit = judge.score_items(items)
    assert [r.id for r in results] == ["i0", "i1", "i2"]
    assert all(r.error is None and r.device == "cpu" for r in results), results
    assert [r.score for r in results] == pytest.approx([r.score for r in explicit], abs=1e-4)
    said = [r.getMessage() for r in caplog.records if r.name == "src.models.reward.devices"]
    assert len(said) == 1 and said[0].startswith("device auto: cpu ("), said


def test_auto_picks_the_first_gpu_when_torch_sees_one(monkeypatch, caplog):
    asked: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: asked.append(i) or "NVIDIA H100 80GB HBM3")
    caplog.set_level(logging.INFO, logger="src.models.reward.devices")
    assert resolve_device("auto") == "cuda:0"
    assert resolve_device() == "cuda:0"  # auto is the default
    assert asked == [0, 0]
    said = [r.getMessage() for r in caplog.records if r.name == "src.models.reward.devices"]
    assert said == ["device auto: cuda:0 (NVIDIA H100 80GB HBM3)"] * 2
    # A device given is kept as given, GPU or not, and nothing is logged for it.
    caplog.clear()
    assert [resolve_device(d) for d in ("cpu", "cuda", "cuda:3", "1", 2)] == ["cpu", "cuda:0", "cuda:3", "cuda:1", "cuda:2"]
    assert not [r for r in caplog.records if r.name == "src.models.reward.devices"]


def test_auto_falls_back_to_the_cpu_saying_why(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.set_level(logging.INFO, logger="src.models.reward.devices")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only torch on a GPU machine
    assert resolve_device("auto") == "cpu"
    said = [r.getMessage() for r in caplog.records if r.name == "src.models.reward.devices"]
    assert said == ["device auto: cpu (no CUDA device visible, CUDA_VISIBLE_DEVICES='')",
                    f"device auto: cpu (this torch {torch.__version__} is built without CUDA)"], said


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda:", "cuda:-1", "CPU", "cuda0", "0.5", -1, None])
def test_a_misspelt_device_is_named_with_the_forms(bad):
    with pytest.raises(JudgeConfigError) as e:
        check_device(bad)
    assert str(e.value) == f"device: {FORMS}, got {bad!r}"


@pytest.mark.parametrize("bad", ["gpu", "cuda:x"])
def test_a_misspelt_device_in_a_config_fails_when_the_config_is_read(bad):
    """Read by resolve_spec, which the job and the service call before anything loads (the
    service builds its model later, in the background: the error was its failed load)."""
    spec = {"class_path": "qwen_vl", "params": {"model_name": "tiny:judge", "device": bad}}
    with pytest.raises(ConfigError) as e:
        resolve_spec(spec)
    assert str(e.value) == f"Problem with class_path 'qwen_vl': parameter device: {FORMS}, got {bad!r}"
    with pytest.raises(ConfigError, match=f"parameter device: .* got {bad!r}"):
        build_reward_model(spec)
    with pytest.raises(JudgeConfigError, match=f"device: .* got {bad!r}"):  # built directly, as in a script
        QwenVLRewardModel(model_name="tiny:judge", device=bad)


def test_a_config_reads_auto_and_the_short_forms():
    def device(value):
        return resolve_spec({"class_path": "qwen_vl", "params": {"model_name": "x", "device": value}})[2]["device"]

    # `auto` stays `auto` until the judge is built: the process that loads it settles it.
    assert [device(v) for v in ("auto", "cpu", "cuda", "cuda:1", "2")] == ["auto", "cpu", "cuda:0", "cuda:1", "cuda:2"]
