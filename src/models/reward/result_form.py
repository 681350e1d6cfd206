"""A judge's result in the forms that carry it on: JSON (the job's files, the reward service's
answers) and pickle (the worker channel).

A judge class of the user's (`class_path`) may put anything in a ScoreResult: numpy's numbers, a
NaN, a lock, an object of its own. What a form can write it writes as plain data; what it cannot
fails that item alone, its error naming the item, the field and what is there, and the other items
keep their scores. A result with a score beside an error is a failed item, its score withheld
(`_unscored`): the job's files and the service's answers carry no score for an item that failed.
`result_record` and `strict_json` are the one walk the job's records and the service's answers go
through; `sendable` fails the item whose result a pickled channel (a worker's, a Ray actor's) cannot
carry back, naming the field (`unpicklable`).

Only the standard library and types.py: the worker process imports this module.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import sys
from typing import Any, Callable

from .types import ScoreItem, ScoreResult, carried_metadata, item_name, metadata_problem, with_judge_notes

# How a note names a value JSON cannot hold (the job makes a reused record's notes about its
# metadata again from the row as it is now).
NOT_JSON = ", which JSON cannot hold: written as null"
JSON_LEAVES = (str, int, float, bool, type(None))  # also the keys json writes (as text)


def fields(obj: Any) -> dict[str, Any]:
    """A dataclass instance's fields by name, the values themselves (asdict deep-copies them, and a
    lock, a mappingproxy, an open file or a generator does not copy)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def finite_float(value: Any) -> float | None:
    """`value` as a float where it is a finite real number (numpy's float32 and int64 are); else None
    (a bool, a string, NaN, None, an int past float's range). What a job writes as a score and what
    a report reads as one (src/report/data.py)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except OverflowError:  # 10 ** 400
        return None
    return number if math.isfinite(number) else None


def long_int(value: Any) -> str | None:
    """What an int is that json cannot write, as Python refuses to turn one of more than
    sys.get_int_max_str_digits() digits into text; None for any other value."""
    if not isinstance(value, int):
        return None
    try:
        str(value)
    except ValueError:
        return f"an int of more than {sys.get_int_max_str_digits()} digits"
    return None


def untyped(value: Any) -> Any:
    """A number or an array of numpy's (or torch's: anything with a tolist()) as Python's own;
    anything else as it is."""
    if not isinstance(value, (*JSON_LEAVES, dict, list, tuple)) and callable(getattr(value, "tolist", None)):
        try:
            return value.tolist()
        except Exception:  # then it is what JSON cannot hold, and is said so
            pass
    return value


def as_json(value: Any, path: str, found: list[str], unwritable: Callable[[str, Any, str], Any],
            within: frozenset[int] = frozenset()) -> Any:
    """`value` made of JSON's own values, for every JSON a result is written as.
    - numpy's numbers and arrays (and torch's tensors: anything with a tolist()), which json cannot
      write, become Python numbers and lists (a size-1 array a list of one);
    - a dataclass instance (a judge class's result may hold another's) becomes the dict of its
      fields, as ScoreResult.to_dict writes it;
    - a float that is NaN or +-Infinity, for which JSON has no number, becomes None, and a line
      naming it (`metadata.weight was NaN`) is added to `found`;
    - anything else JSON cannot hold (a set, a Decimal, an object, a lock, a generator, text that is
      not Unicode, an int too long for Python to write as text, a container that holds itself)
      becomes unwritable(its path, it, what it is)."""
    value = untyped(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        found.append(f"{path} was {json.dumps(float(value))}")
        return None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: UTF-8 cannot hold it
            return unwritable(path, value, "text with a lone surrogate, which UTF-8 cannot encode")
        return value
    too_long = long_int(value)
    if too_long:
        return unwritable(path, value, too_long)
    if isinstance(value, JSON_LEAVES):
        return value
    a_dataclass = dataclasses.is_dataclass(value) and not isinstance(value, type)
    if not (a_dataclass or isinstance(value, (dict, list, tuple))):
        return unwritable(path, value, f"a {type(value).__name__}")
    if id(value) in within:
        return unwritable(path, value, f"a {type(value).__name__} that holds itself")
    within = within | {id(value)}
    if a_dataclass:
        value = fields(value)
    if isinstance(value, (list, tuple)):
        return [as_json(v, f"{path}[{i}]", found, unwritable, within) for i, v in enumerate(value)]
    out = {}
    for k, v in value.items():
        key = untyped(k)
        too_long = long_int(key)
        if not isinstance(key, JSON_LEAVES) or isinstance(key, float) and not math.isfinite(key) or too_long:
            # a tuple, NaN, an int that has no text (nor a repr for this error)
            key = unwritable(f"{path} key" if too_long else f"{path} key {k!r}", k, too_long or f"a {type(k).__name__}")
            if not isinstance(key, str):
                continue
        out[key] = as_json(v, f"{path}.{key}", found, unwritable, within)
    return out


def cannot_carry(judge: str, cannot: str, what: str) -> str:
    """The error of an item whose judge returned a result that `cannot` (`the job cannot write`)
    carry on, `what` saying why."""
    return f"{judge} returned a result {cannot}: {what}; the item is failed"


def _shown(value: Any) -> str:
    """A value a judge class returned where it should not have, for an error: its type and the
    start of its repr."""
    try:
        shown = repr(value)
    except Exception:  # a value whose repr fails is named by its type alone
        shown = "?"
    return f"{type(value).__name__} {shown[:100]}"


def error_problem(res: ScoreResult) -> str | None:
    """Why a result's `error` or `error_kind` is not text (or none), or None: a judge class of the
    user's may return any value there."""
    for name in ("error", "error_kind"):
        value = getattr(res, name)
        if value is not None and not isinstance(value, str):
            return f"{name} must be text, got {_shown(value)}"
    return None


