"""The service against hostile and odd requests: a real `main.py serve` process (tiny judge, CPU) on
loopback, real files, raw sockets where a client misbehaves below HTTP. Every case is refused with
4xx naming the cause before anything is scored, or answered in full; never a 5xx; the service stays
healthy. Each case is recorded in the fault ledger (conftest.py) and printed in its table.
"""
from __future__ import annotations

import io
import json
import socket

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_image
from service_proc import ServiceProcess
from src.service.wire import data_url

TOKEN = "hardening-token-31"
MAX_ITEMS = 40
MAX_PIXELS = 200_000  # per request; one 56x56 image is 3,136
READ_TIMEOUT_S = 1.5
MAX_TEXT = 5000


def png(seed: int, w: int = 56, h: int = 56) -> bytes:
    buf = io.BytesIO()
    make_image(seed, w, h).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    d = tmp_path_factory.mktemp("allowed")
    (d / "a.png").write_bytes(png(1))
    from PIL import Image

    Image.new("1", (1000, 1000)).save(d / "wide_1mp.png")  # 1 MP, a few KB: over MAX_PIXELS alone
    return d


@pytest.fixture(scope="module")
def service(allowed, tiny_cache):
    svc = ServiceProcess([f"server.allowed_dirs=[{allowed}]", "server.token_env=HARDENING_TOKEN",
                          "server.max_batch=4", "server.max_wait_ms=5", f"server.max_items={MAX_ITEMS}",
                          f"server.max_request_pixels={MAX_PIXELS}", f"server.read_timeout_s={READ_TIMEOUT_S}",
                          "server.max_request_bytes=4000000", f"server.max_text_chars={MAX_TEXT}"],
                         env={"HARDENING_TOKEN": TOKEN})
    svc.start()
    try:
        yield svc
    finally:
        rc = svc.stop()
    assert rc == 0, svc.log()
    assert "Traceback" not in svc.log(), svc.log()


@pytest.fixture(scope="module")
def http(service):
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        yield c


@pytest.fixture(autouse=True)
def still_healthy(service):
    yield
    health = httpx.get(service.url + "/health", timeout=30).json()
    assert health["ready"] and health["queue_depth"] == 0, health


def good_item(k: int = 0) -> dict:
    return {"id": f"g{k}", "images": [data_url(png(k))], "instruction": "a red square"}


def send(http, path: str, content: bytes):
    return http.post(path, content=content, headers={"Content-Type": "application/json"})


def refused(ledger, case: str, resp, status: int, text: str) -> None:
    if resp.headers.get("content-type", "").startswith("application/json"):
        body = resp.json()  # this service's {"detail"}, or OpenAI's {"error": {"message"}} at /v1
        detail = body.get("detail") or (body.get("error") or {}).get("message", "")
    else:
        detail = resp.text
    ledger.request(case, resp.status_code, str(detail))
    assert resp.status_code == status, (case, resp.status_code, resp.text[:500])
    assert text in str(detail), (case, detail)


# -- 2. what used to be 500 -------------------------------------------------------------------

def deep(n: int, leaf: str = "1", kind: str = "list") -> str:
    return ("[" * n + leaf + "]" * n) if kind == "list" else ('{"a":' * n + leaf + "}" * n)


