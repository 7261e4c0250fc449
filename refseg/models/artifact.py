"""Model artifact folders in the Hugging Face hub layout: ``DIR/config.json`` + ``DIR/model.safetensors``
(+ the tokenizer's files when the text side needs them). Nothing in the folder is a pickle: the
tensors are safetensors, everything else JSON, so loading one runs no code from it.

    write_artifact("out/artifact", meta, state_dict, tokenizer=tok)   # a temp sibling, then renamed
    meta, state_dict = read_artifact("out/artifact")

``meta`` (config.json) is what :func:`refseg.models.export.model_meta` gives: ``format``,
``refseg_version``, ``model_config``, ``encoder_config``, ``config`` (the resolved experiment config)
and ``training`` (the run's summary, when known). :func:`refseg.models.export.save_artifact` /
``load_model`` build and rebuild models from it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_CONFIG = "tokenizer_config.json"  # present when the folder carries its tokenizer
FORMAT = "refseg"  # config.json's "format": which library reads the folder


def is_artifact_dir(path: str | os.PathLike) -> bool:
    """A folder holding config.json and model.safetensors."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def has_tokenizer(path: str | os.PathLike) -> bool:
    """Does the artifact folder carry its tokenizer's files (``AutoTokenizer.from_pretrained(path)``)?"""
    return (Path(path) / TOKENIZER_CONFIG).is_file()


def write_artifact(out_dir: str | os.PathLike, meta: dict, state_dict: dict[str, torch.Tensor],
                   tokenizer: Any = None) -> Path:
    """Write ``meta`` as config.json, ``state_dict`` as model.safetensors and the files of ``tokenizer``
    (a Hugging Face tokenizer, or None) into ``out_dir``, which must be missing, empty or an artifact
    folder (then replaced). Written into a temp sibling first, so a crash leaves no half folder."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_artifact_dir(out))):
        raise ValueError(f"artifact folder '{out}' exists and is not an artifact folder; pass a new or empty "
                         "directory as --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # one storage per tensor (safetensors refuses shared ones), contiguous, on the CPU
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}, tmp / WEIGHTS_FILE,
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
            for f in (tmp / "tokenizer").iterdir():
                if f.name not in (CONFIG_FILE, WEIGHTS_FILE):
                    f.rename(tmp / f.name)
            shutil.rmtree(tmp / "tokenizer")
        (tmp / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=1))
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_artifact(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, the state dict from model.safetensors) of an artifact folder; a folder
    refseg did not write, or a damaged file, is a ValueError sentence. Unpickles nothing."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    try:
        meta = json.loads((p / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"artifact folder '{p}': {CONFIG_FILE} could not be read ({type(e).__name__}); "
                         "export the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model_config" not in meta:
        raise ValueError(f"artifact folder '{p}' was not written by refseg ({CONFIG_FILE} has no "
                         f"format={FORMAT!r} / model_config); pass a folder written by refseg export")
    try:
        state = load_file(p / WEIGHTS_FILE, device="cpu")
    except (OSError, SafetensorError) as e:
        raise ValueError(f"artifact folder '{p}': {WEIGHTS_FILE} could not be read ({type(e).__name__}); "
                         "export the model again") from None
    return meta, state
