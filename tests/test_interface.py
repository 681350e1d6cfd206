"""The BaseRewardModel contract and its call shapes, on the real single-device judge."""
from __future__ import annotations

import pytest

from src.models.reward import BaseRewardModel, ScoreItem, ScoreResult
from src.models.reward.errors import JudgeConfigError, JudgeError, JudgeInputError, JudgeUnavailable
from src.models.reward.implementations.local import QwenVLRewardModel
from src.models.reward.types import as_items


@pytest.fixture(scope="module")
def edit_judge(tiny_cache):
    with QwenVLRewardModel(model_name="tiny:qwen2_5_vl", template="edit", batch_size=4) as j:
        yield j


def test_interface_is_small():
    assert BaseRewardModel.__abstractmethods__ == frozenset({"score_items"})
    with pytest.raises(TypeError):
        BaseRewardModel()  # abstract


def test_editing_call_shape_equals_items(edit_judge, image_files):
    edited, sources = image_files[:5], image_files[5:10]
    instructions = [f"make object {i} green" for i in range(5)]
    a = edit_judge.batch_score(edited, original_images=sources, instructions=instructions)
    b = edit_judge.batch_score([ScoreItem(images=[e], source_images=[s], instruction=t, id=str(i))
                                for i, (e, s, t) in enumerate(zip(edited, sources, instructions))])
    assert [r.score for r in a] == pytest.approx([r.score for r in b], abs=1e-6)
    assert [r.index for r in a] == list(range(5)) and [r.id for r in b] == ["0", "1", "2", "3", "4"]
    one = edit_judge.score(edited[2], original_image=sources[2], instruction=instructions[2])
    assert one.score == pytest.approx(a[2].score, abs=1e-4)
    assert isinstance(one, ScoreResult) and one.sub_scores.keys() == {"semantic_consistency", "perceptual_quality"}


def test_several_images_per_item(edit_judge, image_files):
    two = edit_judge.score(ScoreItem(images=image_files[:2], source_images=image_files[2:4], instruction="x"))
    assert two.error is None and two.score is not None


def test_call_shape_errors():
    with pytest.raises(JudgeInputError, match="instructions has 2 entries but there are 3 images"):
        as_items(["a", "b", "c"], instructions=["x", "y"])
    with pytest.raises(JudgeInputError, match="original_images has 1 entries"):
        as_items(["a", "b"], original_images=["s"])


def test_mixed_inputs_are_refused(edit_judge, image_files):
    with pytest.raises(JudgeInputError, match="mix of ScoreItems and plain images"):
        edit_judge.batch_score([ScoreItem(images=[image_files[0]]), image_files[1]])
    with pytest.raises(JudgeInputError, match="only with plain images"):
        edit_judge.batch_score([ScoreItem(images=[image_files[0]])], instructions=["x"])
    assert edit_judge.batch_score([]) == []


def test_result_round_trips_through_json():
    r = ScoreResult(index=3, id="a", score=None, sub_scores={"x": None}, raw={"x": "junk"}, error="item 'a': bad",
                    error_kind="parse", device="cuda:1", latency_s=0.5, metadata={"category": "c"})
    assert ScoreResult.from_dict(r.to_dict()) == r
    assert not r.ok
    item = ScoreItem(images="a.png", source_images="b.png", instruction="t", id="1", metadata={"k": 1})
    assert item.images == ["a.png"] and item.source_images == ["b.png"]
    assert ScoreItem.from_dict(item.to_dict()) == item


