"""The RL hooks driven by the trainers' own reward code, against a running reward service.

- verl 0.9 (pinned in requirements-rl.txt): its reward loop (`RewardLoopWorker` with the naive and
  rate_limited managers, `RewardLoopManager` with the remote manager in Ray workers) on a real
  `DataProto`, configured by the README's command-line overrides through verl's own Hydra config.
- verl 0.6 (the older layout): its `load_reward_manager` with the naive and batch managers, in a
  subprocess that puts verl 0.6 ahead of the current release (rl_support.COMPAT).
- OpenRLHF 0.11: its `SingleTurnAgentExecutor` (the HTTP reward client of a rollout) and the
  function that turns a rollout into an `Experience`.
- OpenRLHF 0.8: its `request_api_wrapper` and `update_samples_with_rewards`, in a subprocess.

OpenRLHF's modules that hold the experience code import vLLM or DeepSpeed at the top; those two
functions are therefore executed from OpenRLHF's own source file (`_framework_function`), with
the GPU engine replaced by one that returns a given completion.
"""
from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import descendants, make_image, pid_gone
from rl_support import compat_dir, judge_service
from service_proc import ROOT

HOOK = ROOT / "src" / "rl" / "verl_reward.py"
TEXT = "a red square"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    allowed = tmp_path_factory.mktemp("rl_allowed")
    outside = tmp_path_factory.mktemp("rl_outside")
    paths = []
    for i in range(2):
        p = allowed / f"im{i}.png"
        make_image(40 + i, 56, 56).save(p)
        paths.append(str(p))
    make_image(50, 56, 56).save(outside / "other.png")
    (allowed / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 20)
    return SimpleNamespace(allowed=str(allowed), paths=paths, outside=str(outside / "other.png"),
                           missing=str(allowed / "missing.png"), corrupt=str(allowed / "corrupt.png"))


@pytest.fixture(scope="module")
def service(images, tiny_cache):
    """No token: OpenRLHF sends none (verl's token is covered in test_rl.py)."""
    with judge_service([images.allowed]) as (srv, judge):
        yield SimpleNamespace(url=srv.url, judge=judge)


@pytest.fixture(scope="module")
def expected(service, images):
    """The judge's own scores of TEXT against each image, without the service in between."""
    from src.models.reward.types import ScoreItem

    results = service.judge.batch_score([ScoreItem(images=[p], instruction=TEXT) for p in images.paths])
    assert all(r.score is not None for r in results), results
    return [r.score for r in results]


@pytest.fixture(scope="module")
def tokenizer(tiny_cache):
    from transformers import AutoTokenizer

    from src.models.tiny import resolve_model_name

    path = resolve_model_name("tiny:qwen2_vl")
    return SimpleNamespace(path=path, tok=AutoTokenizer.from_pretrained(path))


def _framework_function(source: Path, name: str, namespace: dict) -> object:
    """A function (or method) defined in a framework's source file, executed from that source
    without importing its module (whose top imports vLLM or DeepSpeed)."""
    tree = ast.parse(source.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            exec(compile(ast.Module([node], []), str(source), "exec"), namespace)
            return namespace[name]
    raise AssertionError(f"{name} not found in {source}")


# -- verl ------------------------------------------------------------------------------------

def verl_rows(images):
    """(completion, extra_info, judged?) per sample: two the judge scores, then one of each kind
    of sample it cannot score."""
    return [
        (TEXT, {"image": images.paths[0], "index": 0}, True),
        (TEXT, {"images": [images.paths[1]], "index": 1}, True),
        (TEXT, {"image": images.missing, "index": 2}, False),   # the file does not exist
        ("", {"image": images.paths[0], "index": 3}, False),    # an empty completion
        (TEXT, {"image": images.corrupt, "index": 4}, False),   # not a readable image
        (TEXT, {"image": images.outside, "index": 5}, False),   # outside the service's folders (send_paths)
        (TEXT, {"index": 6}, False),                            # no image at all
    ]


def dataproto(tok, rows):
    """A verl batch as its rollout leaves it: left-padded prompts, right-padded responses."""
    import numpy as np
    import torch
    from verl import DataProto

    ids = [tok(c, add_special_tokens=False)["input_ids"] for c, _, _ in rows]
    n, width, prompt_len = len(rows), max(1, max(len(x) for x in ids)) + 2, 4
    responses = torch.full((n, width), tok.pad_token_id)
    response_mask = torch.zeros(n, width, dtype=torch.long)
    for i, x in enumerate(ids):
        responses[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        response_mask[i, :len(x)] = 1
    prompts = torch.tensor([tok("Describe it:", add_special_tokens=False)["input_ids"][-prompt_len:]] * n)
    attention_mask = torch.cat([torch.ones(n, prompts.shape[1], dtype=torch.long), response_mask], dim=1)
    return DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": attention_mask,
                 "input_ids": torch.cat([prompts, responses], dim=1)},
        non_tensors={"data_source": np.array(["t2i"] * n, dtype=object),
                     "reward_model": np.array([{"ground_truth": None, "style": "model"}] * n, dtype=object),
                     "extra_info": np.array([dict(e) for _, e, _ in rows], dtype=object)})


