"""The HTML report: content, escaping, comparison, large jobs, bad input, and the page in a real
headless Chromium (Debian's `chromium`; installed here with apt-get when missing and possible).

Chromium runs with --dump-dom (the DOM after the page's script ran) and --screenshot; every
browser process is started in its own session and the test proves none is left afterwards.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from src.report import ReportError, write_report
from src.report.cli import main as report_main

ROOT = Path(__file__).resolve().parents[1]
APT_LINE = "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars"]
XSS = '<script>document.title="pwned"</script><img src=x onerror="document.title=\'pwned\'">make the sky pink'


# ---- a parsed page -------------------------------------------------------------------------

class Dom(HTMLParser):
    """Elements in document order: tag, attributes, and their text (including descendants')."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        e = {"tag": tag, "attrs": dict(attrs), "text": "", "ancestors": list(self._open)}
        self.elements.append(e)
        if tag not in self.VOID:
            self._open.append(e)

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i]["tag"] == tag:
                del self._open[i:]
                break

    def handle_data(self, data):
        for e in self._open:
            e["text"] += data

    def by_id(self, ident: str) -> dict:
        found = [e for e in self.elements if e["attrs"].get("id") == ident]
        assert found, f"no element with id {ident!r}"
        return found[0]

    def all(self, tag: str, cls: str | None = None) -> list[dict]:
        return [e for e in self.elements if e["tag"] == tag
                and (cls is None or cls in (e["attrs"].get("class") or "").split())]

    def inside(self, root: dict, tag: str) -> list[dict]:
        return [e for e in self.elements if e["tag"] == tag and any(a is root for a in e["ancestors"])]

    def row_ids(self) -> list[str]:
        return [e["attrs"]["data-id"] for e in self.all("tr", "item")]


# ---- fixtures: images, a job with failures, its comparison run ------------------------------

def _picture(path: Path, seed: int, size=(160, 120), fmt=None) -> str:
    rnd = random.Random(seed)
    im = Image.new("RGB", size, tuple(rnd.randrange(40, 230) for _ in range(3)))
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x, y = rnd.randrange(size[0]), rnd.randrange(size[1])
        d.ellipse([x - 25, y - 25, x + 25, y + 25], fill=tuple(rnd.randrange(256) for _ in range(3)))
    im.save(path, format=fmt)
    return str(path)


SUBS = ("perceptual_quality", "semantic_consistency")


def _rec(i: int, ident: str, score, sc=None, pq=None, category=None, images=(), sources=(), instruction=None,
         raw=None, error=None, kind=None, fp="fp-test-1"):
    return {"id": ident, "score": score,
            "sub_scores": {} if sc is None and pq is None else {"semantic_consistency": sc, "perceptual_quality": pq},
            "raw": raw or {}, "error": error, "error_kind": kind, "metadata": {"category": category} if category else {},
            "line": i, "fingerprint": fp, "images": list(images), "source_images": list(sources),
            "instruction": instruction, "category": category}


def _geo(sc, pq):
    return math.sqrt(sc * pq)


