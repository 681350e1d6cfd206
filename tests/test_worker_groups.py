"""Worker groups (gpus_per_worker): devices cut into groups, one worker per group, pinned to its
group with CUDA_VISIBLE_DEVICES. Real worker processes and the tiny model; no GPU here, so GPU
groups are checked up to the worker's own view of its pinning, and CPU groups score for real."""
from __future__ import annotations

import re

import pytest

from conftest import assert_no_orphans
from src.models.reward import ConfigError, build_reward_model
from src.models.reward.implementations.local import QwenVLRewardModel
from src.models.reward.implementations.multi_gpu import MultiGPURewardModel, device_groups, worker_specs
from src.models.reward.pool import WorkerStartError

JUDGE = {"model_name": "tiny:qwen2_5_vl", "template": "quality", "batch_size": 2}


def test_eight_gpus_in_pairs_make_four_workers_each_pinned_to_its_pair():
    ids = [str(i) for i in range(8)]
    assert device_groups(ids, 2) == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    specs = worker_specs(ids, 1, {}, gpus_per_worker=2)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0,1", "2,3", "4,5", "6,7"]
    assert [s.device_label for s in specs] == ["cuda:0+1", "cuda:2+3", "cuda:4+5", "cuda:6+7"]
    # inside its group a worker sees cuda:0 and cuda:1; inputs go to the first
    assert all(s.device == "cuda:0" and s.devices == ("cuda:0", "cuda:1") for s in specs)
    four = worker_specs(ids, 1, {}, gpus_per_worker=4)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in four] == ["0,1,2,3", "4,5,6,7"]
    assert four[0].devices == ("cuda:0", "cuda:1", "cuda:2", "cuda:3")


def test_groups_of_one_are_the_workers_of_before():
    ids = ["0", "3"]
    one = worker_specs(ids, 2, {}, gpus_per_worker=1)
    assert one == worker_specs(ids, 2, {})
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in one] == ["0", "0", "3", "3"]
    assert [s.device_label for s in one] == ["cuda:0#0", "cuda:0#1", "cuda:3#0", "cuda:3#1"]
    assert all(s.devices == () for s in one)


