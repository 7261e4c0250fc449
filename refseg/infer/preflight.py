"""The checkpoint check that runs before anything starts: no torch, no Ray, nothing created.

    check_checkpoint("runs/debug/model.pt")   # ConfigError (one sentence) unless refseg can load it

A ``model.pt`` is a torch zip file; its pickle (``<archive>/data.pkl``) is read with every tensor,
storage and torch object replaced by an inert placeholder and the tensor data left unread, so the
check costs milliseconds whatever the model's size and runs no code from the file. It confirms the
structure (a dict with ``model_config`` and ``state_dict``) and validates the stored configs; whether
the weights fit the model is checked when the model is built. An artifact folder (``refseg export``)
must hold a refseg config.json and a model.safetensors whose JSON header reads. A DeepSpeed checkpoint
dir must hold a readable config.yaml and a model-states file in its ``ckpt/`` dir.
"""

from __future__ import annotations

import codecs
import collections
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

from refseg.config import ConfigError, config_from_dict, load_yaml
from refseg.io import check_output_dir, is_uri

MODEL_FILE = "model.pt"
# refseg.models.artifact's CONFIG_FILE and WEIGHTS_FILE (that package imports torch; tests tie the names)
ARTIFACT_FILES = ("config.json", "model.safetensors")
FORMS = "pass a model.pt, a training output dir, an artifact folder (refseg export) or a DeepSpeed checkpoint dir"
# globals a torch.save'd dict pickles besides torch's own (protocol 2 spells sets and bytes this way)
_PLAIN_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict, ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset, ("builtins", "bytearray"): bytearray, ("_codecs", "encode"): codecs.encode,
}


class _Placeholder:
    """What a tensor, storage or other pickled object becomes in a peek: its arguments are dropped."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _Peeker(pickle.Unpickler):
    """Builds plain containers; torch objects (and, unless ``strict``, any other global) become
    placeholders; persistent ids (tensor data in the zip) are never read."""

    def __init__(self, file: io.BytesIO, path: Path, strict: bool) -> None:
        super().__init__(file)
        self.path, self.strict = path, strict

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN_GLOBALS:
            return _PLAIN_GLOBALS[(module, name)]
        if self.strict and module != "torch" and not module.startswith("torch."):
            raise ConfigError(f"model file '{self.path}' contains pickled objects other than tensors "
                              f"({module}.{name}); refseg will not unpickle it")
        return _Placeholder

    def persistent_load(self, pid: Any) -> None:
        return None


def peek_torch_file(path: str | os.PathLike, strict: bool = True) -> Any:
    """The object in a ``torch.save`` zip file with tensors as placeholders (see the module docstring).

    ``strict``: refuse any pickled global outside torch and plain containers (a model.pt holds no other)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise ValueError("no data.pkl record")
            data = z.read(pkl[0])
        return _Peeker(io.BytesIO(data), path, strict).load()
    except ConfigError:
        raise
    except (zipfile.BadZipFile, OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            IndexError, AttributeError) as e:
        raise ConfigError(f"model file '{path}' could not be read ({type(e).__name__}); is it a refseg model.pt?") from None


def is_deepspeed_dir(path: Path) -> bool:
    """A DeepSpeed checkpoint dir as refseg train writes it: config.yaml + the checkpoint tag dir."""
    if not (path / "config.yaml").is_file():
        return False
    from refseg.train.checkpoint import CKPT_TAG

    return (path / CKPT_TAG).is_dir()


def is_artifact_dir(path: Path) -> bool:
    """An artifact folder as ``refseg export`` writes it: config.json + model.safetensors."""
    return all((path / name).is_file() for name in ARTIFACT_FILES)


def checkpoint_form_error(path: Path) -> ConfigError:
    """The sentence for a ``--checkpoint`` that is none of the accepted forms."""
    if not path.exists():
        return ConfigError(f"checkpoint '{path}' does not exist; {FORMS}")
    return ConfigError(f"checkpoint '{path}' is neither a model.pt, a directory holding model.pt, an artifact "
                       "folder (config.json + model.safetensors) nor a DeepSpeed checkpoint dir (config.yaml + "
                       "ckpt/); pass one of those")


