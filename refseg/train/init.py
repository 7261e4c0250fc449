"""``train.init_from``: a new run starts from trained weights -- a model.pt, a run dir holding one, an
artifact folder (``refseg export``) or a DeepSpeed checkpoint dir -- instead of ImageNet / BERT.

    check_init(cfg)                     # the driver, before Ray: reads the weights, compares them with the
                                        # model cfg builds; strict: ConfigError, else the one-line report
    init_weights(model, path, strict)   # each worker on a fresh start (a resume restores its checkpoint)

Nothing is unpickled freely: model.pt goes through ``torch.load(weights_only=True)``, an artifact is
safetensors, DeepSpeed files go through :mod:`refseg.train.zero_reader`. With ``train.init_strict``
(the default) every tensor must fit; ``train.init_strict=false`` loads the tensors whose name and shape
match and leaves the rest as built (e.g. a classic checkpoint into ``model.no_target_head=true``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from refseg.config import Config, ConfigError
from refseg.models.artifact import is_artifact_dir
from refseg.models.export import read_weights
from refseg.train.checkpoint import CKPT_TAG
from refseg.train.zero_reader import CheckpointError, fp32_state_dict

LISTED = 6  # names shown per kind in the report line; the rest are counted


def read_init_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict behind ``train.init_from`` (see the module docstring); ConfigError otherwise."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "model.pt").is_file():
        p = p / "model.pt"
    try:
        if p.is_file() or (p.is_dir() and is_artifact_dir(p)):
            return read_weights(p)[1]
        if p.is_dir() and (p / "config.yaml").is_file() and (p / CKPT_TAG).is_dir():
            return fp32_state_dict(p, CKPT_TAG)
    except (CheckpointError, ValueError) as e:  # one sentence naming the file
        raise ConfigError(f"train.init_from: {e}") from None
    what = "does not exist" if not p.exists() else "is neither a model.pt, a run dir holding one, an artifact " \
        "folder (config.json + model.safetensors) nor a DeepSpeed checkpoint dir"
    raise ConfigError(f"train.init_from '{p}' {what}; pass the weights of a trained run (its model.pt or "
                      "artifact/ folder)")


def compare(model_state: dict, weights: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape-mismatched) names of ``weights`` against ``model_state`` (tensors or
    anything with a ``.shape``); each list sorted."""
    missing = sorted(k for k in model_state if k not in weights)
    unexpected = sorted(k for k in weights if k not in model_state)
    mismatched = sorted(k for k in weights if k in model_state
                        and tuple(weights[k].shape) != tuple(model_state[k].shape))
    return missing, unexpected, mismatched


def report_line(path: str | os.PathLike, model_state: dict, weights: dict[str, torch.Tensor]) -> str | None:
    """One line naming what of ``weights`` does not fit ``model_state`` (None when everything fits)."""
    missing, unexpected, mismatched = compare(model_state, weights)
    if not (missing or unexpected or mismatched):
        return None
    loaded = len(model_state) - len(missing) - len(mismatched)

    def names(kind: str, keys: list[str], shapes: bool = False) -> str:
        shown = [f"{k} {tuple(weights[k].shape)}->{tuple(model_state[k].shape)}" if shapes else k
                 for k in keys[:LISTED]]
        more = f" (+{len(keys) - LISTED} more)" if len(keys) > LISTED else ""
        return f"{kind} {len(keys)}: {', '.join(shown)}{more}" if keys else f"{kind} 0"

    return (f"train.init_from '{path}': loaded {loaded} of {len(model_state)} tensors; "
            f"{names('missing', missing)}; {names('unexpected', unexpected)}; "
            f"{names('shape-mismatched', mismatched, shapes=True)}")


def check_init(cfg: Config) -> str | None:
    """Before Ray: read ``train.init_from`` and compare it with the model ``cfg.model`` builds (on the
    meta device: no memory, no download). Strict: any mismatch is a ConfigError sentence; else returns
    the report line (None when everything fits, or without init_from)."""
    from refseg.models import build_model

    if not cfg.train.init_from:
        return None
    weights = read_init_weights(cfg.train.init_from)
    with torch.device("meta"):
        model_state = build_model(cfg.model, pretrained=False).state_dict()
    line = report_line(cfg.train.init_from, model_state, weights)
    if line and cfg.train.init_strict:
        raise ConfigError(f"{line}; set train.init_strict=false to load only the tensors that fit")
    return line


def init_weights(model: torch.nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    """Load the weights behind ``path`` into ``model``: all of them (``strict``), or the tensors whose
    name and shape fit, leaving the others as built."""
    weights = read_init_weights(path)
    own = model.state_dict()
    if strict:
        model.load_state_dict(weights, strict=True)
        return
    _, _, mismatched = compare(own, weights)
    model.load_state_dict({k: v for k, v in weights.items() if k in own and k not in mismatched}, strict=False)
