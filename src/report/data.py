"""What a report shows, computed from a job's files: records, summary, scale, comparison.

Only this module reads the results file. It checks every line before anything is drawn, so a
bad file ends in one `ReportError` naming the file and line, never in a half-written page.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.job.summary import SUMMARY, sub_score_clash, summarize
from src.job.summary import stats as _stats
from src.models.reward.errors import JudgeInputError
from src.models.reward.result_form import finite_float
from src.stats import pearson, spearman


class ReportError(JudgeInputError):
    """The results (or comparison) file cannot be turned into a report; the message says why."""


def ok(rec: dict[str, Any]) -> bool:
    """A scored item: the same test `summarize` uses, so counts on the page agree with it."""
    return rec.get("score") is not None and rec.get("error") is None


def _is_number(v: Any) -> bool:
    return finite_float(v) is not None  # an int past float's range is none (the job fails such an item)


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a job's results.jsonl: one JSON object per line, each with a `score` field."""
    p = Path(path)
    if not p.exists():
        raise ReportError(f"results file not found: {p}")
    if p.is_dir():
        raise ReportError(f"{p} is a folder; pass the job's results.jsonl inside it")
    records: list[dict[str, Any]] = []
    try:
        fh = p.open(encoding="utf-8")
        with fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    records.append(_check_record(p, n, line))
                except ReportError:
                    if not records:
                        _not_jsonl(p)
                    raise
    except UnicodeDecodeError as e:
        raise ReportError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); is this a results.jsonl?") from None
    if not records:
        raise ReportError(f"{p}: no records (the file is empty); the job wrote nothing to report")
    return records


def _not_jsonl(p: Path) -> None:
    """Raise a clear error for a JSON document over several lines given where a results.jsonl
    belongs (a job's summary.json, most likely); return for anything else."""
    try:
        text = p.read_text(encoding="utf-8").strip()
        doc = json.loads(text) if "\n" in text else None  # one line: its own error says it best
    except (ValueError, OSError):
        return
    if isinstance(doc, dict) and "fingerprint" in doc and "failures_by_kind" in doc:
        raise ReportError(f"{p}: this is a job's summary.json, not its results; pass results.jsonl from the "
                          "same folder") from None
    if isinstance(doc, (dict, list)):
        raise ReportError(f"{p}: one JSON document, not a results.jsonl (one result record per line); pass the "
                          "job's results.jsonl") from None


def _check_record(p: Path, n: int, line: str) -> dict[str, Any]:
    where = f"{p}, line {n}"
    try:
        rec = json.loads(line.rstrip("\r\n"))  # without the line's end, the column is the line's own
    except json.JSONDecodeError as e:
        raise ReportError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                          f"the file is corrupt or cut short: re-run the job (it resumes) to rewrite it") from None
    except ValueError as e:  # an int of more digits than Python turns into a number (sys.get_int_max_str_digits)
        raise ReportError(f"{where}: a number Python cannot read ({str(e).split(';')[0]})") from None
    if not isinstance(rec, dict):
        raise ReportError(f"{where}: expected a JSON object (one result record), got {type(rec).__name__}")
    if "score" not in rec:
        raise ReportError(f"{where}: not a result record (no 'score' field); pass the job's results.jsonl, "
                          f"not its manifest")
    score = rec["score"]
    if score is not None and not _is_number(score):
        raise ReportError(f"{where}: 'score' must be a finite number or null, got {score!r}")
    subs = rec.get("sub_scores")
    if subs is not None:
        if not isinstance(subs, dict):
            raise ReportError(f"{where}: 'sub_scores' must be an object, got {type(subs).__name__}")
        for k, v in subs.items():
            if v is not None and not _is_number(v):
                raise ReportError(f"{where}: sub-score {k!r} must be a finite number or null, got {v!r}")
            # The summary keeps sub-scores beside its own figures, as a job's does. A job refuses such a
            # rubric part, and fails an item whose judge class returned such a sub-score.
            clash = sub_score_clash(k, v, score)
            if clash:
                raise ReportError(f"{where}: {clash}; rename that sub-score in the file")
    for k in ("images", "source_images"):
        v = rec.get(k)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise ReportError(f"{where}: '{k}' must be a list of paths, got {v!r:.80}")
    if rec.get("metadata") is not None and not isinstance(rec["metadata"], dict):
        raise ReportError(f"{where}: 'metadata' must be an object, got {type(rec['metadata']).__name__}")
    if rec.get("id") is None:
        rec["id"] = f"line {n}"
    elif not isinstance(rec["id"], str):
        rec["id"] = str(rec["id"])
    if not isinstance(rec.get("line"), int):
        rec["line"] = n
    return rec


@dataclass
class SideInfo:
    """One results file and what is known about the run that made it."""

    path: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any]                 # recomputed from the records by the job's summarize()
    model: Any = None                       # the config's model section, from summary.json
    fingerprints: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)    # shown on the page: what could not be read
    job_summary: dict[str, Any] | None = None         # summary.json as written by the job


