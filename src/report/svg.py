"""Charts as inline SVG text: no plotting library, no network, crisp at any zoom."""
from __future__ import annotations

from html import escape

W, H = 340, 150          # histogram canvas
PAD_L, PAD_R, PAD_T, PAD_B = 34, 10, 14, 26


def fmt(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}"


def bins_for(values: list[float], lo: float, hi: float) -> list[tuple[float, float]]:
    """Bin edges: one bin per level for integer scores on a short scale (generate mode answers
    integers), else 20 equal bins."""
    if values and all(float(v).is_integer() for v in values) and float(lo).is_integer() and hi - lo <= 20:
        return [(k - 0.5, k + 0.5) for k in range(int(lo), int(hi) + 1)]
    n = 20
    step = (hi - lo) / n
    return [(lo + k * step, lo + (k + 1) * step) for k in range(n)]


def _count(values: list[float], edges: list[tuple[float, float]]) -> list[int]:
    counts = [0] * len(edges)
    lo, hi = edges[0][0], edges[-1][1]
    width = (hi - lo) / len(edges)
    for v in values:
        k = int((v - lo) / width) if width > 0 else 0
        counts[min(max(k, 0), len(edges) - 1)] += 1
    return counts


def histogram(values: list[float], lo: float, hi: float, label: str, other: list[float] | None = None) -> str:
    """Bars for `values`; with `other`, that run's counts as an outline on the same bins."""
    edges = bins_for(values + (other or []), lo, hi)
    counts = _count(values, edges)
    ocounts = _count(other, edges) if other is not None else None
    top = max(counts + (ocounts or []) + [1])
    x0, x1 = edges[0][0], edges[-1][1]
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def sx(v: float) -> float:
        return PAD_L + (v - x0) / (x1 - x0) * pw

    def sy(c: float) -> float:
        return PAD_T + ph - c / top * ph

    out = [f'<svg class="hist" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
           f'aria-label="{escape(label)} histogram">']
    out.append(f'<line class="axis" x1="{PAD_L}" y1="{PAD_T + ph}" x2="{W - PAD_R}" y2="{PAD_T + ph}"/>')
    out.append(f'<text class="tick" x="{PAD_L - 4}" y="{PAD_T + 4}" text-anchor="end">{top}</text>')
    out.append(f'<text class="tick" x="{PAD_L - 4}" y="{PAD_T + ph}" text-anchor="end">0</text>')
    for (a, b), c in zip(edges, counts):
        if c:
            x, y = sx(a), sy(c)
            out.append(f'<rect class="bar" x="{x + 0.5:.1f}" y="{y:.1f}" width="{max(sx(b) - x - 1, 1):.1f}" '
                       f'height="{PAD_T + ph - y:.1f}"><title>{fmt(a)} to {fmt(b)}: {c}</title></rect>')
    if ocounts is not None:
        pts = []
        for (a, b), c in zip(edges, ocounts):
            pts += [f"{sx(a):.1f},{sy(c):.1f}", f"{sx(b):.1f},{sy(c):.1f}"]
        out.append(f'<polyline class="other" points="{" ".join(pts)}"/>')
    lo_t, hi_t = (edges[0][0] + 0.5, edges[-1][1] - 0.5) if edges[0][1] - edges[0][0] == 1 else (x0, x1)
    for v, anchor in ((lo_t, "start"), ((lo_t + hi_t) / 2, "middle"), (hi_t, "end")):
        out.append(f'<text class="tick" x="{sx(v):.1f}" y="{H - 10}" text-anchor="{anchor}">{fmt(v)}</text>')
    if values:
        m = sum(values) / len(values)
        out.append(f'<line class="mean" x1="{sx(m):.1f}" y1="{PAD_T - 4}" x2="{sx(m):.1f}" y2="{PAD_T + ph}">'
                   f'<title>mean {m:.3f}</title></line>')
        out.append(f'<text class="meanlabel" x="{min(max(sx(m), PAD_L + 20), W - PAD_R - 20):.1f}" y="{PAD_T - 5}" '
                   f'text-anchor="middle">mean {m:.2f}</text>')
    out.append("</svg>")
    return "".join(out)


def scatter(points: list[tuple[float, float, str]], lo: float, hi: float, xlabel: str, ylabel: str,
            limit: int = 2000) -> tuple[str, int]:
    """(x, y, id) points with the y = x diagonal; returns the SVG and how many points it drew
    (an even subsample past `limit`, so a 10,000-item comparison stays light)."""
    w, h, pl, pb, pt, pr = 340, 300, 40, 34, 10, 10
    step = max(1, -(-len(points) // limit))
    shown = points[::step]
    pw, ph = w - pl - pr, h - pt - pb

    def sx(v: float) -> float:
        return pl + (v - lo) / (hi - lo) * pw

    def sy(v: float) -> float:
        return pt + ph - (v - lo) / (hi - lo) * ph

    out = [f'<svg class="scatter" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
           f'aria-label="{escape(ylabel)} against {escape(xlabel)}">',
           f'<rect class="frame" x="{pl}" y="{pt}" width="{pw}" height="{ph}"/>',
           f'<line class="diag" x1="{sx(lo):.1f}" y1="{sy(lo):.1f}" x2="{sx(hi):.1f}" y2="{sy(hi):.1f}"/>']
    titled = len(shown) <= 500  # a tooltip per point is worth its bytes only on small jobs
    for x, y, ident in shown:
        t = f"<title>{escape(ident)}: {x:.3f} → {y:.3f}</title>" if titled else ""
        out.append(f'<circle class="pt" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6">{t}</circle>')
    for v, anchor in ((lo, "start"), ((lo + hi) / 2, "middle"), (hi, "end")):
        out.append(f'<text class="tick" x="{sx(v):.1f}" y="{h - 20}" text-anchor="{anchor}">{fmt(v)}</text>')
        out.append(f'<text class="tick" x="{pl - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{fmt(v)}</text>')
    out.append(f'<text class="axlabel" x="{pl + pw / 2:.1f}" y="{h - 4}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text class="axlabel" x="12" y="{pt + ph / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 12 {pt + ph / 2:.1f})">{escape(ylabel)}</text>')
    out.append("</svg>")
    return "".join(out), len(shown)
