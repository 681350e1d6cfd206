"""Config loading: class_path resolution, parameter checks, overrides. Each error names the key."""
from __future__ import annotations

import pytest

from conftest import ROOT
from src.models.reward import ConfigError, JudgeConfigError, build_reward_model, load_config
from src.models.reward.config import accepted_params, apply_override, resolve_class, resolve_spec
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
    ("../../mine.Judge", "cannot import module '../../mine'"),  # a path is no module name
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


# A template a user writes in YAML, with one mistake each: refused when the config is read, the
# message naming the template and the key (no TypeError from deep inside, nothing shown to the
# judge with a typo in it).
_YES_NO = __import__("yaml").safe_load("{yes: 1, no: 0}")  # YAML 1.1: unquoted yes/no are booleans


@pytest.mark.parametrize("spec, expected", [
    ({"text": 5}, "template 't': text: expected a string, got int 5"),
    ({"text": None}, "template 't': text: expected a string, got NoneType None"),
    ({"text": ["a", "b"]}, "template 't': text: expected a string, got list"),
    ({"text": "x", "system": 3}, "template 't': system: expected a string or null, got int 3"),
    ({"text": "x", "logits_suffix": None}, "template 't': logits_suffix: expected a string, got NoneType"),
    ({"text": "x", "json_key": 3}, "template 't': json_key: expected a string or null, got int 3"),
    ({"text": "x", "images": None}, "template 't': images: expected a list of image roles"),
    ({"text": "x", "images": "source"}, "template 't': images: expected a list of image roles (source, image), "
                                        "got str 'source'"),
    ({"text": "x", "scale": [1]}, "template 't': scale: expected [low, high], two numbers, got [1]"),
    ({"text": "x", "scale": "1-5"}, "template 't': scale: expected [low, high], two numbers, got '1-5'"),
    ({"text": "x", "scale": [1, 5, 9]}, "template 't': scale: expected [low, high], two numbers, got [1, 5, 9]"),
    ({"text": "x", "scale": [0, float("inf")]}, "template 't': scale: expected [low, high], two finite numbers"),
    ({"text": "x", "scale": [0, "9"]}, "template 't': scale: expected [low, high], two numbers, got [0, '9']"),
    ({"text": "x", "levels": 5}, "template 't': levels: expected a mapping {token: value} or a list of "
                                 "[token, value] pairs, got int 5"),
    ({"text": "x", "scale": [1, 5], "levels": "12345"}, "template 't': levels: expected a mapping"),
    ({"text": "x", "scale": [1, 5], "levels": {"a": "high", "b": 1}},
     "template 't': levels: the value of 'a' is not a number: 'high'"),
    ({"text": "x", "scale": [1, 5], "levels": {"a": None, "b": 1}}, "template 't': levels: the value of 'a' is not"),
    ({"text": "x", "scale": [0, 1], "levels": _YES_NO},
     "template 't': levels: the level True is YAML's reading of an unquoted yes, no, true, false, on or off; "
     "quote the word"),
    ({"text": "x", "scale": [1, 5], "levels": [["1", 1], ["1", 2]]}, "template 't': levels: '1' is given twice"),
    ({"text": "x", "scale": [1, 5], "levels": {"good": 5}},
     "template 't': levels: one level ('good') gives every item the same score; give at least two"),
    ({"text": "Does the edit follow {instrution}?"},
     "template 't': text holds {instrution}, which is no placeholder (did you mean {instruction}?): the judge would "
     "read it as written. text fills in {instruction}"),
    ({"text": "Does the image match the prompt {prompt}?"}, "template 't': text holds {prompt}, which is no placeholder"),
    ({"text": "x", "generate_suffix": "Give a score from {low} to {high}."},
     "template 't': generate_suffix holds {low}, which is no placeholder (did you mean {lo}?)"),
    ({"text": "x", "system": "You judge edits made with {instruction}."},
     "template 't': system holds {instruction}, which is no placeholder here: system fills in none "
     "({instruction} is filled in text only)"),
])
def test_bad_template_specs_are_refused_naming_the_template_and_key(spec, expected):
    with pytest.raises(JudgeConfigError) as e:
        resolve_rubric("t", {"t": spec})
    assert expected in str(e.value)


