"""main.py end to end: the demo config, manifests, outputs and resume, in real subprocesses."""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, assert_no_orphans, make_image

MAIN = ROOT / "main.py"


def run_main(*args: str, timeout: float = 300, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """main.py with `args`; `pythonpath`: a folder of the user's own modules (a class_path's)."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, str(MAIN), *args, "--no-progress"] if args and args[0] not in ("report",)
                          else [sys.executable, str(MAIN), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(ROOT))


@pytest.fixture(scope="module")
def edit_manifest(tmp_path_factory) -> Path:
    """Ten edit items with sources, instructions and two categories, as JSONL."""
    d = tmp_path_factory.mktemp("manifest")
    rows = []
    for i in range(10):
        make_image(i, 56, 48).save(d / f"src{i}.png")
        make_image(100 + i, 56, 48).save(d / f"edit{i}.png")
        rows.append({"id": f"e{i}", "source_image": f"src{i}.png", "image": f"edit{i}.png",
                     "instruction": f"make square {i} blue", "category": "color" if i % 2 else "shape",
                     "seed": i})
    (d / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "manifest.jsonl"


def write_config(tmp: Path, manifest: Path, out: Path, **params) -> Path:
    cfg = {"model": {"class_path": "qwen_vl", "params": {"model_name": "tiny:qwen2_5_vl", "template": "edit",
                                                          "batch_size": 3, **params}},
           "job": {"manifest": str(manifest), "output_dir": str(out), "chunk_size": 4}}
    p = tmp / f"cfg-{out.name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tiny_cache, tmp_path_factory, edit_manifest) -> Path:
    """An uninterrupted job (in-process judge, batches of 3): the outputs a job writes, and what
    resumed jobs are compared with."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    full = tmp / "full"
    r = run_main("--config", str(write_config(tmp, edit_manifest, full)))
    assert r.returncode == 0, r.stderr
    records = read_jsonl(full / "results.jsonl")
    assert all(x["score"] is not None for x in records) and len({x["fingerprint"] for x in records}) == 1
    return full


def test_demo_config_runs_end_to_end(tiny_cache, tmp_path):
    out = tmp_path / "demo"
    r = run_main("--config", str(ROOT / "configs" / "demo.yaml"), "--set", f"job.output_dir={out}")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    manifest = read_jsonl(ROOT / "data" / "demo" / "manifest.jsonl")
    assert summary["items"] == len(manifest) and summary["failed"] == 0
    results = read_jsonl(out / "results.jsonl")
    assert [x["id"] for x in results] == [m["id"] for m in manifest]
    assert all(0 <= x["score"] <= 9 for x in results)
    printed = json.loads(r.stdout)
    assert printed["scored"] == len(manifest)
    assert set(summary["sub_score_names"]) == {"semantic_consistency", "perceptual_quality"}
    # The demo judge is the trained tiny judge: its scores follow the truth the demo set carries.
    assert {m["kind"] for m in manifest} == {"followed", "side_effect", "wrong", "unchanged"}
    clean = [(m, x) for m, x in zip(manifest, results) if "noise_level" not in m]
    noisy = sorted((m["noise_level"], x) for m, x in zip(manifest, results) if "noise_level" in m)
    assert len(noisy) == 3
    for m, x in clean:  # instruction-following on clean edits: above the middle exactly when followed
        assert (x["sub_scores"]["semantic_consistency"] > 4.5) == (m["kind"] == "followed"), (m, x)
    followed = [x["score"] for m, x in clean if m["kind"] == "followed"]
    failed = [x["score"] for m, x in clean if m["kind"] != "followed"]
    assert min(followed) > max(failed), (followed, failed)  # overall: sqrt(SC x PQ)
    quality = [x["sub_scores"]["perceptual_quality"] for _, x in noisy]
    assert quality == sorted(quality, reverse=True), noisy  # more noise, lower quality
    assert min(x["sub_scores"]["perceptual_quality"] for _, x in clean) > quality[0], (clean, noisy)


def test_summary_gives_each_mean_its_standard_error_and_95_interval_and_no_spread_for_one_item(tiny_cache, tmp_path):
    # summary.json gave mean +- the population std only, and a group of one item a std of 0, as if
    # its mean were exact. Each figure now has the sample std, the standard error of the mean and a
    # 95% interval (normal approximation); a group of one item has none of them (null).
    import math
    import statistics

    out = tmp_path / "demo"
    r = run_main("--config", str(ROOT / "configs" / "demo.yaml"), "--set", f"job.output_dir={out}")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    results = read_jsonl(out / "results.jsonl")

    def check(block: dict, values: list[float]) -> None:
        assert block["count"] == len(values) and block["mean"] == pytest.approx(statistics.fmean(values), abs=1e-5)
        if len(values) == 1:
            assert block["std"] is None and block["stderr"] is None and block["ci95"] is None, block
            return
        sd = statistics.stdev(values)
        se = sd / math.sqrt(len(values))
        assert block["std"] == pytest.approx(sd, abs=1e-5) and block["stderr"] == pytest.approx(se, abs=1e-5)
        assert block["ci95"] == pytest.approx([statistics.fmean(values) - 1.96 * se,
                                               statistics.fmean(values) + 1.96 * se], abs=1e-3)

    check(s["score"], [x["score"] for x in results])
    check(s["perceptual_quality"], [x["sub_scores"]["perceptual_quality"] for x in results])
    sizes = {}
    for cat, block in s["categories"].items():
        mine = [x for x in results if x["category"] == cat]
        sizes[cat] = len(mine)
        check(block["score"], [x["score"] for x in mine])
        check(block["semantic_consistency"], [x["sub_scores"]["semantic_consistency"] for x in mine])
    assert sorted(sizes.values()) == [1, 1, 2, 3, 4]  # two groups of one item
    assert s["latency_s_per_item"]["count"] == len(results) and s["latency_s_per_item"]["stderr"] > 0


def test_job_outputs_summary_csv_and_categories(uninterrupted):
    """What the job wrote (the `uninterrupted` fixture ran it: main.py, exit 0)."""
    out = uninterrupted
    results = read_jsonl(out / "results.jsonl")
    assert [x["id"] for x in results] == [f"e{i}" for i in range(10)]
    assert all("latency_s" not in x and "device" not in x for x in results)
    stream = read_jsonl(out / "results.stream.jsonl")
    assert len(stream) == 10 and all(x["device"] == "cpu" and x["latency_s"] > 0 for x in stream)
    s = json.loads((out / "summary.json").read_text())
    assert s["items"] == 10 and s["scored"] == 10
    assert set(s["categories"]) == {"color", "shape"} and s["categories"]["color"]["items"] == 5
    assert s["semantic_consistency"]["count"] == 10
    assert s["categories"]["shape"]["perceptual_quality"]["count"] == 5
    mean = sum(x["score"] for x in results) / 10
    assert s["score"]["mean"] == pytest.approx(mean, abs=1e-5)
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["id"] for row in rows] == [f"e{i}" for i in range(10)]
    assert float(rows[3]["score"]) == pytest.approx(results[3]["score"])
    assert rows[0]["semantic_consistency"] and rows[0]["category"] == "shape"
    assert results[2]["metadata"]["seed"] == 2


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU: auto picks it")
def test_a_config_with_device_auto_scores_on_the_cpu_here_and_the_results_say_cpu(uninterrupted, tmp_path, edit_manifest):
    """`model.params.device: auto` in YAML, through main.py: settled on the CPU of this GPU-less
    machine; the results name the device chosen (never `auto`), and are those of the job that
    left `device` out (its default is `auto`)."""
    out = tmp_path / "auto"
    cfg = write_config(tmp_path, edit_manifest, out, device="auto")
    assert "device: auto" in cfg.read_text()
    r = run_main("--config", str(cfg))
    assert r.returncode == 0, r.stderr
    stream = read_jsonl(out / "results.stream.jsonl")
    assert len(stream) == 10 and {x["device"] for x in stream} == {"cpu"}, stream
    assert_same_results(read_jsonl(out / "results.jsonl"), read_jsonl(uninterrupted / "results.jsonl"), "device auto")


# A resumed job scores the items it has left in other batches than an uninterrupted run did. A
# different batch shape or padding changes the order of float32 sums, which moves a score by a
# few units in the 7th digit (about 1e-7 on the 0..9 scale; how much depends on the CPU's kernels).
# The README promises what holds on any machine: everything identical but floats, and floats
# within SCORE_TOL.
SCORE_TOL = 1e-5


def assert_same_results(got: list[dict], want: list[dict], where: str = "") -> None:
    """Same records, keys and order; every string, int, bool and None identical (ids, errors,
    error kinds, fingerprints, inputs, metadata); every float within SCORE_TOL."""
    assert [r.get("id") for r in got] == [r.get("id") for r in want], where

    def same(a, b, path):
        if isinstance(a, float) or isinstance(b, float):
            assert isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= SCORE_TOL, \
                f"{where}{path}: {a!r} != {b!r}"
        elif isinstance(a, dict) and isinstance(b, dict):
            assert list(a) == list(b), f"{where}{path}: keys {list(a)} != {list(b)}"
            for k in a:
                same(a[k], b[k], f"{path}.{k}")
        elif isinstance(a, list) and isinstance(b, list):
            assert len(a) == len(b), f"{where}{path}: {a!r} != {b!r}"
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{path}[{i}]")
        else:
            assert type(a) is type(b) and a == b, f"{where}{path}: {a!r} != {b!r}"

    for r, w in zip(got, want):
        same(r, w, f"[{w.get('id')}]")


def write_partial(full: Path, part: Path) -> None:
    """An interrupted run: the first 6 results reached the stream, the 7th was cut mid-line."""
    part.mkdir()
    lines = (full / "results.stream.jsonl").read_text().splitlines(keepends=True)
    (part / "results.stream.jsonl").write_text("".join(lines[:6]) + lines[6][:40])


def test_resume_skips_finished_items_and_final_file_matches(uninterrupted, tmp_path, edit_manifest):
    full, part = uninterrupted, tmp_path / "part"
    write_partial(full, part)
    r = run_main("--config", str(write_config(tmp_path, edit_manifest, part)))
    assert r.returncode == 0, r.stderr
    s = json.loads((part / "summary.json").read_text())
    assert s["resumed_from_disk"] == 6
    resumed = read_jsonl(part / "results.jsonl")
    assert_same_results(resumed, read_jsonl(full / "results.jsonl"))
    assert resumed[:6] == read_jsonl(full / "results.jsonl")[:6], "results read back from disk are kept as stored"
    stream = (part / "results.stream.jsonl").read_text().splitlines()
    assert len(stream) == 6 + 1 + 4  # 6 kept, the broken line, 4 rescored
    # A third run scores nothing new, and writes the same file again, byte for byte.
    before = (part / "results.jsonl").read_bytes()
    r = run_main("--config", str(write_config(tmp_path, edit_manifest, part)))
    assert r.returncode == 0, r.stderr
    assert json.loads((part / "summary.json").read_text())["resumed_from_disk"] == 10
    assert (part / "results.jsonl").read_bytes() == before


