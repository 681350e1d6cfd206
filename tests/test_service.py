"""The HTTP reward service: a real `main.py serve` process with the tiny judge behind it, on a free
loopback port; a second, in-thread server for the loading and failed-load states."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import socket
import sys
import threading
import time

import httpx
import pytest

from conftest import call_in_thread, make_image
from service_proc import ROOT, ServiceProcess, ThreadServer
from src.models.reward import BaseRewardModel, JudgeError, ScoreItem, build_reward_model
from src.models.reward.implementations.remote import RemoteRewardModel, RemoteServiceError
from src.service.wire import data_url

sys.path.insert(0, str(ROOT / "scripts"))
from load_test import run_load, summary_line  # noqa: E402

TOKEN = "test-token-7f3a"
LIMIT = 400_000  # server.max_request_bytes for these tests


def png_bytes(seed: int, size: int = 56) -> bytes:
    buf = io.BytesIO()
    make_image(seed, size, size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    outside = tmp_path_factory.mktemp("outside")
    for i in range(3):
        (allowed / f"img{i}.png").write_bytes(png_bytes(i))
    (outside / "secret.png").write_bytes(png_bytes(9))
    (allowed / "link.png").symlink_to(outside / "secret.png")  # inside by name, outside in fact
    return allowed, outside


@pytest.fixture(scope="module")
def service(dirs, tiny_cache):
    allowed, _ = dirs
    svc = ServiceProcess([f"server.allowed_dirs=[{allowed}]", "server.token_env=SERVICE_TEST_TOKEN",
                          f"server.max_request_bytes={LIMIT}", "server.max_batch=16", "server.max_wait_ms=20"],
                         env={"SERVICE_TEST_TOKEN": TOKEN})
    svc.start()
    try:
        yield svc
    finally:
        rc = svc.stop()
    assert rc == 0, f"the service did not shut down cleanly (exit {rc}):\n{svc.log()}"
    assert "Application shutdown complete" in svc.log()


@pytest.fixture(scope="module")
def http(service):
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        yield c


def score(http, items, **extra):
    resp = http.post("/score", json={"items": items, **extra})
    assert resp.status_code == 200, resp.text
    return resp.json()


# -- endpoints ----------------------------------------------------------------------------

def test_health_reports_readiness_devices_and_counters(service, http):
    before = httpx.get(service.url + "/health").json()  # open without the token
    assert before["status"] == "ready" and before["ready"] is True
    assert before["model"] == "QwenVLRewardModel" and before["devices"] == ["cpu"]
    assert before["max_batch"] == 16 and len(before["fingerprint"]) == 16
    score(http, [{"images": [data_url(png_bytes(1))], "instruction": "a square"}] * 3)
    after = httpx.get(service.url + "/health").json()
    assert after["items_scored"] == before["items_scored"] + 3
    assert after["queue_depth"] == 0 and after["in_flight"] == 0


def test_score_keeps_order_ids_and_every_image_form(http, dirs):
    allowed, _ = dirs
    raw = (allowed / "img0.png").read_bytes()
    b64 = base64.b64encode(raw).decode()
    # DATA:...;BASE64, too: a URL's scheme is case-insensitive (it was read as a path, and refused).
    forms = [data_url(raw), b64, {"base64": b64}, str(allowed / "img0.png"), {"path": str(allowed / "img0.png")},
             "DATA:image/png;BASE64," + b64]
    items = [{"id": f"form{k}", "images": [f], "instruction": "a red square"} for k, f in enumerate(forms)]
    items.insert(2, {"id": "other", "images": data_url(png_bytes(5)), "instruction": "a red square",
                     "metadata": {"k": 1}})
    answer = score(http, items, request_id="req-1")
    assert answer["request_id"] == "req-1"
    results = answer["results"]
    assert [r["id"] for r in results] == [it["id"] for it in items]
    assert [r["index"] for r in results] == list(range(len(items)))
    assert all(r["error"] is None and 0.0 <= r["score"] <= 9.0 for r in results)
    assert results[2]["metadata"] == {"k": 1}
    same = [r["score"] for r in results if r["id"].startswith("form")]
    assert max(same) - min(same) < 1e-4, f"one image sent six ways must score the same: {same}"


def test_a_bad_image_fails_only_its_item(http, dirs):
    allowed, _ = dirs
    items = [{"id": "ok", "images": [data_url(png_bytes(2))], "instruction": "x"},
             {"id": "junk", "images": [{"base64": base64.b64encode(b"not an image at all").decode()}], "instruction": "x"},
             {"id": "missing", "images": [str(allowed / "nope.png")], "instruction": "x"},
             # bare base64 with no image signature: a bad image, not a path refused with 403
             {"id": "bare", "images": [base64.b64encode(b"not an image at all" * 4).decode()], "instruction": "x"}]
    results = score(http, items)["results"]
    assert results[0]["error"] is None and results[0]["score"] is not None
    assert results[1]["score"] is None and results[1]["error_kind"] == "image" and "'junk'" in results[1]["error"]
    assert results[2]["score"] is None and "image not found" in results[2]["error"]
    assert results[3]["score"] is None and results[3]["error_kind"] == "image" and "'bare'" in results[3]["error"]


def test_an_item_error_names_the_item_by_its_place_in_the_request(service, http, dirs):
    """The model is called with a batch of its own (requests joined, a large one split, RL samples
    without the malformed ones), and its errors number the items by their place in that batch:
    before, the 19th item of a 20-item request was 'item #2' (its place in the second call of 16)."""
    allowed, _ = dirs
    junk = {"base64": base64.b64encode(b"not an image at all").decode()}
    good = {"images": [str(allowed / "img0.png")], "instruction": "x"}
    items = [good] * 18 + [{"images": [junk]}, {"id": "x", "images": [junk]}]  # max_batch is 16
    results = score(http, items)["results"]
    assert [r["index"] for r in results] == list(range(20))
    assert results[18]["error"].startswith("item #18: ") and results[19]["error"].startswith("item 'x' (#19): ")
    # verl samples: the malformed one is not sent to the model, the unreadable image is sample 2
    answers = http.post("/compute_reward", json=[
        "not an object", {"solution_str": "a red square", "extra_info": {"image": str(allowed / "img0.png")}},
        {"solution_str": "a red square", "extra_info": {"image": "data:image/png;base64," + junk["base64"]}}]).json()
    assert answers[1]["score"] is not None and "#2" in answers[2]["error"] and "#1" not in answers[2]["error"]
    # the remote judge sends two items per request here: the fourth item is the second of a request
    with RemoteRewardModel(service.url, token=TOKEN, batch_size=2) as remote:
        got = remote.score_items([ScoreItem(images=[str(allowed / "img0.png")])] * 3 + [ScoreItem(images=[b"junk"])])
    assert got[3].error.startswith("item #3: "), got[3].error


def test_paths_outside_the_allowed_folders_are_refused(http, dirs):
    allowed, outside = dirs
    for path in [str(outside / "secret.png"), str(allowed / "link.png"), str(allowed / ".." / outside.name / "secret.png"),
                 "/etc/passwd"]:
        resp = http.post("/score", json={"items": [{"images": ["data:image/png;base64," + base64.b64encode(png_bytes(1)).decode()]},
                                                   {"id": "evil", "images": [path]}]})
        assert resp.status_code == 403, (path, resp.text)
        detail = resp.json()["detail"]
        assert repr(path) in detail and "outside the allowed folders" in detail and "item 1 (id 'evil')" in detail


def test_missing_or_wrong_token_is_401(service):
    body = {"items": [{"images": [data_url(png_bytes(1))]}]}
    for endpoint in ("/score", "/compute_reward", "/get_reward"):
        resp = httpx.post(service.url + endpoint, json=body)
        assert resp.status_code == 401 and "missing bearer token" in resp.json()["detail"]
        assert resp.headers["www-authenticate"] == "Bearer"
    resp = httpx.post(service.url + "/score", json=body, headers={"Authorization": "Bearer wrong"})
    assert resp.status_code == 401 and resp.json()["detail"] == "wrong bearer token"


@pytest.mark.parametrize("content, status, message", [
    (b"{\"items\": [", 400, "not valid JSON"),
    (b"", 400, "body is empty"),
    (b"[1, 2]", 422, "the body must be an object"),
    (b"{\"items\": 3}", 422, "'items': a list"),
    (b"{\"items\": [], \"extra\": 1}", 422, "unknown key(s) ['extra']"),
    (b"{\"items\": [{\"id\": \"a\"}]}", 422, "item 0 (id 'a'): missing 'images'"),
    (b"{\"items\": [{\"images\": [\"x.png\"], \"imgs\": 1}]}", 422, "item 0: unknown key(s) ['imgs']"),
    (b"{\"items\": [{\"images\": [5]}]}", 422, "item 0: images[0]: an image must be"),
    (b"{\"items\": [{\"images\": [\"data:image/png;base64,@@@@\"]}]}", 422, "images[0]: not valid base64"),
    # a PNG in URL-safe base64 (or cut short) is a broken image, not a path outside allowed_dirs
    (b"{\"items\": [{\"images\": [\"iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4-_P_PwAGhgKAnl4sQg\"]}]}",
     422, "images[0]: not valid base64"),
    (b"{\"items\": [{\"images\": [{\"url\": \"x\"}]}]}", 422, "an image object must be"),
    (b"{\"items\": [{\"images\": [], \"instruction\": 4}]}", 422, "'instruction' must be a string"),
    # the key that marks the OpenAI route's chat requests cannot be smuggled in through /score
    (b"{\"items\": [{\"images\": [], \"metadata\": {\"__chat_completion__\": {}}}]}", 422,
     "metadata key '__chat_completion__' is reserved"),
])
def test_malformed_bodies_get_clear_4xx(http, content, status, message):
    resp = http.post("/score", content=content, headers={"Content-Type": "application/json"})
    assert resp.status_code == status, resp.text
    assert message in resp.json()["detail"]


def test_oversized_bodies_get_413(http):
    big = {"items": [{"images": [{"base64": "A" * LIMIT}]}]}
    resp = http.post("/score", json=big)
    assert resp.status_code == 413 and "over the limit of 400000 bytes" in resp.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b" " * 50_000

    resp = http.post("/score", content=chunks())
    assert resp.status_code == 413


def test_compute_reward_takes_verl_bodies(http, dirs):
    allowed, outside = dirs
    image = str(allowed / "img1.png")
    one = http.post("/compute_reward", json={"data_source": "t2i", "solution_str": "a red square",
                                             "ground_truth": None, "extra_info": {"image": image, "index": 3}})
    assert one.status_code == 200, one.text
    single = one.json()
    assert 0.0 <= single["score"] <= 9.0 and single["error"] is None and single["id"] == "3"
    batch_body = [
        {"solution_str": "a red square", "extra_info": {"images": [data_url((allowed / "img1.png").read_bytes())]}},
        {"solution_str": "", "extra_info": {"image": image}},                      # nothing to judge
        {"solution_str": f"<image>{image}</image>", "ground_truth": "a red square",
         "extra_info": {"completion_as": "image"}},                                # the policy named its image
        {"solution_str": f"<image>{outside / 'secret.png'}</image>", "ground_truth": "a red square",
         "extra_info": {"completion_as": "image"}},                                # ...outside the folders
    ]
    batch = http.post("/compute_reward", json=batch_body).json()
    assert [b["score"] is not None for b in batch] == [True, False, True, False]
    assert math.isclose(batch[0]["score"], single["score"], abs_tol=1e-4)
    assert math.isclose(batch[2]["score"], single["score"], abs_tol=1e-4)  # same image, same text
    assert "completion is empty" in batch[1]["error"]
    assert "outside the allowed folders" in batch[3]["error"]  # the policy's output fails alone
    # An image the trainer's data names outside the folders is a configuration problem: 403 for a
    # single sample; in a batch that sample fails alone and the others are scored.
    refused = {"solution_str": "x", "extra_info": {"image": str(outside / "secret.png")}}
    resp = http.post("/compute_reward", json=refused)
    assert resp.status_code == 403
    mixed = http.post("/compute_reward", json=[refused, batch_body[0]])
    assert mixed.status_code == 200, mixed.text
    first, second = mixed.json()
    assert first["score"] is None and "outside the allowed folders" in first["error"] and "sample 0" in first["error"]
    assert math.isclose(second["score"], batch[0]["score"], abs_tol=1e-4)
    resp = http.post("/compute_reward", json={"solution_str": 5})
    assert resp.status_code == 422 and "'solution_str' must be a string" in resp.json()["detail"]


def test_get_reward_speaks_openrlhf(http, dirs):
    allowed, _ = dirs
    image = str(allowed / "img2.png")
    prompts = ["<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"] * 3
    responses = ["a red square<|im_end|>", "a blue circle", "a red square"]
    labels = [image, '{"image": "%s", "id": "j"}' % image, None]
    resp = http.post("/get_reward", json={"query": [p + r for p, r in zip(prompts, responses)],
                                          "prompts": prompts, "labels": labels})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert set(out) >= {"rewards", "scores", "extra_logs"}
    assert all(isinstance(r, float) for r in out["rewards"])
    assert out["extra_logs"]["judge_failed"] == [0.0, 0.0, 1.0]
    assert out["rewards"][2] == 0.0 and out["judge_scores"][2] is None  # failed_reward, flagged
    assert "no image to judge" in out["errors"][2]
    # The end-of-turn marker is not part of the judged text: response 0 scores as response 2's text would.
    again = http.post("/get_reward", json={"query": [prompts[0] + "a red square"], "prompts": prompts[:1],
                                           "labels": [image]}).json()
    assert math.isclose(again["rewards"][0], out["rewards"][0], abs_tol=1e-4)
    bad = http.post("/get_reward", json={"query": ["a"], "prompts": ["a", "b"]})
    assert bad.status_code == 422 and "'prompts' must be a list of 1 entries" in bad.json()["detail"]


# A judge class of the user's (class_path) whose results hold what the answer's JSON cannot carry,
# as such a class may return it: it scores an instruction by its length, and the first word of an
# instruction names the odd value its result gets.
_ODD_JUDGE = '''
import threading
from types import MappingProxyType

import numpy as np

from src.models.reward import BaseRewardModel, ScoreResult


class Touchy(ScoreResult):
    """A result whose error cannot be read."""

    def __getattribute__(self, name):
        if name == "error":
            raise RuntimeError("this result cannot be read")
        return super().__getattribute__(name)


class OddJudge(BaseRewardModel):
    def score_items(self, items):
        results = []
        for i, item in enumerate(items):
            text = item.instruction or ""
            n = float(len(text))
            r = ScoreResult(index=i, id=item.id, score=n, sub_scores={"length": n}, raw={"answer": text},
                            device="cpu", metadata=dict(item.metadata))
            odd = text.split()[0] if text else ""
            if odd == "lock":
                r.raw = {"answer": text, "lock": threading.Lock()}
            elif odd == "proxy":
                r.raw = MappingProxyType({"answer": text})
            elif odd == "object":
                r.metadata = {**r.metadata, "mine": object()}
            elif odd == "nan":
                r.sub_scores = {"length": float("nan")}
            elif odd == "inf":
                r.score = float("inf")
            elif odd == "nan-raw":
                r.raw = {"p": float("nan")}
            elif odd == "unsure":  # a score beside an error, and a `score` sub-score that is that score
                r.error, r.error_kind, r.sub_scores = "unsure", "low_confidence", {"length": n, "score": n}
            elif odd == "blank":
                r.error = ""
            elif odd == "unsure-lock":
                r.error, r.raw = "unsure", {"lock": threading.Lock()}
            elif odd == "array":  # 0-d arrays, as `probs @ levels` gives them
                r.score, r.sub_scores = np.array(n), {"length": np.array(n, dtype=np.float32)}
            elif odd == "array-1":
                r.score = np.array([n])
            elif odd == "error-int":
                r.score, r.error = None, 5
            elif odd == "error-dict":
                r.score, r.error = None, {"code": 3}
            elif odd == "kind-int":
                r.score, r.error, r.error_kind = None, "no answer", 7
            elif odd == "dict":  # no ScoreResult at all
                r = {"score": n}
            elif odd == "none":
                r = None
            elif odd == "touchy":
                r = Touchy(index=i, id=item.id, score=n)
            results.append(r)
        if any((it.instruction or "").startswith("drop") for it in items):  # one result too few for the call
            return results[:-1]
        return results
'''


@pytest.fixture(scope="module")
def odd_service(tmp_path_factory):
    """`main.py serve` with OddJudge (model.class_path, loaded from a folder on PYTHONPATH), and an
    image it may read; it must shut down cleanly, with no traceback in its log."""
    folder = tmp_path_factory.mktemp("odd")
    plugin = folder / "plugin"
    plugin.mkdir()
    (plugin / "odd_judge.py").write_text(_ODD_JUDGE)
    image = folder / "img.png"
    image.write_bytes(png_bytes(1))
    svc = ServiceProcess(["model.class_path=odd_judge.OddJudge", "model.params={}", f"server.allowed_dirs=[{folder}]"],
                         env={"PYTHONPATH": os.pathsep.join(filter(None, [str(plugin), os.environ.get("PYTHONPATH")]))})
    svc.start()
    try:
        with httpx.Client(base_url=svc.url, timeout=60) as http:
            yield http, str(image)
    finally:
        rc = svc.stop()
    assert rc == 0, svc.log()
    assert "Traceback" not in svc.log(), svc.log()


def test_a_judge_that_returns_too_few_results_fails_the_call_saying_so(odd_service):
    """A judge class of the user's that answers a call with one result too few: no result can be
    matched to its item, so the call fails whole (500), saying what the judge did and what a judge
    must do; the service goes on serving."""
    http, image = odd_service
    resp = http.post("/score", json={"items": [{"images": [image], "instruction": t} for t in ("drop me", "keep")]})
    assert resp.status_code == 500, resp.text
    assert resp.json()["detail"] == (
        "the reward model failed: JudgeError: the judge (OddJudge) returned 1 results for a call of 2 items; a judge "
        "returns one result per item, in order (BaseRewardModel.score_items)")
    assert odd_score(odd_service, ["after"])[0]["score"] == 5.0


def odd_score(odd_service, texts):
    """/score's results for items whose id is the first word of their instruction, `texts`."""
    http, image = odd_service
    resp = http.post("/score", json={"items": [{"id": t.split()[0], "images": [image], "instruction": t}
                                               for t in texts]})
    assert resp.status_code == 200, resp.text
    got = resp.json()["results"]
    assert [r["index"] for r in got] == list(range(len(texts)))
    assert [r["id"] for r in got] == [t.split()[0] for t in texts]
    return got


