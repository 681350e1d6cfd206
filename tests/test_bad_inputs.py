"""Every bad input of the issue in ONE real job (`python main.py --config ...`, one CPU worker):
each bad item fails alone with an error naming the item and the cause, or is handled correctly,
and every other item scores as it would without bad neighbours. Each case is recorded in the
fault ledger (conftest.py), which prints the table at the end of the run.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, assert_no_orphans, make_image, worker_processes

MAX_IMAGE_PIXELS = 1_000_000
TOL = 1e-4  # the same image in another batch: padding changes the last digits only


def _write_images(d: Path) -> dict[str, Path]:
    """The image files, by name. `d` has a space in its name."""
    from PIL import Image

    d.mkdir(parents=True)
    f: dict[str, Path] = {}

    def save(name: str, im, **kw) -> None:
        f[name] = d / name
        im.save(f[name], **kw)

    for k in range(4):
        save(f"good{k}.png", make_image(10 + k, 56 + 8 * k, 40 + 4 * k))
    f["non_ascii"] = d / "ünïcödé 画像 élan.png"
    f["non_ascii"].write_bytes(f["good2.png"].read_bytes())  # the same file under a hard name
    f["missing"] = d / "never written.png"
    (d / "empty.png").write_bytes(b"")
    f["empty"] = d / "empty.png"
    buf = io.BytesIO()
    make_image(20, 64, 48).save(buf, format="JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])
    f["truncated"] = d / "truncated.jpg"
    (d / "notes.png").write_text("meeting notes, not an image\n")
    f["text_as_png"] = d / "notes.png"
    save("bomb.png", Image.new("RGB", (1100, 1000), (9, 9, 9)))  # 1.1x the limit: compresses to ~4 KB
    save("wide.png", Image.new("RGB", (1500, 5), (30, 90, 200)))  # 300:1
    save("one_pixel.png", Image.new("RGB", (1, 1), (200, 40, 40)))
    (d / "a folder.png").mkdir()
    f["folder"] = d / "a folder.png"
    save("cmyk.jpg", make_image(21, 64, 48).convert("CMYK"))
    dark = np.asarray(make_image(22, 64, 48).convert("L")) // 2  # a dark picture: nothing above 127
    save("sixteen.png", Image.fromarray(dark.astype("uint16") * 257))  # the same levels in 16 bits
    save("sixteen_ref.png", Image.fromarray(dark).convert("RGB"))
    save("grey.png", make_image(23, 64, 48).convert("L"))
    save("grey_ref.png", make_image(23, 64, 48).convert("L").convert("RGB"))
    rgba = make_image(24, 64, 48).convert("RGBA")
    alpha = np.zeros((48, 64), dtype="uint8")
    alpha[:, 32:] = 255
    alpha[:, 16:32] = 128
    rgba.putalpha(Image.fromarray(alpha))
    save("rgba.png", rgba)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    save("rgba_ref.png", Image.alpha_composite(white, rgba).convert("RGB"))
    pal = make_image(25, 64, 48).quantize(16)
    assert (np.asarray(pal) == 3).any()
    save("palette_transparent.png", pal, transparency=3)  # palette entry 3 is see-through
    save("palette_ref.png", Image.alpha_composite(Image.new("RGBA", pal.size, (255, 255, 255, 255)),
                                                  Image.open(f["palette_transparent.png"]).convert("RGBA")).convert("RGB"))
    # EXIF orientation 6: stored sideways, shown rotated 90 degrees clockwise (a phone held upright).
    sideways = make_image(26, 80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rotated.jpg", sideways, exif=exif.tobytes(), quality=95)
    decoded = Image.open(f["exif_rotated.jpg"])
    decoded.load()
    stored = decoded.copy()                               # the pixels as stored, no rotation
    del stored.info["exif"]
    save("exif_sideways_ref.png", stored.convert("RGB"))
    save("exif_upright_ref.png", stored.transpose(Image.Transpose.ROTATE_270).convert("RGB"))
    frames = [make_image(30 + k, 64, 48).convert("P") for k in range(3)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
    f["animated"] = d / "animated.gif"
    first = Image.open(f["animated"])
    first.seek(0)
    save("gif_frame0_ref.png", first.convert("RGB"))
    return f


# (id, what the case is, manifest line (JSON text or a dict), expected: "scored" or (kind, text in error))
def _cases(f: dict[str, Path]) -> list[tuple[str, str, object, object]]:
    def row(i, key, **extra):
        return {"id": i, "image": str(f[key]), **extra}

    return [
        ("good0", "UTF-8 BOM before the first row", "\ufeff" + json.dumps(row("good0", "good0.png")), "scored"),
        ("missing", "missing file", row("missing", "missing"), ("image", "image not found")),
        ("good1", "-", row("good1", "good1.png"), "scored"),
        ("empty", "empty file", row("empty", "empty"), ("image", "image file is empty")),
        ("truncated", "truncated JPEG", row("truncated", "truncated"), ("image", "image file is truncated")),
        ("text_as_png", "text file named .png", row("text_as_png", "text_as_png"), ("image", "cannot decode")),
        ("bomb", "decompression bomb (1.1x max_image_pixels)", row("bomb", "bomb.png"),
         ("image", f"over max_image_pixels={MAX_IMAGE_PIXELS}")),
        ("wide", "aspect ratio 300:1", row("wide", "wide.png"), ("image", "aspect ratio")),
        ("folder", "image path is a folder", row("folder", "folder"), ("image", "is a folder")),
        ("good2", "-", row("good2", "good2.png"), "scored"),
        ("cmyk", "CMYK JPEG", row("cmyk", "cmyk.jpg"), "scored"),
        ("sixteen", "16-bit PNG (dark: must not be stretched)", row("sixteen", "sixteen.png"), "scored"),
        ("palette", "palette PNG with transparency", row("palette", "palette_transparent.png"), "scored"),
        ("rgba", "RGBA PNG", row("rgba", "rgba.png"), "scored"),
        ("grey", "greyscale PNG", row("grey", "grey.png"), "scored"),
        ("exif", "EXIF-rotated JPEG (orientation 6)", row("exif", "exif_rotated.jpg"), "scored"),
        ("gif", "animated GIF (3 frames)", row("gif", "animated"), "scored"),
        ("one_pixel", "1x1 pixel image", row("one_pixel", "one_pixel.png"), "scored"),
        ("non_ascii", "path with spaces and non-ASCII", row("non_ascii", "non_ascii"), "scored"),
        ("good1", "duplicate id", row("good1", "good3.png"), ("manifest", "duplicate id 'good1'")),
        ("no_image", "row without an image field", {"id": "no_image", "instruction": "x"}, ("manifest", "no image")),
        ("image_number", "row with a number as image", {"id": "image_number", "image": 7},
         ("manifest", "'image' must be a path")),
        ("instr_number", "row with a number as instruction", row("instr_number", "good3.png", instruction=3),
         ("manifest", "'instruction' must be a string")),
        (None, "row with a list as id", {"id": ["a"], "image": str(f["good3.png"])}, ("manifest", "'id' must be")),
        (None, "line cut mid-JSON", '{"id": "cut", "image": "good3.p', ("manifest", "not valid JSON")),
        (None, "line that is not an object", "[1, 2, 3]", ("manifest", "expected an object")),
        ("good3", "-", row("good3", "good3.png"), "scored"),
        # references: the same pixels as a plain RGB file, scored in another batch of the same job
        *[(f"ref_{k}", "-", row(f"ref_{k}", k), "scored") for k in (
            "good0.png", "good1.png", "good2.png", "good3.png", "sixteen_ref.png", "grey_ref.png", "rgba_ref.png",
            "palette_ref.png", "exif_upright_ref.png", "exif_sideways_ref.png", "gif_frame0_ref.png")],
    ]


@pytest.fixture(scope="module")
def bad_job(tiny_cache, tmp_path_factory):
    """Run the job once; the tests below read its output."""
    import yaml

    root = tmp_path_factory.mktemp("bad inputs")
    f = _write_images(root / "my images")
    cases = _cases(f)
    lines = [c[2] if isinstance(c[2], str) else json.dumps(c[2], ensure_ascii=False) for c in cases]
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n", encoding="utf-8")
    line_of = [n + 1 if n < 5 else n + 2 for n in range(len(cases))]  # a blank line after the fifth row
    out = root / "out"
    cfg = {"model": {"class_path": "multi_gpu",
                     "params": {"model_name": "tiny:qwen2_5_vl", "device_ids": ["cpu"], "batch_size": 4,
                                "micro_batch": 8, "max_image_pixels": MAX_IMAGE_PIXELS, "progress": False}},
           "job": {"manifest": str(manifest), "output_dir": str(out)}}
    (root / "job.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--config", str(root / "job.yaml"), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    pids = [int(p) for p in re.findall(r"model loaded on \S+ in [\d.]+s \(pid (\d+)\)", stderr)]
    assert pids, stderr[-2000:]
    assert_no_orphans(pids)
    assert not worker_processes([proc.pid])
    records = [json.loads(x) for x in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    by_line = {r["line"]: r for r in records}
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return {"cases": cases, "line_of": line_of, "records": records, "by_line": by_line, "summary": summary,
            "root": str(root / "my images") + "/",
            "stdout": stdout}


@pytest.fixture(autouse=True)
def no_stray_workers():
    yield
    assert not worker_processes(), "a worker of this process outlived its test"


def _record(bad_job, case_id: str) -> dict:
    for c, line in zip(bad_job["cases"], bad_job["line_of"]):
        if c[0] == case_id and c[1] != "duplicate id":
            return bad_job["by_line"][line]
    raise KeyError(case_id)


def test_one_result_per_manifest_row_and_nothing_lost(bad_job):
    cases, records = bad_job["cases"], bad_job["records"]
    assert len(records) == len(cases), "one result per manifest row, bad rows included"
    assert [r["line"] for r in records] == bad_job["line_of"], "results keep manifest order"
    for r in records:
        assert (r["score"] is None) == bool(r["error"]), r  # a score, or an error: never neither, never both


def test_each_bad_input_fails_alone_with_its_cause(bad_job, ledger):
    for (cid, what, _, expect), line in zip(bad_job["cases"], bad_job["line_of"]):
        rec = bad_job["by_line"][line]
        if what != "-":
            ledger.bad_input(what, cid or f"line{line}", rec, hide=bad_job["root"])
        if expect == "scored":
            assert rec["score"] is not None and rec["error"] is None, (what, rec["error"])
            assert 0.0 <= rec["score"] <= 9.0
            continue
        kind, text = expect
        assert rec["score"] is None, what
        assert rec["error_kind"] == kind, (what, rec["error_kind"], rec["error"])
        assert text in rec["error"], (what, rec["error"])
        # the error names the item: its id or, for a row without a usable id, the manifest line
        assert (f"'{cid}'" in rec["error"] or f"line {line}" in rec["error"]), (what, rec["error"])
        if kind == "image":  # and the file, and the manifest row (not the place in a chunk)
            assert os.path.basename(rec["images"][0]) in rec["error"], rec["error"]
            assert f"'{cid}' (line {line})" in rec["error"] and "(#" not in rec["error"], rec["error"]


def test_good_items_score_as_they_do_without_bad_neighbours(bad_job):
    for k in range(4):
        near_bad, clean = _record(bad_job, f"good{k}"), _record(bad_job, f"ref_good{k}.png")
        assert near_bad["score"] == pytest.approx(clean["score"], abs=TOL)
    # a non-ASCII path with spaces reads the same bytes as good2.png
    assert _record(bad_job, "non_ascii")["score"] == pytest.approx(_record(bad_job, "good2")["score"], abs=TOL)


def test_odd_formats_are_read_as_a_viewer_shows_them(bad_job):
    def score(i):
        return _record(bad_job, i)["score"]

    assert score("grey") == pytest.approx(score("ref_grey_ref.png"), abs=TOL)
    assert score("sixteen") == pytest.approx(score("ref_sixteen_ref.png"), abs=TOL), "16-bit: levels kept, not stretched"
    assert score("rgba") == pytest.approx(score("ref_rgba_ref.png"), abs=TOL), "transparency on white"
    assert score("palette") == pytest.approx(score("ref_palette_ref.png"), abs=TOL), "palette transparency on white"
    assert score("cmyk") is not None and score("one_pixel") is not None


def test_exif_rotated_photo_is_scored_upright(bad_job):
    exif, upright = _record(bad_job, "exif")["score"], _record(bad_job, "ref_exif_upright_ref.png")["score"]
    sideways = _record(bad_job, "ref_exif_sideways_ref.png")["score"]
    assert exif == pytest.approx(upright, abs=TOL)
    assert abs(exif - sideways) > 10 * TOL, "the judge must see the photo upright, not as stored"


def test_animated_gif_uses_the_first_frame_and_says_so(bad_job):
    rec = _record(bad_job, "gif")
    assert rec["score"] == pytest.approx(_record(bad_job, "ref_gif_frame0_ref.png")["score"], abs=TOL)
    notes = rec["metadata"]["notes"]
    assert len(notes) == 1 and "first of 3 frames used" in notes[0] and "animated.gif" in notes[0]


def test_summary_counts_failures_by_cause(bad_job):
    s, cases = bad_job["summary"], bad_job["cases"]
    expected: dict[str, int] = {}
    for c in cases:
        if c[3] != "scored":
            expected[c[3][0]] = expected.get(c[3][0], 0) + 1
    assert s["failures_by_kind"] == expected
    assert s["items"] == len(cases) and s["failed"] == sum(expected.values())
    assert s["scored"] == len(cases) - s["failed"]
    assert len(s["failures"]) == s["failed"] and all(f["error"] and f["kind"] for f in s["failures"])
    brief = json.loads(bad_job["stdout"])
    assert brief["failures_by_kind"] == expected


def test_a_manifest_that_is_not_there(tiny_cache, tmp_path, ledger):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"model: {{class_path: multi_gpu, params: {{model_name: 'tiny:qwen2_5_vl', device_ids: [cpu]}}}}\n"
                   f"job: {{manifest: {tmp_path / 'nowhere.jsonl'}, output_dir: {tmp_path / 'out'}}}\n")
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", str(cfg), "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: manifest not found: {tmp_path / 'nowhere.jsonl'}"
    assert not (tmp_path / "out").exists(), "nothing is started or written for a missing manifest"
    ledger.bad_input("manifest that is not there", "-", {"score": None, "error_kind": "exit 2",
                                                         "error": proc.stderr.strip()}, hide=f"{tmp_path}/")


def test_csv_manifest_rows(tmp_path, ledger):
    """The CSV reader's bad rows (no model needed: reading the manifest is where they fail)."""
    from src.job.manifest import read_manifest

    p = tmp_path / "m.csv"
    p.write_bytes("\ufeffid,image,instruction\nc1,a.png,make it red\nc2,,x\nc3,b.png,y,surplus\nc1,c.png,z\n"
                  .encode("utf-8"))
    rows = read_manifest(p)
    assert [r.id for r in rows] == ["c1", "c2", "c3", "c1"], "a byte-order mark must not hide the id column"
    assert rows[0].item is not None and rows[0].item.instruction == "make it red"
    assert "no image" in rows[1].error and "line 3" in rows[1].error
    assert "more cells than header columns" in rows[2].error and "line 4" in rows[2].error
    assert "duplicate id 'c1'" in rows[3].error
    for r, what in zip(rows[1:], ("CSV row without an image", "CSV row with a surplus cell", "CSV duplicate id")):
        ledger.bad_input(what, r.id, {"score": None, "error_kind": "manifest", "error": r.error})
    # A misspelt image column is named, not only "no image"; a free key (metadata) is not a suspect.
    p.write_text("id,imgae,model\nc1,a.png,flux\n")
    (row,) = read_manifest(p)
    assert row.error == ("m.csv line 2: no image; give one of image, images, edited_image, edited_images "
                         "(is 'imgae' meant to be one of them?)")
    ledger.bad_input("CSV image column misspelt", row.id, {"score": None, "error_kind": "manifest", "error": row.error})
    p.write_text("id,model\nc1,flux\n")
    assert read_manifest(p)[0].error == "m.csv line 2: no image; give one of image, images, edited_image, edited_images"


