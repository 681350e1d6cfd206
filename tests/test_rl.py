"""RL hooks against a real reward service: TRL's GRPOTrainer for one step, verl's reward
functions, and the sample -> item rules they share."""
from __future__ import annotations

import importlib.util
import math

import pytest

from conftest import make_image
from rl_support import judge_service
from service_proc import ROOT
from src.rl.items import SampleError, completion_text, image_in_completion, openrlhf_item, sample_item, verl_item

TOKEN = "rl-token-19c"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl_images")
    paths = []
    for i in range(3):
        p = d / f"im{i}.png"
        make_image(20 + i, 56, 56).save(p)
        paths.append(p)
    return d, paths


@pytest.fixture(scope="module")
def service(images, tiny_cache):
    with judge_service([str(images[0])], token=TOKEN) as (srv, _):
        yield srv


# -- what a sample is -------------------------------------------------------------------------

def test_sample_rules():
    conv = [{"role": "assistant", "content": [{"type": "text", "text": " a cat "}]}]
    assert completion_text(conv) == "a cat"
    assert completion_text("a dog<|im_end|><|endoftext|>\n") == "a dog"
    assert image_in_completion("I drew it. <image>/a/b.png</image>") == "/a/b.png"
    assert image_in_completion("  /out/x.png \n") == "/out/x.png"
    with pytest.raises(SampleError, match="names no image"):
        image_in_completion("first line\nsecond line")
    item = sample_item("a cat", images="/i.png", completion_as="instruction")
    assert item.images == ["/i.png"] and item.instruction == "a cat"
    item = verl_item("<image>/o.png</image>", "make it red", {"completion_as": "image", "source_image": "/s.png"})
    assert item.images == ["/o.png"] and item.source_images == ["/s.png"] and item.instruction == "make it red"
    item = openrlhf_item("PROMPT a cat", "PROMPT ", '{"image": "/i.png", "id": 4}')
    assert item.instruction == "a cat" and item.images == ["/i.png"] and item.id == "4"
    with pytest.raises(SampleError, match="does not hold its prompt's end"):
        openrlhf_item("a cat", "<|im_start|>user\nDescribe it.<|im_end|>\n<|im_start|>assistant\n", "/i.png")
    with pytest.raises(SampleError, match="no image to judge"):
        sample_item("a cat", images=None)
    with pytest.raises(ValueError, match="completion_as: unknown value 'pixels'"):
        verl_item("x", None, {"completion_as": "pixels", "image": "/i.png"})


# -- TRL ----------------------------------------------------------------------------------------

def test_trl_grpo_trainer_runs_a_step_with_the_service_reward(service, images, tmp_path, monkeypatch):
    """TRL's vision-language GRPO form (its grpo_vlm example: a conversational prompt and an
    `image` column, a Qwen-VL policy with its processor): a tiny Qwen2-VL policy sees the image and
    writes about it; the judge behind the service rates how well the image matches what it wrote
    (`alignment`); GRPO takes one step."""
    import httpx
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoProcessor
    from trl import GRPOConfig, GRPOTrainer

    from src.models.tiny import resolve_model_name
    from src.rl.trl_reward import AsyncJudgeReward, JudgeReward

    monkeypatch.setenv("REWARD_SERVICE_TOKEN", TOKEN)
    _, paths = images
    policy = resolve_model_name("tiny:qwen2_vl")
    ds = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": "Describe the image in a few words."}]] * 2,
        "image": [Image.open(paths[0]).convert("RGB"), Image.open(paths[1]).convert("RGB")],
    })
    reward = JudgeReward(service.url, name="judge")
    areward = AsyncJudgeReward(service.url, name="judge_async")
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, max_steps=1, logging_steps=1, report_to=[], use_cpu=True,
                      save_strategy="no", bf16=False, seed=0)
    before = httpx.get(service.url + "/health").json()["items_scored"]
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward, areward], args=args, train_dataset=ds,
                          processing_class=AutoProcessor.from_pretrained(policy))
    trainer.train()
    logs = trainer.state.log_history[0]
    for name in ("judge", "judge_async"):
        mean = logs[f"rewards/{name}/mean"]
        assert isinstance(mean, float) and math.isfinite(mean) and 0.0 <= mean <= 9.0, logs
        assert logs[f"{name}/failed"] == 0.0
    assert math.isclose(logs["rewards/judge/mean"], logs["rewards/judge_async/mean"], abs_tol=1e-4)
    assert math.isfinite(logs["loss"]) and math.isfinite(logs["reward"])
    # Each of the 4 completions was judged by each reward, on the service.
    assert httpx.get(service.url + "/health").json()["items_scored"] - before == 8
    reward.close()
    areward.close()