def failed_alone(got, texts, errors):
    """The items of `got` (OddJudge's answers to `texts`) that `errors` names, by index, failed
    (`model`, that error, no score or sub-score); the others kept their scores."""
    for k, r in enumerate(got):
        if k in errors:
            assert (r["score"], r["error_kind"], r["error"]) == (None, "model", errors[k]), r
            assert r["sub_scores"] == {"length": None}, r
        else:
            assert r["error"] is None and r["score"] == pytest.approx(len(texts[k])), r


def test_a_judge_classs_result_the_answer_cannot_carry_fails_only_its_item(odd_service):
    """A judge class of the user's whose result held what JSON cannot carry (a lock or a
    mappingproxy, which ScoreResult.to_dict's deep copy refused; an object; a NaN score, which
    JSON has no number for) made every route answer 500 for the whole request, losing the other
    items' scores. Now that item fails alone (error_kind `model`, its error naming the item, the
    field and what is there) in a 200 answer, as any other per-item failure; a NaN in its raw
    answer is written as null and noted, and the item keeps its score."""
    http, image = odd_service
    texts = ["fine one", "lock two", "proxy three", "object four", "nan five", "inf six", "nan-raw seven",
             "fine eight"]
    got = odd_score(odd_service, texts)
    cannot = "item {!r} (#{}): the judge (OddJudge) returned {}, which JSON cannot hold: the item is failed; " \
             "a judge's result holds numbers, text, lists and dicts"
    errors = {1: cannot.format("lock", 1, "raw.lock (a lock)"),
              2: cannot.format("proxy", 2, "raw (a mappingproxy)"),
              3: cannot.format("object", 3, "metadata.mine (a object)"),
              4: "item 'nan' (#4): the judge (OddJudge) returned sub-score 'length' nan: not a finite number, "
                 "so no score",
              5: "item 'inf' (#5): the judge (OddJudge) returned score inf: not a finite number, so no score"}
    failed_alone(got, texts, errors)
    assert got[1]["raw"] == {"answer": "lock two", "lock": None}
    assert got[3]["metadata"] == {"mine": None}
    assert got[6]["raw"] == {"p": None}
    assert got[6]["metadata"] == {"notes": ["raw.p was NaN, which JSON cannot hold: written as null"]}

    # verl's and OpenRLHF's routes answer the same way.
    verl = http.post("/compute_reward", json=[{"solution_str": t, "extra_info": {"image": image}}
                                              for t in ("lock a", "fine b")])
    assert verl.status_code == 200, verl.text
    locked, fine = verl.json()
    assert locked["score"] is None and locked["error"] == cannot.format(None, 0, "raw.lock (a lock)").replace(
        "item None (#0)", "item #0"), locked
    assert fine["error"] is None and fine["score"] == pytest.approx(6.0)
    openrlhf = http.post("/get_reward", json={"query": ["inf c", "fine d"], "labels": [image] * 2})
    assert openrlhf.status_code == 200, openrlhf.text
    out = openrlhf.json()
    assert out["judge_scores"][0] is None and out["judge_scores"][1] == pytest.approx(6.0)
    assert out["rewards"] == [0.0, pytest.approx(6.0)] and out["extra_logs"]["judge_failed"] == [1.0, 0.0]
    assert out["errors"] == ["item #0: the judge (OddJudge) returned score inf: not a finite number, so no score",
                             None]


