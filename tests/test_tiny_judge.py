"""The shipped tiny trained judge (models/tiny_judge) judges synthetic items it never saw.

Random weights prove plumbing; these prove scoring: that logits mode reads the level tokens the
judge puts its mass on, that the edit template shows the source, the edited image and the
instruction where the judge looks, and that generate answers parse into the same judgement,
in this process and through CPU worker processes. Training seeds are >= 1e6; these use others.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from src.models import synthetic
from src.models.reward.implementations.local import QwenVLRewardModel
from src.models.reward.implementations.multi_gpu import MultiGPURewardModel
from src.models.tiny import resolve_model_name

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "tiny_judge"
PIXELS = synthetic.SIZE * synthetic.SIZE
JUDGE = {"model_name": "tiny:judge", "min_pixels": PIXELS, "max_pixels": PIXELS, "batch_size": 16, "max_new_tokens": 16}
N = 60


@pytest.fixture(scope="module")
def trained():
    return json.loads((MODEL / "training.json").read_text())


@pytest.fixture(scope="module")
def edits(trained):
    # The instruction kinds the shipped judge was trained on (its card says which).
    return synthetic.edit_items(N, seed=4242, kinds=tuple(trained["args"]["instructions"].split(",")))


@pytest.fixture(scope="module")
def quality():
    return synthetic.quality_items(N, seed=4243)


@pytest.fixture(scope="module")
def single(edits, quality):
    """Scores of the in-process judge: {(mode, template): [score, ...]}."""
    out = {}
    for mode in ("logits", "generate"):
        for template, items in (("edit_instruction", edits), ("quality", quality), ("edit_quality", quality)):
            with QwenVLRewardModel(mode=mode, template=template, **JUDGE) as judge:
                out[(mode, template)] = judge.score_items(items)
    return out


def _scores(results):
    return [r.score for r in results]


def _check_figures(res, edits, quality, templates=("quality", "edit_quality")):
    """The issue's bar: edit accuracy >= 95%, quality Spearman >= 0.8, generate parses >= 95% and
    agrees with logits within 1 point on average."""
    for mode in ("logits", "generate"):
        acc = synthetic.edit_accuracy(_scores(res[(mode, "edit_instruction")]), edits)
        assert acc >= 0.95, f"{mode}: edit accuracy {acc:.3f}"
        for t in templates:
            rho = synthetic.quality_spearman(_scores(res[(mode, t)]), quality)
            assert rho >= 0.8, f"{mode}/{t}: Spearman {rho:.3f}"
    for t in ("edit_instruction", *templates):
        gen, log = res[("generate", t)], res[("logits", t)]
        parsed = [g.score is not None for g in gen]
        assert sum(parsed) / len(parsed) >= 0.95, f"{t}: only {sum(parsed)}/{len(parsed)} generate answers parsed"
        diffs = [abs(g.score - lg.score) for g, lg in zip(gen, log) if g.score is not None]
        assert sum(diffs) / len(diffs) <= 1.0, f"{t}: generate and logits differ by {sum(diffs) / len(diffs):.2f} on average"


def test_checkpoint_ships_complete():
    names = {p.name for p in MODEL.iterdir()}
    for need in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                 "generation_config.json", "CARD.md", "training.json"):
        assert need in names, f"models/tiny_judge lacks {need}"
    total = sum(p.stat().st_size for p in MODEL.iterdir())
    assert total < 5_000_000, f"the shipped judge is {total} bytes; keep it a few MB at most"


def test_in_process_judge_meets_the_bar(single, edits, quality):
    _check_figures(single, edits, quality)


def test_logits_put_mass_on_the_level_tokens(single):
    # The expected value is only meaningful if the judge actually answers with a level token.
    for template in ("edit_instruction", "quality"):
        masses = [r.raw[template]["level_mass"] for r in single[("logits", template)]]
        assert min(masses) > 0.9, f"{template}: level-token mass as low as {min(masses)}"


def test_generate_writes_the_template_json(single):
    # The judge was taught to answer with the template's JSON at once (and then stop).
    for template in ("edit_instruction", "quality"):
        for r in single[("generate", template)]:
            assert re.fullmatch(r'\{"score": [0-9]\}', r.raw[template].strip()), r.raw[template]


def test_tiny_judge_name_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(resolve_model_name("tiny:judge")) == MODEL
    with QwenVLRewardModel(model_name="tiny:judge", template="edit_instruction",
                           min_pixels=PIXELS, max_pixels=PIXELS) as judge:
        res = judge.score_items(synthetic.edit_items(4, seed=99, outcome_weights={"followed": 1.0}))
    assert all(r.score > 4.5 for r in res), [r.score for r in res]


def test_edit_judgement_follows_the_edit_kind(single, edits):
    # Not just above/below the middle: each kind of failure lands where the training put it.
    by_kind: dict[str, list[float]] = {}
    for r, it in zip(single[("logits", "edit_instruction")], edits):
        by_kind.setdefault(it.metadata["kind"], []).append(r.score)
    means = {k: sum(v) / len(v) for k, v in by_kind.items()}
    assert means["followed"] > 7.5 and max(means[k] for k in ("side_effect", "wrong", "unchanged")) < 4.5, means


def test_multi_worker_judge_meets_the_bar_and_matches(single, edits, quality):
    """Two CPU workers give the in-process judge's results, item for item, in both modes, on
    both kinds of item: the edits (source image and instruction travel to the worker) in logits
    mode, the quality items in generate mode (the raw answer travels back). The other two
    (mode, template) pairs take the same path through the pool and the engine code the in-process
    judge runs; each pool start costs two model loads."""
    res = {}
    pids = []
    for mode, template, items in (("logits", "edit_instruction", edits), ("generate", "quality", quality)):
        model = MultiGPURewardModel(device_ids=["cpu", "cpu"], progress=False, mode=mode, template=template, **JUDGE)
        try:
            pids += [p for p in model.worker_pids() if p is not None]
            res[(mode, template)] = model.score_items(items)
        finally:
            model.close()
    assert len(pids) == 4
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    acc = synthetic.edit_accuracy(_scores(res[("logits", "edit_instruction")]), edits)
    assert acc >= 0.95, f"logits: edit accuracy {acc:.3f}"
    rho = synthetic.quality_spearman(_scores(res[("generate", "quality")]), quality)
    assert rho >= 0.8, f"generate/quality: Spearman {rho:.3f}"
    for key, results in res.items():
        assert [r.index for r in results] == list(range(len(results)))
        assert {r.device for r in results} == {"cpu#0", "cpu#1"} or len({r.device for r in results}) == 2, key
        for a, b in zip(results, single[key]):
            if key[0] == "logits":
                assert a.score == pytest.approx(b.score, abs=1e-3), (key, a.id)
            else:
                assert a.score == b.score, (key, a.id, a.raw, b.raw)


def test_training_script_replays_the_start_of_the_shipped_run(tmp_path):
    # The learning-rate warm-up does not depend on the number of steps, so the first steps of a
    # short run with the shipped settings are the shipped run's first steps: same data, same
    # initial weights, same updates. (The full retraining is the slow test below.)
    shipped = json.loads((MODEL / "training.json").read_text())
    steps = 25
    assert shipped["args"]["warmup"] > steps
    # The probe runs too: scoring the model mid-training must leave the training path untouched.
    args = {**shipped["args"], "steps": steps, "log_every": steps, "probe_every": steps, "eval_items": 10}
    cmd = [sys.executable, str(ROOT / "scripts" / "train_tiny_judge.py"), "--out", str(tmp_path / "judge")]
    for key, value in args.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    log = json.loads((tmp_path / "judge" / "training.json").read_text())["loss_log"]
    again = {e["step"]: e["loss"] for e in log}
    probed = log[-1]
    assert 0 <= probed["edit_accuracy"] <= 1 and -1 <= probed["quality_spearman"] <= 1, probed
    before = {e["step"]: e["loss"] for e in shipped["loss_log"]}
    assert set(again) == {1, steps}
    for step, loss in again.items():
        assert loss == pytest.approx(before[step], rel=2e-3), (step, loss, before[step])
    # and the card and figures are written for the new checkpoint, naming the CPU model that trained it
    # (a run repeats bit for bit on the same model only)
    record = json.loads((tmp_path / "judge" / "training.json").read_text())
    assert record["cpu_model"] and f"({record['cpu_model']}," in (tmp_path / "judge" / "CARD.md").read_text()
    assert (tmp_path / "judge" / "CARD.md").read_text().startswith("# tiny_judge")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="retrains the judge (minutes); set RUN_SLOW=1")
def test_retraining_reproduces_the_shipped_figures(tmp_path):
    shipped = json.loads((MODEL / "training.json").read_text())
    cmd = [sys.executable, str(ROOT / "scripts" / "train_tiny_judge.py"), "--out", str(tmp_path / "judge")]
    for key, value in shipped["args"].items():  # every recorded setting, defaults included
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=1800)
    again = json.loads((tmp_path / "judge" / "training.json").read_text())
    for key, value in shipped["figures"].items():
        if key.endswith(("accuracy", "parsed")):
            assert again["figures"][key] == pytest.approx(value, abs=0.03), key
        elif key.endswith("spearman"):
            assert again["figures"][key] == pytest.approx(value, abs=0.05), key
        elif key.endswith(("mean_abs_error", "mean_abs_diff")):
            assert again["figures"][key] == pytest.approx(value, abs=0.3), key