def test_a_finished_job_loads_no_judge_to_find_nothing_left(uninterrupted, tmp_path, edit_manifest, monkeypatch):
    # Every row on disk under the fingerprint this config's judge would report: the job writes its
    # outputs again, byte for byte, without loading the model. Anything left to score (a changed
    # setting that changes scores, one row missing, resume off) loads it as before.
    import shutil

    from src.job import runner

    class Loaded(Exception):
        pass

    def build(spec):
        raise Loaded(spec["params"])

    done = tmp_path / "done"
    shutil.copytree(uninterrupted, done)
    before = {f: (done / f).read_bytes() for f in ("results.jsonl", "results.csv")}
    monkeypatch.setattr(runner, "build_reward_model", build)
    cfg = yaml.safe_load(write_config(tmp_path, edit_manifest, done).read_text())
    summary = runner.run_job(cfg, base=ROOT, progress=False)
    assert summary["resumed_from_disk"] == summary["items"] == 10 and summary["failed"] == 0
    assert {f: (done / f).read_bytes() for f in before} == before
    assert json.loads((done / "summary.json").read_text())["fingerprint"] == read_jsonl(done / "results.jsonl")[0][
        "fingerprint"]
    # batch_size is no part of the fingerprint: still nothing to load
    runner.run_job(yaml.safe_load(write_config(tmp_path, edit_manifest, done, batch_size=5).read_text()), base=ROOT,
                   progress=False)
    for changed in ({"template": "quality"}, {"max_pixels": 200704}):
        with pytest.raises(Loaded):
            runner.run_job(yaml.safe_load(write_config(tmp_path, edit_manifest, done, **changed).read_text()),
                           base=ROOT, progress=False)
    lines = (done / "results.stream.jsonl").read_text().splitlines(keepends=True)
    (done / "results.stream.jsonl").write_text("".join(lines[:-1]))  # one row's result gone
    with pytest.raises(Loaded):
        runner.run_job(cfg, base=ROOT, progress=False)
    (done / "results.stream.jsonl").write_text("".join(lines))
    with pytest.raises(Loaded):
        runner.run_job({**cfg, "job": {**cfg["job"], "resume": False}}, base=ROOT, progress=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_in_other_batches_and_workers_differs_only_in_float_rounding(uninterrupted, tmp_path, edit_manifest,
                                                                            workers):
    """The README's resume guarantee, for the rest of a job scored in batches of 1, 3 and 8 by one
    or two worker processes (batch size and devices are not part of the fingerprint)."""
    from src.job.runner import run_job
    from src.models.reward.implementations.multi_gpu import MultiGPURewardModel

    want = read_jsonl(uninterrupted / "results.jsonl")
    with MultiGPURewardModel(device_ids=["cpu"] * workers, model_name="tiny:qwen2_5_vl", template="edit",
                             batch_size=8, progress=False) as model:
        pids = model.worker_pids()
        # what a finished job compares its stream with, without starting workers (run_job)
        from src.job.runner import settings_fingerprint

        assert settings_fingerprint(MultiGPURewardModel, {"device_ids": ["cpu"] * workers, "model_name": "tiny:qwen2_5_vl",
                                                          "template": "edit", "batch_size": 3}) == model.fingerprint
        for micro_batch in (1, 3, 8):  # what each worker scores in one forward pass
            model.micro_batch = micro_batch
            part = tmp_path / f"part-mb{micro_batch}"
            write_partial(uninterrupted, part)
            cfg = yaml.safe_load(write_config(tmp_path, edit_manifest, part).read_text())
            summary = run_job(cfg, base=ROOT, progress=False, model=model)
            assert summary["resumed_from_disk"] == 6 and summary["failed"] == 0
            assert_same_results(read_jsonl(part / "results.jsonl"), want, f"{workers} worker(s), batches of "
                                                                          f"{micro_batch}: ")
    assert_no_orphans(pids)


def test_a_job_scores_rows_that_share_a_source_side_by_side(tiny_cache, tmp_path):
    """A manifest ordered model by model (4 sources x 2 editing models) in job chunks of 4: the job
    scores a source's rows in one chunk, so the judge encodes each source once (no store beyond a
    chunk); results.jsonl stays in manifest order and equals a run without vision reuse (which
    keeps the manifest's order); a run resumed from the grouped stream reads it back by id; under
    chunk_order input the rows keep the manifest's order."""
    from src.job.runner import run_job
    from src.models.reward.implementations.local import QwenVLRewardModel

    d = tmp_path / "models"
    d.mkdir()
    rows = []
    for s in range(4):
        make_image(200 + s, 56, 48).save(d / f"src{s}.png")
    for m in range(2):
        for s in range(4):
            make_image(300 + 10 * m + s, 56, 48).save(d / f"m{m}-{s}.png")
            rows.append({"id": f"m{m}-s{s}", "source_image": f"src{s}.png", "image": f"m{m}-{s}.png",
                         "instruction": "make the square blue"})
    manifest = d / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge = dict(model_name="tiny:qwen2_5_vl", template="edit", batch_size=4, vision_cache_mb=0, progress=False)

    def job(out: Path, model) -> dict:
        cfg = yaml.safe_load(write_config(tmp_path, manifest, out, batch_size=4).read_text())
        return run_job(cfg, base=ROOT, progress=False, model=model)

    with QwenVLRewardModel(**judge, vision_reuse=False) as plain_model:
        job(tmp_path / "plain", plain_model)
    plain = read_jsonl(tmp_path / "plain" / "results.jsonl")
    assert [r["id"] for r in read_jsonl(tmp_path / "plain" / "results.stream.jsonl")] == [r["id"] for r in rows]
    with QwenVLRewardModel(**judge) as model:
        reuse = model.engine._vision_reuse
        summary = job(tmp_path / "grouped", model)
        assert summary["failed"] == 0
        assert reuse.encoded == 4 + 8  # in manifest order each job chunk would show all 4 sources: 16
        stream = read_jsonl(tmp_path / "grouped" / "results.stream.jsonl")
        assert [r["id"] for r in stream] == [f"m{m}-s{s}" for s in range(4) for m in range(2)]
        assert_same_results(read_jsonl(tmp_path / "grouped" / "results.jsonl"), plain, "grouped: ")
        part = tmp_path / "part"
        part.mkdir()
        (part / "results.stream.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stream[:3]))
        summary = job(part, model)
        assert summary["resumed_from_disk"] == 3 and summary["failed"] == 0
        assert_same_results(read_jsonl(part / "results.jsonl"), plain, "resumed: ")
    with QwenVLRewardModel(**judge, chunk_order="input") as model:  # rows as the manifest orders them
        reuse = model.engine._vision_reuse
        assert job(tmp_path / "as_given", model)["failed"] == 0
        assert reuse.encoded == 2 * (4 + 4)  # each job chunk shows all 4 sources
        assert [r["id"] for r in read_jsonl(tmp_path / "as_given" / "results.stream.jsonl")] == [r["id"] for r in rows]
        assert_same_results(read_jsonl(tmp_path / "as_given" / "results.jsonl"), plain, "as given: ")


def test_a_job_orders_its_calls_by_image_size_across_the_whole_job(tiny_cache, tmp_path):
    """12 rows of three image sizes, shuffled, in job calls of 4: under chunk_order auto each call
    holds one size, largest first (a call of 4 shuffled rows would hold a random mix, and the judge
    could only sort within it); results.jsonl keeps the manifest's order and equals a run in the
    manifest's order (chunk_order input, whose calls keep that order)."""
    import random

    from PIL import Image

    from src.job.runner import run_job
    from src.models.reward.implementations.local import QwenVLRewardModel

    d = tmp_path / "sizes"
    d.mkdir()
    sizes = [(96, 72), (56, 48), (40, 40)] * 4
    random.Random(3).shuffle(sizes)
    rows = []
    for i, (w, h) in enumerate(sizes):
        make_image(400 + i, w, h).save(d / f"{i}.png")
        rows.append({"id": f"r{i}", "image": f"{i}.png"})
    manifest = d / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def job(out: Path, order: str) -> tuple[list[list[tuple[int, int]]], list[dict]]:
        cfg = yaml.safe_load(write_config(tmp_path, manifest, out, template="quality", batch_size=2).read_text())
        calls: list[list[tuple[int, int]]] = []
        with QwenVLRewardModel(model_name="tiny:qwen2_5_vl", template="quality", batch_size=2, chunk_order=order,
                               progress=False) as model:
            real = model.batch_score

            def recording(items, *a, **kw):
                calls.append([Image.open(it.images[0]).size for it in items])
                return real(items, *a, **kw)
            model.batch_score = recording
            assert run_job(cfg, base=ROOT, progress=False, model=model)["failed"] == 0
        return calls, read_jsonl(out / "results.jsonl")

    auto_calls, auto = job(tmp_path / "auto", "auto")
    input_calls, as_given = job(tmp_path / "input", "input")
    assert input_calls == [sizes[k:k + 4] for k in range(0, 12, 4)]
    assert any(len(set(call)) > 1 for call in input_calls)  # the shuffle mixes sizes within calls
    assert auto_calls == [[(96, 72)] * 4, [(56, 48)] * 4, [(40, 40)] * 4]
    assert [r["id"] for r in auto] == [r["id"] for r in rows]
    assert_same_results(auto, as_given, "ordered by size: ")


def test_changed_settings_do_not_reuse_old_results(uninterrupted, tmp_path, edit_manifest):
    out = tmp_path / "fp"
    out.mkdir()  # every item already scored, with the `edit` template
    shutil.copy(uninterrupted / "results.stream.jsonl", out / "results.stream.jsonl")
    r = run_main("--config", str(write_config(tmp_path, edit_manifest, out)), "--set",
                 "model.params.template=edit_quality")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["resumed_from_disk"] == 0 and s["sub_score_names"] == ["edit_quality"]


def test_results_csv_has_the_rubrics_sub_score_columns_when_every_item_fails(uninterrupted, tmp_path, edit_manifest):
    # results.csv took its sub-score columns from the rows that scored: a job where every item
    # failed (images gone, every row refused by the manifest) wrote a csv without them, so a
    # script reading a sub-score's column broke on exactly the jobs it most needed to look at.
    # The columns, and summary.json's sub-scores, now come from the judge's rubric.
    with open(uninterrupted / "results.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[2:4] == ["perceptual_quality", "semantic_consistency"]
    rows = [{**row, "source_image": str(edit_manifest.parent / row["source_image"])} for row in read_jsonl(edit_manifest)]
    gone = [{**row, "image": f"gone{i}.png"} for i, row in enumerate(rows)]  # the judge fails each
    refused = [{**row, "image": [i]} for i, row in enumerate(rows)]  # the manifest refuses each: no judge loads
    for name, edited, kind in (("gone", gone, "image"), ("refused", refused, "manifest")):
        manifest = tmp_path / f"{name}.jsonl"
        manifest.write_text("".join(json.dumps(row) + "\n" for row in edited))
        out = tmp_path / name
        r = run_main("--config", str(write_config(tmp_path, manifest, out)))
        assert r.returncode == 1, r.stderr  # every item failed
        s = json.loads((out / "summary.json").read_text())
        assert s["failures_by_kind"] == {kind: 10}, s["failures_by_kind"]
        with open(out / "results.csv", newline="") as fh:
            got = list(csv.reader(fh))
        assert got[0] == header, name
        assert [row[1:4] for row in got[1:]] == [["", "", ""]] * 10
        assert s["sub_score_names"] == ["perceptual_quality", "semantic_consistency"]
        assert s["semantic_consistency"]["count"] == s["perceptual_quality"]["count"] == 0
        assert s["semantic_consistency"]["mean"] is None


def test_results_csv_neutralises_text_a_spreadsheet_would_run_as_a_formula(tiny_cache, tmp_path, edit_manifest):
    # An instruction (or id, or category) starting with = + - @, a tab or a carriage return went into
    # results.csv as written: a spreadsheet opening it ran "=HYPERLINK(...)" as a formula (CSV
    # injection). Such text cells now start with a single quote; results.jsonl keeps the text exactly;
    # a text that is a plain number ("-5") and every score stay numbers.
    from src.job.runner import run_job
    from src.models.reward import BaseRewardModel, ScoreResult

    texts = ['=HYPERLINK("http://x.example","click")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)",
             "\tmake it blue", "\rmake it red", "make the sky pink", "-5"]
    rows = read_jsonl(edit_manifest)[:len(texts)]
    for row, text in zip(rows, texts):
        row.update(instruction=text, id=f"{text[:4]}{row['id']}", category=text)
    rows[-1]["id"] = "-5"
    manifest = _edited_manifest(rows, edit_manifest, tmp_path)
    out = tmp_path / "out"
    r = run_main("--config", str(write_config(tmp_path, manifest, out)))
    assert r.returncode == 0, r.stderr
    results = read_jsonl(out / "results.jsonl")
    assert [x["instruction"] for x in results] == texts and [x["category"] for x in results] == texts
    assert [x["id"] for x in results] == [row["id"] for row in rows]
    with open(out / "results.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    want = ["'" + t for t in texts[:6]] + texts[6:]
    assert [row["instruction"] for row in table] == want
    assert [row["category"] for row in table] == want
    assert [row["id"] for row in table] == ["'" + x["id"] for x in results[:6]] + [x["id"] for x in results[6:]]
    for row, x in zip(table, results):
        assert float(row["score"]) == pytest.approx(x["score"], abs=1e-9)

    class Negative(BaseRewardModel):  # a judge class of the user's, on a -5..5 scale
        def score_items(self, items):
            return [ScoreResult(index=i, id=it.id, score=-2.5 + i, sub_scores={"-part": -1.25})
                    for i, it in enumerate(items)]

    out = tmp_path / "negative"
    run_job({"job": {"manifest": str(manifest), "output_dir": str(out), "chunk_size": 8}}, base=tmp_path,
            progress=False, model=Negative())
    with open(out / "results.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0][:3] == ["id", "score", "'-part"]
    assert [row[1:3] for row in table[1:]] == [[str(-2.5 + i), "-1.25"] for i in range(len(texts))]


def test_csv_and_folder_manifests_and_bad_rows(tiny_cache, tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for i in range(3):
        make_image(i).save(d / f"a{i}.png")
    make_image(9).save(d / "sub" / "b.jpg")
    (d / "readme.txt").write_text("not an image, not listed")
    out = tmp_path / "folder"
    cfg = write_config(tmp_path, d, out, template="quality")
    r = run_main("--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert [x["id"] for x in read_jsonl(out / "results.jsonl")] == ["a0.png", "a1.png", "a2.png", "sub/b.jpg"]

    csv_path = tmp_path / "m.csv"
    csv_path.write_text("id,image,instruction\n"
                        f"c1,{d / 'a0.png'},\n"
                        f"c2,{d / 'a1.png'}|{d / 'a2.png'},\n"
                        "c3,,\n"
                        f"c1,{d / 'a2.png'},\n")
    out2 = tmp_path / "csv"
    r = run_main("--config", str(write_config(tmp_path, csv_path, out2, template="quality")))
    assert r.returncode == 0, r.stderr
    res = read_jsonl(out2 / "results.jsonl")
    assert [x["id"] for x in res] == ["c1", "c2", "c3", "c1"]
    assert res[0]["score"] is not None and res[1]["score"] is not None
    assert res[2]["error_kind"] == "manifest" and "line 4: no image" in res[2]["error"]
    assert res[3]["error_kind"] == "manifest" and "duplicate id 'c1'" in res[3]["error"]
    s = json.loads((out2 / "summary.json").read_text())
    assert s["failures_by_kind"] == {"manifest": 2} and len(s["failures"]) == 2


def test_cli_errors_are_clear(tmp_path, edit_manifest):
    r = run_main("--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr
    cfg = write_config(tmp_path, edit_manifest, tmp_path / "x", batchsize=3)
    r = run_main("--config", str(cfg))
    assert r.returncode == 2 and "unknown parameter 'batchsize'. Did you mean 'batch_size'?" in r.stderr
    cfg = write_config(tmp_path, tmp_path / "nope.jsonl", tmp_path / "y")
    r = run_main("--config", str(cfg))
    assert r.returncode == 2 and "manifest not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_config_path_of_the_repository_given_from_another_folder_is_named(tmp_path):
    """`python ~/judge/main.py --config configs/demo.yaml` from another folder: the config's own
    paths are read from the repository, --config from the current folder. The error says so and
    names the file it meant, which then runs as given."""
    r = subprocess.run([sys.executable, str(MAIN), "--config", "configs/demo.yaml", "--set",
                        f"job.output_dir={tmp_path / 'out'}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and not (tmp_path / "out").exists(), r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: config file not found: configs/demo.yaml (read from the current folder, {tmp_path}); "
                           f"{ROOT / 'configs' / 'demo.yaml'} is there: give that path, or run from {ROOT}"), line
    r = subprocess.run([sys.executable, str(MAIN), "serve", "--config", "configs/nothing.yaml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: config file not found: configs/nothing.yaml", r.stderr


def test_main_py_run_with_a_python_that_lacks_the_packages_says_which_python_to_use(tmp_path):
    """`python main.py --config configs/demo.yaml` (the README's command without `.venv/bin/`), with a
    Python that has none of the packages: one line naming that Python, the missing package and the
    environment to use, not a traceback ending in `No module named 'yaml'`; no output folder."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    r = subprocess.run([str(bare / "bin" / "python"), str(MAIN), "--config", "configs/demo.yaml", "--set",
                        f"job.output_dir={tmp_path / 'out'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (f"error: this Python ({bare / 'bin' / 'python'}) lacks a package the command needs "
                                "(No module named 'yaml'); run it with the project's environment, .venv/bin/python "
                                "(bash setup_env.sh builds it)"), r.stderr
    assert not (tmp_path / "out").exists()


def test_a_judge_that_cannot_start_gives_one_clean_error(tmp_path, edit_manifest):
    """A remote judge whose service never answers: exit 1 with the URL and the cause, no traceback
    (every judge error is a JudgeError, caught once in the CLI)."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {"model": {"class_path": "remote", "params": {"url": f"http://127.0.0.1:{port}", "wait_ready_s": 1}},
           "job": {"manifest": str(edit_manifest), "output_dir": str(tmp_path / "out")}}
    p = tmp_path / "remote.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = run_main("--config", str(p))
    assert r.returncode == 1, r.stderr
    assert f"error: http://127.0.0.1:{port}: not ready after 1s (status 'unreachable': ConnectError" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_config_mistakes_stop_before_anything_starts(tmp_path, edit_manifest, capsys):
    """Unknown keys at any level, a key --unset that is not there, and a template the manifest
    cannot feed: exit 2 naming the key (and its close match) or the template and the column,
    before any model loads or any output folder appears. In this process: the CLI's own code."""
    from src.cli import _config_args, _load, main
    from src.models.reward.config import resolve_spec

    folder = tmp_path / "images"
    folder.mkdir()
    make_image(1).save(folder / "a.png")
    out = tmp_path / "out"
    cfg = str(write_config(tmp_path, edit_manifest, out))
    cases = [
        (["--set", "foo=1"], "error: config: unknown key 'foo'. Known: model, job"),
        (["--set", "batch_size=4"], "Did you mean 'model.params.batch_size'?"),
        (["--set", "job.chunksize=4"], "job: unknown key 'chunksize'. Did you mean 'chunk_size'?"),
        (["--set", "model.device=cpu"], "model: unknown key 'device'. Did you mean 'model.params.device'?"),
        (["--unset", "model.params.devices"], "the config has no 'devices' in model.params"),
        # a misspelt device: named with the forms when the config is read, not when the judge loads
        (["--set", "model.params.device=gpu"], "error: Problem with class_path 'qwen_vl': parameter device: expected "
                                               "'auto' (the first CUDA GPU, else the CPU), 'cpu', 'cuda', 'cuda:N' or "
                                               "a GPU index N, got 'gpu'"),
        (["--set", "model.params.device=cuda:x"], "parameter device: expected 'auto' (the first CUDA GPU, else the "
                                                  "CPU), 'cpu', 'cuda', 'cuda:N' or a GPU index N, got 'cuda:x'"),
        (["--set", f"job.manifest={folder}"], f"template 'edit' needs a source image (its part 'semantic_consistency' "
                                              f"uses template 'edit_instruction'), and no row of the manifest {folder}"),
        (["--set", f"job.manifest={folder}", "--set", "model.params.template=alignment"],
         "template 'alignment' needs an instruction, and no row of the manifest"),
        # bool("false") is True: a quoted false (or any other word) must not resume or report
        (["--set", 'job.resume="false"'], "error: job.resume: expected true or false, got 'false'"),
        (["--set", "job.report=maybe"], "error: job.report: expected true or false, got 'maybe'"),
        (["--set", "job.chunk_size=true"], "error: job.chunk_size: expected a positive integer, got True"),
        # a bare number or true is what YAML makes of it, not a path: it was a TypeError's traceback
        (["--set", "job.output_dir=2024"], "error: job.output_dir: expected a path (a string), got 2024"),
        (["--set", "job.manifest=true"], "error: job.manifest: expected a path (a string), got True"),
        (["--set", "model.class_path=../judges/mine.Judge"], "cannot import module '../judges/mine'"),
        # a service's config given to a job: where the section belongs, not a near key
        (["--set", "server.port=8000"], "error: config: a 'server' section is for the reward service: run it with "
                                        "`main.py serve --config ...`; a job config has the keys model, job"),
    ]
    for extra, message in cases:
        rc = main(["--config", cfg, *extra], prog="main.py")
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (extra, err)
        assert not out.exists(), (extra, "the job started")
    # --unset then --set, in order: the demo's in-process judge becomes a worker-pool judge
    ap = argparse.ArgumentParser()
    _config_args(ap)
    cfg_multi = _load(ap.parse_args(["--config", str(ROOT / "configs" / "demo.yaml"), "--set", "model.class_path=multi_gpu",
                                     "--unset", "model.params.device", "--set", "model.params.device_ids=[cpu]"]))
    assert cfg_multi["model"]["class_path"] == "multi_gpu" and "device" not in cfg_multi["model"]["params"]
    assert resolve_spec(cfg_multi["model"])[2]["device_ids"] == ["cpu"]
    with pytest.raises(SystemExit):
        main(["--help"], prog="main.py")
    help_text = capsys.readouterr().out
    assert "main.py serve --config" in help_text and "main.py report RESULTS.jsonl" in help_text
    assert "--unset KEY" in help_text and "--no-progress" in help_text


def test_template_mistakes_stop_the_job_naming_the_template(tmp_path, edit_manifest, capsys):
    """A template written wrong in the config (here through --set, as YAML): exit 2, one line naming
    the template and the key, no traceback, no output folder. A wrong type under `templates` was a
    TypeError's traceback; a misspelt placeholder ran the whole job with the instruction never shown."""
    from src.cli import main

    out = tmp_path / "out"
    cfg = str(write_config(tmp_path, edit_manifest, out))
    cases = [
        ("{edit_quality: {text: 5}}", "error: Problem with class_path 'qwen_vl': template 'edit_quality': text: "
                                      "expected a string, got int 5"),
        ("{edit_quality: {levels: 5}}", "template 'edit_quality': levels: expected a mapping"),
        ('{edit_instruction: {text: "Was {instrution} followed?", images: [source, image]}}',
         "template 'edit_instruction': text holds {instrution}, which is no placeholder (did you mean {instruction}?)"),
        ("{edit_instruction: {scale: [0, 100]}, edit_quality: {scale: [0, 100]}}",
         "template 'edit_instruction': logits mode needs single-token levels; its scale (0.0, 100.0) has none"),
    ]
    for templates, message in cases:
        rc = main(["--config", cfg, "--set", f"model.params.templates={templates}"], prog="main.py")
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, (templates, err)
        assert not out.exists(), (templates, "the job started")


def test_finished_job_says_where_its_results_are(tiny_cache, tmp_path):
    """The printed summary names results.jsonl and job.report's page; --no-progress shows no bar
    (the weight-loading one included); report --out NAME writes beside the results; a job in which
    every item failed exits 1, its results still on disk."""
    for i in range(2):
        make_image(i).save(tmp_path / f"ok{i}.png")
    (tmp_path / "good.jsonl").write_text("".join(json.dumps({"id": f"g{i}", "image": f"ok{i}.png"}) + "\n"
                                                 for i in range(2)))
    out = tmp_path / "good"
    cfg = write_config(tmp_path, tmp_path / "good.jsonl", out, template="quality")
    r = run_main("--config", str(cfg), "--set", "job.report=true")
    assert r.returncode == 0, r.stderr
    brief = json.loads(r.stdout)
    assert brief["results"] == str(out / "results.jsonl") and brief["report"] == str(out / "report.html")
    assert (out / "report.html").is_file()
    assert "Loading weights" not in r.stderr and "it/s" not in r.stderr, r.stderr

    r = run_main("report", str(out / "results.jsonl"), "--out", "named.html")
    assert r.returncode == 0, r.stderr
    assert (out / "named.html").is_file() and not (ROOT / "named.html").exists()
    assert str(out / "named.html") in r.stdout

    (tmp_path / "bad.jsonl").write_text("".join(json.dumps({"id": f"b{i}", "image": f"gone{i}.png"}) + "\n"
                                                for i in range(2)))
    bad = tmp_path / "bad"
    r = run_main("--config", str(write_config(tmp_path, tmp_path / "bad.jsonl", bad, template="quality")))
    assert r.returncode == 1, r.stderr
    assert "error: every item failed (image: 2); the first: item 'b0'" in r.stderr and "gone0.png" in r.stderr
    assert json.loads(r.stdout)["failed"] == 2 and len(read_jsonl(bad / "results.jsonl")) == 2


def _demo_offline(cwd, out, model_name: str) -> subprocess.CompletedProcess:
    """The demo job with another model_name, on a machine that downloads nothing."""
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
                           "--set", f"model.params.model_name={model_name}", "--set", f"job.output_dir={out}",
                           "--no-progress"], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_a_model_that_cannot_be_loaded_is_one_line_not_a_traceback(tmp_path):
    # A hub id on a machine that cannot download it: one line naming model_name and the cause,
    # exit 1 (the machine's problem, not the config's), no traceback.
    out = tmp_path / "out"
    run = _demo_offline(tmp_path, out, "no-org/no-such-model")
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert last.startswith("error: the judge could not start: model_name 'no-org/no-such-model': no such folder "
                           "here, and it could not be loaded from the hub ("), last
    assert last.endswith("(HF_HUB_OFFLINE is set: nothing is downloaded), or tiny:judge"), last
    assert not out.exists(), "a job whose judge never started leaves no empty output folder"


def test_a_misspelt_checkpoint_folder_is_named_before_the_hub_is_tried(tmp_path):
    # models/tiny_jugde has a hub id's shape: without a network the hub's retries take minutes, so
    # the close folder is named at once, and again in the one-line error.
    run = _demo_offline(tmp_path, tmp_path / "out", "models/tiny_jugde")
    lines = run.stderr.strip().splitlines()
    warned = [i for i, line in enumerate(lines) if "did you mean 'models/tiny_judge'? Trying it as a hub id" in line]
    assert run.returncode == 1 and warned and warned[0] < len(lines) - 1, run.stderr[-3000:]
    assert lines[-1].startswith("error: the judge could not start: model_name 'models/tiny_jugde': no such folder "
                                "here (did you mean 'models/tiny_judge'?), and it could not be loaded"), lines[-1]


def test_a_hub_warning_is_printed_once():
    # huggingface_hub prints through its own handler and passes the record up to the root's too.
    code = ("import logging; from src import cli; cli._setup_logging(); import huggingface_hub, transformers; "
            "logging.getLogger('huggingface_hub.file_download').warning('hub says so'); "
            "logging.getLogger('src.models.reward.engine').warning('judge says so')")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("hub says so") == 1 and run.stderr.count("judge says so") == 1, run.stderr


def _strict_json(line: str) -> dict:
    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")
    return json.loads(line, parse_constant=refuse)


def test_a_judge_whose_logits_are_not_finite_scores_no_item(tiny_cache, tmp_path):
    # float16 overflows in a large judge (a GPU without bfloat16) make its next-token logits NaN or
    # inf. The expected value over the levels was then NaN, and the job counted it as a score:
    # 'scored': 11, a mean of NaN, results.jsonl holding the token NaN (not JSON; the report refused
    # the job's own file), and resume never scored those items again.
    from safetensors.torch import load_file, save_file

    judge = tmp_path / "overflowing_judge"
    shutil.copytree(ROOT / "models" / "tiny_judge", judge)
    weights = load_file(judge / "model.safetensors")
    weights["lm_head.weight"][:] = float("nan")
    save_file(weights, judge / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    r = run_main("--config", str(ROOT / "configs" / "demo.yaml"), "--set", f"model.params.model_name={judge}",
                 "--set", f"job.output_dir={out}")
    assert r.returncode == 1, r.stderr
    records = [_strict_json(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 11 and all(x["score"] is None and x["error_kind"] == "model" for x in records)
    assert records[0]["error"].startswith("item '00' (line 1): semantic_consistency: the judge's next-token "
                                          "logits are not finite (NaN or inf)"), records[0]["error"]
    summary = _strict_json((out / "summary.json").read_text())
    assert summary["scored"] == 0 and summary["failures_by_kind"] == {"model": 11}
    assert _strict_json(r.stdout)["failed"] == 11


def test_a_second_job_on_a_folder_in_use_stops_before_it_scores(tiny_cache, tmp_path):
    # A job started twice on one output folder (a scheduler's requeue while the first still ran, two
    # terminals) scored every item twice, each run appending to one stream, and both raced to
    # write results.jsonl. The second now stops at once, naming the folder; the first is untouched.
    from conftest import worker_processes

    for i in range(6):
        make_image(i).save(tmp_path / f"im{i}.png")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"id": f"it{i}", "image": f"im{i}.png"}) + "\n"
                                              for i in range(6)))
    out = tmp_path / "out"
    # The first job scores its first call, then hangs in the last (the fault plug-in, in its worker),
    # so it is still running, whatever the machine's speed, when the second starts.
    cfg = write_config(tmp_path, tmp_path / "m.jsonl", out, template="quality", chunk_order="input")
    spec = yaml.safe_load(cfg.read_text())
    spec["model"]["class_path"] = "multi_gpu"
    spec["model"]["params"].update(device_ids=["cpu"], micro_batch=1, progress=False)
    spec["job"]["chunk_size"] = 2
    cfg.write_text(yaml.safe_dump(spec))
    first = subprocess.Popen([sys.executable, str(MAIN), "--config", str(cfg), "--no-progress"], cwd=str(ROOT),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env={**os.environ, "REWARD_FAULT_HANG_ON_ID": "it5"})
    workers: list[int] = []
    try:
        stream = out / "results.stream.jsonl"
        deadline = time.monotonic() + 180
        while not (stream.exists() and stream.read_text().count("\n") >= 2):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first job wrote no result within 180 s"
            time.sleep(0.1)
        workers = worker_processes([first.pid])
        before = stream.read_bytes()
        second = run_main("--config", str(cfg))
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip() == (f"error: job.output_dir: another job is running in {out} (it holds the "
                                          "folder's lock); wait for it to end, or give this job another "
                                          "job.output_dir"), second.stderr
        assert stream.read_bytes().startswith(before) and first.poll() is None
        assert not (out / "results.jsonl").exists()
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=60)
        assert_no_orphans([first.pid, *workers])
    # The lock goes with its job however it ends: the same command now resumes.
    done = run_main("--config", str(cfg), "--set", "model.class_path=qwen_vl", "--unset", "model.params.device_ids",
                    "--unset", "model.params.micro_batch", "--unset", "model.params.progress")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["resumed_from_disk"] >= 2


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, edit_manifest):
    # job.output_dir naming a file (or a folder under one) was a FileExistsError traceback.
    (tmp_path / "taken").write_text("a file, not a folder\n")
    for out in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        r = run_main("--config", str(write_config(tmp_path, edit_manifest, out)))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith(f"error: job.output_dir: cannot make the folder {out}: "), r.stderr


def test_a_resumed_job_says_which_stored_results_it_does_not_reuse(uninterrupted, tmp_path, edit_manifest):
    # A job run again after its settings or its manifest changed scores those rows again, as it
    # should; it did so without a word ('resumed_from_disk': 0), and a user who meant to resume
    # (a large judge: hours) learned it only from the bill. It now says how many and why.
    fp = read_jsonl(uninterrupted / "results.jsonl")[0]["fingerprint"]
    out = tmp_path / "changed"
    out.mkdir()
    shutil.copy(uninterrupted / "results.stream.jsonl", out / "results.stream.jsonl")
    r = run_main("--config", str(write_config(tmp_path, edit_manifest, out)), "--set", "model.params.max_pixels=9000")
    assert r.returncode == 0, r.stderr
    assert (f"WARNING src.job.runner: {out / 'results.stream.jsonl'} holds results for 10 of this job's rows that "
            f"were scored under other settings (fingerprint {fp}; this job's is ") in r.stderr, r.stderr
    assert "they are not reused, and those rows are scored again" in r.stderr
    assert json.loads(r.stdout)["resumed_from_disk"] == 0

    rows = read_jsonl(edit_manifest)
    rows[3]["instruction"] = "make square 3 green"
    rows[5]["image"] = rows[4]["image"]
    out2, r = _rerun_on_edited_manifest(rows, edit_manifest, uninterrupted, tmp_path, "edited")
    assert (f"WARNING src.job.runner: {out2 / 'results.stream.jsonl'} holds results for 2 of this job's rows "
            "(e3, e5) whose images or instruction have changed since: they are not reused, and those rows are scored "
            "again") in r.stderr, r.stderr
    assert json.loads(r.stdout)["resumed_from_disk"] == 8
    assert "other settings" not in r.stderr


def test_a_resumed_generate_job_scores_again_a_row_whose_answer_budget_changed(tiny_cache, tmp_path):
    # In generate mode an item's own max_new_tokens (metadata) caps the answer its score is read
    # from. A job run again after a row's budget changed reused the stored score, made under the
    # old budget (its record even showed the new one). Such a row is now scored again, as a fresh
    # run would score it; in logits mode, which writes no answer, the budget changes nothing and
    # every stored score is reused.
    demo = ROOT / "data" / "demo"
    rows = [{**row, "image": str(demo / row["image"]), "source_image": str(demo / row["source_image"])}
            for row in read_jsonl(demo / "manifest.jsonl")[:4]]

    def job(budget: int, out: Path, mode: str = "generate") -> tuple[dict, list[dict], str]:
        rows[0]["max_new_tokens"] = budget
        manifest = tmp_path / f"manifest-{budget}.jsonl"
        manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
        r = run_main("--config", str(ROOT / "configs" / "demo.yaml"), "--set", f"model.params.mode={mode}",
                     "--set", f"job.manifest={manifest}", "--set", f"job.output_dir={out}")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout), read_jsonl(out / "results.jsonl"), r.stderr

    summary, first, _ = job(16, tmp_path / "gen")
    assert summary["scored"] == 4 and first[0]["metadata"]["max_new_tokens"] == 16
    _, fresh, _ = job(2, tmp_path / "fresh")  # two tokens cut the judge's {"score": N} short
    assert fresh[0]["score"] is None and fresh[0]["error_kind"] == "parse", fresh[0]
    summary, resumed, err = job(2, tmp_path / "gen")
    assert summary["resumed_from_disk"] == 3, "the row whose budget changed is scored again"
    assert "holds results for 1 of this job's rows (00) whose images, instruction or answer budget (metadata " \
           "max_new_tokens) have changed since" in err, err
    assert_same_results(resumed, fresh)
    assert resumed[1:] == first[1:]

    job(16, tmp_path / "logits", mode="logits")
    summary, logits, err = job(2, tmp_path / "logits", mode="logits")
    assert summary["resumed_from_disk"] == 4 and "changed since" not in err, err
    assert logits[0]["score"] is not None and logits[0]["metadata"]["max_new_tokens"] == 2


def _edited_manifest(rows: list[dict], edit_manifest: Path, tmp_path: Path) -> Path:
    """Rows of the edit manifest (edited), written as tmp_path/manifest.jsonl (its image paths made
    absolute), as json.dumps writes them."""
    folder = edit_manifest.parent
    edited = tmp_path / "manifest.jsonl"
    edited.write_text("".join(json.dumps({**row, "image": str(folder / row["image"]),
                                          "source_image": str(folder / row["source_image"])}) + "\n" for row in rows))
    return edited


def _rerun_on_edited_manifest(rows: list[dict], edit_manifest: Path, uninterrupted: Path, tmp_path: Path,
                              name: str) -> tuple[Path, subprocess.CompletedProcess]:
    """The job run again on rows of the edit manifest (edited, _edited_manifest), into the output
    folder `name` seeded with the uninterrupted run's stored results: (that folder, the run)."""
    edited = _edited_manifest(rows, edit_manifest, tmp_path)
    out = tmp_path / name
    out.mkdir()
    shutil.copy(uninterrupted / "results.stream.jsonl", out / "results.stream.jsonl")
    r = run_main("--config", str(write_config(tmp_path, edited, out)))
    assert r.returncode == 0, r.stderr
    return out, r


def test_a_judge_class_that_returns_too_few_results_is_named_at_once(tmp_path, edit_manifest):
    # `class_path` may name the user's own class. One that returned fewer results than items ran
    # the whole job and then stopped with a bare KeyError (the missing row's id) while writing
    # results.jsonl; zip() had paired the results it did return with the first rows of the call.
    from src.job.runner import run_job
    from src.models.reward import BaseRewardModel, ScoreResult
    from src.models.reward.errors import JudgeError

    class DropsTheLast(BaseRewardModel):
        def score_items(self, items):
            return [ScoreResult(index=i, id=it.id, score=5.0) for i, it in enumerate(items)][:-1]

    cfg = {"job": {"manifest": str(edit_manifest), "output_dir": str(tmp_path / "out"), "chunk_size": 4}}
    with pytest.raises(JudgeError) as e:
        run_job(cfg, base=tmp_path, progress=False, model=DropsTheLast())
    assert str(e.value) == ("the judge (DropsTheLast) returned 3 results for a call of 4 items; a judge returns one "
                            "result per item, in order (BaseRewardModel.score_items)")
    assert not (tmp_path / "out" / "results.stream.jsonl").read_text(), "nothing is recorded against the wrong row"


def test_a_judge_class_that_returns_nan_fails_those_items_and_the_files_stay_json(tmp_path, edit_manifest):
    # A user's class returning float('nan') had NaN written into results.jsonl: not JSON (the report
    # refused the job's own file), counted as scored, and never scored again on resume.
    from src.job.runner import run_job
    from src.models.reward import BaseRewardModel, ScoreResult

    class NaNOnOdd(BaseRewardModel):
        def score_items(self, items):
            return [ScoreResult(index=i, id=it.id, score=float("nan") if i % 2 else 5.0,
                                sub_scores={"a": float("inf") if i % 2 else 5.0}) for i, it in enumerate(items)]

    out = tmp_path / "out"
    run_job({"job": {"manifest": str(edit_manifest), "output_dir": str(out), "chunk_size": 4}},
            base=tmp_path, progress=False, model=NaNOnOdd())
    text = (out / "results.jsonl").read_text()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in results.jsonl")) for line in text.splitlines()]
    failed = [r for r in rows if r["score"] is None]
    assert failed and len(failed) + sum(r["score"] == 5.0 for r in rows) == len(rows)
    assert all(r["error_kind"] == "model" and r["sub_scores"] == {"a": None} and r["error"] == (
        f"item {r['id']!r} (line {r['line']}): the judge (NaNOnOdd) returned score nan, sub-score 'a' inf: not a "
        "finite number, so no score") for r in failed), failed
    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert summary["failed"] == len(failed)


def _strict_json_lines(path: Path) -> list[dict]:
    """Each line of a JSONL file, read as a strict reader (jq, JSON.parse) reads it: NaN and
    Infinity, which Python's json accepts, are not JSON."""
    def refuse(token):
        raise AssertionError(f"{path.name} holds {token}, which is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_nan_or_infinity_in_a_manifests_free_fields_is_written_as_null_and_noted(uninterrupted, tmp_path, edit_manifest):
    # A manifest written from a table (json.dumps of pandas rows) holds NaN for a missing value in a
    # free field. It reached results.jsonl and the stream as the bare tokens NaN / Infinity: not JSON,
    # so JSON.parse and strict parsers refused the job's files. Such a value is now written as null
    # and the item's metadata.notes names it; the item keeps its score; a resumed run writes the
    # same file; a row fixed since drops the note.
    rows = read_jsonl(edit_manifest)
    rows[0]["weight"] = float("nan")
    rows[1]["nested"] = {"x": [float("inf"), -float("inf"), 1.5]}
    edited = _edited_manifest(rows, edit_manifest, tmp_path)
    assert "NaN" in edited.read_text() and "-Infinity" in edited.read_text()
    out = tmp_path / "nan"
    r = run_main("--config", str(write_config(tmp_path, edited, out)), "--set", "job.report=true")
    assert r.returncode == 0, r.stderr
    results = _strict_json_lines(out / "results.jsonl")
    _strict_json_lines(out / "results.stream.jsonl")
    json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    note = ", which JSON cannot hold: written as null"
    assert results[0]["metadata"] == {"category": "shape", "seed": 0, "weight": None,
                                      "notes": ["metadata.weight was NaN" + note]}
    assert results[1]["metadata"] == {"category": "color", "seed": 1, "nested": {"x": [None, None, 1.5]},
                                      "notes": ["metadata.nested.x[0] was Infinity" + note,
                                                "metadata.nested.x[1] was -Infinity" + note]}
    assert all("notes" not in x["metadata"] for x in results[2:])
    # every item scored, with the scores a manifest without those fields gets
    assert_same_results([{"id": x["id"], "score": x["score"]} for x in results],
                        [{"id": x["id"], "score": x["score"]} for x in read_jsonl(uninterrupted / "results.jsonl")])
    assert (out / "report.html").exists()

    # Resumed after 6 results: the same file, each note once.
    part = tmp_path / "nan-part"
    write_partial(out, part)
    r = run_main("--config", str(write_config(tmp_path, edited, part)))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_from_disk"] == 6
    assert_same_results(_strict_json_lines(part / "results.jsonl"), results, "resumed: ")

    # The manifest fixed since: every score reused, and no note left about a value no longer there.
    rows[0]["weight"] = 0.5
    rows[1]["nested"] = {"x": [1.0, 2.0, 1.5]}
    r = run_main("--config", str(write_config(tmp_path, _edited_manifest(rows, edit_manifest, tmp_path), part)))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_from_disk"] == 10
    fixed = _strict_json_lines(part / "results.jsonl")
    assert fixed[0]["metadata"] == {"category": "shape", "seed": 0, "weight": 0.5}
    assert fixed[1]["metadata"] == {"category": "color", "seed": 1, "nested": {"x": [1.0, 2.0, 1.5]}}


def test_a_judge_class_whose_raw_answer_or_settings_hold_nan_still_writes_strict_json(tmp_path, edit_manifest):
    # The same for what a judge class of the user's returns beside its score (level probabilities
    # that came out NaN, a latency of NaN) and for its config section in summary.json.
    from src.job.runner import run_job
    from src.models.reward import BaseRewardModel, ScoreResult

    class NaNBeside(BaseRewardModel):
        def score_items(self, items):
            return [ScoreResult(index=i, id=it.id, score=5.0, raw={"probs": {"0": float("nan"), "1": 1.0}},
                                latency_s=float("nan"), metadata=dict(it.metadata)) for i, it in enumerate(items)]

    out = tmp_path / "out"
    cfg = {"model": {"class_path": "my.Judge", "params": {"threshold": float("inf")}},
           "job": {"manifest": str(edit_manifest), "output_dir": str(out), "chunk_size": 4}}
    summary = run_job(cfg, base=tmp_path, progress=False, model=NaNBeside())
    assert summary["scored"] == 10 and summary["model"]["params"] == {"threshold": None}
    note = ", which JSON cannot hold: written as null"
    for rows in (_strict_json_lines(out / "results.jsonl"), _strict_json_lines(out / "results.stream.jsonl")):
        assert all(x["score"] == 5.0 and x["raw"] == {"probs": {"0": None, "1": 1.0}} for x in rows)
        assert all(x["metadata"]["notes"] == ["raw.probs.0 was NaN" + note, "latency_s was NaN" + note] for x in rows)
    written = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert written["model"]["params"] == {"threshold": None}
    assert written["latency_s_per_item"]["count"] == 0


def test_a_resumed_job_reports_each_row_as_the_manifest_says_now(uninterrupted, tmp_path, edit_manifest):
    # A manifest edited between runs without touching a row's inputs (rows reordered, a category
    # relabelled, a metadata field fixed) reuses every stored score, as it should; but results.jsonl
    # and summary.json kept each row's line, category and metadata from the first run: the
    # per-category breakdown was the old one and two records claimed the same line.
    rows = read_jsonl(edit_manifest)
    # A free field deleted from a row stayed in its reused record.
    rows = rows[::-1]  # e9 is now on line 1
    rows[0]["category"] = "relabelled"
    rows[1]["seed"] = 99
    del rows[2]["seed"]
    rows[3]["reviewer"] = "Ann"
    out, _ = _rerun_on_edited_manifest(rows, edit_manifest, uninterrupted, tmp_path, "out")
    s = json.loads((out / "summary.json").read_text())
    assert s["resumed_from_disk"] == 10
    results = read_jsonl(out / "results.jsonl")
    assert [x["id"] for x in results] == [row["id"] for row in rows]
    assert [x["line"] for x in results] == list(range(1, 11))
    assert [x["category"] for x in results] == [row["category"] for row in rows]
    assert [x["metadata"] for x in results] == [{k: v for k, v in row.items() if k not in ("id", "image", "source_image",
                                                                                       "instruction")} for row in rows]
    assert "seed" not in results[2]["metadata"] and results[3]["metadata"]["reviewer"] == "Ann"
    assert {c: b["items"] for c, b in s["categories"].items()} == {"relabelled": 1, "color": 4, "shape": 5}
    stored = {x["id"]: x["score"] for x in read_jsonl(uninterrupted / "results.jsonl")}
    assert {x["id"]: x["score"] for x in results} == stored, "the scores themselves are reused as stored"


def test_rows_with_ill_typed_inputs_fail_alone_and_the_job_still_writes_every_file(tiny_cache, tmp_path):
    # A row whose images are not paths (`"images": [5]`) fails as a manifest row; its raw value was
    # copied into results.jsonl, and writing results.csv then stopped the finished job with a
    # TypeError traceback: no csv, no report, a .tmp file left, and the same on every re-run.
    d = tmp_path / "m"
    d.mkdir()
    make_image(1, 56, 48).save(d / "e.png")
    make_image(2, 56, 48).save(d / "s.png")
    rows = [{"id": "good", "image": "e.png", "source_image": "s.png", "instruction": "make it blue"},
            {"id": "int-image", "images": [5], "source_image": "s.png", "instruction": "x", "category": "c"},
            {"id": "dict-source", "image": "e.png", "source_images": {"a": 1}, "instruction": "x"},
            {"id": "list-text", "images": "e.png", "source_image": "s.png", "instruction": ["x"]}]
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    r = run_main("--config", str(write_config(tmp_path, d / "m.jsonl", out)), "--set", "job.report=true")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "results.csv", "results.jsonl",
                                                     "results.stream.jsonl", "summary.json"]
    res = read_jsonl(out / "results.jsonl")
    assert res[0]["score"] is not None
    assert [x["error_kind"] for x in res[1:]] == ["manifest"] * 3
    for x in res[1:]:
        for k in ("images", "source_images"):
            assert x.get(k) is None or (isinstance(x[k], list) and all(isinstance(p, str) for p in x[k])), x
        assert x.get("instruction") is None or isinstance(x["instruction"], str), x
    assert res[1]["category"] == "c"
    s = json.loads((out / "summary.json").read_text())
    assert (s["items"], s["scored"], s["failed"]) == (4, 1, 3)
    with open(out / "results.csv", newline="") as fh:
        assert [row["id"] for row in csv.DictReader(fh)] == [row["id"] for row in rows]


def test_a_sub_score_named_like_a_summary_figure_stops_the_job_before_it_starts(tmp_path, edit_manifest, capsys):
    # summary.json keeps each sub-score's stats beside its own figures, in one object. A rubric part
    # named 'score' replaced the overall score's mean with that part's (a wrong number, silently);
    # one named 'failed' or 'items' ran the whole job, then crashed writing the report.
    from src.cli import main
    from src.job.summary import RESERVED, summarize

    rec = {"id": "a", "score": 1.0, "error": None, "sub_scores": {"x": 1.0}, "category": "c"}
    assert set(summarize([rec])) - {"x"} <= RESERVED
    out = tmp_path / "out"
    cfg = str(write_config(tmp_path, edit_manifest, out, template="mine"))
    for part in ("score", "failed", "items", "categories"):
        rubric = f"{{mine: {{parts: {{{part}: edit_instruction, other: edit_quality}}, combine: mean}}}}"
        rc = main(["--config", cfg, "--set", f"model.params.templates={rubric}"], prog="main.py")
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        assert err.startswith(f"error: model.params.template: template 'mine' names a sub-score '{part}', which "
                              "summary.json uses for its own figures"), err
        assert not out.exists(), (part, "the job started")


def test_a_judge_class_whose_scores_are_other_number_types_or_no_numbers(tmp_path, edit_manifest):
    # A user's class returning numpy's float32 (a float computed in a float32 array) stopped the job
    # at its first call with "Object of type float32 is not JSON serializable", no item named; a
    # string or a bool went into results.jsonl as scored, and the report then refused the job's own
    # file. Numbers are written as floats; anything else fails its item, naming what came back.
    import numpy as np

    from src.job.runner import run_job
    from src.models.reward import BaseRewardModel, ScoreResult
    from src.report import write_report

    values = [np.float32(5.5), np.int64(3), "7", True]

    class OddTypes(BaseRewardModel):
        def score_items(self, items):
            return [ScoreResult(index=i, id=it.id, score=values[int(it.id[1:]) % 4],
                                sub_scores={"a": values[int(it.id[1:]) % 4]}) for i, it in enumerate(items)]

    out = tmp_path / "out"
    summary = run_job({"job": {"manifest": str(edit_manifest), "output_dir": str(out), "chunk_size": 4}},
                      base=tmp_path, progress=False, model=OddTypes())
    rows = read_jsonl(out / "results.jsonl")
    assert [(r["score"], r["sub_scores"]["a"]) for r in rows[:4]] == [(5.5, 5.5), (3.0, 3.0), (None, None), (None, None)]
    assert all(type(r["score"]) is float for r in rows if r["score"] is not None)
    assert rows[2]["error_kind"] == "model" and rows[2]["error"] == (
        "item 'e2' (line 3): the judge (OddTypes) returned score '7', sub-score 'a' '7': not a finite number, so no "
        "score")
    assert rows[3]["error"] == ("item 'e3' (line 4): the judge (OddTypes) returned score True, sub-score 'a' True: "
                                "not a finite number, so no score")
    assert (summary["scored"], summary["failed"]) == (6, 4)
    assert summary["score"]["mean"] == pytest.approx((5.5 * 3 + 3.0 * 3) / 6)
    write_report(out / "results.jsonl", out / "report.html")


def test_numpy_values_from_a_judge_class_are_written_as_json_and_anything_else_fails_only_its_item(
        uninterrupted, tmp_path, edit_manifest):
    # A judge class of the user's (class_path) that put numpy numbers in its raw answer, sub-scores or
    # metadata stopped the whole job at its first write ("Object of type float32 is not JSON
    # serializable"), with the scored chunk lost. Such values are written as plain numbers and lists;
    # a value JSON cannot hold at all fails its item alone, naming the item and the field.
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "numpy_judge.py").write_text(textwrap.dedent('''
        import decimal

        import numpy as np
        import torch

        from src.models.reward.implementations.local import QwenVLRewardModel


        class NumpyJudge(QwenVLRewardModel):
            """The tiny judge, with numpy values beside its scores, as a user's post-processing adds them."""

            def score_items(self, items):
                results = super().score_items(items)
                for it, r in zip(items, results):
                    r.raw = {**r.raw, "conf": np.float32(0.25), "votes": np.int64(3), "one": np.array([1.5]),
                             "probs": np.arange(3) / 4, "flag": np.bool_(True), "lost": np.float32("nan"),
                             "by_level": {np.int64(1): np.float32(0.5)}, "tensor": torch.tensor([0.5, 1.0])}
                    r.sub_scores = {k: None if v is None else np.float32(v) for k, v in r.sub_scores.items()}
                    r.latency_s = np.float64(r.latency_s)
                    r.metadata = {**r.metadata, "tokens": np.int32(7)}
                    if it.id == "e3":
                        r.raw["tags"] = {"a"}
                        r.raw["pairs"] = {(1, 2): 0.5}
                    if it.id == "e5":
                        r.metadata["cost"] = decimal.Decimal("0.1")
                return results
    '''))
    out = tmp_path / "out"
    r = run_main("--config", str(write_config(tmp_path, edit_manifest, out)), "--set",
                 "model.class_path=numpy_judge.NumpyJudge", "--set", "job.report=true", pythonpath=plugin)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    results = _strict_json_lines(out / "results.jsonl")
    assert len(_strict_json_lines(out / "results.stream.jsonl")) == 10
    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert (summary["scored"], summary["failed"], summary["failures_by_kind"]) == (8, 2, {"model": 2})
    assert (out / "report.html").exists()

    want = {x["id"]: x for x in read_jsonl(uninterrupted / "results.jsonl")}
    note = ", which JSON cannot hold: written as null"
    for x in results:
        if x["id"] in ("e3", "e5"):
            continue
        assert_same_results([{k: x[k] for k in ("id", "score", "sub_scores")}],
                            [{k: want[x["id"]][k] for k in ("id", "score", "sub_scores")}])
        extra = {k: v for k, v in x["raw"].items() if k not in want[x["id"]]["raw"]}
        assert extra == {"conf": 0.25, "votes": 3, "one": [1.5], "probs": [0.0, 0.25, 0.5], "flag": True,
                         "lost": None, "by_level": {"1": 0.5}, "tensor": [0.5, 1.0]}, extra
        assert type(extra["votes"]) is int and type(extra["flag"]) is bool
        assert x["metadata"] == {**want[x["id"]]["metadata"], "tokens": 7, "notes": ["raw.lost was NaN" + note]}
    e3, e5 = results[3], results[5]
    assert (e3["score"], e3["error_kind"], e3["raw"]["tags"]) == (None, "model", None)
    assert set(e3["sub_scores"].values()) == {None}
    assert e3["error"] == ("item 'e3' (line 4): the judge (NumpyJudge) returned raw.tags (a set), raw.pairs key (1, 2) "
                           "(a tuple), which JSON cannot hold: the item is failed; a judge's result holds numbers, "
                           "text, lists and dicts"), e3
    assert e5["error"] == ("item 'e5' (line 6): the judge (NumpyJudge) returned metadata.cost (a Decimal), which "
                           "JSON cannot hold: the item is failed; a judge's result holds numbers, text, lists and "
                           "dicts"), e5
    assert {f["id"]: f["error"] for f in summary["failures"]} == {"e3": e3["error"], "e5": e5["error"]}


def test_a_rows_own_notes_field_is_kept_beside_the_judges_notes(tiny_cache, tmp_path, edit_manifest):
    # A manifest row's own `notes` (a free field: a reviewer's remark) was overwritten by the judge's
    # notes (an animated GIF's "first of 2 frames used"); a resumed job then did the reverse, the
    # row's notes over the judge's. The row's field now stays as given, the judge's notes go under
    # judge_notes, and a resumed job writes what a fresh run of the manifest as it is now writes.
    from PIL import Image

    frame = Image.open(edit_manifest.parent / "edit0.png").convert("RGB")
    gif = tmp_path / "anim.gif"
    frame.save(gif, save_all=True, append_images=[frame.rotate(90)], duration=100)
    rows = read_jsonl(edit_manifest)[:7]
    for k, notes in enumerate(["reviewed by Ann", ["ok", "check later"], None, {"by": "Bo"}, float("nan")]):
        if notes is not None:
            rows[k]["notes"] = notes
    for k in (0, 1, 2):
        rows[k]["image"] = str(gif)
    rows[6]["judge_notes"] = ["mine"]
    frames = f"{gif}: first of 2 frames used"
    out = tmp_path / "out"
    r = run_main("--config", str(write_config(tmp_path, _edited_manifest(rows, edit_manifest, tmp_path), out)))
    assert r.returncode == 0, r.stderr
    got = _strict_json_lines(out / "results.jsonl")
    assert all(x["score"] is not None for x in got[:6]), got
    meta = [{k: v for k, v in x["metadata"].items() if k not in ("category", "seed")} for x in got]
    assert meta[:6] == [{"notes": "reviewed by Ann", "judge_notes": [frames]},
                        {"notes": ["ok", "check later"], "judge_notes": [frames]},
                        {"notes": [frames]},
                        {"notes": {"by": "Bo"}, "judge_notes": []},
                        {"notes": None, "judge_notes": ["metadata.notes was NaN, which JSON cannot hold: written as null"]},
                        {}]
    assert got[6]["error_kind"] == "manifest" and got[6]["error"] == (
        "manifest: manifest.jsonl line 7: 'judge_notes' is where the job writes the judge's notes for a row that has "
        "a 'notes' field of its own; give this field another name"), got[6]

    # The manifest edited since: notes removed, added, changed, and one left as it was.
    del rows[0]["notes"]
    del rows[0]["seed"]
    rows[1]["notes"] = "changed"
    rows[2]["notes"] = "new"
    rows[3]["notes"] = "n/a"
    edited = _edited_manifest(rows, edit_manifest, tmp_path)
    r = run_main("--config", str(write_config(tmp_path, edited, out)))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_from_disk"] == 6
    fresh = tmp_path / "fresh"
    r = run_main("--config", str(write_config(tmp_path, edited, fresh)))
    assert r.returncode == 0, r.stderr
    resumed = _strict_json_lines(out / "results.jsonl")
    assert_same_results(resumed, _strict_json_lines(fresh / "results.jsonl"), "resumed: ")
    assert [x["metadata"].get("notes") for x in resumed[:3]] == [[frames], "changed", "new"]
    assert [x["metadata"].get("judge_notes") for x in resumed[:4]] == [None, [frames], [frames], []]


def test_a_csv_manifest_sets_an_items_answer_budget_with_a_whole_number(tiny_cache, tmp_path):
    # CSV cells are text: a CSV manifest's max_new_tokens "64" failed its item ("must be a whole
    # number ..., got '64'"), so no CSV manifest could give an item its own answer budget. A whole
    # number is now read as one (in that field only); anything else fails its item as before.
    demo = ROOT / "data" / "demo"
    rows = read_jsonl(demo / "manifest.jsonl")[:7]
    budgets = ["16", "2", "abc", "1.5", "0", "", "007"]
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "source_image", "instruction", "max_new_tokens", "kind"])
        for row, budget in zip(rows, budgets):
            w.writerow([row["id"], demo / row["image"], demo / row["source_image"], row["instruction"], budget, "16"])
    out = tmp_path / "out"
    r = run_main("--config", str(ROOT / "configs" / "demo.yaml"), "--set", "model.params.mode=generate",
                 "--set", f"job.manifest={manifest}", "--set", f"job.output_dir={out}")
    assert r.returncode == 0, r.stderr
    res = read_jsonl(out / "results.jsonl")
    assert [x["metadata"].get("max_new_tokens") for x in res] == [16, 2, "abc", "1.5", 0, None, 7]
    assert all(x["metadata"]["kind"] == "16" for x in res), "other fields stay text"
    assert [x["score"] is not None for x in res] == [True, False, False, False, False, True, True]
    assert res[1]["error_kind"] == "parse", "two tokens cut the judge's {\"score\": N} short: the budget was used"
    for x, shown in zip(res[2:5], ("'abc'", "'1.5'", "0")):
        assert x["error_kind"] == "input" and x["error"] == (
            f"item {x['id']!r} (line {x['line']}): metadata max_new_tokens must be a whole number in 1..16 (the "
            f"judge's max_new_tokens), got {shown}"), x
    r = run_main("--config", str(ROOT / "configs" / "demo.yaml"), "--set", "model.params.mode=generate",
                 "--set", f"job.manifest={manifest}", "--set", f"job.output_dir={out}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_from_disk"] == 3, "the scored rows' budgets read the same again"


def _plugin(tmp_path: Path, module: str, source: str) -> Path:
    """A folder holding the user's own judge module `module` (named by class_path; run_main's pythonpath)."""
    folder = tmp_path / "plugin"
    folder.mkdir(exist_ok=True)
    (folder / f"{module}.py").write_text(textwrap.dedent(source))
    return folder


def _job_with_judge_class(tmp_path: Path, manifest: Path, out: Path, class_path: str, plugin: Path,
                          params: dict | None = None) -> tuple[dict, str]:
    """main.py's job on `manifest` into `out`, judged by the user's class `class_path` (a module in
    `plugin`) built from `params` (by default the tiny judge's, write_config's): the summary it
    prints, and its log."""
    cfg = write_config(tmp_path, manifest, out)
    if params is not None:
        cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "model": {"class_path": class_path,
                                                                                     "params": params}}))
    r = run_main("--config", str(cfg), "--set", f"model.class_path={class_path}", pythonpath=plugin)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout), r.stderr


