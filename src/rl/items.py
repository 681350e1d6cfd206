"""What an RL reward judges: one policy sample -> one `ScoreItem`.

RL trainers hand a reward function text: the policy's completion, the prompt, a label. The judge
scores images. Two ways connect them, chosen by `completion_as`:

- `instruction` (default): the completion is the TEXT the judge checks the image against. The
  image comes with the sample (TRL's `image`/`images` column, verl's `extra_info["image"]`,
  OpenRLHF's label). Use with the `alignment` template: a captioning / prompt-writing policy is
  rewarded for text that matches the image; with `edit_instruction`, a policy that writes edit
  instructions is rewarded for describing the edit between `source_image` and `image`.
- `image`: the completion NAMES the image the policy produced (a path or data URL, alone or in
  `<image>...</image>`; a tool-using or image-generating policy). The judge's instruction is the
  sample's instruction (TRL's `instruction` column, else the prompt; verl's
  `extra_info["instruction"]`, else `ground_truth`); the template decides what is judged
  (`quality`, `alignment`, `edit` with a `source_image`).

Either way the judge's score is the reward, on the template's scale (0-9 by default). A sample the
judge cannot score (no image, unreadable image, unparseable answer) gets no invented score: the
result carries `score=None` and the reason; trainers that cannot hold a missing value get an
explicit `failed_reward` instead, flagged in their logs.

Standard library only: the server and every trainer-side adapter import this.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

from ..models.reward.types import ScoreItem, ScoreResult, renumber

COMPLETION_AS = ("instruction", "image")

_IMAGE_TAG = re.compile(r"<image>\s*(.*?)\s*</image>", re.S)
# End-of-turn markers a decoded completion may still carry (OpenRLHF decodes with them).
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<end_of_turn>")


class SampleError(ValueError):
    """A sample that cannot become an item; its reward is a failure naming this message."""


def check_completion_as(value: str) -> str:
    if value not in COMPLETION_AS:
        raise ValueError(f"completion_as: unknown value {value!r}; known: {', '.join(COMPLETION_AS)}")
    return value


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational form (a list of messages
    whose content is a string or a list of `{"type": "text", "text": ...}` parts)."""
    if isinstance(completion, str):
        text = completion
    elif isinstance(completion, Mapping):
        text = _content_text(completion.get("content"))
    elif isinstance(completion, Sequence):
        text = "".join(_content_text(m.get("content")) if isinstance(m, Mapping) else str(m)
                       for m in completion)
    else:
        raise SampleError(f"a completion must be text or a list of messages, got {type(completion).__name__}")
    text = text.strip()
    changed = True
    while changed:  # strip trailing end-of-turn markers, in any order
        changed = False
        for marker in _END_MARKERS:
            if text.endswith(marker):
                text = text[: -len(marker)].rstrip()
                changed = True
    return text


def prompt_text(prompt: Any) -> str:
    """The user's text of a prompt (string, or the last user message of a conversation)."""
    if isinstance(prompt, str):
        return prompt.strip()
    if isinstance(prompt, Sequence):
        users = [m for m in prompt if isinstance(m, Mapping) and m.get("role") == "user"]
        if users:
            return _content_text(users[-1].get("content")).strip()
    return ""


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return str(content)


def image_in_completion(text: str) -> str:
    """The image a completion names: the last `<image>...</image>`, else the whole (one-line) text."""
    tags = _IMAGE_TAG.findall(text)
    ref = tags[-1] if tags else text.strip()
    if not ref or "\n" in ref:
        raise SampleError("the completion names no image (completion_as=image expects a path or data URL, "
                          f"alone or inside <image>...</image>); completion: {_clip(text)}")
    return ref


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None]
    return [value]


def sample_item(completion: Any, *, images: Any = None, source_images: Any = None,
                instruction: str | None = None, completion_as: str = "instruction",
                id: str | None = None, metadata: Mapping[str, Any] | None = None) -> ScoreItem:
    """One policy sample -> the item the judge scores (see the module docstring)."""
    text = completion_text(completion)
    if completion_as == "instruction":
        if not text:
            raise SampleError("the completion is empty: there is no text to judge the image against")
        imgs = as_list(images)
        if not imgs:
            raise SampleError("no image to judge: give the sample an image (TRL column `image`/`images`, "
                              "verl extra_info['image'], or the OpenRLHF label)")
        return ScoreItem(images=imgs, source_images=as_list(source_images), instruction=text, id=id,
                         metadata=dict(metadata or {}))
    if completion_as == "image":
        return ScoreItem(images=[image_in_completion(text)], source_images=as_list(source_images),
                         instruction=instruction, id=id, metadata=dict(metadata or {}))
    check_completion_as(completion_as)
    raise AssertionError("unreachable")


