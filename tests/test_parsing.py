"""parse_score on answers in the styles real judges write, and its invariants on random text."""
from __future__ import annotations

import math
import random

import pytest

from src.models.reward.parsing import METHODS, ParsedScore, parse_score

QALIGN = {"excellent": 5, "good": 4, "fair": 3, "poor": 2, "bad": 1}

# (id, answer, parse_score kwargs, score, method, a word the error must contain)
# A row with score None asserts the error; a row with a score asserts there is none.
CASES = [
    # -- JSON: VIEScore and friends --
    ("viescore_list_min",
     '{\n"score" : [6, 8],\n"reasoning" : "The dog was turned into a cat as asked, but the '
     'background was also repainted."\n}', {}, 6, "json", None),
    ("viescore_fenced",
     'Here is my evaluation:\n```json\n{\n  "score": [9, 7],\n  "reasoning": "Sharp details, '
     'slight halo around the subject."\n}\n```', {}, 7, "json", None),
    ("fenced_json_reasoning_first",
     '```json\n{"reasoning": "The image is well lit and sharp; 2 minor artifacts.", "score": 8}\n```',
     {}, 8, "json", None),
    ("json_then_chatter",
     '{"score": 7, "reasoning": "Good alignment with the prompt."}\nI hope this helps! Let me '
     'know if you need 2 more evaluations.', {}, 7, "json", None),
    ("json_single_quotes_trailing_comma_true",
     "{'score': 6, 'reasoning': 'ok', 'is_edited': True,}", {}, 6, "json", None),
    ("json_nested_scores_overall",
     '{"scores": {"alignment": 6, "overall": 7}, "comment": "fine"}', {}, 7, "json", None),
    ("json_numeric_string_fraction", '{"rating": "8/10", "why": "crisp"}', {}, 8, "json", None),
    ("json_last_object_wins",
     'Initial assessment: {"score": 5}\nAfter re-examining the hands, which have 6 fingers: '
     '{"score": 4}', {}, 4, "json", None),
    ("json_key_given",
     '{"semantic_consistency": 6, "perceptual_quality": 9}', {"key": "perceptual_quality"},
     9, "json", None),
    ("json_capital_keys", '{"Reasoning": "The colours are vivid.", "Score": 9}', {}, 9, "json", None),
    ("json_decimal_overall_score", '{"overall_score": 7.25}', {}, 7.25, "json", None),
    ("json_raw_newline_in_string",
     '{"reasoning": "Line one.\nLine two mentions 3 birds.", "score": 5}', {}, 5, "json", None),
    ("json_true_null_lowercase", "{'score': 3, 'flag': true, 'note': null}", {}, 3, "json", None),
    ("json_level_word_value", '{"rating": "Fair"}', {"levels": QALIGN}, 3, "json", None),
    ("json_score_value_object", '{"score": {"value": 7, "max": 10}}', {}, 7, "json", None),
    ("json_bool_is_not_a_score", '{"score": true}', {}, None, None, "not a score"),
    ("json_nan", '{"score": NaN}', {}, None, None, "finite"),
    ("json_na_string", '{"score": "N/A", "reasoning": "image failed to load"}', {}, None, None, "N/A"),
    ("json_truncated", '{"score": ', {}, None, None, "truncated"),
    ("json_truncated_list", '{"score": [6, ', {}, None, None, "truncated"),
    # -- reasoning blocks --
    ("think_decoy_then_label",
     "<think>A first draft might be Score: 3, since 2 of the 5 objects are missing... but they are "
     "present on a second look.</think>\nScore: 8", {}, 8, "labelled", None),
    ("think_decoy_then_json", '<think>maybe 2/10</think>\n{"score": 9}', {}, 9, "json", None),
    ("r1_answer_tag",
     "<think>Let me check the cat: 4 legs, 2 ears, 1 tail. The fur is natural.</think>\n"
     "<answer>7</answer>", {}, 7, "answer_tag", None),
    ("answer_tag_json", '<answer>{"score": 6.5}</answer>', {}, 6.5, "answer_tag", None),
    ("answer_tag_fraction", "<think>hmm, 3 or 4?</think><answer>7/10</answer>", {}, 7, "answer_tag", None),
    ("answer_tag_labelled", "<answer>Score: 9</answer>", {}, 9, "answer_tag", None),
    ("think_unclosed_truncated",
     "<think>The image shows 3 cats. Score: 6 seems right but the tail", {}, None, None, "never closed"),
    ("think_only", "<think>Score: 6</think>", {}, None, None, "only <think> reasoning"),
    ("qwen3_lone_close_tag",
     "The object count is 4, so alignment holds. Score: 2 for style?\n</think>\n\nScore: 9",
     {}, 9, "labelled", None),
    ("think_unclosed_with_answer_tag",
     "<think>Comparing 3 and 5 ... the edit is clean\n<answer>8</answer>", {}, 8, "answer_tag", None),
    ("think_decoy_prose_after",
     "<think>Score: 9</think>\nThe image looks great.", {}, None, None, "<think>"),
    # -- \boxed --
    ("boxed_math_style",
     "Alignment contributes 4 points and aesthetics 3 points, so the total is \\(4 + 3 = 7\\).\n"
     "Therefore the final score is \\boxed{7}.", {}, 7, "boxed", None),
    ("boxed_last_wins", "First guess \\boxed{5}. On reflection the hands are fine: \\boxed{8}",
     {}, 8, "boxed", None),
    ("boxed_frac", "The score is $\\boxed{\\frac{7}{10}}$", {}, 7, "boxed", None),
    # -- labelled lines --
    ("markdown_bold_fraction",
     "**Score:** 7/10\n\n**Reasoning:** The image matches the prompt; 1 hand is malformed.",
     {}, 7, "labelled", None),
    ("rating_out_of", "Rating: 9 out of 10", {}, 9, "labelled", None),
    ("overall_rating_with_numbers_after",
     "Overall rating: 7 out of 10. The lighting is natural and 2 subjects are in focus.",
     {}, 7, "labelled", None),
    ("final_score_decimal_fraction", "Final score: 8.5/10", {}, 8.5, "labelled", None),
    ("rating_dash", "Rating - 6", {}, 6, "labelled", None),
    ("score_equals", "score = 4", {}, 4, "labelled", None),
    ("last_label_wins",
     "Score: 5\nThe composition is balanced.\nAfter reconsidering the artifacts on the left hand:\n"
     "Score: 4", {}, 4, "labelled", None),
    ("subscores_then_overall",
     "Semantic consistency score: 6\nPerceptual quality score: 9\nOverall score: 7",
     {}, 7, "labelled", None),
    ("overall_outranks_later_breakdown",
     "Overall score: 7\n\nBreakdown:\n- Alignment score: 8\n- Quality score: 6", {}, 7, "labelled", None),
    ("label_with_scale_qualifier", "Score (0-10): 7", {}, 7, "labelled", None),
    ("label_is", "The score is 6.", {}, 6, "labelled", None),
    ("label_score_of", "I give it a score of 7 out of 10.", {}, 7, "labelled", None),
    ("label_percent", "Score: 85%", {}, 8.5, "labelled", None),
    ("label_key_given", "Alignment: 3\nPerceptual quality: 8\nScore: 5",
     {"key": "perceptual_quality"}, 8, "labelled", None),
    ("label_range", "Score: 7-8", {}, None, None, "range"),
    ("label_inf", "Score: 1e999", {}, None, None, "finite"),
    ("chinese_pingfen", "图像质量较好，细节清晰。\n评分：8", {}, 8, "labelled", None),
    ("chinese_fenshu_fraction", "分数: 7/10", {}, 7, "labelled", None),
    ("chinese_zonghe_wei", "综合评分为9分。构图有3处小问题。", {}, 9, "labelled", None),
    ("negative_on_signed_scale", "Score: -2", {"lo": -5, "hi": 5}, -2, "labelled", None),
    ("fraction_on_1_to_5_scale", "Score: 4/5", {"lo": 1, "hi": 5}, 4, "labelled", None),
    ("fraction_over_range", "Score: 11/10", {}, 10, "labelled", None),
    # -- fractions in prose --
    ("prose_fraction", "Overall I'd give it 7/10 because the composition is strong.", {}, 7, "fraction", None),
    ("prose_out_of", "8 out of 10 — crisp details and a believable sky.", {}, 8, "fraction", None),
    ("prose_fraction_rescaled", "I'd rate it 4/5.", {}, 8, "fraction", None),
    ("prose_fraction_repeated", "7/10. Again: 7/10.", {}, 7, "fraction", None),
    ("prose_half_is_not_a_scale", "About 1/2 of the frame is sky; I'd give it 6/10", {}, 6, "fraction", None),
    ("prose_two_fractions", "The left half deserves 6/10 but the right half 8/10.", {}, None, None, "ambiguous"),
    ("prose_date_is_not_a_score", "Generated on 2024/05/01 with many details.", {}, None, None, "ambiguous"),
    # -- bare numbers --
    ("bare_7", "7", {}, 7, "bare_number", None),
    ("bare_7_full_stop", "7.", {}, 7, "bare_number", None),
    ("bare_quoted", '"8"', {}, 8, "bare_number", None),
    ("bare_bold_decimal", "**7.5**", {}, 7.5, "bare_number", None),
    ("bare_chinese_unit", "8分", {}, 8, "bare_number", None),
    ("bare_out_of_range_clamped", "12", {}, 10, "bare_number", None),
    ("bare_negative_clamped", "-3", {}, 0, "bare_number", None),
    # -- level words (Q-Align style) --
    ("level_word_alone", "excellent", {"levels": QALIGN}, 5, "level_word", None),
    ("level_word_sentence", "The quality of the image is good.", {"levels": QALIGN}, 4, "level_word", None),
    ("level_words_conflict", "The composition is good but the lighting is poor.", {"levels": QALIGN},
     None, None, "ambiguous"),
    ("level_word_negated", "The image is not good.", {"levels": QALIGN}, None, None, "negated"),
    ("level_word_without_levels", "excellent", {}, None, None, "no score"),
    # -- no score at all --
    ("refusal", "I'm sorry, but I cannot evaluate this image.", {}, None, None, "no score"),
    ("empty_string", "", {}, None, None, "empty"),
    ("none", None, {}, None, None, "empty"),
    ("whitespace", "  \n\t ", {}, None, None, "empty"),
    ("garbage_unicode", "\u200b\ufffd\ufffd 🙃 ☃︎ ⍼ \x00", {}, None, None, "no score"),
    ("two_unlabelled_numbers", "The image has 3 cats and 2 dogs.", {}, None, None, "ambiguous"),
    ("one_unlabelled_number", "There are 3 cats in the image.", {}, None, None, "unlabelled"),
    ("leading_number_then_prose", "8\nThe edit removed the 2 people as asked.", {}, None, None, "ambiguous"),
    # -- a label followed by more than one number: no part of it is taken as the score --
    ("labelled_decimal_comma", "Score: 7,5", {}, None, None, "ambiguous"),
    ("labelled_thousands", "Score: 1,000", {}, None, None, "ambiguous"),
    ("labelled_hex", "Score: 0x10", {}, None, None, "no score"),
    ("labelled_vulgar_fraction", "Rating: 7½", {}, None, None, "no score"),
    ("labelled_then_comma_prose", "Score: 7, the colours are off.", {}, 7, "labelled", None),
]