REFUSED = [
    # (case, endpoint, body, status, text in the detail)
    ("NUL byte in an image path", "/score",
     lambda d: json.dumps({"items": [{"images": [str(d / "a.png") + "\x00.txt"]}]}), 422, "contains a NUL byte"),
    ("array nested 100,000 deep", "/score", lambda d: deep(100_000), 400, "nested too deeply"),
    ("metadata nested 1,000 deep", "/score",
     lambda d: '{"items": [{"images": [], "metadata": ' + deep(1000, kind="obj") + "}]}", 400, "nested too deeply"),
    ("request_id nested 1,000 deep", "/score",
     lambda d: '{"items": [], "request_id": ' + deep(1000) + "}", 400, "nested too deeply"),
    ("metadata nested 40 deep (parses, not answerable)", "/score",
     lambda d: '{"items": [{"images": [], "metadata": ' + deep(40, kind="obj") + "}]}", 422,
     "items[0].metadata.a.a"),
    ("5,000-digit integer id", "/score",
     lambda d: '{"items": [{"id": ' + "9" * 5000 + ', "images": []}]}', 400, "too many digits"),
    ("request_id NaN", "/score", lambda d: '{"items": [], "request_id": NaN}', 400, "NaN is not a JSON number"),
    ("metadata value 1e999 (infinite)", "/score",
     lambda d: '{"items": [{"images": [], "metadata": {"x": 1e999}}]}', 422, "not finite"),
    ("id holding a lone surrogate", "/score",
     lambda d: '{"items": [{"id": "\\ud800", "images": []}]}', 422, "lone UTF-16 surrogate"),
    ("request_id holding a lone surrogate", "/score",
     lambda d: '{"items": [], "request_id": "x\\udfff"}', 422, "lone UTF-16 surrogate"),
    ("invalid UTF-8 in the body", "/score", lambda d: b'{"items": [], "request_id": "\xff\xfe"}', 400, "not UTF-8"),
    ("verl body nested 1,000 deep", "/compute_reward", lambda d: deep(1000), 400, "nested too deeply"),
    ("OpenRLHF label nested 1,000 deep", "/get_reward",
     lambda d: '{"query": ["a"], "labels": [' + deep(1000) + "]}", 400, "nested too deeply"),
    # a role that is no string was looked up as a key: unhashable, 500
    ("chat message whose role is a list", "/v1/chat/completions",
     lambda d: json.dumps({"model": "x", "messages": [{"role": ["user"], "content": "hi"}]}), 400,
     "messages[0]: role ['user'] is not supported; known: system, developer, user, assistant"),
    ("chat message whose role is an object", "/v1/chat/completions",
     lambda d: json.dumps({"model": "x", "messages": [{"role": {"name": "user"}, "content": "hi"}]}), 400,
     "messages[0]: role {'name': 'user'} is not supported"),
    # 4. per-request limits
    (f"{MAX_ITEMS + 1} items (max_items {MAX_ITEMS})", "/score",
     lambda d: json.dumps({"items": [{"images": []}] * (MAX_ITEMS + 1)}), 413, "server.max_items"),
    (f"{MAX_ITEMS + 1} verl samples", "/compute_reward",
     lambda d: json.dumps([{"solution_str": "x"}] * (MAX_ITEMS + 1)), 413, "server.max_items"),
    (f"{MAX_ITEMS + 1} OpenRLHF queries", "/get_reward",
     lambda d: json.dumps({"query": ["x"] * (MAX_ITEMS + 1)}), 413, "server.max_items"),
    ("1 MP image over max_request_pixels (by path)", "/score",
     lambda d: json.dumps({"items": [{"images": [str(d / "wide_1mp.png")]}]}), 413, "1000000 pixels"),
    ("65 images summing over max_request_pixels", "/score",
     lambda d: json.dumps({"items": [{"images": [str(d / "a.png")] * 33}, {"images": [str(d / "a.png")] * 32}]}),
     413, "server.max_request_pixels"),
    ("instruction of 200,000 characters", "/score",
     lambda d: json.dumps({"items": [{"id": "long", "images": [str(d / "a.png")], "instruction": "a " * 100_000}]}),
     422, "item 0 (id 'long'): the instruction is 200000 characters, over the limit of 5000 (server.max_text_chars)"),
    # 2,000 images of 1 pixel each in one item (236 kB): before, the judge decoded and encoded
    # every one (20,000 held it for 65 s, every other request waiting) before refusing the prompt
    ("item with 2,000 one-pixel images", "/score",
     lambda d: json.dumps({"items": [{"id": "many", "images": [data_url(png(1, 1, 1))] * 2000}]}), 422,
     "item 0 (id 'many'): 2000 images, over the limit of 64 per item"),
    ("verl sample with 100 images", "/compute_reward",
     lambda d: json.dumps({"solution_str": "x", "extra_info": {"images": [data_url(png(1, 1, 1))] * 100}}), 422,
     "sample 0: 100 images, over the limit of 64 per item"),
    ("verl samples summing over max_request_pixels", "/compute_reward",
     lambda d: json.dumps([{"solution_str": "x", "extra_info": {"image": str(d / "wide_1mp.png")}}]), 413,
     "server.max_request_pixels"),
]


