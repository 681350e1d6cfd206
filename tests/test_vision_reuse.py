"""Vision features kept beyond the chunk that encoded them (vision_reuse.py, `vision_cache_mb`):
each image through the tower once while its features stay in the byte-bounded store, the same
scores and answers as without reuse, least recently used out first, nothing kept after close(),
out of memory, or under a budget that a full batch needs. Items that share a source image cut
into the same chunk (grouping.py): each source once per call with no store at all, the same
results in input order, a bad item failing alone under its own index, other orders untouched.
CPU, float32, tiny real models.
"""
from __future__ import annotations

import dataclasses
import io
import threading

import pytest
import torch
from PIL import Image

from src.models.reward import ConfigError, build_reward_model, load_config
from src.models.reward.grouping import cut_between_sources, image_identity, source_order
from src.models.reward.implementations.local import QwenVLRewardModel
from src.models.reward.settings import JudgeSettings
from src.models.reward.types import ScoreItem
from src.testing import faults
from conftest import chunks_seen, set_chunk_order


def _images(n: int, seed: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(56, 84, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def _shared_source_items() -> list[ScoreItem]:
    # Six edits of two source images, ordered as a benchmark scored for three editing models is:
    # model by model, so each source comes back in every chunk of two items.
    imgs = _images(8, seed=11)
    return [ScoreItem(images=[imgs[i]], source_images=[imgs[6 + i % 2]], instruction=f"make it {c}")
            for i, c in enumerate("ABCDEF")]


def _counting(engine, name: str) -> list[int]:
    """Count calls of one of the engine's methods (chunks run, forward passes)."""
    calls: list[int] = []
    real = getattr(engine, name)

    def wrapped(*a, **k):
        calls.append(1)
        return real(*a, **k)
    setattr(engine, name, wrapped)
    return calls


@pytest.mark.parametrize("mode, continuous", [("logits", False), ("generate", False), ("generate", True)])
def test_an_image_shared_across_chunks_and_calls_is_encoded_once(mode, continuous):
    items = _shared_source_items()  # 6 edited + 2 source images: 8 unique, shown 6 x 3 = 18 times
    kw = dict(mode=mode, max_new_tokens=4, continuous_batching=continuous) if mode == "generate" else {}
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", template="edit", batch_size=2, **kw) as j:
        e = j.engine
        r = e._vision_reuse
        assert e._continuous is continuous and e._chunk_items() == 2  # three chunks of two items
        r.enabled = False  # the plain path: every image through the tower in every prompt
        plain = j.batch_score(items)
        assert r.encoded == r.reused == 0
        r.enabled = True
        chunks, forwards = _counting(e, "_run_chunk"), _counting(e, "_forward")
        first = j.batch_score(items)
        # Each source is shown in all three chunks (and to the first question of each item, with
        # its edit, the second question shows the edit again): once through the tower, all call.
        assert r.encoded == 8 and r.reused == 18 - 8
        if not continuous:  # static: 3 chunks, each a batch per question (one decode under continuous)
            assert len(chunks) == 3 and len(forwards) == 6
        assert not r.store and len(r.kept) == 8 and 0 < r.kept_bytes <= r.cache_bytes
        second = j.batch_score(items)  # a later call showing the same images: nothing new encoded
        assert r.encoded == 8 and r.reused == 10 + 18
    for got in (first, second):
        _same_results(got, plain, mode)


def _same_results(got: list, ref: list, mode: str) -> None:
    """The same results, in the same order: float32 sub-scores within 1e-5 (logits), identical
    answers (generate)."""
    assert [r.index for r in got] == [r.index for r in ref] and [r.id for r in got] == [r.id for r in ref]
    for a, b in zip(got, ref):
        assert a.error is None or a.error_kind == "parse", a.error  # random weights: junk answers
        assert a.sub_scores.keys() == b.sub_scores.keys()
        if mode == "logits":
            for part, v in a.sub_scores.items():
                assert v is not None and abs(v - b.sub_scores[part]) < 1e-5, (part, v, b.sub_scores[part])
        else:
            assert a.raw == b.raw and a.sub_scores == b.sub_scores  # identical answers


def test_a_zero_budget_keeps_nothing_beyond_a_chunk():
    items = _shared_source_items()
    # chunk_order input: chunks as the input orders them, the store's part alone
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", template="edit", batch_size=2, vision_cache_mb=0,
                           chunk_order="input") as j:
        r = j.engine._vision_reuse
        assert r.cache_bytes == 0
        j.batch_score(items)
        # within a chunk: 2 edits + 2 sources of 6 shown, in each of the three chunks
        assert r.encoded == 3 * 4 and r.reused == 3 * 2 and not r.kept and r.kept_bytes == 0
        j.batch_score(items)
        assert r.encoded == 2 * 12


def test_the_least_recently_used_features_leave_first():
    a, b, c = _images(3, seed=12)  # one size: features of equal bytes
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", batch_size=1) as j:  # one image per item, per chunk
        r = j.engine._vision_reuse

        def score(*imgs) -> int:
            """Images encoded by one call scoring these images."""
            before = r.encoded
            assert all(res.error is None for res in j.batch_score([ScoreItem(images=[im]) for im in imgs]))
            return r.encoded - before

        assert score(a) == 1
        size = r.kept_bytes  # one image's features (Qwen3-VL: pooled and deepstack)
        assert size > 0 and len(r.kept) == 1
        r.cache_bytes = 0.5 * size  # an image larger than the budget is not kept
        r.clear()
        assert score(a) == 1 and not r.kept and score(a) == 1
        r.cache_bytes = 2.5 * size  # room for two
        assert score(a, b) == 2
        assert score(a) == 0    # a hit: `a` becomes the most recently used
        assert score(c) == 1    # `c` needs room: `b` (least recently used) leaves, not `a` (first kept)
        assert len(r.kept) == 2 and r.kept_bytes == 2 * size <= r.cache_bytes
        assert score(a) == 0 and score(c) == 0
        assert score(b) == 1    # `b` was the one evicted; now `a` (least recently used) leaves
        assert score(c) == 0 and score(a) == 1


def test_source_images_outlast_images_under_judgement():
    # One call per editing model, as a benchmark scored model by model in separate calls: each
    # call shows the 2 sources and 2 new edits. The budget holds 2.5 images' features: by recency
    # alone the edits (kept last) would push the sources out before the next call shows them.
    imgs = _images(8, seed=13)  # 6 edits (3 models x 2 sources) and 2 sources, one size
    sources = imgs[6:]
    calls = [[ScoreItem(images=[imgs[2 * m + s]], source_images=[sources[s]], instruction="make it red")
              for s in range(2)] for m in range(3)]
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", template="edit", batch_size=2) as j:
        r = j.engine._vision_reuse
        assert all(res.error is None for res in j.batch_score(calls[0]))
        size = r.kept_bytes / len(r.kept)
        r.clear()
        r.cache_bytes = 2.5 * size
        before = r.encoded
        for items in calls:
            assert all(res.error is None for res in j.batch_score(items))
        assert r.encoded - before == 2 + 6  # each source once, each edit once
        assert [src for _, _, src in r.kept.values()] == [True, True]  # the sources: the edits found no room
        # an edit shown again in a later call is still welcome where room is free of sources
        r.cache_bytes = 4.5 * size
        assert all(res.error is None for res in j.batch_score(calls[0]))
        assert sorted(src for _, _, src in r.kept.values()) == [False, False, True, True]
        # under a memory budget everything gives way, sources too
        r.shrink_to(0)
        assert not r.kept and r.kept_bytes == 0


def test_close_out_of_memory_and_switching_off_drop_the_kept_features():
    items = _shared_source_items()[:2]
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", template="edit", batch_size=2) as j:
        e = j.engine
        r = e._vision_reuse
        j.batch_score(items)
        assert len(r.kept) == 4
        # Out of memory: the kept features are emptied before the split batches retry.
        held_at_forward: list[int] = []

        def oom_once(n: int) -> None:
            held_at_forward.append(r.kept_bytes)
            if len(held_at_forward) == 1:
                raise torch.OutOfMemoryError("simulated out of memory")

        hook = faults.on_forward(oom_once, e.model)
        try:
            res = j.batch_score(items)
        finally:
            hook.remove()
        assert all(x.error is None for x in res)
        assert held_at_forward[0] > 0 and held_at_forward[1] == 0  # failed batch, then its first half
        assert r.encoded == 4 + 4  # shown again after the store was emptied: encoded again
        r.enabled = False  # switched off: nothing kept
        assert not r.kept and r.kept_bytes == 0
        r.enabled = True
        j.batch_score(items)
        assert len(r.kept) == 4
        e._uncompile("a test")  # the tower runs differently from now on: kept features go
        assert not r.kept
        j.batch_score(items)
        assert len(r.kept) == 4 and r.kept_bytes > 0
    assert not r.kept and r.kept_bytes == 0 and not r.store  # close()


def test_under_a_memory_budget_kept_features_give_way_to_a_full_batch():
    # The budget logic (batching.py) reads only figures: the resident bytes, the measured bytes per
    # prompt and the kept bytes. On the CPU no budget applies, so the device name is set to a GPU's
    # for the arithmetic alone, with figures chosen around the kept features' real bytes.
    imgs = _images(4, seed=13)
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", batch_size=4, max_memory_gb=1.0) as j:
        e = j.engine
        r = e._vision_reuse
        j.batch_score([ScoreItem(images=[im]) for im in imgs])
        size = r.kept_bytes / 4
        assert len(r.kept) == 4 and e._held_bytes() == e._resident_bytes + 4 * size
        oldest = list(r.kept)
        e._resident_bytes, room = 0.5e9, 0.5e9
        e._bytes_per_prompt = room / 4 - 0.625 * size  # 4 prompts fit with 2.5 images' features kept, not 4
        e.device = "cuda:0"
        try:
            assert e._batch_limit() == 4
        finally:
            e.device = "cpu"
        assert list(r.kept) == oldest[2:] and r.kept_bytes == 2 * size  # the two least recently used left
        e._bytes_per_prompt = room / 8  # room to spare: nothing leaves
        e.device = "cuda:0"
        try:
            assert e._batch_limit() == 4
        finally:
            e.device = "cpu"
        assert list(r.kept) == oldest[2:]


def test_the_prepare_thread_plans_its_batches_without_touching_the_kept_features():
    # The prepare thread cuts the next chunk into batches (to run the processor ahead) while the
    # main thread runs the model, whose get_image_features reads, pops and adds kept features.
    # Under a memory budget the batch limit makes kept features give way to a full batch: done
    # from the prepare thread, that eviction races the main thread on one OrderedDict (a KeyError
    # or "mutated during iteration" there; one raised in the prepare thread fails the whole
    # call). The prepare thread plans with the limit the main thread reaches once they give way.
    imgs = _images(8, seed=14)
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", batch_size=4, max_memory_gb=1.0) as j:
        e = j.engine
        r = e._vision_reuse
        j.batch_score([ScoreItem(images=[im]) for im in imgs[:4]])
        size = r.kept_bytes / 4
        kept = list(r.kept)
        e._resident_bytes, room = 0.5e9, 0.5e9
        e._bytes_per_prompt = room / 4 - 0.625 * size  # 4 prompts fit once two images' features leave
        evicting: list[str] = []
        shrink = r.shrink_to
        r.shrink_to = lambda *a, **k: evicting.append(threading.current_thread().name) or shrink(*a, **k)
        e.device = "cuda:0"  # the budget's arithmetic only (as above); nothing runs on a GPU
        try:
            chunk = e._pool.submit(e._prepare, [ScoreItem(images=[im]) for im in imgs[4:]], list(range(4))).result()
            assert evicting == [] and list(r.kept) == kept  # the store left to the main thread
            assert list(chunk.encoded) == [tuple((p, "quality") for p in range(4))]  # the full batch it will run
            assert e._batch_limit() == 4 and evicting == ["MainThread"] and list(r.kept) == kept[2:]
        finally:
            e.device = "cpu"


def test_vision_cache_mb_from_a_config_file_and_its_errors(tmp_path):
    p = tmp_path / "judge.yaml"
    p.write_text("model:\n  class_path: qwen_vl\n  init_args:\n    model_name: tiny:qwen3_vl\n"
                 "    vision_cache_mb: 3\n")
    with build_reward_model(load_config(p)["model"]) as j:
        assert j.settings.vision_cache_mb == 3.0 and j.engine._vision_reuse.cache_bytes == 3e6
    assert JudgeSettings(model_name="m").vision_cache_mb == 1024
    for bad in (-1, float("nan")):
        with pytest.raises(ConfigError) as e:
            build_reward_model({"class_path": "qwen_vl", "params": {"model_name": "x", "vision_cache_mb": bad}})
        assert "Problem with class_path 'qwen_vl'" in str(e.value)
        assert "vision_cache_mb: must be a number of MB >= 0 (0: no vision features kept beyond a chunk)" in str(e.value)
    with pytest.raises(ConfigError, match="parameter vision_cache_mb: expected a number"):
        build_reward_model({"class_path": "multi_gpu", "params": {"model_name": "x", "vision_cache_mb": "1 GB"}})
    # It changes which work is done, not the scores: resume keeps results made with another value.
    assert JudgeSettings(model_name="m", vision_cache_mb=0).fingerprint() == JudgeSettings(model_name="m").fingerprint()


# -- items sharing a source image, chunked together (grouping.py) ------------------------------------

def _model_by_model(n_src: int = 4, n_models: int = 3) -> list[ScoreItem]:
    """A benchmark scored for several editing models in one call: item i is model i // n_src's edit
    of source i % n_src (the same PIL object for every edit of a source)."""
    imgs = _images(n_src * n_models + n_src, seed=21)
    sources = imgs[n_src * n_models:]
    return [ScoreItem(images=[imgs[i]], source_images=[sources[i % n_src]], instruction=f"edit {i}",
                      id=f"m{i // n_src}-s{i % n_src}") for i in range(n_src * n_models)]



GROUPED = [[0, 4, 8, 1, 5, 9], [2, 6, 10, 3, 7, 11]]  # 4 sources x 3 models, chunks of 6: two sources each


@pytest.mark.parametrize("mode, continuous", [("logits", False), ("generate", False), ("generate", True)])
def test_items_sharing_a_source_go_through_the_tower_once_per_call_without_a_store(mode, continuous):
    items = _model_by_model()
    kw = dict(mode=mode, max_new_tokens=4, continuous_batching=continuous) if mode == "generate" else {}
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", template="edit", batch_size=6, vision_cache_mb=0, **kw) as j:
        e = j.engine
        r = e._vision_reuse
        assert e._continuous is continuous and r.cache_bytes == 0
        seen = chunks_seen(e)
        set_chunk_order(e, "input")  # as the input orders them: every chunk shows all four sources
        plain = j.batch_score(items)
        assert seen == [list(range(6)), list(range(6, 12))] and r.encoded == 2 * (4 + 6)
        set_chunk_order(e, "auto")  # the library's default
        seen.clear()
        grouped = j.batch_score(items)
        # Each chunk holds two sources' edits: each source once, each edit once (the second
        # question shows the edit again, from the chunk's store). Static batches: the first chunk
        # is cut in two between its sources' groups (batching.py), which costs no encoding.
        assert seen == (GROUPED if continuous else [GROUPED[0][:3], GROUPED[0][3:], GROUPED[1]])
        assert r.encoded - 20 == 4 + 12
        assert not r.kept and r.kept_bytes == 0
    _same_results(grouped, plain, mode)
    assert [res.index for res in grouped] == list(range(12)) and [res.id for res in grouped] == [it.id for it in items]


def test_a_bad_item_in_a_grouped_call_fails_alone_under_its_own_index(tmp_path):
    items = _model_by_model()
    missing = tmp_path / "missing.png"
    items[5] = dataclasses.replace(items[5], images=[str(missing)])  # m1-s1: its edit cannot be read
    items[10] = dataclasses.replace(items[10], source_images=[b"not an image"])  # m2-s2: its source
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", template="edit", batch_size=6, vision_cache_mb=0) as j:
        e = j.engine
        seen = chunks_seen(e)
        set_chunk_order(e, "input")
        plain = j.batch_score(items)
        set_chunk_order(e, "auto")
        seen.clear()
        grouped = j.batch_score(items)
        # groups by first showing; the bytes source (a group of its own) comes after the four; the
        # first chunk cut between its two groups
        assert seen == [[0, 4, 8], [1, 5, 9], [2, 6, 3, 7, 11, 10]]
    assert [res.index for res in grouped] == list(range(12))
    assert grouped[5].error == plain[5].error == f"item 'm1-s1' (#5): image not found: {missing}"
    # (PIL's message names the buffer object it read: not comparable between calls)
    assert grouped[10].error.startswith("item 'm2-s2' (#10): source image <12 bytes>: cannot decode image")
    assert grouped[5].error_kind == grouped[10].error_kind == "image" and grouped[5].score is grouped[10].score is None
    good = [k for k in range(12) if k not in (5, 10)]
    _same_results([grouped[k] for k in good], [plain[k] for k in good], "logits")


def test_a_source_of_a_type_preparation_refuses_fails_alone_in_a_grouped_call():
    # Grouping keys every item's sources before any item is prepared. A memoryview is no image
    # input (preparation refuses it, naming the type), and one over strided memory cannot be hashed
    # (BufferError): keyed by its digest it took the whole call down, where without vision reuse
    # only its item failed.
    items = _model_by_model()
    items[5] = dataclasses.replace(items[5], source_images=[memoryview(b"not an image")[::2]])
    results = {}
    for reuse in (False, True):
        with QwenVLRewardModel(model_name="tiny:qwen3_vl", template="edit", batch_size=6, vision_reuse=reuse) as j:
            results[reuse] = j.batch_score(items)
    for res in results.values():
        assert [r.index for r in res] == list(range(12))
        assert res[5].error == ("item 'm1-s1' (#5): source image <memoryview>: unsupported image type memoryview; "
                                "give a path, bytes or a PIL image") and res[5].error_kind == "image"
    good = [k for k in range(12) if k != 5]
    _same_results([results[True][k] for k in good], [results[False][k] for k in good], "logits")


def test_grouped_batches_split_on_out_of_memory_keep_every_result(monkeypatch):
    items = _model_by_model()
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", template="edit", batch_size=6, vision_cache_mb=0) as j:
        e = j.engine
        set_chunk_order(e, "input")
        plain = j.batch_score(items)
        set_chunk_order(e, "auto")
        monkeypatch.setenv(faults.FAULT_OOM_ABOVE, "2")  # a batch of more than two prompts runs out of memory
        grouped = j.batch_score(items)
        assert e._batch_cap is not None and e._batch_cap <= 2
    _same_results(grouped, plain, "logits")


def test_with_a_progress_bar_the_call_is_still_one_engine_call(capsys):
    # The in-process class's progress bar moves as each chunk is done; it does not cut the call
    # into engine calls of its own (which would keep a source's items apart).
    items = _model_by_model()
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", template="edit", batch_size=2, vision_cache_mb=0) as quiet:
        ref = quiet.batch_score(items)
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", template="edit", batch_size=2, vision_cache_mb=0,
                           progress=True) as j:
        seen, calls = chunks_seen(j.engine), _counting(j.engine, "score")
        got = j.batch_score(items)
        assert len(calls) == 1 and seen == [[0, 4], [8, 1], [5, 9], [2, 6], [10, 3], [7, 11]]
        # each source's three items straddle a chunk's end: 2 x 4 sources + 12 edits (24 in input order)
        assert j.engine._vision_reuse.encoded == 8 + 12
    _same_results(got, ref, "logits")
    assert "12/12" in capsys.readouterr().err


