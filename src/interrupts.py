"""A Ctrl-C that Python could not raise where it landed, raised again where the job can stop.

Python raises KeyboardInterrupt in whatever Python code runs when SIGINT arrives. When that code
is a weakref callback or a `__del__` (importlib runs one at the end of every import, to drop the
module's lock), the exception cannot propagate: Python prints "Exception ignored in ..." and
carries on as if Ctrl-C had never been pressed, so a job interrupted while it starts would run to
its end. `keep_lost_ctrl_c()` (the commands' first statement) has such a KeyboardInterrupt noted
instead of printed; `raise_lost_ctrl_c()` raises it again at the job's safe points: after the
imports, before the model is built, before each chunk. Standard library only, so that it is in
place before the imports that take time.
"""
from __future__ import annotations

import sys

_lost: list[BaseException] = []


def keep_lost_ctrl_c() -> None:
    """From now on, a KeyboardInterrupt that Python can only report as unraisable is kept for
    `raise_lost_ctrl_c()`; other unraisable exceptions are reported as before. Idempotent."""
    previous = sys.unraisablehook
    if getattr(previous, "keeps_lost_ctrl_c", False):
        return

    def hook(unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            _lost.append(unraisable.exc_value)
        else:
            previous(unraisable)

    hook.keeps_lost_ctrl_c = True
    sys.unraisablehook = hook


def raise_lost_ctrl_c() -> None:
    """Raise KeyboardInterrupt if one was lost since the last call (a safe point of the job)."""
    if _lost:
        lost = _lost[0]
        _lost.clear()
        raise KeyboardInterrupt(*(lost.args if lost is not None else ()))