def as_result(value: Any, item: ScoreItem, index: int, judge: str) -> ScoreResult:
    """`value`, what `judge` returned for `item` (at `index` of the caller's call), where it is a
    ScoreResult; else, as a judge class of the user's may return a dict, a number or None in its
    list, that item's failure (`model`) saying what came. The other items keep their results."""
    if isinstance(value, ScoreResult):
        return value
    return ScoreResult.failure(index, item, f"item {item_name(item, index)}: {judge} returned {_shown(value)} for "
                                            "it, not a ScoreResult; the item is failed", "model")


def _as_numbers(res: ScoreResult, judge: str, cannot: str,
                more: Callable[[ScoreResult], str | None] | None) -> tuple[ScoreResult, str | None]:
    """`res` with its score and sub-scores as floats (numpy's float32 or int64, an int: numbers that
    JSON cannot write, or writes as another type), and None; or `res` and why its item fails:
    - sub_scores that is no dict of names (text) to numbers; None is none. A list, a string,
      another mapping; a name that is a number or None (a summary cannot sort it beside text).
    - a score or sub-score that is not a finite number (NaN or inf, which JSON has no number for;
      a string, a bool, an int past float's range, an array of one element): no score. A 0-d array
      or tensor (`probs @ levels`) is read as the number it holds, as as_json reads one elsewhere
      (untyped).
    - what `more(res)` says, once they are floats (a carrier's own rule).
    A score out of the judge's scale is passed on as it came: a class of the user's has a scale of
    its own."""
    subs = res.sub_scores
    if subs is not None and not isinstance(subs, dict):
        return res, cannot_carry(judge, cannot, "sub_scores must be a dict of sub-score names (text) to numbers, "
                                                f"got {type(subs).__name__}")
    names = [k for k in subs or {} if not isinstance(k, str)]
    if names:
        return res, cannot_carry(judge, cannot, "sub_scores must be a dict of sub-score names (text) to numbers, "
                                                f"got the name {names[0]!r}")
    # A 0-d numpy array or torch tensor as the number it holds; a 1-d one, of one element too, stays
    # a list, which is no number. An error shows the value as the judge returned it.
    score, numbers = untyped(res.score), {k: untyped(v) for k, v in (subs or {}).items()}
    parts = [("score", res.score, score), *((f"sub-score {k!r}", v, numbers[k]) for k, v in (subs or {}).items())]
    bad = [f"{name} {long_int(n) or repr(v)}" for name, v, n in parts if n is not None and finite_float(n) is None]
    if bad:
        return res, f"{judge} returned {', '.join(bad)}: not a finite number, so no score"
    res = dataclasses.replace(res, score=finite_float(score),
                              sub_scores=None if subs is None else {k: finite_float(n) for k, n in numbers.items()})
    return res, more(res) if more is not None else None


def _checked(res: ScoreResult, item: ScoreItem | None, judge: str, cannot: str,
             more: Callable[[ScoreResult], str | None] | None = None) -> tuple[ScoreResult, list[str]]:
    """`res` as a JSON form can carry it, and why its item fails ([] for nothing), each reason
    naming `judge` and what `cannot` (`the job cannot write`) do: its score or sub-scores no
    numbers (_as_numbers; `more`, the carrier's own rule on them), its metadata no dict (then the
    item's own, `item`'s), its error or error_kind no text (then none, the reason says it).
    A value inside that JSON cannot hold is strict_json's to find."""
    res, wrong_scores = _as_numbers(res, judge, cannot, more)
    wrong = None if res.metadata is None else metadata_problem(res.metadata)
    if wrong:  # the item's own metadata instead; the judge's is no dict to carry
        res = dataclasses.replace(res, metadata=carried_metadata(item))
    wrong_error = error_problem(res)
    if wrong_error:  # named in the item's error instead (fail_record)
        res = dataclasses.replace(res, error=None, error_kind=None)
    whys = (wrong_scores, wrong and cannot_carry(judge, cannot, wrong),
            wrong_error and cannot_carry(judge, cannot, wrong_error))
    return res, [why for why in whys if why]


