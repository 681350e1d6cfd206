"""The judge in this process, on one device."""
from __future__ import annotations

import threading
from typing import Any, Sequence

from ..base import BaseRewardModel
from ..devices import Device
from ..errors import JudgeUnavailable
from ..settings import JudgeSettings
from ..types import ScoreItem, ScoreResult


class QwenVLRewardModel(BaseRewardModel):
    """A Qwen-VL judge loaded in this process on one device.

    device: `auto` (the default: the first visible CUDA GPU, `cuda:0`, or the CPU where torch
    sees none; the choice is logged at INFO), `cpu`, `cuda` or `cuda:N`. `self.device` and each
    result's `device` name the device chosen, never `auto`.

    Judge parameters are those of `JudgeSettings` (model_name, mode, template, batch_size, ...).
    Safe to share between threads: calls take turns (the engine holds one call's state), and
    close() from another thread waits for the call in progress.
    """

    settings_cls = JudgeSettings

    def __init__(self, device: Device = "auto", progress: bool = False, **judge: Any):
        from ..engine import JudgeEngine

        self.settings = JudgeSettings.from_params(judge, owner=type(self).__name__)
        self.progress = progress
        self.engine = JudgeEngine(self.settings, device=device)
        self.device = self.engine.device
        self._closed = False
        self._lock = threading.Lock()  # one call at a time: the engine is not thread-safe

    @property
    def fingerprint(self) -> str:
        return self.engine.fingerprint()

    @property
    def quantization(self) -> str:
        """How the weights were loaded (`none`, `fp8 (...)`, a pre-quantized checkpoint's method)."""
        return self.engine.quantization

    def score_items(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        with self._lock:
            return self._score(items)

    def _score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        if self._closed:
            raise JudgeUnavailable("QwenVLRewardModel is closed")
        items = list(items)
        if not self.progress:
            return self.engine.score(items)
        from tqdm import tqdm

        # One engine call, the bar moved as each chunk is done: the call's chunks share what one
        # call shares (items grouped by source image, one continuous decode).
        with tqdm(total=len(items), desc=f"scoring on {self.device}", unit="item") as bar:
            return self.engine.score(items, on_done=bar.update)

    def close(self) -> None:
        self._closed = True  # calls waiting for their turn are refused
        with self._lock:  # a call in progress in another thread ends first
            self.engine.close()  # idempotent