@pytest.mark.parametrize("spec, expected", [
    ({"parts": {"a": "quality", "b": ["alignment"]}}, "rubric 'r': parts: the template of 'b' must be a template "
                                                      "name, got list"),
    ({"parts": {"a": "quality", "b": "alignment"}, "combine": None}, "rubric 'r': combine: expected one of"),
])
def test_bad_rubric_specs_are_refused_naming_the_rubric_and_key(spec, expected):
    with pytest.raises(JudgeConfigError) as e:
        resolve_rubric("r", {"r": spec})
    assert expected in str(e.value)


def test_braces_that_are_no_placeholder_reach_the_judge_as_written():
    # JSON examples in a template's text, and the suffixes' {{ }} escapes, are no placeholders.
    t = resolve_rubric("t", {"t": {
        "text": 'Edit: "{instruction}". Reply as {"score": 7} or {"score": {"overall": 7}}; {a b} and {} stay.',
        "generate_suffix": 'Last line: {{"score": <{lo}..{hi}>}}', "scale": [1, 5]}}).parts[0][1]
    assert t.question("add a hat", "generate") == (
        'Edit: "add a hat". Reply as {"score": 7} or {"score": {"overall": 7}}; {a b} and {} stay.\n'
        'Last line: {"score": <1..5>}')


def test_logits_mode_asks_for_the_levels_it_reads():
    # Levels that are not the digits of the scale: the default logits question names them, so that
    # the judge's next token is one of the tokens read (it asked for a digit, and the yes/no
    # probabilities it read were what the judge left over).
    yes_no = resolve_rubric("t", {"t": {"text": "Is there a cat?", "scale": [0, 1],
                                        "levels": {"yes": 1, "no": 0}}}).parts[0][1]
    assert yes_no.question(None, "logits") == "Is there a cat?\nAnswer with one of: yes, no."
    shifted = resolve_rubric("t", {"t": {"text": "Rate it.", "scale": [-2, 2],
                                         "levels": {"0": -2, "1": -1, "2": 0, "3": 1, "4": 2}}}).parts[0][1]
    assert shifted.question(None, "logits") == "Rate it.\nAnswer with one of: 0, 1, 2, 3, 4."
    stars = resolve_rubric("t", {"t": {"text": "Stars?", "scale": [1, 5]}}).parts[0][1]
    assert stars.question(None, "logits") == "Stars?\nAnswer with a single digit from 1 to 5."
    own = resolve_rubric("t", {"t": {"text": "Cat?", "scale": [0, 1], "levels": {"yes": 1, "no": 0},
                                     "logits_suffix": "Say yes or no."}}).parts[0][1]
    assert own.question(None, "logits") == "Cat?\nSay yes or no."
    for name in ("quality", "edit_instruction", "edit_quality", "alignment", "qalign_quality"):  # as before
        t = resolve_rubric(name).parts[0][1]
        assert t.logits_suffix == ("" if name == "qalign_quality" else "Answer with a single digit from {lo} to {hi}.")


def test_template_mistakes_are_judge_config_errors_before_any_worker_starts():
    # The settings record refuses them, so every host (in process, worker pool, Ray, service) does
    # at construction: before, the worker pool started its workers, and each failed to start.
    bad = {"t": {"text": "x", "scale": [5, 1]}}
    with pytest.raises(JudgeConfigError, match=r"template 't': scale \(5.0, 1.0\) must be"):
        MultiGPURewardModel(model_name="tiny:judge", device_ids=["cpu"], template="t", templates=bad)
    with pytest.raises(ConfigError, match="Problem with class_path 'multi_gpu': template 't': text: expected a string"):
        build_reward_model({"class_path": "multi_gpu", "params": {
            "model_name": "tiny:judge", "device_ids": ["cpu"], "template": "t", "templates": {"t": {"text": 5}}}})
    # the spec check the service runs before it loads anything in the background
    with pytest.raises(ConfigError, match="Problem with class_path 'qwen_vl': unknown template 'qualty'"):
        resolve_spec({"class_path": "qwen_vl", "params": {"model_name": "tiny:judge", "template": "qualty"}})


def test_logits_mode_needs_levels_at_config_time():
    # A scale whose default levels are not single digits (0..100, 1..10) has no levels for logits
    # mode: refused when the settings are read, not after the weights have loaded.
    scale100 = {"pct": {"text": "Rate it, 0 to 100.", "scale": [0, 100]}}
    with pytest.raises(JudgeConfigError, match=r"template 'pct': logits mode needs single-token levels; its scale "
                                               r"\(0.0, 100.0\) has none"):
        JudgeSettings(model_name="m", template="pct", templates=scale100)
    assert JudgeSettings(model_name="m", template="pct", templates=scale100, mode="generate").template == "pct"
    with pytest.raises(JudgeConfigError, match="template 'pct': logits mode needs"):  # a rubric's part too
        JudgeSettings(model_name="m", template="r", templates={**scale100, "r": {"parts": {"b": "pct"}}})


