"""The multi-GPU class with CPU workers: real worker processes, the tiny model, real sockets."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, LoadsAs, assert_no_orphans, call_in_thread, make_image, pid_gone, worker_processes
from src.models.reward import ScoreItem
from src.models.reward.implementations.local import QwenVLRewardModel
from src.models.reward.implementations.multi_gpu import MultiGPURewardModel, resolve_device_ids, worker_specs
from src.models.reward.pool import WorkerStartError, launch_command

JUDGE = {"model_name": "tiny:qwen2_5_vl", "template": "quality", "batch_size": 2}


def pool(n: int, **kw) -> MultiGPURewardModel:
    return MultiGPURewardModel(device_ids=["cpu"] * n, progress=False, **{**JUDGE, **kw})


@pytest.fixture(scope="module")
def reference(tiny_cache, image_files):
    with QwenVLRewardModel(**JUDGE) as j:
        return [r.score for r in j.batch_score(image_files[:11])]


@pytest.fixture(scope="module")
def two_workers(tiny_cache):
    """One pool of two workers with the default settings for the tests that need nothing else
    (same schedules, same items, no faults): a pool start costs seconds. Each test sets back
    what it changes; test_close_after_an_exception_leaves_no_process closes it, last in the file.
    `seen_pids`: every worker it had (the idle-death test replaces one)."""
    m = pool(2)
    m.seen_pids = set(m.worker_pids())
    try:
        yield m
    finally:
        m.close()
    assert_no_orphans(sorted(m.seen_pids))


def _both_schedules_equal_the_reference(m, n_workers, reference, image_files):
    items = image_files[:11]  # 11 items: divides evenly by none of 2, 3, micro-batch 3
    pids = m.worker_pids()
    assert len(pids) == n_workers and all(pids)
    m.micro_batch = 3
    try:
        for schedule in ("round_robin", "dynamic"):
            m.schedule = schedule
            results = m.batch_score(items)
            assert [r.index for r in results] == list(range(11))
            assert all(r.error is None for r in results)
            assert [r.score for r in results] == pytest.approx(reference, abs=1e-4)
            devices = {r.device for r in results}
            assert devices <= {f"cpu#{k}" for k in range(n_workers)}
            if schedule == "round_robin":
                assert [r.device for r in results] == [f"cpu#{i % n_workers}" for i in range(11)]
    finally:
        m.micro_batch, m.schedule = None, "round_robin"
    # the loaded workers served both calls: same processes, no reload
    assert m.worker_pids() == pids
    assert m.pool.total_restarts == 0
    return pids


def test_two_workers_equal_the_single_device_class_for_both_schedules(two_workers, reference, image_files):
    _both_schedules_equal_the_reference(two_workers, 2, reference, image_files)


def test_three_workers_equal_the_single_device_class_for_both_schedules(reference, image_files):
    # (One worker takes the same scheduler path with n=1, which has no branch of its own; its
    # scores are checked against the reference by the launcher test below.)
    with pool(3) as m:
        pids = _both_schedules_equal_the_reference(m, 3, reference, image_files)
    assert_no_orphans(pids)


def test_second_call_reuses_loaded_workers_and_in_memory_images_travel(two_workers, image_files, reference):
    from PIL import Image

    m = two_workers
    pids = m.worker_pids()
    load_times = [w.load_time_s for w in m.pool.workers]
    t0 = time.perf_counter()
    first = m.batch_score(image_files[:11])
    t_first = time.perf_counter() - t0
    pil = [Image.open(p) for p in image_files[:4]]
    raw = [open(p, "rb").read() for p in image_files[4:8]]
    second = m.batch_score([*pil, *raw, *image_files[8:11]])
    assert m.worker_pids() == pids
    assert [w.load_time_s for w in m.pool.workers] == load_times
    assert [r.score for r in second] == pytest.approx([r.score for r in first], abs=1e-4)
    assert t_first < 30, "a warm call must not pay a model load"
    spill = m.pool.tmp_dir
    assert spill.exists() and not any(spill.glob("call-*")), "per-call spill folders are removed"


def test_threads_and_asyncio_sharing_the_pool_each_get_their_own_results(two_workers, image_files, reference):
    """One pool called from two threads at once (released together by a barrier) and from
    asyncio.to_thread: each call gets its own items' results, in its input order, with the
    scores the single-device class gives them."""
    import asyncio

    m = two_workers
    parts = [(0, 4), (4, 11)]  # distinct images, calls of different lengths
    barrier = threading.Barrier(len(parts) + 1)

    def call(lo, hi):
        barrier.wait(30)
        return m.batch_score(image_files[lo:hi])
    calls = [call_in_thread(call, lo, hi) for lo, hi in parts]
    barrier.wait(30)
    for (thread, out), (lo, hi) in zip(calls, parts):
        thread.join(120)
        assert not thread.is_alive()
        results = out["result"]
        assert [r.index for r in results] == list(range(hi - lo)), results
        assert [r.score for r in results] == pytest.approx(reference[lo:hi], abs=1e-4)

    async def gathered():
        return await asyncio.gather(*(asyncio.to_thread(m.batch_score, image_files[lo:hi]) for lo, hi in parts))
    for results, (lo, hi) in zip(asyncio.run(gathered()), parts):
        assert [r.index for r in results] == list(range(hi - lo))
        assert [r.score for r in results] == pytest.approx(reference[lo:hi], abs=1e-4)
    assert m.pool.total_restarts == 0


def test_bad_items_fail_alone_across_workers(two_workers, image_files, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    items = [ScoreItem(images=[p], id=f"x{i}") for i, p in enumerate(image_files[:5])]
    items.insert(2, ScoreItem(images=[str(bad)], id="broken"))
    items.insert(4, ScoreItem(images=[object()], id="weird"))
    results = two_workers.batch_score(items)
    assert [r.id for r in results] == [it.id for it in items]
    failed = {r.id: r for r in results if r.score is None}
    assert set(failed) == {"broken", "weird"}
    assert "cannot decode" in failed["broken"].error and "'broken'" in failed["broken"].error
    assert "unsupported image type" in failed["weird"].error


def _exif_rotated_jpeg():
    """A JPEG opened in memory whose EXIF says 'rotate 90 degrees': a phone photo as PIL gives it."""
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to view
    buf = io.BytesIO()
    make_image(5, 64, 48).save(buf, format="JPEG", exif=exif.tobytes())
    return Image.open(io.BytesIO(buf.getvalue()))


def test_in_memory_images_of_any_mode_score_as_the_single_device_class_does(two_workers):
    """A PIL image PNG cannot store (CMYK, float, 32-bit) or one whose EXIF rotates it travels to a worker
    as the pixels the single-device class would judge: same scores, no error."""
    base = make_image(3, 56, 40)
    images = {"cmyk": base.convert("CMYK"), "float": base.convert("F"), "ycbcr": base.convert("YCbCr"),
              "int32": base.convert("L").convert("I"),
              "exif-rotated": _exif_rotated_jpeg(), "rgb": base}
    items = [ScoreItem(images=[im], id=name) for name, im in images.items()]
    with QwenVLRewardModel(**JUDGE) as single:
        expected = single.score_items(items)
    assert all(r.error is None for r in expected), [r.error for r in expected]
    for schedule in ("round_robin", "dynamic"):
        two_workers.schedule = schedule
        try:
            got = two_workers.score_items(items)
        finally:
            two_workers.schedule = "round_robin"
        assert [r.id for r in got] == list(images)
        assert [r.error for r in got] == [None] * len(items)
        assert [r.score for r in got] == pytest.approx([r.score for r in expected], abs=1e-5)


def _the_one_failure(results, items, item_id: str):
    """The failed result of `item_id`, the call's only failure, an input error; every result in
    input order."""
    assert [r.id for r in results] == [it.id for it in items]
    failed = {r.id: r for r in results if r.score is None}
    assert set(failed) == {item_id}, {k: r.error for k, r in failed.items()}
    assert failed[item_id].error_kind == "input"
    return failed[item_id]


def test_metadata_a_worker_cannot_receive_fails_only_its_item(two_workers, image_files):
    """Metadata travels to the worker pickled: an item whose metadata does not pickle fails alone,
    naming the item and the key, and its batch-mates are scored."""
    items = [ScoreItem(images=[p], id=f"x{i}", metadata={"n": i}) for i, p in enumerate(image_files[:5])]
    items[2] = ScoreItem(images=[image_files[2]], id="locked", metadata={"lock": threading.Lock(), "n": 2})
    for schedule in ("round_robin", "dynamic"):
        two_workers.schedule, two_workers.micro_batch = schedule, 8
        try:
            results = two_workers.score_items(items)
        finally:
            two_workers.schedule, two_workers.micro_batch = "round_robin", None
        err = _the_one_failure(results, items, "locked").error
        assert "'locked' (#2)" in err and "metadata" in err and "'lock'" in err, err
        assert [r.metadata["n"] for r in results if r.id != "locked"] == [0, 1, 3, 4]


def test_metadata_the_worker_cannot_load_fails_only_its_item_and_no_worker_dies(two_workers, image_files):
    """Metadata holding an instance of a class only the caller can import (one defined in its
    script's __main__) pickles here but cannot be loaded in the worker: that item fails alone,
    naming the cause, with the caller's metadata; the workers live on and nothing is retried."""
    import types

    module = types.ModuleType("callers_own_module")  # importable here, unknown to a worker
    exec("class Tag:\n    def __init__(self, name):\n        self.name = name\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        tag = module.Tag("a")
        items = [ScoreItem(images=[p], id=f"x{i}") for i, p in enumerate(image_files[:5])]
        items[3] = ScoreItem(images=[image_files[3]], id="tagged", metadata={"tag": tag})
        pids = two_workers.worker_pids()
        restarts = two_workers.pool.total_restarts
        two_workers.micro_batch = 8
        try:
            results = two_workers.score_items(items)
        finally:
            two_workers.micro_batch = None
    finally:
        del sys.modules[module.__name__]
    tagged = _the_one_failure(results, items, "tagged")
    assert "'tagged' (#3)" in tagged.error and "metadata cannot be loaded in the worker" in tagged.error
    assert "callers_own_module" in tagged.error, tagged.error
    assert tagged.metadata == {"tag": tag}
    assert two_workers.worker_pids() == pids and two_workers.pool.total_restarts == restarts


def test_a_result_the_worker_cannot_send_back_fails_only_its_item_and_no_worker_dies(two_workers, image_files,
                                                                                     reference):
    """Metadata that loads in the worker as a lock or a mappingproxy, which its result carries back
    but the channel cannot (they do not pickle): the worker's reply failed the whole micro-batch
    (to_dict's deep copy raised), or, where the reply itself did not pickle, the worker died and
    every item it held was retried and lost. Now that item fails alone, its error naming the item,
    the field and the cause; the other items keep their scores, the same workers serve the next
    call, and none was restarted."""
    items = [ScoreItem(images=[p], id=f"x{i}", metadata={"n": i}) for i, p in enumerate(image_files[:6])]
    items[1] = ScoreItem(images=[image_files[1]], id="locked", metadata={"n": 1, "handle": LoadsAs(threading.Lock)})
    items[4] = ScoreItem(images=[image_files[4]], id="viewed",  # int.__dict__ is a mappingproxy
                         metadata={"n": 4, "view": LoadsAs(getattr, int, "__dict__")})
    pids = two_workers.worker_pids()
    restarts = two_workers.pool.total_restarts
    two_workers.micro_batch = 8  # each worker's items in one batch, the odd one among them
    try:
        results = two_workers.score_items(items)
    finally:
        two_workers.micro_batch = None
    assert [r.id for r in results] == [it.id for it in items]
    failed = {r.id: r for r in results if r.score is None}
    assert set(failed) == {"locked", "viewed"}, {k: r.error for k, r in failed.items()}
    for r, field, what in ((failed["locked"], "metadata.handle", "a lock: TypeError: cannot pickle '_thread.lock' "
                                                                 "object"),
                           (failed["viewed"], "metadata.view", "a mappingproxy: TypeError: cannot pickle "
                                                               "'mappingproxy' object")):
        assert r.error == (f"item {r.id!r} (#{r.index}): its result cannot be sent back from the worker on {r.device}: "
                           f"{field} ({what}); the item is failed; a result holds data that pickles (numbers, "
                           "text, lists and dicts)"), r.error
        assert r.error_kind == "input" and r.device in ("cpu#0", "cpu#1")
        assert r.metadata == items[r.index].metadata  # the caller's, as it gave it
    scored = [k for k in range(6) if k not in (1, 4)]
    assert [results[k].score for k in scored] == pytest.approx([reference[k] for k in scored], abs=1e-4)
    assert [results[k].metadata for k in scored] == [{"n": k} for k in scored]
    assert two_workers.worker_pids() == pids and two_workers.pool.total_restarts == restarts
    assert sorted(worker_processes()) == sorted(pids)  # no other worker was started
    again = two_workers.batch_score(image_files[:4])
    assert [r.score for r in again] == pytest.approx(reference[:4], abs=1e-4)
    assert two_workers.worker_pids() == pids


def test_an_undecodable_in_memory_image_is_named_as_the_caller_gave_it(two_workers, image_files):
    """Bytes the judge cannot decode: the error names them as the single-device class does, not by
    the pool's spill file (a path the caller never gave, removed when the call ends)."""
    items = [ScoreItem(images=[image_files[0]], id="good"), ScoreItem(images=[b"garbage bytes"], id="junk")]
    results = two_workers.score_items(items)
    assert results[0].error is None
    err = results[1].error
    assert "'junk' (#1)" in err and "cannot decode image <13 bytes>" in err, err
    assert str(two_workers.pool.tmp_dir) not in err, err


def test_an_idle_worker_that_dies_shows_in_health(two_workers, image_files, reference):
    """Killed between calls: the pool notices at once (not at the next call) and health() names
    it; the next call restarts it and scores everything."""
    from src.service.server import _describe_model

    m = two_workers
    assert m.pool.health() == {"workers": 2, "workers_alive": 2, "worker_deaths": [], "quantization": "none"}
    pid = m.worker_pids()[1]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not m.pool.health()["worker_deaths"] and time.monotonic() < deadline:
        time.sleep(0.05)
    health = _describe_model(m)  # what the service's /health shows
    assert health["workers_alive"] == 1, health
    assert health["worker_deaths"] == [f"worker cpu#1 (pid {pid}) died with signal SIGKILL while idle; "
                                       "it is restarted when a call needs it"], health
    results = m.batch_score(image_files[:3])  # round robin: item 1 is cpu#1's
    assert [r.score for r in results] == pytest.approx(reference[:3], abs=1e-4)
    assert [r.device for r in results] == ["cpu#0", "cpu#1", "cpu#0"]
    assert m.pool.health()["workers_alive"] == 2
    new = m.worker_pids()[1]
    assert new != pid
    m.seen_pids.add(new)
    assert_no_orphans([pid])


def test_close_after_an_exception_leaves_no_process(two_workers, image_files):
    """Closes the module's pool: the last test in the file to use it, before the tests that
    check that this process has no worker left."""
    pids = []
    with pytest.raises(ZeroDivisionError):
        with two_workers as m:
            pids = m.worker_pids()
            spill = m.pool.tmp_dir
            m.batch_score(image_files[:2])
            1 / 0
    assert_no_orphans(sorted({*pids, *m.seen_pids}))
    assert not spill.exists(), "the pool's spill folder is removed"
    m.close()  # idempotent after the context manager closed it
    with pytest.raises(RuntimeError, match="closed"):
        m.batch_score(image_files[:1])


class _HeldWhilePickled:
    """Metadata whose pickling (as the pool readies a call's items, before any worker has them)
    waits until the test lets it go."""

    def __init__(self):
        self.reached, self.release = threading.Event(), threading.Event()

    def __reduce__(self):
        self.reached.set()
        self.release.wait(30)
        return str, ("held",)


def test_close_while_a_call_readies_its_items_ends_that_call(tiny_cache, image_files):
    """close() from another thread while a call is still readying its items (spilling in-memory
    images, pickling metadata): the call ends with JudgeUnavailable. It went on to hand its
    batches to the stopped thread pool: RuntimeError('cannot schedule new futures after
    shutdown'), outside the judge's errors."""
    from src.models.reward.errors import JudgeUnavailable

    m = pool(1)
    pids, spill = m.worker_pids(), m.pool.tmp_dir
    held = _HeldWhilePickled()
    out: dict = {}

    def call():
        try:
            out["r"] = m.batch_score([ScoreItem(images=[make_image(1)], metadata={"held": held})])
        except Exception as e:
            out["r"] = e
    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    try:
        assert held.reached.wait(60)
        m.close()
    finally:
        held.release.set()
    caller.join(60)
    assert not caller.is_alive()
    assert isinstance(out["r"], JudgeUnavailable) and "closed" in str(out["r"]), repr(out["r"])
    assert_no_orphans(pids)
    assert not spill.exists(), "the pool's spill folder is removed"


def test_pools_created_and_closed_in_turn_leave_nothing_behind(tiny_cache, image_files):
    """A process that builds and closes judges in turn (a sweep, a notebook) keeps no thread, file
    descriptor or child process of a closed pool: the third cycle ends where the first did."""
    def cycle() -> tuple[list[str], int, list[int]]:
        with pool(1) as m:
            pids = m.worker_pids()
            assert m.batch_score(image_files[:2])[1].error is None
        assert_no_orphans(pids)
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(os.getpid())], capture_output=True,
                                  text=True).stdout.split()
        return (sorted(t.name for t in threading.enumerate()), len(os.listdir("/proc/self/fd")),
                [int(p) for p in children if not pid_gone(int(p))])

    first = cycle()  # lazy, once-per-process things (imports, caches) are in place from here
    cycle()
    assert cycle() == first


