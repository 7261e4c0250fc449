"""Parameter counts per component (``refseg model-info --preset r101``), built offline.

    d = model_info("r101")   # {"vision_body": 42394816, "fpn": ..., ..., "total": ...}
    print(format_model_info(d))
"""

from __future__ import annotations

import torch

from refseg.config import ModelConfig
from refseg.models.refseg_model import RefSegModel, build_model

COMPONENTS = ("vision_body", "fpn", "text_encoder", "lstm", "fusion", "decoder")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parameters(model: RefSegModel) -> dict[str, int]:
    """{component: #params} for COMPONENTS plus "trainable" and "total" (every parameter once)."""
    text_head = _count(model.text) - _count(model.text.bert)  # LSTM + its projections
    d = {
        "vision_body": _count(model.vision.body),
        "fpn": _count(model.vision.fpn),
        "text_encoder": _count(model.text.bert),
        "lstm": text_head,
        "fusion": _count(model.fusion),
        "decoder": _count(model.decoder),
    }
    d["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d["total"] = _count(model)
    return d


def model_info(preset_or_cfg: str | ModelConfig) -> dict[str, int | str]:
    """Parameter counts of the model a preset/ModelConfig describes (random init, no downloads).

    Built on the meta device, so even r101 costs no memory."""
    with torch.device("meta"):
        model = build_model(preset_or_cfg, pretrained=False)
    d: dict[str, int | str] = dict(count_parameters(model))
    cfg = model.config
    d["preset"] = cfg.preset or "custom"
    d["backbone"] = cfg.vision.backbone
    d["text_encoder_name"] = cfg.text.encoder if cfg.text.bert_config is None else "random BertConfig"
    return d


def format_model_info(d: dict) -> str:
    """Human-readable table of :func:`model_info` output (millions of parameters)."""
    lines = [f"model {d.get('preset', 'custom')}: {d.get('backbone', '?')} + {d.get('text_encoder_name', '?')}"]
    for key in (*COMPONENTS, "trainable", "total"):
        if key in d:
            lines.append(f"  {key:<14} {d[key] / 1e6:10.3f} M  ({d[key]:,})")
    return "\n".join(lines)
