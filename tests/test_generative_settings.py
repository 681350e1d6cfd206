"""Generative reward-model settings: sampled answers (num_samples, temperature), their mean and
spread, the prompt-length limit, and verl's names for the same settings."""
from __future__ import annotations

import dataclasses
import math
import re
import statistics

import pytest
import torch

from src.models.reward import ScoreItem
from src.models.reward.config import ConfigError, resolve_spec
from src.models.reward.implementations.local import QwenVLRewardModel
from src.models.reward.settings import JudgeSettings


DIGITS = {str(d): 1.0 for d in range(10)}


def steer(judge: QwenVLRewardModel, after: dict) -> None:
    """Rewire the tiny judge's next token: after a token named in `after` it writes one of those
    the name maps to ({text: weight}: the heaviest under greedy decoding, those of equal weight
    equally likely when sampling; "<eos>": the end of the answer); after any other token (the
    prompt's last one among them) one of those `after[None]` maps to. Each named token's
    embedding gets a large component of its own (every other token's shares one), which only the
    rows of the output head of the tokens that may follow it read. Random weights otherwise write
    junk with no score in it."""
    engine = judge.engine
    end = engine.model.generation_config.eos_token_id

    def token(text: str) -> int:
        if text == "<eos>":
            return end[0] if isinstance(end, list) else end
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 1, f"{text!r} is {len(ids)} tokens"
        return ids[0]

    assert next(iter(after)) is None, "after[None] first: the other tokens' component is the first"
    embed = engine.model.get_input_embeddings().weight
    head = engine.model.get_output_embeddings().weight
    with torch.no_grad():
        head[[token(t) for follow in after.values() for t in follow]] = 0.0
        embed[:, 0] = 30.0
        for dim, (name, follow) in enumerate(after.items()):
            if name is not None:
                embed[token(name), 0] = 0.0
                embed[token(name), dim] = 30.0
            for text, weight in follow.items():
                head[token(text), dim] = 3.0 * weight


def test_num_samples_scores_k_sampled_answers_with_mean_and_spread(tiny_cache, image_files):
    with QwenVLRewardModel(model_name="tiny:qwen2_vl", mode="generate", template="quality", num_samples=4,
                           temperature=1.0, max_new_tokens=2, batch_size=2) as j:
        steer(j, {None: DIGITS, **{d: {"<eos>": 1.0} for d in DIGITS}})  # a random digit, and the end
        results = j.batch_score(image_files[:3])
    answers_seen = set()
    for r in results:
        raw = r.raw["quality"]
        assert len(raw["answers"]) == 4 and all(a.strip().isdigit() for a in raw["answers"]), raw
        values = [float(a) for a in raw["answers"]]
        assert raw["scores"] == values and raw["parsed"] == 4
        assert math.isclose(raw["mean"], statistics.fmean(values)) and math.isclose(r.score, raw["mean"])
        assert math.isclose(raw["std"], statistics.pstdev(values))
        assert r.error is None and 0 <= r.score <= 9
        answers_seen.update(raw["answers"])
    assert len(answers_seen) > 1, "sampling at temperature 1 must not give one answer every time"


def test_sampled_answers_belong_to_their_own_item_in_a_batch(tiny_cache, image_files):
    """num_return_sequences expands each prompt (and its image) k times: at a near-zero temperature
    all k answers of an item must equal that item's greedy answer scored alone."""
    with QwenVLRewardModel(model_name="tiny:qwen2_vl", mode="generate", max_new_tokens=6) as greedy:
        alone = [greedy.score(p).raw["quality"] for p in image_files[:3]]
    assert len(set(alone)) > 1, "the images must give different answers for this test to mean anything"
    with QwenVLRewardModel(model_name="tiny:qwen2_vl", mode="generate", max_new_tokens=6, num_samples=3,
                           temperature=1e-4, batch_size=3) as sampled:
        batched = sampled.batch_score(image_files[:3])
    for r, expected in zip(batched, alone):
        assert r.raw["quality"]["answers"] == [expected] * 3
        assert r.score is None and "none of the 3 sampled answers held a score" in r.error  # junk, not guessed


def test_prompt_limit_fails_only_the_long_prompt(tiny_cache, image_files):
    with QwenVLRewardModel(model_name="tiny:qwen2_vl", template="alignment", max_prompt_tokens=320,
                           batch_size=4) as j:
        results = j.batch_score([ScoreItem(images=[image_files[0]], instruction="a red square", id="short"),
                                 ScoreItem(images=[image_files[0]], instruction="a red square " * 100, id="long"),
                                 ScoreItem(images=[image_files[1]], instruction="a cat", id="short2")])
    assert results[0].error is None and results[2].error is None
    long = results[1]
    assert long.score is None and long.error_kind == "prompt_too_long"
    assert "'long'" in long.error and "over max_prompt_tokens=320" in long.error