def test_workers_that_loaded_the_weights_differently_are_each_named_in_the_record(fp8_checkpoint, image_files,
                                                                                tmp_path, capsys):
    """Each worker reports how it loaded the weights: where all agree, the judge, summary.json and
    /health carry that one report, as for one judge; where they differ, each worker's by device
    (`quantization_by_worker`), `quantization` says `mixed: ...`, and the log warns once. Before,
    only worker 0's report was kept, so a worker that loaded otherwise went unrecorded.

    On the CPU no setting loads differently per worker (every CPU worker plans its load from the
    same inputs; the GPU's compute capability and the FP8 kernel's download are what differ on
    GPUs), so the two real reports come from the weights: the judge's folder is pointed at the FP8
    checkpoint after both workers loaded the plain one, as when a checkpoint is replaced while a
    service runs, and cpu#1, killed and restarted by the next call, loads and reports that."""
    import httpx

    from service_proc import ThreadServer
    from src.job.runner import run_job
    from src.models.reward.implementations.remote import RemoteRewardModel
    from src.service.server import create_app

    plain, fp8 = fp8_checkpoint
    folder = tmp_path / "judge"
    folder.symlink_to(plain, target_is_directory=True)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": str(i), "image": p}) + "\n" for i, p in enumerate(image_files[:3])))

    def summary_and_health(m: MultiGPURewardModel, name: str) -> tuple[dict, dict]:
        """A job's summary.json and the service's /health, with this judge."""
        run_job({"job": {"manifest": str(manifest), "output_dir": str(tmp_path / name)}}, base=tmp_path,
                progress=False, model=m)
        with ThreadServer(create_app(m)) as srv:
            health = httpx.get(srv.url + "/health", timeout=30).json()
            with RemoteRewardModel(url=srv.url, token_env=None) as remote:  # a client of that service
                assert remote.quantization_by_worker == health.get("quantization_by_worker")
        return json.loads((tmp_path / name / "summary.json").read_text()), health

    m = MultiGPURewardModel(device_ids=["cpu", "cpu"], progress=False, model_name=str(folder), template="quality")
    pids = set(m.worker_pids())
    try:
        assert m.quantization == "none"
        summary, health = summary_and_health(m, "agreed")
        assert summary["quantization"] == health["quantization"] == "none"
        assert "quantization_by_worker" not in summary and "quantization_by_worker" not in health
        assert "loaded the weights differently" not in capsys.readouterr().err

        swap = tmp_path / "swap"
        swap.symlink_to(fp8, target_is_directory=True)
        os.replace(swap, folder)
        victim = m.worker_pids()[1]
        os.kill(victim, signal.SIGKILL)
        results = m.batch_score(image_files[:2])  # round robin: item 1 restarts cpu#1, which loads the folder again
        pids.update(m.worker_pids())
        assert [r.device for r in results] == ["cpu#0", "cpu#1"] and all(r.error is None for r in results)
        assert m.worker_pids()[1] != victim

        fp8_report = "pre-quantized checkpoint (fp8, as its config.json declares; transformers dequantizes it on the CPU)"
        each = {"cpu#0": "none", "cpu#1": fp8_report}
        mixed = f"mixed: cpu#0: none | cpu#1: {fp8_report}"
        assert m.quantization == mixed
        assert m.quantization_by_worker == each
        summary, health = summary_and_health(m, "mixed")
        assert summary["quantization"] == health["quantization"] == mixed
        assert summary["quantization_by_worker"] == health["quantization_by_worker"] == each
        err = capsys.readouterr().err
        assert err.count("loaded the weights differently") == 1, err
        assert ("[pool] warning: the workers loaded the weights differently, so their scores may differ: "
                f"cpu#0: none | cpu#1: {fp8_report}") in err, err
    finally:
        m.close()
    assert_no_orphans(sorted(pids))
    # The same job again from its config, every row on disk: no judge is loaded (two workers loaded
    # now would both report FP8), and the summary keeps the record of the run that scored them.
    params = {"device_ids": ["cpu", "cpu"], "progress": False, "model_name": str(folder), "template": "quality"}
    again = run_job({"model": {"class_path": "multi_gpu", "params": params},
                     "job": {"manifest": str(manifest), "output_dir": str(tmp_path / "mixed")}}, base=tmp_path,
                    progress=False)
    assert again["resumed_from_disk"] == 3
    assert again["quantization"] == mixed and again["quantization_by_worker"] == each


