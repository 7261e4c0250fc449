"""Search spaces: YAML of dotted config keys -> validated distributions -> Tune domains and trial configs.

A search space maps dotted config keys to one distribution each::

    model.fusion.num_layers: {choice: [1, 2, 3, 4, 5, 6]}
    train.lr: {loguniform: [1.0e-5, 1.0e-3]}     # also {uniform: [lo, hi]}, {randint: [lo, hi]} (hi inclusive)

    space = load_space("tune/fusion_lr.yaml", base)     # {key: (kind, args)}, every value checked on ``base``
    cfg = trial_config(base, {"train.lr": 2e-4})         # the Config one trial trains with

Also here: the resources one trial holds and how many trials fit at once without starving Ray Data.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from refseg.config import Config, ConfigError, closest_key, config_from_dict, deep_copy, fix_floats

KINDS = ("choice", "loguniform", "uniform", "randint")
TRIAL_CPUS = 0.1  # the trial function only drives its Train run (workers are separate actors)


# ----------------------------------------------------------------------------- the search space
def get_key(d: Any, key: str) -> Any:
    """The value at dotted ``key`` in a nested dict or a Config (None when a part is missing)."""
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else getattr(d, part, None)
    return d


def set_key(d: dict, key: str, value: Any) -> None:
    """Set dotted ``key`` in the nested dict ``d`` (missing sections are created)."""
    *head, last = key.split(".")
    for part in head:
        if not isinstance(d.get(part), dict):
            d[part] = {}
        d = d[part]
    d[last] = value


def plain_value(v: Any) -> Any:
    """numpy scalars / arrays (what Tune samples) -> Python values the config schema accepts."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [plain_value(x) for x in v]
    return v


def _check_key(key: str, where: str) -> None:
    """``key`` must name a leaf of the config schema (not a section, not ``tune.*``)."""
    node: Any = Config()
    seen = []
    for part in key.split("."):
        names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
        if part not in names:
            prefix = ".".join(seen)
            raise ConfigError(f"unknown config key '{key}' in search space {where}"
                              f"{closest_key(part, names) if names else ''}"
                              + (f" (under '{prefix}')" if prefix and names else ""))
        seen.append(part)
        node = getattr(node, part)
    if dataclasses.is_dataclass(node):
        raise ConfigError(f"search space {where}: '{key}' is a config section; search one of its keys, "
                          f"e.g. '{key}.{dataclasses.fields(node)[0].name}'")
    if key.startswith("tune."):
        raise ConfigError(f"search space {where}: '{key}' configures the sweep itself and cannot be searched")


def _check_spec(key: str, spec: Any, where: str) -> tuple[str, list]:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"search space {where}: '{key}' must map to exactly one of "
                          f"{{choice: [...]}}, {{loguniform: [lo, hi]}}, {{uniform: [lo, hi]}}, "
                          f"{{randint: [lo, hi]}}; got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"search space {where}: '{key}: {{choice: ...}}' needs a non-empty list of values")
        return kind, args
    if (not isinstance(args, list) or len(args) != 2
            or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
        raise ConfigError(f"search space {where}: '{key}: {{{kind}: ...}}' needs two numbers [lo, hi], got {args!r}")
    lo, hi = args
    if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise ConfigError(f"search space {where}: '{key}: {{randint: [lo, hi]}}' needs integers, got {args!r}")
    if not lo < hi:
        raise ConfigError(f"search space {where}: '{key}: {{{kind}: [{lo}, {hi}]}}' needs lo < hi")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"search space {where}: '{key}: {{loguniform: [{lo}, {hi}]}}' needs lo > 0")
    return kind, args


def parse_space(data: Any, base: dict | None = None, where: str = "<space>") -> dict[str, tuple[str, list]]:
    """Validate a search-space mapping -> ``{dotted key: (kind, args)}``.

    Every key must be a config leaf; every candidate value (each choice, both bounds) must be a valid
    value for that key on top of ``base`` (the raw config dict), so type errors show before any trial.
    """
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"search space {where} must be a non-empty mapping of dotted config keys, "
                          "e.g. 'train.lr: {loguniform: [1.0e-5, 1.0e-3]}'")
    data = fix_floats(data)
    space = {}
    for key, spec in data.items():
        key = str(key)
        _check_key(key, where)
        space[key] = _check_spec(key, spec, where)
    for key, (kind, args) in space.items():
        for value in args if kind in ("choice", "randint") else [float(a) for a in args]:  # what Tune samples
            try:
                trial_config(base or {}, {key: value})
            except ConfigError as e:
                raise ConfigError(f"search space {where}: {kind} value {value!r} for '{key}' is invalid: {e}") from None
    return space