@pytest.fixture(scope="module")
def failing_job(tmp_path_factory):
    """A generate-mode edit job with 10 items: 7 scored, 3 failed (parse, missing image,
    undecodable image); categories; one instruction carrying markup; summary.json beside it."""
    d = tmp_path_factory.mktemp("failing")
    img = d / "img"
    img.mkdir()
    src = [_picture(img / f"src{k}.png", 100 + k) for k in range(3)]
    edits = [_picture(img / f"edit{k}.png", k) for k in range(6)]
    jpeg = _picture(img / "t2i.jpg", 77, size=(300, 200), fmt="JPEG")
    (img / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cats = ["color", "style", "object"]
    subs = [(7, 8), (3, 5), (9, 9), (5, 6), (2, 4), (6, 7), (8, 3)]
    recs = []
    for k, (sc, pq) in enumerate(subs):
        ident = f"edit-{k:02d}"
        raw = {"semantic_consistency": f'The edit mostly follows the instruction.\n{{"score": {sc}}}',
               "perceptual_quality": f'Clean result, few artifacts.\n{{"score": {pq}}}'}
        instr = XSS if k == 1 else f"make the object #{k} {cats[k % 3]}"
        images = [jpeg] if k == 6 else [edits[k]]
        sources = [] if k == 6 else [src[k % 3]]
        recs.append(_rec(k + 1, ident, _geo(sc, pq), sc, pq, cats[k % 3], images, sources, instr, raw))
    recs[4]["metadata"]["temperature"] = float("nan")  # JSON from Python may hold NaN in free fields
    recs.append(_rec(8, "edit-parse", None, None, 6, "color", [edits[0]], [src[0]], "add a hat",
                     {"semantic_consistency": "I cannot judge this <b>image</b>.", "perceptual_quality": '{"score": 6}'},
                     "item 'edit-parse' (#7): semantic_consistency: could not read a score from the answer", "parse"))
    recs.append(_rec(9, "edit-missing", None, category="style", images=[str(img / "gone.png")], sources=[src[1]],
                     instruction="remove the tree", error=f"item 'edit-missing' (#8): image not found: {img / 'gone.png'}",
                     kind="image"))
    recs.append(_rec(10, "edit-broken", None, category="object", images=[str(img / "broken.png")], sources=[src[2]],
                     instruction="make it night", error="item 'edit-broken' (#9): cannot decode image", kind="image"))
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    model = {"class_path": "multi_gpu", "params": {"model_name": "Qwen/Qwen2.5-VL-7B-Instruct", "mode": "generate",
                                                   "template": "edit", "device_ids": [0, 1]}}
    (d / "summary.json").write_text(json.dumps({"fingerprint": "fp-test-1", "model": model, "elapsed_s": 12.5}))
    return {"dir": d, "results": d / "results.jsonl", "records": recs, "images": set(src) | set(edits) | {jpeg}}


@pytest.fixture(scope="module")
def other_run(failing_job, tmp_path_factory):
    """The same job judged by another model: scores shifted per item; one id dropped, one added;
    edit-parse scored there (so it is 'newly failed' here)."""
    d = tmp_path_factory.mktemp("other")
    recs = []
    shift = {"edit-00": -1.0, "edit-01": 0.5, "edit-02": 0.0, "edit-03": 2.0, "edit-04": -0.25, "edit-05": 1.5}
    for r in failing_job["records"]:
        if r["id"] == "edit-06":
            continue
        o = json.loads(json.dumps(r))
        o["fingerprint"] = "fp-other"
        if r["id"] in shift:
            o["score"] = r["score"] - shift[r["id"]]
        elif r["id"] == "edit-parse":
            o.update(score=5.0, error=None, error_kind=None, sub_scores={"semantic_consistency": 5, "perceptual_quality": 5})
        recs.append(o)
    recs.append(_rec(11, "only-there", 4.0, 4, 4, "color", fp="fp-other"))
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return {"results": d / "results.jsonl", "shift": shift}


# ---- chromium ------------------------------------------------------------------------------

def _find_chromium() -> str | None:
    env = os.environ.get("REPORT_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


@pytest.fixture(scope="module")
def chromium():
    exe = _find_chromium()
    if exe is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["bash", "-c", APT_LINE], capture_output=True, timeout=900)
        exe = _find_chromium()
    if exe is None:
        pytest.skip(f"chromium not found and could not be installed here; CI installs it with: {APT_LINE}")
    return exe


def _session_alive(sid: int) -> list[str]:
    """Processes of session `sid` that still run (zombies are dead, only not yet reaped)."""
    alive = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            alive.append(f"{d} {stat.split()[1]} {fields[0]}")
    return alive


def _browse(chromium: str, tmp: Path, page: Path, fragment: str = "", *extra: str, timeout: float = 120):
    """Run headless chromium on the page; returns (stdout, seconds). Proves its processes are gone."""
    profile = tempfile.mkdtemp(prefix="chrome-profile-", dir=tmp)
    cmd = [chromium, *CHROME_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri() + fragment]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    dt = time.time() - t0
    deadline = time.time() + 10
    while _session_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    left = _session_alive(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"chromium left processes behind: {left}"
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}"
    return out.decode("utf-8"), dt


def _dom(chromium, tmp, page, fragment="") -> Dom:
    out, _ = _browse(chromium, tmp, page, fragment, "--dump-dom")
    dom = Dom(out)
    assert dom.by_id("items")["attrs"].get("data-sort"), "the page's script did not run"
    return dom


def _screenshot(chromium, tmp, page, name, fragment="", size=(1400, 2400)) -> Path:
    shot = tmp / name
    _browse(chromium, tmp, page, fragment, f"--screenshot={shot}", f"--window-size={size[0]},{size[1]}")
    assert shot.exists() and shot.stat().st_size > 20_000, "screenshot missing or nearly empty"
    with Image.open(shot) as im:
        assert im.size == size
        colors = im.convert("RGB").resize((200, 300)).getcolors(maxcolors=100_000)
        assert colors is not None and len(colors) > 50, "the screenshot is (nearly) one flat colour"
    return shot


# ---- the page for a job with failures --------------------------------------------------------

def _expected_order(recs, key, desc):
    ok = [r for r in recs if key(r) is not None]
    bad = [r for r in recs if key(r) is None]
    ok.sort(key=lambda r: (-key(r) if desc else key(r), r["line"]))
    return [r["id"] for r in ok] + [r["id"] for r in sorted(bad, key=lambda r: r["line"])]


def test_static_page_for_a_job_with_failures(failing_job, tmp_path):
    out = write_report(failing_job["results"], tmp_path / "report.html", top=3)
    html = out.read_text(encoding="utf-8")
    dom = Dom(html)
    assert dom.by_id("n-items")["attrs"]["data-value"] == "10"
    assert dom.by_id("n-scored")["attrs"]["data-value"] == "7"
    assert dom.by_id("n-failed")["attrs"]["data-value"] == "3"
    scores = [r["score"] for r in failing_job["records"] if r["score"] is not None]
    assert float(dom.by_id("mean-score")["attrs"]["data-value"]) == pytest.approx(sum(scores) / 7, abs=1e-5)
    # failures by cause, the model and settings from summary.json
    causes = {e["text"]: e for e in dom.inside(dom.by_id("failures"), "a")}
    assert set(causes) == {"parse", "image"}
    model = dom.by_id("model")["text"]
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in model and "generate" in model and "fp-test-1" in model
    # per category, per sub-score
    cats = {e["attrs"]["data-cat"]: e["text"] for e in dom.all("tr") if "data-cat" in e["attrs"]}
    assert set(cats) == {"color", "style", "object"}
    stats = {e["attrs"]["data-name"] for e in dom.all("tr") if "data-name" in e["attrs"]}
    assert stats == {"score", *SUBS}
    assert len(dom.all("svg", "hist")) == 3
    # best and worst, side by side
    ranked = sorted((r for r in failing_job["records"] if r["score"] is not None), key=lambda r: -r["score"])
    best = [e["attrs"]["data-id"] for e in dom.inside(dom.by_id("best"), "li")]
    worst = [e["attrs"]["data-id"] for e in dom.inside(dom.by_id("worst"), "li")]
    assert best == [r["id"] for r in ranked[:3]]
    assert worst == [r["id"] for r in ranked[::-1][:3]]
    # failed items listed with their error
    failed = dom.by_id("failed-items")["text"]
    for ident in ("edit-parse", "edit-missing", "edit-broken"):
        assert ident in failed
    assert "could not read a score" in failed
    # thumbnails: one per distinct readable image; the missing and the undecodable one say so
    note = dom.by_id("thumb-note")
    assert int(note["attrs"]["data-embedded"]) == len(failing_job["images"])
    assert int(note["attrs"]["data-missing"]) == 1
    assert "1 unreadable" in note["text"]
    assert html.count("data:image/jpeg;base64,") == len(failing_job["images"])
    # untrusted text never becomes markup
    assert "<script>document.title" not in html and 'onerror="document' not in html
    assert "\\u003cscript\\u003edocument.title" in html
    assert "no summary" not in html


def test_the_page_shows_each_means_95_interval_and_no_spread_for_one_item(tmp_path):
    # The page showed mean +- std, and a category of one item a std of 0.000. It now shows the
    # 95% interval and the standard error beside the mean, and a dash where there is one value.
    p = tmp_path / "results.jsonl"
    recs = [_rec(1, "a", 4.0, 4, 4, "pair"), _rec(2, "b", 6.0, 6, 6, "pair"), _rec(3, "c", 8.0, 8, 8, "alone")]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    dom = Dom(write_report(p, tmp_path / "report.html").read_text(encoding="utf-8"))
    head = [e["text"] for e in dom.inside(dom.by_id("stats"), "th")]
    assert head[:8] == ["", "count", "mean", "95% CI", "std", "stderr", "min", "max"]
    row = next(e for e in dom.all("tr") if e["attrs"].get("data-name") == "score")
    cells = [e["text"] for e in dom.inside(row, "td")]
    # mean 6, sample std 2, stderr 2/sqrt(3) = 1.1547, 95%: 6 -+ 1.96 x 1.1547
    assert cells == ["score", "3", "6.000", "[3.737, 8.263]", "2.000", "1.155", "4.000", "8.000"]
    assert "95% CI [3.737, 8.263] · std 2.000" in dom.by_id("summary")["text"]
    cats = {e["attrs"]["data-cat"]: [c["text"] for c in dom.inside(e, "td")] for e in dom.all("tr")
            if "data-cat" in e["attrs"]}
    assert cats["alone"][4:7] == ["8.000", "—", "—"]  # mean, 95% CI, std of one item
    assert cats["pair"][4:7] == ["5.000", "[3.040, 6.960]", "1.414"]


def test_browser_renders_sorts_filters_and_pages(failing_job, chromium, tmp_path):
    page = write_report(failing_job["results"], tmp_path / "report.html", top=3)
    recs = failing_job["records"]
    dom = _dom(chromium, tmp_path, page)
    assert dom.by_id("n-items")["text"].strip() == "10"
    assert dom.by_id("n-failed")["text"].strip() == "3"
    assert dom.row_ids() == [r["id"] for r in recs], "default order is the manifest's"
    assert "rows 1–10 of 10" in dom.by_id("p-info")["text"]
    # the untrusted instruction is a text node in its cell; nothing it says ran
    instr = [e for e in dom.all("td", "instr") if "make the sky pink" in e["text"]]
    assert instr and instr[0]["text"] == XSS
    assert dom.all("title")[0]["text"] != "pwned" and not [e for e in dom.all("img") if e["attrs"].get("src") == "x"]
    # failed rows carry their error; the parse failure's answer is folded under its row
    failed_rows = [e for e in dom.all("tr", "failed")]
    assert [e["attrs"]["data-id"] for e in failed_rows] == ["edit-parse", "edit-missing", "edit-broken"]
    assert "I cannot judge this <b>image</b>." in [e["text"] for e in dom.all("pre")]

    dom = _dom(chromium, tmp_path, page, "#sort=score&dir=desc")
    assert dom.row_ids() == _expected_order(recs, lambda r: r["score"], True)
    assert dom.by_id("items")["attrs"]["data-dir"] == "desc"
    dom = _dom(chromium, tmp_path, page, "#sort=score&dir=asc")
    assert dom.row_ids() == _expected_order(recs, lambda r: r["score"], False)
    dom = _dom(chromium, tmp_path, page, "#sort=perceptual_quality&dir=desc&status=failed&open=edit-parse")
    assert dom.row_ids() == ["edit-parse", "edit-missing", "edit-broken"]
    folded = ["hidden" in e["attrs"] for e in dom.all("tr", "detail")]
    assert folded == [False, True, True], "open=ID unfolds that item's answer, and only that one"
    dom = _dom(chromium, tmp_path, page, "#sort=semantic_consistency&dir=desc&cat=color")
    color = [r for r in recs if r["category"] == "color"]
    assert dom.row_ids() == _expected_order(color, lambda r: (r["sub_scores"] or {}).get("semantic_consistency"), True)

    paged = write_report(failing_job["results"], tmp_path / "paged.html", page_size=4)
    dom = _dom(chromium, tmp_path, paged, "#sort=score&dir=desc&page=2")
    assert dom.row_ids() == _expected_order(recs, lambda r: r["score"], True)[4:8]
    assert "page 2 of 3" in dom.by_id("p-info")["text"]
    shot = _screenshot(chromium, tmp_path, page, "failing.png", "#sort=score&dir=desc")
    print(f"screenshot: {shot}")


def test_compare_two_runs(failing_job, other_run, chromium, tmp_path):
    page = write_report(failing_job["results"], tmp_path / "cmp.html", compare=other_run["results"], top=3)
    html = page.read_text(encoding="utf-8")
    dom = Dom(html)
    shift = other_run["shift"]
    assert float(dom.by_id("mean-delta")["attrs"]["data-value"]) == pytest.approx(sum(shift.values()) / len(shift), abs=1e-5)
    cmp = dom.by_id("compare")["text"]
    assert "only in this run (1): edit-06" in " ".join(cmp.split())
    assert "only in the other run (1): only-there" in " ".join(cmp.split())
    assert "newly failed (1): edit-parse" in " ".join(cmp.split())
    rose = [e["attrs"]["data-id"] for e in dom.inside(dom.by_id("rose"), "li")]
    fell = [e["attrs"]["data-id"] for e in dom.inside(dom.by_id("fell"), "li")]
    assert rose == ["edit-03", "edit-05", "edit-01"]
    assert fell == ["edit-00", "edit-04"]
    assert len(dom.all("svg", "scatter")) == 1

    dom = _dom(chromium, tmp_path, page, "#sort=delta&dir=desc")
    order = sorted(shift, key=lambda k: (-shift[k], k))
    assert dom.row_ids()[:6] == order
    deltas = [e["text"] for e in dom.all("td", "delta")][:6]
    assert deltas == [f"{shift[k]:+.3f}" if shift[k] else "0.000" for k in order]
    _screenshot(chromium, tmp_path, page, "compare.png", "#sort=delta&dir=desc", size=(1400, 3400))


# ---- the real demo job, end to end -----------------------------------------------------------

@pytest.fixture(scope="module")
def demo_job(tmp_path_factory):
    """A real job: the tiny Qwen2.5-VL judge in logits mode with the edit rubric, report: true."""
    from src.job.runner import run_job

    d = tmp_path_factory.mktemp("demo")
    rows = []
    for k in range(4):
        s = _picture(d / f"src{k}.png", 200 + k, size=(64, 48))
        e = _picture(d / f"edit{k}.png", 300 + k, size=(64, 48))
        rows.append({"id": f"demo-{k}", "image": Path(e).name, "source_image": Path(s).name,
                     "instruction": f"make it look like {['winter', 'night', 'a painting', 'a sketch'][k]}",
                     "category": ["season", "light"][k % 2]})
    rows.append({"id": "demo-missing", "image": "nope.png", "source_image": "src0.png", "instruction": "add snow"})
    (d / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"model": {"class_path": "qwen_vl", "params": {"model_name": "tiny:qwen2_5_vl", "mode": "logits",
                                                         "template": "edit", "batch_size": 4}},
           "job": {"manifest": "manifest.jsonl", "output_dir": "out", "report": True}}
    summary = run_job(cfg, base=d, progress=False)
    return {"dir": d / "out", "summary": summary}


def test_demo_job_report_end_to_end(demo_job, chromium, tmp_path):
    out = demo_job["dir"]
    page = out / "report.html"
    assert page.exists(), "job.report: true must write report.html at the end of the job"
    s = demo_job["summary"]
    assert (s["items"], s["scored"], s["failed"]) == (5, 4, 1)
    # the CLI writes the same report
    proc = subprocess.run([sys.executable, "main.py", "report", str(out / "results.jsonl"), "--out",
                           str(tmp_path / "cli.html"), "--top", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and (tmp_path / "cli.html").exists()
    dom = _dom(chromium, tmp_path, page, "#sort=score&dir=desc")
    assert dom.by_id("n-items")["text"].strip() == "5"
    assert dom.by_id("n-scored")["text"].strip() == "4"
    assert float(dom.by_id("mean-score")["attrs"]["data-value"]) == pytest.approx(s["score"]["mean"], abs=1e-6)
    model = dom.by_id("model")["text"]
    assert "tiny:qwen2_5_vl" in model and "logits" in model and s["fingerprint"] in model
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert dom.row_ids() == _expected_order(recs, lambda r: r["score"] if r["error"] is None else None, True)
    # logits mode: the level probabilities are folded under each scored row
    assert len(dom.all("div", "probs")) == 4 * 2
    missing = [e for e in dom.all("span", "ph") if e["text"] == "missing"]
    assert missing, "the missing image shows a placeholder that says so"
    _screenshot(chromium, tmp_path, page, "demo.png")


# ---- a large job -----------------------------------------------------------------------------

def test_large_job_page_stays_small_and_fast(chromium, tmp_path):
    n = 10_000
    shared = [_picture(tmp_path / f"shared{k}.png", k, size=(512, 384)) for k in range(4)]
    rnd = random.Random(0)
    lines = []
    for i in range(n):
        failed = i % 97 == 0
        sc, pq = rnd.uniform(0, 9), rnd.uniform(0, 9)
        images = [] if i % 3 == 0 else [shared[i % 4]]
        sources = [] if i % 3 == 0 else [shared[(i + 1) % 4]]
        r = _rec(i + 1, f"item-{i:05d}", None if failed else _geo(sc, pq), None if failed else sc,
                 None if failed else pq, f"cat{i % 5}", images, sources, f"instruction number {i}",
                 {"semantic_consistency": {"probs": {str(d): 0.1 for d in range(10)}, "level_mass": 0.9}},
                 "item: could not read a score" if failed else None, "parse" if failed else None)
        lines.append(json.dumps(r))
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(lines) + "\n")
    t0 = time.time()
    page = write_report(results, tmp_path / "report.html")
    dt = time.time() - t0
    size = page.stat().st_size
    html = page.read_text(encoding="utf-8")
    print(f"10,000 records: {dt:.2f} s, {size / 1e6:.2f} MB")
    assert dt < 10, f"report took {dt:.1f} s"
    assert size < 8_000_000, f"page is {size / 1e6:.1f} MB"
    assert html.count("data:image/jpeg;base64,") == 4, "each distinct image is embedded once"
    out, load_s = _browse(chromium, tmp_path, page, "#sort=score&dir=desc", "--dump-dom")
    dom = Dom(out)
    print(f"chromium loaded and dumped it in {load_s:.1f} s")
    assert len(dom.row_ids()) == 50, "rows are paged"
    assert "of 10,000" in dom.by_id("p-info")["text"] and "page 1 of 200" in dom.by_id("p-info")["text"]
    scores = [float(e["attrs"]["data-score"]) for e in dom.all("tr", "item")]
    assert scores == sorted(scores, reverse=True)
    assert load_s < 60


def test_thumbnail_limit_keeps_the_best_and_worst(failing_job, tmp_path):
    page = write_report(failing_job["results"], tmp_path / "few.html", max_thumbs=2, top=1)
    dom = Dom(page.read_text(encoding="utf-8"))
    note = dom.by_id("thumb-note")
    assert note["attrs"]["data-embedded"] == "2" and "over the limit of 2" in note["text"]
    # the best item (edit-02: src2 -> edit2) got the two embedded pictures
    best = dom.inside(dom.by_id("best"), "img")
    assert [Path(e["attrs"]["alt"]).name for e in best] == ["src2.png", "edit2.png"]


# ---- bad input -------------------------------------------------------------------------------

BAD = [
    ("empty.jsonl", "", "no records (the file is empty)"),
    ("blank.jsonl", "\n  \n", "no records"),
    ("cut.jsonl", json.dumps(_rec(1, "a", 5.0)) + "\n" + json.dumps(_rec(2, "b", 4.0)) + "\n{\"id\": \"c\", \"sco",
     "cut.jsonl, line 3: not valid JSON"),
    ("list.jsonl", "[1, 2]\n", "list.jsonl, line 1: expected a JSON object"),
    ("manifest.jsonl", json.dumps({"id": "a", "image": "a.png"}) + "\n", "no 'score' field"),
    ("nan.jsonl", '{"id": "a", "score": NaN}\n', "line 1: 'score' must be a finite number"),
    ("text.jsonl", '{"id": "a", "score": "7"}\n', "'score' must be a finite number or null, got '7'"),
    ("subs.jsonl", '{"id": "a", "score": 1, "sub_scores": {"q": "high"}}\n', "sub-score 'q' must be"),
    # an int past float's range (JSON has no bound on its numbers): it stopped the report with an OverflowError
    ("huge.jsonl", '{"id": "a", "score": 1' + "0" * 400 + '}\n', "line 1: 'score' must be a finite number or null, got 1000"),
    ("huge_sub.jsonl", '{"id": "a", "score": 1, "sub_scores": {"q": 1' + "0" * 400 + '}}\n', "sub-score 'q' must be"),
    # and one of more digits than Python reads as a number: a ValueError traceback
    ("digits.jsonl", '{"id": "a", "score": 1' + "0" * 5000 + '}\n', "line 1: a number Python cannot read (Exceeds the limit"),
    # sub-scores named like the summary's own figures, which they overwrote: the mean score shown
    # was a sub-score's, and 'failed' stopped the report with a TypeError traceback
    ("failed.jsonl", json.dumps(_rec(1, "a", 5.0)) + "\n" + json.dumps({**_rec(2, "b", None), "sub_scores": {"failed": 3}})
     + "\n", "line 2: sub-score 'failed' has the name of one of the summary's own figures (categories, elapsed_s, "),
    ("score.jsonl", '{"id": "a", "score": 5, "sub_scores": {"score": 1, "x": 2}}\n', "line 1: sub-score 'score' has the"),
    ("items.jsonl", '{"id": "a", "score": 5, "sub_scores": {"items": 1}}\n', "which it would overwrite; rename that"),
    ("binary.jsonl", b"\xff\xfe\x00garbage", "not UTF-8"),
    # metadata that is no object stopped the page with an AttributeError traceback
    ("meta.jsonl", '{"id": "a", "score": 5, "metadata": "seed=3"}\n', "line 1: 'metadata' must be an object, got str"),
]


@pytest.mark.parametrize("name,content,message", BAD, ids=[b[0] for b in BAD])
def test_bad_results_file_is_a_clear_error_and_no_page(name, content, message, tmp_path):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "report.html"
    with pytest.raises(ReportError) as err:
        write_report(p, out)
    assert message in str(err.value) and str(p) in str(err.value)
    assert not out.exists() and not list(tmp_path.glob("*.html*"))


def test_scores_too_large_to_square_still_make_a_report(tmp_path):
    # A judge class's 1e308: the spread squared past the largest float, and ** raised OverflowError
    # (the page, and a finished job's summary, were lost); now the spread is infinite, and said so.
    from src.job.summary import stats

    spread = stats([1e308, -1e308, 0.0])
    assert spread["mean"] == 0.0 and spread["std"] == math.inf and spread["count"] == 3
    p = tmp_path / "results.jsonl"
    p.write_text("".join(json.dumps({"id": k, "score": s}) + "\n" for k, s in (("a", 1e308), ("b", -1e308), ("c", 0.0))))
    assert write_report(p, tmp_path / "report.html").exists()


def test_a_lone_templates_sub_score_named_score_is_its_score(tmp_path, capsys):
    # A job allows a lone template named 'score' (its sub-score is its score, the same figure): its
    # results make a report, with the overall mean; the same name holding other values is refused.
    p = tmp_path / "results.jsonl"
    p.write_text("".join(json.dumps({"id": k, "score": s, "sub_scores": {"score": s}}) + "\n"
                         for k, s in (("a", 4.0), ("b", 8.0), ("c", None))))
    dom = Dom(write_report(p, tmp_path / "report.html").read_text(encoding="utf-8"))
    assert float(dom.by_id("mean-score")["attrs"]["data-value"]) == pytest.approx(6.0)
    p.write_text(json.dumps({"id": "a", "score": 4.0, "sub_scores": {"score": 2.0}}) + "\n")
    assert report_main([str(p), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}, line 1: sub-score 'score' has the name of one of the summary's own "
                          "figures") and "Traceback" not in err, err
    assert not (tmp_path / "r.html").exists()


def test_cli_bad_input_exit_code_and_message(tmp_path, capsys):
    p = tmp_path / "results.jsonl"
    p.write_text(json.dumps(_rec(1, "a", 5.0)) + "\nnot json\n")
    assert report_main([str(p), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{p}, line 2: not valid JSON" in err
    assert not (tmp_path / "r.html").exists()
    assert report_main([str(tmp_path / "absent.jsonl")]) == 2
    assert "results file not found" in capsys.readouterr().err
    assert report_main([str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    good = tmp_path / "good" / "results.jsonl"
    good.parent.mkdir()
    good.write_text(json.dumps(_rec(1, "a", 5.0)) + "\n")
    assert report_main([str(good), "--compare", str(p)]) == 2, "a corrupt comparison file is an error too"
    assert "line 2" in capsys.readouterr().err and not (good.parent / "report.html").exists()
    assert report_main([str(good), "--top", "0"]) == 2
    assert "top: expected an integer >= 1" in capsys.readouterr().err
    assert report_main(["--nope"]) == 2


def test_a_page_that_cannot_be_written_is_one_line(tmp_path, capsys):
    # --out under a file (or a read-only folder) was a FileExistsError traceback.
    p = tmp_path / "results.jsonl"
    p.write_text(json.dumps(_rec(1, "a", 5.0)) + "\n")
    (tmp_path / "taken").write_text("a file\n")
    out = tmp_path / "taken" / "r.html"
    assert report_main([str(p), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: cannot write the report to {out}: File exists ({out.parent})\n"


def test_summary_json_missing_or_from_another_run(tmp_path):
    d = tmp_path / "job"
    d.mkdir()
    (d / "results.jsonl").write_text(json.dumps(_rec(1, "a", 5.0, fp="fp-A")) + "\n")
    page = write_report(d / "results.jsonl", d / "a.html")
    assert "no summary.json next to results.jsonl" in page.read_text()
    (d / "summary.json").write_text(json.dumps({"fingerprint": "fp-B", "model": {"class_path": "secret-model"}}))
    text = write_report(d / "results.jsonl", d / "b.html").read_text()
    assert "is from another run (fingerprint fp-B" in text and "secret-model" not in text
    (d / "summary.json").write_text("{broken")
    assert "could not be read" in write_report(d / "results.jsonl", d / "c.html").read_text()


def test_a_summary_or_a_cut_line_is_named_for_what_it_is(tmp_path, capsys):
    # summary.json given where results.jsonl belongs: said so, not "corrupt, re-run the job"; a
    # cut line's column is the line's own (not column 1 of the line after its end).
    d = tmp_path / "job"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"items": 1, "scored": 1, "failures_by_kind": {},
                                                "fingerprint": "fp-A"}, indent=1))
    assert report_main([str(d / "summary.json"), "--out", str(d / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: {d / 'summary.json'}: this is a job's summary.json, not its results; pass "
                           "results.jsonl from the same folder")
    (d / "other.json").write_text(json.dumps([1, 2], indent=1))
    assert report_main([str(d / "other.json")]) == 2
    assert "one JSON document, not a results.jsonl" in capsys.readouterr().err
    cut = d / "results.jsonl"
    cut.write_text(json.dumps(_rec(1, "a", 5.0)) + "\n" + '{"index": 2, "id": "b",\n')
    assert report_main([str(cut)]) == 2
    assert f"{cut}, line 2: not valid JSON (Expecting property name enclosed in double quotes at column 24)" in \
        capsys.readouterr().err
    assert not (d / "r.html").exists() and not (d / "report.html").exists()


def test_a_python_without_pillow_says_so_instead_of_every_image_unreadable(failing_job, tmp_path):
    # The report run by a Python that lacks Pillow (the system's, say): the page is written
    # without pictures, one line says why, and no image is called unreadable.
    script = ("import sys, runpy; sys.modules['PIL'] = None; "
              f"sys.argv = ['main.py', 'report', {str(failing_job['results'])!r}, '--out', {str(tmp_path / 'p.html')!r}]; "
              "runpy.run_path('main.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"report: no thumbnails: Pillow is not installed in {sys.executable}" in proc.stderr
    page = (tmp_path / "p.html").read_text()
    assert "Pillow is not installed" in page and "0 unreadable" in page
