"""Prompt templates and rubrics: what the judge is asked and how its answers combine.

A `Template` is one question to the judge: which images it sees in which order, the text, and
the scale. A `Rubric` names one or more templates as parts and says how the parts combine into
the overall score (VIEScore for image editing: overall = sqrt(SC * PQ)). Every name a user may
put under `template:` resolves to a rubric; a plain template is a rubric of one part.

Default scales are the digits 0..9 so that every level is a single token: `logits` mode reads
the next-token distribution over exactly those tokens, and `generate` mode asks for the same
integer, so both modes report on one scale.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence

from .errors import JudgeConfigError

IMAGE_ROLES = ("source", "image")  # source image(s) first, then the image(s) under judgement
DIGITS_SUFFIX = "Answer with a single digit from {lo} to {hi}."
JSON_SUFFIX = ('First explain your judgement in one or two sentences, then give the score as JSON on the last '
               'line: {{"score": <integer from {lo} to {hi}>}}')

# What each text of a template fills in. Any other `{name}` is a mistake the judge would read as
# written (`{instrution}`, `{prompt}`): refused. Braces around anything else (JSON examples) are
# text; in the suffixes `{{` and `}}` stand for one brace, as in str.format.
PLACEHOLDERS = {"text": ("instruction",), "generate_suffix": ("lo", "hi"), "logits_suffix": ("lo", "hi"),
                "system": (), "logits_prefix": ()}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")


@dataclass(frozen=True)
class Template:
    name: str
    text: str                       # the question; `{instruction}` is replaced by the item's instruction
    images: tuple[str, ...] = ("image",)   # roles in the order the judge sees them
    scale: tuple[float, float] = (0, 9)
    levels: tuple[tuple[str, float], ...] = ()  # token text -> value, for logits mode; digits by default
    system: str | None = None
    generate_suffix: str = JSON_SUFFIX  # with a json_key, the JSON asked for holds that key
    logits_suffix: str = DIGITS_SUFFIX  # with levels other than the scale's digits: "Answer with one of: ..."
    logits_prefix: str = ""         # text the assistant's answer starts with, before the level token
    json_key: str | None = None     # the key the parser looks for first in a JSON answer

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not lo < hi:
            raise JudgeConfigError(f"template {self.name!r}: scale {self.scale} must be (low, high) with low < high")
        for role in self.images:
            if role not in IMAGE_ROLES:
                raise JudgeConfigError(f"template {self.name!r}: unknown image role {role!r}; known: "
                                       f"{', '.join(IMAGE_ROLES)}")
        digits = (tuple((str(v), float(v)) for v in range(int(lo), int(hi) + 1))
                  if float(lo).is_integer() and float(hi).is_integer() and 0 <= lo and hi <= 9 else ())
        if not self.levels:
            object.__setattr__(self, "levels", digits)
        for tok, val in self.levels:
            if not lo <= val <= hi:
                raise JudgeConfigError(f"template {self.name!r}: level {tok!r}={val} is outside the scale {self.scale}")
        if self.logits_suffix == DIGITS_SUFFIX and self.levels and set(self.levels) != set(digits):
            # The judge is asked for the tokens that are read: asked for a digit, its yes/no (or
            # shifted digits') probabilities would be what it left over.
            object.__setattr__(self, "logits_suffix", f"Answer with one of: {', '.join(t for t, _ in self.levels)}.")
        if self.json_key is not None and self.generate_suffix == JSON_SUFFIX:
            # Asked for {"score": N}, a judge's answer would hold no json_key: every one unread.
            key = json.dumps(self.json_key).replace("{", "{{").replace("}", "}}")
            object.__setattr__(self, "generate_suffix", JSON_SUFFIX.replace('{{"score"', "{{" + key))
        for key, known in PLACEHOLDERS.items():
            self._check_placeholders(key, known)

    def _check_placeholders(self, key: str, known: tuple[str, ...]) -> None:
        value = getattr(self, key) or ""
        if key != "text":
            value = value.replace("{{", "").replace("}}", "")
        for name in _PLACEHOLDER.findall(value):
            if name in known:
                continue
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            fills = (f"{key} fills in {' and '.join('{' + k + '}' for k in known)}" if known
                     else f"{key} fills in none")
            where = [k for k, names in PLACEHOLDERS.items() if name in names]
            if where:  # a placeholder of another text
                raise JudgeConfigError(f"template {self.name!r}: {key} holds {{{name}}}, which is no placeholder here: "
                                       f"{fills} ({{{name}}} is filled in {' and '.join(where)} only)")
            hint = f" (did you mean {{{close[0]}}}?)" if close else ""
            raise JudgeConfigError(f"template {self.name!r}: {key} holds {{{name}}}, which is no placeholder{hint}: "
                                   f"the judge would read it as written. {fills}; other braces (JSON) are text")

    @property
    def needs_instruction(self) -> bool:
        return "{instruction}" in self.text

    @property
    def needs_source(self) -> bool:
        return "source" in self.images

    def question(self, instruction: str | None, mode: str) -> str:
        lo, hi = (int(v) if float(v).is_integer() else v for v in self.scale)
        body = self.text.replace("{instruction}", instruction or "")
        suffix = self.generate_suffix if mode == "generate" else self.logits_suffix
        suffix = suffix.replace("{{", "\x00").replace("}}", "\x01").replace("{lo}", str(lo)).replace("{hi}", str(hi))
        suffix = suffix.replace("\x00", "{").replace("\x01", "}")
        return f"{body}\n{suffix}" if suffix else body

    def level_map(self) -> dict[str, float]:
        return dict(self.levels)


COMBINE = ("single", "geometric_mean", "mean", "min")


@dataclass(frozen=True)
class Rubric:
    name: str
    parts: tuple[tuple[str, Template], ...]  # (sub-score name, template)
    combine: str = "single"

    def __post_init__(self) -> None:
        if self.combine not in COMBINE:
            raise JudgeConfigError(f"rubric {self.name!r}: unknown combine {self.combine!r}; known: "
                                   f"{', '.join(COMBINE)}")
        if not self.parts:
            raise JudgeConfigError(f"rubric {self.name!r} has no parts")
        if self.combine == "single" and len(self.parts) != 1:
            raise JudgeConfigError(f"rubric {self.name!r}: combine 'single' needs exactly one part")
        scales = {t.scale for _, t in self.parts}
        if len(scales) > 1 and self.combine != "single":
            raise JudgeConfigError(f"rubric {self.name!r}: parts must share one scale to combine, got {sorted(scales)}")

    @property
    def scale(self) -> tuple[float, float]:
        return self.parts[0][1].scale

    def check_mode(self, mode: str) -> None:
        """Refuse what this rubric cannot score in `mode`: logits mode reads level tokens, and a
        scale whose default levels are not single digits (0..100, 1..10) has none."""
        if mode != "logits":
            return
        for _, t in self.parts:
            if not t.levels:
                raise JudgeConfigError(f"template {t.name!r}: logits mode needs single-token levels; its scale "
                                       f"{t.scale} has none (the default levels are the digits of a scale within "
                                       "0..9: set `levels`, or use mode: generate)")

    @property
    def needs_source(self) -> bool:
        return any(t.needs_source for _, t in self.parts)

    def missing_input(self, images: Sequence[Any], source_images: Sequence[Any], instruction: str | None) -> str | None:
        """Why an item cannot be judged with this rubric (no image, no source image or no
        instruction where a part needs one), or None. Every host asks this before loading images."""
        if not images:
            return "the item has no image to judge"
        if self.needs_source and not source_images:
            return f"template {self.name!r} needs a source image (the image before the edit); the item has none"
        if any(t.needs_instruction for _, t in self.parts) and not (instruction or "").strip():
            return f"template {self.name!r} needs an instruction; the item has none"
        return None

    def overall(self, sub: Mapping[str, float | None]) -> float | None:
        """Combine the parts; None when any part is None (never a partial guess)."""
        vals = [sub.get(name) for name, _ in self.parts]
        if any(v is None for v in vals):
            return None
        if self.combine == "single":
            return float(vals[0])
        if self.combine == "mean":
            return float(sum(vals) / len(vals))
        if self.combine == "min":
            return float(min(vals))
        lo = self.scale[0]
        # VIEScore: geometric mean of the parts (sqrt(SC * PQ) for two), on a scale starting at 0.
        shifted = [max(v - lo, 0.0) for v in vals]
        return float(lo + math.prod(shifted) ** (1.0 / len(shifted)))


_EDIT_INTRO = ("The first image is the original. The second image is the result of editing it with "
               "this instruction: \"{instruction}\".\n")

BUILTIN_TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template(
        name="quality",
        text=("Rate the overall visual quality of this image: sharpness, absence of noise, blur and "
              "artifacts, natural colours and plausible content. 0 is very poor, 9 is excellent."),
    ),
    Template(
        name="edit_instruction",
        images=("source", "image"),
        text=(_EDIT_INTRO + "Rate how well the edited image follows the instruction while keeping "
              "everything the instruction does not ask to change. 0 means the instruction was not "
              "followed at all, 9 means it was followed perfectly."),
    ),
    Template(
        name="edit_quality",
        text=("This image was produced by an image-editing model. Rate its perceptual quality: does "
              "it look natural, without distortions, unnatural regions, blur or artifacts? 0 is very "
              "poor, 9 is excellent."),
    ),
    Template(
        name="alignment",
        text=("This image was generated from the prompt: \"{instruction}\".\nRate how well the image "
              "matches the prompt: every object, attribute, count and relation it asks for. 0 means "
              "unrelated, 9 means a perfect match."),
    ),
    Template(
        name="qalign_quality",
        text="How would you rate the quality of this image?",
        scale=(1, 5),
        levels=(("excellent", 5.0), ("good", 4.0), ("fair", 3.0), ("poor", 2.0), ("bad", 1.0)),
        logits_suffix="",
        logits_prefix="The quality of the image is",
        generate_suffix="Answer with one word: excellent, good, fair, poor or bad.",
    ),
)}

BUILTIN_RUBRICS: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
    # name -> ((sub-score name, template name), ...), combine
    "edit": ((("semantic_consistency", "edit_instruction"), ("perceptual_quality", "edit_quality")),
             "geometric_mean"),
}


def _template_from_mapping(name: str, spec: Mapping[str, Any], base: Template | None) -> Template:
    known = {f.name for f in fields(Template)} - {"name"}
    unknown = set(spec) - known
    if unknown:
        raise JudgeConfigError(f"template {name!r}: unknown key(s) {sorted(unknown)}; known: "
                               f"{', '.join(sorted(known))}")
    where = f"template {name!r}"
    spec = dict(spec)
    for key in ("text", "generate_suffix", "logits_suffix", "logits_prefix"):
        if key in spec and not isinstance(spec[key], str):
            raise JudgeConfigError(f"{where}: {key}: expected a string, got {_shown(spec[key])}")
    for key in ("system", "json_key"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise JudgeConfigError(f"{where}: {key}: expected a string or null, got {_shown(spec[key])}")
    if "images" in spec:
        if not isinstance(spec["images"], (list, tuple)):
            raise JudgeConfigError(f"{where}: images: expected a list of image roles ({', '.join(IMAGE_ROLES)}), "
                                   f"got {_shown(spec['images'])} ([] shows none)")
        spec["images"] = tuple(spec["images"])
    if "scale" in spec:
        spec["scale"] = _scale(where, spec["scale"])
        if base is not None and "levels" not in spec:
            spec["levels"] = ()  # the base's digit levels belong to the base's scale
    if "levels" in spec:
        spec["levels"] = _levels(where, spec["levels"])
    if base is not None:
        return replace(base, name=name, **spec)
    if "text" not in spec:
        raise JudgeConfigError(f"{where}: a new template needs 'text'")
    return Template(name=name, **spec)


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scale(where: str, scale: Any) -> tuple[float, float]:
    if not isinstance(scale, (list, tuple)) or len(scale) != 2 or not all(_number(v) for v in scale):
        raise JudgeConfigError(f"{where}: scale: expected [low, high], two numbers, got {scale!r}")
    if not all(math.isfinite(v) for v in scale):
        raise JudgeConfigError(f"{where}: scale: expected [low, high], two finite numbers, got {list(scale)}")
    return float(scale[0]), float(scale[1])


def _levels(where: str, levels: Any) -> tuple[tuple[str, float], ...]:
    """`{token: value}` or `[[token, value], ...]` as (token, value) pairs, each token once."""
    pairs = list(levels.items()) if isinstance(levels, Mapping) else levels
    if not isinstance(pairs, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise JudgeConfigError(f"{where}: levels: expected a mapping {{token: value}} or a list of [token, value] "
                               f"pairs, got {_shown(levels)}")
    out: dict[str, float] = {}
    for tok, value in pairs:
        if isinstance(tok, bool):  # {yes: 1, no: 0} in YAML
            raise JudgeConfigError(f"{where}: levels: the level {tok} is YAML's reading of an unquoted yes, no, true, "
                                   "false, on or off; quote the word ('yes')")
        if not isinstance(tok, (str, int, float)) or not str(tok).strip():  # null, a list, an empty word
            raise JudgeConfigError(f"{where}: levels: a level must be a word or a digit, got {tok!r}")
        if not _number(value) or not math.isfinite(value):
            raise JudgeConfigError(f"{where}: levels: the value of {str(tok)!r} is not a number: {value!r}")
        if str(tok) in out:
            raise JudgeConfigError(f"{where}: levels: {str(tok)!r} is given twice")
        out[str(tok)] = float(value)
    if len(out) == 1:
        raise JudgeConfigError(f"{where}: levels: one level ({next(iter(out))!r}) gives every item the same score; "
                               "give at least two")
    return tuple(out.items())


def resolve_rubric(name: str, overrides: Mapping[str, Any] | None = None) -> Rubric:
    """Resolve a template or rubric name, with YAML overrides, to a `Rubric`.

    `overrides` maps a name to either a template spec (keys of `Template`, e.g. `text`, `scale`,
    `levels`) which overrides a built-in template of that name or defines a new one, or a rubric
    spec `{"parts": {sub_name: template_name, ...}, "combine": "geometric_mean"}`.
    """
    overrides = dict(overrides or {})
    templates = dict(BUILTIN_TEMPLATES)
    rubrics = dict(BUILTIN_RUBRICS)
    for key, spec in overrides.items():
        if not isinstance(spec, Mapping):
            raise JudgeConfigError(f"templates.{key}: expected a mapping, got {type(spec).__name__}")
        if "parts" in spec:
            extra = set(spec) - {"parts", "combine"}
            if extra:
                raise JudgeConfigError(f"rubric {key!r}: unknown key(s) {sorted(extra)}; known: combine, parts")
            parts = spec["parts"]
            if not isinstance(parts, Mapping) or not parts:
                raise JudgeConfigError(f"rubric {key!r}: 'parts' must map sub-score names to template names")
            for sub, tpl_name in parts.items():
                if not isinstance(tpl_name, str):
                    raise JudgeConfigError(f"rubric {key!r}: parts: the template of {str(sub)!r} must be a template "
                                           f"name, got {_shown(tpl_name)}")
            combine = spec.get("combine", "geometric_mean")
            if combine not in COMBINE:
                raise JudgeConfigError(f"rubric {key!r}: combine: expected one of {', '.join(COMBINE)}, got {combine!r}")
            rubrics[key] = (tuple((str(k), v) for k, v in parts.items()), combine)
        else:
            templates[key] = _template_from_mapping(key, spec, templates.get(key))
            rubrics.pop(key, None)  # `edit: {text: ...}` is the user's template, not the built-in rubric
    if name in rubrics:
        part_names, combine = rubrics[name]
        missing = [t for _, t in part_names if t not in templates]
        if missing:
            raise JudgeConfigError(f"rubric {name!r} names unknown template(s) {missing}; known: "
                                   f"{', '.join(sorted(templates))}")
        return Rubric(name=name, parts=tuple((sub, templates[t]) for sub, t in part_names), combine=combine)
    if name in templates:
        return Rubric(name=name, parts=((name, templates[name]),), combine="single")
    known = sorted(set(templates) | set(rubrics))
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise JudgeConfigError(f"unknown template {name!r}.{hint} Known: {', '.join(known)}")


def rubric_fingerprint(rubric: Rubric) -> dict[str, Any]:
    """Everything about a rubric that changes scores, as plain data (for resume keys)."""
    return {"name": rubric.name, "combine": rubric.combine,
            "parts": [[sub, {f.name: getattr(t, f.name) for f in fields(Template)}] for sub, t in rubric.parts]}