def test_a_result_holding_what_does_not_copy_still_has_its_dict_form():
    """ScoreResult.to_dict was dataclasses.asdict, which deep-copies every value: a lock, a
    mappingproxy or a generator that a judge class of the user's put in a result raised TypeError
    ('cannot pickle ...') there, in whatever carried the result on. Now its dicts, lists and tuples
    are new and plain values shared; a value that does not copy is itself in the dict, for the form
    that carries it on to name (result_form.py); one that copies (a set) is still a copy. Changing
    the dict, however deep, leaves the result as it was."""
    import threading
    from dataclasses import dataclass
    from types import MappingProxyType

    @dataclass
    class Answer:
        text: str
        votes: list

    lock, view, tags = threading.Lock(), MappingProxyType({"a": 1}), {"x"}
    answers = (a for a in "ab")
    r = ScoreResult(index=0, id="a", score=7.0, sub_scores={"x": 7.0},
                    raw={"lock": lock, "answers": answers, "deep": {"list": [1, {"k": [2]}]},
                         "pair": (1, [2]), "answer": Answer("seven", [7])},
                    metadata={"view": view, "tags": tags})
    d = r.to_dict()
    assert d["raw"]["lock"] is lock and d["raw"]["answers"] is answers and d["metadata"]["view"] is view
    assert d["metadata"]["tags"] == {"x"} and d["metadata"]["tags"] is not tags
    assert d["raw"]["answer"] == {"text": "seven", "votes": [7]}  # a dataclass inside: the dict of its fields
    assert d["raw"]["pair"] == (1, [2]) and d["score"] == 7.0 and d["index"] == 0
    d["sub_scores"]["x"] = 0.0
    d["raw"]["deep"]["list"][1]["k"].append(3)
    d["raw"]["pair"][1].append(3)
    d["raw"]["answer"]["votes"].append(8)
    d["metadata"]["tags"].add("y")
    assert r.sub_scores == {"x": 7.0} and r.raw["deep"] == {"list": [1, {"k": [2]}]} and r.raw["pair"] == (1, [2])
    assert r.raw["answer"].votes == [7] and r.metadata["tags"] == {"x"}
    looped = {"n": 1}
    looped["self"] = looped  # asdict's recursion never ended on a dict that holds itself
    copied = ScoreResult(index=0, raw=looped).to_dict()["raw"]
    assert copied["self"] is copied and copied is not looped and copied["n"] == 1


# Each class built directly (as the README's Python API shows), not through build_reward_model:
# the parameters that fail before anything starts (no model, no worker, no actor, no request).
DIRECT = [
    ("local", "src.models.reward.implementations.local", "QwenVLRewardModel",
     {"model_name": "tiny:judge", "device": "cpu"}),
    ("multi_gpu", "src.models.reward.implementations.multi_gpu", "MultiGPURewardModel",
     {"model_name": "tiny:judge", "device_ids": ["cpu"]}),
    ("remote", "src.models.reward.implementations.remote", "RemoteRewardModel", {"url": "http://127.0.0.1:9"}),
    ("openai", "src.models.reward.implementations.openai_api", "OpenAIRewardModel",
     {"model": "judge", "base_url": "http://127.0.0.1:9/v1"}),
    ("ray", "src.models.reward.implementations.ray_actors", "RayRewardModel",
     {"model_name": "tiny:judge", "num_gpus_per_actor": 0, "num_actors": 1}),
]
BAD = {"local": [{"mode": "foo"}, {"template": "nope"}, {"device": "tpu"}, {"bogus": 1}, {"batch_size": "8"}],
       "multi_gpu": [{"mode": "foo"}, {"micro_batch": 0}, {"device_ids": []}, {"launcher": {"x": 1}}],
       "remote": [{"batch_size": 0}, {"url": "ftp://x"}],
       "openai": [{"mode": "foo"}, {"timeout_s": 0}],
       "ray": [{"num_actors": 0}, {"runtime_env": [1]}]}


@pytest.mark.parametrize("name,module,cls_name,params", DIRECT, ids=[d[0] for d in DIRECT])
def test_a_wrong_setting_is_one_error_family_when_a_class_is_built_directly(name, module, cls_name, params):
    """A user's `except JudgeError` (or the ValueError/TypeError it replaced) catches every wrong
    setting, whichever class they build."""
    import importlib

    cls = getattr(importlib.import_module(module), cls_name)
    for bad in BAD[name]:
        with pytest.raises(JudgeConfigError) as e:
            cls(**{**params, **bad})
        assert isinstance(e.value, (ValueError, TypeError)) and isinstance(e.value, JudgeError)
        assert next(iter(bad)) in str(e.value) or "parameter" in str(e.value), (bad, str(e.value))


