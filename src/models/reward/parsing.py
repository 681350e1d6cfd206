"""Reading the score out of a judge's written answer (generate mode).

The one promise: a score is never guessed. Popular benchmarks substitute `random.randint(0, 10)`
when they cannot read an answer; `parse_score` instead returns `score=None` with the reason, and
the caller keeps the raw answer next to it.

Rules, in priority order; the first that yields a score wins:

0. Reasoning is dropped before anything else. `<think>...</think>` (or `<thinking>`) blocks are
   removed. A lone `</think>` (Qwen3 chat templates put the opening tag in the prompt) means
   everything before it was reasoning. An unclosed `<think>` means everything after it is
   reasoning (usually a generation cut off by max_new_tokens): it is not searched, except that an
   `<answer>` tag inside it counts (models that forget `</think>` still mark their answer). An
   answer that is nothing but reasoning has no score.
1. `answer_tag`: the last `<answer>...</answer>` (an unclosed one runs to the end), its inside read
   with rules 2-7.
2. `boxed`: the last `\\boxed{...}` holding a number, `7/10`, `\\frac{7}{10}` or a level word.
3. `json`: ```json fences or bare `{...}` objects anywhere (single quotes, trailing commas and
   Python True/None tolerated). The score is looked up by `key`, else by the first of
   `COMMON_KEYS` present (case-insensitive, spaces and hyphens read as `_`), at the top level
   first and then in nested objects (`{"scores": {"overall": 7}}`). A value may be a number, a
   numeric string (`"8"`, `"8/10"`), a level word, or a list of numbers: a list gives its MIN,
   as VIEScore does (`{"score": [6, 8]}` holds the sub-scores of one criterion and the weakest
   decides). When several objects hold a score, the last one wins (judges restate).
4. `labelled`: `Score: 7`, `**Final score:** 8.5/10`, `Rating - 6`, `score = 4`,
   `Overall rating: 7 out of 10`, `The score is 6`, `评分：8`, `综合评分为9分`. A label naming the
   final verdict (final / overall / total, 总分, 综合评分, 最终评分) outranks plain ones, so
   `Overall score: 7` followed by a breakdown of sub-scores gives 7; among labels of equal rank
   the last wins. A last label holding a range (`Score: 7-8`) or a number that runs on past what
   could be read (`Score: 7,5`, `Score: 1,000`, `Score: 7½`) gives no score.
5. `fraction`: `7/10`, `8 out of 10` in prose, only when exactly one distinct such score appears,
   and only with a rating-like denominator (the scale's top, 5, 10 or 100), so that `1/2 of the
   frame` or a date is never read as a score.
6. `bare_number`: the whole answer, less whitespace, quotes, markdown and a trailing full stop, is
   one number (`7`, `7.5`, `"8"`, `**7**`, `8分`).
7. `level_word`: only with `levels` (Q-Align style, e.g. {"excellent": 5, ..., "bad": 1}): exactly
   one distinct level word appears, not negated ("not good" gives no score).

Fractions are rescaled to the scale: `n/d` with d equal to `hi` is n; any other d gives
`n / d * hi` (`4/5` on 0-10 is 8; `85/100` is 8.5; `85%` is read as 85/100). Scores are then
clamped to [lo, hi] (`clamped=True`, the value before clamping in `raw_value`). NaN and infinities
are never returned; negative numbers are read as such and clamped when `lo >= 0`.

Bounded work: judges do write long and odd answers, so every rule is linear in the answer's length
or capped: answers over `MAX_ANSWER_CHARS` (after reasoning is dropped) are not read, JSON nested
deeper than `MAX_JSON_DEPTH` is skipped, `\\boxed{}` contents over 2,000 characters are not read,
and at most `MAX_JSON_CANDIDATES` `{...}` snippets are tried. A pathological answer is a parse
failure of its item, fast; never a RecursionError or a stall.
"""
from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["COMMON_KEYS", "MAX_ANSWER_CHARS", "METHODS", "ParsedScore", "parse_score"]

