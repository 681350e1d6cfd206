"""OpenAI's protocol both ways: the official `openai` client against the service's
/v1/chat/completions, and the served-judge class (`class_path: openai`) against that service and
against a tiny misbehaving server on loopback.

The service runs the trained tiny judge in a CPU worker process (`multi_gpu` on [cpu]), so a chat
request goes client -> HTTP -> batcher -> worker channel -> engine, as on a GPU machine.
"""
from __future__ import annotations

import base64
import json
import math
import socket
import threading
import time
from pathlib import Path

import openai
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from conftest import assert_no_orphans, worker_processes
from service_proc import ROOT, ServiceProcess, ThreadServer
from src.models.reward import ConfigError, ScoreItem, build_reward_model
from src.models.reward.templates import resolve_rubric

TOKEN = "openai-test-token-51c4"
DEMO = ROOT / "data" / "demo"
JUDGE = {"model_name": "tiny:judge", "min_pixels": 12544, "max_pixels": 12544, "template": "edit",
         "max_new_tokens": 16, "batch_size": 8}
ROWS = [json.loads(line) for line in (DEMO / "manifest.jsonl").read_text().splitlines()]


def demo_items() -> list[ScoreItem]:
    return [ScoreItem(images=[str(DEMO / r["image"])], source_images=[str(DEMO / r["source_image"])],
                      instruction=r["instruction"], id=r["id"]) for r in ROWS]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_cache):
    cfg = {"model": {"class_path": "multi_gpu", "params": {**JUDGE, "device_ids": ["cpu"], "progress": False}},
           "server": {"allowed_dirs": [str(DEMO)], "token_env": "OPENAI_TEST_SERVICE_TOKEN", "max_batch": 16}}
    path = tmp_path_factory.mktemp("svc") / "service.yaml"
    path.write_text(yaml.safe_dump(cfg))
    svc = ServiceProcess([], env={"OPENAI_TEST_SERVICE_TOKEN": TOKEN}, config=str(path))
    svc.start()
    try:
        workers = worker_processes([svc.proc.pid])  # the service process owns the pool
        assert len(workers) == 1
        yield svc
    finally:
        rc = svc.stop()
    assert rc == 0, f"the service did not shut down cleanly (exit {rc}):\n{svc.log()}"
    assert_no_orphans(workers)


@pytest.fixture(scope="module")
def in_process():
    """The same judge in this process: its scores are what the served paths must reproduce."""
    items = demo_items()
    out = {}
    for mode in ("logits", "generate"):
        with build_reward_model({"class_path": "qwen_vl", "params": {**JUDGE, "mode": mode}}) as judge:
            out[mode] = judge.score_items(items)
    return out


@pytest.fixture(scope="module")
def client(service):
    with openai.OpenAI(base_url=service.url + "/v1", api_key=TOKEN, max_retries=0) as c:
        yield c


def served_judge(service, mode: str, monkeypatch, **extra):
    monkeypatch.setenv("OPENAI_TEST_KEY", TOKEN)
    return build_reward_model({"class_path": "openai", "params": {
        "base_url": service.url + "/v1", "model": "tiny:judge", "api_key_env": "OPENAI_TEST_KEY",
        "template": "edit", "mode": mode, "max_new_tokens": 16, "max_concurrency": 4, **extra}})


# -- chat requests in the engine -------------------------------------------------------------

def test_engine_answers_chat_items_beside_score_items(tiny_cache):
    """Random weights of the architecture least like the others (Qwen3-VL): chat items mixed into
    a scoring call keep their places, batched answers equal one-by-one answers, the plain items
    score as they do alone, and a malformed request fails only itself."""
    from src.models.reward.chat import CHAT_KEY

    def chat(k: int, **spec) -> ScoreItem:
        msgs = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Question {k}: what colour?"}]}]
        return ScoreItem(images=[str(DEMO / ROWS[k]["image"])], id=f"c{k}",
                         metadata={CHAT_KEY: {"messages": msgs, "max_tokens": 4, "logprobs": True, "top_logprobs": 3, **spec}})

    plain = [ScoreItem(images=[str(DEMO / ROWS[k]["image"])], id=f"p{k}") for k in range(2)]
    bad = chat(0, max_tokens=0)
    cold = chat(1, temperature=1e-300)  # logits / 1e-300 overflow: refused, not a model failure
    mixed = [chat(0), plain[0], chat(1), bad, plain[1], chat(2), cold]
    with build_reward_model({"class_path": "qwen_vl", "params": {"model_name": "tiny:qwen3_vl", "batch_size": 4}}) as judge:
        together = judge.score_items(mixed)
        alone = [judge.score_items([it])[0] for it in mixed]
        plain_only = judge.score_items(plain)
    assert [r.index for r in together] == list(range(7)) and [r.id for r in together] == [it.id for it in mixed]
    for k in (0, 2, 5):
        a, b = together[k].raw["chat"]["choices"][0], alone[k].raw["chat"]["choices"][0]
        assert together[k].error is None and together[k].score is None
        assert a["text"] == b["text"] and len(a["logprobs"]) == len(b["logprobs"]) >= 1
        for x, y in zip(a["logprobs"], b["logprobs"]):
            assert x["token_id"] == y["token_id"] and x["logprob"] == pytest.approx(y["logprob"], abs=1e-4)
            assert x["token_id"] == x["top"][0]["token_id"]  # greedy: the likeliest token
    assert [together[1].score, together[4].score] == pytest.approx([r.score for r in plain_only], abs=1e-5)
    assert together[3].error_kind == "input" and "'max_tokens' must be an integer from 1 to 4096" in together[3].error
    assert together[6].error_kind == "input" and "'temperature' must be 0 (greedy) or at least 1e-05" in together[6].error


