"""Config files: YAML in, a reward model out.

    model:
      class_path: multi_gpu            # a short name below, or a dotted path to a class
      params:                          # `init_args` is accepted too (LightningCLI's name)
        model_name: Qwen/Qwen2.5-VL-7B-Instruct
        device_ids: auto

Errors read like jsonargparse's: `Problem with class_path 'x': ...`, naming the key and the
known choices.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import typing
from pathlib import Path
from typing import Any, Mapping

from .base import BaseRewardModel
from .errors import JudgeConfigError
from .settings import check_type

_IMPL = "src.models.reward.implementations"
ALIASES: dict[str, str] = {
    "qwen_vl": f"{_IMPL}.local.QwenVLRewardModel",
    "single": f"{_IMPL}.local.QwenVLRewardModel",
    "multi_gpu": f"{_IMPL}.multi_gpu.MultiGPURewardModel",
    "remote": f"{_IMPL}.remote.RemoteRewardModel",
    "ray": f"{_IMPL}.ray_actors.RayRewardModel",
    "openai": f"{_IMPL}.openai_api.OpenAIRewardModel",
}


class ConfigError(JudgeConfigError):
    """A problem with a config file or a --set override; the message names the key."""


def resolve_class(class_path: str) -> type:
    where = f"Problem with class_path '{class_path}'"
    target = ALIASES.get(class_path, class_path)
    if "." not in target:
        close = difflib.get_close_matches(class_path, list(ALIASES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}: not a known short name nor a dotted path.{hint} "
                          f"Known short names: {', '.join(ALIASES)}")
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, TypeError, ValueError) as e:  # TypeError: a relative name ('../x')
        raise ConfigError(f"{where}: cannot import module '{module_name}': {e}. "
                          f"Known short names: {', '.join(ALIASES)}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError(f"{where}: module '{module_name}' has no attribute '{attr}'")
    if not (isinstance(cls, type) and issubclass(cls, BaseRewardModel)):
        raise ConfigError(f"{where}: '{target}' is not a BaseRewardModel subclass")
    return cls


def accepted_params(cls: type) -> tuple[dict[str, Any], set[str]]:
    """The parameters a class accepts: {name: type hint} and the set of required names.
    A class with a `settings_cls` that takes **kwargs accepts that record's fields as well."""
    sig = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__, include_extras=True)  # Annotated checks too
    except Exception:
        hints = {}
    params: dict[str, Any] = {}
    required: set[str] = set()
    takes_kwargs = False
    for name, p in sig.parameters.items():
        if name == "self":
            continue
        if p.kind is p.VAR_KEYWORD:
            takes_kwargs = True
            continue
        if p.kind is p.VAR_POSITIONAL:
            continue
        params[name] = hints.get(name, Any)
        if p.default is p.empty:
            required.add(name)
    settings_cls = getattr(cls, "settings_cls", None)
    if takes_kwargs and settings_cls is not None:
        import dataclasses

        shints = typing.get_type_hints(settings_cls)
        for f in dataclasses.fields(settings_cls):
            params.setdefault(f.name, shints[f.name])
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                required.add(f.name)
        for alias, name in getattr(settings_cls, "PARAM_ALIASES", {}).items():
            params.setdefault(alias, shints[name])
    return params, required


def validate_params(class_path: str, cls: type, params: Mapping[str, Any]) -> dict[str, Any]:
    where = f"Problem with class_path '{class_path}'"
    known, required = accepted_params(cls)
    clean: dict[str, Any] = {}
    for key, value in params.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown parameter '{key}'.{hint} Known: {', '.join(sorted(known))}")
        try:
            clean[key] = check_type(key, value, known[key])
        except TypeError as e:
            raise ConfigError(f"{where}: parameter {e}") from None
    missing = sorted(required - set(params))
    if missing:
        raise ConfigError(f"{where}: missing required parameter(s) {', '.join(repr(m) for m in missing)}")
    return clean


def build_reward_model(spec: Mapping[str, Any]) -> BaseRewardModel:
    """Build a reward model from `{class_path, params | init_args}`."""
    class_path, cls, clean = resolve_spec(spec)
    try:
        return cls(**clean)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Problem with class_path '{class_path}': {e}") from None