METHODS = ("answer_tag", "boxed", "json", "labelled", "fraction", "bare_number", "level_word")

MAX_ANSWER_CHARS = 200_000  # about 50k tokens of final answer; reasoning is dropped before this applies
MAX_JSON_DEPTH = 32         # nesting of {} and [] in one snippet
MAX_JSON_CANDIDATES = 1000  # `{...}` snippets tried per answer
_MAX_BOXED_CHARS = 2000
_MAX_BOXED = 50             # the last `\\boxed{` occurrences read (the last score wins anyway)
_MAX_JSON_CHARS = 20_000    # one `{...}` snippet
_JSON_SCAN_BUDGET = 2_000_000  # characters scanned for JSON snippets per answer, in all

# JSON keys tried, in this order, when the caller names no `key`.
COMMON_KEYS = ("score", "overall", "overall_score", "overall_rating", "rating", "final_score",
               "final_rating", "total_score", "scores")


@dataclass(frozen=True)
class ParsedScore:
    """What `parse_score` read.

    score: the score clamped to [lo, hi], or None.
    method: which rule found it (one of `METHODS`), or None.
    error: None when a score was found, else a reason for a person to read.
    clamped: True when the value found lay outside [lo, hi].
    raw_value: the value found (after rescaling a fraction), before clamping.
    """

    score: float | None
    method: str | None
    error: str | None
    clamped: bool = False
    raw_value: float | None = None

    @property
    def ok(self) -> bool:
        return self.score is not None


# -- pieces of patterns ------------------------------------------------------------------------

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_UNUM = r"\d+(?:\.\d+)?"
_PER = r"(?:/|out\s+of)"
# Emphasis, quotes and spaces that may surround a label or a value. Possessive (`*+`): what follows
# never starts with one of these characters, and backtracking into two adjacent runs made
# `Score` + 20,000 asterisks take seconds.
_MD = r"[\s*_`\"'“”‘’]*+"
_SEP = r"(?:[:：=]|[-–—](?=\s)|\b(?:is|of|would\s+be)\b|为|是)"
_QUALIFIER = r"(?:[(\[（][^()\[\]（）\n]{0,40}[)\]）])?"  # "Score (0-10): 7"
_VALUE = rf"(?P<num>{_NUM})(?:[*_\s]*+{_PER}[*_\s]*+(?P<den>{_UNUM})|\s*+(?P<pct>%))?"
_LABELS = (r"(?P<top>final|overall|total)[\s_-]*(?:score|rating|grade)"
           r"|score|rating|grade|(?P<top2>overall)"
           r"|(?P<top3>综合|最终|总)?(?:评分|分数|得分|打分)|(?P<top4>总分)")
_RANGE_AFTER = re.compile(r"[ \t]*(?:[-–—~]|to\b)[ \t]*\d")
# What may not follow a labelled value: more of the same number. Without it `Score: 1,000` read 1,
# `Score: 7,5` (a decimal comma) 7, `Score: 0x10` 0 and `Score: 7½` 7: a part of a number taken as
# the score. Such a value gives no score (`Score: 7, good` still gives 7).
_VALUE_END = r"(?![,，]\d|\d|[xX][0-9A-Fa-f]|[½¼¾⅓⅔⅕⅖⅗⅘⅙⅚⅛⅜⅝⅞])"

_THINK_TAG = re.compile(r"<(think|thinking)>", re.I)
_THINK_OPEN = re.compile(r"<think(?:ing)?>", re.I)
_THINK_CLOSE = re.compile(r"</think(?:ing)?>", re.I)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.I | re.S)
_ANSWER_OPEN = re.compile(r"<answer>", re.I)
_BOXED = re.compile(r"\\boxed\s*\{")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_WRAP = re.compile(r"\\(?:text|textbf|mathbf|mathrm|mbox)\s*\{([^{}]*)\}")
_VALUE_STRING = re.compile(
    rf"[\s*_`\"'“”‘’(\[]*(?P<num>{_NUM})(?:\s*{_PER}\s*(?P<den>{_UNUM})|\s*(?P<pct>%))?"
    r"\s*(?:分|points?|pts)?[\s*_`\"'“”‘’)\].,;:!?。！]*", re.I)