def test_cpu_entries_group_into_one_cpu_worker_per_group_with_their_threads():
    specs = worker_specs(["cpu"] * 4, 1, {}, gpus_per_worker=2)
    assert [s.device_label for s in specs] == ["cpu#0", "cpu#1"]
    assert all(s.device == "cpu" and s.devices == () and s.env["CUDA_VISIBLE_DEVICES"] == "" for s in specs)
    # the threads of the machine are shared by 2 workers, not 4
    assert specs[0].num_threads == max(1, (__import__("os").cpu_count() or 1) // 2)


@pytest.mark.parametrize("ids, k, expected", [
    ([str(i) for i in range(6)], 4, r"gpus_per_worker: 4 does not divide the 6 device_ids"),
    (["0", "1", "2"], 2, r"gpus_per_worker: 2 does not divide the 3 device_ids \(0, 1, 2\)"),
    (["0", "cpu"], 2, r"gpus_per_worker: the group 0, cpu mixes cpu and GPUs"),
    (["1", "1"], 2, r"gpus_per_worker: the group 1, 1 names a GPU twice"),
    (["0", "1"], 0, r"gpus_per_worker: must be an integer of at least 1"),
])
def test_bad_groups_are_config_errors_naming_the_numbers(ids, k, expected):
    with pytest.raises(ValueError, match=expected):
        device_groups(ids, k)
    with pytest.raises(ConfigError, match=r"Problem with class_path 'multi_gpu': " + expected):
        build_reward_model({"class_path": "multi_gpu",
                            "params": {**JUDGE, "device_ids": ids, "gpus_per_worker": k, "progress": False}})


def test_memory_budget_needs_a_group_of_gpus():
    with pytest.raises(ConfigError, match="max_memory_per_gpu_gb: places a judge spread over a group of GPUs"):
        build_reward_model({"class_path": "multi_gpu", "params": {**JUDGE, "device_ids": ["cpu", "cpu"],
                                                                  "gpus_per_worker": 2, "max_memory_per_gpu_gb": 20}})
    with pytest.raises(ConfigError, match="max_memory_per_gpu_gb: must be > 0 GB"):
        build_reward_model({"class_path": "multi_gpu", "params": {**JUDGE, "device_ids": ["0", "1"],
                                                                  "gpus_per_worker": 2, "max_memory_per_gpu_gb": 0}})
    with pytest.raises(ConfigError, match="gpus_per_worker: expected an integer"):
        build_reward_model({"class_path": "multi_gpu", "params": {**JUDGE, "gpus_per_worker": "two"}})
    with pytest.raises(ValueError, match="max_memory_per_gpu_gb: places a judge spread over a group"):
        QwenVLRewardModel(**JUDGE, max_memory_per_gpu_gb=10)


def test_each_gpu_group_worker_sees_its_own_group(tiny_cache, capfd):
    """Real worker processes on GPU groups: each logs the CUDA_VISIBLE_DEVICES it was started with
    and the devices its judge spreads over, then (no GPU on this machine) fails to start with an
    error that names its group."""
    with pytest.raises(WorkerStartError) as err:
        MultiGPURewardModel(device_ids=["2", "3", "5", "6"], gpus_per_worker=2, progress=False,
                            start_timeout_s=300, **JUDGE)
    assert re.search(r"worker cuda:(2\+3|5\+6) \(pid \d+\) failed to start: .*torch sees no GPU", str(err.value))
    logs = capfd.readouterr()
    text = logs.out + logs.err
    for group, visible in (("2+3", "2,3"), ("5+6", "5,6")):
        assert (f"[GPU {group}] worker cuda:{group}: CUDA_VISIBLE_DEVICES='{visible}', "
                "judge on cuda:0, cuda:1") in text
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", str(err.value))]
    assert_no_orphans(pids)


def test_cpu_groups_score_as_the_single_device_class(tiny_cache, image_files):
    items = image_files[:7]
    with QwenVLRewardModel(**JUDGE) as j:
        reference = [r.score for r in j.batch_score(items)]
    with MultiGPURewardModel(device_ids=["cpu"] * 4, gpus_per_worker=2, progress=False, **JUDGE) as m:
        pids = m.worker_pids()
        assert len(pids) == 2
        results = m.batch_score(items)
        assert [r.index for r in results] == list(range(7))
        assert [r.device for r in results] == [f"cpu#{i % 2}" for i in range(7)]
        assert [r.score for r in results] == pytest.approx(reference, abs=1e-4)
    assert_no_orphans(pids)


def test_the_readme_group_config_is_valid():
    """The README's example config for groups passes the config checks as written (it is not
    built here: it names eight GPUs)."""
    import yaml

    from src.models.reward.config import resolve_spec

    readme = (__import__("conftest").ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Judges bigger than one GPU"):]
    block = section[section.index("```yaml\n") + 8:section.index("```", section.index("```yaml\n") + 8)]
    class_path, cls, params = resolve_spec(yaml.safe_load(block)["model"])
    assert cls is MultiGPURewardModel and params["gpus_per_worker"] == 2
    assert device_groups([str(d) for d in params["device_ids"]], params["gpus_per_worker"]) == \
        [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]


def test_a_group_whose_layers_land_on_the_cpu_is_refused(tiny_qwen25):
    """transformers' own placement (device_map='auto', on a machine whose only device is the CPU)
    put the layers on the CPU: a judge spread over a group refuses that, naming the budget."""
    from types import SimpleNamespace

    from transformers import AutoModelForImageTextToText

    from src.models.reward.loading import Loading
    from src.models.reward.settings import JudgeSettings

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen25, device_map="auto")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    engine = SimpleNamespace(devices=["cuda:0", "cuda:1"], device_label="cuda:4+5",
                             settings=JudgeSettings(model_name=tiny_qwen25, max_memory_per_gpu_gb=30))
    with pytest.raises(ValueError, match=r"the judge does not fit its 2 GPUs \(cuda:4\+5, max_memory_per_gpu_gb=30\): "
                                         r"transformers placed layers on cpu"):
        Loading._check_placement(engine, model)