def read_space(path: str | Path) -> Any:
    """The YAML of a space file, unvalidated (see :func:`parse_space`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space '{path}' does not exist; pass a YAML file like tune/fusion_lr.yaml")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"search space '{path}' is not valid YAML: {e}") from None


def load_space(path: str | Path, base: dict | None = None) -> dict[str, tuple[str, list]]:
    """Read and validate a space YAML (see :func:`parse_space`)."""
    return parse_space(read_space(path), base, where=f"'{path}'")


def tune_domains(space: dict[str, tuple[str, list]]) -> dict:
    """``{key: (kind, args)}`` -> Tune's ``param_space`` (randint's upper bound is inclusive here)."""
    from ray import tune

    make = {"choice": lambda a: tune.choice(a), "loguniform": lambda a: tune.loguniform(*a),
            "uniform": lambda a: tune.uniform(*a), "randint": lambda a: tune.randint(a[0], a[1] + 1)}
    return {key: make[kind](args) for key, (kind, args) in space.items()}


def trial_config(base: dict, params: dict) -> Config:
    """The raw config dict ``base`` with the sampled ``params`` (dotted keys) applied, validated."""
    data = deep_copy(base)
    for key, value in params.items():
        set_key(data, key, plain_value(value))
    return config_from_dict(data)


# ----------------------------------------------------------------------------- resources
def per_trial_resources(base: dict, space: dict) -> dict[str, float]:
    """CPUs/GPUs one trial holds: its driver function + the Train workers (largest searched values)."""
    cfg = trial_config(base, {})

    def worst(key: str) -> float:
        if key not in space:
            return float(get_key(cfg, key))
        return float(max(space[key][1]))

    workers = worst("train.num_workers")
    use_gpu = cfg.train.use_gpu or ("train.use_gpu" in space and True in space["train.use_gpu"][1])
    return {"CPU": TRIAL_CPUS + workers * worst("train.cpus_per_worker"),
            "GPU": workers * worst("train.gpus_per_worker") if use_gpu else 0.0,
            "data_CPU": worst("data.map_cpus")}


def max_concurrent_trials(need: dict[str, float], cluster: dict[str, float], requested: int | None = None) -> int:
    """How many trials may run at once without starving Ray Data.

    Every running trial holds ``need["CPU"]`` (driver + workers) for its whole run; its data tasks need
    ``need["data_CPU"]`` more, transiently. If the trials' holdings leave at least one data task's CPUs
    free, every pipeline makes progress; otherwise all trials wait on data forever (a silent hang).
    """
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    free = cpus - need["data_CPU"]
    safe = math.floor((free + 1e-9) / need["CPU"]) if need["CPU"] > 0 else 10**6
    if need["GPU"] > 0:
        safe = min(safe, math.floor((gpus + 1e-9) / need["GPU"]))
    if safe < 1:
        raise ConfigError(
            f"one trial needs {need['CPU']:g} CPUs ({TRIAL_CPUS:g} for its driver + train.num_workers x "
            f"train.cpus_per_worker) plus data.map_cpus={need['data_CPU']:g} for its data"
            + (f" and {need['GPU']:g} GPUs" if need["GPU"] else "")
            + f", but the cluster has {cpus:g} CPUs / {gpus:g} GPUs; lower train.num_workers or "
            "train.cpus_per_worker, or add nodes")
    if requested is None:
        return safe
    if requested < 1:
        raise ConfigError(f"--max-concurrent must be at least 1, got {requested}")
    if requested > safe:
        raise ConfigError(
            f"--max-concurrent {requested}: {requested} trials x {need['CPU']:g} CPUs"
            + (f" / {need['GPU']:g} GPUs" if need["GPU"] else "")
            + f" plus data.map_cpus={need['data_CPU']:g} exceed the cluster ({cpus:g} CPUs / {gpus:g} GPUs): "
            f"the data pipelines would starve and the sweep would hang; use at most {safe} or leave it out")
    return requested
