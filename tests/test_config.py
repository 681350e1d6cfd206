"""Config loading: class_path resolution, parameter checks, overrides. Each error names the key."""
from __future__ import annotations

import pytest

from src.models.reward import ConfigError, build_reward_model, load_config
from src.models.reward.config import accepted_params, apply_override, resolve_class
from src.models.reward.implementations.local import QwenVLRewardModel
from src.models.reward.implementations.multi_gpu import MultiGPURewardModel
from src.models.reward.settings import JudgeSettings
from src.models.reward.templates import resolve_rubric


def test_aliases_and_dotted_paths_resolve():
    assert resolve_class("qwen_vl") is QwenVLRewardModel
    assert resolve_class("multi_gpu") is MultiGPURewardModel
    assert resolve_class("src.models.reward.implementations.local.QwenVLRewardModel") is QwenVLRewardModel


@pytest.mark.parametrize("class_path, expected", [
    ("qwen_v", "Did you mean 'qwen_vl'?"),
    ("nonsense", "Known short names: qwen_vl"),
    ("no.such.module.Class", "cannot import module 'no.such.module'"),
    ("src.models.reward.implementations.local.Nope", "has no attribute 'Nope'"),
    ("src.models.reward.types.ScoreItem", "is not a BaseRewardModel subclass"),
])
def test_wrong_class_path_is_named(class_path, expected):
    with pytest.raises(ConfigError) as e:
        build_reward_model({"class_path": class_path, "params": {"model_name": "x"}})
    assert f"Problem with class_path '{class_path}'" in str(e.value)
    assert expected in str(e.value)


@pytest.mark.parametrize("params, expected", [
    ({"model_name": "x", "batchsize": 4}, "unknown parameter 'batchsize'. Did you mean 'batch_size'?"),
    ({"model_name": "x", "batch_size": "four"}, "parameter batch_size: expected an integer"),
    ({"model_name": "x", "temperature": "hot"}, "parameter temperature: expected a number"),
    ({"model_name": "x", "device": 3.5}, "parameter device: expected a string"),
    ({"batch_size": 4}, "missing required parameter(s) 'model_name'"),
    ({"model_name": "x", "mode": "vibes"}, "mode: unknown value 'vibes'; known: logits, generate"),
    ({"model_name": "x", "batch_size": 0}, "batch_size: must be at least 1"),
])
def test_bad_parameters_are_named_before_any_model_loads(params, expected):
    with pytest.raises(ConfigError) as e:
        build_reward_model({"class_path": "qwen_vl", "params": params})
    assert expected in str(e.value)
    assert "Problem with class_path 'qwen_vl'" in str(e.value)


def test_multi_gpu_parameters_are_checked_too():
    with pytest.raises(ConfigError, match="unknown parameter 'device_id'. Did you mean 'device_ids'?"):
        build_reward_model({"class_path": "multi_gpu", "params": {"model_name": "x", "device_id": [0]}})
    with pytest.raises(ConfigError, match="schedule: unknown value 'fastest'"):
        build_reward_model({"class_path": "multi_gpu", "params": {"model_name": "x", "device_ids": ["cpu"],
                                                                   "schedule": "fastest"}})
    with pytest.raises(ConfigError, match="'gpu0' is neither a GPU id nor 'cpu'"):
        build_reward_model({"class_path": "multi_gpu", "params": {"model_name": "x", "device_ids": ["gpu0"]}})


def test_model_section_shape_errors():
    with pytest.raises(ConfigError, match="missing 'class_path'"):
        build_reward_model({"params": {}})
    with pytest.raises(ConfigError, match="not both"):
        build_reward_model({"class_path": "qwen_vl", "params": {}, "init_args": {}})
    with pytest.raises(ConfigError, match=r"model: unknown key 'paramz'. Did you mean 'params'\?"):
        build_reward_model({"class_path": "qwen_vl", "paramz": {}})


def test_accepted_params_include_judge_settings():
    known, required = accepted_params(MultiGPURewardModel)
    assert {"device_ids", "schedule", "launcher"} <= set(known)
    assert set(JudgeSettings.names()) <= set(known)
    assert required == {"model_name"}


def test_load_config_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  class_path: qwen_vl\n  init_args:\n    model_name: a\n    batch_size: 2\n")
    cfg = load_config(p, ["model.params.batch_size=8", "model.params.mode=generate", "job.output_dir=out"])
    assert cfg["model"]["init_args"] == {"model_name": "a", "batch_size": 8, "mode": "generate"}
    assert cfg["job"] == {"output_dir": "out"}
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_override(cfg, "model.params.batch_size")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_template_errors_name_the_template():
    with pytest.raises(ValueError, match="unknown template 'qualty'. Did you mean 'quality'[?] Known: .*quality"):
        resolve_rubric("qualty")
    with pytest.raises(ValueError, match="unknown template 'zzz'. Known: "):
        resolve_rubric("zzz")
    with pytest.raises(ValueError, match=r"template 'quality': unknown key\(s\) \['txt'\]"):
        resolve_rubric("quality", {"quality": {"txt": "x"}})
    with pytest.raises(ValueError, match="unknown image role 'edited'"):
        resolve_rubric("x", {"x": {"text": "t", "images": ["edited"]}})
    with pytest.raises(ValueError, match="names unknown template"):
        resolve_rubric("r", {"r": {"parts": {"a": "missing"}}})
    rubric = resolve_rubric("edit")
    assert [name for name, _ in rubric.parts] == ["semantic_consistency", "perceptual_quality"]
    assert rubric.overall({"semantic_consistency": 4.0, "perceptual_quality": 9.0}) == pytest.approx(6.0)
    assert rubric.overall({"semantic_consistency": None, "perceptual_quality": 9.0}) is None


def test_settings_fingerprint_tracks_what_changes_scores():
    a = JudgeSettings(model_name="m")
    assert a.fingerprint() == JudgeSettings(model_name="m", batch_size=32).fingerprint()
    assert a.fingerprint() != JudgeSettings(model_name="m", mode="generate").fingerprint()
    assert a.fingerprint() != JudgeSettings(model_name="other").fingerprint()