def test_a_judge_classs_score_beside_an_error_is_answered_as_a_failed_item_with_no_score(odd_service):
    """A judge class of the user's whose result held a score and an error was answered with both:
    a trainer took the score of an item its judge said had failed (the job counts such an item as
    failed, and writes no score for it). Now the item is answered as failed, with no score: the
    judge's error and error_kind stand, and the error names the score withheld; a `score`
    sub-score, which is that score, is withheld too. If the result also holds what JSON cannot
    carry, the item fails `model` with both causes. A 0-d array as the score or a sub-score is read
    as its number, as the job reads it; an array of one element is no number."""
    http, image = odd_service
    texts = ["fine one", "unsure two", "blank three", "unsure-lock four", "array five", "array-1 six", "fine seven"]
    got = odd_score(odd_service, texts)
    withheld = "the judge (OddJudge) {} a score, {}, which is not sent because the item failed"
    assert (got[1]["score"], got[1]["error_kind"], got[1]["error"]) == (
        None, "low_confidence", "unsure; " + withheld.format("also returned", 10.0)), got[1]
    assert got[1]["sub_scores"] == {"length": pytest.approx(10.0), "score": None}, got[1]
    assert (got[2]["score"], got[2]["error_kind"], got[2]["error"]) == (
        None, None, "item 'blank' (#2): " + withheld.format("returned an empty error, and", 11.0)), got[2]
    assert got[2]["sub_scores"] == {"length": pytest.approx(11.0)}, got[2]
    assert (got[3]["score"], got[3]["error_kind"], got[3]["error"]) == (
        None, "model", "unsure; " + withheld.format("also returned", 16.0) + "; the judge (OddJudge) returned "
        "raw.lock (a lock), which JSON cannot hold: the item is failed; a judge's result holds numbers, text, lists "
        "and dicts"), got[3]
    assert (got[4]["error"], got[4]["score"], got[4]["sub_scores"]) == (
        None, pytest.approx(10.0), {"length": pytest.approx(10.0)}), got[4]
    assert (got[5]["score"], got[5]["error_kind"], got[5]["error"]) == (
        None, "model", "item 'array-1' (#5): the judge (OddJudge) returned score array([11.]): not a finite "
        "number, so no score"), got[5]
    for k in (0, 6):
        assert got[k]["error"] is None and got[k]["score"] == pytest.approx(len(texts[k])), got[k]

    # verl's and OpenRLHF's routes: no score, the item flagged as failed.
    verl = http.post("/compute_reward", json=[{"solution_str": t, "extra_info": {"image": image}}
                                              for t in ("unsure a", "fine b")])
    assert verl.status_code == 200, verl.text
    unsure, fine = verl.json()
    assert (unsure["score"], unsure["error"]) == (None, "unsure; " + withheld.format("also returned", 8.0)), unsure
    assert fine["error"] is None and fine["score"] == pytest.approx(6.0)
    openrlhf = http.post("/get_reward", json={"query": ["unsure c", "array d"], "labels": [image] * 2})
    assert openrlhf.status_code == 200, openrlhf.text
    out = openrlhf.json()
    assert out["judge_scores"] == [None, pytest.approx(7.0)] and out["rewards"] == [0.0, pytest.approx(7.0)]
    assert out["extra_logs"]["judge_failed"] == [1.0, 0.0]
    assert out["errors"] == ["unsure; " + withheld.format("also returned", 8.0), None]