def readme_overrides(heading: str, url: str) -> list[str]:
    """The command-line overrides of the README's example under `heading`, for this checkout
    and this service: the tests configure verl exactly as the README tells its users to."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index(heading):].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.strip().rstrip("\\").strip() for line in block.splitlines()[1:]]
    out = [line.replace("/path/to/repo", str(ROOT)).replace("http://127.0.0.1:8899", url) for line in lines if line]
    assert out and all("=" in o and " " not in o for o in out), out
    return out


def verl09_config(tokenizer_path: str, url: str, manager: str, *extra: str):
    """verl's own trainer config with the README's overrides (README: 'verl 0.7 and later')."""
    import verl
    from hydra import compose, initialize_config_dir

    readme = readme_overrides("**verl 0.7 and later**", url)
    assert "reward.reward_manager.name=naive" in readme, readme
    overrides = [f"actor_rollout_ref.model.path={tokenizer_path}",
                 *[o for o in readme if not o.startswith("reward.reward_manager.name=")],
                 f"reward.reward_manager.name={manager}", *extra]
    with initialize_config_dir(config_dir=str(Path(verl.__file__).parent / "trainer" / "config"), version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def check_verl_scores(rows, scores, judge_failed, expected, failed_reward):
    for i, (_, _, judged) in enumerate(rows):
        if judged:
            assert judge_failed[i] == 0.0 and math.isclose(scores[i], expected[i], abs_tol=1e-4), (i, scores)
        else:
            assert judge_failed[i] == 1.0 and scores[i] == failed_reward, (i, scores, judge_failed)


@pytest.mark.parametrize("manager", ["naive", "rate_limited"])
def test_verl_reward_loop_worker(manager, service, images, expected, tokenizer, caplog):
    from verl.experimental.reward_loop import RewardLoopWorker

    cfg = verl09_config(tokenizer.path, service.url, manager,
                        "+reward.custom_reward_function.reward_kwargs.failed_reward=-1.0",
                        "+reward.custom_reward_function.reward_kwargs.send_paths=true")
    worker = RewardLoopWorker(cfg)
    assert type(worker.reward_manager).__name__ == {"naive": "NaiveRewardManager",
                                                    "rate_limited": "RateLimitedRewardManager"}[manager]
    rows = verl_rows(images)
    with caplog.at_level("WARNING", logger="src.rl.verl_reward"):
        out = worker.loop.run_until_complete(worker.compute_score_batch(dataproto(tokenizer.tok, rows)))
    assert [set(o["reward_extra_info"]) for o in out] == [{"score", "judge_failed"}] * len(rows), out
    check_verl_scores(rows, [o["reward_score"] for o in out], [o["reward_extra_info"]["judge_failed"] for o in out],
                      expected, -1.0)
    logged = [r.getMessage() for r in caplog.records]
    assert any("outside the allowed folders" in m for m in logged) and any("completion is empty" in m for m in logged)
    assert all(m.count("sample 0") == 1 for m in logged), logged  # the sample is named once
    assert any("sample 0 (index 3): the completion is empty" in m for m in logged), logged


def test_verl_reward_reads_verls_own_image_entries(service, images, expected, tokenizer):
    """An image as verl's dataset writes it (`_build_messages`: a path, a `file://` URI, or a dict
    `{"image": ...}` as qwen-vl-utils reads it, or `{"bytes": ...}`), copied into `extra_info`,
    is read by the hook like a plain path."""
    from PIL import Image
    from verl.experimental.reward_loop import RewardLoopWorker

    cfg = verl09_config(tokenizer.path, service.url, "naive")
    worker = RewardLoopWorker(cfg)
    p0, p1 = images.paths
    rows = [(TEXT, {"images": [{"image": f"file://{p0}"}]}, True),
            (TEXT, {"image": f"file://{p1}"}, True),
            (TEXT, {"images": [{"image": p0}]}, True),
            (TEXT, {"image": {"image": Image.open(p1)}}, True),
            (TEXT, {"images": [{"bytes": Path(p0).read_bytes(), "path": None}]}, True),
            (TEXT, {"images": [{"image": f"file://{images.missing}"}]}, False)]
    out = worker.loop.run_until_complete(worker.compute_score_batch(dataproto(tokenizer.tok, rows)))
    check_verl_scores(rows, [o["reward_score"] for o in out], [o["reward_extra_info"]["judge_failed"] for o in out],
                      [expected[0], expected[1], expected[0], expected[1], expected[0], None], 0.0)


def test_verl_remote_manager_in_ray_workers(service, images, expected, tokenizer):
    """verl's remote manager ships the hook to a Ray worker process (pickled by value), through
    the RewardLoopManager the trainer uses; the batch comes back as rm_scores."""
    cfg = verl09_config(tokenizer.path, service.url, "remote", "reward.num_workers=1",
                        "+reward.custom_reward_function.reward_kwargs.failed_reward=-1.0")
    rows = verl_rows(images)[:5]
    data = dataproto(tokenizer.tok, rows)
    out, procs, session_dir = _reward_loop(cfg, data, num_cpus=3)
    rm = out.batch["rm_scores"]
    last = data.batch["attention_mask"][:, data.batch["prompts"].shape[1]:].sum(dim=1) - 1
    scores = [rm[i, max(int(last[i]), -1)].item() for i in range(len(rows))]
    check_verl_scores(rows, scores, list(out.non_tensor_batch["judge_failed"]), expected, -1.0)
    assert out.meta_info["reward_extra_keys"] == ["score", "judge_failed"]
    assert "ray::" in " ".join(procs.values()), procs
    _wait_gone(procs, session_dir)


def test_verl_misspelled_kwarg_and_unreachable_service(service, images, tokenizer):
    from verl.experimental.reward_loop import RewardLoopWorker

    rows = verl_rows(images)[:2]
    data = dataproto(tokenizer.tok, rows)
    cfg = verl09_config(tokenizer.path, service.url, "naive", f"+reward.custom_reward_function.reward_kwargs.ulr={service.url}")
    worker = RewardLoopWorker(cfg)
    with pytest.raises(TypeError, match="unexpected keyword argument 'ulr'"):
        worker.loop.run_until_complete(worker.compute_score_batch(data))
    # Nothing listens on the port of a closed socket: after its retries the hook gives failed_reward.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg = verl09_config(tokenizer.path, dead, "naive", "+reward.custom_reward_function.reward_kwargs.max_retries=1",
                        "+reward.custom_reward_function.reward_kwargs.failed_reward=-3.0")
    worker = RewardLoopWorker(cfg)
    out = worker.loop.run_until_complete(worker.compute_score_batch(data))
    assert [o["reward_extra_info"] for o in out] == [{"score": -3.0, "judge_failed": 1.0}] * 2


def test_verl_rate_limited_service_that_never_answers(images, tokenizer):
    """rate_limited gives a sample up after its own `reward.timeout`, as reward 0.0 with other
    keys (`timeout`, `acc`) than the hook's: no judge_failed, and a batch in which only some
    samples timed out fails in verl's assembly (its keys are the first sample's: KeyError). The
    hook's `timeout_s` bounds the whole call, retries included (they alone took 4 x 3 s here),
    so a hook given less time than verl answers `failed_reward` first."""
    import socket

    rows = verl_rows(images)[:2]
    data = dataproto(tokenizer.tok, rows)
    with socket.socket() as hung:  # takes connections (the kernel's backlog) and never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)
        cfg = verl09_config(tokenizer.path, f"http://127.0.0.1:{hung.getsockname()[1]}", "rate_limited",
                            "reward.num_workers=1", "+reward.timeout=10", "+reward.max_concurrent=4",
                            "+reward.custom_reward_function.reward_kwargs.timeout_s=3",
                            "+reward.custom_reward_function.reward_kwargs.failed_reward=-1.0")
        out, procs, session_dir = _reward_loop(cfg, data, num_cpus=2)
    assert list(out.non_tensor_batch["judge_failed"]) == [1.0, 1.0], out.non_tensor_batch
    assert list(out.non_tensor_batch["score"]) == [-1.0, -1.0]
    _wait_gone(procs, session_dir)


_VERL06 = r"""
import json, sys
import numpy as np, torch, verl
from pathlib import Path
from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer
from verl import DataProto
from verl.trainer.ppo.reward import load_reward_manager