def test_worker_killed_mid_batch_loses_no_item(tiny_cache, image_files, reference, monkeypatch):
    monkeypatch.setenv("REWARD_FAULT_DELAY_S", "1.0")  # slow batches, so the kill lands mid-batch
    with pool(2, micro_batch=2) as m:
        victim = m.worker_pids()[1]
        out: dict = {}
        t = threading.Thread(target=lambda: out.setdefault("r", m.batch_score(image_files[:11])))
        t.start()
        deadline = time.monotonic() + 60
        while not m.pool.workers[1].busy:  # a batch in flight: it lasts over a second
            assert time.monotonic() < deadline and t.is_alive(), "worker cpu#1 never got a batch"
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        t.join(timeout=120)
        assert not t.is_alive()
        results = out["r"]
        assert [r.index for r in results] == list(range(11))
        assert all(r.error is None for r in results), [r.error for r in results if r.error]
        assert [r.score for r in results] == pytest.approx(reference, abs=1e-4)
        assert m.pool.total_restarts >= 1
        new_pids = m.worker_pids()
        assert victim not in new_pids
    assert_no_orphans([victim, *new_pids])


def test_worker_that_cannot_start_fails_fast_with_its_traceback(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(WorkerStartError) as e:
        MultiGPURewardModel(device_ids=["cpu"], progress=False, model_name=str(tmp_path / "no-such-model"))
    msg = str(e.value)
    assert time.monotonic() - t0 < 90
    assert "cpu#0" in msg and "pid" in msg and "failed to start" in msg
    assert "worker traceback" in msg and "no-such-model" in msg
    assert not worker_processes()


def test_broken_launcher_fails_fast(tmp_path):
    with pytest.raises(WorkerStartError, match="cannot run"):
        MultiGPURewardModel(device_ids=["cpu"], progress=False, launcher=str(tmp_path / "nopython"), **JUDGE)
    # an interpreter that exits at once (an environment without the packages)
    with pytest.raises(WorkerStartError, match="exited with exit code 1 before it connected"):
        MultiGPURewardModel(device_ids=["cpu"], progress=False,
                            launcher=["/bin/sh", "-c", "echo broken env >&2; exit 1", "sh"], **JUDGE)
    assert not worker_processes()


def _venv_with_main_packages(tmp_path: Path) -> Path:
    """A separate venv whose interpreter sees the main env's packages through a .pth file."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    import torch

    main_site = Path(torch.__file__).resolve().parents[1]
    (site / "main_env.pth").write_text(str(main_site) + "\n")
    return venv / "bin" / "python"


def test_venv_python_and_command_prefix_launchers_and_log_prefix(tiny_cache, image_files, reference, tmp_path,
                                                                 capfd):
    """A venv's python as the worker's interpreter, behind a command prefix: one worker start
    shows both launcher forms (a bare path is the same command without the prefix)."""
    py = _venv_with_main_packages(tmp_path)
    assert launch_command(str(py)) == [str(py)]
    launcher = {"prefix": ["env", "REWARD_LAUNCH_TEST=1"], "python": str(py)}
    assert launch_command(launcher) == ["env", "REWARD_LAUNCH_TEST=1", str(py)]
    with pool(1, launcher=launcher) as m:
        res = m.batch_score(image_files[:3])
        pids = m.worker_pids()
        cmdline = open(f"/proc/{pids[0]}/cmdline", "rb").read().split(b"\0")[0].decode()
        environ = open(f"/proc/{pids[0]}/environ", "rb").read().split(b"\0")
    assert cmdline == str(py), "the prefix ran the venv's interpreter in the worker's process"
    assert b"REWARD_LAUNCH_TEST=1" in environ, "the prefix set the worker's environment"
    assert [r.score for r in res] == pytest.approx(reference[:3], abs=1e-4)
    err = capfd.readouterr().err
    assert "[cpu#0] model loaded on cpu#0" in err
    assert_no_orphans(pids)


def test_conda_launcher_command():
    cmd = launch_command({"conda": "judge-env"})
    assert cmd[1:] == ["run", "--no-capture-output", "-n", "judge-env", "python"]
    assert launch_command("conda:judge-env")[1:] == cmd[1:]
    with pytest.raises(ValueError, match="not both"):
        launch_command({"conda": "x", "python": "y"})
    with pytest.raises(ValueError, match="unknown key"):
        launch_command({"interpreter": "y"})


@pytest.mark.skipif(not os.environ.get("CONDA_EXE") and not __import__("shutil").which("conda"),
                    reason="conda is not installed on this machine")
def test_conda_launcher_runs_for_real(tiny_cache, image_files):  # pragma: no cover - needs conda
    env = os.environ.get("REWARD_TEST_CONDA_ENV", "base")
    with pool(1, launcher={"conda": env}) as m:
        assert m.batch_score(image_files[:1])[0].score is not None


def test_worker_env_has_only_the_worker_packages(tiny_cache, image_files, tmp_path):
    """The worker runs in the lean env setup_env.sh builds from requirements-worker.txt alone."""
    py = ROOT / ".venv-worker" / "bin" / "python"
    if not py.exists():
        pytest.skip("setup_env.sh has not built .venv-worker on this machine")
    probe = subprocess.run([str(py), "-c", "import pytest"], capture_output=True)
    assert probe.returncode != 0, "the worker env should hold only the worker's packages"
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps({"settings": JUDGE, "items": [{"images": [p]} for p in image_files[:2]]}))
    out = tmp_path / "out.json"
    run = subprocess.run([str(py), str(ROOT / "standalone" / "reward_worker.py"), "--tasks", str(tasks),
                          "--output", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # by hand, as its docstring says
    assert run.returncode == 0, run.stdout + run.stderr
    assert all(r["score"] is not None for r in json.loads(out.read_text()))
    with pool(1, launcher=str(py)) as m:
        assert m.batch_score(image_files[:2])[1].score is not None


def test_one_shot_debug_mode(tiny_cache, image_files, tmp_path, reference):
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps({"settings": JUDGE, "items": [{"images": [p], "id": f"t{i}"}
                                                              for i, p in enumerate(image_files[:3])]}))
    out = tmp_path / "out.json"
    run = subprocess.run([sys.executable, str(ROOT / "standalone" / "reward_worker.py"), "--tasks", str(tasks),
                          "--output", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())
    assert [r["id"] for r in results] == ["t0", "t1", "t2"]
    assert [r["score"] for r in results] == pytest.approx(reference[:3], abs=1e-4)


def test_one_shot_mode_takes_device_auto_and_names_a_misspelt_device(tiny_cache, image_files, tmp_path, reference):
    """`--device auto` (the default) settles on the CPU of this GPU-less machine and the results
    name it; a misspelt device is a usage error naming the value and the forms, no traceback."""
    import torch

    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps({"settings": JUDGE, "items": [{"images": [p], "id": f"t{i}"}
                                                              for i, p in enumerate(image_files[:2])]}))
    out = tmp_path / "out.json"
    worker = [sys.executable, str(ROOT / "standalone" / "reward_worker.py"), "--tasks", str(tasks), "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = subprocess.run([*worker, "--device", "cuda:x"], capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert ("error: --device: expected 'auto' (the first CUDA GPU, else the CPU), 'cpu', 'cuda', 'cuda:N' or a GPU "
            "index N, got 'cuda:x'") in bad.stderr, bad.stderr
    assert not out.exists()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: auto picks it")
    run = subprocess.run([*worker, "--device", "auto"], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert "scored 2/2 items on cpu;" in run.stdout, run.stdout
    results = json.loads(out.read_text())
    assert [r["device"] for r in results] == ["cpu", "cpu"]
    assert [r["score"] for r in results] == pytest.approx(reference[:2], abs=1e-4)


def test_an_image_is_converted_once_per_call_whatever_items_show_it(tmp_path):
    # image_memo.convert_once, the memo both hosts use (the pool spills files, Ray encodes PNGs):
    # the same PIL object, or equal bytes, is converted once and every showing gets its result; a
    # lookalike object is another image; a failed conversion is not kept; no memo converts each time.
    import io

    from PIL import Image

    from src.models.reward.image_memo import convert_once

    written: list[Path] = []

    def spill(img, name: str):
        def write() -> str:
            dest = tmp_path / name
            if isinstance(img, bytes):
                dest.write_bytes(img)
            else:
                img.save(dest, format="PNG")
            written.append(dest)
            return str(dest)
        return write

    source, lookalike = Image.new("RGB", (16, 12), "red"), Image.new("RGB", (16, 12), "red")
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), "blue").save(buf, format="PNG")
    data = buf.getvalue()
    memo: dict = {}
    first = convert_once(memo, source, spill(source, "a.png"))
    assert convert_once(memo, source, spill(source, "b.png")) == first == str(tmp_path / "a.png")
    assert convert_once(memo, lookalike, spill(lookalike, "c.png")) == str(tmp_path / "c.png")
    assert convert_once(memo, data, spill(data, "d.img")) == str(tmp_path / "d.img")
    assert convert_once(memo, bytes(bytearray(data)), spill(data, "e.img")) == str(tmp_path / "d.img")  # equal bytes
    assert [p.name for p in written] == ["a.png", "c.png", "d.img"] and len(memo) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "c.png", "d.img"]
    assert (tmp_path / "d.img").read_bytes() == data and Image.open(first).getpixel((0, 0)) == (255, 0, 0)

    def fails() -> str:
        raise OSError("disk full")

    bad = Image.new("RGB", (4, 4))
    for _ in range(2):  # each showing tries again and fails with its own error
        with pytest.raises(OSError, match="disk full"):
            convert_once(memo, bad, fails)
    assert len(memo) == 3
    convert_once(None, source, spill(source, "f.png"))
    convert_once(None, source, spill(source, "g.png"))
    assert [p.name for p in written[-2:]] == ["f.png", "g.png"]


def test_an_in_memory_image_several_items_show_is_spilled_once(tmp_path):
    # A source image shared by several edits travels as one file, so the worker sees one path and
    # its engine puts those items in one chunk (grouping.py); images that are not the same object
    # (or the same bytes) keep files of their own.
    import io

    from PIL import Image

    from src.models.reward.pool import _wire_item

    source, lookalike = Image.new("RGB", (32, 24), "red"), Image.new("RGB", (32, 24), "red")
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), "blue").save(buf, format="PNG")
    edit = buf.getvalue()
    items = [ScoreItem(images=[edit], source_images=[source]), ScoreItem(images=[bytes(bytearray(edit))],
                                                                         source_images=[source]),
             ScoreItem(images=["x.png"], source_images=[lookalike])]
    spilled: dict = {}
    wired = [_wire_item(it, tmp_path, i, spilled) for i, it in enumerate(items)]
    assert wired[0]["source_images"] == wired[1]["source_images"] == [str(tmp_path / "0-s0.png")]
    assert wired[0]["images"] == wired[1]["images"] == [str(tmp_path / "0-i0.img")]  # equal bytes: one file
    assert wired[2]["source_images"] == [str(tmp_path / "2-s0.png")] and wired[2]["images"] == [os.path.abspath("x.png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0-i0.img", "0-s0.png", "2-s0.png"]
    assert Image.open(tmp_path / "0-s0.png").getpixel((0, 0)) == (255, 0, 0)


def test_automatic_micro_batch_follows_the_schedule():
    m = MultiGPURewardModel.__new__(MultiGPURewardModel)  # the rule only, no workers
    m.micro_batch, m.schedule = None, "round_robin"
    m.settings = type("S", (), {"batch_size": 32})()
    m.pool = type("P", (), {"specs": [None]})()
    assert m.micro_batch_for(256) == 256          # one worker: one request, as fast as in-process
    assert m.micro_batch_for(10) == 32            # never below one batch
    assert m.micro_batch_for(100_000) == 256      # never above 8 batches: retries stay cheap
    m.pool.specs = [None] * 4
    assert m.micro_batch_for(256) == 64           # each worker's share
    m.schedule = "dynamic"
    assert m.micro_batch_for(1024) == 64          # a quarter of the share: idle workers pull more
    m.micro_batch = 5
    assert m.micro_batch_for(1024) == 5


def test_device_ids_and_pinning():
    assert resolve_device_ids([0, "1", "cuda:2", "cpu"]) == ["0", "1", "2", "cpu"]
    assert resolve_device_ids("0,1") == ["0", "1"]
    specs = worker_specs(["0", "3"], 2, {})
    assert [s.device_label for s in specs] == ["cuda:0#0", "cuda:0#1", "cuda:3#0", "cuda:3#1"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "0", "3", "3"]
    assert all(s.device == "cuda:0" for s in specs)
    cpu = worker_specs(["cpu", "cpu"], 1, {})
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in cpu] == ["", ""]


def test_auto_device_ids_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert resolve_device_ids("auto") == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match="found no GPU"):
        resolve_device_ids("auto")


def test_parent_killed_workers_exit_on_their_own(tiny_cache, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from src.models.reward.implementations.multi_gpu import MultiGPURewardModel
m = MultiGPURewardModel(device_ids=["cpu", "cpu"], progress=False, **{JUDGE!r})
print("PIDS", *m.worker_pids(), flush=True)
time.sleep(600)
""")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while not line.startswith("PIDS") and time.monotonic() < deadline:
            line = proc.stdout.readline()
        pids = [int(x) for x in line.split()[1:]]
        assert len(pids) == 2
        proc.kill()
        proc.wait()
        assert_no_orphans(pids, timeout=15)
    finally:
        proc.kill()