def test_a_judge_classs_error_that_is_no_text_fails_only_its_item_in_a_request_split_over_calls(odd_service):
    """A request of more items than max_batch is split over model calls, and the batcher renames
    the errors of a later call's items by their place in the request (types.renumber). A judge
    class of the user's whose error was no text (a number, a dict) raised there, in the batcher's
    thread, which died: that request and every later one went unanswered. Now the item fails alone,
    with the job's message for it (result_form.error_problem); so does an error_kind of no text.
    The other items keep their scores, and the next request is served."""
    http, _ = odd_service
    n = http.get("/health").json()["max_batch"]
    texts = [f"fine {k}" for k in range(n)] + ["error-int a", "error-dict b", "kind-int c", "fine d"]
    got = odd_score(odd_service, texts)
    cannot = "item {!r} (#{}): the judge (OddJudge) returned a result the service cannot send: {}; the item is failed"
    errors = {n: cannot.format("error-int", n, "error must be text, got int 5"),
              n + 1: cannot.format("error-dict", n + 1, "error must be text, got dict {'code': 3}"),
              n + 2: cannot.format("kind-int", n + 2, "error_kind must be text, got int 7")}
    failed_alone(got, texts, errors)
    again = odd_score(odd_service, ["fine again", "error-int e"])
    assert again[0]["score"] == pytest.approx(10.0) and again[1]["error"] == cannot.format(
        "error-int", 1, "error must be text, got int 5"), again