def test_orders_grouping_cannot_help_are_left_as_given():
    # The order as given; the first chunk of a call of more than one is cut in two (batching.py): a
    # quarter chunk first, or after the first chunk's first group of a shared source.
    items = _model_by_model()
    everything = [[0], list(range(1, 6)), list(range(6, 12))]
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", template="edit", batch_size=6) as j:
        e = j.engine
        seen = chunks_seen(e)
        distinct = [dataclasses.replace(it, source_images=[im]) for it, im in zip(items, _images(12, seed=22))]
        for call, expected in ((distinct, everything),  # no source repeats
                               ([items[i] for g in GROUPED for i in g],  # grouped already
                                [[0, 1, 2], [3, 4, 5], list(range(6, 12))]),
                               (items[:6], [list(range(6))])):  # one chunk
            seen.clear()
            assert all(res.error is None for res in j.batch_score(call))
            assert seen == expected
        e._vision_reuse.enabled = False  # nothing to save: the order as given
        seen.clear()
        j.batch_score(items)
        assert seen == everything
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", template="quality", batch_size=6) as j:
        seen = chunks_seen(j.engine)  # a rubric that does not show the sources
        j.batch_score(items)
        assert seen == everything


def test_source_keys_name_one_image_and_the_order_is_a_stable_grouping(tmp_path):
    a, b = _images(2, seed=23)
    path = tmp_path / "source.png"
    a.save(path)
    buf = io.BytesIO()
    b.save(buf, format="PNG")
    data = buf.getvalue()
    assert image_identity(str(path)) == image_identity(path) != image_identity(str(tmp_path / "other.png"))
    assert image_identity(data) == image_identity(bytearray(data)) != image_identity(data + b"\0")  # by digest
    assert image_identity(a) == image_identity(a) != image_identity(a.copy())  # by identity: same pixels, two keys
    digests: dict = {}
    assert image_identity(data, digests) == image_identity(data) and list(digests) == [id(data)]

    def item(*sources) -> ScoreItem:
        return ScoreItem(images=["edit.png"], source_images=list(sources))

    items = [item(a), item(), item(data), item(a), item(str(path)), item(), item(bytes(bytearray(data))),
             item(path), item(a, b), item(a, b)]
    # groups in the order of their first item, input order within; no sources: where it stood
    assert source_order(items, 2) == [0, 3, 1, 2, 6, 4, 7, 5, 8, 9]
    assert source_order(items, len(items)) is None  # one chunk
    assert source_order([item(a), item(b), item(data), item()], 2) is None  # no source repeats
    assert source_order([item(a), item(a), item(b), item(b)], 2) is None  # grouped already