def test_trl_reward_called_directly_with_both_completion_forms(service, images, monkeypatch):
    import asyncio

    from src.rl.trl_reward import AsyncJudgeReward, JudgeReward

    monkeypatch.setenv("REWARD_SERVICE_TOKEN", TOKEN)
    _, paths = images
    logged: dict = {}
    as_text = JudgeReward(service.url)
    out = as_text(prompts=["p", "p", "p"], completions=["a red square", "a red square", ""],
                  images=[[str(paths[0])], [str(paths[0])], [str(paths[0])]],
                  log_metric=lambda k, v: logged.__setitem__(k, v),
                  log_extra=lambda k, v: logged.__setitem__(k, v))
    assert out[0] is not None and math.isclose(out[0], out[1]) and out[2] is None
    assert math.isclose(logged["judge/failed"], 1 / 3) and "completion is empty" in logged["judge_error"][2]
    # completion_as=image: the policy names the image it made; the prompt is the instruction.
    as_image = AsyncJudgeReward(service.url, completion_as="image", failed_reward=-1.0)
    got = asyncio.run(as_image(prompts=[[{"role": "user", "content": "a red square"}]] * 2,
                               completions=[f"done: <image>{paths[0]}</image>", "I could not draw it"]))
    assert math.isclose(got[0], out[0], abs_tol=1e-4), "same image, same text, same score"
    assert got[1] == -1.0
    # A column that is no list of rows: before, a string of as many characters as completions was
    # split into them, one a row, and a number raised "'int' object is not iterable"
    for column, value in (("instruction", "abc"), ("images", 3)):
        with pytest.raises(TypeError, match=f"judge: column '{column}' must be a list with an entry per completion "
                                            f"\\(TRL passes the batch's rows so\\), got {type(value).__name__}"):
            as_text(prompts=["p"] * 3, completions=["a", "b", "c"], **{column: value})
    as_text.close()
    as_image.close()


def test_trl_reward_with_a_judge_class_in_process_never_rewards_what_the_judge_failed(images):
    """JudgeReward given a judge object of the user's own class: its NaN score became a reward of
    NaN, a score beside an error (an item the judge failed) became that score, a dict in its list of
    results raised AttributeError, and too few results an AssertionError. Now they pass through the
    rules the service and the job follow (result_form.usable): a numpy number is a float, what the
    judge failed or could not score gets failed_reward, the error saying why; too few results is a
    JudgeError naming the judge."""
    import numpy as np

    from src.models.reward import BaseRewardModel, ScoreResult
    from src.models.reward.errors import JudgeError
    from src.rl.trl_reward import JudgeReward

    class Judge(BaseRewardModel):
        def score_items(self, items):
            out = []
            for i, it in enumerate(items):
                text = it.instruction
                r = ScoreResult(index=i, id=it.id, score=float(len(text)))
                if text == "nan":
                    r.score = float("nan")
                elif text == "unsure":
                    r.error, r.error_kind = f"item {it.id!r} (#{i}): unsure", "parse"
                elif text == "numpy":
                    r.score = np.float32(2.5)
                elif text == "dict":
                    r = {"score": 4.0}
                elif text == "short":
                    return out
                out.append(r)
            return out

    _, paths = images
    logged: dict = {}
    reward = JudgeReward(Judge(), failed_reward=-1.0)
    completions = ["fine", "nan", "unsure", "numpy", "dict"]
    got = reward(prompts=["p"] * 5, completions=completions, images=[[str(paths[0])]] * 5,
                 log_extra=lambda k, v: logged.__setitem__(k, v))
    assert got == [4.0, -1.0, -1.0, 2.5, -1.0] and type(got[3]) is float, got
    errors = logged["judge_error"]
    assert errors[0] == "" and errors[3] == ""
    assert errors[1] == "item '1' (#1): the judge (Judge) returned score nan: not a finite number, so no score"
    assert errors[2] == ("item '2' (#2): unsure; the judge (Judge) also returned a score, 6.0, which is not used "
                         "because the item failed"), errors[2]
    assert errors[4] == ("item '4' (#4): the judge (Judge) returned dict {'score': 4.0} for it, not a ScoreResult; "
                         "the item is failed"), errors[4]
    with pytest.raises(JudgeError, match=r"the judge \(Judge\) returned 1 results for 2 completions"):
        reward(prompts=["p"] * 2, completions=["fine", "short"], images=[[str(paths[0])]] * 2)