def _csv_rows(path: Path) -> list[list]:
    """results.csv's rows, each cell that reads as a number as that float (assert_same_results then
    allows a resumed score its float rounding)."""
    def cell(text: str):
        try:
            return float(text)
        except ValueError:
            return text
    with open(path, newline="") as fh:
        return [[cell(c) for c in row] for row in csv.reader(fh)]


def _assert_resumed_job_writes_what_an_uninterrupted_one_does(part: Path, full: Path) -> None:
    """results.jsonl, results.csv and summary.json of a resumed job: those of the uninterrupted one,
    but for float rounding (and the summary's timing and resume count)."""
    assert_same_results(_strict_json_lines(part / "results.jsonl"), _strict_json_lines(full / "results.jsonl"),
                        "resumed: ")
    got, want = _csv_rows(part / "results.csv"), _csv_rows(full / "results.csv")
    assert got[0] == want[0], "the same columns"
    assert_same_results([{"id": i, "row": row} for i, row in enumerate(got)],
                        [{"id": i, "row": row} for i, row in enumerate(want)], "csv: ")

    def summary(folder: Path) -> dict:
        s = json.loads((folder / "summary.json").read_text())
        return {k: v for k, v in s.items() if k not in ("elapsed_s", "latency_s_per_item", "resumed_from_disk")}
    assert_same_results([summary(part)], [summary(full)], "summary: ")