@pytest.mark.parametrize("case, endpoint, body, status, text", REFUSED, ids=[c[0] for c in REFUSED])
def test_hostile_bodies_are_refused_before_scoring_with_4xx(service, http, allowed, ledger, case, endpoint, body,
                                                            status, text):
    before = httpx.get(service.url + "/health").json()
    content = body(allowed)
    resp = send(http, endpoint, content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    refused(ledger, case, resp, status, text)
    after = httpx.get(service.url + "/health").json()
    assert after["items_scored"] == before["items_scored"], "refused before anything was scored"


def test_accepted_ids_and_metadata_come_back_intact(http, ledger):
    """What validation lets through is answerable: odd but valid values round-trip."""
    items = [{"id": "x\u0000y \U0001F600", "images": [data_url(png(2))], "instruction": "nul \u0000 inside",
              "metadata": {"deep": json.loads(deep(20, kind="obj")), "big": 10 ** 300, "neg": -0.0}},
             {"id": 12345678901234567890, "images": [data_url(png(3))]}]
    resp = http.post("/score", json={"items": items, "request_id": [1, {"a": None}]})
    ledger.request("odd but valid ids, metadata, request_id", resp.status_code, "answered",
                   items=len(items), answered=len(resp.json().get("results", [])))
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["request_id"] == [1, {"a": None}]
    assert [r["id"] for r in out["results"]] == ["x\u0000y \U0001F600", "12345678901234567890"]
    assert out["results"][0]["metadata"]["big"] == 10 ** 300
    assert all((r["score"] is None) != (r["error"] is None) for r in out["results"])


# -- 3. one bad RL sample fails alone -------------------------------------------------------

def test_one_bad_verl_sample_fails_alone(http, allowed, ledger):
    good = {"solution_str": "a red square", "extra_info": {"image": str(allowed / "a.png")}}
    samples = [good,
               {"solution_str": str(allowed / "a.png") + "\x00", "extra_info": {"completion_as": "image"}},
               "not an object",
               {"solution_str": 5},
               {"solution_str": "x", "extra_info": {"image": str(allowed / "a.png"), "instruction": 7,
                                                    "completion_as": "image"}},
               {"solution_str": "/nowhere/x.png", "extra_info": {"completion_as": "image"}},
               {"solution_str": "a red square " * 1000, "extra_info": {"image": str(allowed / "a.png")}},
               good]
    resp = http.post("/compute_reward", json=samples)
    answers = resp.json()
    ledger.request("verl batch: NUL completion + 5 other bad samples", resp.status_code,
                   "; ".join((a.get("error") or "scored")[:40] for a in answers), items=len(samples),
                   answered=sum((a["score"] is None) != (a["error"] is None) for a in answers))
    assert resp.status_code == 200, resp.text
    assert len(answers) == len(samples)
    assert answers[0]["score"] is not None and answers[-1]["score"] == pytest.approx(answers[0]["score"], abs=1e-4)
    expected = {1: "contains a NUL byte", 2: "expected an object", 3: "'solution_str' must be a string",
                4: "instruction must be a string", 5: "outside the allowed folders",
                6: "the instruction is 12999 characters, over the limit of 5000"}
    for i, text in expected.items():
        err = answers[i]["error"]
        assert answers[i]["score"] is None and text in err, (i, err)
        assert err.startswith(f"sample {i}: ") and err.count(f"sample {i}:") == 1, err  # one prefix, not two


def test_a_path_too_long_for_the_file_system_fails_its_item_alone(http, allowed, ledger):
    """A path inside the allowed folder whose name the OS refuses (ENAMETOOLONG): before, its
    stat() escaped the header read of the pixel limit and the whole request got 500."""
    too_long = str(allowed / ("a" * 300 + ".png"))
    items = [good_item(1), {"id": "long", "images": [too_long], "instruction": "a red square"}, good_item(2)]
    resp = http.post("/score", json={"items": items})
    ledger.request("path whose name is over the OS limit (255 bytes)", resp.status_code,
                   resp.text[:80] if resp.status_code != 200 else resp.json()["results"][1]["error"],
                   items=len(items), answered=len(resp.json().get("results", [])) if resp.status_code == 200 else 0)
    assert resp.status_code == 200, resp.text[:300]
    results = resp.json()["results"]
    assert results[0]["score"] is not None and results[2]["score"] is not None
    assert results[1]["score"] is None and results[1]["error_kind"] == "image"
    assert "'long'" in results[1]["error"] and "File name too long" in results[1]["error"]


def test_a_single_bad_verl_body_is_still_422(http):
    resp = http.post("/compute_reward", json={"solution_str": 5})
    assert resp.status_code == 422 and "'solution_str' must be a string" in resp.json()["detail"]


def test_one_bad_openrlhf_sample_fails_alone(http, allowed, ledger):
    labels = [str(allowed / "a.png"), str(allowed / "a.png") + "\x00", json.dumps({"image": 5}),
              '{"a":' * 3000 + "1" + "}" * 3000, str(allowed / "a.png")]
    resp = http.post("/get_reward", json={"query": ["a red square"] * len(labels), "labels": labels})
    out = resp.json()
    ledger.request("OpenRLHF batch: NUL label, 3000-deep JSON label, ...", resp.status_code,
                   "; ".join((e or "scored")[:40] for e in out.get("errors", [])), items=len(labels),
                   answered=sum(r is not None or e is not None for r, e in zip(out["judge_scores"], out["errors"])))
    assert resp.status_code == 200, resp.text
    assert out["judge_scores"][0] is not None and out["judge_scores"][4] is not None
    assert out["extra_logs"]["judge_failed"] == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert "contains a NUL byte" in out["errors"][1]
    assert "must be a path, data URL or base64 string" in out["errors"][2]
    assert out["errors"][3].startswith("sample 3: the label's JSON cannot be read (nested too deeply")
    assert out["errors"][3].count("sample 3:") == 1


# -- 5. slow and stalled clients ------------------------------------------------------------

def raw_request(url: str, head: bytes, body: bytes, wait_s: float = 30.0) -> bytes:
    """Send headers and part of a body on a raw socket, then read until the server closes (a
    server that holds the connection past `wait_s` fails the test)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        s.sendall(head + body)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except socket.timeout:
            raise AssertionError(f"the server held the connection open for {wait_s} s") from None
        return b"".join(chunks)


def test_a_body_shorter_than_its_content_length_times_out_with_408(service, ledger):
    head = (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 10\r\n\r\n")
    answer = raw_request(service.url, head, b"{}")
    status_line, _, rest = answer.partition(b"\r\n")
    detail = json.loads(rest.split(b"\r\n\r\n", 1)[1])["detail"] if b"\r\n\r\n" in rest else ""
    ledger.request("Content-Length 10, 2 bytes sent, then silence", int(status_line.split()[1]), detail)
    assert status_line.startswith(b"HTTP/1.1 408"), answer[:300]
    assert "did not arrive within 1.5 s" in detail and "2 bytes received of the 10 announced" in detail


def test_a_trickling_client_is_cut_off_at_the_deadline(service, ledger):
    """Chunks every 0.4 s: never idle for long, but the whole body has a deadline."""
    host, port = service.url.removeprefix("http://").split(":")
    body = json.dumps({"items": []}).encode() + b" " * 100
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
                  + TOKEN.encode() + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        answer = b""
        for k in range(len(body)):
            try:
                s.sendall(body[k:k + 1])
            except OSError:
                break  # closed by the server after its 408
            s.settimeout(0.4)
            try:
                answer += s.recv(65536)
            except socket.timeout:
                continue
            if answer:
                break
        s.settimeout(30)
        while b"\r\n\r\n" not in answer and (more := s.recv(65536)):
            answer += more
    ledger.request("client trickling 1 byte per 0.4 s", int(answer.split()[1]), answer.split(b"\r\n")[0].decode())
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]


def test_a_client_stalling_in_its_headers_is_disconnected(service, ledger):
    """One byte of a request line, then silence: before, the connection was held open for good."""
    answer = raw_request(service.url, b"P", b"")
    ledger.request("1 byte of a request line, then silence", 0, f"connection closed, {len(answer)} bytes answered")
    assert answer == b""  # closed by the server without an answer
    # and a keep-alive connection gets the same deadline for its next request's headers
    host, port = service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        while b"ready" not in first:
            first += s.recv(65536)
        s.sendall(b"GET /hea")
        rest = b""
        try:
            while chunk := s.recv(65536):
                rest += chunk
        except socket.timeout:
            raise AssertionError("the server held a keep-alive connection with half a request line") from None
    assert rest == b""


# -- 7. the API description and the token ---------------------------------------------------

def test_no_api_description_is_served_token_or_not(service, http, ledger):
    for path in ("/docs", "/redoc", "/openapi.json"):
        for client_headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
            resp = httpx.get(service.url + path, headers=client_headers)
            assert resp.status_code == 404, (path, resp.status_code)
    ledger.request("/docs, /redoc, /openapi.json (with and without token)", 404, "not served")
    assert httpx.get(service.url + "/health").status_code == 200  # still open to supervisors


# -- 4. fair sharing: the scheduling order, checked without any clock ------------------------

def test_a_one_item_request_rides_the_next_call_while_a_large_one_is_split(allowed, tiny_cache):
    """The real tiny judge behind the batcher; the first call is held until the small request is
    queued, so what is checked is the order of calls, not how long anything took. (The latency
    figure under load is measured by scripts/fair_share.py; see the README.)"""
    import threading

    from src.models.reward import ScoreItem, build_reward_model
    from src.service.batcher import MicroBatcher

    model = build_reward_model({"class_path": "qwen_vl", "params": {
        "model_name": "tiny:qwen2_vl", "device": "cpu", "template": "alignment", "progress": False}})
    calls: list[list[str]] = []
    first_call, release = threading.Event(), threading.Event()

    def score(items):
        calls.append([it.id for it in items])
        if len(calls) == 1:
            first_call.set()
            assert release.wait(120)
        return model.score_items(items)

    def items(prefix: str, n: int) -> list[ScoreItem]:
        return [ScoreItem(images=[str(allowed / "a.png")], instruction=f"a red square {prefix}{k}", id=f"{prefix}{k}")
                for k in range(n)]

    batcher = MicroBatcher(score, max_batch=4, max_wait_s=0.0)
    try:
        big = batcher.submit(items("big", 30))
        assert first_call.wait(120)
        small = batcher.submit(items("small", 1))
        medium = batcher.submit(items("mid", 3))
        release.set()
        small_results, medium_results, big_results = small.result(300), medium.result(300), big.result(300)
    finally:
        release.set()
        batcher.close()
    assert calls[0] == ["big0", "big1", "big2", "big3"]
    assert "small0" in calls[1] and "mid0" in calls[1], calls[:3]  # the very next call, beside the big one
    assert all(len(c) <= 4 for c in calls) and sum(map(len, calls)) == 34
    # every request gets its own results, in its own order, as if scored alone
    for got, sent in ((big_results, items("big", 30)), (small_results, items("small", 1)),
                      (medium_results, items("mid", 3))):
        assert [r.id for r in got] == [it.id for it in sent] and [r.index for r in got] == list(range(len(sent)))
        alone = model.score_items(sent)
        assert [r.score for r in got] == pytest.approx([r.score for r in alone], abs=1e-4)
    model.close()


# -- property-based: generated bodies at every endpoint --------------------------------------

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                    HealthCheck.function_scoped_fixture])
_TEXT = st.text(st.characters(exclude_categories=()), max_size=12)  # lone surrogates and NUL included
_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=10 ** 20),
                  st.floats(allow_nan=True, allow_infinity=True), _TEXT)
_JSON = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
                     max_leaves=8)


def _scorable_refs(allowed):
    """Image references the service accepts: good ones, and ones that fail as their item's error."""
    return st.sampled_from([data_url(png(7)), str(allowed / "a.png"), {"path": str(allowed / "a.png")},
                            str(allowed / "missing.png"), {"base64": "aGVsbG8gd29ybGQ="},
                            "data:image/png;base64,iVBORw0KGgo="])


def _refs(allowed):
    """Image references a client might send: those above, and ones that refuse the request."""
    return _scorable_refs(allowed) | st.sampled_from(["/etc/passwd", str(allowed / "a.png") + "\x00",
                                                      "data:image/png;base64,@@", ""])


def _images(allowed):
    one = _refs(allowed) | _JSON
    return one | st.lists(one, max_size=2)


_CLEAN_TEXT = st.text(max_size=20)  # valid Unicode: the items the service must score
_SIMPLE = st.dictionaries(_CLEAN_TEXT, st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                                                             allow_infinity=False)
                          | _CLEAN_TEXT, max_size=3)