# -- verl ---------------------------------------------------------------------------------------

def _verl_module():
    """Load the reward file by path, as verl's custom_reward_function.path does."""
    spec = importlib.util.spec_from_file_location("custom_module", ROOT / "src" / "rl" / "verl_reward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verl_compute_score_and_batch(service, images, monkeypatch):
    import numpy as np

    verl = _verl_module()
    _, paths = images
    monkeypatch.setenv("REWARD_SERVICE_URL", service.url)
    monkeypatch.setenv("REWARD_SERVICE_TOKEN", TOKEN)
    one = verl.compute_score("t2i", "a red square", None, {"image": str(paths[0]), "index": np.int64(3)})
    assert set(one) == {"score", "judge_failed"} and one["judge_failed"] == 0.0 and 0.0 <= one["score"] <= 9.0
    batch = verl.compute_score_batch(
        data_sources=np.array(["t2i"] * 4, dtype=object),
        solution_strs=np.array(["a red square", "a red square", "a red square", "<image>/nowhere.png</image>"], dtype=object),
        ground_truths=np.array([None, None, None, "a red square"], dtype=object),
        extra_infos=np.array([{"image": str(paths[0])}, {"images": np.array([str(paths[0])], dtype=object)},
                              {}, {"completion_as": "image"}], dtype=object),
        failed_reward=-2.0, batch_size=3)
    assert [b["judge_failed"] for b in batch] == [0.0, 0.0, 1.0, 1.0]
    # Fields the judge does not read are not sent (verl's and the dataset's own, a NaN ground truth);
    # a value it reads that JSON cannot carry, or an extra_info that is no dict, fails its sample alone.
    odd = verl.compute_score_batch(["t2i"] * 5, ["a red square"] * 5, [float("nan"), None, None, None, None],
                                   [{"image": str(paths[0]), "x": object(), "num_turns": np.int64(2)},
                                    {"image": str(paths[0]), "instruction": object()},
                                    {"image": str(paths[0]), "completion_as": float("nan")}, "not a dict",
                                    {"image": np.float32(1.0)}])  # a numpy scalar: it raised for the batch
    assert [o["judge_failed"] for o in odd] == [0.0, 1.0, 1.0, 1.0, 1.0], odd
    assert math.isclose(odd[0]["score"], one["score"], abs_tol=1e-4)
    assert math.isclose(batch[0]["score"], one["score"], abs_tol=1e-4)
    assert math.isclose(batch[1]["score"], one["score"], abs_tol=1e-4)
    assert batch[2]["score"] == -2.0 and batch[3]["score"] == -2.0
    # send_paths: the service reads the (allowed) file itself.
    by_path = verl.compute_score("t2i", "a red square", None, {"image": str(paths[0])}, send_paths=True)
    assert math.isclose(by_path["score"], one["score"], abs_tol=1e-4)
    # A wrong token is a configuration error, raised rather than turned into rewards.
    with pytest.raises(verl.RewardServiceAuthError, match="401"):
        verl.compute_score("t2i", "x", None, {"image": str(paths[0])}, token="wrong")


def test_verl_hook_without_the_project_installed_says_how_to_install_it(tmp_path):
    """verl loads the hook by path in its own environment; without this project installed there,
    the load fails at once with the command that fixes it (not with a bare ModuleNotFoundError)."""
    import subprocess
    import sys

    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('custom_module', sys.argv[1]); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))")
    # -I -S: no site-packages (so no editable install) and not this folder on the path.
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(ROOT / "src" / "rl" / "verl_reward.py")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    assert "cannot import this project's package" in proc.stderr
    assert f"pip install -e {ROOT} --no-deps" in proc.stderr
