"""The Ray class on a local Ray started by the tests: CPU actors, the tiny model, real processes.

One Ray session for the module (Ray takes seconds to start): the `model` fixture starts it through
RayRewardModel(address=None) and the tests run in file order, up to the one that closes the model
and checks that no Ray process is left. The tests after it need no Ray in this process (one starts
its own driver in a subprocess).
"""
from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray

from conftest import ROOT, LoadsAs, call_in_thread, descendants, make_image, pid_gone
from src.models.reward import ConfigError, ScoreItem, build_reward_model, load_config
from src.models.reward.config import resolve_class, validate_params
from src.models.reward.implementations.local import QwenVLRewardModel
from src.models.reward.errors import JudgeConfigError, JudgeStartError
from src.models.reward.implementations.ray_actors import ActorStartError, RayRewardModel
from src.models.reward.scheduler import Scheduler

JUDGE = {"model_name": "tiny:qwen2_5_vl", "template": "quality", "batch_size": 2}
DELAY_S = 0.25  # per forward pass in the actors (engine.py's fault hook): calls last long enough to kill one


def setup_module() -> None:
    # Ray must not try to reach the network (usage statistics) from the test machine.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="module")
def single(tiny_cache, image_files):
    """The single-device class's scores of the twelve images, and its fingerprint."""
    with QwenVLRewardModel(**JUDGE) as judge:
        return [r.score for r in judge.batch_score(image_files)], judge.fingerprint


@pytest.fixture(scope="module")
def reference(single):
    return single[0]


@pytest.fixture(scope="module")
def model(tiny_cache, reference):
    # num_cpus is Ray's bookkeeping, not cores: the third one leaves room for a short-lived actor
    # beside the two of this model (and the one that replaces a killed actor).
    m = RayRewardModel(address=None, num_cpus=3, log_to_driver=False, num_actors=2, num_gpus_per_actor=0,
                       num_cpus_per_actor=1, micro_batch=2, max_retries=1, max_restarts=2, progress=False,
                       runtime_env={"env_vars": {"REWARD_FAULT_DELAY_S": str(DELAY_S), "REWARD_TEST_PLUGIN": "src.testing.faults",
                                                 "REWARD_TINY_CACHE": str(tiny_cache)}},
                       **JUDGE)
    yield m
    m.close()


def test_results_equal_the_single_device_class_in_input_order(model, single, reference, image_files):
    items = image_files[:11]  # odd: divides evenly by neither the actors nor the micro-batch
    results = model.batch_score(items)
    assert [r.index for r in results] == list(range(11))
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    assert [r.score for r in results] == pytest.approx(reference[:11], abs=1e-4)
    # both actors worked (dynamic dispatch), each on CPU, each labelled with its node
    devices = collections.Counter(r.device for r in results)
    assert len(devices) == 2 and all(re.fullmatch(r"actor[01]:cpu@[\d.]+", d) for d in devices), devices
    # the project's code travels with the job (py_modules), merged by Ray with the actors' own env
    for slot in model.slots:
        env = slot.info["runtime_env"]
        assert env["env_vars"]["REWARD_FAULT_DELAY_S"] == str(DELAY_S), env
        assert [m for m in env["py_modules"] if m.startswith("gcs://_ray_pkg_")], env
    assert model.fingerprint == single[1], "resume files carry over between the classes"
    # how the actors loaded the weights, which the job's summary.json records (as for the other classes)
    assert model.quantization == "none"


