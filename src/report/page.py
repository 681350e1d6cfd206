"""The HTML page: static sections rendered here, the items table rendered in the browser.

Everything a record says (ids, instructions, judge answers, errors, paths) is untrusted text. In
the static part it goes through `html.escape`; for the table it travels as JSON inside a
`<script type="application/json">` block with `<`, `>` and `&` written as \\u escapes (so no
string can close the block), and the page's script only ever assigns it to `textContent`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import svg
from .data import Comparison, SideInfo, judge_scale, ok, value_range
from .thumbs import ThumbCache

_HERE = Path(__file__).resolve().parent
BUILTIN_COLS = {"line", "thumbs", "id", "category", "instruction", "score", "other", "delta", "status"}


@dataclass(frozen=True)
class PageOptions:
    top: int = 8               # best / worst / most changed items shown side by side
    thumb_px: int = 96         # longest side of an embedded thumbnail
    max_thumbs: int = 2000     # distinct images embedded at most; the rest are listed by path
    page_size: int = 50        # table rows per page
    raw_chars: int = 4000      # a judge answer longer than this is clipped in the page
    title: str | None = None


def _e(v: Any) -> str:
    return escape("" if v is None else str(v), quote=True)


def _num(v: Any, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _int(n: int) -> str:
    return f"{n:,}"


def _ci(st: dict[str, Any], digits: int = 3) -> str:
    """A stats block's 95% interval of the mean, or a dash where there is none (fewer than 2 values)."""
    ci = st.get("ci95")
    return "—" if not ci else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _json_for_script(data: Any) -> str:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _clip(v: Any, limit: int) -> Any:
    if isinstance(v, str):
        return v if len(v) <= limit else v[:limit] + f"… [clipped: {len(v):,} characters in all]"
    if isinstance(v, dict):
        return {str(k): _clip(x, limit) for k, x in v.items()}
    if isinstance(v, list):
        return [_clip(x, limit) for x in v]
    if isinstance(v, float):
        return round(v, 4) if math.isfinite(v) else str(v)  # NaN is not JSON; show it as text
    return v


def _r4(v: Any) -> float | None:
    return None if v is None else round(float(v), 4)