def test_a_chat_prompt_and_answer_over_the_judges_context_fail_alone(short_context_judge):
    # The rule of every prompt (preparation.prompt_length_problem): the prompt with its max_tokens
    # within the judge's context (SHORT_CONTEXT); the request that fits is answered beside it.
    from conftest import SHORT_CONTEXT
    from src.models.reward.chat import CHAT_KEY

    def chat(text: str, max_tokens: int) -> ScoreItem:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return ScoreItem(images=[str(DEMO / ROWS[0]["image"])], id=f"{max_tokens}",
                         metadata={CHAT_KEY: {"messages": msgs, "max_tokens": max_tokens}})

    with build_reward_model({"class_path": "qwen_vl", "params": {
            "model_name": short_context_judge, "batch_size": 4, "min_pixels": 12544, "max_pixels": 12544}}) as judge:
        fits, budget_over, prompt_over = judge.score_items(
            [chat("What colour?", 4), chat("What colour?", SHORT_CONTEXT), chat("What colour? " * 80, 4)])
    assert fits.error is None and fits.raw["chat"]["choices"][0]["text"] is not None
    for r in (budget_over, prompt_over):
        assert r.error_kind == "prompt_too_long" and f"the judge's context of {SHORT_CONTEXT} tokens" in r.error, r.error
    assert "lower max_new_tokens" in budget_over.error and "fewer tokens" in prompt_over.error


def test_an_item_failure_raised_inside_a_call_is_that_items_result_on_every_path(fake, tiny_cache):
    """One class carries an item's failure inside a call, `errors.ItemFailed`: raised in the local
    judge's batch, in a chat request's generation, or in the openai judge's request for one item,
    it becomes that item's `error` (its message after the item's name) and `error_kind`, and the
    other items are answered. Each path had its own private class: the public one raised there was
    reported as "model failed" (local batching, chat) or escaped the whole call (openai)."""
    from src.models.reward.chat import CHAT_KEY
    from src.models.reward.errors import ItemFailed
    from src.models.reward.types import item_name

    refusals: list[ItemFailed] = []  # the next forward passes of the local judge's model raise these

    def refuse_next(mod, args):
        if refusals:
            raise refusals.pop(0)

    def chat(k: int) -> ScoreItem:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
        return ScoreItem(images=[str(DEMO / ROWS[k]["image"])], id=f"c{k}",
                         metadata={CHAT_KEY: {"messages": msgs, "max_tokens": 2}})

    def one_refused(items, results, prefix: str, message: str, kind: str):
        refused = [r for r in results if r.error is not None]
        assert len(refused) == 1, [(r.id, r.error) for r in results]
        [r] = refused
        assert r.score is None and r.error_kind == kind, (r.error_kind, r.error)
        assert r.error == f"{prefix} {item_name(items[r.index], r.index)}: {message}", r.error
        return r

    with build_reward_model({"class_path": "qwen_vl", "params": {"model_name": "tiny:judge", "batch_size": 1}}) as judge:
        judge.engine.model.register_forward_pre_hook(refuse_next)
        refusals.append(ItemFailed("the batch refused", "refused"))
        plain_items, chat_items = image_items(2), [chat(0), chat(1)]
        plain = judge.score_items(plain_items)
        refusals.append(ItemFailed("the chat refused", "refused_chat"))
        chats = judge.score_items(chat_items)
    assert not refusals
    one_refused(plain_items, plain, "item", "the batch refused", "refused")
    assert [r.score is not None for r in plain].count(True) == 1
    one_refused(chat_items, chats, "chat request", "the chat refused", "refused_chat")
    assert [r.raw.get("chat") is not None for r in chats].count(True) == 1

    served, _ = fake([completion('{"score": 6}')], mode="generate", max_concurrency=1)
    asked = served.messages

    def messages(tpl, item, urls):  # a subclass's own prompt, refusing one item
        if item.id == "i1":
            raise ItemFailed("the prompt refused", "refused_prompt")
        return asked(tpl, item, urls)
    served.messages = messages
    items = image_items(3)
    with served:
        results = served.score_items(items)
    assert one_refused(items, results, "item", "quality: the prompt refused", "refused_prompt").id == "i1"
    assert [r.score for r in results] == [6.0, None, 6.0]


