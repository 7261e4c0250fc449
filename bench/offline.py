"""Preset shapes without downloads, for benchmarks on machines without the pretrained weights."""

from __future__ import annotations

from refseg.config import TINY_TOKENIZER, ModelConfig, preset_config
from refseg.models.text import offline_bert_config


def offline_preset(name: str) -> ModelConfig:
    """``name``'s shapes with random weights and the bundled vocabulary: no hub downloads, the same
    compute (token ids < 409 of the real vocab)."""
    cfg = preset_config(name)
    cfg.vision.weights = None
    if name != "tiny":
        cfg.text.bert_config = offline_bert_config(cfg.text.encoder).to_diff_dict()
    cfg.text.tokenizer = TINY_TOKENIZER
    return cfg