# -- start and death detection ----------------------------------------------------------------

def test_a_fast_start_failure_is_reported_before_a_slow_worker_has_loaded(tiny_cache):
    """Slot 0 sleeps 300 s before loading; slot 1 fails at once (its fault plug-in cannot be
    imported). The pool waits on all workers together: the error is slot 1's, long before slot
    0 could be ready, and no process is left."""
    import dataclasses

    from src.models.reward.pool import WorkerPool
    from src.models.reward.settings import JudgeSettings

    specs = worker_specs(["cpu", "cpu"], 1, {})
    specs[0] = dataclasses.replace(specs[0], env={**specs[0].env, "REWARD_FAULT_START_DELAY_S": "300"})
    specs[1] = dataclasses.replace(specs[1], env={**specs[1].env, "REWARD_TEST_PLUGIN": "src.testing.no_such_plugin"})
    procs_before = set(worker_processes([os.getpid()]))
    t0 = time.monotonic()
    with pytest.raises(WorkerStartError) as e:
        WorkerPool(specs, JudgeSettings(**JUDGE).to_params(), log=lambda line: None)
    assert time.monotonic() - t0 < 250, "not after slot 0's delay"
    text = str(e.value)
    assert "worker cpu#1 (pid" in text and "failed to start" in text, text
    assert "No module named 'src.testing.no_such_plugin'" in text, text
    assert set(worker_processes([os.getpid()])) <= procs_before, "the slow worker is stopped too"


def test_stopping_a_worker_whose_launch_was_interrupted_before_its_thread_started():
    # A Ctrl-C can land in launch() between creating the spawning thread and starting it (or
    # inside start()): stop() must neither fail ("cannot join thread before it is started") nor
    # skip a thread that does start moments later and launches the process.
    import threading

    from src.models.reward.pool import _join_spawner

    never = threading.Thread(target=lambda: None)
    _join_spawner(never, start_wait=0.2)  # returns: no process will come of it
    assert never.ident is None

    launched = []
    late = threading.Thread(target=lambda: launched.append("proc"))
    starter = threading.Thread(target=lambda: (time.sleep(0.05), late.start()))
    starter.start()
    _join_spawner(late, start_wait=30)
    starter.join()
    assert launched == ["proc"] and not late.is_alive()