# -- the official client against the service ----------------------------------------------

def test_official_client_asks_the_judge_and_reads_logprobs(client, in_process):
    assert [m.id for m in client.models.list().data] == ["tiny:judge"]
    tpl = resolve_rubric("edit").parts[1][1]  # edit_quality: the edited image alone
    row, expected = ROWS[9], in_process["logits"][9].sub_scores["perceptual_quality"]
    by_url = {"type": "image_url", "image_url": {"url": data_url(DEMO / row["image"])}}
    by_path = {"type": "image_url", "image_url": {"url": str(DEMO / row["image"])}}
    question = {"type": "text", "text": tpl.question(None, "logits")}
    for image in (by_url, by_path):
        resp = client.chat.completions.create(model="any-name", messages=[{"role": "user", "content": [image, question]}],
                                              max_tokens=3, temperature=0, logprobs=True, top_logprobs=20)
        choice = resp.choices[0]
        assert resp.object == "chat.completion" and resp.model == "tiny:judge"
        assert choice.message.role == "assistant" and choice.message.content.strip()[0].isdigit()
        assert resp.usage.prompt_tokens > 0 and resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
        first = choice.logprobs.content[0]
        assert len(first.top_logprobs) == 20 and first.token == first.top_logprobs[0].token  # greedy: the likeliest
        probs = {t.token: math.exp(t.logprob) for t in first.top_logprobs if t.token in "0123456789" and len(t.token) == 1}
        ev = sum(int(k) * p for k, p in probs.items()) / sum(probs.values())
        assert ev == pytest.approx(expected, abs=1e-3), (ev, expected)
    sampled = client.chat.completions.create(model="x", messages=[{"role": "user", "content": [by_url, question]}],
                                             max_tokens=2, temperature=1.0, n=3, seed=7)
    assert [c.index for c in sampled.choices] == [0, 1, 2] and all(c.logprobs is None for c in sampled.choices)
    greedy = client.chat.completions.create(model="x", messages=[{"role": "user", "content": [by_url, question]}],
                                            max_tokens=2, temperature=0, n=2)
    assert len(greedy.choices) == 2 and greedy.choices[0].message.content == greedy.choices[1].message.content


def test_official_client_continues_an_answer_prefix(client):
    """vLLM's continue_final_message: the judge continues the assistant's started answer (what a
    template with a logits_prefix, such as qalign_quality, is scored on)."""
    from transformers import AutoTokenizer

    from src.models.tiny import resolve_model_name

    prefix = "The quality of the image is"
    user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(DEMO / ROWS[0]["image"])}},
                                        {"type": "text", "text": "How would you rate the quality of this image?"}]}
    plain = client.chat.completions.create(model="x", messages=[user], max_tokens=1)
    cont = client.chat.completions.create(model="x", messages=[user, {"role": "assistant", "content": prefix}],
                                          max_tokens=1, extra_body={"continue_final_message": True,
                                                                    "add_generation_prompt": False})
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name("tiny:judge"))
    added = len(tokenizer.encode(prefix, add_special_tokens=False))
    assert cont.usage.prompt_tokens == plain.usage.prompt_tokens + added


def test_official_client_gets_clear_errors(service, client):
    image = {"type": "image_url", "image_url": {"url": str(DEMO / ROWS[0]["image"])}}
    text = {"type": "text", "text": "Rate it."}
    with openai.OpenAI(base_url=service.url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError, match="wrong bearer token"):
            bad.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.PermissionDeniedError, match="outside the allowed folders"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "/etc/hostname"}}, text]}])
    cases = [({"stream": True}, "streaming is not supported"),
             ({"top_logprobs": 5}, "needs 'logprobs': true"),
             ({"max_tokens": 0}, "'max_tokens' must be an integer from 1"),
             # softmax(logits / 1e-300) is inf/NaN: before, the model failed and the answer was 500
             ({"temperature": 1e-300}, r"'temperature' must be 0 \(greedy\) or from 1e-05 to 2"),
             ({"tools": [{"type": "function", "function": {"name": "f"}}]}, r"unsupported field\(s\) \['tools'\]")]
    for extra, message in cases:
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": [image, text]}], **extra)
    with pytest.raises(openai.BadRequestError, match="fetches no images from the network"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, text]}])
    with pytest.raises(openai.BadRequestError, match="cannot decode image"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not a png" * 20).decode()}},
            text]}])
    # the service still answers after all that
    ok = client.chat.completions.create(model="x", messages=[{"role": "user", "content": [image, text]}], max_tokens=1)
    assert ok.usage.completion_tokens <= 1 and ok.choices[0].finish_reason in ("length", "stop")


