"""From YAML and dotted overrides to a typed :class:`~refseg.config.schema.Config`.

    cfg = load_config("configs/debug.yaml", ["train.lr=2e-4", "model.fusion.num_layers=4"])
    cfg.to_yaml()   # the resolved config, stored with every checkpoint and run directory

Unknown keys and wrong types raise :class:`ConfigError` naming the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from refseg.config.presets import preset_config
from refseg.config.schema import Config, ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]  # holds configs/ and tune/ in a checkout
# keys that older refseg versions wrote into every saved config.yaml / model.pt; read and ignored, so
# their checkpoints and run directories still load
RETIRED_KEYS = {"eval": ("threshold", "workers", "at_train_res"), "train": ("fail_at_step",)}


def closest_key(key: str, options: list[str]) -> str:
    """``"; did you mean 'X'?"`` for the option closest to ``key`` ("" when there are no options)."""
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Validate (and gently coerce int->float) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0]) if len(errors) == 1 else ConfigError(f"config key '{key}': {value!r} has the wrong type")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return value
    return value


def _merge_into(obj: Any, data: dict, prefix: str = "") -> None:
    """Recursively set fields of dataclass ``obj`` from ``data``; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'{closest_key(str(key), names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge_into(current, value, f"{full}.")
        else:
            setattr(obj, key, _check_type(value, hints[key], full))


def _drop_retired(data: dict) -> dict:
    for section, keys in RETIRED_KEYS.items():
        if isinstance(data.get(section), dict):
            data[section] = {k: v for k, v in data[section].items() if k not in keys}
    return data


def config_from_dict(data: dict | None) -> Config:
    """Build a :class:`Config`; ``model.preset`` (if given) seeds the model section first."""
    data = _drop_retired(dict(data or {}))
    cfg = Config()
    model = data.pop("model", None) or {}
    if not isinstance(model, dict):
        raise ConfigError(f"config section 'model' must be a mapping, got {model!r}")
    preset = model.get("preset")
    if preset is not None:
        cfg.model = preset_config(preset)
    _merge_into(cfg.model, model, "model.")
    _merge_into(cfg, data)
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=2e-4"`` -> (["train", "lr"], 2e-4). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.lr=2e-4)")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str) and _looks_float(value):
        value = float(value)  # YAML 1.1 reads "2e-4" as a string
    return key.strip().split("."), value


def _looks_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return any(c in s.lower() for c in "e.") and not s.strip().lower() in ("nan", "inf", "-inf")


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply dotted ``key=value`` overrides to a nested dict (validation happens in config_from_dict)."""
    data = deep_copy(data)
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[path[-1]] = value
    return data


def _map_leaves(d: Any, fn: Callable[[Any], Any]) -> Any:
    """Nested dicts and lists rebuilt with ``fn`` applied to every other value."""
    if isinstance(d, dict):
        return {k: _map_leaves(v, fn) for k, v in d.items()}
    if isinstance(d, list):
        return [_map_leaves(v, fn) for v in d]
    return fn(d)


def deep_copy(d: Any) -> Any:
    """A copy of nested dicts and lists (their leaves shared): enough for YAML data."""
    return _map_leaves(d, lambda leaf: leaf)


def fix_floats(d: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string; turn such strings (in nested dicts/lists) into floats."""
    return _map_leaves(d, lambda leaf: float(leaf) if isinstance(leaf, str) and _looks_float(leaf) else leaf)


def load_yaml(path: str | Path) -> dict:
    """The mapping in YAML file ``path`` (floats fixed, see :func:`fix_floats`); ConfigError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass a path like configs/debug.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (model, data, train, ...)")
    return fix_floats(data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or defaults when ``path`` is None) and apply dotted overrides."""
    data = load_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides))


def shipped_path(folder: str, name: str, what: str) -> str:
    """A YAML path, or the name of a file shipped in ``folder``/ of the repo (configs/, tune/).

    ``name`` is returned as is when it is a file or ends in .yaml/.yml; else ``<folder>/<name>.yaml``
    under the working directory, then under the repo that holds this package."""
    p = Path(name)
    if p.is_file() or p.suffix in (".yaml", ".yml"):
        return str(p)
    for base in (Path.cwd(), REPO_ROOT):
        candidate = base / folder / f"{name}.yaml"
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(f"{what} '{name}' is neither a file nor a {what} shipped in {folder}/; pass a YAML path")
