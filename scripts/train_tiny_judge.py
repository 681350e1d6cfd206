"""Train the tiny judge shipped in models/tiny_judge: a real Qwen2.5-VL (tiny sizes) taught the
synthetic tasks of src/models/synthetic.py on the CPU, deterministically.

    python scripts/train_tiny_judge.py --out models/tiny_judge --seed 0

Every training input is built by the scoring engine itself (`JudgeEngine.prompts`: the same image
resizing, chat template and question wording as at scoring time), then the processor the engine
uses. Each example is one template in one of the judge's two modes:

- logits:   prompt (logits wording) + the target digit; the loss is on that digit, so the
            next-token distribution after the generation prompt puts its mass on the right level;
- generate: prompt (generate wording) + `{"score": D}<|im_end|>`; the loss is on the whole
            answer, so greedy decoding writes the template's JSON and stops.

Templates: the built-in `edit_instruction`, `quality` and `edit_quality` (so the built-in `edit`
rubric works), plus training-only auxiliary questions on the same edit prompts (which colour and
shape each image shows, what the instruction asks for). Whether an edit followed its instruction
depends on how image and instruction agree, not on either alone: trained on that score only, the
tiny model sat at chance for hundreds of steps. The auxiliary answers teach it to see the colour
and shape in each image and to read the instruction first; the judgement follows quickly.

Items are fresh every step (seeds 1e6*(seed+1) + step, disjoint from the evaluation seeds below
1e6). After training the checkpoint is saved with its processor and tokenizer, reloaded through
the normal judge class, and scored on fresh items; the figures go to `training.json` in --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.runs import cpu_name  # noqa: E402
from src.models import synthetic  # noqa: E402  (after the path fix, so the script runs from anywhere)

ARCH = "qwen2_5_vl"
# Tiny sizes: a text model of width 64 and 2 layers, a vision tower of width 64 and 2 blocks.
# A wider initialisation (0.1, against 0.02) makes the tiny attention pick out tokens from the start.
MODEL_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vision_hidden_size": 64, "vision_depth": 2, "vision_num_heads": 2}
INIT_RANGE = 0.1
TEMPLATES = ("edit_instruction", "quality", "edit_quality")
MODES = ("logits", "generate")
EVAL_SEED = 777  # evaluation items; the tests use other seeds, training uses seeds >= 1e6

_INTRO = ('The first image is the original. The second image is the result of editing it with this '
          'instruction: "{instruction}".\n')
_COLOURS = tuple(synthetic.COLOURS)
_SHAPES = synthetic.SHAPES
_ASKED = _COLOURS + _SHAPES
# Training-only questions on the edit prompts; their answers are digits indexing these lists.
AUX_TEMPLATES = {
    "aux_colour_2": ("Which colour is the shape in the second image? "
                     + ", ".join(f"{i} {c}" for i, c in enumerate(_COLOURS)) + ".", "edited", 0),
    "aux_colour_1": ("Which colour is the shape in the first image? "
                     + ", ".join(f"{i} {c}" for i, c in enumerate(_COLOURS)) + ".", "source", 0),
    "aux_shape_2": ("Which shape is in the second image? "
                    + ", ".join(f"{i} {c}" for i, c in enumerate(_SHAPES)) + ".", "edited", 1),
    "aux_shape_1": ("Which shape is in the first image? "
                    + ", ".join(f"{i} {c}" for i, c in enumerate(_SHAPES)) + ".", "source", 1),
    "aux_asked": ("What does the instruction ask for? "
                  + ", ".join(f"{i} {c}" for i, c in enumerate(_ASKED)) + ".", "asked", None),
}


# Training draws the hard cases more often than the tests do: a changed shape is the subtlest
# thing the tiny vision tower has to see, and the shape of the edited image the hardest question.
TRAIN_OUTCOMES = {"followed": 0.35, "side_effect": 0.25, "wrong": 0.2, "unchanged": 0.2}
AUX_WEIGHTS = {"aux_colour_2": 0.2, "aux_colour_1": 0.1, "aux_shape_2": 0.4, "aux_shape_1": 0.1, "aux_asked": 0.2}


def model_sizes(args: argparse.Namespace) -> dict:
    return {**MODEL_SIZES, "hidden_size": args.text_width, "intermediate_size": 2 * args.text_width,
            "num_hidden_layers": args.text_layers, "vision_hidden_size": args.vision_width,
            "vision_depth": args.vision_depth}


def aux_template_specs() -> dict:
    """The auxiliary questions as `templates:` entries for JudgeSettings (the engine builds them)."""
    return {name: {"images": ["source", "image"], "text": _INTRO + text, "logits_suffix": "Answer with a single digit."}
            for name, (text, _, _) in AUX_TEMPLATES.items()}


def aux_target(item, name: str) -> str:
    _, field, part = AUX_TEMPLATES[name]
    meta = item.metadata
    if part is None:
        return str(_ASKED.index(meta["asked"]))
    word = meta[field].split()[part]
    return str((_COLOURS if part == 0 else _SHAPES).index(word))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder of the checkpoint (created or overwritten)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--edit-per-step", type=int, default=32, help="edit_instruction examples per step (both modes)")
    p.add_argument("--quality-per-step", type=int, default=6, help="quality / edit_quality examples per step")
    p.add_argument("--aux-per-step", type=int, default=10, help="auxiliary-question examples per step")
    p.add_argument("--logits-share", type=float, default=0.75, help="share of examples in logits form")
    p.add_argument("--text-width", type=int, default=MODEL_SIZES["hidden_size"])
    p.add_argument("--text-layers", type=int, default=MODEL_SIZES["num_hidden_layers"])
    p.add_argument("--init-range", type=float, default=INIT_RANGE, help="initializer range of both towers")
    p.add_argument("--vision-width", type=int, default=MODEL_SIZES["vision_hidden_size"])
    p.add_argument("--vision-depth", type=int, default=MODEL_SIZES["vision_depth"])
    p.add_argument("--instructions", default="colour", help="edit instruction kinds to train on")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--chunks", type=int, default=3,
                   help="forward passes per step, over examples sorted by length (less padding, same gradient)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads: one is both reproducible and fastest on a busy 2-core machine")
    p.add_argument("--eval-items", type=int, default=200, help="fresh items per template for the figures")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--probe-every", type=int, default=100, help="logits-mode figures on 64 fixed items every N steps")
    return p.parse_args(argv)


def answer_text(item, template: str, mode: str) -> str:
    """The answer the judge is taught to give to `template`'s prompt built in `mode`.

    logits: the digit alone. generate: the template's JSON at once, without the explanation the
    prompt asks for (a tiny judge's explanation would be a fixed pattern, and a wrong
    one drags the score after it: an earlier version that explained first agreed far less with
    logits mode)."""
    meta = item.metadata
    if template in AUX_TEMPLATES:
        return aux_target(item, template)
    target = int(meta["target"])
    if mode == "logits":
        return str(target)
    return '{"score": %d}<|im_end|>' % target


def make_batch(rng: random.Random, step_seed: int, args: argparse.Namespace) -> list:
    """One step's (item, template, mode) examples, all on fresh items."""
    kinds = tuple(args.instructions.split(","))
    edits = synthetic.edit_items(args.edit_per_step, seed=step_seed, kinds=kinds, outcome_weights=TRAIN_OUTCOMES)
    levels = [rng.randrange(synthetic.QUALITY_LEVELS) for _ in range(args.quality_per_step)]
    quals = synthetic.quality_items(args.quality_per_step, seed=step_seed, levels=levels)
    aux = synthetic.edit_items(args.aux_per_step, seed=step_seed + 500_000, kinds=kinds, outcome_weights=TRAIN_OUTCOMES)
    def mode() -> str:
        return "logits" if rng.random() < args.logits_share else "generate"

    out = [(it, "edit_instruction", mode()) for it in edits]
    out += [(it, rng.choice(("quality", "edit_quality")), mode()) for it in quals]
    out += [(it, rng.choices(list(AUX_WEIGHTS), weights=list(AUX_WEIGHTS.values()))[0], "logits") for it in aux]
    return out


