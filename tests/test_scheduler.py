"""The scheduling rules both multi-process hosts share (scheduler.py): assignment, retries, a lost
worker, "no worker left", input order. The hosts' own tests (test_pool, test_faults, test_ray,
test_shutdown) run the same rules through real workers and actors."""
from __future__ import annotations

import pytest

from src.models.reward import ScoreItem, ScoreResult
from src.models.reward.scheduler import Restarts, Scheduler


def _items(n: int) -> list[ScoreItem]:
    return [ScoreItem(images=[f"{k}.png"], id=f"it{k}") for k in range(n)]


def _ok(i: int, items: list[ScoreItem]) -> ScoreResult:
    return ScoreResult(index=i, id=items[i].id, score=float(i))


def test_round_robin_gives_worker_w_the_items_w_mod_n_and_dynamic_one_shared_queue():
    items = _items(7)
    rr = Scheduler(items, n_workers=2, micro_batch=2, schedule="round_robin")
    assert [rr.take(0), rr.take(0), rr.take(0)] == [[0, 2], [4, 6], None]
    assert [rr.take(1), rr.take(1), rr.take(1)] == [[1, 3], [5], None]
    dyn = Scheduler(items, n_workers=2, micro_batch=3, schedule="dynamic")
    assert [dyn.take(1), dyn.take(0), dyn.take(1), dyn.take(0)] == [[0, 1, 2], [3, 4, 5], [6], None]
    with pytest.raises(ValueError, match="schedule: expected one of round_robin, dynamic, got 'random'"):
        Scheduler(items, 2, 2, schedule="random")


def test_results_come_back_in_input_order_whatever_order_batches_finish_in():
    items = _items(5)
    done: list[int] = []
    failed_early = ScoreResult.failure(2, items[2], "item 'it2' (#2): unreadable", "input")
    s = Scheduler(items, n_workers=2, micro_batch=2, schedule="dynamic", on_done=done.append, failed=[failed_early])
    first, second = s.take(0), s.take(1)
    assert (first, second) == ([0, 1], [3, 4]), "an item failed before scheduling is not handed out"
    s.done(second, [_ok(i, items) for i in second], "worker b")
    s.done(first, [_ok(i, items) for i in first], "worker a")
    out = s.ordered()
    assert [r.index for r in out] == [0, 1, 2, 3, 4]
    assert [r.score for r in out] == [0.0, 1.0, None, 3.0, 4.0] and out[2].error_kind == "input"
    assert sum(done) == 5


def test_an_answer_for_other_items_fails_the_batch_and_a_failed_batch_fails_only_its_items():
    items = _items(4)
    s = Scheduler(items, n_workers=1, micro_batch=2)
    a = s.take(0)
    s.done(a, [_ok(1, items), _ok(0, items)], "worker cpu:0 (pid 7)")
    assert [s.results[i].error for i in a] == [
        f"item 'it{i}' (#{i}): worker cpu:0 (pid 7) answered for items [1, 0], asked for [0, 1]" for i in a]
    b = s.take(0)
    s.failed(b, "worker cpu:0 (pid 7) failed a batch: boom")
    assert s.results[3].error == "item 'it3' (#3): worker cpu:0 (pid 7) failed a batch: boom"
    assert s.remaining == 0 and s.take(0) is None


def test_a_lost_worker_hands_its_queue_and_held_batch_to_the_others_one_item_at_a_time():
    items = _items(6)
    s = Scheduler(items, n_workers=2, micro_batch=2, schedule="round_robin")
    held = s.take(1)                        # [1, 3]: worker 1 could not be restarted to score it
    s.lost(1, "worker could not be restarted: cuda:1 died 4 times in a row", held=held)
    assert list(s.retry) == [[1], [3], [5]]
    got = [s.take(0) for _ in range(5)]
    assert got == [[1], [3], [5], [0, 2], [4]], "retries first, then the worker's own queue"


def test_with_no_worker_left_every_item_without_a_result_fails_naming_each_cause_once():
    items = _items(4)
    s = Scheduler(items, n_workers=3, micro_batch=1, noun="actor", lost={2: "actor2 failed to start"})
    b = s.take(0)
    s.done(b, [_ok(i, items) for i in b], "actor0")
    s.lost(0, "actor0 failed 2 time(s) in a row")
    s.lost(1, "actor0 failed 2 time(s) in a row")
    out = s.ordered()
    assert out[0].score == 0.0
    for r in out[1:]:
        assert r.score is None and r.error_kind == "worker_died"
        assert r.error == (f"item {r.id!r} (#{r.index}): no actor left: actor0 failed 2 time(s) in a row; "
                           "actor2 failed to start")
    every = Scheduler(items, n_workers=1, micro_batch=2, lost={0: "gone"})
    assert every.remaining == 0 and {r.error.split(": ", 1)[1] for r in every.ordered()} == {"no worker left: gone"}


def test_restarts_are_bounded_in_a_row_and_a_good_batch_resets_the_count():
    r = Restarts(2)
    assert [r.allow(0, 2), r.allow(0, 2), r.allow(0, 2)] == [True, True, False]
    r.reset(0)
    assert r.allow(0, 2) and r.allow(1, 0) is False
    assert r.total == 3 and r.in_a_row == [1, 0]