def test_verl_names_are_accepted_for_the_same_settings():
    s = JudgeSettings.from_params({"model_name": "m", "mode": "generate", "response_length": 64,
                                   "prompt_length": 2048, "micro_batch_size_per_gpu": 4})
    assert (s.max_new_tokens, s.max_prompt_tokens, s.batch_size) == (64, 2048, 4)
    assert s == JudgeSettings(model_name="m", mode="generate", max_new_tokens=64, max_prompt_tokens=2048, batch_size=4)
    with pytest.raises(TypeError, match="give 'max_new_tokens' or its alias 'response_length', not both"):
        JudgeSettings.from_params({"model_name": "m", "response_length": 8, "max_new_tokens": 8})
    # Through a config too, checked before any model loads.
    _, _, params = resolve_spec({"class_path": "multi_gpu", "params": {"model_name": "m", "response_length": 32}})
    assert params["response_length"] == 32
    with pytest.raises(ConfigError, match="response_length: expected an integer"):
        resolve_spec({"class_path": "qwen_vl", "params": {"model_name": "m", "response_length": "long"}})
    with pytest.raises(ValueError, match="num_samples > 1 needs temperature > 0"):
        JudgeSettings(model_name="m", mode="generate", num_samples=3)


def test_sampling_leaves_the_callers_random_stream_alone(tiny_cache, image_files):
    """An RL trainer that hosts the judge in-process samples its policy from torch's global RNG:
    a judge call must neither reseed nor advance it (and its own samples stay reproducible)."""
    with QwenVLRewardModel(model_name="tiny:qwen2_vl", mode="generate", num_samples=2, temperature=1.0,
                           max_new_tokens=4) as j:
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        first = j.score(image_files[0]).raw["quality"]["answers"]
        assert torch.equal(torch.rand(3), expected)
        assert j.score(image_files[0]).raw["quality"]["answers"] == first


def test_bad_sampling_settings_are_refused_at_construction():
    # top_k=-1 passed construction and then failed every item of every call in torch.topk ("model
    # failed: selected index k out of range"); a NaN temperature read as greedy (NaN > 0 is False),
    # so num_samples=3 failed every item in generate(). Both are config errors, named as such.
    with pytest.raises(ValueError, match="top_k: must be >= 0"):
        JudgeSettings(model_name="m", mode="generate", temperature=0.7, top_k=-1)
    for t in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match="temperature: must be a finite number >= 0"):
            JudgeSettings(model_name="m", mode="generate", temperature=t, num_samples=3)
    with pytest.raises(TypeError, match="top_k"):
        JudgeSettings.from_params({"model_name": "m", "top_k": 2.5})
    JudgeSettings(model_name="m", mode="generate", temperature=0.7, top_k=0)  # 0: no top-k cut, as generate()


def test_top_k_zero_samples_without_a_top_k_cut(tiny_cache, image_files):
    base = dict(model_name="tiny:qwen2_vl", mode="generate", max_new_tokens=4, temperature=1.0, top_k=0, batch_size=2)
    with QwenVLRewardModel(**base) as fast, QwenVLRewardModel(fast_decode=False, **base) as plain:
        assert fast.engine._decode_plan.top_k == 0
        a = [(r.raw, r.error_kind) for r in fast.batch_score(image_files[:3])]
        b = [(r.raw, r.error_kind) for r in plain.batch_score(image_files[:3])]
    assert a == b and all(kind in (None, "parse") for _, kind in a)


def test_sampling_under_a_checkpoints_top_k_of_one_is_warned_about(tiny_cache, tmp_path, caplog, image_files):
    # Qwen2.5-VL's generation_config ships top_k 1, which generate() merges when top_k is unset:
    # every sample is then the greedy answer. The load says so once; an explicit top_k does not.
    import json
    import logging
    import shutil

    from src.models.tiny import resolve_model_name

    ckpt = tmp_path / "topk1"
    shutil.copytree(resolve_model_name("tiny:qwen2_vl", cache_dir=tiny_cache), ckpt)
    gc = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**gc, "top_k": 1}))
    base = dict(model_name=str(ckpt), mode="generate", max_new_tokens=4, temperature=1.0, num_samples=3)
    with caplog.at_level(logging.WARNING, logger="src.models.reward.engine"):
        with QwenVLRewardModel(**base) as judge:
            answers = judge.batch_score(image_files[:1])[0].raw["quality"]["answers"]
    warned = [r.getMessage() for r in caplog.records if "samples nothing" in r.getMessage()]
    assert warned == ["temperature 1.0 samples nothing: the checkpoint's generation_config sets top_k 1 and top_k "
                      "is not set, so every answer is the greedy one; set top_k (0: no top-k cut)"]
    assert len(set(answers)) == 1  # what the warning is about: three identical "samples"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="src.models.reward.engine"):
        with QwenVLRewardModel(**{**base, "top_k": 0}):
            pass
    assert not [r for r in caplog.records if "samples nothing" in r.getMessage()]


