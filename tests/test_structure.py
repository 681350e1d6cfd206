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