# -- the served-judge class against the service ------------------------------------------

@pytest.mark.parametrize("mode", ["logits", "generate"])
def test_served_judge_agrees_with_in_process(service, in_process, mode, monkeypatch):
    with served_judge(service, mode, monkeypatch) as judge:
        served = judge.score_items(demo_items())
    for local, remote in zip(in_process[mode], served):
        assert remote.error is None and remote.id == local.id and remote.device == service.url + "/v1"
        if mode == "logits":
            assert remote.score == pytest.approx(local.score, abs=1e-3)
            for part, value in local.sub_scores.items():
                assert remote.sub_scores[part] == pytest.approx(value, abs=1e-3)
                assert remote.raw[part]["level_mass"] > 0.99
        else:
            assert remote.sub_scores == local.sub_scores and remote.score == local.score
            assert remote.raw == local.raw  # the same answers, word for word


def test_served_judge_runs_a_job_and_resumes(service, in_process, tmp_path, monkeypatch):
    from src.job.runner import run_job

    monkeypatch.setenv("OPENAI_TEST_KEY", TOKEN)
    cfg = {"model": {"class_path": "openai", "params": {
        "base_url": service.url + "/v1", "model": "tiny:judge", "api_key_env": "OPENAI_TEST_KEY",
        "template": "edit", "mode": "logits"}},
        "job": {"manifest": str(DEMO / "manifest.jsonl"), "output_dir": str(tmp_path / "out"), "chunk_size": 4}}
    first = run_job(cfg, base=ROOT, progress=False)
    assert first["scored"] == len(ROWS) and first["failed"] == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [x["score"] for x in lines] == pytest.approx([r.score for r in in_process["logits"]], abs=1e-3)
    again = run_job(cfg, base=ROOT, progress=False)
    assert again["resumed_from_disk"] == len(ROWS)
    assert (tmp_path / "out" / "results.jsonl").read_text() == "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n"


# -- a tiny misbehaving server --------------------------------------------------------------