def resolve_spec(spec: Mapping[str, Any]) -> tuple[str, type, dict[str, Any]]:
    """Check a model spec without building it: (class_path, class, checked params). Lets a host
    that builds the model later (the HTTP service loads it in the background) report config
    errors at once."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"model: expected a mapping with 'class_path', got {type(spec).__name__}")
    for key in spec:
        if key not in ("class_path", "params", "init_args"):
            raise unknown_key_error("model", str(key), ["class_path", "params", "init_args"], model_param_paths(spec))
    if "class_path" not in spec:
        raise ConfigError(f"model: missing 'class_path'; known short names: {', '.join(ALIASES)}")
    if "params" in spec and "init_args" in spec:
        raise ConfigError("model: give 'params' or 'init_args', not both")
    class_path = str(spec["class_path"])
    params = spec.get("params", spec.get("init_args")) or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"Problem with class_path '{class_path}': params must be a mapping, got {type(params).__name__}")
    cls = resolve_class(class_path)
    clean = validate_params(class_path, cls, params)
    try:
        judge_settings(cls, clean)  # the judge's settings (its template) are read now, not after a load
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Problem with class_path '{class_path}': {e}") from None
    return class_path, cls, clean


def judge_settings(cls: type, params: Mapping[str, Any]) -> Any:
    """The settings record (`settings_cls`) a judge of class `cls` builds from `params`, or None for a
    class without one; raises what building it raises."""
    settings_cls = getattr(cls, "settings_cls", None)
    if settings_cls is None:
        return None
    own = {n for n, p in inspect.signature(cls.__init__).parameters.items() if p.kind is not p.VAR_KEYWORD}
    return settings_cls.from_params({k: v for k, v in params.items() if k not in own})


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML config and apply `key.sub=value` overrides (values parsed as YAML)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: the top level must be a mapping, got {type(data).__name__}")
    for ov in overrides or []:
        apply_override(data, ov)
    return data


def unknown_key_error(where: str, key: str, known: list[str], elsewhere: Mapping[str, str] | None = None) -> ConfigError:
    """`where: unknown key 'k'. Did you mean 'x'? Known: ...`. `elsewhere` maps keys that belong
    in another section to their full dotted path (`batch_size` -> `model.params.batch_size`), so a
    key given at the wrong level points to the right one."""
    hint = ""
    if elsewhere and key in elsewhere:
        hint = f" Did you mean '{elsewhere[key]}'?"
    else:
        close = difflib.get_close_matches(key, list(known), n=1)
        if not close and elsewhere:
            near = difflib.get_close_matches(key, list(elsewhere), n=1)
            close = [elsewhere[near[0]]] if near else []
        if close:
            hint = f" Did you mean '{close[0]}'?"
    return ConfigError(f"{where}: unknown key '{key}'.{hint} Known: {', '.join(known)}")


def model_param_paths(spec: Any) -> dict[str, str]:
    """{param: 'model.params.param'} for the model a config names (empty when it names none we
    can resolve): lets a misplaced key's error point to where it belongs."""
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        return {}
    try:
        cls = resolve_class(str(spec["class_path"]))
    except ConfigError:
        return {}
    section = "init_args" if "init_args" in spec and "params" not in spec else "params"
    return {name: f"model.{section}.{name}" for name in accepted_params(cls)[0]}


def remove_key(data: dict[str, Any], key: str) -> None:
    """`--unset a.b.c`: remove that key, so the class's default applies (or, for a parameter
    another class does not take, so the config can switch class_path on the command line)."""
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--unset {key!r}: empty key segment")
    node: Any = data
    for i, seg in enumerate(parts):
        if seg == "params" and isinstance(node, dict) and "params" not in node and "init_args" in node:
            seg = "init_args"
        if not isinstance(node, dict) or seg not in node:
            here = ".".join(parts[:i]) or "the top level"
            have = sorted(map(str, node)) if isinstance(node, dict) else []
            close = difflib.get_close_matches(seg, have, n=1)
            hint = f" Did you mean '{'.'.join(parts[:i] + [close[0]])}'?" if close else ""
            raise ConfigError(f"--unset {key!r}: the config has no '{seg}' in {here}.{hint} "
                              f"Keys there: {', '.join(have) or 'none'}")
        if i == len(parts) - 1:
            del node[seg]
        else:
            node = node[seg]


def apply_override(data: dict[str, Any], override: str) -> None:
    import yaml

    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected key=value (for example model.params.batch_size=4)")
    key, _, raw = override.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {override!r}: empty key segment")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = data
    for seg in parts[:-1]:
        if seg == "params" and "params" not in node and "init_args" in node:
            seg = "init_args"
        nxt = node.setdefault(seg, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {override!r}: '{seg}' is not a mapping in the config")
        node = nxt
    node[parts[-1]] = value