args = json.loads(sys.argv[1])
assert verl.__version__ == "0.6.1", verl.__version__
tok = AutoTokenizer.from_pretrained(args["tokenizer"])
rows = args["rows"]
ids = [tok(c, add_special_tokens=False)["input_ids"] for c, _ in rows]
n, width = len(rows), max(1, max(len(x) for x in ids)) + 2
responses = torch.full((n, width), tok.pad_token_id)
mask = torch.zeros(n, width, dtype=torch.long)
for i, x in enumerate(ids):
    responses[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    mask[i, :len(x)] = 1
prompts = torch.full((n, 3), tok.pad_token_id)
data = DataProto.from_dict(
    tensors={"prompts": prompts, "responses": responses, "attention_mask": torch.cat([torch.ones(n, 3, dtype=torch.long), mask], 1)},
    non_tensors={"data_source": np.array(["t2i"] * n, dtype=object),
                 "reward_model": np.array([{"ground_truth": None}] * n, dtype=object),
                 "extra_info": np.array([e for _, e in rows], dtype=object)})
out = {}
for manager, name in (("naive", "compute_score"), ("batch", "compute_score_batch")):
    with initialize_config_dir(config_dir=str(Path(verl.__file__).parent / "trainer" / "config"), version_base=None):
        readme = [o for o in args["overrides"] if not o.startswith(("custom_reward_function.name=", "reward_model.reward_manager="))]
        cfg = compose(config_name="ppo_trainer", overrides=readme + [
            f"custom_reward_function.name={name}", f"reward_model.reward_manager={manager}",
            "+custom_reward_function.reward_kwargs.failed_reward=-1.0"])
    fn = load_reward_manager(cfg, tok, num_examine=0, **cfg.reward_model.get("reward_kwargs", {}))
    got = fn(data, return_dict=True)
    last = mask.sum(1) - 1
    out[manager] = {"cls": type(fn).__name__,
                    "scores": [got["reward_tensor"][i, int(last[i])].item() for i in range(n)],
                    "judge_failed": list(got["reward_extra_info"]["judge_failed"])}
print("RESULT " + json.dumps(out))
"""


def test_verl_06_naive_and_batch_managers(service, images, expected, tokenizer):
    rows = verl_rows(images)[:5]
    overrides = readme_overrides("**verl 0.6 and earlier**", service.url)
    assert "reward_model.reward_manager=batch" in overrides and "custom_reward_function.name=compute_score_batch" in overrides
    args = {"tokenizer": tokenizer.path, "overrides": overrides, "rows": [[c, e] for c, e, _ in rows]}
    env = {**os.environ, "PYTHONPATH": str(compat_dir("verl-0.6.1")), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _VERL06, json.dumps(args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(line[0][len("RESULT "):])
    assert out["naive"]["cls"] == "NaiveRewardManager" and out["batch"]["cls"] == "BatchRewardManager"
    for manager in ("naive", "batch"):
        check_verl_scores(rows, out[manager]["scores"], out[manager]["judge_failed"], expected, -1.0)


# -- OpenRLHF --------------------------------------------------------------------------------

class _Engine:
    """Stands in for OpenRLHF's vLLM engine: 'generates' a given completion."""

    def __init__(self, tok, completion: str):
        self.ids = tok(completion, add_special_tokens=False)["input_ids"] + tok("<|im_end|>", add_special_tokens=False)["input_ids"]

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(self.ids), finish_reason="stop", logprobs=None)])