def test_a_judge_classs_own_metadata_fields_are_kept_in_a_resumed_jobs_records(tiny_cache, tmp_path, edit_manifest):
    # A judge class of the user's that sets metadata fields of its own (a version, a token count) had
    # them in the records of the rows it scored, and lost them from the rows a resumed job read back
    # from its stream: the reused record was rebuilt from the manifest row alone, so results.jsonl of
    # an interrupted and resumed job differed from an uninterrupted one's. Here the class adds fields,
    # one that is NaN, gives a manifest field another value, drops one, and writes one into the item
    # itself before scoring; a row's own NaN field is noted beside it.
    plugin = _plugin(tmp_path, "meta_judge", '''
        from src.models.reward.implementations.local import QwenVLRewardModel


        class MetaJudge(QwenVLRewardModel):
            """The tiny judge, with metadata fields of its own, as a user's class adds them."""

            def score_items(self, items):
                for it in items:
                    it.metadata["seen_by"] = "pre-pass"  # into the item itself: the engine carries it
                results = super().score_items(items)
                for it, r in zip(items, results):
                    r.metadata = {**r.metadata, "judge_version": "v2", "tokens": 17}
                    kind = int(it.id[1:]) % 4
                    if kind == 1:
                        r.metadata["confidence"] = float("nan")
                    elif kind == 2:
                        del r.metadata["seed"]
                    elif kind == 3:
                        r.metadata["seed"] = 99
                return results
    ''')
    rows = read_jsonl(edit_manifest)
    for k in (1, 9):
        rows[k]["weight"] = float("nan")
    manifest = _edited_manifest(rows, edit_manifest, tmp_path)

    def job(out: Path, manifest: Path = manifest) -> dict:
        return _job_with_judge_class(tmp_path, manifest, out, "meta_judge.MetaJudge", plugin)[0]

    full = tmp_path / "full"
    job(full)
    results = _strict_json_lines(full / "results.jsonl")
    note = ", which JSON cannot hold: written as null"
    ours = {"seen_by": "pre-pass", "judge_version": "v2", "tokens": 17}
    assert [x["metadata"] for x in results[:4]] == [
        {"category": "shape", "seed": 0, **ours},
        {"category": "color", "seed": 1, "weight": None, **ours, "confidence": None,
         "notes": ["metadata.weight was NaN" + note, "metadata.confidence was NaN" + note]},
        {"category": "shape", **ours},
        {"category": "color", "seed": 99, **ours}]
    assert all(x["score"] is not None and "metadata_by_judge" not in x for x in results)

    # Interrupted after 6 results (the 7th cut mid-line), then resumed: every record as the
    # uninterrupted run wrote it, for the rows read back and the rows scored again alike.
    part = tmp_path / "part"
    write_partial(full, part)
    reused = {json.loads(line)["id"] for line in (part / "results.stream.jsonl").read_text().splitlines()[:6]}
    assert {int(i[1:]) % 4 for i in reused} == {0, 1, 2, 3}, "rows read back of each kind"
    assert job(part)["resumed_from_disk"] == 6
    _assert_resumed_job_writes_what_an_uninterrupted_one_does(part, full)
    # Everything on disk: no judge loaded, the same file again.
    before = (part / "results.jsonl").read_bytes()
    assert job(part)["resumed_from_disk"] == 10
    assert (part / "results.jsonl").read_bytes() == before

    # The manifest edited since (a field deleted, one added, one the judge overrides changed): what a
    # fresh run of it writes.
    del rows[0]["seed"]
    rows[4]["reviewer"] = "Ann"
    rows[3]["seed"] = 5
    edited = _edited_manifest(rows, edit_manifest, tmp_path)
    assert job(part, edited)["resumed_from_disk"] == 10
    fresh = tmp_path / "fresh"
    job(fresh, edited)
    _assert_resumed_job_writes_what_an_uninterrupted_one_does(part, fresh)
    assert [x["metadata"] for x in _strict_json_lines(part / "results.jsonl")[3:5]] == [
        {"category": "color", "seed": 99, **ours}, {"category": "shape", "seed": 4, "reviewer": "Ann", **ours}]