class Script:
    """What the fake server answers, request by request; it records every request it saw."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.seen: list[tuple[float, dict]] = []
        self.lock = threading.Lock()

    def next(self, body):
        with self.lock:
            self.seen.append((time.monotonic(), body))
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            return answer(body) if callable(answer) else answer  # a callable answers by the request's body


def completion(content="", top=None, finish_reason="stop"):
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason,
              "logprobs": None if top is None else {"content": [{"token": top[0][0], "logprob": top[0][1], "bytes": None,
                                                                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": None}
                                                                                  for t, lp in top]}]}}
    return 200, {"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice]}, {}


@pytest.fixture
def fake():
    app = FastAPI()
    holder: dict[str, Script] = {}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        status, body, headers = holder["script"].next(await request.json())
        if isinstance(body, str):  # the body's bytes as given: NaN, HTML, a broken JSON text
            return Response(body, status_code=status, headers=headers,
                            media_type=headers.get("content-type", "application/json"))
        return JSONResponse(body, status_code=status, headers=headers)

    with ThreadServer(app) as server:
        def run(answers, **params):
            holder["script"] = Script(answers)
            judge = build_reward_model({"class_path": "openai", "params": {
                "base_url": server.url + "/v1", "model": "m", "api_key_env": None, "template": "quality",
                "backoff_s": 0.0, **params}})
            return judge, holder["script"]
        yield run


def image_items(n: int) -> list[ScoreItem]:
    return [ScoreItem(images=[str(DEMO / ROWS[i]["image"])], id=f"i{i}") for i in range(n)]


def test_retries_429_and_5xx_then_scores(fake):
    busy = (429, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
    judge, script = fake([busy, (503, {"error": {"message": "loading"}}, {}), completion('{"score": 7}')],
                         mode="generate", max_concurrency=1)
    with judge:
        [r] = judge.score_items(image_items(1))
    assert r.score == 7.0 and r.error is None
    (t429, body), (t503, _), _ = script.seen
    assert t503 - t429 >= 0.95  # waited what Retry-After said (backoff_s is 0)
    assert body["model"] == "m" and body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_a_served_score_off_the_scale_is_clamped_and_noted(fake):
    # The same reading as in-process (scoring.read_answers): 12 on 0..9 is 9, and the item says so.
    judge, _ = fake([completion('{"score": 12}')], mode="generate")
    with judge:
        [r] = judge.score_items(image_items(1))
    assert r.score == 9.0 and r.error is None
    assert r.metadata["notes"] == ["quality: the answer's score 12 lay outside 0..9; clamped to 9"]
    # An item's own `notes` stays as it gave it; the judge's go beside it.
    judge, _ = fake([completion('{"score": 12}')], mode="generate")
    item = ScoreItem(images=image_items(1)[0].images, id="i0", metadata={"notes": "reviewed"})
    with judge:
        [r] = judge.score_items([item])
    assert r.metadata == {"notes": "reviewed",
                          "judge_notes": ["quality: the answer's score 12 lay outside 0..9; clamped to 9"]}


def test_a_served_answer_cut_off_inside_its_score_gives_no_score(fake):
    # As in-process (scoring.read_answers): "Score: 8" cut off by max_tokens (finish_reason
    # "length") may be the start of 85 on a 0..100 scale; the same answer ended by the judge is 8.
    pct = {"pct": {"text": "Rate this image from 0 to 100.", "scale": [0, 100]}}
    judge, _ = fake([completion("Score: 8", finish_reason="length"), completion("Score: 8")], mode="generate",
                    template="pct", templates=pct, max_concurrency=1)
    with judge:
        cut, ended = judge.score_items(image_items(2))
    assert ended.score == 8.0 and ended.error is None
    assert cut.score is None and cut.error_kind == "parse" and "cut off by max_new_tokens" in cut.error, cut.error


def test_a_server_that_ignores_n_is_asked_again_for_the_rest_of_the_samples(fake):
    # One answer per request whatever `n` says: the judge asks for the rest, the seed moved on so a
    # seeded server does not repeat itself, and scores the mean of all four answers.
    answers = [completion('{"score": %d}' % v) for v in (2, 4, 6, 8)]
    judge, script = fake(answers, mode="generate", num_samples=4, temperature=1.0, seed=5, max_concurrency=1)
    with judge:
        [r] = judge.score_items(image_items(1))
    assert r.error is None and r.score == 5.0
    assert r.raw["quality"]["scores"] == [2.0, 4.0, 6.0, 8.0] and r.raw["quality"]["parsed"] == 4
    assert [(body["n"], body["seed"]) for _, body in script.seen] == [(4, 5), (3, 6), (2, 7), (1, 8)]
    assert r.metadata["notes"] == ["quality: the server answered 1 of the 4 samples asked for (n); "
                                   "the rest took 3 more request(s)"]


def test_a_server_answering_n_samples_takes_one_request_and_extra_choices_are_not_counted(fake):
    def choices(*values):
        status, body, headers = completion()
        body["choices"] = [{"index": k, "message": {"role": "assistant", "content": '{"score": %d}' % v},
                            "finish_reason": "stop", "logprobs": None} for k, v in enumerate(values)]
        return status, body, headers

    judge, script = fake([choices(3, 5), choices(1, 2, 3, 4)], mode="generate", num_samples=2, temperature=1.0,
                         max_concurrency=1)
    with judge:
        first, second = judge.score_items(image_items(2))
    assert first.score == 4.0 and "notes" not in first.metadata
    assert second.score == 1.5 and second.raw["quality"]["scores"] == [1.0, 2.0]  # 2 asked, 2 counted
    assert [body["n"] for _, body in script.seen] == [2, 2]


def test_a_server_refusing_max_tokens_gets_max_completion_tokens_from_then_on(fake):
    # OpenAI's reasoning models refuse max_tokens with a 400 naming max_completion_tokens: the
    # judge sends the same request with the budget under that field, and every request after.
    refusal = (400, {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                                          "Use 'max_completion_tokens' instead.", "type": "invalid_request_error",
                               "param": "max_tokens", "code": "unsupported_parameter"}}, {})

    def strict(body):
        return refusal if "max_tokens" in body else completion('{"score": 6}')

    judge, script = fake([strict], mode="generate", max_new_tokens=64, max_concurrency=1, max_retries=0)
    with judge:
        results = judge.score_items(image_items(2))
    assert [(r.score, r.error) for r in results] == [(6.0, None), (6.0, None)]
    budgets = [({k for k in body if k.startswith("max_")}, body.get("max_completion_tokens")) for _, body in script.seen]
    assert budgets == [({"max_tokens"}, None), ({"max_completion_tokens"}, 64), ({"max_completion_tokens"}, 64)]


def test_other_refusals_of_max_tokens_fail_the_item_with_the_servers_message(fake):
    judge, script = fake([(400, {"error": {"message": "max_tokens must be at most 32"}}, {})], mode="generate",
                         max_new_tokens=64, max_retries=0)
    with judge:
        [r] = judge.score_items(image_items(1))
    assert r.score is None and r.error_kind == "api" and "max_tokens must be at most 32" in r.error
    assert len(script.seen) == 1 and "max_tokens" in script.seen[0][1]


def test_an_items_own_max_new_tokens_is_its_answer_budget(fake):
    # As in-process: metadata {"max_new_tokens": n} lowers that item's budget; a value outside
    # 1..max_new_tokens fails that item alone, naming the field, and is never sent.
    judge, script = fake([completion('{"score": 4}')], mode="generate", max_new_tokens=64, max_concurrency=1)
    items = image_items(3)
    items[0].metadata = {"max_new_tokens": 8}
    items[2].metadata = {"max_new_tokens": 500}
    with judge:
        results = judge.score_items(items)
    assert [r.score for r in results[:2]] == [4.0, 4.0]
    assert results[2].score is None and results[2].error_kind == "input"
    assert "metadata max_new_tokens must be a whole number in 1..64" in results[2].error
    assert sorted(body["max_tokens"] for _, body in script.seen) == [8, 64]


def test_a_served_answer_cut_off_inside_a_decimal_gives_no_score(fake):
    # "Score: 7" or "Score: 7." cut off by max_tokens (finish_reason "length") may be the start of
    # 7.5; both read 7. Now no score, as in-process; the same "Score: 7" ended by the judge is 7.
    judge, _ = fake([completion("Score: 7", finish_reason="length"), completion("Score: 7.", finish_reason="length"),
                     completion("Score: 7")], mode="generate", max_concurrency=1)
    with judge:
        cut, cut_dot, ended = judge.score_items(image_items(3))
    assert ended.score == 7.0 and ended.error is None
    for r, number in ((cut, "7"), (cut_dot, "7.")):
        assert r.score is None and r.error_kind == "parse", r
        assert f"cut off by max_new_tokens right after a number, which may be the start of a longer score (7 read, " \
               f"but its last number, {number}, may go on as 7.5, which reads 7.5)" in r.error, r.error


def test_logits_mode_reads_top_logprobs_and_fails_clearly_without_them(fake):
    top = [("7", math.log(0.6)), ("8", math.log(0.2)), ("x", math.log(0.1))] + [(str(d), -9.0) for d in (0, 1, 2, 3, 4, 5, 6, 9)]
    judge, script = fake([completion("7", top)], mode="logits")
    with judge:
        [r] = judge.score_items(image_items(1))
    p = [math.exp(-9.0)] * 8
    expected = (7 * 0.6 + 8 * 0.2 + sum(d * q for d, q in zip((0, 1, 2, 3, 4, 5, 6, 9), p))) / (0.8 + sum(p))
    assert r.score == pytest.approx(expected) and r.raw["quality"]["level_mass"] == pytest.approx(0.8 + sum(p), abs=1e-6)
    sent = script.seen[0][1]
    assert sent["max_tokens"] == 1 and sent["logprobs"] is True and sent["top_logprobs"] == 20

    for answer, message in ((completion("7"), "returned no logprobs"),
                            (completion("7", [("7", -0.1), ("a", -3.0)]), "returned only 2 of the 20 top_logprobs"),
                            (completion("a", [("a", -0.1)] * 20), "none of the levels")):
        judge, _ = fake([answer], mode="logits")
        with judge:
            results = judge.score_items(image_items(2))
        for r in results:
            assert r.score is None and r.error_kind == "logprobs" and message in r.error, r.error


def test_logits_prefix_templates_continue_the_answer(fake):
    top = [(" good", math.log(0.5)), (" fair", math.log(0.3)), ("good", math.log(0.1)), (" excellent", math.log(0.05))]
    top += [(f"t{k}", -12.0) for k in range(16)]
    judge, script = fake([completion(" good", top)], mode="logits", template="qalign_quality")
    with judge:
        [r] = judge.score_items(image_items(1))
    # levels are the prefix's next words, with their leading space; "good" without one is another token
    assert r.score == pytest.approx((4 * 0.5 + 3 * 0.3 + 5 * 0.05) / 0.85)
    assert r.raw["qalign_quality"]["levels_missing"] == ["poor", "bad"]
    sent = script.seen[0][1]
    assert sent["messages"][-1] == {"role": "assistant", "content": "The quality of the image is"}
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False


def test_raw_vocab_pieces_in_top_logprobs_are_read_as_their_text(fake):
    """vLLM 0.8-0.9's V1 engine returns top_logprobs tokens as raw vocabulary pieces (byte-level BPE
    "Ġgood" for " good", vllm-project/vllm#16838; SentencePiece "▁good"): the levels are those
    tokens all the same, so the score is the one their decoded text gives."""
    probs = [("good", 0.5), ("fair", 0.3), ("excellent", 0.05)]
    expected = (4 * 0.5 + 3 * 0.3 + 5 * 0.05) / 0.85
    for mark in ("Ġ", "▁"):
        top = [(mark + w, math.log(p)) for w, p in probs] + [("good", math.log(0.1))]
        top += [(f"t{k}", -12.0) for k in range(16)]
        judge, _ = fake([completion(mark + "good", top)], mode="logits", template="qalign_quality")
        with judge:
            [r] = judge.score_items(image_items(1))
        assert r.error is None and r.score == pytest.approx(expected), (mark, r.error)
        assert r.raw["qalign_quality"]["levels_missing"] == ["poor", "bad"]


def raw_completion(logprobs, content="7"):
    """A chat completion's JSON text as a server writes it: logprobs may be None (null; what
    orjson, as SGLang uses it, writes for -inf and NaN), NaN (Python's json writes NaN) or -9999.0
    (vLLM's floor for -inf)."""
    top = [{"token": t, "logprob": lp, "bytes": None} for t, lp in logprobs]
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "length",
              "logprobs": {"content": [{"token": logprobs[0][0], "logprob": logprobs[0][1], "bytes": None,
                                        "top_logprobs": top}]}}
    return 200, json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                            "choices": [choice]}), {}