def _post(http, endpoint: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        content = body
    else:
        content = json.dumps(body, allow_nan=True).encode()  # NaN/Infinity tokens on purpose
    return http.post(endpoint, content=content, headers={"Content-Type": "application/json"})


def _check_answer(ledger, endpoint: str, body, resp) -> None:
    assert resp.status_code < 500, (endpoint, resp.status_code, resp.text[:500])
    items = answered = 0
    if resp.status_code == 200:
        out = resp.json()
        if endpoint == "/score":
            items = len(body["items"])
            results = out["results"]
            assert [r["index"] for r in results] == list(range(items))
            for r, it in zip(results, body["items"]):
                assert r["id"] == (None if it.get("id") is None else str(it["id"]))
        elif endpoint == "/compute_reward":
            results = [out] if isinstance(body, dict) else out
            items = 1 if isinstance(body, dict) else len(body)
        else:
            items = len(body["query"])
            results = [{"score": s, "error": e} for s, e in zip(out["judge_scores"], out["errors"])]
            assert len(out["rewards"]) == items
        answered = sum((r["score"] is None) != (r["error"] is None) for r in results)
        assert answered == len(results) == items, out  # each accepted item answered once: a score or an error
    ledger.generated_body(endpoint, resp.status_code, items, answered)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_generated_score_bodies_never_get_5xx(http, allowed, ledger, data):
    item = st.fixed_dictionaries({"images": _images(allowed)}, optional={
        "id": _JSON, "instruction": _TEXT | _JSON, "metadata": _JSON, "source_images": _images(allowed)})
    scorable = _scorable_refs(allowed)
    plausible = st.fixed_dictionaries({"images": scorable | st.lists(scorable, max_size=2)}, optional={
        "id": _CLEAN_TEXT | st.integers(), "instruction": _CLEAN_TEXT, "metadata": _SIMPLE})
    body = data.draw(st.one_of(
        st.fixed_dictionaries({"items": st.lists(plausible, max_size=3)}, optional={"request_id": _CLEAN_TEXT}),
        st.fixed_dictionaries({"items": st.lists(item, max_size=3)}, optional={"request_id": _JSON}),
        st.fixed_dictionaries({"items": st.lists(item | _JSON, max_size=3)}), _JSON, st.binary(max_size=64)))
    _check_answer(ledger, "/score", body, _post(http, "/score", body))


@PROPERTY_SETTINGS
@given(data=st.data())
def test_generated_verl_bodies_never_get_5xx(http, allowed, ledger, data):
    extra = st.fixed_dictionaries({}, optional={
        "image": _images(allowed), "images": _images(allowed), "source_image": _images(allowed),
        "completion_as": st.sampled_from(["image", "instruction", "other"]) | _JSON,
        "instruction": _TEXT | _JSON, "id": _JSON})
    sample = st.fixed_dictionaries({"solution_str": st.sampled_from(["a red square", str(allowed / "a.png")]) | _TEXT
                                    | _JSON},
                                   optional={"data_source": _JSON, "ground_truth": _JSON, "extra_info": extra | _JSON})
    body = data.draw(st.one_of(sample, st.lists(sample | _JSON, max_size=3), _JSON, st.binary(max_size=64)))
    _check_answer(ledger, "/compute_reward", body, _post(http, "/compute_reward", body))


@PROPERTY_SETTINGS
@given(data=st.data())
def test_generated_openrlhf_bodies_never_get_5xx(http, allowed, ledger, data):
    n = data.draw(st.integers(0, 3))
    label = (_images(allowed) | _JSON
             | st.builds(lambda d: json.dumps(d, allow_nan=True),
                         st.fixed_dictionaries({}, optional={"image": _images(allowed), "instruction": _JSON,
                                                             "id": _JSON})))
    body = data.draw(st.one_of(
        st.fixed_dictionaries({"query": st.lists(st.sampled_from(["a red square"]) | _TEXT, min_size=n, max_size=n)},
                              optional={"prompts": st.lists(_TEXT, min_size=n, max_size=n) | _JSON,
                                        "labels": st.lists(label, min_size=n, max_size=n) | _JSON}),
        _JSON, st.binary(max_size=64)))
    _check_answer(ledger, "/get_reward", body, _post(http, "/get_reward", body))


def _chat_urls(allowed):
    return st.sampled_from([data_url(png(7)), str(allowed / "a.png"), "file://" + str(allowed / "a.png"),
                            str(allowed / "missing.png"), "/etc/passwd", "https://example.com/a.png",
                            "data:image/png;base64,@@", "data:image/png;base64,iVBORw0KGgo=", ""])


@PROPERTY_SETTINGS
@given(data=st.data())
def test_generated_chat_bodies_never_get_5xx(http, allowed, ledger, data):
    url = _chat_urls(allowed)
    image = st.fixed_dictionaries({"type": st.just("image_url"),
                                   "image_url": st.fixed_dictionaries({"url": url | _JSON}) | url | _JSON})
    text = st.fixed_dictionaries({"type": st.just("text"), "text": _CLEAN_TEXT | _JSON})
    role = st.sampled_from(["system", "developer", "user", "assistant", "tool"]) | _JSON
    message = st.fixed_dictionaries({"role": role, "content": _CLEAN_TEXT | st.lists(image | text | _JSON, max_size=3)
                                     | _JSON}, optional={"name": _JSON, "tool_calls": _JSON})
    plausible = st.fixed_dictionaries(
        {"model": st.just("x"), "messages": st.lists(st.fixed_dictionaries(
            {"role": st.just("user"), "content": st.lists(image | text, min_size=1, max_size=2)}), min_size=1, max_size=2)},
        optional={"max_tokens": st.integers(1, 4), "temperature": st.sampled_from([0, 0.7]), "n": st.integers(1, 2),
                  "logprobs": st.booleans(), "seed": st.integers(0, 3)})
    hostile = st.fixed_dictionaries(
        {"model": st.just("x") | _JSON, "messages": st.lists(message | _JSON, max_size=3) | _JSON},
        optional={"max_tokens": st.integers(-1, 4) | _JSON, "max_completion_tokens": _JSON,
                  "temperature": st.floats(-1, 3) | _JSON, "top_p": _JSON, "n": st.integers(0, 3) | _JSON,
                  "seed": _JSON, "logprobs": _JSON, "top_logprobs": st.integers(-1, 30) | _JSON,
                  "continue_final_message": _JSON, "add_generation_prompt": _JSON, "stream": _JSON, "stop": _JSON})
    body = data.draw(st.one_of(plausible, hostile, _JSON, st.binary(max_size=64)))
    resp = _post(http, "/v1/chat/completions", body)
    assert resp.status_code < 500, (body, resp.status_code, resp.text[:500])
    answered = 0
    if resp.status_code == 200:
        choices = resp.json()["choices"]
        assert len(choices) == body.get("n", 1) and all(isinstance(c["message"]["content"], str) for c in choices)
        answered = 1
    ledger.generated_body("/v1/chat/completions", resp.status_code, answered, answered)


def test_after_the_generated_bodies_the_service_is_healthy_and_nothing_was_lost(service, http, ledger):
    health = httpx.get(service.url + "/health").json()
    assert health["ready"] and health["queue_depth"] == 0 and health["in_flight"] == 0
    assert score_ok(http)
    assert ledger.five_xx() == 0 and ledger.lost() == 0


def score_ok(http) -> bool:
    resp = http.post("/score", json={"items": [good_item(1)]})
    return resp.status_code == 200 and resp.json()["results"][0]["score"] is not None