def test_a_judge_class_that_writes_its_own_notes_keeps_the_rows_notes(tiny_cache, tmp_path, edit_manifest):
    # A judge class of the user's that wrote its own note over metadata.notes ({**metadata, "notes":
    # ...}) lost a manifest row's own `notes` field: the record held the judge's note in its place.
    # The row's field now stays as given and the class's note goes to judge_notes, after the notes
    # the judge had there already (an animated GIF's); a class that adds to the row's list has only
    # what it added moved. A row without notes keeps the class's note as it wrote it, as before.
    from PIL import Image

    plugin = _plugin(tmp_path, "notes_judge", '''
        from src.models.reward.implementations.local import QwenVLRewardModel


        class NotesJudge(QwenVLRewardModel):
            """The tiny judge, writing a note of its own into each result's metadata."""

            def score_items(self, items):
                results = super().score_items(items)
                for it, r in zip(items, results):
                    if it.id == "e1":
                        r.metadata["notes"] = r.metadata["notes"] + ["my judge's note"]
                    else:
                        r.metadata = {**r.metadata, "notes": "my judge's note"}
                return results
    ''')
    frame = Image.open(edit_manifest.parent / "edit0.png").convert("RGB")
    gif = tmp_path / "anim.gif"
    frame.save(gif, save_all=True, append_images=[frame.rotate(90)], duration=100)
    rows = read_jsonl(edit_manifest)
    for k, notes in enumerate(["reviewed by Ann", ["ok", "check later"], None, {"by": "Bo"}, float("nan")]):
        if notes is not None:
            rows[k]["notes"] = notes
    rows[0]["image"] = rows[5]["image"] = str(gif)
    manifest = _edited_manifest(rows, edit_manifest, tmp_path)

    def job(out: Path) -> dict:
        return _job_with_judge_class(tmp_path, manifest, out, "notes_judge.NotesJudge", plugin)[0]

    full = tmp_path / "full"
    job(full)
    results = _strict_json_lines(full / "results.jsonl")
    assert all(x["score"] is not None for x in results)
    frames, mine = f"{gif}: first of 2 frames used", "my judge's note"
    meta = [{k: v for k, v in x["metadata"].items() if k not in ("category", "seed")} for x in results]
    assert meta[:7] == [{"notes": "reviewed by Ann", "judge_notes": [frames, mine]},
                        {"notes": ["ok", "check later"], "judge_notes": [mine]},
                        {"notes": mine},
                        {"notes": {"by": "Bo"}, "judge_notes": [mine]},
                        {"notes": None, "judge_notes": [mine, "metadata.notes was NaN, which JSON cannot hold: "
                                                              "written as null"]},
                        {"notes": mine},
                        {"notes": mine}]

    # Interrupted after 6 results, then resumed: the same records.
    part = tmp_path / "part"
    write_partial(full, part)
    assert job(part)["resumed_from_disk"] == 6
    _assert_resumed_job_writes_what_an_uninterrupted_one_does(part, full)