class Encoder:
    """Turns examples into model inputs through the scoring engine's own preparation."""

    def __init__(self, engines: dict, processor):
        self.engines = engines
        self.processor = processor
        self.tok = processor.tokenizer
        self.checked: set[tuple[str, str]] = set()

    def __call__(self, examples, chunks: int = 1):
        """Model inputs for `examples`, as `chunks` batches of similar length (less padding):
        a list of (inputs, number of answer tokens per row)."""
        import torch

        groups: dict[tuple[str, str], list[int]] = {}
        for i, (_, tname, mode) in enumerate(examples):
            groups.setdefault((tname, mode), []).append(i)
        rows: list = [None] * len(examples)
        for (tname, mode), idx in groups.items():
            for i, parts in zip(idx, self.engines[tname].prompts([examples[i][0] for i in idx], mode=mode)):
                (_, _, prompt, imgs), = parts
                item = examples[i][0]
                if (tname, mode) not in self.checked:
                    self._check_boundary(prompt, imgs, item, (tname, mode))
                ans = answer_text(item, tname, mode)
                rows[i] = (len(prompt) + len(ans) + 200 * len(imgs), prompt + ans, imgs,
                           len(self.tok.encode(ans, add_special_tokens=False)))
        order = sorted(range(len(rows)), key=lambda i: (rows[i][0], i))
        size = -(-len(order) // chunks)
        out = []
        for k in range(0, len(order), size):
            part = [rows[i] for i in order[k:k + size]]
            inputs = self.processor(text=[r[1] for r in part], images=[im for r in part for im in r[2]],
                                    padding=True, return_tensors="pt")
            out.append((inputs, torch.tensor([r[3] for r in part])))
        return out

    def _check_boundary(self, prompt: str, imgs: list, item, key) -> None:
        """The answer must not merge with the prompt's last token: the judge at scoring time sees
        the prompt tokenised alone."""
        tname, mode = key
        ans = answer_text(item, tname, mode)
        a = self.processor(text=[prompt], images=imgs, return_tensors="pt")["input_ids"][0].tolist()
        b = self.processor(text=[prompt + ans], images=imgs, return_tensors="pt")["input_ids"][0].tolist()
        n = len(self.tok.encode(ans, add_special_tokens=False))
        if b[:len(a)] != a or len(b) != len(a) + n:
            raise AssertionError(f"{tname}/{mode}: prompt and answer tokens merge at the boundary")
        self.checked.add(key)


def answer_loss(model, inputs, n_answer):
    """Sum of the answer tokens' cross-entropy over the rows (left padding: answers end the rows)."""
    import torch

    k = int(n_answer.max()) + 1
    logits = model(**inputs, logits_to_keep=k).logits.float()  # [B, k, V]: positions L-k .. L-1
    ids = inputs["input_ids"]
    targets = ids[:, -k + 1:]                                   # tokens at L-k+1 .. L-1
    pred = logits[:, :-1]
    j = torch.arange(k - 1).unsqueeze(0)
    mask = j >= (k - 1 - n_answer).unsqueeze(1)                 # the last n_answer targets of each row
    ce = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1), reduction="none")
    return (ce.view_as(mask.float()) * mask).sum()