def test_answers_a_server_really_sends_fail_only_their_item(fake):
    """Shapes real servers send on a 200: a level with no number (null, NaN), every level at
    vLLM's floor -9999 (zero probability), a proxy's HTML page, a body that is not JSON, an error
    body, a message that is null. Each fails its own item, named, with the cause; none gives a
    score (no NaN); the other items score. Before, most of these raised out of score_items and lost
    the whole call, and NaN logprobs gave the score NaN."""
    digits = [(str(d), math.log(0.1)) for d in range(10)] + [(f"x{k}", -9.0) for k in range(10)]
    good = raw_completion(digits)
    answers = [good,
               raw_completion([("7", None)] + [(f"x{k}", None) for k in range(19)]),  # every logprob null
               raw_completion([("7", float("nan"))] + [(f"x{k}", float("nan")) for k in range(19)]),
               raw_completion([("x", -0.01)] + [(str(d), -9999.0) for d in range(10)] + [(f"y{k}", -9999.0) for k in range(9)]),
               (200, "<html><body>Sign in to continue</body></html>", {"content-type": "text/html"}),
               (200, '{"id": "c", "choices": [', {}),
               (200, {"object": "error", "message": "CUDA out of memory", "code": 500}, {}),  # an error sent as 200
               good]
    judge, script = fake(answers, mode="logits", max_concurrency=1)  # one thread: request k is item k's
    with judge:
        results = judge.score_items(image_items(len(answers)))
    assert [r.id for r in results] == [f"i{k}" for k in range(len(answers))]
    assert [results[0].score, results[7].score] == pytest.approx([4.5, 4.5]) and results[0].error is None
    causes = {1: "no number", 2: "no number", 3: "no probability", 4: "not a JSON chat completion",
              5: "not a JSON chat completion", 6: "no choices: CUDA out of memory"}
    for k, cause in causes.items():
        r = results[k]
        assert r.score is None and r.error.startswith(f"item 'i{k}' (#{k}): quality: ") and cause in r.error, r.error
    assert "Sign in to continue" in results[4].error  # what the server said

    # one level's logprob null (orjson's -inf) beside real ones: that level has no probability
    top = [("7", math.log(0.6)), ("8", math.log(0.3)), ("3", None)] + [(str(d), -9999.0) for d in (0, 1, 2, 4, 5, 6, 9)]
    top += [(f"x{k}", -12.0) for k in range(10)]
    judge, _ = fake([raw_completion(top)], mode="logits")
    with judge:
        [r] = judge.score_items(image_items(1))
    assert r.error is None and r.score == pytest.approx((7 * 0.6 + 8 * 0.3) / 0.9)

    # generate mode: a null message (a content filter) or a refusal is an answer with no score
    null_message = {"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "message": None, "finish_reason": "content_filter"}]}
    refusal = {"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": None, "refusal": "I can't rate this image."},
         "finish_reason": "stop"}]}
    judge, _ = fake([completion('{"score": 6}'), (200, null_message, {}), (200, refusal, {}), completion('{"score": 2}')],
                    mode="generate", max_concurrency=1)
    with judge:
        results = judge.score_items(image_items(4))
    assert [r.score for r in results] == [6.0, None, None, 2.0]
    assert results[1].error.startswith("item 'i1' (#1): quality: ") and results[1].error_kind == "parse"
    assert results[2].raw == {"quality": "I can't rate this image."} and "I can't rate this image." in results[2].error


