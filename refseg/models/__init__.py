"""Pure-PyTorch model code: vision (ResNet+FPN), text (tokenizer, BERT+BiLSTM), fusion, decoder, builders.

    from refseg.models import build_model, load_tokenizer
    model = build_model("tiny")                  # or "r101", "r50", or a ModelConfig
    tok = load_tokenizer(model.config.text)

The named sizes (``preset_config``, ``PRESETS``) live in :mod:`refseg.config.presets` and are
re-exported here. No ray import anywhere in this package.
"""

from refseg.config.presets import PRESETS, preset_config
from refseg.models.export import load_model, save_model
from refseg.models.info import format_model_info, model_info
from refseg.models.refseg_model import RefSegModel, build_model
from refseg.models.text import load_tokenizer

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