@pytest.mark.parametrize("answer,kwargs,score,method,error_word", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_judge_answers(answer, kwargs, score, method, error_word):
    got = parse_score(answer, **kwargs)
    assert isinstance(got, ParsedScore)
    if score is None:
        assert got.score is None and got.method is None, got
        assert got.error and error_word.lower() in got.error.lower(), got.error
    else:
        assert got.error is None, got.error
        assert got.method == method
        assert got.score == pytest.approx(score)


def test_table_covers_enough_answers_and_every_method():
    assert len(CASES) >= 45
    assert len({c[0] for c in CASES}) == len(CASES)
    assert {c[4] for c in CASES if c[4]} == set(METHODS)


def test_clamping_is_reported():
    high = parse_score("12")
    assert (high.score, high.clamped, high.raw_value) == (10, True, 12)
    low = parse_score("-3")
    assert (low.score, low.clamped, low.raw_value) == (0, True, -3)
    inside = parse_score("Score: 7")
    assert (inside.score, inside.clamped, inside.raw_value) == (7, False, 7)


def test_fraction_rescaling_keeps_the_value_before_clamping():
    got = parse_score("Score: 85/100")
    assert got.score == pytest.approx(8.5) and got.raw_value == pytest.approx(8.5) and not got.clamped


def test_ambiguous_error_names_the_numbers():
    got = parse_score("The image has 3 cats and 2 dogs.")
    assert "3" in got.error and "2" in got.error


def test_bad_scale_raises():
    with pytest.raises(ValueError):
        parse_score("7", lo=10, hi=0)
    with pytest.raises(ValueError):
        parse_score("7", lo=0, hi=float("inf"))


# -- properties --------------------------------------------------------------------------------

@pytest.mark.parametrize("lo,hi", [(0, 10), (1, 5), (0, 1), (-5, 5), (0, 100)])
def test_labelled_value_in_range_round_trips(lo, hi):
    rng = random.Random(f"{lo}-{hi}")
    values = [lo, hi, (lo + hi) / 2] + [rng.uniform(lo, hi) for _ in range(300)]
    values += [round(v, 2) for v in values[:50]] + [1e-5 * hi, 3e-7]
    for v in values:
        if not lo <= v <= hi:
            continue
        for text in (f"Score: {v}", f"**Score:** {v!r}", f'{{"score": {v}}}'):
            got = parse_score(text, lo=lo, hi=hi)
            assert got.score == v and not got.clamped, (text, got)


_PIECES = ["Score:", "score =", "Rating -", "评分：", "7", "-3", "12", "1e999", "4/5", "85%", "8 out of 10",
           "{", "}", '"score":', "[6, 8]", "'", '"', "<think>", "</think>", "<answer>", "</answer>",
           "\\boxed{", "good", "not", "poor", "cats", "and", "\n", " ", ".", "**", "NaN", "0.5", "100/100",
           "2024/05/01", "🙃", "\u200b", "```json", "```", "True", "null", ","]


@pytest.mark.parametrize("lo,hi", [(0, 10), (1, 5), (-5, 5), (0, 0)])
def test_random_answers_keep_the_invariants(lo, hi):
    rng = random.Random(f"fuzz-{lo}-{hi}")
    for _ in range(3000):
        text = " ".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 12)))
        got = parse_score(text, lo=lo, hi=hi, levels=QALIGN if rng.random() < 0.5 else None)
        if got.score is None:
            assert got.method is None and got.error and not got.clamped, (text, got)
        else:
            assert got.error is None and got.method in METHODS, (text, got)
            assert math.isfinite(got.score) and lo <= got.score <= hi, (text, got)
            assert math.isfinite(got.raw_value), (text, got)
            assert got.clamped == (got.raw_value != got.score), (text, got)


