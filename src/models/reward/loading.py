"""Loading a judge: checkpoint path, processor, model on its device, the scale's level tokens.

Part of JudgeEngine (engine.py), as a mixin: these methods run on the engine's attributes.
"""
from __future__ import annotations

import logging
import os

from .errors import JudgeConfigError, JudgeStartError
from .templates import Template

log = logging.getLogger(__name__)


class Loading:
    """Loading the checkpoint (JudgeEngine mixin)."""

    def _load(self) -> None:
        torch = self._torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        s = self.settings
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise JudgeConfigError(f"{self.device_label}: a CUDA device was asked, but torch sees no GPU here "
                                   f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                                   "use device cpu (or auto) on a machine without a GPU")
        path = s.model_name
        in_repo_root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
        if path.startswith("tiny:"):
            from ..tiny import resolve_model_name

            path = resolve_model_name(path)
        elif not os.path.isabs(path) and not os.path.exists(path):
            # A repo-relative folder (e.g. models/tiny_judge) works from any working directory.
            in_repo = os.path.join(in_repo_root, path)
            if os.path.isdir(in_repo):
                path = os.path.normpath(in_repo)
        self.model_path = path
        near = "" if os.path.exists(path) else _near_folder(path, in_repo_root)
        if near and not os.path.isabs(path) and not path.startswith("."):
            # Said now: a hub id's shape, and without a network the hub's retries take minutes.
            log.warning("%s: model_name %r is no folder here; did you mean %r? Trying it as a hub id",
                        self.device_label, s.model_name, near)
        try:
            self.processor = AutoProcessor.from_pretrained(path)
        except OSError as e:  # not a folder here, and not downloadable (no network, no such repo, no access)
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise JudgeStartError(
                f"model_name {s.model_name!r}: no such folder here{f' (did you mean {near!r}?)' if near else ''}, "
                f"and it could not be loaded from the hub "
                f"({first}); give a local checkpoint folder, a hub id this machine can download"
                f"{' (HF_HUB_OFFLINE is set: nothing is downloaded)' if offline else ''}, or tiny:judge") from None
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        # Each level one token: read from the tokenizer, before the weights take their minutes to load.
        self._level_ids: dict[str, tuple[list[int], list[float], list[str]]] = {}
        if s.mode == "logits":
            for _, tpl in self.rubric.parts:
                self._level_ids[tpl.name] = self._levels_for(tpl)
        ip = self.processor.image_processor
        self.patch_size = int(getattr(ip, "patch_size", 14))
        size = dict(getattr(ip, "size", None) or {})
        self.min_pixels = s.min_pixels or size.get("shortest_edge") or 4 * (self.patch_size * 2) ** 2
        self.max_pixels = s.max_pixels or size.get("longest_edge") or 16384 * (self.patch_size * 2) ** 2
        # The processor must not resize again what qwen-vl-utils already resized.
        ip.size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

        if s.dtype == "auto":
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        else:
            dtype = getattr(torch, s.dtype)
        self.dtype = dtype
        from . import quantization

        # Checked before the load (a missing package, an unsuited device): nothing is scored after.
        extra, self.quantization = quantization.plan(s.quantization, path, self.device, dtype)
        spread = len(self.devices) > 1
        if spread:
            quantization.require("accelerate", f"a judge spread over {len(self.devices)} GPUs (gpus_per_worker)")
            extra["device_map"] = "auto"
            if s.max_memory_per_gpu_gb is not None:
                extra["max_memory"] = {_index(d): int(s.max_memory_per_gpu_gb * 2**30) for d in self.devices}
        elif s.max_memory_per_gpu_gb is not None:
            raise JudgeConfigError(f"max_memory_per_gpu_gb: places a judge spread over a group of GPUs "
                                   f"(multi_gpu with gpus_per_worker > 1); this one runs on {self.device} alone")
        else:
            # Loading straight onto the GPU (device_map) needs accelerate; without it, load then move.
            # Quantized weights must be placed by the load itself (they cannot be moved after), on the
            # CPU too: without a device_map, bitsandbytes loads onto the first GPU it sees.
            import importlib.util

            if "quantization_config" in extra or self.quantization != "none" or (
                    self.device != "cpu" and importlib.util.find_spec("accelerate") is not None):
                extra["device_map"] = self.device
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                path, dtype=dtype, attn_implementation=s.attn_implementation, **extra)
        except ValueError as e:
            if spread and "offload" in str(e):  # the budget left layers for the disk
                raise JudgeConfigError(f"the judge does not fit its {len(self.devices)} GPUs ({self.device_label}, "
                                       f"max_memory_per_gpu_gb={s.max_memory_per_gpu_gb}); raise it or "
                                       f"gpus_per_worker, or use quantization ({e})") from None
            raise
        if s.quantization == "fp8":
            quantization.check_fp8_tiles(model)
        if "device_map" not in extra:
            model = model.to(self.device)
        if spread:
            self._check_placement(model)
        self.model = model.eval()
        # The judge's context: no prompt (with its answer budget) runs past it (preparation.py).
        self._context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        log.info("%s: judge loaded on %s (quantization: %s)", self.device_label, ",".join(self.devices),
                 self.quantization)
        self._setup_speed()

    def _check_placement(self, model) -> None:
        """A judge spread over a group must sit on the group's GPUs: a layer that the budget sent to
        the CPU or the disk would run there, many times slower, so it is an error instead."""
        where = {str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()}
        where |= {p.device.type for p in model.parameters()}  # offloaded weights wait on cpu or meta
        off = sorted({"disk" if w == "meta" else w for w in where & {"cpu", "disk", "meta"}})
        if off:
            budget = self.settings.max_memory_per_gpu_gb
            raise JudgeConfigError(
                f"the judge does not fit its {len(self.devices)} GPUs ({self.device_label}"
                + (f", max_memory_per_gpu_gb={budget}" if budget is not None else "")
                + f"): transformers placed layers on {' and '.join(off)}. Raise max_memory_per_gpu_gb or "
                "gpus_per_worker, or use quantization")

    def _levels_for(self, tpl: Template) -> tuple[list[int], list[float], list[str]]:
        ids, values, names = [], [], []  # (levels exist: JudgeSettings.check_mode refused a template without)
        lead_space = bool(tpl.logits_prefix) and not tpl.logits_prefix[-1].isspace()
        for text, value in tpl.levels:
            piece = (" " + text) if lead_space else text
            enc = self.tokenizer.encode(piece, add_special_tokens=False)
            if len(enc) != 1:
                raise JudgeConfigError(f"template {tpl.name!r}: level {piece!r} is {len(enc)} tokens for this "
                                       "tokenizer; logits mode needs every level to be one token (use other levels "
                                       "or mode: generate)")
            if enc[0] in ids:  # its probability would count twice in the expected value
                raise JudgeConfigError(f"template {tpl.name!r}: levels {names[ids.index(enc[0])]!r} and {text!r} are the "
                                       "same token for this tokenizer; give each token once")
            ids.append(enc[0])
            values.append(float(value))
            names.append(text)
        return ids, values, names


def _near_folder(path: str, repo_root: str) -> str:
    """A checkpoint folder whose name is close to `path`, for a model_name that is no folder: its
    parent folder exists (here, or in the repository) and holds a close name. '' when none."""
    import difflib

    parent, name = os.path.split(os.path.normpath(path))
    if not parent or not name:  # a bare name: nothing local to compare it with
        return ""
    for folder in (parent, os.path.join(repo_root, parent)) if not os.path.isabs(path) else (parent,):
        try:
            names = [n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n))]
        except OSError:
            continue
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
        if close:
            return os.path.join(parent, close[0])
    return ""


def _index(device: str) -> int:
    """'cuda:1' -> 1 (the keys of transformers' max_memory)."""
    return int(device.split(":", 1)[1]) if ":" in device else 0