_PROSE_FRACTION = re.compile(
    rf"(?<![\d./A-Za-z])(?P<num>{_UNUM})[*_\s]*{_PER}[*_\s]*(?P<den>{_UNUM})(?![\d/]|\.\d)", re.I)
_ANY_NUMBER = re.compile(r"(?<![A-Za-z\d.])\d+(?:\.\d+)?")
_NEGATION = re.compile(r"(?:\bnot|n't|\bnever|\bno|\bhardly|\bbarely|\bneither|\bnor)\s+(?:\w+\s+)?$",
                       re.I)
_NAME = re.compile(r"[A-Za-z_]\w*")
_RATING_DENOMINATORS = (5.0, 10.0, 100.0)


@dataclass(frozen=True)
class _Scale:
    lo: float
    hi: float
    levels: dict[str, float]
    names: tuple[str, ...]       # JSON keys to look up, normalised
    labels: re.Pattern[str]      # the labelled-line pattern


class _Notes(list):
    """Why rules that saw something score-like yielded nothing; becomes the error."""


# -- entry point -------------------------------------------------------------------------------

def parse_score(text: str | None, lo: float = 0, hi: float = 10,
                levels: Mapping[str, float] | None = None, key: str | None = None) -> ParsedScore:
    """Read the score from a judge's answer; never guess one.

    text: the judge's whole answer. lo, hi: the scale; the score is clamped into it.
    levels: level word -> score (Q-Align style), enables the level-word rule and level words as
      JSON/boxed values. key: the JSON key (and the label of labelled lines) holding the score;
      when given, `COMMON_KEYS` and the usual labels are not tried.
    Raises ValueError only for a bad scale or levels; every problem with `text` is a ParsedScore
    with `score=None` and `error` set.
    """
    scale = _make_scale(lo, hi, levels, key)
    if text is None or not str(text).strip():
        return _failure("answer is empty")
    visible, reasoning_note = _drop_reasoning(str(text))
    if not visible.strip():
        return _failure(reasoning_note or "answer is empty")
    if len(visible) > MAX_ANSWER_CHARS:
        return _failure(f"no score read: the answer is {len(visible)} characters (after reasoning), over "
                        f"the parser's limit of {MAX_ANSWER_CHARS}")
    try:
        return _parse_visible(visible, scale, reasoning_note)
    except (RecursionError, MemoryError) as e:  # the rules are bounded; this is a last guard
        return _failure(f"no score read: the answer is too deeply nested to read ({type(e).__name__})")


def _parse_visible(visible: str, scale: _Scale, reasoning_note: str | None) -> ParsedScore:
    notes = _Notes()
    found = _from_answer_tags(visible, scale, notes)
    method = "answer_tag"
    if found is None:
        found, method = _run_rules(visible, scale, notes)
    if found is not None:
        return _success(found, method, scale)
    return _failure(_explain(visible, notes, reasoning_note))


