"""The failure tests' plug-in: faults injected through the engine's hooks (src/models/reward/hooks.py),
configured by environment variables read on every call and batch.

Test-only: a worker loads it when REWARD_TEST_PLUGIN=src.testing.faults (the suite's conftest sets
that, and installs it in the test process); the library never imports it.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

from src.models.reward.types import ScoreItem

# A prompt batch larger than this raises CUDA's out-of-memory error, on any device:
FAULT_OOM_ABOVE = "REWARD_FAULT_OOM_ABOVE"
# Seconds to sleep before each forward pass (a slow or hung worker):
FAULT_DELAY_S = "REWARD_FAULT_DELAY_S"
# An item id; a batch holding that item kills its process with a real SIGSEGV (as a crashing
# CUDA kernel or C extension would), or hangs it for an hour:
FAULT_SEGFAULT_ON_ID = "REWARD_FAULT_SEGFAULT_ON_ID"
FAULT_HANG_ON_ID = "REWARD_FAULT_HANG_ON_ID"
# Seconds a worker sleeps before loading its model (a slow start, as a large checkpoint's):
FAULT_START_DELAY_S = "REWARD_FAULT_START_DELAY_S"
PLUGIN = "src.testing.faults"  # this module, as REWARD_TEST_PLUGIN names it


def on_install() -> None:
    """In a worker, when the plug-in is loaded: the configured start delay."""
    delay = os.environ.get(FAULT_START_DELAY_S)
    if delay:
        time.sleep(float(delay))


def before_call(items: Sequence[ScoreItem]) -> None:
    """At the start of a call: crash or hang when the call holds the named item."""
    ids = {it.id for it in items if it.id is not None}
    if os.environ.get(FAULT_SEGFAULT_ON_ID) in ids:
        import ctypes

        ctypes.string_at(0)  # reads address 0
    if os.environ.get(FAULT_HANG_ON_ID) in ids:
        time.sleep(3600)


def before_forward(n_prompts: int) -> None:
    """Before each forward pass: the configured delay, then a simulated out-of-memory error."""
    import torch

    delay = os.environ.get(FAULT_DELAY_S)
    if delay:
        time.sleep(float(delay))
    limit = os.environ.get(FAULT_OOM_ABOVE)
    if limit and n_prompts > int(limit):
        raise torch.OutOfMemoryError(f"simulated: batch of {n_prompts} > {FAULT_OOM_ABOVE}={limit}")
