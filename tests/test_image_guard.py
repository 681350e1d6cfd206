"""Image sizes are checked explicitly wherever images are opened, and Pillow's process-wide
decompression-bomb guard is never switched off: not by the prepare threads, not by a job.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading

import pytest
from PIL import Image

from conftest import ROOT, make_image
from src.models.reward.types import ImageTooLarge, image_pixels, load_pil, open_image


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """200 million one-bit pixels in about 24 KB: over twice Pillow's default limit."""
    return _png(Image.new("1", (20000, 10000)))


def test_concurrent_loads_leave_pillows_guard_in_force(bomb):
    limit_before = Image.MAX_IMAGE_PIXELS
    assert limit_before is not None
    ok = _png(Image.new("RGB", (1100, 1000), (9, 9, 9)))  # over Pillow's nothing; over 1M of ours
    errors: list[BaseException] = []
    stop = threading.Event()

    def prepare_thread() -> None:  # what the judge's 4 prepare threads do, with a limit set
        try:
            while not stop.is_set():
                assert load_pil(ok, 2_000_000).size == (1100, 1000)
                with pytest.raises(ImageTooLarge, match="over max_image_pixels=1000000"):
                    load_pil(ok, 1_000_000)
        except BaseException as e:  # reported below
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=prepare_thread) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(200):  # meanwhile, code that relies on Pillow's own guard
            assert Image.MAX_IMAGE_PIXELS == limit_before
            with pytest.raises(Image.DecompressionBombError):
                Image.open(io.BytesIO(bomb))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_sizes_are_read_from_the_header_and_refused_with_the_figure(bomb, tmp_path):
    assert image_pixels(bomb) == 200_000_000  # over Pillow's guard: the count still comes back
    assert image_pixels(b"not an image") is None
    with pytest.raises(ImageTooLarge, match=r"200000000 pixels, over max_image_pixels=100000000"):
        load_pil(bomb, 100_000_000)
    # a PIL image given directly is checked too
    with pytest.raises(ImageTooLarge, match="64x48 = 3072 pixels"):
        load_pil(make_image(1), 3000)
    (tmp_path / "n.png").write_bytes(_png(make_image(2)))
    with open_image(tmp_path / "n.png", 10_000) as im:
        assert im.size == (64, 48)
    with pytest.raises(ValueError, match="NUL byte"):
        load_pil(str(tmp_path / "n.png") + "\0")


def test_a_report_job_with_a_25000px_png_fails_that_item_and_skips_its_thumbnail(tiny_cache, tmp_path, ledger):
    """The issue's case: a job with `job.report: true` over good rows and one 25000x25000 PNG.
    Before, the report decoded it (10.5 GB). Now the item fails with its size, the thumbnail is
    listed without pixels, and the job's peak memory is that of a small job."""
    import yaml

    d = tmp_path / "imgs"
    d.mkdir()
    rows = []
    for k in range(4):
        make_image(k).save(d / f"ok{k}.png")
        rows.append({"id": f"ok{k}", "image": str(d / f"ok{k}.png"), "instruction": "a red square"})
    Image.new("1", (25000, 25000)).save(d / "huge.png")
    rows.insert(2, {"id": "huge", "image": str(d / "huge.png"), "instruction": "a red square"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cfg = {"model": {"class_path": "qwen_vl", "params": {"model_name": "tiny:qwen2_vl", "device": "cpu",
                                                         "progress": False}},
           "job": {"manifest": str(tmp_path / "m.jsonl"), "output_dir": str(out), "report": True}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    log = tmp_path / "job.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--config", str(tmp_path / "job.yaml"),
                                 "--no-progress"], stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: the child's own peak memory
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = log.read_text()
    assert proc.returncode == 0, stderr[-3000:]
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    huge = next(r for r in records if r["id"] == "huge")
    assert huge["score"] is None and huge["error_kind"] == "image", (huge, stderr[-2000:])
    assert "625000000 pixels" in huge["error"] and "'huge' (line 3)" in huge["error"]
    assert sum(r["score"] is not None for r in records) == 4
    page = (out / "report.html").read_text()
    assert "not embedded: 625000000 pixels, over the thumbnail limit" in page
    peak_gb = usage.ru_maxrss / 1024 ** 2  # Linux: kilobytes
    ledger.fault("report job with a 25000x25000 PNG (1 of 5 rows)", len(records), records,
                 note=f"peak RSS {peak_gb:.2f} GB; {huge['error'][:60]}")
    assert peak_gb < 3.0, f"the job peaked at {peak_gb:.1f} GB: was the huge image decoded?"


def test_postscript_is_refused_without_running_ghostscript(tmp_path):
    """Pillow reads EPS by running Ghostscript (`gs`) on it, so a client of the service could hand
    PostScript to the machine's gs. A `gs` on PATH that leaves a mark shows it is never run: the
    image fails alone, as bytes and as a path, saying why."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mark = tmp_path / "gs-ran"
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
    (tmp_path / "a.eps").write_bytes(eps)
    code = ("import sys; from src.models.reward.types import load_pil\n"
            "for img in (open(sys.argv[1], 'rb').read(), sys.argv[1]):\n"
            "    try:\n        load_pil(img)\n        print('decoded')\n"
            "    except ValueError as e:\n        print(e)\n")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.eps")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert run.returncode == 0, run.stderr
    assert not mark.exists(), "Pillow ran the gs on PATH"
    said = run.stdout.strip().splitlines()
    assert len(said) == 2 and all("PostScript (EPS) images are not read" in line for line in said), said
    assert str(tmp_path / "a.eps") in said[1]
    # The formats a benchmark's images come in are still read.
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        buf = io.BytesIO()
        make_image(3, 16, 16).save(buf, format=fmt)
        assert load_pil(buf.getvalue()).size == (16, 16), fmt
