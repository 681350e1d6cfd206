"""A scoring job: manifest in, results out, resumable.

Files in the output folder:
  results.stream.jsonl  one line per result as it finishes (appended, flushed, fsync'ed); what
                        resume reads. A line cut by a crash is skipped and its item scored again.
                        Beside what results.jsonl holds: latency_s, device, and for resume which
                        metadata fields the judge set or dropped (metadata_by_judge) and, where
                        max_new_tokens is one, the row's own (row_max_new_tokens)
  results.jsonl         the final results in manifest order (written at the end)
  results.csv           the same, flat, for spreadsheets (text a spreadsheet would run as a
                        formula starts with a single quote there: _csv_cell), a column per
                        sub-score between its own (CSV_HEAD, CSV_TAIL), each name once (_csv_clash)
  summary.json          counts, mean/std/stderr/ci95 per sub-score and per category, failures by
                        cause (summary.py)
The JSON files are strict JSON: NaN and Infinity (a manifest's free field may hold them) are
written as null, and the item's metadata.notes says so; numpy's numbers and arrays (a judge class
of the user's may return them) are written as plain numbers and lists; a value JSON cannot hold at
all (a lock or an open file too: a result is not copied first) fails its item alone (_strict_record,
the one walk every JSON write of the job goes through, shared with the reward service in
src/models/reward/result_form.py), as does a result whose metadata is no dict, whose score or
sub-scores are no numbers or have names the files cannot hold, or with no score and no error
(_record: result_form.result_record, _job_rules); one with a score and an error is a failed item,
its score not written (result_form._unscored).

Order: the manifest's, except that rows sharing a source image are scored side by side (in the
same call, so the judge encodes the source once); results.jsonl is in manifest order either way.

Resume: an item is skipped when the stream holds a successful result for its id under the same
fingerprint (model, template, scoring settings) and the same inputs (image paths, source image
paths, instruction; in generate mode, and for a judge whose mode is not known here, also the
item's own max_new_tokens as the manifest gave it, whatever the judge wrote in its metadata:
_budget_scored_under). Failed items are tried again. A reused result is written with its row as
the manifest gives it now (line, category, other fields), what the judge did to its metadata
kept: its notes, and the fields a judge class of the user's set or dropped (_as_the_row_says_now).
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from src.interrupts import raise_lost_ctrl_c
from src.models.reward import BaseRewardModel, ScoreResult, build_reward_model
from src.models.reward.base import check_one_each
from src.models.reward.config import ConfigError, judge_settings, model_param_paths, resolve_spec, unknown_key_error
from src.models.reward.result_form import (NOT_JSON, as_json, as_result, cannot_carry, fail_record, long_int,
                                          result_record, strict_json)
from src.models.reward.size_order import HeaderSize, chunk_order
from src.models.reward.templates import resolve_rubric
from src.models.reward.types import JUDGE_NOTES, item_name, with_judge_notes

from .manifest import ManifestRow, read_manifest
from .summary import RESERVED, SUMMARY, stats, sub_score_clash, summarize

log = logging.getLogger(__name__)

STREAM = "results.stream.jsonl"
FINAL = "results.jsonl"
CSV = "results.csv"
REPORT = "report.html"
JOB_KEYS = ("manifest", "output_dir", "chunk_size", "resume", "report")
# Kept in the stream file, left out of results.jsonl/csv: they vary from run to run, and the
# final file of a resumed job must equal an uninterrupted run's but for float rounding (README).
VOLATILE = ("latency_s", "device")
# Kept in the stream file too, for resume alone: which metadata fields the judge set or dropped (_by_judge),
BY_JUDGE = "metadata_by_judge"
# and the row's own answer budget where the judge set or dropped that field (_budget_scored_under).
BUDGET, ROW_BUDGET = "max_new_tokens", "row_max_new_tokens"
STREAM_ONLY = (*VOLATILE, BY_JUDGE, ROW_BUDGET)
# results.csv's own columns, before and after one per sub-score (write_outputs); a sub-score of one
# of these names would be a second column of that name (_csv_clash).
CSV_HEAD = ("id", "score")
CSV_TAIL = ("category", "error_kind", "error", "images", "source_images", "instruction")


@dataclass
class JobSpec:
    manifest: Path
    output_dir: Path
    chunk_size: int = 64
    resume: bool = True
    report: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any], base: Path) -> "JobSpec":
        job = cfg.get("job")
        if not isinstance(job, dict):
            raise ConfigError("config: missing 'job' section (with manifest and output_dir)")
        for key in job:
            if key not in JOB_KEYS:
                raise unknown_key_error("job", str(key), list(JOB_KEYS), model_param_paths(cfg.get("model")))
        for k in ("manifest", "output_dir"):
            if not job.get(k):
                raise ConfigError(f"job: missing '{k}'")
            if not isinstance(job[k], str):  # YAML gives a bare number or true as such, not as a path
                raise ConfigError(f"job.{k}: expected a path (a string), got {job[k]!r}")
        chunk = job.get("chunk_size", 64)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"job.chunk_size: expected a positive integer, got {chunk!r}")
        flags = {"resume": job.get("resume", True), "report": job.get("report", False)}
        for k, v in flags.items():
            if not isinstance(v, bool):  # bool("false") is True: a quoted false must not resume
                raise ConfigError(f"job.{k}: expected true or false, got {v!r}")

        def where(p: str) -> Path:
            q = Path(p).expanduser()
            return q if q.is_absolute() else (base / q)

        return cls(manifest=where(job["manifest"]), output_dir=where(job["output_dir"]), chunk_size=chunk,
                   resume=flags["resume"], report=flags["report"])


CONFIG_KEYS = ("model", "job")


def check_top_level(cfg: dict[str, Any]) -> None:
    """A job config has `model` and `job`; any other key is a mistake (a misplaced `--set`)."""
    elsewhere = {**{k: f"job.{k}" for k in JOB_KEYS}, **model_param_paths(cfg.get("model"))}
    for key in cfg:
        if key == "server":
            raise ConfigError("config: a 'server' section is for the reward service: run it with "
                              "`main.py serve --config ...`; a job config has the keys model, job")
        if key not in CONFIG_KEYS:
            raise unknown_key_error("config", str(key), list(CONFIG_KEYS), elsewhere)


def check_template_inputs(cls: type, params: dict[str, Any], rows: list[ManifestRow], manifest: Any) -> None:
    """Refuse, before any model loads, a template that needs a source image or an instruction
    that no row of the manifest provides (rows that lack only some still fail one by one), or whose
    sub-score names would overwrite the summary's own figures or cannot head a column of results.csv
    of their own (_csv_clash)."""
    items = [r.item for r in rows if r.item is not None]
    settings = judge_settings(cls, params) if items else None  # built once already, by resolve_spec
    if settings is None:
        return  # a remote judge's template lives on its server
    rubric = check_part_names(settings)
    has_source = any(it.source_images for it in items)
    has_text = any((it.instruction or "").strip() for it in items)
    for part, t in rubric.parts:
        via = "" if part == rubric.name else f" (its part '{part}' uses template '{t.name}')"
        if t.needs_source and not has_source:
            what, missing, alts = "a source image", "source_image", "source_images, original_image, original_images"
        elif t.needs_instruction and not has_text:
            what, missing, alts = "an instruction", "instruction", "prompt"
        else:
            continue
        raise ConfigError(f"template '{rubric.name}' needs {what}{via}, and no row of the manifest {manifest} "
                          f"has one: it has no '{missing}' column (also read: {alts}). Add that column, or "
                          "choose a template that judges the image alone (quality, edit_quality)")


def check_part_names(settings: Any) -> Any:
    """The rubric of a judge's `settings`, refused (ConfigError) where a part's name would overwrite
    the summary's own figures or cannot head a column of results.csv of its own (_csv_clash): every
    item would fail on it. Checked before anything is scored, for a config's judge and for a judge
    object given to run_job alike."""
    rubric = resolve_rubric(settings.template, settings.templates)
    # A lone template's sub-score is its score: the same figures under the same name.
    taken = [part for part, _ in rubric.parts if part in RESERVED and not (rubric.combine == "single" and part == "score")]
    if taken:
        raise ConfigError(f"model.params.template: template '{rubric.name}' names a sub-score '{taken[0]}', which "
                          f"summary.json uses for its own figures ({', '.join(sorted(RESERVED))}); give that part "
                          "another name")
    clash = next(filter(None, (_csv_clash(part) for part, _ in rubric.parts)), None)
    if clash:  # every item would fail on it (_as_numbers)
        raise ConfigError(f"model.params.template: template '{rubric.name}': {clash}; give that part another name")
    return rubric


def model_fingerprint(model: BaseRewardModel, model_spec: dict[str, Any]) -> str:
    fp = getattr(model, "fingerprint", None)
    if isinstance(fp, str) and fp:
        return fp
    try:
        blob = json.dumps(model_spec, sort_keys=True, default=str)
    except ValueError:  # an int Python writes no decimal text for (a config given to run_job): its hex
        blob = json.dumps(as_json(model_spec, "", [], lambda path, v, what: hex(v) if long_int(v) else str(v)),
                          sort_keys=True)
    return "cfg-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def settings_fingerprint(cls: type, params: dict[str, Any]) -> str | None:
    """The fingerprint a judge of class `cls` built from `params` reports, worked out from its
    settings alone (no model loaded): for the classes whose results are keyed by their
    JudgeSettings (qwen_vl, multi_gpu, ray); None for any other, or where the settings do not
    build (the judge's own construction then says why)."""
    try:
        s = judge_settings(cls, params)
        return s.judge_fingerprint() if s is not None else None
    except Exception:
        return None


def _loaded_as(quantization: Any, by_worker: Any) -> dict[str, Any]:
    """summary.json's record of how the judge loaded its weights: `quantization`, the judge's own
    report (a pre-quantized checkpoint says so here), and `quantization_by_worker` (device ->
    report) where a judge's workers loaded them differently."""
    if not isinstance(quantization, str):
        return {}
    if isinstance(by_worker, dict) and by_worker:
        return {"quantization": quantization, "quantization_by_worker": dict(by_worker)}
    return {"quantization": quantization}


def _finished_without_a_judge(checked: tuple[str, type, dict[str, Any]] | None, rows: list[ManifestRow],
                              stream_path: Path, spec: JobSpec) -> tuple[str, dict[str, Any], dict] | None:
    """(fingerprint, how the weights were loaded, the stream's results) when every row of the
    manifest that can be scored has its result on disk for the fingerprint this config's judge
    would report; else None (the judge is loaded and the job runs as usual). How the weights were
    loaded: what the last run's summary recorded (_loaded_as), if it was this fingerprint's."""
    if checked is None or not stream_path.exists():
        return None
    fp = settings_fingerprint(checked[1], checked[2])
    if fp is None:
        return None
    done, _ = read_stream(stream_path, fp)
    if _reused_and_todo(rows, done, _budget_counts(None, checked))[1]:
        return None
    try:
        last = json.loads((spec.output_dir / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        last = {}
    if not (isinstance(last, dict) and last.get("fingerprint") == fp):
        return fp, {}, done
    return fp, _loaded_as(last.get("quantization"), last.get("quantization_by_worker")), done


class _NoJudge(BaseRewardModel):
    """Stands in for the judge of a job with nothing left to score: it is never asked to score."""

    def score_items(self, items):
        raise RuntimeError("a finished job asked its stand-in judge to score")

    def close(self) -> None:
        pass


def read_stream(path: Path, fingerprint: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Successful results already on disk for this fingerprint, by id; and for the ids with a
    successful result under another fingerprint, that fingerprint (what a job that changed its
    settings does not reuse, and says so). Broken lines are skipped."""
    done: dict[str, dict[str, Any]] = {}
    elsewhere: dict[str, str] = {}
    if not path.exists():
        return done, elsewhere
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that item is scored again
            if not (isinstance(rec, dict) and rec.get("score") is not None and rec.get("error") is None
                    and isinstance(rec.get("id"), str)):
                continue
            if rec.get("fingerprint") == fingerprint:
                done[rec["id"]] = rec
            else:
                elsewhere[rec["id"]] = str(rec.get("fingerprint"))
    return done, elsewhere


def _say_what_is_not_reused(stream_path: Path, fp: str, todo: list[ManifestRow], done: dict[str, dict[str, Any]],
                            elsewhere: dict[str, str], budget_counts: bool) -> None:
    """A job run again after its settings or its manifest changed scores those rows again, as it
    must; it says so, since a user who meant to resume would otherwise learn it from the time taken."""
    def few(ids: list[str]) -> str:
        return ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")

    other = [r.id for r in todo if r.id not in done and r.id in elsewhere]
    if other:
        fps = sorted({elsewhere[i] for i in other})
        log.warning(f"{stream_path} holds results for {len(other)} of this job's rows that were scored under other "
                    f"settings (fingerprint {few(fps)}; this job's is {fp}): they are not reused, and those rows are "
                    "scored again. The fingerprint covers the model, the template and every setting that changes "
                    "scores; a run's summary.json names its settings")
    changed = [r.id for r in todo if r.id in done]  # a result for this id under these settings, other inputs
    if changed:
        what = "images, instruction or answer budget (metadata max_new_tokens)" if budget_counts else \
            "images or instruction"
        log.warning(f"{stream_path} holds results for {len(changed)} of this job's rows ({few(changed)}) whose {what} "
                    "have changed since: they are not reused, and those rows are scored again")


def _record(row: ManifestRow, res: ScoreResult, fingerprint: str, judge: str = "the judge") -> dict[str, Any]:
    """The record of a row's result, as the job's files hold it; `judge` names the judge in the
    error of an item whose result the job cannot write (result_form.result_record): its score or
    sub-scores no numbers (and the job's own rules on them: _job_rules), its metadata no dict (a
    list, a string, from a judge class of the user's; None is none), or a value JSON cannot hold
    (_strict_record: a lock, an open file, a generator too, which is why the result is not copied
    first, as to_dict's would be). Such an item fails alone, and a resumed job scores it again; so
    does one whose result holds a score beside an error, its score not written."""
    d = result_record(res, row.item, _row_name(row), judge, _CANNOT, "not written", _job_rules(judge), _unheld)
    d.pop("index", None)
    d["id"] = row.id
    d["line"] = row.line
    d["fingerprint"] = fingerprint
    d.update({k: v for k, v in row.fields.items() if _input_field(k, v)})
    cat = (row.item.metadata.get("category") if row.item else row.fields.get("category"))
    d["category"] = None if cat is None else str(cat)
    d["metadata"] = _rows_notes_kept(d.get("metadata") or {}, _own(row))
    rec = _strict_record(d, row, judge)
    by_judge = _by_judge(_own(row), rec["metadata"])
    if not by_judge:
        return rec
    if any(BUDGET in keys for keys in by_judge.values()):  # the record's metadata no longer shows it
        return {**rec, BY_JUDGE: by_judge, ROW_BUDGET: _plain(_own(row).get(BUDGET))}
    return {**rec, BY_JUDGE: by_judge}


def _own(row: ManifestRow) -> dict[str, Any]:
    """The metadata the manifest gives a row."""
    return row.item.metadata if row.item is not None else {}


def _rows_notes_kept(metadata: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """A result's `metadata` with the row's own `notes` field (`own`'s) as the row gives it, whoever
    changed it: notes a judge class wrote there instead (`{**metadata, "notes": ...}`) are the
    judge's, and go to judge_notes after those there already (with_judge_notes); of a list that
    starts with the row's notes, what it added. The judges of this library leave the field as it
    was. A row with its own notes always gets judge_notes, from any judge: how a resumed job tells
    the two apart."""
    if "notes" not in own:
        return metadata
    theirs, given = metadata.get("notes"), own["notes"]
    head = given if isinstance(given, list) else [given]
    if theirs is None or _written_alike(theirs, given):
        moved = []
    elif isinstance(theirs, list) and _written_alike(theirs[:len(head)], head):
        moved = theirs[len(head):]
    else:
        moved = theirs if isinstance(theirs, list) else [theirs]
    return with_judge_notes({**metadata, "notes": given}, own, moved)


def _for_the_judge(row: ManifestRow) -> Any:
    """The row's item as the judge gets it, with a copy of its metadata: a judge class that writes
    into its items (`item.metadata["tokens"] = 17`) leaves the row as the manifest gave it, so its
    record tells the row's fields from the judge's (_by_judge) as a resumed job, which reads the
    manifest again, does."""
    return dataclasses.replace(row.item, metadata=copy.deepcopy(row.item.metadata))


_NOTES_KEYS = ("notes", JUDGE_NOTES)  # the job writes these by its own rules (with_judge_notes)


def _by_judge(own: dict[str, Any], metadata: dict[str, Any]) -> dict[str, list[str]]:
    """What the judge did to a row's metadata `own`, beside its notes, as the record's `metadata`
    shows it: the fields it set (added, or gave another value) and those it dropped; {} for neither
    (the judges of this library set none). The values are in the record; the stream keeps these
    lists beside them (BY_JUDGE), so that a resumed job writes a reused record as an uninterrupted
    run does, with the judge's fields and without a manifest field deleted since
    (_as_the_row_says_now)."""
    set_ = [k for k, v in metadata.items() if k not in _NOTES_KEYS and not (k in own and _written_alike(own[k], v))]
    dropped = [k for k in own if k not in _NOTES_KEYS and k not in metadata]
    return {name: keys for name, keys in (("set", set_), ("dropped", dropped)) if keys}


def _written_alike(a: Any, b: Any) -> bool:
    """Whether two values are written alike in the job's JSON files (as_json): NaN and null are,
    numpy's 3 and 3 are; 1 and 1.0 are not, nor the same keys in another order."""
    def written(value: Any) -> str:
        return json.dumps(_plain(value), ensure_ascii=False)
    try:
        return written(a) == written(b)
    except RecursionError:  # nested deeper than Python's stack (_strict_record fails such an item)
        return False


def _plain(value: Any) -> Any:
    """`value` as the job's JSON files write it (as_json), with null for what JSON cannot hold."""
    return as_json(value, "", [], lambda path, v, what: None)


def _strict_record(rec: dict[str, Any], row: ManifestRow, judge: str = "the judge") -> dict[str, Any]:
    """A record every JSON reader accepts, for the stream and results.jsonl alike
    (result_form.strict_json): NaN and Infinity written as null, the judge's notes naming them; a
    value JSON cannot hold at all fails its row's item alone (_fail): the job goes on, and the
    other items' results are written."""
    return strict_json(rec, _own(row), judge, lambda out, why: _fail(out, row, why))


def _fail(rec: dict[str, Any], row: ManifestRow, why: str) -> None:
    """Fail the record `rec` of a row for a result its judge should not have returned (`why`), as
    result_form.fail_record does, naming the row (_unheld: no null under a name the job's files
    cannot hold even so)."""
    fail_record(rec, _row_name(row), why, _unheld)


def _unheld(name: str) -> bool:
    """Whether the job's files cannot hold a sub-score `name` even as a failed item's null: it would
    overwrite one of the summary's own figures (RESERVED: sub_score_clash), or be a second column of
    results.csv of that name, or one with no name (_csv_clash)."""
    return name in RESERVED or _csv_clash(name) is not None


_CANNOT = "the job cannot write"  # how an error says what the job could not do with a result


def _cannot_write(judge: str, what: str) -> str:
    """The error of an item whose judge returned a result the job cannot write (`what` says why)."""
    return cannot_carry(judge, _CANNOT, what)


def _strict_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """summary.json as strict JSON (as_json): a value that is NaN or Infinity (a config parameter
    of the user's class) is written as null, and the log says which; one JSON has no form for (a
    date YAML read) as its text; an int Python writes no text for (of more than 4300 digits, from a
    config given to run_job) as what it is, and the log says which."""
    found: list[str] = []

    def as_text(path: str, value: Any, what: str) -> str:
        if long_int(value):
            log.warning(f"{SUMMARY}: {path} is {what}, which Python writes no text for: written as {what!r}")
            return what
        return str(value)

    out = {k: as_json(v, k, found, as_text) for k, v in summary.items()}
    for line in found:
        log.warning(f"{SUMMARY}: {line}{NOT_JSON}")
    return out


def _input_field(key: str, value: Any) -> bool:
    """An input the results files carry for a row: images as lists of paths, the instruction as
    text. A row the manifest refused keeps what it said, which may be neither (`"images": [5]`):
    its error quotes that, and the files (csv, report) stay readable."""
    if key == "instruction":
        return isinstance(value, str)
    return key in ("images", "source_images") and isinstance(value, list) and all(isinstance(v, str) for v in value)


def _job_rules(judge: str) -> Callable[[ScoreResult], str | None]:
    """The job's own rules on a result's score and sub-scores, once result_form's check has made
    them floats (its `more`); why its item fails, or None:
    - no score and no error: a result without a score says why (ScoreResult), or its item would
      fail with nothing to tell the user.
    - a sub-score named as one of the summary's own figures, which it would overwrite
      (sub_score_clash: the report refuses such a file), or as one of results.csv's columns, or
      with an empty name (_csv_clash).
    A score or sub-score that is no finite number (NaN, which results.jsonl cannot hold and resume
    would never score again) the check has failed already."""
    def rule(res: ScoreResult) -> str | None:
        if res.score is None and (res.error is None or res.error == ""):  # an error of no text: error_problem
            return f"{judge} returned no score and no error: a result without a score says why; the item is failed"
        clash = next(filter(None, (sub_score_clash(k, v, res.score) or _csv_clash(k)
                                   for k, v in (res.sub_scores or {}).items())), None)
        return clash and _cannot_write(judge, clash)
    return rule


def _csv_clash(name: str) -> str | None:
    """Why a sub-score `name` cannot head a column of results.csv of its own, or None: it is empty
    (or blank), or one of the file's own columns (CSV_HEAD, CSV_TAIL), which the file would then hold
    twice. A `score` sub-score is the score where it may stand at all (sub_score_clash): the file
    writes it once."""
    if not name.strip():
        return f"sub-score {name!r} has no name to head its column of results.csv"
    if name in (*CSV_HEAD, *CSV_TAIL) and name != "score":
        return (f"sub-score {name!r} has the name of one of results.csv's own columns "
                f"({', '.join((*CSV_HEAD, *CSV_TAIL))}), which the file would then hold twice")
    return None


def _numbered_by_row(res: ScoreResult, k: int, row: ManifestRow) -> ScoreResult:
    """The judge numbers an item by its place in the chunk it was given (`'a' (#0)`); a job's reader
    needs the manifest row (`'a' (line 9)`)."""
    if isinstance(res.error, str) and res.error and row.item is not None:  # another value: _record fails it
        res.error = res.error.replace(f"item {item_name(row.item, k)}", f"item {_row_name(row)}")
    return res


def _row_name(row: ManifestRow) -> str:
    """How an error names a manifest row: `'a' (line 9)`."""
    item_id = row.item.id if row.item is not None else row.id
    return f"{item_id!r} (line {row.line})" if item_id is not None else f"line {row.line}"


def _reused_and_todo(rows: list[ManifestRow], done: dict[str, dict[str, Any]], budget_counts: bool
                     ) -> tuple[dict[str, dict[str, Any]], list[ManifestRow]]:
    """The stored results a job reuses, by id (those of its rows with the same inputs, and where
    `budget_counts` the same answer budget), and the rows left to score; rows the manifest could not
    read are in neither."""
    reused: dict[str, dict[str, Any]] = {}
    todo: list[ManifestRow] = []
    for r in rows:
        if r.item is None:
            continue
        if r.id in done and _same_inputs(done[r.id], r, budget_counts):
            reused[r.id] = _as_the_row_says_now(done[r.id], r)
        else:
            todo.append(r)
    return reused, todo


def _as_the_row_says_now(rec: dict[str, Any], row: ManifestRow) -> dict[str, Any]:
    """A stored result with its row's place, category and metadata as the manifest gives them now
    (the score stays as stored): a manifest edited between runs (rows moved, a category relabelled,
    a free field changed, added or deleted, its own notes changed) must give the results and the
    summary an uninterrupted run of it would. What the judge did to the metadata stays: the fields a
    judge class of the user's set or dropped (BY_JUDGE), and the judge's notes, under the key the
    row's notes now call for."""
    stored, own = rec.get("metadata") or {}, row.item.metadata
    cat = own.get("category")
    set_, dropped = (_keys(rec.get(BY_JUDGE), name) for name in ("set", "dropped"))
    metadata = {k: stored[k] if k in set_ and k in stored else v for k, v in own.items() if k not in dropped}
    metadata.update((k, v) for k, v in stored.items() if k in set_ and k not in own)
    notes, later = _judges_notes(stored, own, set_)
    if "notes" in own:
        metadata = with_judge_notes(metadata, own, [] if notes is _NO_NOTES else notes if isinstance(notes, list)
                                    else [notes])
    elif notes is not _NO_NOTES:
        metadata["notes"] = notes
    out = _strict_record({**rec, "line": row.line, "metadata": metadata, "category": None if cat is None else str(cat)},
                         row)
    if later:  # after those made again from the row: an uninterrupted run notes the row's fields first
        out["metadata"] = with_judge_notes(out["metadata"], own, later)
    return out


_NO_NOTES = object()  # a stored record whose judge had no notes


def _judges_notes(stored: dict[str, Any], own: dict[str, Any], set_: frozenset[str]) -> tuple[Any, list[str]]:
    """The judge's notes in a stored record's `metadata`: a list, a judge class's value that is no
    list (as it wrote it), or _NO_NOTES; less the notes on values JSON cannot hold in the row's
    fields, which _strict_record makes again from the row as it is now. And apart, the notes on such
    values in the fields the judge set (`set_`), which no row gives again."""
    if JUDGE_NOTES in stored:  # there when the row had notes of its own (_record); else the judge's are `notes`
        judges, marker = stored[JUDGE_NOTES], True
    elif "notes" in own and stored.get("notes") == own["notes"]:
        return _NO_NOTES, []  # the row's own notes, in a stream written before judge_notes existed
    else:
        judges, marker = stored.get("notes", _NO_NOTES), False
    if not isinstance(judges, list):
        return judges, []
    remade = [n for n in judges if isinstance(n, str) and n.startswith("metadata.") and n.endswith(NOT_JSON)]
    kept = [n for n in judges if n not in remade]
    later = [n for n in remade if any(_on_field(n, k) for k in set_)]
    # An empty list is the judge's own where a judge class wrote `notes: []`; under judge_notes, or
    # once the job's notes are taken out, it is no notes.
    return (kept if kept or not (marker or remade) else _NO_NOTES), later


def _on_field(note: str, key: str) -> bool:
    """Whether a note on a value JSON cannot hold (`metadata.conf was NaN`) is on metadata field `key`."""
    head = f"metadata.{key}"
    return note.startswith(head) and note[len(head):len(head) + 1] in (".", "[", " ")


def _keys(by_judge: Any, name: str) -> frozenset[str]:
    """The fields a stored record's BY_JUDGE lists under `name` (none in a stream written before it existed)."""
    keys = by_judge.get(name) if isinstance(by_judge, dict) else None
    return frozenset(k for k in keys if isinstance(k, str)) if isinstance(keys, list) else frozenset()


def _same_inputs(rec: dict[str, Any], row: ManifestRow, budget_counts: bool) -> bool:
    # A manifest edited between runs may reuse an id (or a `lineN` id may now name another
    # row): a stored result counts only for the inputs it was scored on, and in generate mode for
    # the answer budget it was scored under (the item's own max_new_tokens, as the row gave it).
    if budget_counts and _budget_scored_under(rec) != row.item.metadata.get(BUDGET):
        return False
    return all(rec.get(k) == row.fields.get(k) for k in ("images", "source_images", "instruction")
               if k in row.fields)


def _budget_scored_under(rec: dict[str, Any]) -> Any:
    """The row's own answer budget (metadata max_new_tokens) a stored result was scored under, as
    the job recorded it: in the record's metadata, which carries the row's fields; where the judge
    set or dropped that field there (a judge class of the user's returning its own metadata, or
    none), beside it (ROW_BUDGET), so that such a row is not scored again on every resume."""
    return rec[ROW_BUDGET] if ROW_BUDGET in rec else (rec.get("metadata") or {}).get(BUDGET)


def _settings_of(model: BaseRewardModel | None, checked: tuple[str, type, dict[str, Any]] | None) -> Any:
    """The judge's settings record: the loaded judge's, else what the config builds (no judge is
    loaded when every row is on disk); None for a judge without one here (a remote judge's settings
    live on its server)."""
    settings = getattr(model, "settings", None)
    if settings is None and checked is not None:
        settings = judge_settings(checked[1], checked[2])
    return settings


def _declared_sub_scores(model: BaseRewardModel, checked: tuple[str, type, dict[str, Any]] | None) -> list[str]:
    """The sub-scores the judge's rubric declares (its parts), whichever items scored: results.csv's
    columns and summary.json's keys do not depend on which items happened to succeed. None known
    for a judge without settings here: the results' own names are used then."""
    settings = _settings_of(model, checked)
    if getattr(settings, "template", None) is None:
        return []
    return [part for part, _ in resolve_rubric(settings.template, settings.templates).parts]


def _budget_counts(model: BaseRewardModel | None, checked: tuple[str, type, dict[str, Any]] | None) -> bool:
    """Whether an item's own answer budget (metadata max_new_tokens) can change its score: in generate
    mode, where it caps the answer the score is read from; logits mode writes no answer. A judge
    whose mode is not known here is taken to read it (a rescore costs time; a reused score made
    under another budget would be wrong)."""
    mode = getattr(_settings_of(model, checked), "mode", None) or getattr(model, "mode", None)
    return mode != "logits"


def _job_order(todo: list[ManifestRow], chunk_size: int, model: BaseRewardModel) -> list[ManifestRow]:
    """The rows to score, in the order the job cuts its calls from, as the judge orders a call
    (`chunk_order: auto`, size_order.py) but over the whole job: rows whose prompts are of similar
    size side by side, largest first (the images' sizes from their headers; the judge orders each
    call again by its exact resize), so that a call of `chunk_size` rows is not a random draw of
    the job's sizes. Rows that share source images stay side by side (grouping.py) where the judge
    reuses vision features and the rubric shows the sources: a call then holds a source's edits
    together, and the judge encodes the source once. Results are streamed in this order (resume
    reads them by id); results.jsonl keeps the manifest's. Under multi_gpu's round_robin schedule
    sources are not grouped (item i goes to worker i mod n, so a source's neighbouring rows would
    go to different workers; README, vision_reuse). Under `chunk_order: input` the manifest's
    order stays."""
    settings = getattr(model, "settings", None)
    if settings is None or getattr(settings, "chunk_order", "auto") == "input":
        return todo
    shows_sources = resolve_rubric(settings.template, settings.templates).needs_source  # the judge built it already
    group = bool(getattr(settings, "vision_reuse", False)) and shows_sources and \
        getattr(model, "schedule", None) != "round_robin"
    order = chunk_order([r.item for r in todo], chunk_size, HeaderSize(), with_sources=shows_sources,
                        group_sources=group)
    return todo if order is None else [todo[k] for k in order]


def _repair_tail(path: Path) -> None:
    """Make sure the stream ends with a newline, so a line cut by a crash stays one broken line
    instead of swallowing the next good one."""
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")


@contextmanager
def _one_job_per_folder(folder: Path) -> Iterator[None]:
    """One job at a time in an output folder: a second (a scheduler's requeue while the first still
    runs) would score every item again into the same stream, and both would race to write the final
    files. The lock is flock on the folder itself: no file is left behind, and it goes with its
    process however that ends (kill -9 too), so a job that resumes never finds a stale one. A file
    system without flock (some network mounts) runs jobs unlocked, as before."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"job.output_dir: another job is running in {folder} (it holds the folder's lock); "
                              "wait for it to end, or give this job another job.output_dir") from None
        except OSError:
            pass  # no flock on this file system
        yield
    finally:
        os.close(fd)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so workers are closed and results so far stay on disk."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_job(cfg: dict[str, Any], base: Path, progress: bool = True, model: BaseRewardModel | None = None) -> dict[str, Any]:
    """Run the job a config describes; returns the summary."""
    check_top_level(cfg)
    spec = JobSpec.from_config(cfg, base)
    model_spec = cfg.get("model")
    if model is None and model_spec is None:
        raise ConfigError("config: missing 'model' section (class_path and params)")
    checked = resolve_spec(model_spec) if model is None else None  # config errors before any I/O
    rows = read_manifest(spec.manifest)
    if checked is not None:
        check_template_inputs(checked[1], checked[2], rows, cfg["job"]["manifest"])
    elif getattr(given := _settings_of(model, None), "template", None) is not None:  # a judge object of the caller's
        check_part_names(given)
    created = not spec.output_dir.exists()
    try:
        spec.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, a read-only disk, no permission
        raise ConfigError(f"job.output_dir: cannot make the folder {spec.output_dir}: {e.strerror}") from None
    with _one_job_per_folder(spec.output_dir):
        stream_path = spec.output_dir / STREAM
        t0 = time.time()
        if not spec.resume and stream_path.exists():
            stream_path.unlink()
        # Every row already on disk under the fingerprint the judge would report: nothing to score, so
        # no model is loaded (minutes for a large judge) just to find that out.
        loaded: dict[str, Any] = {}  # how the judge loaded its weights (_loaded_as)
        finished = _finished_without_a_judge(checked, rows, stream_path, spec) if model is None else None
        if finished is not None:
            model, (fp, loaded, done) = _NoJudge(), finished
        with _sigterm_as_interrupt():
            raise_lost_ctrl_c()  # (src/interrupts.py) before any worker starts
            own = model is None
            if own:
                try:
                    model = build_reward_model(model_spec)
                except BaseException:  # a judge that never started leaves no empty output folder behind
                    if created and not any(spec.output_dir.iterdir()):
                        spec.output_dir.rmdir()
                    raise
            if hasattr(model, "progress"):
                model.progress = False  # the job's own bar counts every item; one bar is enough
            try:
                if finished is None:
                    fp = model_fingerprint(model, model_spec or {})
                    done, elsewhere = read_stream(stream_path, fp)
                _repair_tail(stream_path)
                budget_counts = _budget_counts(model, checked)
                by_id, todo = _reused_and_todo(rows, done, budget_counts)
                if finished is None:
                    _say_what_is_not_reused(stream_path, fp, todo, done, elsewhere, budget_counts)
                todo = _job_order(todo, spec.chunk_size, model)
                bar = _bar(len(rows), len(rows) - len(todo), progress)
                judge = f"the judge ({type(model).__name__})"
                try:
                    with stream_path.open("a", encoding="utf-8") as out:
                        for start in range(0, len(todo), spec.chunk_size):
                            raise_lost_ctrl_c()  # one lost while the model was built or a chunk ran
                            chunk = todo[start:start + spec.chunk_size]
                            asked = [_for_the_judge(r) for r in chunk]
                            results = model.batch_score(asked)
                            check_one_each(results, len(chunk), judge, f"a call of {len(chunk)} items")
                            lines = []
                            for k, (r, res) in enumerate(zip(chunk, results)):
                                res = as_result(res, asked[k], k, judge)  # a class's dict or None: that item fails
                                rec = _record(r, _numbered_by_row(res, k, r), fp, judge)
                                by_id[r.id] = rec
                                lines.append(json.dumps(rec, ensure_ascii=False, allow_nan=False))
                            out.write("\n".join(lines) + "\n")
                            out.flush()
                            os.fsync(out.fileno())
                            if bar is not None:
                                bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
                if finished is None:  # the judge's own report, read while it is open, after the workers it restarted
                    loaded = _loaded_as(getattr(model, "quantization", None),
                                        getattr(model, "quantization_by_worker", None))
            finally:
                if own:
                    model.close()
        final = []
        for r in rows:
            if r.item is None:
                kind = "manifest"
                res = ScoreResult(index=r.line, id=r.id, error=f"manifest: {r.error}", error_kind=kind)
                final.append(_record(r, res, fp))
            else:
                final.append(by_id[r.id])
        latencies = [rec["latency_s"] for rec in final if rec.get("latency_s")]
        final = [{k: v for k, v in rec.items() if k not in STREAM_ONLY} for rec in final]
        summary = summarize(final, fingerprint=fp, model_spec=model_spec, elapsed_s=time.time() - t0,
                            skipped=len(rows) - len(todo) - sum(r.item is None for r in rows),
                            sub_score_names=_declared_sub_scores(model, checked))
        summary["latency_s_per_item"] = stats(latencies)
        summary.update(loaded)
        summary = _strict_summary(summary)
        write_outputs(spec.output_dir, final, summary)
        if spec.report:
            from src.report import write_report

            write_report(spec.output_dir / FINAL, spec.output_dir / REPORT)
        return summary


def _bar(total: int, initial: int, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="job", unit="item")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# A spreadsheet reads a cell that starts with one of these as a formula (CSV injection: an
# instruction "=HYPERLINK(...)" would run when results.csv is opened).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _csv_cell(value: Any) -> Any:
    """A cell of results.csv: text that a spreadsheet would read as a formula gets a leading single
    quote, the usual guard (OWASP's); text that is a plain number ('-5') reads as that number and
    stays as written, and so do numbers (scores, negative ones too). results.jsonl keeps every
    value exactly."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def write_outputs(folder: Path, records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    # allow_nan=False: every file is strict JSON (_strict_record, _strict_summary made it so).
    _atomic_write(folder / FINAL, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records))
    _atomic_write(folder / SUMMARY, json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    # A lone template's `score` sub-score is the score (sub_score_clash): its column is the score's.
    subs = [s for s in summary.get("sub_score_names") or [] if s != "score"]

    def cell(r: dict[str, Any], column: str) -> Any:
        return "|".join(r.get(column) or []) if column in ("images", "source_images") else r.get(column)

    tmp = folder / (CSV + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([_csv_cell(c) for c in (*CSV_HEAD, *subs, *CSV_TAIL)])
        for r in records:
            sub = r.get("sub_scores") or {}
            w.writerow([_csv_cell(c) for c in (*(cell(r, c) for c in CSV_HEAD), *(sub.get(s) for s in subs),
                                               *(cell(r, c) for c in CSV_TAIL))])
    os.replace(tmp, folder / CSV)