def test_csv_rows_of_empty_cells_and_rows_over_several_lines(tmp_path):
    """A spreadsheet's CSV export ends in rows of empty cells (',,,'), which became failed items
    ('no image'), one per row; they are blank rows, skipped as blank lines are. A row whose quoted
    instruction spans lines is named by the line it starts on (it was named by its last line, so
    a duplicate id pointed at the wrong line)."""
    from src.job.manifest import read_manifest

    p = tmp_path / "m.csv"
    p.write_bytes(b'id,image,instruction\r\nc1,a.png,"make it ""red"",\r\nthen blue"\r\n,,\r\n\r\n'
                  b'c2,b.png,plain\r\n c1 ,c.png,again\r\n , ,\r\n,,\r\n')
    rows = read_manifest(p)
    assert [(r.id, r.line) for r in rows] == [("c1", 2), ("c2", 6), ("c1", 7)]
    assert rows[0].item is not None and rows[0].item.instruction == 'make it "red",\r\nthen blue'
    assert rows[2].error == "duplicate id 'c1' (first used on line 2); ids must be unique"


def test_image_paths_written_from_the_current_folder_are_refused_before_the_judge_loads(tmp_path, monkeypatch):
    """Relative image paths are read from the manifest's folder. A manifest in data/ that says
    data/images/x.png (written from the folder above) had every item fail late, one 'image not
    found' each; it is refused at once, naming both folders."""
    from src.job.manifest import ManifestError, read_manifest

    (tmp_path / "data" / "images").mkdir(parents=True)
    for n in ("x", "y"):
        make_image(64, 64).save(tmp_path / "data" / "images" / f"{n}.png")
    m = tmp_path / "data" / "m.jsonl"
    m.write_text('{"id": "a", "image": "data/images/x.png"}\n{"id": "b", "image": "data/images/y.png"}\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ManifestError) as e:
        read_manifest(m)
    assert str(e.value).startswith(f"manifest {m}: relative image paths are read from the manifest's folder "
                                   f"({tmp_path / 'data'}), where none of the first 2 image(s) is"), str(e.value)
    assert "e.g. data/images/x.png. Write them relative to the manifest's folder" in str(e.value)
    # Written relative to the manifest, or with one image beside it, the manifest is read as before.
    m.write_text('{"id": "a", "image": "images/x.png"}\n{"id": "b", "image": "data/images/y.png"}\n')
    rows = read_manifest(m)
    assert rows[0].item.images == [str(tmp_path / "data" / "images" / "x.png")]
    assert rows[1].item.images == [str(tmp_path / "data" / "data" / "images" / "y.png")]  # fails alone, later
    # Paths missing everywhere are left to fail one by one, each naming its path.
    m.write_text('{"id": "a", "image": "gone.png"}\n')
    assert read_manifest(m)[0].item is not None


@pytest.mark.parametrize("name", ["m.jsonl", "m.csv"])
def test_a_utf16_manifest_is_refused_naming_its_encoding(tmp_path, name):
    """Windows PowerShell's `>` and Excel's 'Unicode text' write UTF-16. Read as UTF-8, one row
    became three failed items ('not valid JSON at column 1'), or a CSV's every row 'no image',
    after the judge had loaded; the manifest is now refused at once, saying what it is."""
    from src.job.manifest import ManifestError, read_manifest

    text = ('{"id": "a", "image": "a.png"}\r\n' if name.endswith("jsonl") else "id,image\r\na,a.png\r\n")
    p = tmp_path / name
    for encoding in ("utf-16-le", "utf-16-be", "utf-32-le"):
        p.write_bytes(("\ufeff" + text).encode(encoding))
        with pytest.raises(ManifestError) as e:
            read_manifest(p)
        assert str(e.value) == f"manifest {p} is UTF-{encoding[4:6]} text; save it as UTF-8", encoding


def test_json_manifest_holding_a_list_of_rows(tmp_path, ledger):
    """A .json manifest written as one JSON list (json.dump(rows, indent=2), as many benchmarks ship
    theirs) was read line by line as JSONL: 3 rows became 20 failed items ('line 1: not valid
    JSON'), and the judge was loaded to score none. Each row is now an item, named by the line it
    starts on; a bad row fails alone; a list that is not valid JSON stops the job, naming where."""
    from src.job.manifest import ManifestError, read_manifest

    rows = [{"id": "a", "image": "a.png", "instruction": "make it red"}, [1, 2], {"id": "c", "imgae": "c.png"},
            {"image": "d.png", "source_image": "s.png"}]
    p = tmp_path / "m.json"
    p.write_bytes(("\ufeff" + json.dumps(rows, indent=2)).replace("\n", "\r\n").encode("utf-8"))
    got = read_manifest(p)
    assert [(r.id, r.line) for r in got] == [("a", 2), ("line7", 7), ("c", 11), ("line15", 15)]
    assert got[0].item is not None and got[0].item.images == [str(tmp_path / "a.png")]
    assert got[0].item.instruction == "make it red"
    assert got[1].error == "m.json line 7: expected an object, got list"
    assert got[2].error.startswith("m.json line 11: no image;") and "'imgae'" in got[2].error
    assert got[3].item is not None and got[3].item.source_images == [str(tmp_path / "s.png")]
    ledger.bad_input("JSON-list manifest row that is not an object", got[1].id,
                     {"score": None, "error_kind": "manifest", "error": got[1].error})
    p.write_text(json.dumps(rows[:1]))  # one line
    assert [r.id for r in read_manifest(p)] == ["a"]
    p.write_text('[\n  {"id": "a", "image": "a.png"},\n  {"id": "b", "image": "b.png"\n]\n')
    with pytest.raises(ManifestError) as e:
        read_manifest(p)
    assert str(e.value) == f"manifest {p}: line 4: not valid JSON (Expecting ',' delimiter at column 1)"
    p.write_text("[]")
    with pytest.raises(ManifestError, match="has no rows"):
        read_manifest(p)
    p.write_text('[1, 2]\n{"id": "b", "image": "b.png"}\n')  # JSONL whose first row is a list: it fails alone
    got = read_manifest(p)
    assert [(r.id, r.error) for r in got] == [("line1", "m.json line 1: expected an object, got list"), ("b", None)]


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_an_instruction_holding_a_special_token_fails_alone(tiny_cache, arch, ledger):
    # The processor reads '<|image_pad|>' in a prompt's text as the image placeholder itself: the
    # model then found more placeholders than images and failed the batch ("StopIteration"), and
    # '<|im_end|>' would end the user's turn inside the instruction. Such an item fails alone,
    # naming the token; its neighbours score as they do alone. A rubric that does not show the
    # instruction does not read it.
    from src.models.reward.implementations.local import QwenVLRewardModel
    from src.models.reward.types import ScoreItem

    img = make_image(90, 64, 64)
    texts = ["a red square", "a red <|image_pad|> square", "a <|vision_start|> square", "red <|im_end|> then",
             "a <|video_pad|>", "a plain red square"]
    items = [ScoreItem(images=[img], instruction=t, id=f"s{k}") for k, t in enumerate(texts)]
    with QwenVLRewardModel(model_name=f"tiny:{arch}", template="alignment", batch_size=4) as judge:
        got = judge.batch_score(items)
        alone = [judge.batch_score([items[k]])[0] for k in (0, 5)]
    with QwenVLRewardModel(model_name=f"tiny:{arch}", template="quality", batch_size=4) as judge:
        unread = judge.batch_score(items)
    for k, token in ((1, "<|image_pad|>"), (2, "<|vision_start|>"), (3, "<|im_end|>"), (4, "<|video_pad|>")):
        r = got[k]
        assert r.score is None and r.error_kind == "input", r
        assert r.error == (f"item 's{k}' (#{k}): the instruction holds {token!r}, a special token of the judge's "
                           "prompt format, which a prompt cannot carry as text (remove it)")
        if arch == "qwen3_vl":
            ledger.bad_input(f"instruction holding {token}", r.id, {"score": None, "error_kind": r.error_kind,
                                                                     "error": r.error})
    for k, ref in zip((0, 5), alone):
        assert got[k].error is None and got[k].score == pytest.approx(ref.score, abs=1e-5)
    assert all(r.error is None and r.score is not None for r in unread)


def test_a_blank_category_is_no_category_in_every_manifest_format(tmp_path):
    """A CSV cell left empty is no category; the same row in JSONL (`"category": ""`, as a
    dataframe's export writes a missing value) was a category named "", a group of its own in
    summary.json and a nameless row in the report that its category filter could not select."""
    from src.job.manifest import read_manifest

    rows = [{"id": "a", "image": "a.png", "category": ""}, {"id": "b", "image": "b.png", "category": "  "},
            {"id": "c", "image": "c.png", "category": "color"}, {"id": "d", "image": "", "category": ""}]
    for img in ("a.png", "b.png", "c.png"):
        make_image(1).save(tmp_path / img)
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    q = tmp_path / "m.csv"
    q.write_text("id,image,category\n" + "".join(f"{r['id']},{r['image']},{r['category']}\n" for r in rows))
    for path in (p, q):
        got = read_manifest(path)
        assert [r.item.metadata.get("category") for r in got[:3]] == [None, None, "color"], path
        assert "no image" in got[3].error and got[3].fields.get("category") is None, path  # a failed row too


def test_an_empty_image_field_says_it_is_empty(tmp_path):
    """`"image": ""` (a dataframe's missing value) was refused with a hint asking whether 'image'
    was meant to be one of image, images, ...: it is one; it is empty."""
    from src.job.manifest import read_manifest

    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"id": "a", "image": "", "instruction": "x"}) + "\n"
                 + json.dumps({"id": "b", "images": [], "imgae": "b.png"}) + "\n")
    a, b = read_manifest(p)
    assert a.error == "m.jsonl line 1: no image: 'image' is empty", a.error
    assert b.error == "m.jsonl line 2: no image: 'images' is empty", b.error