def _first(mapping: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if mapping.get(k) is not None:
            return mapping[k]
    return None


def verl_item(solution_str: Any, ground_truth: Any = None, extra_info: Mapping[str, Any] | None = None,
              completion_as: str = "instruction", data_source: Any = None) -> ScoreItem:
    """A verl reward call -> item. Images come from `extra_info` (`images`/`image`,
    `source_images`/`source_image`); `extra_info["completion_as"]` overrides the default; the
    instruction for `completion_as=image` is `extra_info["instruction"]`, else `ground_truth`."""
    extra = dict(extra_info or {})
    mode = check_completion_as(str(extra.get("completion_as") or completion_as))
    instruction = extra.get("instruction")
    if instruction is None and isinstance(ground_truth, str) and ground_truth.strip():
        instruction = ground_truth
    item_id = _first(extra, "id", "uid", "index")
    meta = {"data_source": data_source} if data_source is not None else {}
    return sample_item(solution_str, images=_first(extra, "images", "image"),
                       source_images=_first(extra, "source_images", "source_image"),
                       instruction=instruction, completion_as=mode,
                       id=str(item_id) if item_id is not None else None, metadata=meta)


def openrlhf_item(query: str, prompt: str | None, label: Any, completion_as: str = "instruction") -> ScoreItem:
    """An OpenRLHF remote-reward sample -> item. The response is the query less its prompt. The
    label is an image reference (path, data URL, base64) or a JSON object with `image(s)`,
    `source_image(s)`, `instruction` (needed for `completion_as=image` with a template that asks
    for one), `id`."""
    if not isinstance(query, str):
        raise SampleError(f"query must be a string, got {type(query).__name__}")
    response = _after_prompt(query, prompt) if isinstance(prompt, str) and prompt else query
    info: dict[str, Any] = {}
    if isinstance(label, Mapping):
        info = dict(label)
    elif isinstance(label, str) and label.lstrip().startswith("{"):
        try:
            parsed = json.loads(label)
        except json.JSONDecodeError as e:
            raise SampleError(f"the label looks like JSON but does not parse: {e}") from None
        if not isinstance(parsed, dict):
            raise SampleError("a JSON label must be an object")
        info = parsed
    elif label is not None and not (isinstance(label, str) and not label.strip()):
        info = {"image": label}  # an empty label (OpenRLHF's when data.label_key is unset) names no image
    # The prompt is not a fallback instruction here: OpenRLHF sends it chat-templated.
    instruction = info.get("instruction")
    item_id = info.get("id")
    return sample_item(response, images=_first(info, "images", "image"),
                       source_images=_first(info, "source_images", "source_image"),
                       instruction=instruction, completion_as=completion_as,
                       id=str(item_id) if item_id is not None else None)


# The least of a prompt's end that must be found in its query to tell where the response starts.
_PROMPT_TAIL = 16


def _after_prompt(query: str, prompt: str) -> str:
    """The response in an OpenRLHF query: the text after its prompt. The query is the rollout's
    tokens decoded, which need not begin with the prompt's text: a VLM processor expands each
    image placeholder into one token per patch group (Qwen's `<|image_pad|>` x N, Gemma's
    `<boi>` + N + `<eoi>`), and a prompt over its budget is cut from the left. Both leave the
    prompt's end intact, so the response follows the longest end of the prompt the query holds
    (found in log steps: an end found means every shorter end is found too)."""
    if query.startswith(prompt):
        return query[len(prompt):]
    lo, hi = 0, len(prompt)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prompt[-mid:] in query:
            lo = mid
        else:
            hi = mid - 1
    if lo < min(_PROMPT_TAIL, len(prompt)):
        raise SampleError(f"the query does not hold its prompt's end ({_clip(prompt[-_PROMPT_TAIL:])!r}), so "
                          f"the response in it cannot be told apart; query: {_clip(query)}")
    return query[query.index(prompt[-lo:]) + lo:]


def to_score(prepared: Sequence[ScoreItem | ScoreResult]) -> list[ScoreItem]:
    """The items among `prepared` (samples turned into items, or the failures of those that could not be)."""
    return [p for p in prepared if isinstance(p, ScoreItem)]


def merge_scored(prepared: Sequence[ScoreItem | ScoreResult], scored: Sequence[ScoreResult]) -> list[ScoreResult]:
    """One result per sample, in order: `scored` (the results of `to_score(prepared)`, in order)
    in the items' places, renumbered to them; a failure already in `prepared` keeps its place."""
    todo = [i for i, p in enumerate(prepared) if isinstance(p, ScoreItem)]
    assert len(scored) == len(todo), f"{len(scored)} results for {len(todo)} items"  # by construction
    out: list[ScoreResult] = [p for p in prepared]  # type: ignore[misc]
    for i, r in zip(todo, scored):
        out[i] = renumber(r, prepared[i], i)  # type: ignore[arg-type]
    return out


def _clip(text: str, n: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."
