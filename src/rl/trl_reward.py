"""The judge as a TRL GRPO reward function.

    from src.rl.trl_reward import JudgeReward
    reward = JudgeReward("http://127.0.0.1:8899")          # the service; or a config / a model
    trainer = GRPOTrainer(model=..., reward_funcs=[reward], train_dataset=ds, ...)

TRL calls `reward(prompts=..., completions=..., **columns)` once per generation batch, with every
extra dataset column as a keyword (a list, one entry per completion). The image under judgement
is read from the `images` column (a list per row) or the `image` column, the edit's source from
`source_images` / `source_image`; what the completion is (the text the image is judged against,
or the image the policy produced) is `completion_as`, explained in `src/rl/items.py`.

One float per completion comes back, the judge's score on the template's scale. A completion the
judge cannot score gives None (TRL leaves it out of that reward, warns if every reward of a
sample is None) unless `failed_reward` is set; the fraction is logged as `<name>/failed` and the
reasons as a `<name>_error` column of TRL's completions table.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Mapping, Sequence

from ..models.reward.base import BaseRewardModel, check_one_each
from ..models.reward.result_form import usable
from ..models.reward.types import ScoreItem, ScoreResult
from .items import SampleError, check_completion_as, merge_scored, prompt_text, sample_item, to_score

log = logging.getLogger(__name__)


class JudgeReward:
    """A GRPO reward function backed by a reward model.

    model: a `BaseRewardModel`, a service URL (`http://...`: a `RemoteRewardModel` is built on
      first use, in the process that uses it), or a config mapping `{class_path, params}`.
    completion_as: `instruction` (default) or `image`; see `src/rl/items.py`.
    image_column / source_image_column: the dataset columns holding the images; by default
      `images` (else `image`) and `source_images` (else `source_image`).
    instruction_column: for completion_as=image, the column holding the judge's instruction;
      when absent, the prompt's (last user) text is the instruction.
    failed_reward: the reward of an unscored completion (None: TRL's "no reward").
    name: the reward's name in TRL's logs (`rewards/<name>/mean`).
    """

    def __init__(self, model: BaseRewardModel | str | Mapping[str, Any], *, completion_as: str = "instruction",
                 image_column: str | None = None, source_image_column: str | None = None,
                 instruction_column: str = "instruction", failed_reward: float | None = None,
                 name: str = "judge"):
        if not isinstance(model, (BaseRewardModel, str, Mapping)):
            raise TypeError(f"model: expected a BaseRewardModel, a service URL or a config mapping, "
                            f"got {type(model).__name__}")
        self._spec = model
        self._model: BaseRewardModel | None = model if isinstance(model, BaseRewardModel) else None
        self.completion_as = check_completion_as(completion_as)
        self.image_column = image_column
        self.source_image_column = source_image_column
        self.instruction_column = instruction_column
        self.failed_reward = failed_reward
        self.__name__ = name  # TRL names the reward by __name__
        self._lock = threading.Lock()  # reward models are not thread-safe; the async form uses threads

    @property
    def model(self) -> BaseRewardModel:
        if self._model is None:
            if isinstance(self._spec, str):
                from ..models.reward.implementations.remote import RemoteRewardModel

                self._model = RemoteRewardModel(self._spec)
            else:
                from ..models.reward.config import build_reward_model

                self._model = build_reward_model(self._spec)  # type: ignore[arg-type]
        return self._model

    def _column(self, columns: Mapping[str, Any], explicit: str | None, defaults: Sequence[str], n: int) -> list[Any]:
        names = [explicit] if explicit else list(defaults)
        for name in names:
            if name in columns and columns[name] is not None:
                if isinstance(columns[name], (str, bytes, Mapping)) or not hasattr(columns[name], "__len__"):
                    raise TypeError(f"{self.__name__}: column {name!r} must be a list with an entry per completion "
                                    f"(TRL passes the batch's rows so), got {type(columns[name]).__name__}")
                values = list(columns[name])
                if len(values) != n:
                    raise ValueError(f"{self.__name__}: column {name!r} has {len(values)} entries for {n} completions")
                return values
        if explicit:
            raise ValueError(f"{self.__name__}: the dataset has no column {explicit!r} "
                             f"(columns passed: {', '.join(sorted(k for k in columns if not k.startswith('log_')))})")
        return [None] * n

    def items(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[ScoreItem | ScoreResult]:
        """The item to judge for each completion, or its failure result when there is none."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{self.__name__}: {len(prompts)} prompts for {n} completions")
        images = self._column(columns, self.image_column, ("images", "image"), n)
        sources = self._column(columns, self.source_image_column, ("source_images", "source_image"), n)
        instructions = self._column(columns, None, (self.instruction_column,), n)
        out: list[ScoreItem | ScoreResult] = []
        for i in range(n):
            instruction = instructions[i]
            if self.completion_as == "image" and instruction is None:
                instruction = prompt_text(prompts[i]) or None
            try:
                out.append(sample_item(completions[i], images=images[i], source_images=sources[i],
                                       instruction=instruction, completion_as=self.completion_as, id=str(i)))
            except SampleError as e:
                out.append(ScoreResult.failure(i, None, f"completion {i}: {e}", "input"))
        return out

    def results(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[ScoreResult]:
        prepared = self.items(prompts, completions, **columns)
        scored: list[ScoreResult] = []
        if todo := to_score(prepared):
            with self._lock:
                scored = self.model.batch_score(todo)
            judge = f"the judge ({type(self.model).__name__})"
            check_one_each(scored, len(todo), judge, f"{len(todo)} completions")
            # A judge class's NaN, a number of another type, a score beside an error: as the service
            # and the job take them, never a reward of NaN or one the judge called failed.
            scored = usable(scored, todo, judge, "the reward", "the reward cannot use", "not used")
        return merge_scored(prepared, scored)

    def rewards(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        results = self.results(prompts, completions, **columns)
        failed = [r for r in results if r.score is None]
        if failed:
            log.warning("%s: %d of %d completions unscored; first: %s", self.__name__, len(failed), len(results),
                        failed[0].error)
        log_metric, log_extra = columns.get("log_metric"), columns.get("log_extra")
        if callable(log_metric) and results:
            log_metric(f"{self.__name__}/failed", len(failed) / len(results))
        if callable(log_extra):
            log_extra(f"{self.__name__}_error", [r.error or "" for r in results])
        return [r.score if r.score is not None else self.failed_reward for r in results]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        return self.rewards(prompts, completions, **columns)

    def close(self) -> None:
        """Close a model this reward built (one passed in belongs to the caller)."""
        if self._model is not None and not isinstance(self._spec, BaseRewardModel):
            self._model.close()
            self._model = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy for another process rebuilds its own client or model from the spec.
        state = dict(self.__dict__)
        if not isinstance(self._spec, BaseRewardModel):
            state["_model"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class AsyncJudgeReward(JudgeReward):
    """The same reward as a coroutine: TRL runs async rewards concurrently on its event loop, so
    the judge's HTTP round trip overlaps other rewards (rule checks, other judges). The blocking
    call runs in a worker thread."""

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        return await asyncio.to_thread(self.rewards, prompts, completions, **columns)