def test_second_call_reuses_the_actors_in_memory_images_travel_and_bad_items_fail_alone(
        model, reference, image_files, tmp_path):
    from PIL import Image

    ids, pids = model.actor_ids(), model.actor_pids()
    loads = [s.info["load_time_s"] for s in model.slots]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    pil = [Image.open(p) for p in image_files[:3]]
    raw = [open(p, "rb").read() for p in image_files[3:6]]
    items = [*pil, *raw, str(broken), *image_files[6:9], b"\x89PNG garbage", str(tmp_path / "missing.png")]
    results = model.batch_score(items)

    assert [r.index for r in results] == list(range(len(items)))
    good = [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert [results[i].score for i in good] == pytest.approx(reference[:9], abs=1e-4)
    assert all(results[i].error is None for i in good)
    for i, needle in ((6, "broken.png"), (10, "bytes"), (11, "missing.png")):
        assert results[i].score is None and results[i].error_kind == "image", results[i]
        assert f"#{i}" in results[i].error and needle in results[i].error, results[i].error
    # the same actors, the same processes, no second model load
    assert model.actor_ids() == ids and model.actor_pids() == pids
    assert [s.info["load_time_s"] for s in model.slots] == loads
    assert model.total_restarts == 0


def test_metadata_that_does_not_pickle_fails_alone(model, reference, image_files):
    # A lock (or an open file, a generator) in an item's metadata cannot travel to an actor: that
    # item fails, naming the key; before, Ray's TypeError left score_items and lost every item.
    items = [ScoreItem(images=[p], id=f"m{k}", metadata={"k": k}) for k, p in enumerate(image_files[:3])]
    items[1].metadata["lock"] = threading.Lock()
    results = model.score_items(items)
    assert [r.id for r in results] == ["m0", "m1", "m2"]
    assert [results[0].score, results[2].score] == pytest.approx([reference[0], reference[2]], abs=1e-4)
    assert results[0].metadata == {"k": 0}
    bad = results[1]
    assert bad.score is None and bad.error_kind == "input", bad
    assert bad.error.startswith("item 'm1' (#1): metadata key 'lock' cannot be sent to a Ray actor"), bad.error


def test_a_result_an_actor_cannot_send_back_fails_only_its_item_and_no_actor_is_replaced(
        model, reference, image_files):
    """Metadata that loads in the actor as a lock (or an RLock, deeper in it), which the item's
    result carries back but Ray cannot (they do not pickle): Ray failed the actor's whole
    micro-batch, its neighbour too. Now that item fails alone, its error naming the item, the
    actor, the field and the cause, with the caller's metadata; the other items keep their scores,
    and the same actors serve the next call, none replaced."""
    items = [ScoreItem(images=[p], id=f"x{i}", metadata={"n": i}) for i, p in enumerate(image_files[:6])]
    items[1] = ScoreItem(images=[image_files[1]], id="locked", metadata={"n": 1, "handle": LoadsAs(threading.Lock)})
    items[4] = ScoreItem(images=[image_files[4]], id="deep", metadata={"n": 4, "in": {"r": LoadsAs(threading.RLock)}})
    ids, restarts = model.actor_ids(), model.total_restarts
    results = model.score_items(items)  # micro_batch 2: each odd item beside a good one
    assert [r.id for r in results] == [it.id for it in items]
    failed = {r.id: r for r in results if r.score is None}
    assert set(failed) == {"locked", "deep"}, {k: r.error for k, r in failed.items()}
    for r, field, what in ((failed["locked"], "metadata.handle", "a lock: TypeError: cannot pickle '_thread.lock' "
                                                                 "object"),
                           (failed["deep"], "metadata.in.r", "a RLock: TypeError: cannot pickle '_thread.RLock' "
                                                             "object")):
        assert re.fullmatch(r"actor[01]:cpu@[\d.]+", r.device), r.device
        assert r.error == (f"item {r.id!r} (#{r.index}): its result cannot be sent back from the Ray actor "
                           f"{r.device}: {field} ({what}); the item is failed; a result holds data that pickles "
                           "(numbers, text, lists and dicts)"), r.error
        assert r.error_kind == "input"
        assert r.metadata == items[r.index].metadata  # the caller's, as it gave it
    scored = [0, 2, 3, 5]
    assert [results[k].score for k in scored] == pytest.approx([reference[k] for k in scored], abs=1e-4)
    assert [results[k].metadata for k in scored] == [{"n": k} for k in scored]
    assert model.actor_ids() == ids and model.total_restarts == restarts
    again = model.batch_score(image_files[:3])
    assert [r.score for r in again] == pytest.approx(reference[:3], abs=1e-4)
    assert model.actor_ids() == ids


def test_runtime_env_mistakes_are_named(model):
    # An unknown runtime_env field (a typo) is not applied by Ray, silently: refused, with the fix.
    with pytest.raises(ConfigError, match=r"runtime_env: unknown field 'envvars'; did you mean 'env_vars'\?"):
        build_reward_model({"class_path": "ray", "params": {**JUDGE, "num_actors": 1, "num_gpus_per_actor": 0,
                                                            "runtime_env": {"envvars": {"A": "1"}}}})
    # An env Ray cannot build: the cause, not only Ray's first line ("Failed to set up runtime environment.")
    with pytest.raises(ActorStartError) as e:
        RayRewardModel(num_actors=1, num_gpus_per_actor=0, num_cpus_per_actor=0.5, progress=False,
                       runtime_env={"conda": "no-such-env-5e1f"}, start_timeout_s=120, **JUDGE)
    text = str(e.value)
    assert "actor0 died while starting: Failed to set up runtime environment: " in text, text
    assert "Conda" in text or "no-such-env-5e1f" in text, text
    assert ray.is_initialized()


def test_in_memory_images_of_any_mode_score_as_the_single_device_class_does(model, tiny_cache):
    # A PIL image PNG cannot store (CMYK, float, 32-bit) or one whose EXIF rotates it travels to an
    # actor as the pixels the single-device class would judge (image_memo.png_ready).
    from test_pool import _exif_rotated_jpeg

    base = make_image(3, 56, 40)
    images = {"cmyk": base.convert("CMYK"), "float": base.convert("F"), "int32": base.convert("L").convert("I"),
              "exif-rotated": _exif_rotated_jpeg(), "rgb": base}
    items = [ScoreItem(images=[im], id=name) for name, im in images.items()]
    with QwenVLRewardModel(**JUDGE) as single:
        expected = single.score_items(items)
    got = model.score_items(items)
    assert [r.error for r in got] == [None] * len(items) == [r.error for r in expected]
    assert [r.score for r in got] == pytest.approx([r.score for r in expected], abs=1e-4)


def test_an_actor_killed_mid_call_loses_no_item(model, reference, image_files, capsys):
    victim_pid, victim_id = model.actor_pids()[0], model.actor_ids()[0]
    survivor_pid = model.actor_pids()[1]
    out: dict[str, object] = {}
    caller = threading.Thread(target=lambda: out.setdefault("results", model.batch_score(image_files)))
    caller.start()
    deadline = time.monotonic() + 60
    while not all(s.state == "busy" and s.batch for s in model.slots):  # both actors hold a micro-batch
        assert time.monotonic() < deadline, "the actors never both got work"
        time.sleep(0.01)
    held = list(model.slots[0].batch)
    os.kill(victim_pid, signal.SIGKILL)
    caller.join(timeout=120)
    assert not caller.is_alive()

    results = out["results"]
    assert [r.index for r in results] == list(range(len(image_files)))
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    assert [r.score for r in results] == pytest.approx(reference, abs=1e-4)
    # the items the dead actor held were scored again elsewhere
    assert all(results[i].device.startswith("actor1:") for i in held), [results[i].device for i in held]
    assert model.total_restarts == 1
    assert pid_gone(victim_pid)
    assert model.actor_ids()[0] != victim_id, "the dead actor is replaced by a new one"
    assert model.actor_pids()[1] == survivor_pid
    err = capsys.readouterr().err
    assert "died while scoring" in err and "replacing actor0" in err, err


def test_actors_that_loaded_the_weights_differently_are_each_named(model, fp8_checkpoint, image_files, tmp_path):
    """As for multi_gpu (test_pool): each actor's report, `mixed: ...` where they differ. Before,
    the first actor's report stood for all. A second judge on the Ray the module's judge started;
    its folder is pointed at the FP8 checkpoint after both actors loaded the plain one, and the
    actor killed meanwhile loads that when the next call replaces it."""
    plain, fp8 = fp8_checkpoint
    folder = tmp_path / "judge"
    folder.symlink_to(plain, target_is_directory=True)
    judge = RayRewardModel(address=None, log_to_driver=False, num_actors=2, num_gpus_per_actor=0,
                           num_cpus_per_actor=0.5, micro_batch=1, max_restarts=1, progress=False,
                           model_name=str(folder), template="quality", batch_size=2)
    try:
        assert judge.quantization == "none" and judge.quantization_by_worker is None
        swap = tmp_path / "swap"
        swap.symlink_to(fp8, target_is_directory=True)
        os.replace(swap, folder)
        victim = judge.actor_pids()[1]
        os.kill(victim, signal.SIGKILL)
        results = judge.batch_score(image_files[:4])  # an item each: actor1's batch finds it dead
        assert all(r.error is None for r in results), [r.error for r in results]
        assert pid_gone(victim) and judge.total_restarts == 1
        deadline = time.monotonic() + 120
        while judge.slots[1].state == "starting":  # its replacement reports how it loaded at a call
            assert time.monotonic() < deadline, "actor1's replacement never started"
            assert all(r.error is None for r in judge.batch_score(image_files[:2]))
        fp8_report = "pre-quantized checkpoint (fp8, as its config.json declares; transformers dequantizes it on the CPU)"
        labels = [s.info["label"] for s in judge.slots]
        assert judge.quantization_by_worker == {labels[0]: "none", labels[1]: fp8_report}
        assert judge.quantization == f"mixed: {labels[0]}: none | {labels[1]}: {fp8_report}"
        pids = [p for p in judge.actor_pids() if p]
    finally:
        judge.close()
    _assert_gone({p: "actor" for p in pids})


def test_retries_are_bounded_then_the_item_fails_with_the_reason():
    done = []
    items = [ScoreItem(images=["x.png"]) for k in range(3)]
    call = Scheduler(items, n_workers=1, micro_batch=3, max_retries=1, on_done=done.append, noun="actor")

    batch = call.take(0)
    call.died(batch, "actor0 (pid 1) died")
    assert list(call.retry) == [[0], [1], [2]], "retried alone, one by one"
    call.died(call.take(0), "actor1 (pid 2) died")
    assert call.results[0] is not None and call.results[0].score is None
    assert call.results[0].error == "item #0: tried 2 times; the last time actor1 (pid 2) died"
    assert call.results[0].error_kind == "worker_died" and call.remaining == 2 and done == [1]


def test_start_failures_name_the_actor_and_the_cause_and_leave_the_session(model):
    # joins the Ray this process already runs (the model's): close() must not shut that down
    with pytest.raises(ActorStartError) as e:
        RayRewardModel(num_actors=1, num_gpus_per_actor=0, num_cpus_per_actor=0.5, progress=False,
                       model_name="/nonexistent/judge-checkpoint", template="quality")
    text = str(e.value)
    assert isinstance(e.value, JudgeStartError), "the CLI and the service catch it as a judge error"
    assert re.search(r"actor0:cpu@[\d.]+ \(pid \d+\) on [\d.]+ failed to start", text), text
    assert "/nonexistent/judge-checkpoint" in text and "--- actor traceback ---" in text
    pid = int(re.search(r"\(pid (\d+)\)", text).group(1))
    deadline = time.monotonic() + 20
    while not pid_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid_gone(pid), "the failed actor is killed"
    assert ray.is_initialized(), "a Ray this object did not start is left running"

    # more than the local Ray (the model's, shared) has: refused at once
    with pytest.raises(JudgeConfigError, match=r"1 actor\(s\) x 8 CPU = 8 CPU but Ray has 3"):
        RayRewardModel(num_actors=1, num_gpus_per_actor=0, num_cpus_per_actor=8, start_timeout_s=2, progress=False,
                       **JUDGE)
    # more than is free (the model's two actors hold two of the three CPUs): one actor is never
    # placed, so the start times out with what was asked and what is there
    with pytest.raises(ActorStartError) as e:
        RayRewardModel(num_actors=2, num_gpus_per_actor=0, num_cpus_per_actor=1, start_timeout_s=2, progress=False,
                       **JUDGE)
    assert re.search(r"actor\d(, actor\d)? not ready within start_timeout_s=2s: each asks for 1 CPU and 0 GPU; "
                     r"the cluster has 3 CPU, 0 GPU \(\d+ CPU, 0 GPU free\)", str(e.value)), str(e.value)
    with pytest.raises(ValueError, match=r"'auto' found 0 GPU\(s\)"):
        RayRewardModel(num_actors="auto", num_gpus_per_actor=1, progress=False, **JUDGE)
    assert ray.is_initialized()


def test_a_pil_image_several_items_show_is_encoded_once():
    # One PNG per PIL image for the call: a shared source travels as one bytes object, and equal
    # bytes give the actor's engine one key for it (grouping.py).
    from PIL import Image

    from src.models.reward.implementations.ray_actors import _wire_item

    source, lookalike = Image.new("RGB", (32, 24), "red"), Image.new("RGB", (32, 24), "red")
    encoded: dict = {}
    wired = [_wire_item(ScoreItem(images=["e.png"], source_images=[src]), i, encoded)
             for i, src in enumerate((source, source, lookalike))]
    assert wired[0].source_images[0] is wired[1].source_images[0] and len(encoded) == 2
    assert wired[2].source_images[0] is not wired[0].source_images[0]
    assert wired[2].source_images[0] == wired[0].source_images[0]  # the same pixels: the same PNG bytes


def test_config_alias_and_parameter_errors():
    cls = resolve_class("ray")
    assert cls is RayRewardModel
    cfg = load_config(ROOT / "configs" / "ray.yaml")
    validate_params("ray", cls, cfg["model"]["params"])
    with pytest.raises(ConfigError, match="unknown parameter 'num_actor'. Did you mean 'num_actors'?"):
        build_reward_model({"class_path": "ray", "params": {"model_name": "x", "num_actor": 2}})
    with pytest.raises(ConfigError, match="with num_gpus_per_actor: 0 .CPU actors. give a number"):
        build_reward_model({"class_path": "ray", "params": {"model_name": "x", "num_gpus_per_actor": 0}})
    with pytest.raises(ConfigError, match="num_actors: expected an integer or 'auto'"):
        build_reward_model({"class_path": "ray", "params": {"model_name": "x", "num_actors": "many"}})


def test_batches_past_the_timeout_are_retried_then_fail_and_with_no_actor_left_the_rest_fail(model, image_files):
    # Every batch takes longer than this (the actors sleep before each forward pass): each actor
    # in turn is killed and, with max_restarts 0, given up.
    model.batch_timeout_s, model.max_retries, model.max_restarts = 0.05, 1, 0
    [r] = model.batch_score(image_files[:1])
    pids = model.actor_pids()  # the last actor of each slot
    assert r.score is None and r.error_kind == "worker_timeout", r
    assert re.fullmatch(r"item #0: tried 2 times; the last time actor\d:cpu@[\d.]+ \(pid \d+\) gave no answer "
                        r"within batch_timeout_s=0.05s while scoring 1 item\(s\)", r.error), r.error
    assert [s.state for s in model.slots] == ["lost", "lost"]
    results = model.batch_score(image_files[:2])
    assert [r.index for r in results] == [0, 1]
    for r in results:
        assert r.score is None and r.error_kind == "worker_died"
        assert re.match(r"item #\d: no actor left: actor0 failed \d time\(s\) in a row \(max_restarts=0\); last: ",
                        r.error), r.error
    deadline = time.monotonic() + 20
    while not all(pid_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(pid_gone(p) for p in pids), "timed-out actors are killed"


def _assert_gone(procs: dict) -> None:
    """Every process of procs (pid -> its command line) has exited, within 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(pid_gone(p) for p in procs):
        time.sleep(0.2)
    left = {p: a for p, a in procs.items() if not pid_gone(p)}
    assert not left, f"Ray processes left behind: {left}"


def test_close_stops_the_actors_and_the_ray_it_started(model):
    from ray._private import worker as ray_worker

    session_dir = ray_worker._global_node.get_session_dir_path()
    procs = descendants(os.getpid())
    names = " ".join(procs.values())
    assert "raylet" in names and "gcs_server" in names and "ray::" in names, procs
    model.close()
    model.close()  # idempotent
    assert not ray.is_initialized()
    _assert_gone(procs)
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert session_dir not in ps, "a process of this Ray session is still running"
    with pytest.raises(RuntimeError, match="closed"):
        model.batch_score(["x.png"])


# Two small judges sharing one local Ray: one CPU actor each, the trained tiny judge, one demo image.
SHARED = dict(num_actors=1, num_gpus_per_actor=0, num_cpus_per_actor=1, progress=False, log_to_driver=False,
              model_name="tiny:judge", template="quality", min_pixels=12544, max_pixels=12544)
DEMO_IMAGE = str(ROOT / "data" / "demo" / "images" / "00_edited.png")


def test_two_judges_share_the_ray_one_of_them_started(tiny_cache):
    """Two RayRewardModel objects in one process (a quality judge and an edit judge): the second
    uses the Ray the first started; the first one closed leaves the second working, and the last
    one closed stops that Ray. Before, closing the first shut Ray down under the second, whose next
    call raised (and silently started another local Ray that nothing stopped)."""
    assert not ray.is_initialized()
    with pytest.raises(ConfigError, match="py_executable: /nonexistent/bin/python does not exist"):
        # on a Ray started here the env's python must exist here (else the actor waits start_timeout_s)
        build_reward_model({"class_path": "ray", "params": {**SHARED, "num_cpus": 2,
                                                            "runtime_env": {"py_executable": "/nonexistent/bin/python"}}})
    assert not ray.is_initialized()
    _the_second_judge_outlives_the_first(RayRewardModel, lambda first: first.close())


def _the_second_judge_outlives_the_first(first_cls: type, close_first) -> RayRewardModel:
    """Two judges (SHARED), the first of class `first_cls` starting a local Ray and the second
    sharing it: after `close_first(first)` the second keeps that Ray and scores as the first did;
    the last to close stops it, and no Ray process is left. Returns the first judge."""
    first = first_cls(address=None, num_cpus=2, **SHARED)
    procs: dict[int, str] = {}
    try:
        second = RayRewardModel(address=None, **SHARED)
        try:
            [expected] = first.batch_score([DEMO_IMAGE])
            procs = descendants(os.getpid())
            close_first(first)
            assert ray.is_initialized(), "closing the first judge shut down the Ray the second one uses"
            [r] = second.batch_score([DEMO_IMAGE])
            assert r.error is None and r.score == pytest.approx(expected.score, abs=1e-5)
        finally:
            second.close()
    finally:
        first.close()
    assert not ray.is_initialized(), "the last judge to close stops the Ray they shared"
    _assert_gone(procs)
    return first


class _ClosersMeet(RayRewardModel):
    """A judge whose close(), called from the threads named `closer-*`, lets each of them read
    whether the judge is closed only once every one of them has: they all enter close() at the
    same instant, deterministically (a Barrier in the real code path, no sleep)."""

    closers = 3

    def __init__(self, **kw):
        self._meet = threading.Barrier(self.closers, timeout=60)
        self._met: set[str] = set()
        super().__init__(**kw)

    @property
    def _closed(self) -> bool:
        value = self.__dict__["_closed_flag"]
        name = threading.current_thread().name
        if name.startswith("closer-") and name not in self._met:
            self._met.add(name)
            self._meet.wait()  # every closer has read the flag before any goes on
        return value

    @_closed.setter
    def _closed(self, value: bool) -> None:
        self.__dict__["_closed_flag"] = value


def test_closing_one_judge_from_several_threads_at_once_leaves_the_other_judge_its_ray(tiny_cache):
    """Three threads close the first of two judges sharing a Ray, all entering close() together:
    the Ray's user count drops by one, not three, so the second judge keeps its Ray and scores; the
    last close stops it. Before, every closer passed close()'s "already closed?" check before any
    set it, each gave up the shared connection, and the count reached 0: ray.shutdown() under the
    second judge."""
    def close_from_every_closer(first: _ClosersMeet) -> None:
        closers = [call_in_thread(first.close, name=f"closer-{k}") for k in range(_ClosersMeet.closers)]
        for thread, out in closers:
            thread.join(timeout=120)
            assert not thread.is_alive() and "result" in out and out["result"] is None, out
        assert first._met == {f"closer-{k}" for k in range(_ClosersMeet.closers)}, "every closer met the others"
        assert [s.state for s in first.slots] == ["lost"]  # every close() returned with the actors killed
        first.close()  # idempotent after the concurrent ones

    assert not ray.is_initialized()
    _the_second_judge_outlives_the_first(_ClosersMeet, close_from_every_closer)


def _open_fds() -> dict[int, str]:
    """This process's file descriptors: fd -> what it is (a path, 'socket:[inode]', 'pipe:[inode]', ...)."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return out


def _tcp_ends() -> dict[str, tuple[int, str | None, bool]]:
    """This process's TCP sockets, by 'socket:[inode]': (local port, peer 'host:port' or None, listening)."""
    import socket

    ends = {}
    for fd, what in _open_fds().items():
        if not what.startswith("socket:"):
            continue
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with sock:  # closes the copy only
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                host, port = sock.getpeername()[:2]
                peer = f"{host.removeprefix('::ffff:')}:{port}"
            except OSError:
                peer = None
            listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
            ends[what] = (sock.getsockname()[1], peer, listening)
    return ends


def test_judges_created_and_closed_in_turn_leave_only_the_sockets_ray_itself_keeps(tiny_cache):
    """A process that builds and closes Ray judges in turn, each starting a local Ray, keeps no file
    descriptor of the judge's. Two TCP sockets per cycle do stay: Ray's own (ray 2.60), kept by its
    C++ core after ray.shutdown() with no Python object left to close them (strace: the gRPC
    channel of ray._raylet.GcsClient to that session's GCS, and a connection the driver's
    core-worker gRPC server accepted from the actor); Ray does not reuse them. Each socket a cycle
    adds must be one of those, named by what it was connected to while that Ray ran; every other
    descriptor is as before the cycle (Ray's driver log moves to the new session's folder)."""
    def outside_sockets(fds: dict[int, str]) -> list[str]:
        return sorted(re.sub(r"/session_[^/]+/", "/session_*/", w) for w in fds.values() if not w.startswith("socket:"))

    def cycle() -> tuple[str, dict[str, tuple[int, str | None, bool]]]:
        assert not ray.is_initialized()
        procs: dict[int, str] = {}
        judge = RayRewardModel(address=None, num_cpus=1, **SHARED)
        try:
            procs = descendants(os.getpid())
            assert judge.batch_score([DEMO_IMAGE])[0].error is None
            gcs, live = ray.get_runtime_context().gcs_address, _tcp_ends()
        finally:
            judge.close()
        _assert_gone(procs)
        return gcs, live

    cycle()  # once per process: gRPC's and Ray's event loops, Ray's event log files
    for k in range(3):
        before = _open_fds()
        gcs, live = cycle()
        after = _open_fds()
        assert outside_sockets(after) == outside_sockets(before), f"cycle {k}: a descriptor other than a socket changed"
        added = sorted(w for w in set(after.values()) - set(before.values()) if w.startswith("socket:"))
        servers = {port for port, peer, listening in live.values() if listening}  # the driver's gRPC server
        to_gcs = [s for s in added if s in live and live[s][1] == gcs]
        accepted = [s for s in added if s in live and not live[s][2] and live[s][0] in servers]
        assert len(to_gcs) <= 1 and len(accepted) <= 1 and sorted(to_gcs + accepted) == added, (
            f"cycle {k}: sockets other than Ray's GCS channel ({gcs}) and its server's accepted connection "
            f"(ports {servers}): {[(s, live.get(s)) for s in added]}")
        assert not any(s in after.values() for s, (_, _, listening) in live.items() if listening), \
            "Ray's listening socket is closed"


def test_close_from_another_thread_ends_the_call_in_flight_and_stops_ray(tiny_cache):
    """close() while another thread's call waits on an actor (one that never answers: it hangs on
    its item): the call ends at once with JudgeUnavailable, and close() returns after it, with the
    actor and the Ray it started stopped. close() killed the actors and shut Ray down under the
    call, which went on with the slots close() had emptied: ValueError('Invalid type of object
    refs, NoneType') or an AssertionError, outside the judge's errors."""
    from src.models.reward.errors import JudgeUnavailable

    assert not ray.is_initialized()
    judge = RayRewardModel(address=None, num_cpus=1, log_to_driver=False, num_actors=1, num_gpus_per_actor=0,
                           progress=False, runtime_env={"env_vars": {"REWARD_FAULT_HANG_ON_ID": "hang",
                                                                     "REWARD_TEST_PLUGIN": "src.testing.faults",
                                                                     "REWARD_TINY_CACHE": str(tiny_cache)}},
                           **JUDGE)
    procs: dict[int, str] = {}
    try:
        procs = descendants(os.getpid())
        assert judge.actor_pids()[0] in procs
        caller, out = call_in_thread(judge.batch_score, [ScoreItem(images=[make_image(1)], id="hang")])
        deadline = time.monotonic() + 60
        while judge.slots[0].state != "busy":  # the item is with the actor, which will never answer
            assert time.monotonic() < deadline and caller.is_alive(), f"the call never reached the actor: {out}"
            time.sleep(0.01)
        judge.close()
        assert not caller.is_alive(), "close() returned before the call it ended"
        assert isinstance(out["result"], JudgeUnavailable) and "closed" in str(out["result"]), repr(out["result"])
        assert not ray.is_initialized()
        with pytest.raises(JudgeUnavailable, match="closed"):
            judge.batch_score([make_image(2)])
    finally:
        judge.close()
    _assert_gone(procs)


@pytest.mark.skipif(bool(os.environ.get("RAY_ADDRESS")) or os.path.exists("/tmp/ray/ray_current_cluster"),
                    reason="a Ray cluster runs on this machine")
def test_address_auto_without_a_cluster_says_how_to_start_one():
    assert not ray.is_initialized()
    with pytest.raises(ConnectionError, match=r"could not connect to Ray at address 'auto': Could not find any "
                                              r"running Ray instance.*Start a cluster with `ray start --head`"):
        RayRewardModel(address="auto", num_actors=1, num_gpus_per_actor=0, progress=False, **JUDGE)
    assert not ray.is_initialized()

DRIVER = """
import sys
sys.path.insert(0, {root!r})
from src.models.reward.implementations.ray_actors import RayRewardModel

judge = RayRewardModel(num_cpus=1, log_to_driver=False, num_actors=1, num_gpus_per_actor=0, progress=False,
                       runtime_env={{"env_vars": {{"REWARD_FAULT_DELAY_S": "0.5", "REWARD_TEST_PLUGIN": "src.testing.faults"}}}},
                       model_name="tiny:qwen2_5_vl", template="quality", batch_size=2)
print("ready", flush=True)
while True:
    judge.batch_score(sys.argv[1:])
"""


def test_a_driver_stopped_by_sigterm_mid_call_leaves_no_ray_process(tiny_cache, image_files, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(root=str(ROOT)))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "REWARD_TINY_CACHE": str(tiny_cache)}
    proc = subprocess.Popen([sys.executable, str(script), *image_files[:4]], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready", "the driver did not start"
        time.sleep(1.0)  # a call is in flight
        procs = descendants(proc.pid)
        assert "raylet" in " ".join(procs.values()) and any(a.startswith("ray::_JudgeActor") for a in procs.values()), procs
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # a failed check above: still stop it the way that cleans up
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    _assert_gone(procs)
