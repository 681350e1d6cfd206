// The items table: sort, filter and page the embedded records; no network, no libraries.
// State lives in the URL hash (#sort=score&dir=desc&page=2&q=cat&status=failed&cat=color&size=50&open=ID)
// so a link or a headless browser opens the page already sorted.
// Every piece of record text goes in through textContent: instructions and judge answers are
// untrusted and must never become markup.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("report-data").textContent);
  const recs = D.recs;
  const thumbs = D.thumbs;
  const $ = (id) => document.getElementById(id);

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(v, digits) {
    return v === null || v === undefined ? "—" : Number(v).toFixed(digits === undefined ? 3 : digits);
  }

  // ---- thumbnails: static cards carry data-t="index"; the table builds its own
  function thumb(k) {
    const t = thumbs[k];
    if (t[1]) {
      const img = el("img", "th");
      img.src = t[1];
      img.alt = t[0];
      img.title = t[0];
      img.loading = "lazy";
      return img;
    }
    const ph = el("span", "ph", t[2] && t[2].indexOf("missing") === 0 ? "missing" : "no image");
    ph.title = (t[2] || "") + "\n" + t[0];
    return ph;
  }
  document.querySelectorAll("img[data-t]").forEach((img) => {
    const t = thumbs[Number(img.dataset.t)];
    if (t && t[1]) img.src = t[1];
  });
  function thumbsCell(r) {
    const box = el("div", "pair");
    const group = (list, cls) => {
      const g = el("div", "imgs " + cls);
      list.slice(0, 3).forEach((k) => g.appendChild(thumb(k)));
      if (list.length > 3) g.appendChild(el("span", "more", "+" + (list.length - 3)));
      return g;
    };
    if (r.so.length) {
      box.appendChild(group(r.so, "src"));
      box.appendChild(el("span", "arrow", "→"));
    }
    if (r.im.length) box.appendChild(group(r.im, "out"));
    else box.appendChild(el("span", "ph", "no image"));
    return box;
  }

  // ---- columns
  const cols = [{ key: "line", label: "#", num: true, get: (r) => r.ln },
                { key: "thumbs", label: "images" },
                { key: "id", label: "id", get: (r) => r.id },
                { key: "category", label: "category", get: (r) => r.c },
                { key: "instruction", label: "instruction", get: (r) => r.t },
                { key: "score", label: "score", num: true, get: (r) => r.s }];
  D.subs.forEach((name, j) => cols.push({ key: D.subKeys[j], label: name.replace(/_/g, " "), num: true,
                                          get: (r) => r.ss[j] }));
  if (D.compare) {
    cols.push({ key: "other", label: "other", num: true, get: (r) => r.o });
    cols.push({ key: "delta", label: "Δ", num: true, get: (r) => r.d });
  }
  cols.push({ key: "status", label: "status", get: (r) => (r.ek === null ? "" : r.ek) });
  const SIZES = [25, 50, 100, 200, 500].concat([25, 50, 100, 200, 500].indexOf(D.pageSize) < 0 ? [D.pageSize] : [])
    .sort((a, b) => a - b);
  const byKey = {};
  cols.forEach((c) => { byKey[c.key] = c; });

  // ---- state <-> hash
  const state = { sort: "line", dir: "asc", page: 1, q: "", status: "all", cat: "", size: D.pageSize, open: "" };
  function readHash() {
    const p = new URLSearchParams(location.hash.replace(/^#/, ""));
    state.sort = byKey[p.get("sort")] && byKey[p.get("sort")].get ? p.get("sort") : "line";
    state.dir = p.get("dir") === "desc" ? "desc" : "asc";
    state.page = Math.max(1, parseInt(p.get("page") || "1", 10) || 1);
    state.q = p.get("q") || "";
    state.status = ["scored", "failed"].indexOf(p.get("status")) >= 0 ? p.get("status") : "all";
    state.cat = p.get("cat") || "";
    state.open = p.get("open") || "";  // an item id whose judge's answer starts unfolded
    const size = parseInt(p.get("size") || "", 10);
    state.size = SIZES.indexOf(size) >= 0 ? size : D.pageSize;
  }
  function writeHash() {
    const p = new URLSearchParams();
    p.set("sort", state.sort);
    p.set("dir", state.dir);
    if (state.page > 1) p.set("page", state.page);
    if (state.q) p.set("q", state.q);
    if (state.status !== "all") p.set("status", state.status);
    if (state.cat) p.set("cat", state.cat);
    if (state.size !== D.pageSize) p.set("size", state.size);
    if (state.open) p.set("open", state.open);
    try { history.replaceState(null, "", "#" + p.toString()); } catch (e) { /* file:// in some browsers */ }
  }

  // ---- filter + sort
  function rows() {
    const q = state.q.toLowerCase();
    let out = recs.filter((r) => {
      if (state.status === "scored" && r.ek !== null) return false;
      if (state.status === "failed" && r.ek === null) return false;
      if (state.cat && r.c !== state.cat) return false;
      if (q) {
        const hay = [r.id, r.t, r.c, r.ek, r.e].join("\n").toLowerCase();
        if (hay.indexOf(q) < 0) return false;
      }
      return true;
    });
    const col = byKey[state.sort];
    const sign = state.dir === "desc" ? -1 : 1;
    out.sort((a, b) => {
      const x = col.get(a), y = col.get(b);
      const xn = x === null || x === undefined || x === "", yn = y === null || y === undefined || y === "";
      if (xn || yn) return xn === yn ? a.ln - b.ln : (xn ? 1 : -1);  // empty values last, both ways
      if (x < y) return -sign;
      if (x > y) return sign;
      return a.ln - b.ln;
    });
    return out;
  }

  // ---- the judge's answer, folded under a row
  function rawView(raw) {
    const box = el("div", "raw");
    const parts = Object.keys(raw || {});
    if (!parts.length) box.appendChild(el("p", "muted", "no judge answer recorded"));
    parts.forEach((part) => {
      const v = raw[part];
      const sec = el("div", "rawpart");
      sec.appendChild(el("h4", null, part.replace(/_/g, " ")));
      if (typeof v === "string") {
        sec.appendChild(el("pre", null, v));
      } else if (v && v.probs) {
        const levels = Object.keys(v.probs);
        const top = Math.max.apply(null, levels.map((k) => v.probs[k]).concat([1e-9]));
        const list = el("div", "probs");
        levels.forEach((k) => {
          const row = el("div", "prob");
          row.appendChild(el("span", "lvl", k));
          const bar = el("span", "pbar");
          const fill = el("span", "pfill");
          fill.style.width = (100 * v.probs[k] / top).toFixed(1) + "%";
          bar.appendChild(fill);
          row.appendChild(bar);
          row.appendChild(el("span", "pval", fmt(v.probs[k], 3)));
          list.appendChild(row);
        });
        sec.appendChild(list);
        if (v.level_mass !== undefined) {
          sec.appendChild(el("p", "muted", "probability the judge put on the level tokens: " + fmt(v.level_mass, 3)));
        }
      } else if (v && Array.isArray(v.answers)) {
        v.answers.forEach((a, i) => {
          sec.appendChild(el("div", "muted", "sample " + (i + 1) + ": score " + fmt((v.scores || [])[i], 2)));
          sec.appendChild(el("pre", null, a));
        });
      } else {
        sec.appendChild(el("pre", null, JSON.stringify(v, null, 2)));
      }
      box.appendChild(sec);
    });
    return box;
  }
  function detail(r, ncols) {
    const tr = el("tr", "detail");
    tr.hidden = true;
    const td = el("td");
    td.colSpan = ncols;
    const grid = el("div", "detailgrid");
    const left = el("div");
    if (r.t !== null) {
      left.appendChild(el("h4", null, "instruction"));
      left.appendChild(el("p", "instr-full", r.t));
    }
    if (r.e !== null) {
      left.appendChild(el("h4", null, "error (" + (r.ek || "unknown") + ")"));
      left.appendChild(el("pre", "err", r.e));
    }
    left.appendChild(el("h4", null, "images"));
    const ul = el("ul", "paths");
    r.so.forEach((k) => { ul.appendChild(el("li", null, "source: " + thumbs[k][0] + (thumbs[k][2] ? "  (" + thumbs[k][2] + ")" : ""))); });
    r.im.forEach((k) => { ul.appendChild(el("li", null, "image: " + thumbs[k][0] + (thumbs[k][2] ? "  (" + thumbs[k][2] + ")" : ""))); });
    left.appendChild(ul);
    if (r.md && Object.keys(r.md).length) {
      left.appendChild(el("h4", null, "metadata"));
      left.appendChild(el("pre", null, JSON.stringify(r.md, null, 2)));
    }
    if (D.compare) {
      left.appendChild(el("h4", null, "other run"));
      left.appendChild(el("p", null, r.os));
    }
    grid.appendChild(left);
    const right = el("div");
    right.appendChild(el("h4", null, "judge's answer"));
    right.appendChild(rawView(r.raw));
    grid.appendChild(right);
    td.appendChild(grid);
    tr.appendChild(td);
    return tr;
  }

  function scoreCell(v, withBar) {
    const td = el("td", "num");
    td.appendChild(el("span", "v", fmt(v)));
    if (withBar && v !== null && D.scale) {
      const bar = el("span", "sbar");
      const fill = el("span", "sfill");
      const f = (v - D.scale[0]) / (D.scale[1] - D.scale[0]);
      fill.style.width = (100 * Math.min(1, Math.max(0, f))).toFixed(1) + "%";
      bar.appendChild(fill);
      td.appendChild(bar);
    }
    return td;
  }

  function row(r) {
    const tr = el("tr", "item" + (r.ek === null ? "" : " failed"));
    tr.dataset.id = r.id;
    tr.dataset.line = r.ln;
    if (r.s !== null) tr.dataset.score = r.s;
    const tog = el("td", "tog");
    const btn = el("button", "fold", "▸");
    btn.type = "button";
    btn.title = "show the judge's answer";
    tog.appendChild(btn);
    tr.appendChild(tog);
    cols.forEach((c) => {
      let td;
      if (c.key === "thumbs") { td = el("td", "thumbs"); td.appendChild(thumbsCell(r)); }
      else if (c.key === "score") td = scoreCell(r.s, true);
      else if (c.key === "delta") {
        td = el("td", "num delta", r.d === null ? "—" : (r.d > 0 ? "+" : "") + fmt(r.d));
        if (r.d !== null) td.classList.add(r.d > 1e-9 ? "up" : r.d < -1e-9 ? "down" : "same");
      } else if (c.key === "line") td = el("td", "num line", r.ln);
      else if (c.num) td = scoreCell(c.get(r), false);
      else if (c.key === "status") {
        td = el("td", "status");
        if (r.ek === null) td.appendChild(el("span", "badge ok", "scored"));
        else {
          td.appendChild(el("span", "badge bad", r.ek || "failed"));
          td.appendChild(el("div", "errshort", r.e));
        }
      } else if (c.key === "instruction") td = el("td", "instr", r.t === null ? "" : r.t);
      else if (c.key === "id") td = el("td", "id", r.id);
      else td = el("td", c.key, c.get(r) === null ? "" : c.get(r));
      td.dataset.col = c.key;
      tr.appendChild(td);
    });
    return tr;
  }

  // ---- table skeleton
  const table = $("items");
  const thead = table.querySelector("thead");
  const tbody = table.querySelector("tbody");
  const hr = el("tr");
  hr.appendChild(el("th", "tog"));
  cols.forEach((c) => {
    const th = el("th", c.num ? "num" : null, c.label);
    th.dataset.col = c.key;
    if (c.get) {
      th.classList.add("sortable");
      th.tabIndex = 0;
      const go = () => {
        if (state.sort === c.key) state.dir = state.dir === "asc" ? "desc" : "asc";
        else { state.sort = c.key; state.dir = c.num && c.key !== "line" ? "desc" : "asc"; }
        state.page = 1;
        render(true);
      };
      th.addEventListener("click", go);
      th.addEventListener("keydown", (ev) => { if (ev.key === "Enter") go(); });
    }
    hr.appendChild(th);
  });
  thead.appendChild(hr);
  tbody.addEventListener("click", (ev) => {
    const btn = ev.target.closest("button.fold");
    if (!btn) return;
    const det = btn.closest("tr").nextElementSibling;
    det.hidden = !det.hidden;
    btn.textContent = det.hidden ? "▸" : "▾";
  });

  // ---- controls
  const q = $("f-q"), st = $("f-status"), cat = $("f-cat"), size = $("f-size");
  D.cats.forEach((c) => { const o = el("option", null, c); o.value = c; cat.appendChild(o); });
  if (!D.cats.length) cat.hidden = true;
  SIZES.forEach((n) => { const o = el("option", null, n + " per page"); o.value = n; size.appendChild(o); });
  let timer = null;
  q.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => { state.q = q.value; state.page = 1; render(true); }, 150); });
  st.addEventListener("change", () => { state.status = st.value; state.page = 1; render(true); });
  cat.addEventListener("change", () => { state.cat = cat.value; state.page = 1; render(true); });
  size.addEventListener("change", () => { state.size = Number(size.value); state.page = 1; render(true); });
  $("p-first").addEventListener("click", () => { state.page = 1; render(true); });
  $("p-prev").addEventListener("click", () => { state.page -= 1; render(true); });
  $("p-next").addEventListener("click", () => { state.page += 1; render(true); });
  $("p-last").addEventListener("click", () => { state.page = 1e9; render(true); });

  function render(push) {
    const all = rows();
    const pages = Math.max(1, Math.ceil(all.length / state.size));
    state.page = Math.min(Math.max(1, state.page), pages);
    const start = (state.page - 1) * state.size;
    const shown = all.slice(start, start + state.size);
    const frag = document.createDocumentFragment();
    const ncols = cols.length + 1;
    shown.forEach((r) => {
      const tr = row(r), det = detail(r, ncols);
      if (state.open && r.id === state.open) {
        det.hidden = false;
        tr.querySelector("button.fold").textContent = "▾";
      }
      frag.appendChild(tr);
      frag.appendChild(det);
    });
    tbody.replaceChildren(frag);
    thead.querySelectorAll("th.sortable").forEach((th) => {
      const on = th.dataset.col === state.sort;
      th.classList.toggle("sorted", on);
      th.setAttribute("aria-sort", on ? (state.dir === "asc" ? "ascending" : "descending") : "none");
      th.dataset.arrow = on ? (state.dir === "asc" ? "▲" : "▼") : "";
    });
    table.dataset.sort = state.sort;
    table.dataset.dir = state.dir;
    q.value = state.q; st.value = state.status; cat.value = state.cat; size.value = String(state.size);
    $("p-info").textContent = all.length
      ? "rows " + (start + 1).toLocaleString("en") + "–" + (start + shown.length).toLocaleString("en") + " of " +
        all.length.toLocaleString("en") + (all.length < recs.length ? " matching (" + recs.length.toLocaleString("en") + " in all)" : "") +
        " · page " + state.page + " of " + pages
      : "no items match";
    $("p-first").disabled = $("p-prev").disabled = state.page <= 1;
    $("p-next").disabled = $("p-last").disabled = state.page >= pages;
    if (push) writeHash();
  }

  window.addEventListener("hashchange", () => {
    readHash();
    render(false);
    $("table-section").scrollIntoView();
  });
  readHash();
  render(false);
  document.documentElement.dataset.ready = "1";
})();