def _check_model_file(path: Path) -> None:
    payload = peek_torch_file(path)
    if not isinstance(payload, dict) or "model_config" not in payload or "state_dict" not in payload:
        raise ConfigError(f"model file '{path}' is not a refseg model.pt (missing model_config/state_dict).")
    _check_configs(path, payload)


def _check_configs(path: Path, payload: dict) -> None:
    """The stored model config (and the resolved config, when saved) must be valid for this refseg."""
    try:
        config_from_dict({"model": payload["model_config"]})
    except (ConfigError, ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"model file '{path}' holds an invalid model config: {e}") from None
    if payload.get("config"):
        try:
            config_from_dict(payload["config"])
        except (ConfigError, ValueError, TypeError, AttributeError) as e:
            raise ConfigError(f"the checkpoint's stored config is not valid for this refseg version: {e}") from None


def _check_artifact_dir(path: Path) -> None:
    config, weights = (path / name for name in ARTIFACT_FILES)
    try:
        meta = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"artifact folder '{path}': {config.name} could not be read ({type(e).__name__}); "
                          "export the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != "refseg" or "model_config" not in meta:
        raise ConfigError(f"artifact folder '{path}' was not written by refseg ({config.name} has no "
                          "format='refseg' / model_config); pass a folder written by refseg export")
    _check_configs(path, meta)
    try:  # safetensors: an 8-byte little-endian header length, then the JSON header
        with open(weights, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > weights.stat().st_size - 8:
                raise ValueError("header longer than the file")
            json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"artifact folder '{path}': {weights.name} could not be read ({type(e).__name__}); "
                          "export the model again") from None


def _check_deepspeed_dir(path: Path) -> None:
    from refseg.train.checkpoint import CKPT_TAG

    try:
        config_from_dict(load_yaml(path / "config.yaml"))
    except (ConfigError, OSError, ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"checkpoint '{path}': its config.yaml is not a valid refseg config ({e})") from None
    states = sorted((path / CKPT_TAG).glob("*_model_states.pt"))
    if not states:
        raise ConfigError(f"checkpoint '{path / CKPT_TAG}' holds no DeepSpeed model states (*_model_states.pt); "
                          "pass a checkpoint directory written by refseg train, or its model.pt")
    state = peek_torch_file(states[0], strict=False)
    if not isinstance(state, dict) or "module" not in state:
        raise ConfigError(f"checkpoint file '{states[0]}' is not a DeepSpeed model-states file (no 'module'); "
                          "copy the complete checkpoint directory again")


def check_checkpoint(path: str | os.PathLike) -> None:
    """Raise :class:`ConfigError` (one sentence) unless ``path`` is a model.pt, a dir holding one, an
    artifact folder or a DeepSpeed checkpoint dir that looks loadable (see the module docstring). Reads
    no tensor data."""
    p = Path(path).expanduser()
    if p.is_file():
        _check_model_file(p)
    elif p.is_dir() and (p / MODEL_FILE).is_file():
        _check_model_file(p / MODEL_FILE)
    elif p.is_dir() and is_artifact_dir(p):
        _check_artifact_dir(p)
    elif p.is_dir() and is_deepspeed_dir(p):
        _check_deepspeed_dir(p)
    else:
        raise checkpoint_form_error(p)


def check_artifact_out(path: str | os.PathLike, flag: str = "--out") -> None:
    """Raise :class:`ConfigError` (naming ``flag``) unless an artifact folder can be written at ``path``:
    a new or empty directory, or an artifact folder (then replaced). Creates nothing."""
    if is_uri(path):
        raise ConfigError(f"{flag} '{path}' must be a local directory (the folder is written atomically there)")
    check_output_dir(path, flag)
    p = Path(path).expanduser()
    if p.is_dir() and any(p.iterdir()) and not is_artifact_dir(p):
        raise ConfigError(f"{flag} {path} holds other files; pass a new or empty directory (or an artifact folder "
                          "to replace)")