def test_a_score_off_the_scale_is_clamped_and_the_result_says_so():
    # The trained tiny judge answers on 0..9; asked on 0..5, its 6..9 are clamped to 5 (never
    # dropped, never invented), and the item's metadata notes say what it wrote.
    import json
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "data" / "demo"
    rows = [json.loads(x) for x in (demo / "manifest.jsonl").read_text().splitlines() if x.strip()]
    items = [ScoreItem(id=r["id"], images=[str(demo / r["image"])]) for r in rows]
    text = ("Rate the overall visual quality of this image: sharpness, absence of noise, blur and artifacts, natural "
            "colours and plausible content. 0 is very poor, 9 is excellent.")
    with QwenVLRewardModel(model_name="tiny:judge", template="q", templates={"q": {"text": text, "scale": [0, 5]}},
                           mode="generate") as judge:
        results = judge.batch_score(items)
        tpl = judge.engine.rubric.parts[0][1]
        judge.engine.settings = dataclasses.replace(judge.engine.settings, num_samples=3, temperature=1.0)
        (sampled,) = judge.engine._parse_answers(["Score: 12", "Score: 3", "Score: -1"], tpl)
    clamped = [r for r in results if r.metadata.get("notes")]
    assert clamped and any(r.score < 5 and not r.metadata.get("notes") for r in results)
    for r in clamped:
        wrote = json.loads(r.raw["q"])["score"]
        assert wrote > 5 and r.score == 5.0
        assert r.metadata["notes"] == [f"q: the answer's score {wrote} lay outside 0..5; clamped to 5"]
    assert sampled["score"] == (5 + 3 + 0) / 3
    assert sampled["note"] == "2 of the 3 answers' scores lay outside 0..5 (12, -1); clamped"


GENERATE_PATHS = pytest.mark.parametrize("paths", [dict(continuous_batching=True), dict(continuous_batching=False),
                                                   dict(fast_decode=False)], ids=["continuous", "static", "generate()"])


@GENERATE_PATHS
def test_a_score_cut_off_by_the_answer_budget_is_not_read_as_a_shorter_one(tiny_cache, image_files, paths):
    """On a 0..99 scale the judge answers 75. An answer budget of one token cuts it to "7", which
    read as a score of 7 (not what the judge wrote): a number that ends an answer cut off by
    max_new_tokens gives no score where one more digit would read as another score on the scale.
    The same answer ended by the judge is read."""
    pct = {"pct": {"text": "Rate this image from 0 to 99.", "scale": [0, 99]}}
    with QwenVLRewardModel(model_name="tiny:qwen2_vl", mode="generate", template="pct", templates=pct,
                           max_new_tokens=4, batch_size=1, **paths) as j:
        assert j.engine._continuous is (paths == dict(continuous_batching=True))
        steer(j, {None: {"7": 1.0}, "7": {"5": 1.0}, "5": {"<eos>": 1.0}})
        cut, whole = j.batch_score([ScoreItem(images=[image_files[0]], id="cut", metadata={"max_new_tokens": 1}),
                                    ScoreItem(images=[image_files[0]], id="whole")])
    assert whole.raw["pct"] == "75" and whole.score == 75.0 and whole.error is None
    assert cut.raw["pct"] == "7" and cut.score is None and cut.error_kind == "parse"
    assert "'cut'" in cut.error and "cut off by max_new_tokens" in cut.error, cut.error


@GENERATE_PATHS
def test_a_score_cut_off_inside_a_decimal_is_not_read_as_its_whole_part(tiny_cache, image_files, paths):
    """The judge answers 7.5 on 0..9. Cut off by the answer budget after "7" or after "7.", it read
    7: a decimal part, like one more digit, would read as another score on the scale, so no score
    is given. The whole answer reads 7.5, and an answer "7" that the judge itself ended reads 7."""
    with QwenVLRewardModel(model_name="tiny:qwen2_vl", mode="generate", template="quality", max_new_tokens=4,
                           batch_size=2, **paths) as j:
        steer(j, {None: {"7": 1.0}, "7": {"<eos>": 1.0}})
        ended, = j.batch_score([ScoreItem(images=[image_files[3]], id="ended", metadata={"max_new_tokens": 2})])
        steer(j, {None: {"7": 1.0}, "7": {".": 1.0}, ".": {"5": 1.0}, "5": {"<eos>": 1.0}})  # every row of the above too
        items = [ScoreItem(images=[image_files[k]], id=f"cut{n}", metadata={"max_new_tokens": n}) for k, n in ((0, 1), (1, 2))]
        cut7, cut_dot, whole = j.batch_score(items + [ScoreItem(images=[image_files[2]], id="whole")])
    assert (whole.raw["quality"], whole.score, whole.error) == ("7.5", 7.5, None)
    assert (ended.raw["quality"], ended.score, ended.error) == ("7", 7.0, None)
    for r, answer in ((cut7, "7"), (cut_dot, "7.")):
        assert r.raw["quality"] == answer and r.score is None and r.error_kind == "parse", r
        assert r.error.startswith(f"item '{r.id}' (#{r.index}): quality: could not read a score from the answer (the "
                                  "answer was cut off by max_new_tokens right after a number, which may be the start "
                                  f"of a longer score (7 read, but its last number, {answer}, may go on as 7.5, which "
                                  "reads 7.5); raise max_new_tokens)"), r.error