@pytest.mark.parametrize("mode", ["logits", "generate"])
@pytest.mark.parametrize("host", ["qwen_vl", "multi_gpu"])
def test_a_prompt_longer_than_the_judges_context_fails_alone(short_context_judge, image_files, host, mode, ledger):
    # A judge of a 300-token context (its language model's max_position_embeddings) was given a
    # 472-token prompt and scored it: from positions it was never trained on, a score (logits) or
    # an answer (generate) that meant nothing, with no word of it. Such an item fails alone,
    # naming its length and the context, in this process and in a worker; the other items of its
    # batch score as they do alone.
    from conftest import SHORT_CONTEXT
    from src.models.reward import ScoreItem, build_reward_model

    items = [ScoreItem(images=[image_files[0]], instruction="a red square", id="short"),
             ScoreItem(images=[image_files[0]], instruction="a red square " * 40, id="long"),
             ScoreItem(images=[image_files[1]], instruction="a cat", id="short2")]
    params = {"model_name": short_context_judge, "template": "alignment", "mode": mode, "batch_size": 3,
              "max_new_tokens": 8}
    if host == "multi_gpu":
        params.update(device_ids=["cpu"], progress=False)
    with build_reward_model({"class_path": host, "params": params}) as judge:
        got = judge.batch_score(items)
        alone = [judge.batch_score([items[k]])[0] for k in (0, 2)]
        pids = judge.worker_pids() if host == "multi_gpu" else []
    assert_no_orphans(pids)
    long = got[1]
    assert long.score is None and long.error_kind == "prompt_too_long", long
    answer = r" and with its answer budget of 8 \(max_new_tokens\) (\d+)," if mode == "generate" else ""
    m = re.fullmatch(rf"item 'long' \(#1\): the prompt is (\d+) tokens \(text and image tokens\),{answer} over "
                     rf"the judge's context of {SHORT_CONTEXT} tokens \(its language model's max_position_embeddings: "
                     r"it was never trained on later positions\); give (?:it|the prompt) fewer tokens: smaller images "
                     r"\(lower max_pixels, the size images are resized to\) or a shorter instruction", long.error)
    assert m, long.error
    assert int(m.group(1)) > SHORT_CONTEXT and (mode == "logits" or int(m.group(2)) == int(m.group(1)) + 8)
    for k, ref in zip((0, 2), alone):
        if mode == "logits":
            assert got[k].error is None and got[k].score == pytest.approx(ref.score, abs=1e-5)
        else:  # random weights write junk: no score, but the answer it writes alone
            assert got[k].error_kind == "parse" and got[k].raw == ref.raw
    if host == "multi_gpu":
        ledger.bad_input(f"prompt over the judge's context ({mode})", long.id,
                         {"score": long.score, "error_kind": long.error_kind, "error": long.error})