def test_a_judge_classs_value_that_is_no_score_result_fails_only_its_item(odd_service):
    """A judge class of the user's that put a dict or None in its list of results: the batcher's
    thread raised handing it back (types.renumber read its error) and died, so that request and
    every later one went unanswered. Now that item fails alone, naming what came, in a request of
    one call or one split over several; the next request is served."""
    http, _ = odd_service
    n = http.get("/health").json()["max_batch"]
    came = "item {!r} (#{}): the judge (OddJudge) returned {} for it, not a ScoreResult; the item is failed"
    for texts in (["dict b", "fine a", "none c"], [f"fine {k}" for k in range(n)] + ["dict d", "fine e", "none f"]):
        got = odd_score(odd_service, texts)
        k = len(texts) - 3
        errors = {k: came.format("dict", k, f"dict {{'score': {float(len(texts[k]))}}}"),
                  k + 2: came.format("none", k + 2, "NoneType None")}
        for j, r in enumerate(got):
            if j in errors:
                assert (r["score"], r["error_kind"], r["error"]) == (None, "model", errors[j]), r
            else:
                assert r["error"] is None and r["score"] == pytest.approx(len(texts[j])), r
    assert odd_score(odd_service, ["fine again"])[0]["score"] == pytest.approx(10.0)
    # A result that raises as it is handed back fails its request (500, saying why), not the
    # batcher's thread: the next request is served.
    resp = http.post("/score", json={"items": [{"id": t.split()[0], "images": [odd_service[1]], "instruction": t}
                                               for t in ("fine g", "touchy h")]})
    assert resp.status_code == 500 and "RuntimeError: this result cannot be read" in resp.text, resp.text
    assert odd_score(odd_service, ["fine again"])[0]["score"] == pytest.approx(10.0)


# -- the client -----------------------------------------------------------------------------

def test_remote_reward_model_is_a_drop_in_judge(service, dirs, tmp_path, monkeypatch):
    allowed, _ = dirs
    from PIL import Image

    pil = Image.open(allowed / "img0.png")
    monkeypatch.setenv("REWARD_SERVICE_TOKEN", TOKEN)
    spec = {"class_path": "remote", "params": {"url": service.url, "batch_size": 2, "timeout_s": 120}}
    with build_reward_model(spec) as remote:
        items = [ScoreItem(images=[pil], instruction="a red square", id="pil"),
                 ScoreItem(images=[(allowed / "img0.png").read_bytes()], instruction="a red square", id="bytes"),
                 ScoreItem(images=[str(allowed / "img0.png")], instruction="a red square", id="path"),
                 ScoreItem(images=[str(tmp_path / "absent.png")], instruction="a red square", id="absent"),
                 ScoreItem(images=[str(allowed / "img1.png")], instruction="a red square", id="other")]
        results = remote.batch_score(items)
        assert [r.index for r in results] == list(range(5)) and [r.id for r in results] == [i.id for i in items]
        assert results[3].score is None and results[3].error_kind == "image" and "absent.png" in results[3].error
        scored = [results[k].score for k in (0, 1, 2)]
        assert max(scored) - min(scored) < 1e-4
        assert remote.fingerprint == httpx.get(service.url + "/health").json()["fingerprint"]
        assert remote.quantization == "none"  # how the served judge loaded its weights (a job's summary.json)
    # send_paths: the service reads the file itself, and scores it the same.
    with RemoteRewardModel(service.url, token=TOKEN, send_paths=True) as by_path:
        r = by_path.score(ScoreItem(images=[str(allowed / "img0.png")], instruction="a red square"))
        assert math.isclose(r.score, scored[0], abs_tol=1e-4)
        # a path the service refuses (403) fails its own item, as the local judge fails a bad path
        outside = by_path.score_items([ScoreItem(images=[str(allowed / "img0.png")], instruction="a red square"),
                                       ScoreItem(images=[str(tmp_path)], id="out")])
        assert math.isclose(outside[0].score, scored[0], abs_tol=1e-4)
        assert outside[1].score is None and outside[1].error_kind == "input"
        assert "'out' (#1)" in outside[1].error and "outside the allowed folders" in outside[1].error


