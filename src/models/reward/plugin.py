"""The test plug-in of a host process; nothing in normal use.

Only the hosts that own a process load one, and only when REWARD_TEST_PLUGIN names its module: the
worker (standalone/reward_worker.py) and the Ray actor (implementations/ray_actors.py). They call
`install_from_env()` before their judge is built and `before_call(items)` before they hand a call's
items to it, where the failure tests simulate a crash or a hang of that process
(src/testing/faults.py, which gives the judge's forward passes their faults through torch's own
hooks). The engine imports nothing of this (tests/test_structure.py); where REWARD_TEST_PLUGIN
is unset, nothing is imported and no hook is registered.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Sequence

PLUGIN_ENV = "REWARD_TEST_PLUGIN"

_plugin: Any = None


def install_from_env() -> None:
    """In a host process: import the plug-in module REWARD_TEST_PLUGIN names, if it names one, and
    let it set itself up (its on_install, before the judge is built)."""
    global _plugin
    name = os.environ.get(PLUGIN_ENV)
    if name:
        _plugin = importlib.import_module(name)
        if hasattr(_plugin, "on_install"):
            _plugin.on_install()


def before_call(items: Sequence[Any]) -> None:
    """Before the host hands a call's items to its judge."""
    if _plugin is not None:
        _plugin.before_call(items)