def test_refusals_fail_each_item_with_the_servers_message(fake):
    judge, script = fake([(400, {"error": {"message": "image too large for this model"}}, {})], mode="generate")
    with judge:
        results = judge.score_items(image_items(3))
    assert len(script.seen) == 3  # a 400 is not retried
    assert all(r.score is None and r.error_kind == "api" and "HTTP 400: image too large for this model" in r.error
               for r in results)
    judge, script = fake([(401, {"error": {"message": "bad key"}}, {})], mode="generate", max_concurrency=1)
    with judge:
        results = judge.score_items(image_items(4))
    assert len(script.seen) == 1  # the same for every request: the rest are not sent
    assert "HTTP 401: bad key" in results[0].error and all("HTTP 401: bad key" in r.error for r in results[1:])


def test_a_judge_dropped_without_close_leaves_no_thread(fake):
    import gc

    def judge_threads():
        return [t for t in threading.enumerate() if t.name.startswith("openai-judge-")]

    before = set(judge_threads())
    judge, _ = fake([completion('{"score": 3}')], mode="generate", max_concurrency=3)
    assert [r.score for r in judge.score_items(image_items(2))] == [3.0, 3.0]
    mine = [t for t in judge_threads() if t not in before]
    assert len(mine) == 3
    del judge  # never closed (a notebook cell run again builds another)
    gc.collect()
    for t in mine:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in mine), "an unclosed judge's threads outlive it"