def test_a_call_s_first_cut_splits_no_group_of_shared_sources():
    a, b, c = _images(3, seed=29)

    def item(*sources) -> ScoreItem:
        return ScoreItem(images=["edit.png"], source_images=list(sources))

    # the nearest place to the wanted cut (the lower of two as near) where no source shows on both sides
    assert cut_between_sources([item(a), item(b), item(c), item(c)], 1, 2) == 1
    assert cut_between_sources([item(a), item(a), item(b), item(b), item(c)], 1, 4) == 2
    assert cut_between_sources([item(a), item(a), item(a), item(b), item(b), item(c)], 2, 4) == 3
    assert cut_between_sources([item(a), item(b), item(b), item(a, c), item(c)], 1, 4) is None  # a spans all
    assert cut_between_sources([item(a), item(a), item(a), item(b)], 1, 2) is None  # only past the limit
    assert cut_between_sources([item(), item(), item()], 1, 2) == 1  # no sources: anywhere
    assert cut_between_sources([item(a)], 1, 1) is None  # nothing to cut


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_the_tower_s_output_is_split_here_as_the_model_splits_it(arch):
    # The model's method reads the split sizes back from the device after the tower (a host sync);
    # the store splits the tower's output by the sizes it knows: the same features, and the same
    # scores as through the model's method.
    items = [ScoreItem(images=[im]) for im in _images(3, seed=5)]
    with QwenVLRewardModel(model_name=f"tiny:{arch}", batch_size=3, compile_vision=False) as j:
        r = j.engine._vision_reuse
        assert r._split_here  # transformers' method as the store knows it
        reqs = [req for req in j.engine._prepare(items, [0, 1, 2]).requests]
        inputs = j.engine._encode_cpu(reqs)
        pix, grid = inputs["pixel_values"], inputs["image_grid_thw"]
        sizes = [int(n) // r.merge ** 2 for n in grid.prod(-1)]
        with torch.inference_mode():
            here = r._encode(pix, grid, sizes, {"return_dict": True})
            own = r.original(pix, grid, return_dict=True)
        assert len(here.pooler_output) == 3 and [t.shape[0] for t in here.pooler_output] == sizes
        assert all(torch.equal(a, b) for a, b in zip(here.pooler_output, own.pooler_output))
        deep = getattr(own, "deepstack_features", None)
        assert (deep is not None) == arch.startswith("qwen3")
        if deep is not None:  # per layer, one tensor (transformers <= 5.17) or per image (later), as the model's
            assert [isinstance(d, torch.Tensor) for d in here.deepstack_features] == \
                [isinstance(d, torch.Tensor) for d in deep]
            whole = [(torch.cat(a), torch.cat(b)) if isinstance(a, tuple) else (a, b)
                     for a, b in zip(here.deepstack_features, deep)]
            assert len(whole) == len(deep) and all(torch.equal(a, b) for a, b in whole)
        split_here = [res.score for res in j.batch_score(items)]
        r._split_here = False
        r.clear()
        assert [res.score for res in j.batch_score(items)] == pytest.approx(split_here, abs=1e-6)
        assert r.encoded == 6  # both calls ran the tower: nothing came from a store


def _qwen3_model_of_later_transformers(base: type) -> type:
    """The judge's Qwen3-VL model class with transformers 5.25's get_image_features (the deepstack
    features split per image too, as its forward takes them), whatever transformers runs here."""
    from transformers.utils import can_return_tuple

    class Later(base):
        @can_return_tuple
        def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
            pixel_values = pixel_values.type(self.visual.dtype)
            vision_output: BaseModelOutputWithDeepstackFeatures = self.visual(  # noqa: F821 (not evaluated)
                pixel_values, grid_thw=image_grid_thw, return_dict=True, **kwargs
            )
            image_embeds = vision_output.pooler_output
            split_sizes = (image_grid_thw.prod(-1) // self.visual.spatial_merge_size**2).tolist()
            vision_output.pooler_output = torch.split(image_embeds, split_sizes)
            vision_output.deepstack_features = [
                torch.split(feat, split_sizes) for feat in vision_output.deepstack_features
            ]
            return vision_output
    return Later


@pytest.mark.parametrize("later", [False, True], ids=["installed", "5.25"])
def test_features_come_back_in_the_form_of_the_model_s_own_method(later):
    # The model's forward takes what its get_image_features gives: Qwen3-VL's deepstack features as
    # one tensor per layer (transformers <= 5.17) or per layer a tuple of per-image tensors (5.25).
    # Through the store, encoded here or served from it, they come back in that form, with its values.
    items = [ScoreItem(images=[im]) for im in _images(3, seed=5)]
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", batch_size=3, compile_vision=False, vision_reuse=False) as j:
        engine, inner = j.engine, j.engine.model.model
        if later:
            inner.__class__ = _qwen3_model_of_later_transformers(type(inner))
        from src.models.reward.vision_reuse import VisionReuse

        r = VisionReuse.install(engine.model, 1e9)
        assert r._split_here  # a method the store knows: the tower's output is split here
        inputs = engine._encode_cpu(engine._prepare(items, [0, 1, 2]).requests)
        pix, grid = inputs["pixel_values"], inputs["image_grid_thw"]
        keys = ["a", "b", "c"]
        with torch.inference_mode():
            own = type(inner).get_image_features(inner, pix, grid, return_dict=True)
            got = []
            for _ in range(2):  # encoded, then from the kept store
                r.begin_chunk(keys)
                r.keys = list(keys)
                got.append(r.get_image_features(pix, grid, return_dict=True))
                r.end_chunk()
        assert r.encoded == 3 and r.reused == 3
        for out in got:
            assert all(torch.equal(a, b) for a, b in zip(out.pooler_output, own.pooler_output))
            assert [type(d) for d in out.deepstack_features] == [type(d) for d in own.deepstack_features]
            if later:
                assert all(isinstance(d, tuple) and len(d) == 3 for d in own.deepstack_features)
            for a, b in zip(out.deepstack_features, own.deepstack_features):
                assert torch.equal(a, b) if isinstance(a, torch.Tensor) else \
                    (len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)))


