"""An HTML report of a scoring job: one self-contained file that opens offline.

    results.jsonl (+ summary.json beside it) --data.load_side--> SideInfo (records, summary, model)
    [--compare OTHER.jsonl]                  --data.compare----> Comparison (matched by id, deltas)
    SideInfo, Comparison --page.render_page--> HTML: static summary, SVG histograms, best/worst,
                                               comparison; the items table as embedded JSON that
                                               report.js sorts, filters and pages in the browser
    thumbs.ThumbCache: each distinct image path read once, embedded as a small JPEG data URI

    from src.report import write_report
    write_report("outputs/demo/results.jsonl", "outputs/demo/report.html", compare=None, top=8)
"""
from __future__ import annotations

import os
from pathlib import Path

from .data import ReportError, compare as _compare, load_records, load_side
from .page import PageOptions, render_page

__all__ = ["ReportError", "load_records", "write_report"]


def write_report(results_path: str | os.PathLike, out_path: str | os.PathLike, compare: str | os.PathLike | None = None,
                 *, top: int = 8, thumb_px: int = 96, max_thumbs: int = 2000, page_size: int = 50,
                 raw_chars: int = 4000, title: str | None = None) -> Path:
    """Write the report for a job's results.jsonl to `out_path`; returns that path.

    compare: another run's results.jsonl; items are matched by id and the page shows per-item
      score differences (this run minus the other).
    top: how many best, worst and most-changed items to show side by side.
    thumb_px / max_thumbs: thumbnail size and how many distinct images to embed at most.
    page_size: table rows per page. raw_chars: judge answers are clipped to this many characters.

    Raises ReportError (naming the file and line) for a missing, empty or corrupt results file;
    nothing is written then.
    """
    for name, value, lo in (("top", top, 1), ("thumb_px", thumb_px, 16), ("max_thumbs", max_thumbs, 0),
                            ("page_size", page_size, 1), ("raw_chars", raw_chars, 20)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ReportError(f"{name}: expected an integer >= {lo}, got {value!r}")
    this = load_side(results_path)
    cmp = _compare(this, load_side(compare)) if compare is not None else None
    html = render_page(this, cmp, PageOptions(top=top, thumb_px=thumb_px, max_thumbs=max_thumbs,
                                              page_size=page_size, raw_chars=raw_chars, title=title))
    out = Path(out_path)
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, out)  # a reader never sees half a page
    except OSError as e:  # a file where a folder should be, a read-only disk, a full one
        raise ReportError(f"cannot write the report to {out}: {e.strerror} ({e.filename})") from None
    return out