class Probe:
    """Logits-mode figures of the model being trained on fixed fresh items (for the learning curve),
    scored by the engines, which share the model being trained."""

    def __init__(self, engines: dict, kinds: tuple[str, ...], n: int = 64):
        self.engines = engines
        self.sets = {"edit_instruction": synthetic.edit_items(n, seed=EVAL_SEED + 1, kinds=kinds),
                     "quality": synthetic.quality_items(n, seed=EVAL_SEED + 1)}

    def __call__(self, model) -> dict:
        model.eval()
        scores = {t: [r.score for r in self.engines[t].score(items)] for t, items in self.sets.items()}
        model.train()
        return {"edit_accuracy": round(synthetic.edit_accuracy(scores["edit_instruction"], self.sets["edit_instruction"]), 3),
                "quality_spearman": round(synthetic.quality_spearman(scores["quality"], self.sets["quality"]), 3)}


def evaluate(path: str, n: int, seed: int = EVAL_SEED, kinds: tuple[str, ...] = synthetic.INSTRUCTION_KINDS) -> dict:
    """Score fresh items with the saved checkpoint through the normal judge class."""
    from src.models.reward.implementations.local import QwenVLRewardModel

    size = synthetic.SIZE * synthetic.SIZE
    edits = synthetic.edit_items(n, seed=seed, kinds=kinds)
    quals = synthetic.quality_items(n, seed=seed)
    figures: dict = {"eval_seed": seed, "items_per_template": n}
    scores: dict = {}
    for mode in MODES:
        for tname, items in (("edit_instruction", edits), ("quality", quals), ("edit_quality", quals)):
            with QwenVLRewardModel(model_name=path, mode=mode, template=tname, batch_size=16, max_new_tokens=96,
                                   min_pixels=size, max_pixels=size, device="cpu") as judge:  # the card's figures
                res = judge.score_items(items)
            s = [r.score for r in res]
            scores[(mode, tname)] = s
            key = f"{tname}/{mode}"
            figures[f"{key}/parsed"] = sum(v is not None for v in s) / len(s)
            if tname == "edit_instruction":
                figures[f"{key}/accuracy"] = synthetic.edit_accuracy(s, items)
            else:
                ok = [(v, it) for v, it in zip(s, items) if v is not None]
                figures[f"{key}/spearman"] = (synthetic.spearman([v for v, _ in ok], [it.metadata["target"] for _, it in ok])
                                              if len(ok) >= 2 else float("nan"))
            good = [(v, it.metadata["target"]) for v, it in zip(s, items) if v is not None]
            figures[f"{key}/mean_abs_error"] = sum(abs(v - t) for v, t in good) / max(len(good), 1)
    for tname in TEMPLATES:
        pairs = [(a, b) for a, b in zip(scores[("logits", tname)], scores[("generate", tname)]) if b is not None]
        figures[f"{tname}/generate_vs_logits_mean_abs_diff"] = sum(abs(a - b) for a, b in pairs) / max(len(pairs), 1)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()}


