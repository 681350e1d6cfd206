"""The single-device judge on real tiny models of each architecture."""
from __future__ import annotations

import io
import math

import pytest

from conftest import make_image
from src.models.reward import ScoreItem, build_reward_model
from src.models.reward.implementations.local import QwenVLRewardModel
from src.models.tiny import ARCHS


def judge(model_name: str, **kw) -> QwenVLRewardModel:
    return QwenVLRewardModel(model_name=model_name, **kw)


@pytest.fixture(scope="module")
def logits_judge(tiny_cache):
    with judge("tiny:qwen2_5_vl", batch_size=4) as j:
        yield j


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_loads_and_scores_within_scale(arch, tiny_cache, image_files):
    with judge(f"tiny:{arch}", batch_size=3) as j:
        results = j.batch_score(image_files[:5])
        one = [j.score(p) for p in image_files[:5]]
    assert [r.index for r in results] == list(range(5))
    for r, single in zip(results, one):
        assert r.error is None and r.score is not None
        assert 0.0 <= r.score <= 9.0
        assert r.device == "cpu"
        assert math.isclose(r.score, single.score, abs_tol=1e-4), "batched must equal one-by-one"
        assert abs(sum(r.raw["quality"]["probs"].values()) - 1.0) < 1e-3


def test_batched_equals_one_by_one_and_order_is_kept(logits_judge, image_files):
    items = [ScoreItem(images=[p], id=f"it{i}") for i, p in enumerate(image_files)]
    batched = logits_judge.batch_score(items)
    single = [logits_judge.score(it) for it in items]
    assert [r.id for r in batched] == [f"it{i}" for i in range(len(items))]
    assert [r.index for r in batched] == list(range(len(items)))
    for b, s in zip(batched, single):
        assert math.isclose(b.score, s.score, abs_tol=1e-4)
    # reversed input gives the same scores, reversed
    rev = logits_judge.batch_score(items[::-1])
    assert [r.id for r in rev] == [it.id for it in items[::-1]]
    for a, b in zip(rev, batched[::-1]):
        assert math.isclose(a.score, b.score, abs_tol=1e-4)


def test_logits_mode_is_deterministic(logits_judge, image_files):
    a = [r.score for r in logits_judge.batch_score(image_files)]
    b = [r.score for r in logits_judge.batch_score(image_files)]
    assert a == b
    assert len(set(round(x, 6) for x in a)) > 1, "different images should not all score the same"


def test_path_pil_and_bytes_inputs_score_the_same(logits_judge, image_files):
    from PIL import Image

    path = image_files[3]
    pil = Image.open(path)
    raw = open(path, "rb").read()
    scores = [r.score for r in logits_judge.batch_score([path, pil, raw])]
    assert max(scores) - min(scores) < 1e-5