PROMPT = "<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"


def openrlhf_labels(images):
    """(label, completion, index into `expected` or None when the sample fails)."""
    return [
        (images.paths[0], TEXT, 0),
        (json.dumps({"image": images.paths[1], "id": 7}), TEXT, 1),
        ("", TEXT, None),                       # data.label_key unset: OpenRLHF sends ""
        (images.outside, TEXT, None),           # outside the service's folders
        (images.missing, TEXT, None),           # no such file
        (images.corrupt, TEXT, None),           # not a readable image
        (images.paths[0], "", None),            # an empty completion
    ]


def test_openrlhf_011_rollout_reward_and_experience(service, images, expected, tokenizer):
    import asyncio

    import openrlhf
    import torch
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    assert version("openrlhf") == "0.11.2"
    to_experience = _framework_function(
        Path(openrlhf.__file__).parent / "trainer" / "ppo_utils" / "samples_generator.py",
        "_process_response_into_experience", {"torch": torch, "Experience": Experience})
    # --reward.remote_url is split on commas into this list (openrlhf/cli/train_ppo_ray.py).
    executor = SingleTurnAgentExecutor(remote_rm_url=[service.url + "/get_reward"])
    params = SimpleNamespace(max_tokens=16, logprobs=None)

    async def rollouts():
        return await asyncio.gather(*[
            executor.execute(PROMPT, label, params, 256, tokenizer.tok, _Engine(tokenizer.tok, completion))
            for label, completion, _ in openrlhf_labels(images)])

    for (label, _, k), out in zip(openrlhf_labels(images), asyncio.run(rollouts())):
        exp = to_experience(None, out, max_len=256)
        reward, failed = exp.info["reward"].flatten().tolist(), exp.info["judge_failed"].flatten().tolist()
        if k is None:
            assert reward == [0.0] and failed == [1.0], (label, out)
        else:
            assert failed == [0.0] and math.isclose(reward[0], expected[k], abs_tol=1e-4), (label, out)
        assert exp.rewards.flatten().tolist() == reward


