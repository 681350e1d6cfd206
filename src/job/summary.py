"""A job's summary: counts, score statistics per sub-score and category, failures by kind.

Computed by the runner (summary.json) and recomputed by the report from results files, so it
lives below both: neither imports the other for it. Pure Python.
"""
from __future__ import annotations

import math
from typing import Any

SUMMARY = "summary.json"
# The figures a summary holds beside its sub-scores' stats, in the same object (summarize, and the
# runner's additions): a sub-score of one of these names would overwrite them, so a job refuses it.
RESERVED = frozenset({"items", "scored", "failed", "score", "sub_score_names", "categories", "failures_by_kind",
                      "failures", "resumed_from_disk", "fingerprint", "model", "elapsed_s", "latency_s_per_item",
                      "quantization", "quantization_by_worker"})


def sub_score_clash(name: Any, value: Any, score: Any) -> str | None:
    """Why a record's sub-score `name` (`value`, beside the record's `score`) cannot stand beside the
    summary's own figures: it would overwrite one of them (the mean score, the count of failures);
    None where it can. A lone template's sub-score is its score, the same figure under the same name."""
    if name in RESERVED and not (name == "score" and value == score):
        return (f"sub-score {name!r} has the name of one of the summary's own figures ({', '.join(sorted(RESERVED))}), "
                "which it would overwrite")
    return None


# The normal distribution's two-sided 95% quantile: ci95 is mean +- Z95 * stderr.
Z95 = 1.959964


def stats(values: list[float]) -> dict[str, Any]:
    """count, mean, min, max; std: the sample standard deviation (n - 1); stderr: the standard error
    of the mean (std / sqrt(n)); ci95: [low, high], the mean's 95% interval by the normal
    approximation (mean +- 1.96 stderr; narrower than Student's t interval for a small group). A
    group of one item has no spread to speak of: std, stderr and ci95 are None, not 0."""
    n = len(values)
    if not n:
        return {"count": 0, "mean": None, "std": None, "stderr": None, "ci95": None, "min": None, "max": None}
    mean = sum(values) / n
    spread: dict[str, Any] = {"std": None, "stderr": None, "ci95": None}
    if n > 1:
        # d * d, not d ** 2: a square past the largest float is inf (a score of 1e308 from a judge
        # class), where ** raises OverflowError and the finished job lost its summary
        std = math.sqrt(sum((v - mean) * (v - mean) for v in values) / (n - 1))
        stderr = std / math.sqrt(n)
        spread = {"std": round(std, 6), "stderr": round(stderr, 6),
                  "ci95": [round(mean - Z95 * stderr, 6), round(mean + Z95 * stderr, 6)]}
    return {"count": n, "mean": round(mean, 6), **spread, "min": round(min(values), 6), "max": round(max(values), 6)}


def summarize(records: list[dict[str, Any]], fingerprint: str | None = None, model_spec: Any = None,
              elapsed_s: float | None = None, skipped: int = 0, sub_score_names: Any = ()) -> dict[str, Any]:
    """sub_score_names: those the judge declares (its rubric's parts), summarised even where no
    record has them (every item failed); with those the records hold."""
    scored = [r for r in records if r.get("score") is not None and r.get("error") is None]
    failed = [r for r in records if not (r.get("score") is not None and r.get("error") is None)]
    subs = sorted({*sub_score_names, *(k for r in records for k in (r.get("sub_scores") or {}))})

    def block(rs: list[dict[str, Any]]) -> dict[str, Any]:
        ok = [r for r in rs if r.get("score") is not None and r.get("error") is None]
        out = {"items": len(rs), "scored": len(ok), "failed": len(rs) - len(ok),
               "score": stats([r["score"] for r in ok])}
        for s in subs:
            if s == "score":  # a lone template's sub-score is its score (sub_score_clash): the same figure
                continue
            out[s] = stats([r["sub_scores"][s] for r in rs if (r.get("sub_scores") or {}).get(s) is not None])
        return out

    by_cat: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("category") is not None:
            by_cat.setdefault(str(r["category"]), []).append(r)
    kinds: dict[str, int] = {}
    for r in failed:
        k = r.get("error_kind") or "unknown"
        kinds[k] = kinds.get(k, 0) + 1
    return {
        **block(records),
        "sub_score_names": subs,
        "categories": {c: block(rs) for c, rs in sorted(by_cat.items())},
        "failures_by_kind": dict(sorted(kinds.items())),
        "failures": [{"id": r.get("id"), "kind": r.get("error_kind"), "error": r.get("error")} for r in failed],
        "resumed_from_disk": skipped,
        "fingerprint": fingerprint,
        "model": model_spec,
        "elapsed_s": None if elapsed_s is None else round(elapsed_s, 3),
    }