def fail_record(rec: dict[str, Any], name: str, why: str, unheld: Callable[[str], bool] = lambda k: False) -> None:
    """Fail the record `rec` of item `name` (`'a' (#3)`) for a result its judge should not have
    returned (`why`): no score, no sub-score (null under each name the judge gave as text, less
    those the carrier cannot hold even so: `unheld(name)`), error_kind `model`; the error names the
    item, after any error it had."""
    subs = rec.get("sub_scores")
    subs = {k: None for k in subs if isinstance(k, str) and not unheld(k)} if isinstance(subs, dict) else {}
    rec.update(score=None, sub_scores=subs, error_kind="model", error=_with_cause(rec, name, why))


def _unscored(rec: dict[str, Any], name: str, judge: str, withheld: str) -> None:
    """The record `rec` of item `name` whose result holds a score and an error (from a judge class
    of the user's) as a failed item's: an item with an error is failed (a job's summary counts it
    so, and a resumed job scores it again), and a failed item has no score, so none is carried on;
    the error says what it was, and that it is `withheld` (`not written`). What the judge said
    stands: its error, its error_kind (none: counted as `unknown`, as any failure without one) and
    its sub-scores, but for a `score` sub-score, which is the score."""
    lead = f"{judge} also returned" if rec["error"] else f"{judge} returned an empty error, and"
    why = f"{lead} a score, {rec['score']!r}, which is {withheld} because the item failed"
    subs = rec.get("sub_scores")
    if isinstance(subs, dict) and "score" in subs:
        subs = {**subs, "score": None}
    rec.update(score=None, sub_scores=subs, error=_with_cause(rec, name, why))


def _with_cause(rec: dict[str, Any], name: str, why: str) -> str:
    """The error of the record `rec` of item `name` that a carrier fails (`why`): after the error it
    had already, or naming the item where it had none."""
    return f"{rec['error']}; {why}" if rec.get("error") else f"item {name}: {why}"


def result_record(res: ScoreResult, item: ScoreItem | None, name: str, judge: str, cannot: str, withheld: str,
                  more: Callable[[ScoreResult], str | None] | None = None,
                  unheld: Callable[[str], bool] = lambda k: False) -> dict[str, Any]:
    """The fields of `res`, the result of item `item` (named `name`), as a carrier holds them
    (`cannot`: `the job cannot write`; `withheld`: `not written`): failed for each reason `_checked`
    gives (fail_record, less the sub-score names `unheld`), or, where it holds a score beside an
    error, with that score withheld (_unscored). A value inside that JSON cannot hold is
    strict_json's to find, after."""
    res, whys = _checked(res, item, judge, cannot, more)
    rec = fields(res)
    for why in whys:
        fail_record(rec, name, why, unheld)
    if rec["score"] is not None and rec["error"] is not None:
        _unscored(rec, name, judge, withheld)
    return rec


def strict_json(rec: dict[str, Any], own: dict[str, Any], judge: str,
                fail: Callable[[dict[str, Any], str], None]) -> dict[str, Any]:
    """A record every JSON reader accepts (as_json), for the job's files and the service's answers.
    - numpy's numbers and arrays, from a judge class of the user's, are written as plain numbers
      and lists.
    - Python's json reads and writes NaN and Infinity, which JSON has no number for (jq,
      JSON.parse and strict parsers refuse them): an item's free field may hold one (a table's
      missing value), and so may a judge class's raw answer. Such a value is written as null and
      the judge's notes on the item (metadata.notes, or judge_notes where the item's own metadata
      `own` has notes: with_judge_notes) name it; the item keeps its score (a score never gets
      here non-finite: `_checked` fails its item), and the judge saw the value as it was given.
    - A value JSON cannot hold at all (a set or an object in a judge class's raw answer) fails its
      item alone (`fail(record, why)`), naming the field: the other items' results stand."""
    found: list[str] = []
    unwritable: list[str] = []

    def none_for(path: str, value: Any, what: str) -> None:
        unwritable.append(f"{path} ({what})")

    out = {}
    for k, v in rec.items():
        try:
            out[k] = as_json(v, k, found, none_for)
        except RecursionError:  # nested deeper than Python's stack
            out[k] = none_for(k, v, "nested too deeply")
    if unwritable:
        fail(out, f"{judge} returned {', '.join(unwritable)}, which JSON cannot hold: the item is failed; a "
                  "judge's result holds numbers, text, lists and dicts")
    if found:
        out["metadata"] = with_judge_notes(out.get("metadata") or {}, own, [n + NOT_JSON for n in found])
    return out


