"""Named model sizes, one small function each (``preset_config(name) -> ModelConfig``).

Parameter counts (``refseg model-info --preset NAME``; text encoders without their pooler):

- ``r101``: ResNet-101 (ImageNet, frozen BN) + ``bert-base-uncased`` (12 x 768) -- 161.7M
  (body 42.4M + BERT-base 108.9M + FPN 3.3M + LSTM 1.1M + fusion 5.1M + decoder 0.8M). The ResNet-101
  body and BERT-base alone are 151.3M, so this design cannot sit below ~155M; the rest follows the
  ModelConfig defaults (3 fusion layers of width 256).
- ``r50``: ResNet-50 + ``google/bert_uncased_L-12_H-512_A-8`` -- 87.3M (body 23.5M + text 53.7M +
  the same 10M of FPN/LSTM/fusion/decoder). The text side is the official BERT miniature with 12
  layers of width 512 (same uncased WordPiece vocab and pre-training recipe as bert-base): it keeps
  BERT's depth and shrinks its width, a plain ``from_pretrained`` checkpoint (a truncated bert-base
  would need a custom loading path), and lands the total on the ~87M target. Offline
  (``pretrained=False``) its shape is parsed from the name, so no download is needed to count it.
- ``tiny``: a BasicBlock ResNet [16, 32, 64, 128] + FPN 32 + a 1-layer 64-wide random BERT over the
  bundled 409-token vocab (``builtin:tiny_vocab``) + a light decoder [32, 16, 16, 8] with the stem's
  stride-2 maps as a skip (``decoder.stem_skip``: sharper boundaries on ~10-20 px objects), with early
  fusion (``fusion.early``) -- 0.70M. One BERT layer, not two: random-init attention layers slowed
  grounding on the synthetic set (measured in bench/learning.py runs, see BENCHMARKS.md). FPN 32, not
  64: the FPN's 3x3 convolutions at stride 4 were a quarter of the forward time; 32 channels train
  16 % faster per epoch with the same val mIoU after 5 epochs (0.567-0.579 vs 0.566, two seeds); 16
  channels learn slower (0.546). Sized for CPU training (tests, debug runs): ~50-60 samples/s fwd+bwd
  at 128x128, batch 16, one core, fp32 (the decoder widths were cut from [64, 32, 16, 16], which ran
  at ~20 samples/s).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

from refseg.config import DecoderConfig, FusionConfig, ModelConfig, TextConfig, VisionConfig

TINY_TOKENIZER = "builtin:tiny_vocab"  # text.tokenizer value that selects the bundled tiny vocab


def tiny_vocab_path() -> Path:
    """Path of the bundled WordPiece vocabulary (one token per line; [PAD]=0)."""
    return Path(str(resources.files("refseg.models") / "assets" / "tiny_vocab.txt"))


def read_vocab(path: str | Path) -> dict[str, int]:
    """WordPiece vocab file -> {token: id} (id = line number)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return {tok: i for i, tok in enumerate(lines) if tok}


def offline_preset(name: str) -> ModelConfig:
    """``name``'s shapes with random weights and the bundled vocabulary: no hub downloads, the same
    compute (token ids < 409 of the real vocab). For benchmarks on machines without the weights."""
    from refseg.models.text import offline_bert_config

    cfg = preset_config(name)
    cfg.vision.weights = None
    if name != "tiny":
        cfg.text.bert_config = offline_bert_config(cfg.text.encoder).to_diff_dict()
    cfg.text.tokenizer = TINY_TOKENIZER
    return cfg


def tiny_vocab_size() -> int:
    return len(read_vocab(tiny_vocab_path()))


def r101() -> ModelConfig:
    return ModelConfig(
        preset="r101",
        dim=256,
        vision=VisionConfig(backbone="resnet101", weights="IMAGENET1K_V2", norm="frozen_bn", fpn_channels=256),
        text=TextConfig(encoder="bert-base-uncased", lstm_hidden=128, dim=256),
        fusion=FusionConfig(num_layers=3, num_heads=8, ffn_dim=1024, level=16),
        decoder=DecoderConfig(channels=[128, 64, 32, 16]),
    )


def r50() -> ModelConfig:
    return ModelConfig(
        preset="r50",
        dim=256,
        vision=VisionConfig(backbone="resnet50", weights="IMAGENET1K_V2", norm="frozen_bn", fpn_channels=256),
        text=TextConfig(encoder="google/bert_uncased_L-12_H-512_A-8", lstm_hidden=128, dim=256),
        fusion=FusionConfig(num_layers=3, num_heads=8, ffn_dim=1024, level=16),
        decoder=DecoderConfig(channels=[128, 64, 32, 16]),
    )


def tiny() -> ModelConfig:
    bert = {"vocab_size": tiny_vocab_size(), "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
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