def _calls_since(calls: Path, seen: int) -> list[list[str]]:
    """The calls a judge class logged to `calls` (one JSON list of item ids a line) after its first `seen`."""
    return [json.loads(line) for line in calls.read_text().splitlines()[seen:]] if calls.exists() else []


def test_a_judge_class_whose_result_metadata_is_no_dict_fails_only_that_item(tmp_path, edit_manifest):
    # A judge class of the user's that returned a result whose metadata was a list, a string or a
    # mapping of another type stopped the whole job with a traceback (an AttributeError; a
    # mappingproxy, which does not copy, a TypeError), the chunk's scored items unwritten. Such an
    # item now fails alone, naming the item and the cause, with the row's own metadata; every other
    # item is scored, and a resumed job tries the failed ones again. Metadata None is no metadata,
    # as before.
    plugin = _plugin(tmp_path, "odd_meta_judge", '''
        import json
        from collections import UserDict
        from types import MappingProxyType

        from src.models.reward import BaseRewardModel, ScoreResult


        class OddMetaJudge(BaseRewardModel):
            """Scores an item by its number; e1..e5's results carry metadata of another type."""

            def __init__(self, calls: str):
                self.calls = calls

            def score_items(self, items):
                with open(self.calls, "a") as fh:
                    fh.write(json.dumps([it.id for it in items]) + "\\n")
                odd = {"e1": ["a", "list"], "e2": "text", "e3": UserDict(seed=3), "e4": None,
                       "e5": MappingProxyType({"seed": 5})}
                return [ScoreResult(index=i, id=it.id, score=float(it.id[1:]), sub_scores={"a": 1.0},
                                    metadata=odd[it.id] if it.id in odd else dict(it.metadata))
                        for i, it in enumerate(items)]
    ''')
    rows = read_jsonl(edit_manifest)
    rows[1]["notes"] = "check the hat"
    rows[2]["weight"] = float("nan")
    manifest = _edited_manifest(rows, edit_manifest, tmp_path)
    calls, out = tmp_path / "calls.jsonl", tmp_path / "out"

    def job() -> dict:
        return _job_with_judge_class(tmp_path, manifest, out, "odd_meta_judge.OddMetaJudge", plugin,
                                     {"calls": str(calls)})[0]

    summary = job()
    assert (summary["scored"], summary["failed"], summary["failures_by_kind"]) == (6, 4, {"model": 4}), summary
    first = _strict_json_lines(out / "results.jsonl")
    cause = "the judge (OddMetaJudge) returned a result the job cannot write: metadata must be a dict (free data " \
            "carried into the result), got {}; the item is failed"
    assert [(x["score"], x["sub_scores"], x["error_kind"], x["error"]) for x in first[1:6] if x["id"] != "e4"] == [
        (None, {"a": None}, "model", f"item 'e{k}' (line {k + 1}): " + cause.format(kind))
        for k, kind in ((1, "list"), (2, "str"), (3, "UserDict"), (5, "mappingproxy"))]
    assert [x["metadata"] for x in first[1:6]] == [
        {"category": "color", "seed": 1, "notes": "check the hat", "judge_notes": []},
        {"category": "shape", "seed": 2, "weight": None,
         "notes": ["metadata.weight was NaN, which JSON cannot hold: written as null"]},
        {"category": "color", "seed": 3},
        {},
        {"category": "color", "seed": 5}], "the row's own metadata on a failed item; none where the judge returned None"
    assert [x["score"] for x in first] == [0.0, None, None, None, 4.0, None, 6.0, 7.0, 8.0, 9.0]
    assert sorted(i for call in _calls_since(calls, 0) for i in call) == sorted(r["id"] for r in rows)

    # Resumed: the failed items, and only they, are tried again (and fail again, alike).
    seen = len(_calls_since(calls, 0))
    summary = job()
    assert summary["resumed_from_disk"] == 6
    assert sorted(i for call in _calls_since(calls, seen) for i in call) == ["e1", "e2", "e3", "e5"]
    assert_same_results(_strict_json_lines(out / "results.jsonl"), first, "resumed: ")


