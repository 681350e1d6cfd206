"""Imports run downward: what a module loads tells whether it reaches up into a layer above it."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

CHECK = """
import sys
import {module}
bad = sorted(m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in {forbidden!r}))
print(",".join(bad))
"""


def loaded_from(module: str, forbidden: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CHECK.format(module=module, forbidden=forbidden)], cwd=str(ROOT),
                         capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    return out.split(",") if out else []


def test_the_models_package_imports_no_layer_above_it():
    # the HTTP client and the pool speak the service's format without importing the service
    for module in ("src.models.reward.implementations.remote", "src.models.reward.implementations.multi_gpu",
                   "src.models.reward.engine"):
        assert loaded_from(module, ["src.service", "src.job", "src.report", "src.rl", "src.testing",
                                    "src.models.tiny"]) == [], module


def test_the_report_does_not_import_the_job_runner():
    assert loaded_from("src.report.data", ["src.job.runner"]) == []


def test_the_rl_hooks_do_not_import_the_service():
    # verl's hook and the TRL reward speak the service's format (src/models/reward/wire.py), below both
    for module in ("src.rl.verl_reward", "src.rl.trl_reward"):
        assert loaded_from(module, ["src.service", "src.job", "src.report"]) == [], module


def test_the_scheduler_is_below_both_hosts():
    assert loaded_from("src.models.reward.scheduler", ["src.models.reward.pool", "src.models.reward.implementations",
                                                       "src.models.reward.engine", "torch"]) == []


REWARD = ROOT / "src" / "models" / "reward"
LOADERS = ("src.models.reward.plugin", "src.models.reward.hooks")  # the hosts' plug-in loader, and its old name


def _imports_of(name: str) -> set[str]:
    """The modules src/models/reward/<name>.py imports, at import time or inside a function."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse((REWARD / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = "src.models.reward".split(".")[:4 - node.level]
                base = ".".join(package + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from . import x`: the module x
    return found


def test_the_engine_holds_no_test_hooks():
    # No test hooks in the engine: the failure tests' faults come from the hosts of a process (the
    # worker's serve loop, the Ray actor) and from torch's forward hooks (src/testing/faults.py).
    # Nothing the engine imports, at import time or inside a function (the speed paths), reaches
    # the hosts' plug-in loader or the test code.
    engine, todo = set(), ["engine"]
    while todo:
        name = todo.pop()
        if name in engine:
            continue
        engine.add(name)
        imported = _imports_of(name)
        bad = sorted(m for m in imported if m in LOADERS or m.split(".")[:2] == ["src", "testing"])
        assert not bad, f"src/models/reward/{name}.py imports {bad}"
        todo += [m.split(".")[3] for m in imported
                 if m.startswith("src.models.reward.") and (REWARD / f"{m.split('.')[3]}.py").exists()]
    assert {"scoring", "continuous", "batching", "preparation", "row_decode", "fast_decode", "vision_reuse",
            "speed", "chat"} <= engine, sorted(engine)
    assert loaded_from("src.models.reward.engine", [*LOADERS, "src.testing"]) == []


HOST = """
import sys
from torch.nn.modules import module as m
import src.models.reward.engine, src.models.reward.implementations.ray_actors
from src.models.reward import plugin
def hooks():
    return len(m._global_module_registration_hooks) + len(m._global_forward_pre_hooks) + len(m._global_forward_hooks)
before = hooks()
plugin.install_from_env()
print(hooks() - before, any(n.split(".")[:2] == ["src", "testing"] for n in sys.modules))
"""


def test_a_host_loads_the_test_plugin_only_where_it_is_named():
    # What a worker or a Ray actor does before it builds its judge: where REWARD_TEST_PLUGIN is not
    # set (every run but the test suite's) no test code is imported and no torch hook registered,
    # so the judge's forward passes pay nothing for the failure tests.
    import os

    env = {k: v for k, v in os.environ.items() if k != "REWARD_TEST_PLUGIN"}
    for named, expected in ((None, "0 False"), ("src.testing.faults", "1 True")):
        if named:
            env["REWARD_TEST_PLUGIN"] = named
        out = subprocess.run([sys.executable, "-c", HOST], cwd=str(ROOT), env=env, capture_output=True, text=True,
                             timeout=120, check=True).stdout.strip()
        assert out == expected, (named, out)