def _make_scale(lo: float, hi: float, levels: Mapping[str, float] | None, key: str | None) -> _Scale:
    try:
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"parse_score: the scale must be two numbers, got lo={lo!r}, hi={hi!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"parse_score: the scale must be finite with lo <= hi, got lo={lo}, hi={hi}")
    norm_levels: dict[str, float] = {}
    if levels is not None and not isinstance(levels, Mapping):
        raise ValueError(f"parse_score: levels must map words to scores, got {type(levels).__name__}")
    for word, value in (levels or {}).items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"parse_score: level {word!r} -> {value!r} is not a number") from None
        if not str(word).strip() or not math.isfinite(value):
            raise ValueError(f"parse_score: level {word!r} -> {value} is not a word with a finite score")
        norm_levels[str(word).strip().lower()] = value
    if key is not None and not isinstance(key, str):
        raise ValueError(f"parse_score: key must be a string, got {type(key).__name__}")
    if key is not None:
        words = [w for w in re.split(r"[\s_-]+", key.strip()) if w]
        if not words:
            raise ValueError(f"parse_score: key {key!r} is empty")
        names = (_norm_key(key),)
        label_re = r"[\s_-]*".join(re.escape(w) for w in words)
    else:
        names, label_re = COMMON_KEYS, _LABELS
    labels = re.compile(rf"(?<![A-Za-z0-9_])(?:{label_re})(?![A-Za-z]){_MD}{_QUALIFIER}{_MD}"
                        rf"(?:{_SEP}{_MD}){{1,2}}{_VALUE}{_VALUE_END}", re.I)
    return _Scale(lo, hi, norm_levels, names, labels)


def _success(value: float, method: str, scale: _Scale) -> ParsedScore:
    score = min(max(value, scale.lo), scale.hi)
    return ParsedScore(score=float(score), method=method, error=None,
                       clamped=score != value, raw_value=float(value))


def _failure(error: str) -> ParsedScore:
    return ParsedScore(score=None, method=None, error=error)


def _run_rules(text: str, scale: _Scale, notes: _Notes) -> tuple[float | None, str | None]:
    for method, rule in (("boxed", _from_boxed), ("json", _from_json), ("labelled", _from_labels),
                         ("fraction", _from_fractions), ("bare_number", _from_bare_number),
                         ("level_word", _from_levels)):
        value = rule(text, scale, notes)
        if value is not None:
            return value, method
    return None, None


def _explain(text: str, notes: list[str], reasoning_note: str | None) -> str:
    notes = list(dict.fromkeys(notes))  # two rules may trip over the same thing
    ambiguous = [n for n in notes if n.startswith("ambiguous")]
    others = [n for n in notes if not n.startswith("ambiguous")]
    if not ambiguous and not others:
        numbers = list(dict.fromkeys(m.group(0) for m in _ANY_NUMBER.finditer(text)))
        if len(numbers) > 1:
            shown = ", ".join(numbers[:5]) + (", ..." if len(numbers) > 5 else "")
            ambiguous.append(f"ambiguous: several different numbers ({shown}) without a label")
        elif numbers:
            others.append(f"the only number ({numbers[0]}) is in unlabelled prose, not taken as a score")
    if reasoning_note:
        others.append(reasoning_note)
    parts = list(ambiguous)
    if others or not parts:
        parts.append("no score found in the answer" + (": " + "; ".join(others) if others else ""))
    return "; ".join(parts)


# -- rule 0: reasoning -------------------------------------------------------------------------

def _drop_reasoning(text: str) -> tuple[str, str | None]:
    """The text that may hold the final answer, and a note when reasoning was dropped."""
    visible = _drop_think_blocks(text)
    dropped = visible != text
    closes = list(_THINK_CLOSE.finditer(visible))
    if closes:
        visible, dropped = visible[closes[-1].end():], True
    opened = _THINK_OPEN.search(visible)
    if opened:
        tail = visible[opened.end():]
        visible = visible[:opened.start()]
        answer = _ANSWER_OPEN.search(tail)
        if answer:
            visible += "\n" + tail[answer.start():]
        elif not visible.strip():
            return "", ("no score found in the answer: <think> is never closed (truncated generation?) "
                        "and no final answer follows the reasoning")
        dropped = True
    if not visible.strip():
        return "", "no score found in the answer: it holds only <think> reasoning and no final answer"
    return visible, ("numbers inside <think> reasoning are not read" if dropped else None)


