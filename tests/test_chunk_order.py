"""The order a call is cut into batches from (`chunk_order`, size_order.py): with `auto`, prompts
of similar size stand together (largest first) and items sharing a source stay side by side;
results still come back in input order under their own indices, with the scores `input` gives
(float32, within 1e-5), less padding fed to the model, the same per-item errors for images that
cannot be read, and the image sizes read from headers without decoding a pixel.
CPU, float32, tiny real models.
"""
from __future__ import annotations

import dataclasses
import io
import re
import struct
import zlib

import pytest
from PIL import Image

from src.models.reward import ConfigError, build_reward_model
from src.models.reward import size_order
from src.models.reward.implementations.local import QwenVLRewardModel
from src.models.reward.settings import JudgeSettings
from src.models.reward.size_order import Resize, chunk_order, image_size
from src.models.reward.types import ScoreItem

from conftest import chunks_seen, make_image, set_chunk_order

# Three sizes that the tiny Qwen3-VL (patch 16, merge 2, 4,096..65,536 pixels) keeps apart:
# grids of 4x4, 6x8 and 10x12 patches.
SIZES = [(64, 64), (128, 96), (192, 160)]


@pytest.fixture(scope="module")
def mixed_files(tmp_path_factory) -> list[str]:
    """Twelve PNG files, sizes interleaved: file i has SIZES[i % 3]."""
    d = tmp_path_factory.mktemp("mixed")
    paths = []
    for i in range(12):
        w, h = SIZES[i % 3]
        p = d / f"img_{i:02d}.png"
        make_image(40 + i, w, h).save(p)
        paths.append(str(p))
    return paths



class _Fed:
    """What the engine feeds the model, batch by batch: each batch's padded positions (attention
    mask zeros) and its images' patch grids."""

    def __init__(self, engine):
        self.padded: list[int] = []
        self.grids: list[set[tuple[int, ...]]] = []
        real = engine._encode

        def encode(*a, **k):
            inputs = real(*a, **k)
            mask = inputs["attention_mask"]
            self.padded.append(int(mask.numel() - mask.sum()))
            self.grids.append({tuple(g) for g in inputs["image_grid_thw"].tolist()})
            return inputs
        engine._encode = encode

    def clear(self) -> None:
        self.padded.clear()
        self.grids.clear()


def _same_scores(got: list, ref: list) -> None:
    """Input order, each under its own index; the same errors (PIL's message names the buffer
    object it read: its address is left out); float32 sub-scores within 1e-5."""
    assert [r.index for r in got] == [r.index for r in ref] == list(range(len(ref)))
    assert [r.id for r in got] == [r.id for r in ref]
    for a, b in zip(got, ref):
        assert (a.error is None) == (b.error is None) and a.error_kind == b.error_kind
        if a.error is not None:
            assert re.sub(r" at 0x[0-9a-f]+", "", a.error) == re.sub(r" at 0x[0-9a-f]+", "", b.error)
        if a.error is None:
            for part, v in a.sub_scores.items():
                assert abs(v - b.sub_scores[part]) < 1e-5, (a.id, part, v, b.sub_scores[part])