# -- bounded work: pathological answers are parse failures of their item, never an exception ----

PATHOLOGICAL = [
    ("list_990_deep_in_object", '{"score": 7, "a": ' + "[" * 990 + "]" * 990 + "}"),
    ("object_1000_deep", '{"a":' * 1000 + "7" + "}" * 1000),
    ("brace_soup_5000", "{" * 5000 + "}" * 5000),
    ("unclosed_objects", '{"a": ' * 30000),
    ("unclosed_boxed", "\\boxed{" * 25000),
    ("unclosed_think", "<think>" * 25000 + " Score: 7"),
    ("many_small_objects", "{x} " * 40000),
    ("markdown_run_after_label", "Score" + "*" * 100000 + "7"),
    ("level_words", "good " * 30000),
    ("bare_brackets", "[" * 100000 + "]" * 100000),
    ("too_long", "x" * 300000 + " Score: 7"),
]


@pytest.mark.timeout(60)  # a hang guard for the whole table, not a speed check
def test_pathological_answers_are_read_or_refused_without_raising():
    for name, answer in PATHOLOGICAL:
        r = parse_score(answer, 0, 10, levels={"good": 4, "bad": 1})
        assert isinstance(r, ParsedScore), name
        assert (r.score is None) == (r.error is not None), name
    deep = parse_score('{"a":' * 1000 + "7" + "}" * 1000, 0, 10)
    assert deep.score is None and "nested more than 32 levels" in deep.error
    long = parse_score("x" * 300000 + " Score: 7", 0, 10)
    assert long.score is None and "over the parser's limit" in long.error
    # a judge's answer with a short JSON object still reads normally after the long tail rules
    assert parse_score('{"score": 7, "a": [[1, 2], [3]]}', 0, 10).score == 7