def test_remote_one_item_the_service_or_json_refuses_fails_alone(service, dirs):
    """Before, one such item made score_items raise for the whole call (a 422 refuses the request;
    a NaN or numpy value in metadata failed the JSON encoding of the whole body), where the local
    judge scores the others. Each now fails alone, named, and the others keep their places."""
    import numpy as np

    allowed, _ = dirs
    good = str(allowed / "img1.png")

    def item(k: str, **kw) -> ScoreItem:
        return ScoreItem(**{"images": [good], "instruction": "a red square", "id": k, **kw})

    items = [item("g0"), item("bad-b64", images=["data:image/png;base64,@@@"]), item("g1"),
             item("nan", metadata={"weight": float("nan")}), item("np", metadata={"k": np.float32(1.5)}),
             item("long", instruction="a " * 40_000), item("g2")]
    with RemoteRewardModel(service.url, token=TOKEN, batch_size=8, max_retries=0) as remote:
        results = remote.score_items(items)
    assert [r.index for r in results] == list(range(len(items))) and [r.id for r in results] == [i.id for i in items]
    scores = [results[k].score for k in (0, 2, 6)]
    assert None not in scores and max(scores) - min(scores) < 1e-4
    expected = {1: "not valid base64", 3: "metadata key 'weight'", 4: "metadata key 'k'",
                5: "the instruction is 80000 characters, over the limit of 65536"}
    for k, text in expected.items():
        r = results[k]
        assert r.score is None and r.error_kind == "input" and text in r.error, (k, r.error)
        assert r.error.startswith(f"item {items[k].id!r} (#{k}): "), r.error  # named as the caller numbers it


def test_remote_images_that_are_no_image_files_fail_alone_without_being_read(service, dirs, tmp_path):
    """A path to a device, a FIFO or a folder, an empty file or one too large to send: each item
    fails alone, named, before a byte is read or sent. /dev/zero had been read whole into memory
    until the process was killed (22 GB; the in-process judge refuses it as an empty file)."""
    from src.models.reward.wire import MAX_INLINE_BYTES

    allowed, _ = dirs
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    (tmp_path / "empty.png").write_bytes(b"")
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(MAX_INLINE_BYTES + 1)  # sparse: no disk
    paths = {"zero": "/dev/zero", "fifo": str(fifo), "folder": str(tmp_path), "empty": str(tmp_path / "empty.png"),
             "huge": str(huge)}
    items = [ScoreItem(images=[str(allowed / "img1.png")], id="good")] + [
        ScoreItem(images=[p], id=k) for k, p in paths.items()]
    with RemoteRewardModel(service.url, token=TOKEN, max_retries=0) as remote:
        results = remote.score_items(items)
    assert results[0].error is None and results[0].score is not None
    expected = {"zero": "cannot read image /dev/zero: not a regular file", "fifo": "not a regular file",
                "folder": "not a regular file", "empty": "image file is empty",
                "huge": f"is over {MAX_INLINE_BYTES // 2 ** 20} MiB, more than a request to the service carries"}
    for r in results[1:]:
        assert r.score is None and r.error_kind == "image" and expected[r.id] in r.error, (r.id, r.error)


def test_remote_splits_a_request_over_the_size_limit(service, monkeypatch):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    # Noise does not compress: each PNG is ~150 kB, so six of them are far over the 400 kB limit.
    images = [Image.fromarray((rng.random((224, 224, 3)) * 255).astype("uint8")) for _ in range(6)]
    with RemoteRewardModel(service.url, token=TOKEN, batch_size=6) as remote:
        results = remote.batch_score(images, instructions=["noise"] * 6)
    assert [r.error for r in results] == [None] * 6 and [r.index for r in results] == list(range(6))


def test_remote_retries_then_names_the_cause():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with RemoteRewardModel(f"http://127.0.0.1:{port}", max_retries=2, backoff_s=0.05, timeout_s=5) as remote:
        with pytest.raises(RemoteServiceError, match=r"no success after 3 attempt\(s\); last: ConnectError"):
            remote.batch_score([b"x"])
        assert remote.health()["status"] == "unreachable"
    assert time.monotonic() - t0 < 10


@contextlib.contextmanager
def plain_http_server(handler):
    """A standard-library HTTP server with `handler` on a free loopback port, in a thread: its URL."""
    import http.server

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


