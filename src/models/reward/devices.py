"""A judge's device: the forms a user may give, and `auto` settled.

`check_device` reads a device as written (a config value, a parameter, a worker's `--device`)
without importing torch, so a misspelt device fails when the config is read, naming the value
and the forms accepted. `resolve_device` is the one place a device is settled: `auto` becomes the
first visible CUDA GPU (`cuda:0`), or `cpu` where torch sees none, said in one log line; a judge
reports the settled device, never `auto`.

(`multi_gpu`'s `device_ids: auto` means every visible GPU, one worker each, found from
CUDA_VISIBLE_DEVICES or nvidia-smi: the parent process of a pool does not import torch.)
"""
from __future__ import annotations

import logging
import os
import re
from typing import Annotated

from .errors import JudgeConfigError

log = logging.getLogger(__name__)

FORMS = "'auto' (the first CUDA GPU, else the CPU), 'cpu', 'cuda', 'cuda:N' or a GPU index N"
_CUDA = re.compile(r"cuda:\d+")


def check_device(device: str | int, key: str = "device") -> str:
    """`device` in its normal form: 'auto', 'cpu' or 'cuda:N' ('cuda' and an index N mean a
    CUDA GPU). Anything else raises JudgeConfigError naming `key`, the value and the forms."""
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return f"cuda:{device}"
    text = str(device).strip() if isinstance(device, str) else None
    if text in ("auto", "cpu") or (text is not None and _CUDA.fullmatch(text)):
        return text
    if text == "cuda":
        return "cuda:0"
    if text is not None and text.isdigit():
        return f"cuda:{text}"
    raise JudgeConfigError(f"{key}: expected {FORMS}, got {device!r}")


def resolve_device(device: str | int = "auto", key: str = "device") -> str:
    """`device` settled: 'cpu' or 'cuda:N'. `auto` is looked up here, once, and logged."""
    device = check_device(device, key)
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        chosen, why = "cuda:0", torch.cuda.get_device_name(0)
    elif torch.version.cuda is None:
        chosen, why = "cpu", f"this torch {torch.__version__} is built without CUDA"
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        chosen, why = "cpu", "no CUDA device visible" + (f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
    log.info("%s auto: %s (%s)", key, chosen, why)
    return chosen


# The type of a `device` parameter: a string, checked by check_device when a config is read.
Device = Annotated[str, check_device]