def unpicklable(value: Any, dumps: Callable[[Any], Any], path: str = "",
                within: frozenset[int] = frozenset()) -> tuple[str, Any, Exception] | None:
    """The part of `value` that `dumps` (a pickler's: a channel's) refuses, as deep in its dicts,
    lists, tuples and dataclass instances (a ScoreResult) as it can be named: (its path,
    `raw.lock`, it, the error); None where dumps takes all of it."""
    try:
        dumps(value)
        return None
    except Exception as e:
        error = e
    a_dataclass = dataclasses.is_dataclass(value) and not isinstance(value, type)
    if id(value) not in within and (a_dataclass or isinstance(value, (dict, list, tuple))):
        named = a_dataclass or isinstance(value, dict)
        parts = fields(value).items() if a_dataclass else value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in parts:
            where = (f"{path}.{k}" if path else str(k)) if named else f"{path}[{k}]"
            found = unpicklable(v, dumps, where, within | {id(value)})
            if found:
                return found
    return path, value, error


def sendable(forms: list[Any], results: list[ScoreResult], dumps: Callable[[Any], Any], sender: str,
             device: str | None, form: Callable[[ScoreResult], Any] = lambda r: r) -> list[Any]:
    """`forms`, the forms of `results` a host sends back on a pickled channel (their dicts, or the
    results themselves), for a reply that channel (`dumps`) refused: each form that pickles as it
    is; for one that does not (a value in it: metadata that loaded in the host as a lock, say), the
    `form` of its item's failure (cannot_send_back), naming the field. That item fails alone, and
    the host serves on."""
    out = []
    for f, r in zip(forms, results):
        try:
            found = unpicklable(f, dumps)
        except RecursionError as e:
            found = ("", f, e)
        if found is None:
            out.append(f)
            continue
        path, value, e = found
        what = f"{path or 'the result'} (a {type(value).__name__}: {type(e).__name__}: {e})"
        out.append(form(cannot_send_back(r, sender, device, what, "input" if path.startswith("metadata") else "model")))
    return out


def cannot_send_back(result: ScoreResult, sender: str, device: str | None, what: str, kind: str) -> ScoreResult:
    """The failure of the item of `result`, which `sender` (`the worker on cpu#1`) cannot send back
    (`what` names the field and the cause). It has no metadata (the host's is what could not be
    sent): the caller's scheduler gives it the caller's (Scheduler.done)."""
    item = ScoreItem(images=[], id=result.id if isinstance(result.id, str) else None)
    return ScoreResult.failure(
        result.index, item, f"item {item_name(item, result.index)}: its result cannot be sent back from {sender}: "
        f"{what}; the item is failed; a result holds data that pickles (numbers, text, lists and dicts)",
        kind, device=device)


def usable(results: list[Any], items: list[ScoreItem], judge: str, carrier: str, cannot: str,
           withheld: str) -> list[ScoreResult]:
    """The results of a call as `carrier` (`the service`, `the reward`) passes them on, by the rule the
    job's files follow: numpy's numbers as plain ones (a 0-d array's too), a NaN in a raw answer or in
    metadata as null, named in the item's notes. What a judge class of the user's may return and
    cannot be passed on fails its item alone (`model`), the error naming the item and the field: an
    entry that is no ScoreResult (as_result), a lock, a mappingproxy or an object in it, a score or
    sub-score that is no finite number, metadata that is no dict; the other items keep their scores.
    A result with a score beside an error is a failed item, with no score (`withheld`: `not sent`)."""
    return [_usable_one(as_result(r, items[k], k, judge), items[k], k, judge, carrier, cannot, withheld)
            for k, r in enumerate(results)]


def _usable_one(res: ScoreResult, item: ScoreItem, k: int, judge: str, carrier: str, cannot: str,
                withheld: str) -> ScoreResult:
    name = item_name(item, k)

    def fail(rec: dict[str, Any], why: str) -> None:
        fail_record(rec, name, why)

    try:
        rec = result_record(res, item, name, judge, cannot, withheld)
        return ScoreResult.from_dict(strict_json(rec, item.metadata, judge, fail))
    except Exception as e:  # a value whose own methods fail as it is read (a repr that raises)
        return ScoreResult.failure(k, item, f"item {name}: {judge} returned a result {carrier} cannot read "
                                            f"({type(e).__name__}: {e}); the item is failed", "model")