def test_a_judge_class_that_drops_or_changes_max_new_tokens_is_not_asked_again_on_resume(tmp_path, edit_manifest):
    # In generate mode (and for a judge whose mode the job does not know, as a class of the user's)
    # resume reuses a stored result only for the row's own answer budget (metadata max_new_tokens).
    # It read that budget from the stored record's metadata, which is the judge's: a class that
    # returned no metadata, or another max_new_tokens, had those rows scored again on every resume,
    # though nothing had changed. Resume now compares the budget the manifest gave the row, as the
    # job recorded it: nothing is scored again when nothing changed, and a row whose budget changed
    # is scored again, whatever the judge wrote in its metadata.
    plugin = _plugin(tmp_path, "budget_judge", '''
        import json

        from src.models.reward import BaseRewardModel, ScoreResult


        class BudgetJudge(BaseRewardModel):
            """Scores an item by its number. Its results' metadata: none (e0, e4, e8); the row's with
            max_new_tokens 999 (e1, e5, e9, and e2, e6, whose rows have none); the row's (e3, e7)."""

            def __init__(self, calls: str):
                self.calls = calls

            def score_items(self, items):
                with open(self.calls, "a") as fh:
                    fh.write(json.dumps([it.id for it in items]) + "\\n")
                results = []
                for i, it in enumerate(items):
                    kind, score = int(it.id[1:]) % 4, float(it.id[1:])
                    if kind == 0:
                        results.append(ScoreResult(index=i, id=it.id, score=score))
                    else:
                        meta = {**it.metadata, "max_new_tokens": 999} if kind in (1, 2) else dict(it.metadata)
                        results.append(ScoreResult(index=i, id=it.id, score=score, metadata=meta))
                return results
    ''')
    rows = read_jsonl(edit_manifest)
    for k, row in enumerate(rows):
        if k % 4 != 2:
            row["max_new_tokens"] = 16
    calls, out = tmp_path / "calls.jsonl", tmp_path / "out"

    def job(folder: Path = out) -> tuple[list[str], str]:
        """The job on `rows` as they are now: the ids the judge was asked to score, and the log."""
        seen = len(_calls_since(calls, 0))
        _, err = _job_with_judge_class(tmp_path, _edited_manifest(rows, edit_manifest, tmp_path), folder,
                                       "budget_judge.BudgetJudge", plugin, {"calls": str(calls)})
        return sorted(i for call in _calls_since(calls, seen) for i in call), err

    assert job()[0] == sorted(r["id"] for r in rows)
    first = _strict_json_lines(out / "results.jsonl")
    assert [x["metadata"] for x in first[:4]] == [
        {}, {"category": "color", "seed": 1, "max_new_tokens": 999},
        {"category": "shape", "seed": 2, "max_new_tokens": 999}, {"category": "color", "seed": 3, "max_new_tokens": 16}]

    # Nothing changed: nothing is scored again, and the files are written as before.
    asked, err = job()
    assert asked == [] and "changed since" not in err, err
    assert json.loads((out / "summary.json").read_text())["resumed_from_disk"] == 10
    assert_same_results(_strict_json_lines(out / "results.jsonl"), first, "resumed: ")
    # The row's budget, where the judge's metadata does not show it, is in the stream file alone.
    stream = {x["id"]: x for x in _strict_json_lines(out / "results.stream.jsonl")}
    assert [stream[f"e{k}"].get("row_max_new_tokens", "-") for k in range(4)] == [16, 16, None, "-"]
    assert not any("row_max_new_tokens" in x or "metadata_by_judge" in x for x in first)
    assert _csv_rows(out / "results.csv")[0] == ["id", "score", "category", "error_kind", "error", "images",
                                                 "source_images", "instruction"]

    # A row's budget changed in the manifest: that row alone is scored again, for each kind of result.
    rows[0]["max_new_tokens"] = 8
    asked, err = job()
    assert asked == ["e0"]
    assert "holds results for 1 of this job's rows (e0) whose images, instruction or answer budget" in err, err
    rows[1]["max_new_tokens"] = rows[2]["max_new_tokens"] = rows[3]["max_new_tokens"] = 8
    assert job()[0] == ["e1", "e2", "e3"]
    assert job()[0] == []
    fresh = tmp_path / "fresh"
    job(fresh)
    _assert_resumed_job_writes_what_an_uninterrupted_one_does(out, fresh)


def _judge_class_whose_results_for_some_items_fail(tmp_path: Path, edit_manifest: Path, module: str, odd: str,
                                                   errors: dict[str, str], kinds: dict[str, str | None] | None = None
                                                   ) -> list[dict]:
    """main.py's job on the edit manifest, judged by the user's class `module`.Judge, which scores item
    eN as N (sub-score 'a' the same) and passes each result through `odd` (the source of a function
    `odd(item_id, result)` returning it, with the imports it needs): the results of the items in
    `errors` are ones the job cannot write, or no score. Each of those fails alone, `model`, with no
    score nor sub-score, and that error after its item's name; every other item is scored, and
    results.jsonl, results.csv and summary.json say so; a re-run asks the judge for the failed items
    alone (the class logs the ids of each call), and writes the same results. The items in `kinds`
    are those the judge failed itself, with that error_kind (None: none, counted as `unknown`): they
    keep their sub-score 'a'. Returns the first run's records."""
    kinds = kinds or {}
    plugin = _plugin(tmp_path, module, textwrap.dedent(odd) + textwrap.dedent('''

        import json as _json

        from src.models.reward import BaseRewardModel, ScoreResult as _Result


        class Judge(BaseRewardModel):
            def __init__(self, calls: str):
                self.calls = calls

            def score_items(self, items):
                with open(self.calls, "a") as fh:
                    fh.write(_json.dumps([it.id for it in items]) + "\\n")
                return [odd(it.id, _Result(index=i, id=it.id, score=float(it.id[1:]),
                                           sub_scores={"a": float(it.id[1:])}, metadata=dict(it.metadata)))
                        for i, it in enumerate(items)]
    '''))
    ids = [r["id"] for r in read_jsonl(edit_manifest)]
    calls, out = tmp_path / "calls.jsonl", tmp_path / "out"

    def job() -> tuple[dict, list[str]]:
        """The job's summary, and the ids the judge was asked to score."""
        seen = len(_calls_since(calls, 0))
        summary = _job_with_judge_class(tmp_path, edit_manifest, out, f"{module}.Judge", plugin,
                                        {"calls": str(calls)})[0]
        return summary, sorted(i for call in _calls_since(calls, seen) for i in call)

    kind = {i: kinds.get(i, "model") for i in ids if i in errors}
    summary, asked = job()
    assert asked == sorted(ids)
    assert (summary["scored"], summary["failed"], summary["failures_by_kind"]) == (
        len(ids) - len(errors), len(errors), dict(sorted(Counter(k or "unknown" for k in kind.values()).items()))), \
        summary
    first = _strict_json_lines(out / "results.jsonl")
    for n, (rec, row) in enumerate(zip(first, _csv_rows(out / "results.csv")[1:])):
        if rec["id"] in errors:
            want = f"item {rec['id']!r} (line {n + 1}): {errors[rec['id']]}"
            assert (rec["score"], rec["error_kind"], rec["error"]) == (None, kind[rec["id"]], want), rec
            if rec["id"] in kinds:
                assert rec["sub_scores"]["a"] == float(rec["id"][1:]), rec
                assert row[:3] == [rec["id"], "", float(rec["id"][1:])] and want in row, row
                continue
            assert all(v is None for v in (rec["sub_scores"] or {}).values()), rec
            assert row[:3] == [rec["id"], "", ""] and want in row, row
        else:
            assert rec["error"] is None and type(rec["score"]) is float, rec
            assert rec["sub_scores"]["a"] == pytest.approx(rec["score"]), rec
            assert row[:3] == [rec["id"], pytest.approx(rec["score"]), pytest.approx(rec["score"])], row
    written = json.loads((out / "summary.json").read_text())
    assert [(f["id"], f["kind"]) for f in written["failures"]] == list(kind.items())
    assert written["score"]["count"] == len(ids) - len(errors), written
    assert written["a"]["count"] == len(ids) - len(errors) + len(kinds), written

    # Resumed: the failed items, and only they, are asked again (and fail again, alike).
    summary, asked = job()
    assert summary["resumed_from_disk"] == len(ids) - len(errors)
    assert asked == sorted(errors)
    assert_same_results(_strict_json_lines(out / "results.jsonl"), first, "resumed: ")
    return first


def test_a_judge_class_whose_raw_answer_cannot_be_copied_fails_only_that_item(tmp_path, edit_manifest):
    # The job made each result's record with ScoreResult.to_dict (dataclasses.asdict), which deep-copies:
    # a judge class of the user's whose `raw` held something that does not copy (a lock, a mappingproxy,
    # an open file, a generator) stopped the whole job with a TypeError, the chunk's scored items
    # unwritten. The record is now made without a copy, so such a value reaches the walk that fails
    # an item for a value JSON cannot hold (an object of the class's own, an int too long to write),
    # as a set did already; a dataclass in `raw` is still written as the dict of its fields.
    cannot = "the judge (Judge) returned {}, which JSON cannot hold: the item is failed; a judge's result holds " \
             "numbers, text, lists and dicts"
    errors = {"e1": cannot.format("raw.lock (a lock)"), "e2": cannot.format("raw (a mappingproxy)"),
              "e3": cannot.format("raw.log (a TextIOWrapper)"), "e4": cannot.format("raw.answers (a generator)"),
              "e5": cannot.format("raw.mine (a Mine), raw.tokens ({0}), raw key ({0})".format(
                  f"an int of more than {sys.get_int_max_str_digits()} digits"))}
    first = _judge_class_whose_results_for_some_items_fail(tmp_path, edit_manifest, "raw_judge", '''
        import threading
        from dataclasses import dataclass
        from types import MappingProxyType


        class Mine:
            pass


        @dataclass
        class Answer:
            text: str
            score: float


        def odd(item_id, result):
            result.raw = {"e1": {"lock": threading.Lock()}, "e2": MappingProxyType({"answer": "7"}),
                          "e3": {"log": open(__file__)}, "e4": {"answers": (a for a in "abc")},
                          "e5": {"mine": Mine(), "tokens": 10 ** 5000, 10 ** 5000: "as a name"},
                          "e6": {"answer": Answer("seven", 7.0)}}.get(item_id, {"answer": "fine"})
            return result
    ''', errors)
    assert [x["score"] for x in first] == [0.0, *[None] * 5, 6.0, 7.0, 8.0, 9.0]
    assert first[6]["raw"] == {"answer": {"text": "seven", "score": 7.0}}
    assert [x["raw"] for x in first[1:6]] == [{"lock": None}, None, {"log": None}, {"answers": None},
                                               {"mine": None, "tokens": None}]


def test_a_judge_class_whose_sub_scores_are_no_dict_of_names_to_numbers_fails_only_that_item(tmp_path, edit_manifest):
    # ScoreResult.sub_scores is a dict of sub-score names to numbers (None for a part not scored). A
    # judge class of the user's that returned a list or a string there stopped the whole job with an
    # AttributeError; a mappingproxy with a TypeError (it does not copy); a name that is a number or
    # None with a TypeError in the summary, which sorts the names, after every item was scored. A
    # sub-score named as one of the summary's own figures ('scored', or 'score' of another value than
    # the score) overwrote that figure in summary.json, and the report then refused the job's file;
    # one named 'score' of the score's value, as a lone template's is, still overwrote the score's
    # figures with its own, counted over the items that had it. Each such item now fails alone,
    # naming the item and what was wrong; a sub-score that is no number (a string, NaN) failed its
    # item already, and its error now names the item too. numpy's and Python's other numbers are
    # written as floats, and a 'score' sub-score of the score's value stands.
    from src.job.summary import RESERVED

    holds = "the judge (Judge) returned a result the job cannot write: sub_scores must be a dict of sub-score " \
            "names (text) to numbers, got {}; the item is failed"
    figure = "the judge (Judge) returned a result the job cannot write: sub-score {!r} has the name of one of the " \
             f"summary's own figures ({', '.join(sorted(RESERVED))}), which it would overwrite; the item is failed"
    errors = {"e1": holds.format("list"), "e2": holds.format("str"), "e3": holds.format("mappingproxy"),
              "e4": holds.format("the name 1"), "e5": holds.format("the name None"),
              "e6": figure.format("scored"), "e7": figure.format("score"),
              "e8": "the judge (Judge) returned sub-score 'b' 'high', sub-score 'c' nan: not a finite number, so no "
                    "score"}
    first = _judge_class_whose_results_for_some_items_fail(tmp_path, edit_manifest, "sub_score_judge", """
        from types import MappingProxyType

        import numpy as np


        def odd(item_id, result):
            n = result.score
            result.sub_scores = {"e0": {"a": np.float32(n), "b": int(n)}, "e1": [n], "e2": "a",
                                 "e3": MappingProxyType({"a": n}), "e4": {"a": n, 1: n}, "e5": {"a": n, None: n},
                                 "e6": {"a": n, "scored": n}, "e7": {"a": n, "score": 2.5},
                                 "e8": {"a": n, "b": "high", "c": float("nan")},
                                 "e9": {"a": np.int64(n), "score": n}}[item_id]
            return result
    """, errors)
    assert [x["score"] for x in first] == [0.0, *[None] * 8, 9.0]
    assert [(x["sub_scores"], type(x["sub_scores"]["a"])) for x in (first[0], first[9])] == [
        ({"a": 0.0, "b": 0.0}, float), ({"a": 9.0, "score": 9.0}, float)]
    assert [x["sub_scores"] for x in first[1:9]] == [{}, {}, {}, *[{"a": None}] * 4, {"a": None, "b": None, "c": None}]


def test_a_judge_class_whose_error_is_no_text_fails_only_that_item(tmp_path, edit_manifest):
    # A judge class of the user's whose result's error was no text (a number, a dict) stopped the
    # whole job with an AttributeError where the job renames the item in an error; an error_kind of
    # no text was written as given. Each now fails its item alone, the value named.
    cannot = "the judge (Judge) returned a result the job cannot write: {}; the item is failed"
    errors = {"e1": cannot.format("error must be text, got int 5"),
              "e2": cannot.format("error must be text, got dict {'code': 3}"),
              "e3": cannot.format("error_kind must be text, got int 7"),
              "e4": cannot.format("error must be text, got int 0")}
    first = _judge_class_whose_results_for_some_items_fail(tmp_path, edit_manifest, "error_judge", """
        def odd(item_id, result):
            if item_id in ("e1", "e2", "e4"):
                result.score, result.error = None, {"e1": 5, "e2": {"code": 3}, "e4": 0}[item_id]
            if item_id == "e3":
                result.score, result.error, result.error_kind = None, "no answer", 7
            return result
    """, errors)
    assert [x["score"] for x in first] == [0.0, *[None] * 4, 5.0, 6.0, 7.0, 8.0, 9.0]