def test_remote_retries_an_answer_cut_off_mid_body():
    # The client's transport reads answers through httpcore itself (remote.py's _SocketsTransport):
    # a connection that drops inside an answer's body must reach the client as httpx's
    # RemoteProtocolError, a TransportError it retries as a restarting service, not as httpcore's.
    import http.server

    seen: list[str] = []

    class CutsTheFirst(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            body = json.dumps({"status": "ready", "ready": True}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body if len(seen) > 1 else body[:10])  # then the connection closes

        def log_message(self, *args):
            pass

    with plain_http_server(CutsTheFirst) as url, RemoteRewardModel(url, token_env=None, backoff_s=0.01) as remote:
        assert remote.request("GET", "/health") == {"status": "ready", "ready": True}
    assert seen == ["/health", "/health"]


def test_remote_names_an_answer_that_is_not_json():
    # A URL that reaches something other than the service (a proxy's login page, another server)
    # answers 200 with HTML: the call raised a bare JSONDecodeError, outside the judge's errors.
    import http.server

    class Page(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b"<html>sign in</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with plain_http_server(Page) as url, RemoteRewardModel(url, token_env=None) as remote:
        with pytest.raises(RemoteServiceError) as e:
            remote.batch_score([png_bytes(1)])
    assert "HTTP 200 with a body that is not JSON (text/html: '<html>sign in</html>'); is" in str(e.value)
    assert isinstance(e.value, JudgeError)


# -- loading states (an in-thread server) ---------------------------------------------------

def test_503_while_loading_then_ready(service):
    from src.service.server import create_app

    gate = threading.Event()
    built: list[RemoteRewardModel] = []

    def factory():
        gate.wait(60)
        # The hosted model is itself remote (the tiny judge of the `service` process): the service
        # hosts any BaseRewardModel.
        built.append(RemoteRewardModel(service.url, token=TOKEN))
        return built[0]

    app = create_app(factory, {"max_batch": 4})
    with ThreadServer(app) as srv:
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        resp = httpx.post(srv.url + "/score", json={"items": []})
        assert resp.status_code == 503 and "still loading" in resp.json()["detail"]
        assert resp.headers["retry-after"] == "5"
        # A call made while the model loads waits as the 503's Retry-After asks (5 s), not its own
        # 0.01 s backoff, which spent its two retries in a blink and raised: the call rides out a
        # service (re)starting. The model becomes ready 1 s into the call.
        with RemoteRewardModel(srv.url, token_env=None, max_retries=2, backoff_s=0.01) as client:
            threading.Timer(1.0, gate.set).start()
            t0 = time.monotonic()
            r = client.score(ScoreItem(images=[png_bytes(3)], instruction="a red square"))
            assert time.monotonic() - t0 >= 5.0, "the second attempt came before the service's Retry-After"
        assert r.error is None and 0 <= r.score <= 9
    assert built[0]._closed, "the app closes a model it built"


class _HeldJudge(BaseRewardModel):
    """A judge whose first call waits for `release`: what is queued behind it stays queued until
    the test says so. It scores with the tiny judge of the `service` process."""

    def __init__(self, inner: BaseRewardModel):
        self.inner, self.calls = inner, []
        self.first_call, self.release = threading.Event(), threading.Event()

    def score_items(self, items):
        self.calls.append([it.id for it in items])
        self.first_call.set()
        assert self.release.wait(120)
        return self.inner.score_items(items)

    def close(self) -> None:
        self.inner.close()


def wait_for(what, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.05)
    return value


def test_a_request_whose_client_left_leaves_the_queue(service):
    """A client that closes its connection while its items wait (a trainer's timeout, a Ctrl-C):
    before, its items stayed queued and the judge scored them for nobody, and a client that retried
    after a timeout doubled the queue. Now they leave it; items already in a model call finish."""
    from src.service.server import create_app

    judge = _HeldJudge(RemoteRewardModel(service.url, token=TOKEN))
    item = {"images": [data_url(png_bytes(1))], "instruction": "a red square"}
    with ThreadServer(create_app(judge, {"max_batch": 2, "max_wait_ms": 0})) as srv, \
            contextlib.ExitStack() as on_exit:
        on_exit.callback(judge.release.set)  # a failed check must not leave the judge held
        health = lambda: httpx.get(srv.url + "/health").json()  # noqa: E731
        first: list[httpx.Response] = []
        held = threading.Thread(target=lambda: first.append(httpx.post(
            srv.url + "/score", json={"items": [{**item, "id": "first"}]}, timeout=120)))
        held.start()
        assert judge.first_call.wait(60)  # the model is busy with "first"
        body = json.dumps({"items": [{**item, "id": f"gone{k}"} for k in range(6)]}).encode()
        host, port = srv.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_for("the 6 items queued", lambda: health()["queue_depth"] == 6)
        wait_for("the closed request left the queue", lambda: health()["queue_depth"] == 0)
        judge.release.set()
        held.join(120)
        assert first[0].status_code == 200 and first[0].json()["results"][0]["score"] is not None
        wait_for("the judge idle", lambda: health()["in_flight"] == 0)
        assert judge.calls == [["first"]], judge.calls  # nothing scored for the client that left
        after = httpx.post(srv.url + "/score", json={"items": [{**item, "id": "next"}]}, timeout=120)
        assert after.status_code == 200 and judge.calls[-1] == ["next"]


def test_closing_the_remote_judge_during_a_call_in_another_thread(service):
    """close() from another thread while a call's request waits for the service: the call ends
    with JudgeUnavailable, as every judge's does, at once, while the service still holds the
    request. It raised httpx's bare RuntimeError ('Cannot send a request, as the client has been
    closed'), outside the judge's errors; and close() closed the socket the request waited on, so
    the request waited on for the service's answer (or, once a socket opened since took the closed
    one's number, on that socket, up to timeout_s: the test failed 2 runs in 12)."""
    from src.models.reward.errors import JudgeUnavailable
    from src.service.server import create_app

    judge = _HeldJudge(RemoteRewardModel(service.url, token=TOKEN))
    items = [ScoreItem(images=[png_bytes(k)], id=f"i{k}") for k in range(3)]
    with ThreadServer(create_app(judge, {"max_batch": 1, "max_wait_ms": 0})) as srv, \
            contextlib.ExitStack() as on_exit:
        on_exit.callback(judge.release.set)  # a failed check must not leave the judge held
        client = RemoteRewardModel(srv.url, token_env=None, batch_size=1, backoff_s=0.01)
        caller, out = call_in_thread(client.score_items, items)
        assert judge.first_call.wait(60)  # the first request is being scored, and held there
        client.close()
        caller.join(60)  # the service holds the request for 120 s: only close() can end the call
        assert not caller.is_alive()
        assert isinstance(out["result"], JudgeUnavailable) and "closed" in str(out["result"]), repr(out["result"])
        judge.release.set()


def test_the_batcher_serves_on_after_every_waiting_request_was_cancelled(service):
    """A call gathering company (max_wait) whose only request is cancelled meanwhile: the
    batcher must go back to waiting, not read the empty queue as 'closed and drained' and stop
    (then no request was ever answered again)."""
    from src.service.batcher import MicroBatcher

    with RemoteRewardModel(service.url, token=TOKEN) as judge:
        batcher = MicroBatcher(judge.score_items, max_batch=8, max_wait_s=1.0)
        try:
            item = ScoreItem(images=[png_bytes(1)], instruction="a red square", id="later")
            gone = batcher.submit([item])
            time.sleep(0.3)  # the batcher gathers company for it (up to 1 s)
            batcher.cancel(gone)  # and is left with nothing
            time.sleep(1.2)  # past its max_wait (these sleeps only make the old failure show)
            assert batcher.submit([item]).result(60)[0].score is not None
        finally:
            batcher.close()


def test_a_model_that_fails_to_load_is_reported():
    from src.service.server import create_app

    errors: list[str] = []

    def factory():
        raise RuntimeError("checkpoint /models/x is missing")

    with ThreadServer(create_app(factory, None, on_load_error=errors.append)) as srv:
        deadline = time.monotonic() + 10
        while not errors and time.monotonic() < deadline:
            time.sleep(0.02)
        health = httpx.get(srv.url + "/health").json()
        assert health["status"] == "failed" and "checkpoint /models/x is missing" in health["error"]
        resp = httpx.post(srv.url + "/score", json={"items": []})
        assert resp.status_code == 500 and "failed to load: RuntimeError" in resp.json()["detail"]
        with RemoteRewardModel(srv.url, token_env=None) as client:
            with pytest.raises(RemoteServiceError, match="failed to load"):
                client.wait_ready(5)


def test_serve_exits_nonzero_when_the_model_cannot_load():
    # The hosted model is a remote judge whose own service never answers: it fails to load
    # within a second, without the cost of importing torch.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    svc = ServiceProcess(["model.class_path=remote", f"model.params={{url: '{dead}', wait_ready_s: 0.5}}"])
    svc.start(wait_ready=False)
    deadline = time.monotonic() + 60
    while svc.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    rc = svc.stop()
    assert rc == 1 and "error: the reward model failed to load: RemoteServiceError" in svc.log(), svc.log()
    assert "not ready after" in svc.log()


def test_serve_config_errors_are_named_before_loading(tmp_path):
    import subprocess

    for override, message in [("server.prot=1", "server: unknown key 'prot'. Did you mean 'port'?"),
                              ("server.max_batch=0", "server.max_batch: must be at least 1"),
                              ("server.token_env=NOT_SET_ANYWHERE_42", "NOT_SET_ANYWHERE_42"),
                              ("model.params.batch_sise=2", "Did you mean 'batch_size'?"),
                              # not the background load's failure (exit 1) but the config's error
                              ("model.params.device=gpu", "parameter device: expected 'auto' (the first CUDA GPU, "
                                                          "else the CPU), 'cpu', 'cuda', 'cuda:N' or a GPU index N, "
                                                          "got 'gpu'"),
                              ("job.output_dir=/tmp/x", "a 'job' section is for a scoring job: run it with "
                                                        "`main.py run --config ...`")]:
        out = subprocess.run([sys.executable, "main.py", "serve", "--config", "configs/server.yaml", "--set", override],
                             cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "NOT_SET_ANYWHERE_42"})
        assert out.returncode == 2 and message in out.stderr, (override, out.stderr)


# -- load -----------------------------------------------------------------------------------

def test_load_16_clients_400_requests(service):
    before = httpx.get(service.url + "/health").json()
    t0 = time.monotonic()
    stats = run_load(service.url, clients=16, requests=400, token=TOKEN, timeout_s=150)
    print("\nload test:", summary_line(stats))
    assert time.monotonic() - t0 < 150
    assert stats["problems"] == [] and stats["lost"] == [] and stats["answered_twice"] == []
    assert stats["answered"] == 400 and stats["unknown_ids"] == []
    after = httpx.get(service.url + "/health").json()
    assert after["items_scored"] - before["items_scored"] == stats["items"]
    assert after["batches"] - before["batches"] < 400, "concurrent requests must share model calls"
    # Batching must not mix answers up: a few requests re-sent alone get the scores they got under load.
    from load_test import default_image, request_body

    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        for n in (0, 1, 7, 200, 399):
            alone = [r["score"] for r in c.post("/score", json=request_body(n, default_image())).json()["results"]]
            assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(alone, stats["scores"][f"r{n}"])), n


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU: auto picks it")
def test_a_service_with_device_auto_reports_the_device_it_chose(tiny_cache):
    """`model.params.device: auto` in the service's config: /health and each result name the
    device it settled on (the CPU of this GPU-less machine), never `auto`."""
    svc = ServiceProcess(["model.params.device=auto"])
    svc.start()
    try:
        health = httpx.get(svc.url + "/health").json()
        assert health["model"] == "QwenVLRewardModel" and health["devices"] == ["cpu"], health
        results = httpx.post(svc.url + "/score", timeout=120, json={"items": [
            {"images": [data_url(png_bytes(k))], "instruction": "a red square"} for k in range(3)]}).json()["results"]
        assert [r["index"] for r in results] == [0, 1, 2]
        assert all(r["error"] is None and r["score"] is not None and r["device"] == "cpu" for r in results), results
    finally:
        rc = svc.stop()
    assert rc == 0, svc.log()