def _drop_think_blocks(text: str) -> str:
    """Each `<think>...</think>` (or `<thinking>...</thinking>`) block, shortest first, replaced by
    a space: what `re.sub(r"<(think|thinking)>.*?</\\1>", " ", text, flags=re.I | re.S)` does,
    in linear time (that pattern rescans to the end for every unclosed `<think>`)."""
    lower = text.lower()
    out, pos, unclosed = [], 0, set()
    for m in _THINK_TAG.finditer(text):
        name = m.group(1).lower()
        if m.start() < pos or name in unclosed:
            continue
        close = lower.find(f"</{name}>", m.end())
        if close < 0:
            unclosed.add(name)  # no close after this one means none after any later one
            continue
        out += [text[pos:m.start()], " "]
        pos = close + len(name) + 3
    return "".join(out) + text[pos:] if out else text


# -- rule 1: <answer> tags ---------------------------------------------------------------------

def _from_answer_tags(text: str, scale: _Scale, notes: _Notes) -> float | None:
    contents = [m.group(1) for m in _ANSWER.finditer(text) if m.group(1).strip()]
    if not contents:
        return None
    value, _ = _run_rules(contents[-1], scale, notes)
    if value is None:
        notes.append(f"the <answer> tag holds no score ({_clip(contents[-1])!r})")
    return value


# -- rule 2: \boxed{} --------------------------------------------------------------------------

def _from_boxed(text: str, scale: _Scale, notes: _Notes) -> float | None:
    contents = []
    for m in list(_BOXED.finditer(text))[-_MAX_BOXED:]:
        end, _ = _match_closing(text, m.end() - 1, quotes=False, limit=_MAX_BOXED_CHARS)
        if end is not None:
            contents.append(text[m.end():end - 1])
    for content in reversed(contents):
        content = _FRAC.sub(r"(\1)/(\2)", content)
        for _ in range(3):
            content = _LATEX_WRAP.sub(r"\1", content)
        content = re.sub(r"\((\s*[-+.\d]+\s*)\)", r"\1", content.replace("$", "")).replace("\\%", "%")
        value = _value_from_string(content, scale, notes, where="\\boxed{}")
        if value is not None:
            return value
    return None


# -- rule 3: JSON ------------------------------------------------------------------------------

def _from_json(text: str, scale: _Scale, notes: _Notes) -> float | None:
    found = None
    for obj in _json_objects(text, notes):
        value = _lookup(obj, scale, notes)
        if value is not None:
            found = value
    return found


def _json_objects(text: str, notes: _Notes) -> list[dict[str, Any]]:
    """Every outermost `{...}` in `text` that loads as a dict, in order."""
    objects, start, restarts, tried, scanned = [], 0, 0, 0, 0
    while True:
        opening = text.find("{", start)
        if opening < 0:
            return objects
        tried += 1
        if tried > MAX_JSON_CANDIDATES or scanned > _JSON_SCAN_BUDGET:
            notes.append("too many '{' in the answer: the rest is not read as JSON")
            return objects
        end, depth = _match_closing(text, opening, quotes=True, limit=_MAX_JSON_CHARS)
        scanned += (end or min(len(text), opening + _MAX_JSON_CHARS)) - opening
        if end is not None and depth > MAX_JSON_DEPTH:
            notes.append(f"a JSON object nested more than {MAX_JSON_DEPTH} levels deep is not read")
            start = end  # skipped whole: its inner objects are as deep as anyone needs
            continue
        if end is None:
            if re.match(r"\{\s*[\"']", text[opening:]) and not any("never closes" in n for n in notes):
                notes.append("a JSON object opens but never closes (truncated answer?)")
            restarts += 1
            if restarts > 50:  # bound the work on pathological brace soup
                return objects
            start = opening + 1
            continue
        obj = _load_object(text[opening:end])
        if isinstance(obj, dict):
            objects.append(obj)
            start = end
        else:
            start = opening + 1  # not JSON as a whole; an inner object may still be