@pytest.mark.parametrize("kwargs", [
    {"lo": None, "hi": 10}, {"lo": "a", "hi": 10}, {"lo": 0, "hi": float("nan")}, {"lo": 5, "hi": 1},
    {"lo": 0, "hi": 10, "levels": {"good": None}}, {"lo": 0, "hi": 10, "levels": ["good"]},
    {"lo": 0, "hi": 10, "key": 3}, {"lo": 0, "hi": 10, "key": "  "},
])
def test_a_bad_scale_raises_only_value_error(kwargs):
    with pytest.raises(ValueError, match="parse_score"):
        parse_score("Score: 7", **kwargs)


# An answer cut off by the answer budget (max_new_tokens; a served judge's finish_reason "length"),
# read through scoring.read_answers as the engine and the OpenAI-compatible judge read it:
# (answer, scale, score or None when the number it ends with may be the start of another score).
CUT_ANSWERS = [
    ("Score: 7", (0, 9), None),           # 7.5 was coming?
    ("Score: 7.", (0, 9), None),          # 7.5
    ("Score: 7.2", (0, 9), None),         # 7.25
    ("7", (0, 9), None),
    ("Score: 1", (0, 10), None),          # 10: one more digit
    ("Score: 9", (0, 9), 9.0),            # 9.5 and 90 lie off the scale: clamped to 9 either way
    ("Score: 10", (0, 10), 10.0),
    ('{"score": 7}', (0, 9), 7.0),        # the number is closed
    ("Score: 7. Sharp, well lit.", (0, 9), 7.0),
    ("The score is 7 out of 10.", (0, 10), 7.0),  # a denominator has no decimal part: not cut from 10.5
    ("The score is 7 out of 10", (0, 10), None),  # but may go on as 100 (0.7 on this scale)
    ("Score: 7 out of", (0, 9), None),    # cut before the denominator: out of 10, 6.3
    ("Score: 7/", (0, 9), None),
    ("Score: 7 out of", (0, 10), 7.0),    # out of 10 is this scale: 7 either way
]


@pytest.mark.parametrize("answer,scale,score", CUT_ANSWERS)
def test_a_cut_off_answer_gives_no_score_where_its_last_number_may_go_on(answer, scale, score):
    from src.models.reward.scoring import read_answers
    from src.models.reward.templates import Template

    tpl = Template(name="t", text="Rate it.", scale=scale)
    cut = read_answers([answer], tpl, [True])
    assert cut["score"] == score, cut
    if score is None:
        why = "before the denominator of a fraction" if answer.rstrip().endswith(("of", "/")) else "right after a number"
        assert cut["kind"] == "parse" and f"cut off by max_new_tokens {why}" in cut["error"], cut
    ended = read_answers([answer], tpl, [False])  # the same answer, ended by the judge
    assert ended["score"] == parse_score(answer, *scale).score and ended["score"] is not None, ended
