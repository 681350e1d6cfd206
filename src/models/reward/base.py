"""The interface every reward model implements, and nothing else."""
from __future__ import annotations

import abc
from typing import Any, Sequence

from .errors import JudgeError, JudgeInputError
from .types import ScoreItem, ScoreResult, as_items


class BaseRewardModel(abc.ABC):
    """A judge that scores items.

    Implementations differ in where the model runs (this process, one worker process per GPU,
    Ray actors, a remote service); callers cannot tell them apart except by speed.
    """

    @abc.abstractmethod
    def score_items(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        """Score `items` and return exactly one result per item, in input order.

        `results[i].index == i` for every i. A failure of one item (unreadable image,
        unparseable answer, a worker that died) is a result with `score=None` and `error` set;
        it never raises and never costs the other items. Raises only for a problem with the
        model itself (closed, could not start).
        """

    def close(self) -> None:
        """Release the model and any processes. Idempotent."""

    # -- conveniences built on score_items -------------------------------------------------

    def batch_score(self, items: Sequence[Any], original_images: Sequence[Any] | None = None,
                    instructions: Sequence[str | None] | None = None) -> list[ScoreResult]:
        """Score a batch. Either a list of `ScoreItem`, or the image-editing call shape:
        `batch_score(edited_images, original_images=None, instructions=None)` with parallel
        lists (each entry an image or a list of images)."""
        items = list(items)
        if items and all(isinstance(x, ScoreItem) for x in items):
            if original_images is not None or instructions is not None:
                raise JudgeInputError("pass original_images/instructions only with plain images, not with ScoreItems")
            return self.score_items(items)
        if any(isinstance(x, ScoreItem) for x in items):
            raise JudgeInputError("batch_score got a mix of ScoreItems and plain images; use one or the other")
        return self.score_items(as_items(items, original_images, instructions))

    def score(self, item: ScoreItem | Any, original_image: Any = None, instruction: str | None = None) -> ScoreResult:
        """Score one item (a `ScoreItem`, or an image with optional source image and instruction)."""
        if not isinstance(item, ScoreItem):
            item = ScoreItem(images=item, source_images=original_image or [], instruction=instruction)
        return self.score_items([item])[0]

    def __enter__(self) -> "BaseRewardModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_one_each(results: Sequence[Any], n: int, judge: str, asked: str) -> None:
    """Refuse (JudgeError) `judge`'s answer to a call of `n` items (`asked` says what it was: `a call
    of 4 items`, `3 completions`) that is not one result per item, as score_items promises; a judge
    class of the user's may break the promise."""
    if len(results) != n:
        raise JudgeError(f"{judge} returned {len(results)} results for {asked}; a judge returns one result per "
                         "item, in order (BaseRewardModel.score_items)")