def test_openrlhf_011_vlm_and_truncated_prompts(service, images, expected, tokenizer):
    """The query OpenRLHF sends is its prompt's tokens decoded, not its prompt: a VLM processor
    has expanded the image placeholder into one token per patch group, and a prompt too long for
    its budget lost its start. The response is still what the judge reads, not the chat around it."""
    import asyncio

    from openrlhf.utils.agent import SingleTurnAgentExecutor
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tokenizer.path)
    vlm_prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        tokenize=False, add_generation_prompt=True)
    assert vlm_prompt.count("<|image_pad|>") == 1, vlm_prompt
    executor = SingleTurnAgentExecutor(remote_rm_url=[service.url + "/get_reward"])
    sent = []
    real_fetch = executor._fetch_rewards_via_http

    async def fetch(queries, prompts, labels):  # OpenRLHF's own client; the queries kept to check below
        sent.extend(queries)
        return await real_fetch(queries, prompts, labels)
    executor._fetch_rewards_via_http = fetch

    long_prompt = "Some context. " * 40 + PROMPT
    n_long = len(tokenizer.tok(long_prompt, add_special_tokens=False)["input_ids"])

    async def rollouts():
        return await asyncio.gather(
            # a VLM policy: the processor tokenizes the prompt with its image
            executor.execute(vlm_prompt, images.paths[0], SimpleNamespace(max_tokens=16, logprobs=None), 4096,
                             processor, _Engine(tokenizer.tok, TEXT), images=[images.paths[0]]),
            # a prompt over its budget, cut from the left by OpenRLHF
            executor.execute(long_prompt, images.paths[1], SimpleNamespace(max_tokens=16, logprobs=None),
                             n_long - 20 + 16, tokenizer.tok, _Engine(tokenizer.tok, TEXT)))

    outs = asyncio.run(rollouts())
    assert sent[0].count("<|image_pad|>") > 1 and not sent[0].startswith(vlm_prompt), sent[0]
    assert not sent[1].startswith(long_prompt), sent[1]
    for k, out in enumerate(outs):
        assert out["extra_logs"]["judge_failed"] == [0.0], out
        assert math.isclose(out["reward"][0], expected[k], abs_tol=1e-4), out


