"""The judge in this process, on one device."""
from __future__ import annotations

from typing import Any, Sequence

from ..base import BaseRewardModel
from ..errors import JudgeUnavailable
from ..settings import JudgeSettings
from ..types import ScoreItem, ScoreResult


class QwenVLRewardModel(BaseRewardModel):
    """A Qwen-VL judge loaded in this process on `device` (`cpu`, `cuda`, `cuda:N`).

    Judge parameters are those of `JudgeSettings` (model_name, mode, template, batch_size, ...).
    """

    settings_cls = JudgeSettings

    def __init__(self, device: str = "cpu", progress: bool = False, **judge: Any):
        from ..engine import JudgeEngine

        self.settings = JudgeSettings.from_params(judge, owner=type(self).__name__)
        self.progress = progress
        self.engine = JudgeEngine(self.settings, device=device)
        self.device = self.engine.device
        self._closed = False

    @property
    def fingerprint(self) -> str:
        return self.engine.fingerprint()

    @property
    def quantization(self) -> str:
        """How the weights were loaded (`none`, `fp8 (...)`, a pre-quantized checkpoint's method)."""
        return self.engine.quantization

    def score_items(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
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
        if not self._closed:
            self._closed = True
            self.engine.close()
