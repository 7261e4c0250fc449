"""Pure-PyTorch model code: vision (ResNet+FPN), text (BERT+BiLSTM), fusion, decoder, presets.

    from refseg.models import build_model, load_tokenizer
    model = build_model("tiny")                  # or "r101", "r50", or a ModelConfig
    tok = load_tokenizer(model.config.text)

Names are imported lazily, so ``import refseg.models`` (e.g. from the config loader, for presets)
does not pull in torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from refseg.models.export import load_model, save_model
    from refseg.models.info import format_model_info, model_info
    from refseg.models.presets import PRESETS, preset_config
    from refseg.models.refseg_model import RefSegModel, build_model
    from refseg.models.text import load_tokenizer

_EXPORTS = {
    "build_model": "refseg.models.refseg_model",
    "RefSegModel": "refseg.models.refseg_model",
    "load_tokenizer": "refseg.models.text",
    "preset_config": "refseg.models.presets",
    "PRESETS": "refseg.models.presets",
    "save_model": "refseg.models.export",
    "load_model": "refseg.models.export",
    "model_info": "refseg.models.info",
    "format_model_info": "refseg.models.info",
}
__all__ = [
    "PRESETS",
    "RefSegModel",
    "build_model",
    "format_model_info",
    "load_model",
    "load_tokenizer",
    "model_info",
    "preset_config",
    "save_model",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'refseg.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