def _match_closing(text: str, opening: int, quotes: bool,
                   limit: int | None = None) -> tuple[int | None, int]:
    """Index just past the brace closing the one at `opening` (None when it does not close within
    `limit` characters), and the deepest nesting of braces and brackets seen on the way."""
    depth, quote, escaped, last = 0, None, False, "{"
    brackets, deepest = 0, 0
    stop = len(text) if limit is None else min(len(text), opening + limit)
    for i in range(opening, stop):
        c = text[i]
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote, last = None, c
            continue
        if quotes and (c == '"' or (c == "'" and last in "{[,:")):
            quote = c
        elif c == "{":
            depth += 1
            deepest = max(deepest, depth + brackets)
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1, deepest
        elif c == "[":
            brackets += 1
            deepest = max(deepest, depth + brackets)
        elif c == "]" and brackets:
            brackets -= 1
        if not c.isspace():
            last = c
    return None, deepest


def _load_object(snippet: str) -> Any:
    try:
        return json.loads(snippet, strict=False)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(_pythonise(snippet))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _pythonise(snippet: str) -> str:
    """JSON's true/false/null as Python names, outside strings, for ast.literal_eval."""
    out, quote, escaped, i = [], None, False, 0
    words = {"true": "True", "false": "False", "null": "None"}
    while i < len(snippet):
        c = snippet[i]
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        else:
            m = _NAME.match(snippet, i)
            if m:
                out.append(words.get(m.group(0), m.group(0)))
                i = m.end()
                continue
        out.append(c)
        i += 1
    return "".join(out)


def _norm_key(k: str) -> str:
    return re.sub(r"[\s-]+", "_", k.strip().lower())


def _lookup(obj: dict[str, Any], scale: _Scale, notes: _Notes, depth: int = 0) -> float | None:
    if depth > 8:
        return None
    keys = {_norm_key(k): v for k, v in obj.items() if isinstance(k, str)}
    for name in scale.names:
        if name in keys:
            return _json_value(keys[name], name, scale, notes, depth)
    for v in obj.values():
        if isinstance(v, dict):
            value = _lookup(v, scale, notes, depth + 1)
            if value is not None:
                return value
    return None


def _json_value(v: Any, name: str, scale: _Scale, notes: _Notes, depth: int) -> float | None:
    if isinstance(v, bool) or v is None:
        notes.append(f"JSON {name!r} is {v!r}, not a score")
        return None
    if isinstance(v, (int, float)):
        return _finite(float(v), notes)
    if isinstance(v, str):
        return _value_from_string(v, scale, notes, where=f"JSON {name!r}")
    if isinstance(v, dict):  # {"score": {"overall": 7}} or {"score": {"value": 7}}
        inner = {_norm_key(k): x for k, x in v.items() if isinstance(k, str)}
        if "value" in inner and not isinstance(inner["value"], (dict, list)):
            return _json_value(inner["value"], name, scale, notes, depth + 1)
        return _lookup(v, scale, notes, depth + 1)
    if isinstance(v, (list, tuple)):
        values = [_json_value(x, name, scale, notes, depth) if not isinstance(x, (list, dict)) else None
                  for x in v]
        if values and all(x is not None for x in values):
            return min(values)  # VIEScore: the weakest sub-score decides
        notes.append(f"JSON {name!r} is a list that is not all scores ({_clip(repr(v))})")
        return None
    notes.append(f"JSON {name!r} is not a score ({_clip(repr(v))})")
    return None


# -- rule 4: labelled lines --------------------------------------------------------------------

def _from_labels(text: str, scale: _Scale, notes: _Notes) -> float | None:
    matches = list(scale.labels.finditer(text))
    if not matches:
        return None
    top = [m for m in matches if any(m.groupdict().get(g) for g in ("top", "top2", "top3", "top4"))]
    m = (top or matches)[-1]
    if m.group("den") is None and m.group("pct") is None and _RANGE_AFTER.match(text, m.end()):
        range_text = text[m.start("num"):m.end() + 12].split("\n")[0].strip()
        notes.append(f"the labelled score is a range ({range_text!r}), not one score")
        return None
    return _number(m, scale, notes)