def load_side(path: str | Path) -> SideInfo:
    p = Path(path)
    records = load_records(p)
    fps = sorted({str(r["fingerprint"]) for r in records if r.get("fingerprint")})
    notes: list[str] = []
    job_summary = None
    model = None
    sp = p.parent / SUMMARY
    if sp.exists():
        try:
            job_summary = json.loads(sp.read_text(encoding="utf-8"))
            if not isinstance(job_summary, dict):
                raise ValueError(f"expected an object, got {type(job_summary).__name__}")
        except (ValueError, UnicodeDecodeError) as e:
            notes.append(f"{sp} could not be read ({e}); the model settings are unknown")
            job_summary = None
    else:
        notes.append(f"no {SUMMARY} next to {p.name}; the model settings are unknown")
    if job_summary is not None:
        sfp = job_summary.get("fingerprint")
        if fps and sfp and sfp not in fps:
            notes.append(f"{sp.name} is from another run (fingerprint {sfp}, the results say {', '.join(fps)}); "
                         f"its model settings are not shown")
        else:
            model = job_summary.get("model")
    if len(fps) > 1:
        notes.append(f"the records come from {len(fps)} different runs (fingerprints {', '.join(fps)})")
    summary = summarize(records, fingerprint=fps[0] if len(fps) == 1 else None, model_spec=model)
    if job_summary is not None and job_summary.get("elapsed_s") is not None:
        summary["elapsed_s"] = job_summary["elapsed_s"]
        summary["latency_s_per_item"] = job_summary.get("latency_s_per_item")
    return SideInfo(path=p, records=records, summary=summary, model=model, fingerprints=fps, notes=notes,
                    job_summary=job_summary)


def judge_scale(model: Any) -> tuple[float, float] | None:
    """The template's score scale, when the model section names one we can resolve."""
    if not isinstance(model, dict):
        return None
    params = model.get("params") or model.get("init_args") or {}
    if not isinstance(params, dict):
        return None
    try:
        from src.models.reward.templates import resolve_rubric

        lo, hi = resolve_rubric(str(params.get("template", "quality")), params.get("templates") or {}).scale
        return float(lo), float(hi)
    except Exception:  # an unknown or custom template: the histograms fall back to the data's range
        return None


def value_range(values: list[float], scale: tuple[float, float] | None) -> tuple[float, float]:
    """The axis for a set of scores: the judge's scale when they fit in it, else their own range."""
    if scale and values and scale[0] <= min(values) and max(values) <= scale[1]:
        return scale
    if not values:
        return scale or (0.0, 1.0)
    lo, hi = min(values), max(values)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return float(lo), float(hi)


# ---- comparison -----------------------------------------------------------------------------

@dataclass
class Comparison:
    """This run (A) against another (B), item by item, matched by id. delta = A - B."""

    other: SideInfo
    by_id: dict[str, dict[str, Any]]      # id -> B's record (first occurrence)
    matched: int                          # ids present in both
    only_this: list[str]
    only_other: list[str]
    both_scored: int
    stats: dict[str, Any]                 # mean/std/min/max of the score deltas, and agreement
    sub_stats: dict[str, dict[str, Any]]  # per sub-score delta stats
    newly_failed: list[str]               # scored in B, failed in A
    newly_scored: list[str]               # failed in B, scored in A
    duplicates: int                       # ids seen more than once (in either file); first one used


def _first_by_id(records: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], int]:
    out: dict[str, dict[str, Any]] = {}
    dups = 0
    for r in records:
        if r["id"] in out:
            dups += 1
        else:
            out[r["id"]] = r
    return out, dups


def compare(this: SideInfo, other: SideInfo) -> Comparison:
    a_by_id, dup_a = _first_by_id(this.records)
    b_by_id, dup_b = _first_by_id(other.records)
    common = [i for i in a_by_id if i in b_by_id]
    pairs = [(a_by_id[i], b_by_id[i]) for i in common]
    scored = [(a, b) for a, b in pairs if ok(a) and ok(b)]
    xs = [b["score"] for _, b in scored]
    ys = [a["score"] for a, _ in scored]
    deltas = [y - x for x, y in zip(xs, ys)]
    stats = _stats(deltas)
    stats["mean_abs"] = round(sum(abs(d) for d in deltas) / len(deltas), 6) if deltas else None
    pr = pearson(xs, ys)
    sr = spearman(xs, ys)
    stats["pearson"] = None if pr is None else round(pr, 4)
    stats["spearman"] = None if sr is None else round(sr, 4)
    stats["higher"] = sum(d > 1e-9 for d in deltas)
    stats["lower"] = sum(d < -1e-9 for d in deltas)
    stats["same"] = len(deltas) - stats["higher"] - stats["lower"]
    subs = sorted(set(this.summary["sub_score_names"]) & set(other.summary["sub_score_names"]))
    sub_stats = {}
    for s in subs:
        ds = [(a.get("sub_scores") or {}).get(s) for a, b in pairs]
        bs = [(b.get("sub_scores") or {}).get(s) for a, b in pairs]
        sub_stats[s] = _stats([x - y for x, y in zip(ds, bs) if x is not None and y is not None])
    return Comparison(
        other=other, by_id=b_by_id, matched=len(common),
        only_this=[i for i in a_by_id if i not in b_by_id], only_other=[i for i in b_by_id if i not in a_by_id],
        both_scored=len(scored), stats=stats, sub_stats=sub_stats,
        newly_failed=[a["id"] for a, b in pairs if ok(b) and not ok(a)],
        newly_scored=[a["id"] for a, b in pairs if ok(a) and not ok(b)],
        duplicates=dup_a + dup_b)