def test_a_call_the_store_does_not_know_runs_the_model_s_method_after_one_warning(caplog):
    # An argument the store does not know (a later transformers may pass new ones): the model's own
    # method encodes every image, the same features, and one warning says why.
    items = [ScoreItem(images=[im]) for im in _images(2, seed=6)]
    with QwenVLRewardModel(model_name="tiny:qwen2_vl", batch_size=2, compile_vision=False) as j:
        r, inner = j.engine._vision_reuse, j.engine.model.model
        inputs = j.engine._encode_cpu(j.engine._prepare(items, [0, 1]).requests)
        pix, grid = inputs["pixel_values"], inputs["image_grid_thw"]
        with torch.inference_mode(), caplog.at_level("WARNING"):
            own = type(inner).get_image_features(inner, pix, grid, return_dict=True)
            for _ in range(2):
                r.begin_chunk(["a", "b"])
                r.keys = ["a", "b"]
                out = r.get_image_features(pix, grid, return_dict=True, output_new_thing=False)
                r.end_chunk()
        assert r.encoded == 0 and r.reused == 0 and not r.kept
        assert all(torch.equal(a, b) for a, b in zip(out.pooler_output, own.pooler_output))
        warned = [m for m in caplog.messages if m.startswith("vision_reuse:")]
        assert len(warned) == 1 and "output_new_thing" in warned[0] and type(inner).__name__ in warned[0]


def test_a_method_other_than_the_known_one_runs_as_it_is():
    from src.models.reward.vision_reuse import _splits_after_the_tower

    class Other:
        def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
            pixel_values = pixel_values.type(self.visual.dtype)
            out = self.visual(pixel_values, grid_thw=image_grid_thw, **kwargs)
            out.pooler_output = self.projector(out.pooler_output)  # more than the split
            return out

    assert not _splits_after_the_tower(Other) and not _splits_after_the_tower(object)
