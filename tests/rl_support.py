"""What the RL tests share: a reward service in a thread of the test process, hosting the tiny
judge, and the place of the older framework releases installed beside the current ones."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from service_proc import ROOT, ThreadServer

# setup_env.sh installs verl 0.6 and OpenRLHF 0.8 here (pip --target, no dependencies): each is
# tested in a subprocess that puts its folder first on the path, ahead of the current release.
COMPAT = Path(os.environ.get("REWARD_RL_COMPAT") or ROOT / ".venv" / "rl-compat")


def compat_dir(name: str) -> Path:
    path = COMPAT / name
    if not path.is_dir():
        raise AssertionError(f"{path} is missing: bash setup_env.sh installs it (requirements-rl-compat.txt)")
    return path


@contextlib.contextmanager
def judge_service(allowed_dirs: list[str], token: str | None = None, template: str = "alignment"):
    """The service in a thread of this process, hosting the tiny judge loaded here (the trainers
    import torch anyway; test_service.py covers the `main.py serve` process). Yields (server, judge):
    the judge scores the same items directly, for comparison, while no request is in flight."""
    import torch

    from src.models.reward.implementations.local import QwenVLRewardModel
    from src.service.server import create_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see service_proc.ServiceProcess: OpenMP threads stall on a shared CPU
    judge = QwenVLRewardModel(model_name="tiny:qwen2_vl", template=template, batch_size=8)
    settings = {"allowed_dirs": allowed_dirs, "token": token, "max_wait_ms": 20}
    try:
        with ThreadServer(create_app(judge, settings)) as srv:
            yield srv, judge
    finally:
        judge.close()
        torch.set_num_threads(threads)
