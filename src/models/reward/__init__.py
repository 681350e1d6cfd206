"""Score images with a vision-language judge, on one device or many.

    from src.models.reward import build_reward_model, ScoreItem
    with build_reward_model({"class_path": "multi_gpu", "params": {...}}) as judge:
        results = judge.batch_score(edited_images, original_images, instructions)

Nothing here imports torch; the implementations do when they are built.
"""
from .base import BaseRewardModel
from .config import ALIASES, ConfigError, build_reward_model, load_config
from .errors import JudgeConfigError, JudgeError, JudgeInputError, JudgeStartError, JudgeUnavailable
from .settings import JudgeSettings
from .types import ScoreItem, ScoreResult

__all__ = ["ALIASES", "BaseRewardModel", "ConfigError", "JudgeConfigError", "JudgeError", "JudgeInputError",
           "JudgeSettings", "JudgeStartError", "JudgeUnavailable", "ScoreItem", "ScoreResult",
           "build_reward_model", "load_config"]
