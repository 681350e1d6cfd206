"""The failure tests' plug-in: faults injected from outside the engine, configured by environment
variables read on every call and forward pass.

    a process's faults   (REWARD_FAULT_SEGFAULT_ON_ID, _HANG_ON_ID): `before_call(items)`, which
                         the host that owns the process calls before it hands a call's items to
                         the engine (the worker's serve loop, the Ray actor's score)
    a start's fault      (REWARD_FAULT_START_DELAY_S): `on_install()`, which the host calls as it
                         loads the plug-in, before its judge is built
    a forward's faults   (REWARD_FAULT_OOM_ABOVE, _DELAY_S): a torch forward pre-hook on each
                         judge's model, at each forward pass over prompts (`on_forward`), from
                         `watch_forwards()`: in a worker by on_install, before its model is
                         built; in the test process by the suite's conftest

Test-only: a host loads it when REWARD_TEST_PLUGIN=src.testing.faults (src/models/reward/plugin.py;
the suite's conftest sets that); the library never imports it.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

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

# The judges' models as transformers 5 loads them (AutoModelForImageTextToText): a call of one over
# prompts is the forward pass of a batch, wherever the engine makes it (logits mode's forward,
# generate()'s and fast_decode's prefill, continuous batching's first and joining prefills, the
# chat route's generate()), before its vision tower runs. A decode step after the prefill passes
# one token per row (generate()), or calls the language model inside the judge directly
# (fast_decode, continuous batching): not a forward pass over prompts.
JUDGE_MODELS = frozenset({"Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                          "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"})

_watching: Any = None  # watch_forwards' handle


def on_install() -> None:
    """In a worker or a Ray actor, when its host loads the plug-in: the configured start delay,
    then the forward faults."""
    delay = os.environ.get(FAULT_START_DELAY_S)
    if delay:
        time.sleep(float(delay))
    watch_forwards()


def before_call(items: Sequence[ScoreItem]) -> None:
    """Before a host hands a call's items to its engine: crash or hang when the call holds the
    named item."""
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


def watch_forwards() -> None:
    """`before_forward` before the forward passes of every judge built in this process from now on
    (once, however often it is called)."""
    global _watching
    if _watching is None:
        _watching = on_forward(before_forward)


def on_forward(fn: Callable[[int], None], model: Any = None) -> "_Watch":
    """fn(n_prompts) before each forward pass over a batch of prompts of `model` (a judge's loaded
    model), or without one of every judge built in this process from now on; an exception fn
    raises is the forward pass's. Torch's own hooks: a forward pre-hook on each judge's model, found
    as it is built by the global module registration hook (called as a module takes its first
    submodule, in its __init__). Returns a handle: `.remove()` ends it."""
    return _Watch(fn, model)


class _Watch:
    """on_forward's hooks: the registration hook that finds judges as they are built (none for
    one model), and the forward pre-hook of each judge found."""

    def __init__(self, fn: Callable[[int], None], model: Any = None):
        import weakref

        from torch.nn.modules.module import register_module_module_registration_hook

        self.fn = fn
        self.models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # judge model -> its hook's handle
        self.building = None
        if model is not None:
            self._hook(model)
        else:
            self.building = register_module_module_registration_hook(self._built)

    def _built(self, module: Any, name: str, submodule: Any) -> None:
        if type(module).__name__ in JUDGE_MODELS and module not in self.models:
            self._hook(module)

    def _hook(self, model: Any) -> None:
        self.models[model] = model.register_forward_pre_hook(self._before, with_kwargs=True)

    def _before(self, module: Any, args: tuple, kwargs: dict) -> None:
        n = prompts_of(args, kwargs)
        if n is not None:
            self.fn(n)

    def remove(self) -> None:
        if self.building is not None:
            self.building.remove()
        for handle in list(self.models.values()):
            handle.remove()
        self.models.clear()


def prompts_of(args: tuple, kwargs: dict) -> int | None:
    """The number of prompts of a judge's forward pass over prompts, from its arguments (its rows:
    where generate() samples num_samples answers per prompt, its prefill holds that many rows per
    prompt); None for a decode step (one new token per row)."""
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None and args:
        tokens = args[0]
    if getattr(tokens, "ndim", 0) < 2 or tokens.shape[1] <= 1:
        return None
    return int(tokens.shape[0])
