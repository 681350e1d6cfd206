"""Call points a test plug-in can hook into; empty in normal use.

The failure tests inject crashes, hangs, delays and out-of-memory errors through them. Nothing
here reads the environment: the engine calls `before_call` and `before_forward`, which do nothing
unless a plug-in was installed. Only worker processes (standalone/reward_worker.py, the Ray
actors) install one, and only when REWARD_TEST_PLUGIN names its module; in-process code installs
one only by calling `install` (the test suite's conftest does).
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Sequence

PLUGIN_ENV = "REWARD_TEST_PLUGIN"

_plugin: Any = None


def install(plugin: Any) -> None:
    """Use `plugin` (an object or module with before_call(items) and before_forward(n_prompts))."""
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


def before_forward(n_prompts: int) -> None:
    """Before each forward pass, with its number of prompts."""
    if _plugin is not None:
        _plugin.before_forward(n_prompts)