# -- rule 5: fractions in prose ----------------------------------------------------------------

def _from_fractions(text: str, scale: _Scale, notes: _Notes) -> float | None:
    allowed = set(_RATING_DENOMINATORS) | ({scale.hi} if scale.hi > 0 else set())
    seen: dict[float, str] = {}
    for m in _PROSE_FRACTION.finditer(text):
        if float(m.group("den")) not in allowed:
            continue
        value = _number(m, scale, notes)
        if value is not None:
            seen.setdefault(round(value, 9), m.group(0))
    if len(seen) > 1:
        shown = ", ".join(re.sub(r"\s+", " ", s) for s in list(seen.values())[:5])
        notes.append(f"ambiguous: several different scores ({shown}) in prose without a label")
        return None
    return next(iter(seen), None)


# -- rule 6: the answer is one number ----------------------------------------------------------

def _from_bare_number(text: str, scale: _Scale, notes: _Notes) -> float | None:
    m = _VALUE_STRING.fullmatch(text)
    if m is None or m.group("den") is not None or m.group("pct") is not None:
        return None  # a lone fraction was rule 5's to take
    return _finite(float(m.group("num")), notes)


# -- rule 7: level words -----------------------------------------------------------------------

def _from_levels(text: str, scale: _Scale, notes: _Notes) -> float | None:
    if not scale.levels:
        return None
    taken = bytearray(len(text))  # characters already read as part of a longer level word
    found: dict[str, float] = {}
    for word in sorted(scale.levels, key=len, reverse=True):  # "very good" before "good"
        for m in re.finditer(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text, re.I):
            if any(taken[m.start():m.end()]):
                continue
            taken[m.start():m.end()] = b"\x01" * (m.end() - m.start())
            if _NEGATION.search(text[max(0, m.start() - 30):m.start()]):
                notes.append(f"the level word {word!r} is negated")
                return None
            found[word] = scale.levels[word]
    if len(set(found.values())) > 1:
        notes.append(f"ambiguous: several different level words ({', '.join(sorted(found))})")
        return None
    return next(iter(found.values()), None)


# -- values ------------------------------------------------------------------------------------

def _value_from_string(s: str, scale: _Scale, notes: _Notes, where: str) -> float | None:
    """A string that is wholly one score: a number, a fraction, a percentage or a level word."""
    m = _VALUE_STRING.fullmatch(s)
    if m:
        return _number(m, scale, notes)
    word = re.sub(r"^[\W_]+|[\W_]+$", "", s).lower()
    if word in scale.levels:
        return scale.levels[word]
    notes.append(f"{where} holds no score ({_clip(s)!r})")
    return None


def _number(m: re.Match[str], scale: _Scale, notes: _Notes) -> float | None:
    """The score a match with groups num, den, pct stands for, rescaled onto the scale."""
    num = _finite(float(m.group("num")), notes)
    if num is None:
        return None
    if m.groupdict().get("pct") is not None:
        den = 100.0
    elif m.groupdict().get("den") is not None:
        den = float(m.group("den"))
    else:
        return num
    if den == scale.hi:
        return num
    if den == 0 or scale.hi <= 0:
        notes.append(f"the fraction {m.group(0).strip()!r} cannot be put on the scale [{scale.lo:g}, {scale.hi:g}]")
        return None
    return _finite(num / den * scale.hi, notes)


def _finite(value: float, notes: _Notes) -> float | None:
    if math.isfinite(value):
        return value
    notes.append(f"the value {value} is not a finite number")
    return None


def _clip(s: str, n: int = 60) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[:n - 3] + "..."