def test_fingerprint_covers_every_template_setting_and_no_speed_setting():
    def fp(**kw):
        return JudgeSettings(model_name="m", template="r", **kw).judge_fingerprint()

    def templates(**change):
        t = {"a": {"text": "Sharp? {instruction}", "images": ["source", "image"], "scale": [0, 4]},
             "b": {"text": "Colours?", "scale": [0, 4]},
             "r": {"parts": {"sharp": "a", "colour": "b"}, "combine": "mean"}}
        for key, value in change.items():
            name, field_name = key.split("__")
            t[name] = {**t[name], field_name: value}
        return t

    base = fp(templates=templates())
    assert fp(templates=templates(), batch_size=64, chunk_order="input", vision_cache_mb=0) == base
    assert fp(templates={**templates(), "unused": {"text": "never asked"}}) == base
    changed = [templates(a__text="Blurry? {instruction}"), templates(a__images=["image"]),
               templates(a__scale=[0, 3], b__scale=[0, 3]), templates(a__levels={"0": 0, "1": 1, "2": 2, "3": 4}),
               templates(a__system="Be strict."), templates(a__logits_suffix="Digit?"), templates(a__json_key="s"),
               templates(r__combine="min"), templates(r__parts={"sharp": "a", "color": "b"}),
               templates(r__parts={"sharp": "a"}), templates(r__parts={"colour": "b", "sharp": "a"})]
    prints = [fp(templates=t) for t in changed]
    assert base not in prints and len(set(prints)) == len(prints)


def test_generate_mode_asks_for_the_json_key_it_reads():
    # A template with its own json_key and the default answer format: the judge was asked for
    # {"score": N} while only "quality" was read, so every answer failed to parse.
    from src.models.reward.scoring import read_answers

    t = resolve_rubric("t", {"t": {"text": "Rate it.", "json_key": "quality"}}).parts[0][1]
    assert t.question(None, "generate").endswith('on the last line: {"quality": <integer from 0 to 9>}')
    assert read_answers(['Sharp and clean. {"quality": 7}'], t)["score"] == 7.0
    own = resolve_rubric("t", {"t": {"text": "Rate it.", "json_key": "q", "generate_suffix": "Reply {{\"q\": N}}."}})
    assert own.parts[0][1].question(None, "generate") == 'Rate it.\nReply {"q": N}.'
    assert resolve_rubric("quality").parts[0][1].question(None, "generate").endswith('{"score": <integer from 0 to 9>}')


def test_a_template_named_like_a_built_in_rubric_replaces_it():
    # `templates: {edit: {text: ...}}` defines the template `edit`; the built-in rubric of that name
    # was chosen anyway, and the user's question never asked.
    spec = {"text": 'Was "{instruction}" followed, and does the result look good?', "images": ["source", "image"]}
    r = resolve_rubric("edit", {"edit": spec})
    assert r.combine == "single" and [(s, t.text) for s, t in r.parts] == [("edit", spec["text"])]
    assert JudgeSettings(model_name="m", template="edit", templates={"edit": spec}).judge_fingerprint() != \
        JudgeSettings(model_name="m", template="edit").judge_fingerprint()
    # and the other way round: a rubric named like a built-in template is the rubric
    r = resolve_rubric("quality", {"quality": {"parts": {"q": "quality", "a": "alignment"}, "combine": "min"}})
    assert r.combine == "min" and [t.name for _, t in r.parts] == ["quality", "alignment"]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_passes_the_checks_a_run_makes_before_loading(name):
    """Each file in configs/ (the job configs and the service's): its keys, its job section and its
    judge's parameters pass the checks main.py makes before any model loads, so a newcomer's first
    `--config configs/X.yaml` fails, if at all, on the machine (no GPU, no checkpoint), not the file."""
    from src.job.runner import JobSpec, check_top_level
    from src.service.server import ServerSettings

    cfg = load_config(ROOT / "configs" / name)
    if "server" in cfg:  # main.py serve
        ServerSettings.from_mapping(cfg["server"])
        assert set(cfg) == {"model", "server"}, name
    else:
        check_top_level(cfg)
        JobSpec.from_config(cfg, ROOT)
    resolve_spec(cfg["model"])