_OPENRLHF08 = r"""
import ast, json, sys
from importlib.metadata import version
from types import SimpleNamespace
import openrlhf, torch
from openrlhf.utils.remote_rm_utils import request_api_wrapper

args = json.loads(sys.argv[1])
assert version("openrlhf") == "0.8.11" and openrlhf.__path__[0].startswith(sys.path[1]), openrlhf.__path__
src = open(openrlhf.__path__[0] + "/trainer/ppo_utils/experience_maker.py").read()
node = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name == "update_samples_with_rewards")
ns = {"torch": torch}
exec(compile(ast.Module([node], []), "experience_maker.py", "exec"), ns)
payload = {"query": args["queries"], "prompts": args["prompts"], "labels": args["labels"]}
n = len(args["queries"])

def samples():  # two rollout batches, as OpenRLHF 0.8 splits them
    return [SimpleNamespace(sequences=torch.zeros(2, 5), info={}), SimpleNamespace(sequences=torch.zeros(n - 2, 5), info={})]

out = {}
try:  # the answer as it is: extra_logs holds JSON lists, which 0.8 concatenates as tensors
    ns["update_samples_with_rewards"]([request_api_wrapper(args["url"] + "/get_reward", payload, try_max_times=1)], samples())
    out["plain"] = "ok"
except TypeError as e:
    out["plain"] = "TypeError: " + str(e)
got = samples()
ns["update_samples_with_rewards"]([request_api_wrapper(args["url"] + "/get_reward?extra_logs=0", payload, try_max_times=1)], got)
out["rewards"] = torch.cat([s.rewards for s in got]).tolist()
out["scores"] = torch.cat([s.info["score"] for s in got]).tolist()
print("RESULT " + json.dumps(out))
"""


def test_openrlhf_08_remote_reward_and_update_samples(service, images, expected):
    cases = openrlhf_labels(images)
    args = {"url": service.url, "queries": [PROMPT + c + "<|im_end|>" for _, c, _ in cases],
            "prompts": [PROMPT] * len(cases), "labels": [label for label, _, _ in cases]}
    env = {**os.environ, "PYTHONPATH": str(compat_dir("openrlhf-0.8.11")), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _OPENRLHF08, json.dumps(args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(line[0][len("RESULT "):])
    assert out["plain"].startswith("TypeError"), out  # why its users add ?extra_logs=0 (README)
    for (label, _, k), reward, score in zip(cases, out["rewards"], out["scores"]):
        want = 0.0 if k is None else expected[k]
        assert math.isclose(reward, want, abs_tol=1e-4) and math.isclose(score, want, abs_tol=1e-4), (label, out)


# -- processes ---------------------------------------------------------------------------------

def _reward_loop(cfg, data, num_cpus: int):
    """verl's RewardLoopManager on `data`, in a Ray session of its own: (its output, the processes
    it started, the session's folder), Ray shut down before returning."""
    import ray
    from ray._private import worker as ray_worker
    from verl.experimental.reward_loop import RewardLoopManager

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        session_dir = ray_worker._global_node.get_session_dir_path()
        out = RewardLoopManager(cfg).compute_rm_score(data)
        procs = descendants(os.getpid())
    finally:
        ray.shutdown()
    return out, procs, session_dir


def _wait_gone(procs: dict[int, str], session_dir: str) -> None:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(pid_gone(p) for p in procs):
        time.sleep(0.2)
    left = {p: a for p, a in procs.items() if not pid_gone(p)}
    assert not left, f"Ray processes left behind: {left}"
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert session_dir not in ps, "a process of this Ray session is still running"
