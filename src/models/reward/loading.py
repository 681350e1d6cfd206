"""Loading a judge: checkpoint path, processor, model on its device, the scale's level tokens.

Part of JudgeEngine (engine.py), as a mixin: these methods run on the engine's attributes.
"""
from __future__ import annotations

import os

from .templates import Template


class Loading:
    """Loading the checkpoint (JudgeEngine mixin)."""

    def _load(self) -> None:
        torch = self._torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        s = self.settings
        path = s.model_name
        if path.startswith("tiny:"):
            from ..tiny import resolve_model_name

            path = resolve_model_name(path)
        elif not os.path.isabs(path) and not os.path.exists(path):
            # A repo-relative folder (e.g. models/tiny_judge) works from any working directory.
            in_repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", path)
            if os.path.isdir(in_repo):
                path = os.path.normpath(in_repo)
        self.model_path = path
        self.processor = AutoProcessor.from_pretrained(path)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
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
        # Loading straight onto the GPU (device_map) needs accelerate; without it, load then move.
        import importlib.util

        direct = self.device != "cpu" and importlib.util.find_spec("accelerate") is not None
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, attn_implementation=s.attn_implementation,
            **({"device_map": self.device} if direct else {}))
        if not direct:
            model = model.to(self.device)
        self.model = model.eval()
        self._setup_speed()
        self._level_ids: dict[str, tuple[list[int], list[float], list[str]]] = {}
        if s.mode == "logits":
            for _, tpl in self.rubric.parts:
                self._level_ids[tpl.name] = self._levels_for(tpl)

    def _levels_for(self, tpl: Template) -> tuple[list[int], list[float], list[str]]:
        if not tpl.levels:
            raise ValueError(f"template {tpl.name!r}: logits mode needs single-token levels; its scale "
                             f"{tpl.scale} has none (set `levels`, or use mode: generate)")
        ids, values, names = [], [], []
        lead_space = bool(tpl.logits_prefix) and not tpl.logits_prefix[-1].isspace()
        for text, value in tpl.levels:
            piece = (" " + text) if lead_space else text
            enc = self.tokenizer.encode(piece, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(f"template {tpl.name!r}: level {piece!r} is {len(enc)} tokens for this tokenizer; "
                                 "logits mode needs every level to be one token (use other levels or mode: generate)")
            ids.append(enc[0])
            values.append(float(value))
            names.append(text)
        return ids, values, names


def _normalize_device(device: str | int) -> str:
    if isinstance(device, int):
        return f"cuda:{device}"
    device = str(device).strip()
    if device.isdigit():
        return f"cuda:{device}"
    if device == "cuda":
        return "cuda:0"
    if device != "cpu" and not device.startswith("cuda:"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device