def test_auto_cuts_padding_and_keeps_results_in_input_order(mixed_files):
    items = [ScoreItem(images=[p], id=f"i{k}") for k, p in enumerate(mixed_files)]
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", batch_size=4) as j:
        e = j.engine
        assert e.settings.chunk_order == "auto"  # the default
        fed, seen = _Fed(e), chunks_seen(e)
        set_chunk_order(e, "input")
        given = j.batch_score(items)
        assert seen == [[0], [1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # a quarter chunk first (batching.py)
        padded_input, grids_input = sum(fed.padded), list(fed.grids)
        fed.clear()
        seen.clear()
        set_chunk_order(e, "auto")
        ordered = j.batch_score(items)
        # largest first, one size per chunk (the first one's quarter cut off); stable within a size
        assert seen == [[2], [5, 8, 11], [1, 4, 7, 10], [0, 3, 6, 9]]
        padded_auto, grids_auto = sum(fed.padded), list(fed.grids)
    # each input-order batch of more than one item mixes the three sizes and pads to its largest prompt
    assert [len(g) for g in grids_input] == [1, 3, 3, 3] and padded_input > 0
    # each auto batch has one grid (the vision tower's one-size attention applies) and no padding
    assert grids_auto == [{(1, 10, 12)}, {(1, 10, 12)}, {(1, 6, 8)}, {(1, 4, 4)}] and padded_auto == 0 < padded_input
    assert all(r.error is None for r in ordered)
    _same_scores(ordered, given)


def test_an_image_that_cannot_be_read_fails_alone_with_its_own_error(mixed_files, tmp_path):
    items = [ScoreItem(images=[p], id=f"i{k}") for k, p in enumerate(mixed_files)]
    missing = tmp_path / "missing.png"
    big = tmp_path / "big.png"
    make_image(7, 300, 300).save(big)  # 90,000 pixels, over the judge's max_image_pixels below
    items[1] = dataclasses.replace(items[1], images=["https://example.com/edit.png"])
    items[4] = dataclasses.replace(items[4], images=[str(missing)])
    items[7] = dataclasses.replace(items[7], images=[b"not an image"])
    items[10] = dataclasses.replace(items[10], images=[str(big)])
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", batch_size=4, max_image_pixels=50_000) as j:
        e = j.engine
        seen = chunks_seen(e)
        set_chunk_order(e, "input")
        given = j.batch_score(items)
        seen.clear()
        set_chunk_order(e, "auto")
        ordered = j.batch_score(items)
        # the oversized image's header gives its size (largest first), it is refused in
        # preparation; the three that cannot be sized go last, in input order
        assert seen == [[10], [2, 5, 8], [11, 0, 3, 6], [9, 1, 4, 7]]
    errors = {r.index: r.error for r in ordered if r.error is not None}
    assert errors == {
        1: "item 'i1' (#1): image not found: https://example.com/edit.png",
        4: f"item 'i4' (#4): image not found: {missing}",
        7: errors[7],  # PIL's message names the buffer it read: checked below
        10: f"item 'i10' (#10): image too large: 300x300 = 90000 pixels, over max_image_pixels=50000 "
            f"(a decompression-bomb guard; raise max_image_pixels to allow it): {big}"}
    assert errors[7].startswith("item 'i7' (#7): cannot decode image <12 bytes>")
    assert all(ordered[k].error_kind == "image" and ordered[k].score is None for k in errors)
    _same_scores(ordered, given)  # the same errors, and the others scored the same


def test_an_instruction_that_is_not_text_fails_alone_with_its_own_error(mixed_files):
    # A number, or the NaN a table's empty cell becomes (Python callers, TRL's and verl's columns):
    # the order's key reads each instruction's length before any item is prepared, so it must not
    # take the call down; preparation fails that item alone, as it does under `input`.
    items = [ScoreItem(images=[p], instruction="a red square", id=f"i{k}") for k, p in enumerate(mixed_files)]
    items[2] = dataclasses.replace(items[2], instruction=7)
    items[9] = dataclasses.replace(items[9], instruction=float("nan"))
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", template="alignment", batch_size=4) as j:
        set_chunk_order(j.engine, "input")
        given = j.batch_score(items)
        set_chunk_order(j.engine, "auto")
        ordered = j.batch_score(items)
    errors = {r.index: (r.error, r.error_kind) for r in ordered if r.error is not None}
    assert errors == {2: ("item 'i2' (#2): the instruction must be a string, got int", "input"),
                      9: ("item 'i9' (#9): the instruction must be a string, got float", "input")}
    _same_scores(ordered, given)


def test_items_sharing_a_source_stay_together_when_sizes_differ(tmp_path):
    # 4 sources x 3 editing models, model by model; sources 1 and 3 (and their edits) larger.
    sources = [make_image(60 + s, *SIZES[2 if s % 2 else 0]) for s in range(4)]
    items = [ScoreItem(images=[make_image(70 + i, *SIZES[2 if i % 2 else 0])], source_images=[sources[i % 4]],
                       instruction="make it blue", id=f"m{i // 4}-s{i % 4}") for i in range(12)]
    with QwenVLRewardModel(model_name="tiny:qwen3_vl", template="edit", batch_size=6, vision_cache_mb=0) as j:
        e = j.engine
        reuse = e._vision_reuse
        fed, seen = _Fed(e), chunks_seen(e)
        set_chunk_order(e, "input")
        given = j.batch_score(items)
        assert reuse.encoded == 2 * (4 + 6) and sum(fed.padded) > 0  # every chunk shows the 4 sources
        fed.clear()
        seen.clear()
        set_chunk_order(e, "auto")
        ordered = j.batch_score(items)
        # the larger sources' groups first, each group whole: each source through the tower once;
        # the first chunk is cut where it splits no group (after 3 items, not a quarter's 1)
        assert seen == [[1, 5, 9], [3, 7, 11], [0, 4, 8, 2, 6, 10]]
        assert reuse.encoded - 20 == 4 + 12
        assert sum(fed.padded) == 0 and all(len(g) == 1 for g in fed.grids)
    _same_scores(ordered, given)


def _item(*images, sources=(), text=None) -> ScoreItem:
    return ScoreItem(images=list(images), source_images=list(sources), instruction=text)


def test_the_order_rule():
    small, mid, large = (Image.new("RGB", wh) for wh in SIZES)
    resize = Resize(patch_size=16, min_pixels=4096, max_pixels=65536)
    kw = dict(with_sources=True, group_sources=False)
    items = [_item(small), _item(large), _item(mid), _item(large, text="longer"), _item("gone.png"), _item(small)]
    assert chunk_order(items, 2, resize, **kw) == [3, 1, 2, 0, 5, 4]  # instruction length breaks a tie
    assert chunk_order(items, len(items), resize, **kw) is None  # one chunk
    assert chunk_order([_item(small, text="a"), _item(small, text="bbb"), _item("gone.png")], 1, resize, **kw) is None
    assert chunk_order([_item(large), _item(mid), _item(small)], 1, resize, **kw) is None  # sorted already
    # sources count when the rubric shows them; groups stay whole, keyed by their largest member
    s1, s2 = Image.new("RGB", (64, 64)), Image.new("RGB", (64, 64))
    items = [_item(small, sources=[s1]), _item(small, sources=[s2]), _item(large, sources=[s1]), _item(mid)]
    assert chunk_order(items, 2, resize, with_sources=True, group_sources=True) == [0, 2, 3, 1]
    assert chunk_order(items, 2, resize, with_sources=True, group_sources=False) == [2, 3, 0, 1]
    # one size everywhere: grouping alone decides
    same = [_item(small, sources=[s1]), _item(small, sources=[s2]), _item(small, sources=[s1])]
    assert chunk_order(same, 2, resize, with_sources=True, group_sources=True) == [0, 2, 1]
    assert chunk_order(same, 2, resize, with_sources=True, group_sources=False) is None


def test_a_call_of_one_chunk_reads_no_header(monkeypatch, mixed_files):
    reads: list = []
    monkeypatch.setattr(size_order, "image_size", lambda img: reads.append(img) or (64, 64))
    resize = Resize(16, 4096, 65536)
    items = [ScoreItem(images=[p]) for p in mixed_files]
    assert chunk_order(items, 12, resize, with_sources=False, group_sources=False) is None and reads == []
    chunk_order(items + [ScoreItem(images=[mixed_files[0]])], 12, resize, with_sources=False, group_sources=False)
    assert sorted(reads) == sorted(mixed_files)  # a path shown twice is read once


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (and holds no pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_sizes_come_from_headers_without_decoding(monkeypatch, tmp_path):
    from PIL import ImageFile

    def no_decoding(self, *a, **k):
        raise AssertionError("pixels decoded")
    path = tmp_path / "a.png"
    Image.new("RGB", (96, 64)).save(path)
    turned = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown a quarter turn: load_pil's exif_transpose swaps the sides
    Image.new("RGB", (96, 64)).save(turned, exif=exif)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, format="JPEG")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert image_size(str(path)) == image_size(path) == (96, 64)
    assert image_size(str(turned)) == (64, 96)
    assert image_size(buf.getvalue()) == (40, 30)
    assert image_size(Image.new("RGB", (5, 7))) == (5, 7)
    # a header claiming 12,000 x 12,000 (over Pillow's warning limit) is sized, not decoded; one over
    # Pillow's own refusal, a URL, a missing file, bytes that are no image, another type: unknown
    big, bomb = tmp_path / "big.png", tmp_path / "bomb.png"
    big.write_bytes(_png_header(12_000, 12_000))
    bomb.write_bytes(_png_header(50_000, 50_000))
    with pytest.warns(Image.DecompressionBombWarning):
        assert image_size(str(big)) == (12_000, 12_000)
    for unknown in (str(bomb), "https://example.com/a.png", str(tmp_path / "gone.png"), b"junk", 3.5, None):
        assert image_size(unknown) is None
    resize = Resize(16, 4096, 65536)
    assert resize.grid(96, 64) == (4, 6) and resize.grid(192, 160) == (10, 12)
    assert resize.grid(1, 400) is None  # an aspect ratio the resize refuses (so does preparation)


def test_chunk_order_is_checked_and_no_part_of_the_fingerprint():
    with pytest.raises(ConfigError) as e:
        build_reward_model({"class_path": "qwen_vl", "params": {"model_name": "x", "chunk_order": "sorted"}})
    assert "Problem with class_path 'qwen_vl'" in str(e.value)
    assert "chunk_order: unknown value 'sorted'; known: auto, input" in str(e.value)
    with pytest.raises(ConfigError, match="parameter chunk_order: expected a string"):
        build_reward_model({"class_path": "multi_gpu", "params": {"model_name": "x", "chunk_order": 1}})
    # the same scores within rounding, like batch_size: resume keeps results made with the other value
    assert JudgeSettings(model_name="m", chunk_order="input").fingerprint() == JudgeSettings(model_name="m").fingerprint()