def test_bad_items_fail_alone(logits_judge, image_files, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(open(image_files[0], "rb").read()[:60])
    items = [image_files[0], str(tmp_path / "missing.png"), str(empty), image_files[1], str(fake), str(truncated),
             image_files[2]]
    results = logits_judge.batch_score(items)
    good = logits_judge.batch_score([image_files[0], image_files[1], image_files[2]])
    assert [r.score is not None for r in results] == [True, False, False, True, False, False, True]
    assert results[1].error_kind == "image" and "not found" in results[1].error and "missing.png" in results[1].error
    assert "empty" in results[2].error
    assert "cannot decode" in results[4].error and "notes.png" in results[4].error
    assert results[5].error_kind == "image"
    assert "#1" in results[1].error  # names the item
    for r, g in zip([results[0], results[3], results[6]], good):
        assert math.isclose(r.score, g.score, abs_tol=1e-4)


def test_edit_rubric_combines_parts_viescore_style(tiny_cache, image_files):
    with judge("tiny:qwen2_5_vl", template="edit", batch_size=2) as j:
        res = j.batch_score(image_files[:3], original_images=image_files[3:6],
                            instructions=["make the square blue", "remove the square", None])
    for r in res[:2]:
        sc, pq = r.sub_scores["semantic_consistency"], r.sub_scores["perceptual_quality"]
        assert r.error is None
        assert math.isclose(r.score, math.sqrt(sc * pq), rel_tol=1e-9)
        assert set(r.raw) == {"semantic_consistency", "perceptual_quality"}
    assert res[2].score is None and "needs an instruction" in res[2].error and res[2].error_kind == "input"


def test_edit_rubric_needs_a_source_image(tiny_cache, image_files):
    with judge("tiny:qwen2_5_vl", template="edit_instruction") as j:
        r = j.score(ScoreItem(images=[image_files[0]], instruction="make it red", id="no-source"))
    assert r.score is None and "source image" in r.error and "'no-source'" in r.error


def test_generate_mode_returns_raw_answers_and_never_invents_a_score(tiny_cache, image_files):
    # Random weights write junk: every unparseable answer must be None with the raw text and the reason.
    with judge("tiny:qwen2_5_vl", mode="generate", max_new_tokens=8, batch_size=3) as j:
        batched = j.batch_score(image_files[:4])
        single = [j.score(p) for p in image_files[:4]]
    for b, s in zip(batched, single):
        assert b.raw["quality"] == s.raw["quality"], "greedy answers must not depend on batching"
        assert isinstance(b.raw["quality"], str)
        if b.score is None:
            assert b.error_kind == "parse" and "could not read a score" in b.error
        else:
            assert 0 <= b.score <= 9


def test_word_levels_in_logits_mode(tiny_cache, image_files):
    with judge("tiny:qwen2_5_vl", template="qalign_quality") as j:
        r = j.score(image_files[0])
    assert set(r.raw["qalign_quality"]["probs"]) == {"excellent", "good", "fair", "poor", "bad"}
    assert 1.0 <= r.score <= 5.0


def test_template_overrides_from_config(tiny_cache, image_files):
    templates = {"quality": {"text": "Is this image sharp?", "scale": [1, 5]},
                 "mine": {"text": "Rate the colours.", "scale": [0, 4]},
                 "combo": {"parts": {"sharp": "quality", "colour": "mine"}, "combine": "mean"}}
    with judge("tiny:qwen2_5_vl", template="quality", templates=templates) as j:
        r = j.score(image_files[0])
        assert 1.0 <= r.score <= 5.0 and set(r.raw["quality"]["probs"]) == {"1", "2", "3", "4", "5"}
    with pytest.raises(ValueError, match="share one scale"):
        judge("tiny:qwen2_5_vl", template="combo", templates=templates)


def test_out_of_memory_batches_are_split_and_scores_unchanged(logits_judge, image_files, monkeypatch):
    expected = [r.score for r in logits_judge.batch_score(image_files[:8])]
    monkeypatch.setenv("REWARD_FAULT_OOM_ABOVE", "1")  # any batch over one prompt "runs out of memory"
    got = logits_judge.batch_score(image_files[:8])
    assert [r.error for r in got] == [None] * 8
    for a, b in zip(got, expected):
        assert math.isclose(a.score, b, abs_tol=1e-4)
    monkeypatch.setenv("REWARD_FAULT_OOM_ABOVE", "0")  # even one prompt: the item fails, named
    r = logits_judge.score(image_files[0])
    assert r.score is None and r.error_kind == "oom" and "out of memory" in r.error


def test_prompt_token_limit_is_a_clear_per_item_error(tiny_cache, image_files):
    with judge("tiny:qwen2_5_vl", max_prompt_tokens=20) as j:
        r = j.score(image_files[0])
    assert r.score is None and r.error_kind == "prompt_too_long" and "max_prompt_tokens=20" in r.error


def test_odd_image_formats_are_scored(logits_judge, tmp_path):
    from PIL import Image

    base = make_image(1, 64, 48)
    files = {}
    files["rgba.png"] = base.convert("RGBA")
    files["grey.png"] = base.convert("L")
    files["palette.png"] = base.convert("P")
    files["cmyk.jpg"] = base.convert("CMYK")
    for name, im in files.items():
        im.save(tmp_path / name)
    import numpy as np

    grey16 = np.asarray(make_image(2).convert("L")).astype("uint16") * 200  # uses the 16-bit range
    Image.fromarray(grey16).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    results = logits_judge.batch_score([str(tmp_path / n) for n in [*files, "sixteen.png"]])
    assert all(r.error is None and r.score is not None for r in results), [r.error for r in results]


def test_exif_rotation_is_applied(tmp_path):
    from PIL import Image

    from src.models.reward.types import load_pil

    im = make_image(3, 80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    upright = load_pil(buf.getvalue())
    assert upright.size == (40, 80)


def test_closed_judge_refuses_work(tiny_cache, image_files):
    j = judge("tiny:qwen2_5_vl")
    j.close()
    j.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        j.score(image_files[0])


@pytest.mark.parametrize("mode", ["logits", "generate"])
def test_closed_judge_holds_no_part_of_its_model(tiny_cache, image_files, mode):
    # close() gives the model's memory back even while the judge object lives on: no parameter
    # survives (vision reuse held the inner model, the compiled blocks their weights).
    import gc
    import weakref

    j = judge("tiny:qwen2_5_vl", mode=mode, compile_vision=True, max_new_tokens=4)
    assert j.engine._compiled and j.engine._vision_reuse is not None  # compiled lazily: no compile runs here
    weights = [weakref.ref(p) for p in j.engine.model.parameters()]
    j.close()
    gc.collect()
    assert weights and [w for w in weights if w() is not None] == []


def test_build_from_config_gives_the_same_scores(logits_judge, image_files):
    spec = {"class_path": "qwen_vl", "init_args": {"model_name": "tiny:qwen2_5_vl", "batch_size": 4}}
    with build_reward_model(spec) as j:
        a = [r.score for r in j.batch_score(image_files[:3])]
    b = [r.score for r in logits_judge.batch_score(image_files[:3])]
    assert a == pytest.approx(b, abs=1e-5)


def test_prompts_show_what_scoring_shows(tiny_cache, image_files, tmp_path):
    # JudgeEngine.prompts is what the tiny judge is trained on: the same prompt text and images
    # as scoring, per rubric part, in either mode's wording, with bad items named.
    with judge("tiny:qwen2_5_vl", template="edit") as j:
        item = ScoreItem(images=[image_files[0]], source_images=[image_files[1]], instruction="make it blue")
        encoded = []
        real = j.engine._encode_cpu
        j.engine._encode_cpu = lambda reqs: encoded.append(len(reqs)) or real(reqs)
        logits, = j.engine.prompts([item])
        generate, = j.engine.prompts([item], mode="generate")
        assert encoded == []  # the prompts only: no processor run for tensors nobody reads
        assert [p[0] for p in logits] == ["semantic_consistency", "perceptual_quality"]
        sc_text, sc_images = logits[0][2], logits[0][3]
        assert "make it blue" in sc_text and len(sc_images) == 2 and sc_text.count("<|image_pad|>") == 2
        assert len(logits[1][3]) == 1  # perceptual quality looks at the edited image only
        assert generate[0][2] != sc_text and '"score"' in generate[0][2]
        with pytest.raises(ValueError, match="mode"):
            j.engine.prompts([item], mode="sample")
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"not an image")
        with pytest.raises(ValueError, match="item 'bad'"):
            j.engine.prompts([item, ScoreItem(images=[str(broken)], source_images=[image_files[1]],
                                              instruction="x", id="bad")])


def test_levels_of_several_tokens_are_refused_before_the_weights_load(tiny_cache, monkeypatch):
    # The tokenizer is all the check needs: a 30B judge's weights (minutes) are not loaded first.
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded before the levels were checked")
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_weights)
    templates = {"t": {"text": "Rate it.", "scale": [0, 1], "levels": {"0": 0, "0.5": 0.5, "1": 1}}}
    with pytest.raises(ValueError, match="template 't': level '0.5' is 3 tokens for this tokenizer"):
        judge("tiny:judge", template="t", templates=templates)