def test_a_judge_class_whose_score_is_no_number_or_none_without_an_error_fails_only_that_item(tmp_path, edit_manifest):
    # A judge class of the user's whose score was an int past float's range stopped the whole job with
    # an OverflowError; one that returned no score and no error had its item counted as failed with
    # no error at all (error_kind null), against ScoreResult's promise that a result without a score
    # says why. Each now fails alone, naming the item and the cause, as a string, a bool or NaN did
    # already (their errors now name the item too); numpy's numbers are written as floats, and a
    # score outside any scale the job knows (a class of the user's has its own) as it came.
    no_number = "the judge (Judge) returned score {}: not a finite number, so no score"
    errors = {"e1": no_number.format("'7'"), "e2": no_number.format("True"), "e3": no_number.format("np.True_"),
              "e4": "the judge (Judge) returned no score and no error: a result without a score says why; the item is "
                    "failed",
              "e5": no_number.format(repr(10 ** 400)) + "; the judge (Judge) returned a result the job cannot write: "
                    "metadata must be a dict (free data carried into the result), got list; the item is failed",
              "e6": f"the judge (Judge) returned score nan, sub-score 'a' {10 ** 400!r}: not a finite number, so no "
                    "score",
              "e7": "no answer read; the judge (Judge) returned score '7': not a finite number, so no score"}
    first = _judge_class_whose_results_for_some_items_fail(tmp_path, edit_manifest, "score_judge", """
        import numpy as np


        def odd(item_id, result):
            if item_id == "e5":
                result.metadata = ["a", "list"]
            if item_id == "e7":
                result.error, result.error_kind = f"item {item_id!r} (#{result.index}): no answer read", "parse"
            big = 10 ** 400
            result.score = {"e1": "7", "e2": True, "e3": np.bool_(True), "e4": None, "e5": big, "e6": float("nan"),
                            "e7": "7", "e8": np.float32(-1e6), "e9": np.int64(9)}.get(item_id, result.score)
            if item_id == "e6":
                result.sub_scores = {"a": big}
            if item_id == "e8":
                result.sub_scores = {"a": -1e6}
            return result
    """, errors)
    assert [x["score"] for x in first] == [0.0, *[None] * 7, -1e6, 9.0]


def test_a_judge_class_that_returns_no_score_result_for_an_item_fails_that_item(tmp_path, edit_manifest):
    # A judge class of the user's whose list held a dict or None in an item's place stopped the
    # job with an AttributeError traceback (renaming that item's error). That item now fails alone
    # (`model`), its error naming what came; the others are written, and a resumed job asks again
    # for those items only.
    came = "the judge (Judge) returned {} for it, not a ScoreResult; the item is failed"
    _judge_class_whose_results_for_some_items_fail(tmp_path, edit_manifest, "no_result_judge", """
        def odd(item_id, result):
            return {"e2": {"score": 2.0}, "e5": None}.get(item_id, result)
    """, {"e2": came.format("dict {'score': 2.0}"), "e5": came.format("NoneType None")})


def test_a_judge_class_that_returns_a_score_beside_an_error_fails_that_item_with_no_score(tmp_path, edit_manifest):
    # A judge class of the user's whose result held a score and an error had that score written in
    # results.jsonl and results.csv, while the summary counted the item as failed and a resumed job
    # scored it again: the files disagreed about the item. Such an item is now failed, with no score
    # written: the judge's error stands, with the score it also returned named after it, and so do
    # its error_kind (none: `unknown`) and sub-scores, but for a `score` sub-score, which is the
    # score. A value the job cannot write besides fails the item as before (`model`).
    from src.report import write_report

    beside = "the judge (Judge) also returned a score, {}, which is not written because the item failed"
    errors = {"e1": "unsure; " + beside.format(1.0), "e2": "no answer; " + beside.format(2.0),
              "e3": "unsure; " + beside.format(3.0),
              "e4": "the judge (Judge) returned an empty error, and a score, 4.0, which is not written because the "
                    "item failed",
              "e5": "unsure; " + beside.format(5.0),
              "e6": "unsure; " + beside.format(6.0) + "; the judge (Judge) returned raw.tags (a set), which JSON "
                    "cannot hold: the item is failed; a judge's result holds numbers, text, lists and dicts"}
    first = _judge_class_whose_results_for_some_items_fail(tmp_path, edit_manifest, "beside_judge", """
        import numpy as np


        def odd(item_id, result):
            if item_id in ("e1", "e2", "e3", "e5", "e6"):
                result.error = f"item {item_id!r} (#{result.index}): " + ("no answer" if item_id == "e2" else "unsure")
                result.error_kind = {"e1": "parse", "e3": "low_confidence"}.get(item_id)
            if item_id == "e3":
                result.score = np.float32(result.score)
            if item_id == "e4":
                result.error = ""
            if item_id == "e5":
                result.sub_scores["score"] = result.score
            if item_id == "e6":
                result.raw = {"tags": {"a"}}
            return result
    """, errors, kinds={"e1": "parse", "e2": None, "e3": "low_confidence", "e4": None, "e5": None})
    assert [x["score"] for x in first] == [0.0, *[None] * 6, 7.0, 8.0, 9.0]
    assert first[5]["sub_scores"] == {"a": 5.0, "score": None}
    assert first[6]["sub_scores"] == {"a": None}
    out = tmp_path / "out"
    write_report(out / "results.jsonl", out / "report.html")  # the report reads the job's file as it is


def test_a_judge_class_whose_score_is_a_0d_array_or_tensor_has_it_read_as_its_number(tmp_path, edit_manifest):
    # The expected value over a judge's levels, `probs @ levels` in torch (or a 0-d numpy array), is a
    # 0-d tensor: a judge class of the user's that returned it as its score had every item failed as
    # "not a finite number", though the job reads such a value as its number in `raw`. It is now read
    # so, as a score or a sub-score; one that is not finite still fails its item, and an array of one
    # element, which is no scalar, does too.
    no_number = "the judge (Judge) returned score {}: not a finite number, so no score"
    errors = {"e3": no_number.format("array([3.])"), "e4": no_number.format("array(nan)"),
              "e5": no_number.format("tensor(inf)"), "e6": no_number.format("tensor([6.])"),
              "e7": no_number.format("array(True)")}
    first = _judge_class_whose_results_for_some_items_fail(tmp_path, edit_manifest, "array_judge", """
        import numpy as np
        import torch


        def odd(item_id, result):
            n = result.score
            probs = torch.zeros(10)
            probs[int(n)] = 1.0
            expected = probs @ torch.arange(10.0)  # a 0-d tensor
            value = {"e1": np.array(n), "e2": expected, "e3": np.array([n]), "e4": np.array(np.nan),
                     "e5": torch.tensor(float("inf")), "e6": torch.tensor([n]), "e7": np.array(True),
                     "e8": np.array(8, dtype=np.int64), "e9": expected.requires_grad_()}.get(item_id)
            if value is not None:
                result.score = value
            if item_id in ("e1", "e2", "e8", "e9"):
                result.sub_scores = {"a": value}
            return result
    """, errors)
    assert [x["score"] for x in first] == [0.0, 1.0, 2.0, *[None] * 5, 8.0, 9.0]


def test_a_judge_class_whose_sub_score_is_named_like_a_csv_column_fails_only_that_item(tmp_path, edit_manifest):
    # results.csv has a column per sub-score beside its own (id, score, category, error, images, ...): a
    # judge class of the user's that returned a sub-score named like one of those had results.csv
    # written with two columns of that name (a reader by header gets one of them), and one with an
    # empty name a column with no header. Such an item now fails alone, as one whose sub-score is
    # named like a summary figure does, and the file has each column once; a `score` sub-score that
    # is the score (a lone template's) is written in the score's own column.
    from src.job.runner import CSV_HEAD, CSV_TAIL

    columns = ", ".join((*CSV_HEAD, *CSV_TAIL))
    clash = "the judge (Judge) returned a result the job cannot write: sub-score {!r} has the name of one of " \
            f"results.csv's own columns ({columns}), which the file would then hold twice; the item is failed"
    empty = "the judge (Judge) returned a result the job cannot write: sub-score {!r} has no name to head its " \
            "column of results.csv; the item is failed"
    errors = {"e1": clash.format("id"), "e2": clash.format("images"), "e3": clash.format("error"),
              "e4": empty.format(""), "e5": empty.format("  "), "e6": clash.format("instruction"),
              "e8": clash.format("category")}
    first = _judge_class_whose_results_for_some_items_fail(tmp_path, edit_manifest, "column_judge", """
        def odd(item_id, result):
            name = {"e1": "id", "e2": "images", "e3": "error", "e4": "", "e5": "  ", "e6": "instruction",
                    "e7": "score", "e8": "category"}.get(item_id)
            if name is not None:
                result.sub_scores[name] = None if item_id == "e6" else result.score
            return result
    """, errors)
    assert [x["score"] for x in first] == [0.0, *[None] * 6, 7.0, None, 9.0]
    assert first[7]["sub_scores"] == {"a": 7.0, "score": 7.0}
    assert all(x["sub_scores"] == {"a": None} for x in first if x["id"] in errors)
    header = _csv_rows(tmp_path / "out" / "results.csv")[0]
    assert header == [*CSV_HEAD, "a", *CSV_TAIL]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["sub_score_names"] == ["a", "score"]


def test_a_rubric_part_named_like_a_csv_column_stops_the_job_before_it_starts(tmp_path, edit_manifest, capsys):
    # A rubric part of the config's named like one of results.csv's own columns (id, images, ...) had
    # every item written with two columns of that name in results.csv; check_template_inputs refused
    # the names of the summary's figures alone. Such a part, or one with an empty name, is now a
    # config error naming it, before anything is scored. The built-in templates and rubrics name no
    # such part: the check passes for each.
    from src.cli import main
    from src.job.manifest import read_manifest
    from src.job.runner import CSV_HEAD, CSV_TAIL, check_template_inputs
    from src.models.reward.config import resolve_spec
    from src.models.reward.templates import BUILTIN_RUBRICS, BUILTIN_TEMPLATES

    out = tmp_path / "out"
    cfg = write_config(tmp_path, edit_manifest, out, template="mine")
    columns = ", ".join((*CSV_HEAD, *CSV_TAIL))
    clash = "sub-score {!r} has the name of one of results.csv's own columns " \
            f"({columns}), which the file would then hold twice; give that part another name"
    cases = [(f"{{mine: {{parts: {{{part}: edit_instruction, other: edit_quality}}, combine: mean}}}}", "mine",
              clash.format(part)) for part in (*CSV_HEAD[:1], *CSV_TAIL)]
    cases += [("{mine: {parts: {'': edit_instruction, other: edit_quality}}}", "mine",
               "sub-score '' has no name to head its column of results.csv; give that part another name"),
              ("{images: {text: 'Is this sharp?'}}", "images", clash.format("images"))]
    for templates, template, why in cases:
        rc = main(["--config", str(cfg), "--set", f"model.params.templates={templates}",
                   "--set", f"model.params.template={template}"], prog="main.py")
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        assert err == f"error: model.params.template: template '{template}': {why}\n", err
        assert not out.exists(), (templates, "the job started")

    # The built-in templates and rubrics pass the check on the edit manifest (its rows have a source
    # image and an instruction): no part of theirs is named like a column or a figure.
    config = yaml.safe_load(cfg.read_text())
    rows = read_manifest(edit_manifest)
    for name in (*BUILTIN_TEMPLATES, *BUILTIN_RUBRICS):
        _, cls, params = resolve_spec({**config["model"], "params": {**config["model"]["params"], "template": name}})
        check_template_inputs(cls, params, rows, str(edit_manifest))
    assert BUILTIN_RUBRICS and BUILTIN_TEMPLATES


def test_a_judge_object_given_to_run_job_is_checked_for_part_names_too(tmp_path, edit_manifest):
    # run_job(cfg, base, model=judge) (Python's API) skipped the part-name check a config's judge
    # gets: a part named `images` wrote results.csv with two columns of that name, and one named
    # `failed` overwrote summary.json's count of failed items with its figures. The judge object's
    # own rubric is now checked the same way, before anything is scored.
    from src.job.runner import run_job
    from src.models.reward import BaseRewardModel
    from src.models.reward.config import ConfigError, judge_settings, resolve_spec

    asked = []

    class Judge(BaseRewardModel):
        def __init__(self, settings):
            self.settings = settings

        def score_items(self, items):
            asked.append(len(items))
            return []

    out = tmp_path / "out"
    config = yaml.safe_load(write_config(tmp_path, edit_manifest, out).read_text())
    for part, why in (("images", "has the name of one of results.csv's own columns"),
                      ("failed", "which summary.json uses for its own figures")):
        params = {**config["model"]["params"], "template": "mine",
                  "templates": {"mine": {"parts": {part: "edit_instruction", "other": "edit_quality"}, "combine": "mean"}}}
        _, cls, params = resolve_spec({**config["model"], "params": params})
        with pytest.raises(ConfigError, match=f"template 'mine'.*{why}"):
            run_job({"job": config["job"]}, tmp_path, progress=False, model=Judge(judge_settings(cls, params)))
    assert asked == [] and not out.exists()


def test_a_config_parameter_too_long_for_text_is_named_in_summary_json(tmp_path, edit_manifest, caplog):
    # A config given to run_job (Python's API) whose judge parameter was an int of more than 4300
    # digits stopped the finished job with a ValueError traceback: Python writes no text for such an
    # int, neither where summary.json wrote the config's model section nor where the job made a
    # fingerprint of it for a judge without one of its own. summary.json now says what the value is,
    # and the log names it; the fingerprint is made from its hex, so that two such values differ.
    from src.job.runner import run_job
    from src.models.reward import BaseRewardModel, ScoreResult

    class Judge(BaseRewardModel):
        def score_items(self, items):
            return [ScoreResult(index=i, id=it.id, score=5.0) for i, it in enumerate(items)]

    class Keyed(Judge):
        fingerprint = "keyed-v1"

    big = 10 ** 5000
    what = f"an int of more than {sys.get_int_max_str_digits()} digits"
    prints = []
    for n, (model, value) in enumerate(((Judge(), big), (Judge(), big + 1), (Keyed(), big))):
        out = tmp_path / f"out{n}"
        cfg = {"model": {"class_path": "my.Judge", "params": {"big": value, "by_size": {value: 1}}},
               "job": {"manifest": str(edit_manifest), "output_dir": str(out), "chunk_size": 4}}
        caplog.clear()
        with caplog.at_level("WARNING", logger="src.job.runner"):
            summary = run_job(cfg, base=tmp_path, progress=False, model=model)
        assert summary["scored"] == 10
        written = json.loads((out / "summary.json").read_text())
        assert written["model"]["params"] == summary["model"]["params"] == {"big": what, "by_size": {what: 1}}
        assert f"summary.json: model.params.big is {what}, which Python writes no text for: written as {what!r}" \
            in caplog.messages, caplog.messages
        prints.append(written["fingerprint"])
    assert prints[0].startswith("cfg-") and prints[1].startswith("cfg-") and prints[0] != prints[1]
    assert prints[2] == "keyed-v1"
