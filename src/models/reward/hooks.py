"""A call point a test plug-in can hook into; empty in normal use.

The failure tests inject crashes and hangs through it (their forward faults go through torch's own
forward hooks: src/testing/faults.py). Nothing here reads the environment: the engine calls
`before_call`, which does nothing unless a plug-in was installed. Only worker processes
(standalone/reward_worker.py, the Ray actors) install one, and only when REWARD_TEST_PLUGIN names
its module; in-process code installs one only by calling `install` (the test suite's conftest does).
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Sequence

PLUGIN_ENV = "REWARD_TEST_PLUGIN"

_plugin: Any = None


def install(plugin: Any) -> None:
    """Use `plugin` (an object or module with before_call(items))."""
    global _plugin
    _plugin = plugin


def install_from_env() -> None:
    """In a worker process: import the plug-in module REWARD_TEST_PLUGIN names, if it names one."""
    name = os.environ.get(PLUGIN_ENV)
    if name:
        plugin = importlib.import_module(name)
        install(plugin)
        if hasattr(plugin, "on_install"):  # in the worker, before the model loads
            plugin.on_install()


def before_call(items: Sequence[Any]) -> None:
    """At the start of a call to the engine."""
    if _plugin is not None:
        _plugin.before_call(items)