def test_serving_the_multi_gpu_judge_and_stopping_its_workers(tiny_cache):
    """The usual production shape: the service hosts the worker pool (CPU workers here); /health
    counts live workers, and SIGTERM leaves no worker process behind."""
    from conftest import assert_no_orphans, worker_processes

    svc = ServiceProcess(["model.class_path=multi_gpu",
                          "model.params={model_name: 'tiny:qwen2_vl', template: alignment, device_ids: [cpu],"
                          " progress: false, batch_size: 4}"])
    svc.start()
    try:
        health = httpx.get(svc.url + "/health").json()
        assert health["model"] == "MultiGPURewardModel" and health["devices"] == ["cpu#0"]
        assert health["workers"] == 1 and health["workers_alive"] == 1
        results = httpx.post(svc.url + "/score", timeout=120, json={"items": [
            {"images": [data_url(png_bytes(k))], "instruction": "a red square"} for k in range(5)]}).json()["results"]
        assert [r["index"] for r in results] == list(range(5))
        assert all(r["error"] is None and r["device"] == "cpu#0" for r in results)
        workers = set(worker_processes([svc.proc.pid]))  # the service process owns the pool
        assert len(workers) == 1
    finally:
        rc = svc.stop()
    assert rc == 0, svc.log()
    assert_no_orphans(list(workers))