class _Page:
    def __init__(self, this: SideInfo, cmp: Comparison | None, opts: PageOptions):
        self.this, self.cmp, self.o = this, cmp, opts
        self.subs: list[str] = this.summary["sub_score_names"]
        self.sub_keys = [s if s not in BUILTIN_COLS else f"sub.{s}" for s in self.subs]
        self.scale = judge_scale(this.model) or (judge_scale(cmp.other.model) if cmp else None)
        self.thumbs = ThumbCache(px=opts.thumb_px, max_thumbs=opts.max_thumbs)
        self.base = this.path.parent
        scored = sorted((r for r in this.records if ok(r)), key=lambda r: (-r["score"], r["line"]))
        self.best = scored[:opts.top]
        self.worst = scored[::-1][:opts.top]
        self.rose: list[dict[str, Any]] = []
        self.fell: list[dict[str, Any]] = []
        if cmp:
            moved = [r for r in this.records if ok(r) and r["id"] in cmp.by_id and ok(cmp.by_id[r["id"]])]
            moved.sort(key=lambda r: (-(r["score"] - cmp.by_id[r["id"]]["score"]), r["line"]))
            self.rose = [r for r in moved[:opts.top] if r["score"] - cmp.by_id[r["id"]]["score"] > 1e-9]
            self.fell = [r for r in moved[::-1][:opts.top] if r["score"] - cmp.by_id[r["id"]]["score"] < -1e-9]

    # ---- images
    def _register(self) -> None:
        """Embed the pictures a reader looks at first (best, worst, most changed), then the rest in
        table order, so the thumbnail limit drops only pictures deep in the table."""
        first = self.best + self.worst + self.rose + self.fell
        for r in first + [r for r in self.this.records if not ok(r)] + self.this.records:
            for p in (r.get("source_images") or []) + (r.get("images") or []):
                self.thumbs.want(p, self.base)
        if self.cmp:
            for r in self.rose + self.fell:
                for p in self._other_images(r):
                    self.thumbs.want(p, self.cmp.other.path.parent)

    def _other_images(self, r: dict[str, Any]) -> list[str]:
        """The other run's images for this item, when they differ from this run's (a model change)."""
        o = self.cmp.by_id.get(r["id"]) if self.cmp else None
        if not o:
            return []
        imgs = o.get("images") or []
        return imgs if imgs != (r.get("images") or []) else []

    def _imgs_html(self, paths: list[str], base: Path) -> str:
        out = []
        for p in paths[:3]:
            t_idx = self.thumbs.want(p, base)
            t = self.thumbs.thumbs[t_idx]
            if t.data_uri:
                out.append(f'<img class="th" data-t="{t_idx}" alt="{_e(p)}" title="{_e(p)}">')
            else:
                label = "missing" if (t.reason or "").startswith("missing") else "no image"
                out.append(f'<span class="ph" title="{_e(t.reason)}&#10;{_e(p)}">{label}</span>')
        if len(paths) > 3:
            out.append(f'<span class="more">+{len(paths) - 3}</span>')
        return f'<div class="imgs">{"".join(out)}</div>'

    def _pair_html(self, r: dict[str, Any], other_images: list[str] | None = None) -> str:
        parts = []
        if r.get("source_images"):
            parts.append(self._imgs_html(r["source_images"], self.base))
            parts.append('<span class="arrow">→</span>')
        parts.append(self._imgs_html(r.get("images") or [], self.base) if r.get("images")
                     else '<span class="ph">no image</span>')
        if other_images:
            parts.append('<span class="arrow" title="the other run\'s image">vs</span>')
            parts.append(self._imgs_html(other_images, self.cmp.other.path.parent))
        return f'<div class="pair">{"".join(parts)}</div>'

    # ---- the records, as the table's data
    def _payload(self) -> dict[str, Any]:
        recs = []
        cmp = self.cmp
        for i, r in enumerate(self.this.records):
            good = ok(r)
            sub = r.get("sub_scores") or {}
            md = {k: v for k, v in (r.get("metadata") or {}).items() if k != "category"}
            d: dict[str, Any] = {
                "id": r["id"], "ln": r["line"], "s": _r4(r["score"]),
                "ss": [_r4(sub.get(s)) for s in self.subs],
                "c": None if r.get("category") is None else str(r["category"]), "t": _clip(r.get("instruction"), self.o.raw_chars),
                "ek": None if good else (r.get("error_kind") or "unknown"),
                "e": None if r.get("error") is None else _clip(str(r["error"]), self.o.raw_chars),
                "im": [self.thumbs.want(p, self.base) for p in r.get("images") or []],
                "so": [self.thumbs.want(p, self.base) for p in r.get("source_images") or []],
                "raw": _clip(r.get("raw") or {}, self.o.raw_chars), "md": _clip(md, self.o.raw_chars),
            }
            if cmp:
                o = cmp.by_id.get(r["id"])
                d["o"] = _r4(o["score"]) if o and ok(o) else None
                d["d"] = _r4(r["score"] - o["score"]) if o and ok(o) and good else None
                if o is None:
                    d["os"] = "absent from the other run"
                elif ok(o):
                    d["os"] = f"scored {o['score']:.3f}"
                else:
                    d["os"] = f"failed there ({o.get('error_kind') or 'unknown'}): {o.get('error')}"
            recs.append(d)
        return {"subs": self.subs, "subKeys": self.sub_keys, "recs": recs, "compare": cmp is not None,
                "scale": list(self.scale) if self.scale else None, "pageSize": self.o.page_size,
                "cats": sorted(self.this.summary["categories"])}

    # ---- static sections
    def _cards(self) -> str:
        s = self.this.summary
        sc = s["score"]
        pct = f"{100 * s['scored'] / s['items']:.1f}% of items" if s["items"] else ""
        cards = [
            ("items", "n-items", s["items"], _int(s["items"]), "", ""),
            ("scored", "n-scored", s["scored"], _int(s["scored"]), pct, ""),
            ("failed", "n-failed", s["failed"], _int(s["failed"]),
             ", ".join(f"{k} {v}" for k, v in s["failures_by_kind"].items()) or "none", " bad" if s["failed"] else ""),
            ("mean score", "mean-score", sc["mean"], _num(sc["mean"]),
             f"95% CI {_ci(sc)} · std {_num(sc['std'])} · {_num(sc['min'], 2)} to {_num(sc['max'], 2)}"
             if sc["count"] else "no scores", ""),
        ]
        if self.cmp:
            st = self.cmp.stats
            cards.append(("mean Δ vs other", "mean-delta", st["mean"],
                          "—" if st["mean"] is None else f"{st['mean']:+.3f}",
                          f"over {_int(self.cmp.both_scored)} items scored in both · 95% CI {_ci(st)}", " other"))
        out = ['<section id="summary" class="cards">']
        for label, ident, value, text, sub, cls in cards:
            dv = "" if value is None else f' data-value="{_e(value)}"'
            out.append(f'<div class="card{cls}"><div class="k">{_e(label)}</div>'
                       f'<div class="n" id="{ident}"{dv}>{_e(text)}</div><div class="s">{_e(sub)}</div></div>')
        out.append("</section>")
        return "".join(out)

    @staticmethod
    def _model_table(side: SideInfo) -> str:
        rows = []
        m = side.model
        if isinstance(m, dict):
            rows.append(("class_path", m.get("class_path")))
            params = m.get("params") or m.get("init_args") or {}
            if isinstance(params, dict):
                for k, v in params.items():
                    rows.append((k, v if isinstance(v, (str, int, float, bool)) or v is None
                                 else json.dumps(v, ensure_ascii=False, default=str)))
        elif m is not None:
            rows.append(("model", json.dumps(m, ensure_ascii=False, default=str)))
        rows.append(("fingerprint", ", ".join(side.fingerprints) or "—"))
        js = side.job_summary or {}
        if js.get("elapsed_s") is not None:
            rows.append(("job time", f"{js['elapsed_s']:.1f} s"))
        lat = js.get("latency_s_per_item") or {}
        if lat.get("mean") is not None:
            rows.append(("per item", f"{lat['mean']:.3f} s (mean)"))
        if js.get("resumed_from_disk"):
            rows.append(("resumed", f"{js['resumed_from_disk']} items from an earlier run"))
        body = "".join(f'<tr><th>{_e(k)}</th><td class="mono">{_e(v)}</td></tr>' for k, v in rows)
        notes = "".join(f"<li>{_e(n)}</li>" for n in side.notes)
        return (f'<table class="kv">{body}</table>' + (f'<ul class="notes">{notes}</ul>' if notes else ""))

    def _model_panel(self) -> str:
        if not self.cmp:
            return f'<div class="panel" id="model"><h2>Model and settings</h2>{self._model_table(self.this)}</div>'
        return (f'<div class="panel" id="model"><h2>Model and settings</h2>'
                f'<h3>this run</h3>{self._model_table(self.this)}'
                f'<h3>other run · <span class="mono">{_e(self.cmp.other.path)}</span></h3>'
                f'{self._model_table(self.cmp.other)}</div>')

    def _failures_panel(self) -> str:
        s = self.this.summary
        if not s["failed"]:
            return '<div class="panel" id="failures"><h2>Failures by cause</h2><p class="muted">No failures: every item was scored.</p></div>'
        example: dict[str, str] = {}
        for f in s["failures"]:
            example.setdefault(f.get("kind") or "unknown", f.get("error") or "")
        rows = "".join(f'<tr><td><a href="#status=failed&amp;q={_e(quote(k))}">{_e(k)}</a></td><td>{_int(n)}</td>'
                       f'<td class="err" title="{_e(example.get(k))}">{_e(example.get(k))}</td></tr>'
                       for k, n in s["failures_by_kind"].items())
        return ('<div class="panel" id="failures"><h2>Failures by cause</h2>'
                '<table class="stats"><thead><tr><th>cause</th><th>items</th><th>example</th></tr></thead>'
                f'<tbody>{rows}</tbody></table></div>')

    def _stats_panel(self) -> str:
        s = self.this.summary
        names = ["score"] + self.subs
        cmp_cols = self.cmp is not None
        head = ("<th></th><th>count</th><th>mean</th><th>95% CI</th><th>std</th><th>stderr</th><th>min</th>"
                "<th>max</th>")
        if cmp_cols:
            head += "<th>other mean</th><th>mean Δ</th>"
        rows = []
        for n in names:
            st = s[n]
            cells = (f"<td>{_e(n.replace('_', ' '))}</td><td>{_int(st['count'])}</td><td>{_num(st['mean'])}</td>"
                     f"<td>{_ci(st)}</td><td>{_num(st['std'])}</td><td>{_num(st['stderr'])}</td>"
                     f"<td>{_num(st['min'])}</td><td>{_num(st['max'])}</td>")
            if cmp_cols:
                ost = self.cmp.other.summary.get(n) or {}
                dst = self.cmp.stats if n == "score" else self.cmp.sub_stats.get(n, {})
                cells += f"<td>{_num(ost.get('mean'))}</td><td>{_num(dst.get('mean'))}</td>"
            rows.append(f'<tr data-name="{_e(n)}">{cells}</tr>')
        figs = []
        for n in names:
            vals = self._values(self.this.records, n)
            other = self._values(self.cmp.other.records, n) if self.cmp else None
            lo, hi, zoom = self._axis(vals + (other or []))
            figs.append(f'<figure><figcaption>{_e(n.replace("_", " "))} <span class="muted">· {_int(len(vals))} '
                        f'values{_e(zoom)}</span></figcaption>{svg.histogram(vals, lo, hi, n, other)}</figure>')
        legend = ('<div class="legend"><span class="sw a"></span>this run<span class="sw b"></span>other run</div>'
                  if self.cmp else "")
        return ('<section class="panel" id="stats"><h2>Scores</h2>'
                f'<table class="stats"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
                f'{legend}<div class="hists">{"".join(figs)}</div></section>')

    def _axis(self, values: list[float]) -> tuple[float, float, str]:
        """The judge's scale, or the data's own range when the scores crowd into under a quarter
        of it (common in logits mode), so the histogram shows their shape instead of one spike."""
        lo, hi = value_range(values, self.scale)
        if values and (lo, hi) == self.scale:
            a, b = min(values), max(values)
            if b - a < 0.25 * (hi - lo):
                note = f" · zoomed in (scale {svg.fmt(lo)} to {svg.fmt(hi)})"
                if all(float(v).is_integer() for v in values):  # keep one bin per level
                    return max(a - 1, lo), min(b + 1, hi), note
                pad = max((b - a) * 0.05, 0.01)
                return a - pad, b + pad, note
        return lo, hi, ""

    def _values(self, records: list[dict[str, Any]], name: str) -> list[float]:
        if name == "score":
            return [r["score"] for r in records if ok(r)]
        return [v for r in records if (v := (r.get("sub_scores") or {}).get(name)) is not None]

    def _categories_panel(self) -> str:
        cats = self.this.summary["categories"]
        if not cats:
            return ""
        head = ("<th>category</th><th>items</th><th>scored</th><th>failed</th><th>mean score</th><th>95% CI</th>"
                "<th>std</th>"
                + "".join(f"<th>{_e(n.replace('_', ' '))}</th>" for n in self.subs))
        rows = []
        for c, b in cats.items():
            subs = "".join(f"<td>{_num(b[n]['mean'])}</td>" for n in self.subs)
            rows.append(f'<tr data-cat="{_e(c)}"><td><a href="#cat={_e(quote(c))}">{_e(c)}</a></td><td>{_int(b["items"])}</td>'
                        f'<td>{_int(b["scored"])}</td><td>{_int(b["failed"])}</td><td>{_num(b["score"]["mean"])}</td>'
                        f'<td>{_ci(b["score"])}</td><td>{_num(b["score"]["std"])}</td>{subs}</tr>')
        return ('<section class="panel" id="categories"><h2>By category</h2>'
                f'<table class="stats"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></section>')

    def _rank_list(self, recs: list[dict[str, Any]], kind: str) -> str:
        if not recs:
            return '<p class="muted">No scored items.</p>' if kind != "cmp" else '<p class="muted">None.</p>'
        items = []
        for k, r in enumerate(recs, 1):
            sub = r.get("sub_scores") or {}
            subs = " · ".join(f"{n.replace('_', ' ')} {_num(sub.get(n), 2)}" for n in self.subs)
            if kind == "cmp":
                o = self.cmp.by_id[r["id"]]
                big = f'{r["score"] - o["score"]:+.3f}'
                subs = f"this {r['score']:.3f} · other {o['score']:.3f}"
                pair = self._pair_html(r, self._other_images(r))
            else:
                big = _num(r["score"])
                pair = self._pair_html(r)
            instr = r.get("instruction")
            items.append(
                f'<li data-id="{_e(r["id"])}"><span class="pos">{k}</span>{pair}<div class="info">'
                f'<div class="big">{_e(big)}</div><div class="subs">{_e(subs)}</div>'
                f'<a class="id" href="#q={_e(quote(r["id"]))}&amp;open={_e(quote(r["id"]))}">{_e(r["id"])}</a>'
                + (f'<div class="instr" title="{_e(instr)}">{_e(instr)}</div>' if instr else "")
                + "</div></li>")
        return f'<ol class="rank">{"".join(items)}</ol>'

    def _extremes(self) -> str:
        n_scored = self.this.summary["scored"]
        note = (f'<p class="muted">Only {_int(n_scored)} items were scored, so the two lists overlap.</p>'
                if 0 < n_scored < 2 * self.o.top else "")
        return (f'<section class="grid2" id="extremes">'
                f'<div class="panel best" id="best"><h2>Highest scored</h2>{note}{self._rank_list(self.best, "best")}</div>'
                f'<div class="panel worst" id="worst"><h2>Lowest scored</h2>{note}{self._rank_list(self.worst, "worst")}</div>'
                f'</section>')

    def _compare_section(self) -> str:
        c = self.cmp
        if c is None:
            return ""
        st = c.stats
        cards = [("matched by id", _int(c.matched), f"{_int(c.both_scored)} scored in both"),
                 ("mean |Δ|", _num(st["mean_abs"]), f"Δ std {_num(st['std'])}"),
                 ("Pearson r", _num(st["pearson"]), "linear agreement"),
                 ("Spearman ρ", _num(st["spearman"]), "rank agreement"),
                 ("higher / lower / same", f"{st['higher']} / {st['lower']} / {st['same']}", "this run vs other"),
                 ("only here / only there", f"{len(c.only_this)} / {len(c.only_other)}", "ids in one file only"),
                 ("newly failed / newly scored", f"{len(c.newly_failed)} / {len(c.newly_scored)}",
                  "failed here but scored there / the reverse")]
        card_html = "".join(f'<div class="card other"><div class="k">{_e(k)}</div><div class="n">{_e(v)}</div>'
                            f'<div class="s">{_e(s)}</div></div>' for k, v, s in cards)
        pts = [(c.by_id[r["id"]]["score"], r["score"], r["id"]) for r in self.this.records
               if ok(r) and r["id"] in c.by_id and ok(c.by_id[r["id"]])]
        lo, hi, zoom = self._axis([p[0] for p in pts] + [p[1] for p in pts])
        scat, shown = svg.scatter(pts, lo, hi, "other run's score", "this run's score")
        sample = (f" ({_int(shown)} of {_int(len(pts))} points drawn)" if shown < len(pts) else "") + zoom
        deltas = [p[1] - p[0] for p in pts]
        m = max([abs(d) for d in deltas] + [1e-3])
        dhist = svg.histogram(deltas, -m, m, "score difference")
        sub_rows = "".join(f"<tr><td>{_e(n.replace('_', ' '))}</td><td>{_int(s['count'])}</td><td>{_num(s['mean'])}</td>"
                           f"<td>{_ci(s)}</td><td>{_num(s['std'])}</td></tr>" for n, s in c.sub_stats.items())
        sub_table = ('<table class="stats"><thead><tr><th>sub-score</th><th>pairs</th><th>mean Δ</th><th>95% CI</th>'
                     '<th>std</th></tr>'
                     f'</thead><tbody>{sub_rows}</tbody></table>') if sub_rows else ""

        def idlist(label: str, ids: list[str]) -> str:
            if not ids:
                return ""
            shown_ids = ", ".join(f'<span class="mono">{_e(i)}</span>' for i in ids[:30])
            more = f" and {len(ids) - 30:,} more" if len(ids) > 30 else ""
            return f"<p><b>{_e(label)}</b> ({len(ids):,}): {shown_ids}{more}</p>"

        return (f'<section class="panel" id="compare"><h2>Compared with <span class="mono">{_e(c.other.path)}</span></h2>'
                f'<p class="muted">Items matched by id. Δ = this run\'s score − the other run\'s score.'
                + (f" {c.duplicates} duplicate ids: the first record of each is used." if c.duplicates else "")
                + f'</p><div class="cards">{card_html}</div>'
                f'<div class="cmpgrid" style="margin-top:14px"><figure class="hists" style="margin:0"><div>'
                f'<div class="legend">each point is one item{_e(sample)}; the dashed line is "no change"</div>{scat}</div></figure>'
                f'<div><h3>distribution of Δ</h3><div class="hists"><figure>{dhist}</figure></div>{sub_table}'
                f'{idlist("newly failed", c.newly_failed)}{idlist("newly scored", c.newly_scored)}'
                f'{idlist("only in this run", c.only_this)}{idlist("only in the other run", c.only_other)}</div></div>'
                f'<div class="grid2" style="margin-top:14px">'
                f'<div id="rose"><h3>rose most</h3>{self._rank_list(self.rose, "cmp")}</div>'
                f'<div id="fell"><h3>fell most</h3>{self._rank_list(self.fell, "cmp")}</div></div></section>')

    def _table_section(self) -> str:
        return ('<section class="panel" id="table-section"><h2>Items</h2>'
                '<div class="controls"><input id="f-q" type="search" placeholder="search id, instruction, category, error">'
                '<select id="f-status"><option value="all">all items</option><option value="scored">scored</option>'
                '<option value="failed">failed</option></select>'
                '<select id="f-cat"><option value="">all categories</option></select><select id="f-size"></select>'
                '<span class="muted">click a column to sort · ▸ shows the judge\'s answer</span></div>'
                '<div class="tablewrap"><table class="items" id="items"><thead></thead><tbody></tbody></table></div>'
                '<div class="pager"><button id="p-first" type="button">«</button><button id="p-prev" type="button">‹ prev</button>'
                '<button id="p-next" type="button">next ›</button><button id="p-last" type="button">»</button>'
                '<span id="p-info"></span></div></section>')

    def _failed_list(self) -> str:
        fails = [r for r in self.this.records if not ok(r)]
        if not fails:
            return ""
        cap = 200
        items = "".join(f'<li data-id="{_e(r["id"])}"><a class="mono" href="#q={_e(quote(r["id"]))}&amp;open={_e(quote(r["id"]))}">{_e(r["id"])}</a> '
                        f'<span class="badge bad">{_e(r.get("error_kind") or "unknown")}</span> {_e(r.get("error"))}</li>'
                        for r in fails[:cap])
        more = (f'<p class="muted">and {_int(len(fails) - cap)} more: filter the table by "failed".</p>'
                if len(fails) > cap else "")
        return (f'<section class="panel" id="failed-items"><h2>Failed items ({_int(len(fails))})</h2>'
                f'<ul class="fails">{items}</ul>{more}</section>')

    def render(self) -> str:
        self._register()
        payload = self._payload()
        self.thumbs.build()
        payload["thumbs"] = [[t.path, t.data_uri, t.reason] for t in self.thumbs.thumbs]
        p = self.this.path
        title = self.o.title or f"Scoring report · {p.parent.name or p.name}"
        mtime = time.strftime("%Y-%m-%d %H:%M", time.localtime(p.stat().st_mtime))
        counts = self.thumbs.counts()
        thumb_note = (f"Thumbnails: {_int(counts['embedded'])} embedded ({self.o.thumb_px}px JPEG), "
                      f"{_int(counts['missing'])} missing, {_int(counts['unreadable'])} unreadable, "
                      f"{_int(counts['not embedded'])} over the limit of {_int(self.o.max_thumbs)}.")
        css = (_HERE / "report.css").read_text(encoding="utf-8")
        js = (_HERE / "report.js").read_text(encoding="utf-8")
        return "".join([
            '<!doctype html><html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title><style>{css}</style></head><body>",
            f'<header class="top"><h1>{_e(title)}</h1><div class="meta">{_e(p)} · {_int(len(self.this.records))} records'
            f' · written {_e(mtime)} · report made {_e(time.strftime("%Y-%m-%d %H:%M"))}</div></header><main>',
            self._cards(),
            f'<section class="grid2">{self._model_panel()}{self._failures_panel()}</section>',
            self._stats_panel(), self._categories_panel(), self._extremes(), self._compare_section(),
            self._table_section(), self._failed_list(),
            f'</main><footer id="thumb-note" data-embedded="{counts["embedded"]}" data-missing="{counts["missing"]}">'
            f'{_e(thumb_note)}</footer>',
            f'<script type="application/json" id="report-data">{_json_for_script(payload)}</script>',
            f"<script>{js}</script></body></html>\n",
        ])


def render_page(this: SideInfo, cmp: Comparison | None, opts: PageOptions) -> str:
    return _Page(this, cmp, opts).render()