def test_a_closed_judge_says_so_in_the_family(image_files):
    judge = QwenVLRewardModel(model_name="tiny:judge", device="cpu")
    judge.close()
    with pytest.raises(JudgeUnavailable, match="closed"):
        judge.batch_score([image_files[0]])


# -- one judge object, several threads (a thread pool, asyncio.to_thread, RL reward workers) --------

def _in_forward(judge, on_forward):
    """on_forward(thread name) runs as each forward pass of the judge's model starts."""
    import threading

    return judge.engine.model.register_forward_pre_hook(lambda mod, args: on_forward(threading.current_thread().name))


def test_threads_sharing_the_in_process_judge_get_their_own_scores():
    """Thread B calls the judge while thread A's forward pass runs. The engine keeps per-forward
    state (which images vision reuse is about to encode), so with two calls in it at once A's
    forward took B's image list and gave A's item the features kept for B's image: A got B's score.
    The judge now takes one call at a time."""
    import threading

    from conftest import make_image

    a, b = ScoreItem(images=[make_image(1)], id="a"), ScoreItem(images=[make_image(2)], id="b")
    with QwenVLRewardModel(model_name="tiny:judge") as judge:
        ref_a, ref_b = judge.score(a).score, judge.score(b).score  # b's features are kept now
        assert abs(ref_a - ref_b) > 1e-3
        a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()

        def on_forward(name):
            if name == "A":  # B may come in beside A (it cannot once calls take turns) ...
                a_in.set()
                b_in.wait(3)
            elif name == "B":  # ... and waits in its forward pass while A's goes on
                b_in.set()
                a_done.wait(3)
        hook = _in_forward(judge, on_forward)
        out: dict = {}

        def call(name, item):
            out[name] = judge.score(item)
            if name == "A":
                a_done.set()
        threads = [threading.Thread(target=call, args=(n, it), name=n) for n, it in (("A", a), ("B", b))]
        threads[0].start()
        assert a_in.wait(60)
        threads[1].start()
        for t in threads:
            t.join(60)
        hook.remove()
        assert not any(t.is_alive() for t in threads)
        assert (out["A"].id, out["B"].id) == ("a", "b")
        assert [out["A"].score, out["B"].score] == pytest.approx([ref_a, ref_b], abs=1e-5)
        assert [judge.score(a).score, judge.score(b).score] == pytest.approx([ref_a, ref_b], abs=1e-5)


def test_closing_the_in_process_judge_during_another_threads_call():
    """close() while another thread's call is in a forward pass: that call finishes with its
    results, close() returns after it, and the next call says the judge is closed. close() took
    the model and the prepare threads from under the call: it raised 'cannot schedule new futures
    after shutdown'."""
    import threading

    from conftest import call_in_thread, make_image

    items = [ScoreItem(images=[make_image(i)], id=str(i)) for i in range(12)]
    judge = QwenVLRewardModel(model_name="tiny:judge", batch_size=4)
    in_forward, release = threading.Event(), threading.Event()

    def on_forward(name):
        if name == "caller":
            in_forward.set()
            release.wait(30)
    _in_forward(judge, on_forward)
    caller, out = call_in_thread(judge.batch_score, items, name="caller")
    assert in_forward.wait(60)
    closer = threading.Thread(target=judge.close)
    closer.start()
    closer.join(2)  # close() waits for the call now; it used to return at once, mid-call
    release.set()
    caller.join(60)
    closer.join(60)
    assert not caller.is_alive() and not closer.is_alive()
    results = out["result"]
    assert not isinstance(results, Exception), repr(results)
    assert [r.id for r in results] == [it.id for it in items] and all(r.error is None for r in results)
    with pytest.raises(JudgeUnavailable, match="closed"):
        judge.batch_score(items[:1])