def train(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    from transformers import GenerationConfig

    from src.models.reward.engine import JudgeEngine
    from src.models.reward.settings import JudgeSettings
    from src.models.tiny import build_tiny_model

    out = Path(args.out)
    size = synthetic.SIZE * synthetic.SIZE
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tiny-judge-init-") as init:
        sizes = model_sizes(args)
        build_tiny_model(ARCH, init, seed=args.seed, min_pixels=size, max_pixels=size, **sizes,
                         text_config={"initializer_range": args.init_range},
                         vision_config={"initializer_range": args.init_range})
        # vision_cache_mb 0: the probes score the same images after each training step, and features
        # kept from an earlier probe would be the old weights'.
        engines = {t: JudgeEngine(JudgeSettings(model_name=init, mode="logits", template=t, templates=aux_template_specs(),
                                                min_pixels=size, max_pixels=size, vision_cache_mb=0), device="cpu")
                   for t in (*TEMPLATES, *AUX_TEMPLATES)}
    first = engines[TEMPLATES[0]]
    model, processor = first.model, first.processor
    for e in engines.values():
        e.model = model  # one model, trained; each engine prepares its template's prompts (and probes)
    encode = Encoder(engines, processor)
    probe = Probe(engines, tuple(args.instructions.split(",")))
    n_params = sum(p.numel() for p in model.parameters())

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 20%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(args.steps - args.warmup, 1)
        return args.lr * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * t)))

    rng = random.Random(args.seed)
    model.train()
    log = []
    t_train = time.perf_counter()
    running = None
    def prepare(step: int) -> list:
        return encode(make_batch(rng, 1_000_000 * (args.seed + 1) + step, args), args.chunks)

    # The next step's inputs are drawn and encoded on a second thread while this one trains (the
    # rng is only touched by that thread, one step after another, so the data stays deterministic).
    prefetch = ThreadPoolExecutor(max_workers=1)
    upcoming = prefetch.submit(prepare, 0)
    for step in range(args.steps):
        batches = upcoming.result()
        if step + 1 < args.steps:
            upcoming = prefetch.submit(prepare, step + 1)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        n_rows = sum(len(n) for _, n in batches)
        for inputs, n_answer in batches:
            loss = answer_loss(model, inputs, n_answer) / n_rows  # the mean over the step's rows
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = total if running is None else 0.9 * running + 0.1 * total
        if (step + 1) % args.log_every == 0 or step == 0:
            el = time.perf_counter() - t_train
            entry = {"step": step + 1, "loss": round(running, 5), "elapsed_s": round(el, 1)}
            if args.probe_every and (step + 1) % args.probe_every == 0:
                entry.update(probe(model))
            print("  ".join(f"{k} {v}" for k, v in entry.items()), flush=True)
            log.append(entry)
    prefetch.shutdown()
    train_s = time.perf_counter() - t_train

    model.eval()
    model.generation_config = GenerationConfig(**{k: getattr(model.generation_config, k)
                                                  for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
                                               do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    for e in engines.values():
        e.close()

    t_eval = time.perf_counter()
    figures = evaluate(str(out), args.eval_items, kinds=tuple(args.instructions.split(",")))
    eval_s = time.perf_counter() - t_eval
    record = {
        "arch": ARCH, "model_sizes": model_sizes(args), "init_range": args.init_range, "parameters": n_params,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "seed": args.seed, "steps": args.steps, "threads": args.threads,
        "templates": list(TEMPLATES), "aux_templates": aux_template_specs(), "image_pixels": size,
        "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_name(),
        "cpu_count": os.cpu_count(), "loss_log": log, "figures": figures,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    write_card(out, record)
    return record


CARD = """# tiny_judge: a trained tiny Qwen2.5-VL judge for synthetic edits and noise

A real Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) at tiny sizes ({parameters:,} parameters,
text width {hidden}, {layers} layers; vision width {vwidth}, {vdepth} blocks), with the offline test tokenizer
of `src/models/tiny.py`, trained on the CPU on the synthetic tasks of `src/models/synthetic.py`.
Its scores mean something on those tasks and on nothing else. It exists so that tests and the demo
can check that scoring works (that `logits` mode reads the level tokens, that the edit template
shows the source image, the edited image and the instruction, that `generate` answers parse),
which a random-weight model cannot show.

## Use

Images must be 112 x 112 (`min_pixels: 12544`, `max_pixels: 12544`; other sizes are resized to it).

```yaml
model:
  class_path: qwen_vl
  params: {{model_name: tiny:judge, template: edit, mode: logits,
           min_pixels: 12544, max_pixels: 12544}}
```

`tiny:judge` names this folder from any working directory (`configs/demo.yaml` uses it); its path,
`models/tiny_judge`, works too. Templates it was taught (the built-ins, unchanged): `edit_instruction`, `quality`,
`edit_quality`, hence also the `edit` rubric (VIEScore: sqrt(edit_instruction x edit_quality)).
Both modes: `logits` (expected value of the digit distribution) and `generate` (it answers
`{{"score": N}}` at once, without the explanation the generate prompt asks for; 8 new tokens are
enough).

## What it can judge

- Edit instruction-following (`edit_instruction`): a {size} x {size} image with one flat square, circle or
  triangle, {diameter} pixels across near the centre, in red, green, blue, yellow or purple on a plain
  grey or pale background; instructions {phrasings}. Scores: 9 when the
  edit followed the instruction, 3 when it did but also changed the other attribute (colour or
  shape), 1 when it changed the asked attribute the wrong way, 0 when nothing changed.
- Image quality (`quality`, `edit_quality`): scenes of shapes (one large one as in the edits, or one to three small ones) with noise blotches (rectangles of
  uniform random pixels) over k/10 of the image, k = 0..9; score 9 - k. Blotches were chosen because
  a tiny 112-pixel vision tower sees them at once; mild blur or faint Gaussian noise it does not.

## What it cannot judge

Anything else: photographs, several objects in an edit, other colours, shapes, sizes, words or
phrasings{untrained_kinds}, positions, blur, compression artifacts, aesthetics, text-to-image alignment (`alignment`,
`qalign_quality` were never trained). Edits judged on noisy images were not trained either (the
`edit` rubric's instruction-following part is arbitrary on a noisy edit; its quality part is not). It
gives no explanation in `generate` mode. On such inputs the score is arbitrary. Never use it for
research results.

## How it was made

`python scripts/train_tiny_judge.py --out models/tiny_judge --seed {seed} --steps {steps}` (defaults for the
rest: {args}). Model init from `build_tiny_model("qwen2_5_vl", seed={seed}, ...)` with initializer range
{init_range}; AdamW (lr {lr}, warm-up {warmup} steps, cosine decay), {threads} CPU thread(s),
`torch.use_deterministic_algorithms(True)`. Every step draws fresh items (seeds 1e6*(seed+1) + step):
{edit_per_step} edit-instruction examples and {quality_per_step} quality / edit-quality examples, each in logits form
(the digit) or generate form (`{{"score": N}}`) at random, and {aux_per_step} examples of training-only questions on the edit prompts (which
colour and shape each image shows, what the instruction asks for: without them the tiny model stays at
chance on instruction-following for hundreds of steps). Prompts are built by the scoring engine
(`JudgeEngine.prompts`), so training and scoring see the same inputs.

How this recipe was chosen (shape size, auxiliary questions, learning rate, widths), and how much
the seed matters within this budget (other seeds can stall below the tests' bar), is recorded in
`benchmarks/results/tiny_judge_sweep/`. The same command on the same CPU model repeats this run
bit for bit; on another model the losses can part in the last decimals after some hundred steps
(its floating-point sums run in another order), and the figures stay within the bounds that
`RUN_SLOW=1 pytest tests/test_tiny_judge.py` checks a retraining against.

Training took {train_seconds:.0f} s and the evaluation {eval_seconds:.0f} s on {cpu_count} shared CPU cores ({cpu},
torch {torch}); `training.json` has the loss curve and every figure.

## Figures on fresh items

{n} items per template, seed {eval_seed} (training never sees seeds below 1e6):

| template | mode | accuracy (edit) / Spearman (quality) | mean abs. error | answers parsed |
| --- | --- | --- | --- | --- |
{rows}

Generate vs logits, mean absolute difference: {agree}.
"""


PHRASINGS = {"colour": "`make the square blue` / `change the square to blue` / `colour the square blue`",
             "shape": "`turn the square into a circle` / `replace the square with a circle`"}


def write_card(out: Path, record: dict) -> None:
    f = record["figures"]
    rows = []
    for mode in MODES:
        for t in TEMPLATES:
            key = f"{t}/{mode}"
            main = f.get(f"{key}/accuracy", f.get(f"{key}/spearman"))
            rows.append(f"| {t} | {mode} | {main:.3f} | {f[key + '/mean_abs_error']:.2f} | {f[key + '/parsed']:.1%} |")
    agree = ", ".join(f"{t} {f[t + '/generate_vs_logits_mean_abs_diff']:.2f}" for t in TEMPLATES)
    sizes, args = record["model_sizes"], record["args"]
    kinds = args["instructions"].split(",")
    text = CARD.format(
        parameters=record["parameters"], hidden=sizes["hidden_size"], layers=sizes["num_hidden_layers"],
        vwidth=sizes["vision_hidden_size"], vdepth=sizes["vision_depth"], size=synthetic.SIZE,
        diameter=2 * synthetic.SHAPE_RADIUS,
        phrasings=" and ".join(PHRASINGS[k] for k in kinds),
        untrained_kinds="".join(f", {k} instructions ({PHRASINGS[k]})" for k in synthetic.INSTRUCTION_KINDS
                                if k not in kinds),
        seed=record["seed"], steps=record["steps"], init_range=record["init_range"],
        args=", ".join(f"--{k.replace('_', '-')} {v}" for k, v in args.items() if k not in ("seed", "steps")),
        lr=args["lr"], warmup=args["warmup"], threads=args["threads"], edit_per_step=args["edit_per_step"],
        quality_per_step=args["quality_per_step"], aux_per_step=args["aux_per_step"],
        train_seconds=record["train_seconds"], eval_seconds=record["eval_seconds"], cpu_count=record["cpu_count"],
        cpu=record.get("cpu_model") or record["cpu"], torch=record["torch"], n=f["items_per_template"],
        eval_seed=f["eval_seed"],
        rows="\n".join(rows), agree=agree)
    (out / "CARD.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record = train(args)
    print(json.dumps({k: record[k] for k in ("train_seconds", "eval_seconds", "total_seconds", "figures")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
