"""Named model sizes, one small function each (``preset_config(name) -> ModelConfig``).

Parameter counts (``refseg model-info --preset NAME``; text encoders without their pooler):

- ``r101``: ResNet-101 (ImageNet, frozen BN) + ``bert-base-uncased`` (12 x 768) -- 161.7M
  (body 42.4M + BERT-base 108.9M + FPN 3.3M + LSTM 1.1M + fusion 5.1M + decoder 0.9M). The ResNet-101
  body and BERT-base alone are 151.3M; the rest follows the ModelConfig defaults (3 fusion layers of
  width 256).
- ``r50``: ResNet-50 + ``google/bert_uncased_L-12_H-512_A-8`` -- 87.3M (body 23.5M + text 53.7M +
  FPN 3.3M + LSTM 0.8M + fusion 5.1M + decoder 0.9M). The text side is the official BERT miniature
  with 12 layers of width 512 (same uncased WordPiece vocab and pre-training recipe as bert-base): a
  plain ``from_pretrained`` checkpoint. Offline (``pretrained=False``) its shape is parsed from the
  name, so no download is needed to count it.
- ``tiny``: a BasicBlock ResNet [16, 32, 64, 128] + FPN 32 + a 1-layer 64-wide random BERT over the
  bundled 409-token vocab (``builtin:tiny_vocab``) + a light decoder [32, 16, 16, 8] with the stem's
  stride-2 maps as a skip (``decoder.stem_skip``), with early fusion (``fusion.early``) -- 0.70M.
  Sized for CPU training (tests, debug runs); the measurements behind its widths are in BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Callable

from refseg.config.schema import DecoderConfig, FusionConfig, ModelConfig, TextConfig, VisionConfig

TINY_TOKENIZER = "builtin:tiny_vocab"  # text.tokenizer value that selects the bundled tiny vocab
TINY_VOCAB_SIZE = 409  # tokens in that vocab (refseg/models/assets/tiny_vocab.txt)


def resnet_bert(preset: str, backbone: str, encoder: str) -> ModelConfig:
    """A torchvision ResNet (ImageNet weights, frozen BN, FPN 256) + a pretrained BERT-family encoder,
    3 fusion layers of width 256 and the decoder [128, 64, 32, 16]."""
    return ModelConfig(
        preset=preset,
        dim=256,
        vision=VisionConfig(backbone=backbone, weights="IMAGENET1K_V2", norm="frozen_bn", fpn_channels=256),
        text=TextConfig(encoder=encoder, lstm_hidden=128, dim=256),
        fusion=FusionConfig(num_layers=3, num_heads=8, ffn_dim=1024, level=16),
        decoder=DecoderConfig(channels=[128, 64, 32, 16]),
    )


def r101() -> ModelConfig:
    return resnet_bert("r101", "resnet101", "bert-base-uncased")


def r50() -> ModelConfig:
    return resnet_bert("r50", "resnet50", "google/bert_uncased_L-12_H-512_A-8")


def tiny() -> ModelConfig:
    bert = {"vocab_size": TINY_VOCAB_SIZE, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "intermediate_size": 128, "max_position_embeddings": 128, "pad_token_id": 0}
    return ModelConfig(
        preset="tiny",
        dim=64,
        vision=VisionConfig(backbone="tiny", weights=None, widths=[16, 32, 64, 128], blocks=[1, 1, 1, 1],
                            norm="bn", fpn_channels=32),
        text=TextConfig(encoder="tiny-bert", bert_config=bert, tokenizer=TINY_TOKENIZER, lstm_hidden=32, dim=64),
        fusion=FusionConfig(num_layers=2, num_heads=4, ffn_dim=128, level=16, early=True),
        decoder=DecoderConfig(channels=[32, 16, 16, 8], stem_skip=True),
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {"r101": r101, "r50": r50, "tiny": tiny}


def preset_config(name: str) -> ModelConfig:
    """A fresh ModelConfig for preset ``name`` (r101 | r50 | tiny)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}.")
    return PRESETS[name]()