def test_logits_mode_leaves_an_items_answer_budget_alone(tiny_cache, image_files):
    """metadata max_new_tokens is generate mode's answer budget. Logits mode writes no answer, so a
    manifest made for generate mode (a budget over this judge's, or a CSV cell's string) scores there
    as it would without it; generate mode still refuses such a budget for its item alone."""
    budgets = [1000, "64", 0]
    items = [ScoreItem(images=[image_files[i]], id=f"b{i}", metadata={"max_new_tokens": b})
             for i, b in enumerate(budgets)]
    with QwenVLRewardModel(model_name="tiny:qwen2_vl", mode="logits") as j:
        scored = j.batch_score(items)
    assert all(r.error is None and r.score is not None for r in scored), [r.error for r in scored]
    with QwenVLRewardModel(model_name="tiny:qwen2_vl", mode="generate", max_new_tokens=4) as j:
        refused = j.batch_score(items)
    for r, b in zip(refused, budgets):
        assert r.score is None and r.error_kind == "input"
        assert r.error == f"item '{r.id}' (#{r.index}): metadata max_new_tokens must be a whole number in 1..4 " \
                          f"(the judge's max_new_tokens), got {b!r}"


@pytest.mark.parametrize("paths", [dict(continuous_batching=True), dict(continuous_batching=False)],
                         ids=["continuous", "static"])
def test_an_answer_budget_past_the_judges_context_is_refused_up_front(short_context_judge, image_files, paths):
    """A prompt that fits the judge's context, with an answer budget (max_new_tokens) that runs
    past it, ran: the answer's last tokens came from positions the judge was never trained on.
    It fails up front, never with a budget quietly cut (which would score that item under other
    terms than its neighbours), and the error gives the largest budget that fits, which then runs;
    one token more does not."""
    from conftest import SHORT_CONTEXT

    def item(id, budget=None):
        return ScoreItem(images=[image_files[0]], instruction="a red square", id=id,
                         metadata={"max_new_tokens": budget} if budget else {})

    base = dict(model_name=short_context_judge, mode="generate", template="alignment", max_new_tokens=100,
                batch_size=2, **paths)
    with QwenVLRewardModel(**base) as j:
        assert j.engine._continuous is paths["continuous_batching"]
        cat = ScoreItem(images=[image_files[1]], instruction="a cat", id="other", metadata={"max_new_tokens": 8})
        full, small, other = j.batch_score([item("full"), item("small", 8), cat])
        m = re.fullmatch(r"item 'full' \(#0\): the prompt is (\d+) tokens \(text and image tokens\) and its answer "
                         rf"budget 100 \(max_new_tokens\): (\d+), over the judge's context of {SHORT_CONTEXT} tokens "
                         r"\(its language model's max_position_embeddings: it was never trained on later positions\); "
                         r"lower max_new_tokens \(for this item alone: metadata max_new_tokens up to (\d+)\), or give "
                         r"the prompt fewer tokens: smaller images \(lower max_pixels, the size images are resized to\) "
                         r"or a shorter instruction", full.error or "")
        assert full.score is None and full.error_kind == "prompt_too_long" and m, full.error
        n, fits = int(m.group(1)), int(m.group(3))
        assert int(m.group(2)) == n + 100 and fits == SHORT_CONTEXT - n and 0 < fits < 100
        edge = j.batch_score([item("fits", fits), item("over", fits + 1)])
        alone = [j.batch_score([x])[0] for x in (item("small", 8), cat)]
    for r, ref in zip((small, other), alone):  # its neighbours: the answers they write alone
        assert r.error_kind == "parse" and r.raw == ref.raw
    assert edge[0].error_kind == "parse" and edge[0].raw["alignment"], edge[0].error  # ran: junk, no score
    assert edge[1].error_kind == "prompt_too_long" and f"metadata max_new_tokens up to {fits})" in edge[1].error
