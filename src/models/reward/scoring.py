"""Scoring one batch: the forward pass (logits mode: expected value over the level tokens) or
the answers (generate mode: generate() or fast_decode.py, then parsed), per prompt.

Part of JudgeEngine (engine.py), as a mixin: these methods run on the engine's attributes.
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from .parsing import ParsedScore, parse_score
from .templates import Template

if TYPE_CHECKING:
    from .preparation import _Request

# A prompt whose next-token logits hold NaN or inf (float16 overflowing in a large judge) has no
# expected value to report: NaN is no score, and it is not JSON either.
_NOT_FINITE = {"score": None, "raw": None, "kind": "model",
               "error": "the judge's next-token logits are not finite (NaN or inf), so they give no score; "
                        "in float16 a large judge can overflow: use dtype bfloat16 (or float32)"}


def compile_failure(e: BaseException) -> str:
    """A compile failure in one line: the exception and, where torch wraps the error that stopped
    the compile (BackendCompilerFailed's first line is only "backend='inductor' raised:"), that
    error's type and first line too."""
    def line(x: BaseException) -> str:
        text = str(x).strip()
        return f"{type(x).__name__}: {text.splitlines()[0][:200] if text else ''}"

    inner, seen = e, {id(e)}
    while True:
        nxt = getattr(inner, "inner_exception", None) or inner.__cause__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        inner = nxt
    return line(e) if inner is e else f"{line(e)} {line(inner)}"


class Scoring:
    """Turning one batch into per-prompt outcomes (JudgeEngine mixin)."""

    def _forward(self, reqs: list[_Request], encoded: dict | None = None) -> list[dict[str, Any]]:
        torch = self._torch
        inputs = self._encode(reqs, encoded)
        tpl = reqs[0].template
        if self._vision_reuse is not None and all(r.image_keys for r in reqs):
            # vision_reuse.py: the images of this forward, in the order the processor laid them out
            self._vision_reuse.keys = [k for r in reqs for k in r.image_keys]
        try:
            with torch.inference_mode():
                try:
                    return self._score_batch(inputs, tpl, [r.max_new for r in reqs])
                except torch._dynamo.exc.TorchDynamoException as e:
                    if not self._compiled:
                        raise
                    self._uncompile(compile_failure(e))
                    return self._score_batch(inputs, tpl, [r.max_new for r in reqs])
        finally:
            if self._vision_reuse is not None:
                self._vision_reuse.keys = None

    def _score_batch(self, inputs, tpl: Template, limits: list[int | None] | None = None) -> list[dict[str, Any]]:
        if self.settings.mode == "logits":
            return self._logits_scores(inputs, tpl)
        return self._generate_scores(inputs, tpl, limits)

    def _logits_scores(self, inputs, tpl: Template) -> list[dict[str, Any]]:
        torch = self._torch
        ids, values, names = self._level_ids[tpl.name]
        # No KV cache: nothing reads it, and without one the compiled decoder layers (compile_language)
        # share one graph instead of one per cache layer.
        logits = self.model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1, :].float()
        logp = torch.log_softmax(logits, dim=-1)
        level_logp = logp[:, ids]
        mass = level_logp.exp().sum(dim=-1)
        probs = torch.softmax(level_logp, dim=-1)
        vals = torch.tensor(values, dtype=probs.dtype, device=probs.device)
        scores = (probs * vals).sum(dim=-1)
        # One copy to the host (one sync), not three per prompt: the GPU idles while the host reads.
        rows = torch.cat([scores[:, None], mass[:, None], probs], dim=1).tolist()
        return [{"score": score, "raw": {"probs": {n: round(v, 6) for n, v in zip(names, p)},
                                         "level_mass": round(m, 6)}} if math.isfinite(score) else dict(_NOT_FINITE)
                for score, m, *p in rows]

    def _generate_kwargs(self) -> dict[str, Any]:
        """generate()'s settings for this judge (fast_decode.plan_for reads the same ones)."""
        s = self.settings
        kwargs: dict[str, Any] = {"max_new_tokens": s.max_new_tokens,
                                  "pad_token_id": self.tokenizer.pad_token_id,
                                  "num_return_sequences": s.num_samples}
        if s.min_new_tokens:
            kwargs["min_new_tokens"] = s.min_new_tokens
        if s.temperature > 0:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
            if s.top_k is not None:
                kwargs["top_k"] = s.top_k
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def _generate_scores(self, inputs, tpl: Template, limits: list[int | None] | None = None) -> list[dict[str, Any]]:
        torch = self._torch
        s = self.settings
        k = s.num_samples
        kwargs = self._generate_kwargs()
        # Items' own answer budgets: the batch decodes to its largest, each answer is cut to its own
        # (the same tokens: a row's tokens do not depend on how long the others run).
        limits = [n or s.max_new_tokens for n in limits] if limits and any(limits) else []
        if limits:
            kwargs["max_new_tokens"] = max(limits)
        # Sampling draws from torch's global RNG. Seed it for reproducible answers, inside a fork
        # so the caller's stream (an RL trainer sampling its policy in this process) is restored.
        # (torch.manual_seed seeds every visible GPU, so every one is forked.)
        devices = list(range(torch.cuda.device_count())) if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            if s.temperature > 0:
                torch.manual_seed(s.seed)
            new = self._new_tokens(inputs, kwargs)
        if limits:
            new = [row[:limits[i // k]] for i, row in enumerate(new)]
        cut = [self._cut_off(row) for row in new]
        return self._parse_answers(self.tokenizer.batch_decode(new, skip_special_tokens=True), tpl, cut)

    def _parse_answers(self, texts: list[str], tpl: Template, cut: list[bool] | None = None) -> list[dict[str, Any]]:
        """Each prompt's outcome from its answer(s): num_samples consecutive texts per prompt.
        cut: per text, True where the answer budget ended it, not the judge (see read_answers)."""
        k = self.settings.num_samples
        return [read_answers(texts[row * k:(row + 1) * k], tpl, cut[row * k:(row + 1) * k] if cut else None)
                for row in range(len(texts) // k)]

    def _end_token_ids(self) -> set[int]:
        """The tokens that end an answer (generate() stops a row at any of them)."""
        ids = self.__dict__.get("_end_ids")
        if ids is None:
            eos = getattr(self.model.generation_config, "eos_token_id", None)
            ids = self._end_ids = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
        return ids

    def _cut_off(self, tokens) -> bool:
        """Whether an answer's new tokens (a row of generate()'s output, or a continuous decode's)
        hold no end token: the answer budget stopped it, not the judge."""
        return self._end_token_ids().isdisjoint(tokens.tolist())

    def _new_tokens(self, inputs, kwargs: dict[str, Any]):
        """The generated tokens after the prompt: through fast_decode (static cache, CUDA-graphed
        steps; the same tokens as generate()) when it applies, else generate()."""
        if self._decode_plan is None:
            out = self.model.generate(**inputs, **kwargs)
            return out[:, inputs["input_ids"].shape[1]:]
        import dataclasses

        from .fast_decode import generate_tokens

        plan = dataclasses.replace(self._decode_plan, max_new_tokens=kwargs["max_new_tokens"])
        return generate_tokens(self.model, inputs, plan, cuda_graph=self.device.startswith("cuda"))


def read_answers(answers: list[str], tpl: Template, cut: list[bool] | None = None) -> dict[str, Any]:
    """One prompt's outcome from its answer, or its sampled answers (their mean and spread): the
    score, the raw answer(s), a parse error where no score could be read, and a note where a score
    lay off the scale and was clamped. The in-process engine and the OpenAI-compatible judge read
    answers through this one function. cut: per answer, True where the answer budget
    (max_new_tokens) ended it rather than the judge; None: none was cut."""
    lo, hi = tpl.scale
    levels = tpl.level_map() if tpl.levels and not tpl.levels[0][0].isdigit() else None
    parsed = [_read_answer(a, lo, hi, levels, tpl.json_key, bool(cut and cut[i])) for i, a in enumerate(answers)]
    if len(answers) == 1:
        p = parsed[0]
        res: dict[str, Any] = {"score": p.score, "raw": answers[0]}
        if p.score is None:
            res.update(error=f"could not read a score from the answer ({p.error}); answer: {_clip(answers[0])}",
                       kind="parse")
        elif p.clamped:  # kept, and said: the judge wrote a value off the scale
            res["note"] = f"the answer's score {p.raw_value:g} lay outside {lo:g}..{hi:g}; clamped to {p.score:g}"
        return res
    good = [p.score for p in parsed if p.score is not None]
    mean = sum(good) / len(good) if good else None
    spread = math.sqrt(sum((g - mean) ** 2 for g in good) / len(good)) if good else None
    res = {"score": mean, "raw": {"answers": answers, "scores": [p.score for p in parsed],
                                  "mean": mean, "std": spread, "parsed": len(good)}}
    if not good:
        res.update(error=f"none of the {len(answers)} sampled answers held a score ({parsed[0].error})", kind="parse")
    off = [p.raw_value for p in parsed if p.score is not None and p.clamped]
    if off:
        res["note"] = (f"{len(off)} of the {len(answers)} answers' scores lay outside {lo:g}..{hi:g} "
                       f"({', '.join(f'{v:g}' for v in off)}); clamped")
    return res


# The number a cut-off answer ends with (read from its last characters: bounded work).
_LAST_NUMBER = re.compile(r"\d+(?:\.\d*)?\Z")
_FRACTION_OPEN = re.compile(r"\d\s*(?:out\s+of|/)\s*\Z", re.I)  # a fraction whose denominator is still to come


def _read_answer(answer: str, lo: float, hi: float, levels: Any, key: str | None, cut: bool) -> ParsedScore:
    p = parse_score(answer, lo, hi, levels=levels, key=key)
    if cut and p.score is not None:
        longer = _longer_score(answer, p, lo, hi, levels, key)
        if longer is not None:
            return ParsedScore(None, None, f"the answer was cut off by max_new_tokens {longer}; raise max_new_tokens")
    return p


def _longer_score(answer: str, p: ParsedScore, lo: float, hi: float, levels: Any, key: str | None) -> str | None:
    """Why the score of a cut-off answer is not known, else None: the number that ends it may be
    the start of another score (a tokenizer writes numbers piece by piece: "1" of "10", "7" or "7."
    of "7.5"), or a fraction was cut before its denominator ("7 out of", "7/"). One more digit counts where it reads as another score on the scale (not "70" of
    "7" on 0..9); a decimal part, or a decimal's next digit, where the score read is that longer
    number itself (not a denominator: "out of 10." is not cut from "out of 10.5")."""
    m = _LAST_NUMBER.search(answer[-40:])
    if m is None:
        # "Score: 7 out of" or "7/" cut there: a denominator may follow, and "7 out of 10" is
        # another score than 7 on a scale other than 0..10.
        fraction = _FRACTION_OPEN.search(answer[-40:])
        if fraction is not None:
            longer = parse_score(answer + ("10" if fraction.group(0).rstrip().endswith("/") else " 10"), lo, hi,
                                 levels=levels, key=key)
            if longer.score is not None and not longer.clamped and longer.score != p.score:
                return (f"before the denominator of a fraction ({p.score:g} read, but the answer ends in "
                        f"{fraction.group(0).strip()!r}, and out of 10 it reads {longer.score:g})")
        return None
    number = m.group(0)
    for more, own in ((("5", True),) if "." in number else (("0", False), (".5", True))):
        longer = parse_score(answer + more, lo, hi, levels=levels, key=key)
        if longer.score is None or longer.clamped or longer.score == p.score:
            continue
        if own and not math.isclose(longer.raw_value, float(number + more)):
            continue
        return (f"right after a number, which may be the start of a longer score ({p.score:g} read, but its last "
                f"number, {number}, may go on as {number}{more}, which reads {longer.score:g})")
    return None


def _clip(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."