def test_closing_during_a_call_in_another_thread_ends_that_call(fake):
    """close() from another thread while a call's first request is out and the rest queued: the
    call ends with JudgeUnavailable. close() cancelled the queued requests without telling the
    call's wait, which then waited forever."""
    from src.models.reward.errors import JudgeUnavailable

    judge, script = fake([completion('{"score": 3}')], mode="generate", max_concurrency=1)
    arrived, release = threading.Event(), threading.Event()
    answer = script.next

    def held(body):  # the first request's answer waits until the judge is closed
        arrived.set()
        release.wait(30)
        return answer(body)
    script.next = held
    out: dict = {}

    def call():
        try:
            out["r"] = judge.score_items(image_items(3))
        except Exception as e:
            out["r"] = e
    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    assert arrived.wait(30)
    judge.close()
    release.set()
    caller.join(30)
    assert not caller.is_alive(), "the call never returned after close()"
    assert isinstance(out["r"], JudgeUnavailable) and "closed" in str(out["r"]), repr(out["r"])
    with pytest.raises(JudgeUnavailable, match="closed"):
        judge.score_items(image_items(1))


def test_rate_limit_spaces_requests(fake):
    judge, script = fake([completion('{"score": 3}')], mode="generate", requests_per_minute=300, max_concurrency=4)
    with judge:
        results = judge.score_items(image_items(4))
    assert [r.score for r in results] == [3.0] * 4
    times = sorted(t for t, _ in script.seen)
    assert times[-1] - times[0] >= 3 * 0.2 - 0.05  # 300/min: one start every 0.2 s


def test_unreachable_server_fails_items_with_the_cause(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    items = image_items(2) + [ScoreItem(images=[str(tmp_path / "missing.png")], id="gone")]
    with build_reward_model({"class_path": "openai", "params": {
            "base_url": f"http://127.0.0.1:{port}/v1", "model": "m", "api_key_env": None, "mode": "generate",
            "max_retries": 2, "backoff_s": 0.0, "max_concurrency": 1}}) as judge:
        results = judge.score_items(items)
    for r in results[:2]:
        assert r.score is None and r.error_kind == "connection"
        assert "no answer after 3 attempt(s)" in r.error and "APIConnectionError" in r.error, r.error
    assert "not sent: an earlier request of this call failed" in results[1].error  # no second wait
    assert results[2].error_kind == "image" and "image not found" in results[2].error  # never sent


def test_config_errors_name_the_cause(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    base = {"base_url": "http://127.0.0.1:9/v1", "model": "m"}
    cases = [({"api_key_env": "NO_SUCH_KEY_VAR"}, "NO_SUCH_KEY_VAR is not set"),
             ({"api_key_env": None, "top_logprobs": 5}, "fewer than the 10 levels"),
             ({"api_key_env": None, "max_concurency": 2}, "Did you mean 'max_concurrency'"),
             ({"api_key_env": None, "base_url": "127.0.0.1:8000"}, "base_url: expected http"),
             ({"api_key_env": None, "mode": "generate", "num_samples": 3}, "needs temperature > 0")]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            build_reward_model({"class_path": "openai", "params": {**base, **extra}})
        assert str(info.value).startswith("Problem with class_path 'openai'")
