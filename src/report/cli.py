"""`python main.py report RESULTS.jsonl [--out report.html] [--compare OTHER.jsonl] [--top N]`."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import ReportError, write_report


def _parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog,
                                 description="Write a self-contained HTML report of a scoring job's results.")
    ap.add_argument("results", help="the job's results.jsonl (summary.json beside it supplies the model settings)")
    ap.add_argument("--out", help="the HTML file to write (default: report.html beside the results; "
                                  "a bare file name is also written beside the results)")
    ap.add_argument("--compare", metavar="OTHER.jsonl", help="another run's results.jsonl: per-item score differences, matched by id")
    ap.add_argument("--top", type=int, default=8, help="best, worst and most-changed items shown (default 8)")
    ap.add_argument("--thumb-px", type=int, default=96, help="thumbnail size in pixels (default 96)")
    ap.add_argument("--max-thumbs", type=int, default=2000,
                    help="embed at most this many distinct images; the rest are listed by path (default 2000)")
    ap.add_argument("--page-size", type=int, default=50, help="table rows per page (default 50)")
    ap.add_argument("--title", help="the page title")
    return ap


def _out_path(results: str, out: str | None) -> Path:
    """Where the page goes: a path with a folder as given; a bare name (or nothing) beside the
    results, inside the job's output folder, never loose in the current folder."""
    beside = Path(results).parent
    if not out:
        return beside / "report.html"
    p = Path(out).expanduser()
    return p if (p.is_absolute() or p.parent != Path(".")) else beside / p


def main(argv: list[str] | None = None, prog: str = "main.py report") -> int:
    try:
        args = _parser(prog).parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already printed
        return int(e.code or 0)
    out = _out_path(args.results, args.out)
    t0 = time.time()
    try:
        path = write_report(args.results, out, compare=args.compare, top=args.top, thumb_px=args.thumb_px,
                            max_thumbs=args.max_thumbs, page_size=args.page_size, title=args.title)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