@pytest.mark.parametrize("host", ["qwen_vl", "multi_gpu"])
def test_metadata_that_is_no_dict_is_refused_naming_the_item(image_files, host, ledger):
    # metadata given as a string, a number or a list made the whole call raise ("dictionary update
    # sequence element #0 ...") as each result copied it: every item of the call was lost. A
    # ScoreItem refuses such metadata when it is made; one whose metadata is replaced afterwards
    # fails alone, in this process and in a worker.
    from types import MappingProxyType

    from src.models.reward import ScoreItem, build_reward_model

    for bad in ("category=a", 3, ["a", "b"]):
        with pytest.raises(TypeError, match=rf"ScoreItem 'x': metadata must be a dict \(free data carried into "
                                            rf"the result\), got {type(bad).__name__}"):
            ScoreItem(images=[image_files[0]], id="x", metadata=bad)
    assert ScoreItem(images=[image_files[0]], metadata=MappingProxyType({"k": 1})).metadata == {"k": 1}
    items = [ScoreItem(images=[image_files[k]], id=f"i{k}", metadata={"k": k}) for k in range(3)]
    items[1].metadata = "category=a"  # replaced after the item was made
    params = {"model_name": "tiny:qwen2_5_vl", "template": "quality", "batch_size": 3}
    if host == "multi_gpu":
        params.update(device_ids=["cpu"], progress=False)
    with build_reward_model({"class_path": host, "params": params}) as judge:
        got = judge.batch_score(items)
        pids = judge.worker_pids() if host == "multi_gpu" else []
    assert_no_orphans(pids)
    assert got[1].score is None and got[1].error_kind == "input" and got[1].metadata == {}
    assert got[1].error == "item 'i1' (#1): metadata must be a dict (free data carried into the result), got str"
    assert [(r.error, r.metadata) for r in (got[0], got[2])] == [(None, {"k": 0}), (None, {"k": 2})]
    if host == "multi_gpu":
        ledger.bad_input("metadata that is no dict (set after the item was made)", got[1].id,
                         {"score": got[1].score, "error_kind": got[1].error_kind, "error": got[1].error})