def test_a_rubric_part_that_fails_alone_is_named(tiny_cache):
    # The edit rubric's first part shows two images and is over max_prompt_tokens, its second one
    # image and is not: no overall score, the second part's sub-score kept, the error naming the
    # first part (it said only "the prompt is 245 tokens", as if the whole item were too long).
    item = ScoreItem(images=[make_image(1, 112, 112)], source_images=[make_image(2, 112, 112)], instruction="add a hat")
    with judge("tiny:judge", template="edit", min_pixels=12544, max_pixels=12544, max_prompt_tokens=200) as j:
        r = j.score(item)
    assert r.score is None and r.sub_scores["semantic_consistency"] is None
    assert r.sub_scores["perceptual_quality"] is not None
    assert r.error_kind == "prompt_too_long"
    assert r.error.startswith("item #0: semantic_consistency: the prompt is "), r.error


def test_logits_score_is_the_expected_value_over_the_levels(tiny_cache, image_files):
    # A shifted scale (-2..2 read from the digit tokens 0..4) and word levels, batched with a part
    # that shows no image: each score is sum(p * value) over the level probabilities kept in raw.
    templates = {"shift": {"text": "Rate it.", "scale": [-2, 2], "levels": {"0": -2, "1": -1, "2": 0, "3": 1, "4": 2}},
                 "words": {"text": "Is the instruction clear: {instruction}?", "images": [], "scale": [-2, 2],
                           "levels": {"excellent": 2, "good": 1, "fair": 0, "poor": -1, "bad": -2}},
                 "r": {"parts": {"shift": "shift", "words": "words"}, "combine": "min"}}
    items = [ScoreItem(images=[p], instruction="make it red" + " please" * k) for k, p in enumerate(image_files[:3])]
    with judge("tiny:qwen2_5_vl", template="r", templates=templates, batch_size=2) as j:
        results = j.batch_score(items)
        values = {name: dict(t.levels) for name, t in j.engine.rubric.parts}
    for r in results:
        assert r.error is None
        for part, raw in r.raw.items():
            probs = raw["probs"]
            assert set(probs) == set(values[part]) and sum(probs.values()) == pytest.approx(1, abs=1e-4)
            assert r.sub_scores[part] == pytest.approx(sum(p * values[part][t] for t, p in probs.items()), abs=1e-4)
        assert r.score == min(r.sub_scores.values())
