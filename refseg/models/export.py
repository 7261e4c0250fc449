"""Self-contained model files: ``model.pt`` = {"config", "model_config", "encoder_config", "state_dict"}.

    save_model("out/model.pt", model, cfg.to_dict())
    model, config = load_model("out/model.pt", device="cpu")   # no DeepSpeed, Ray or network needed

``encoder_config`` is the text encoder's HF config, so a model whose BERT came from the hub or a
local directory is rebuilt with the right shape even where that source is unavailable.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from refseg import __version__
from refseg.config import ConfigError, ModelConfig, config_from_dict
from refseg.io import atomic_path
from refseg.models.refseg_model import RefSegModel, build_model


def model_config_from_dict(d: dict) -> ModelConfig:
    """``asdict(ModelConfig)`` -> ModelConfig (validated; unknown keys are an error)."""
    return config_from_dict({"model": d}).model


def save_model(path: str | Path, model: RefSegModel, config: dict) -> Path:
    """Write the model (fp32 state dict + its ModelConfig + ``config``) atomically."""
    if model.config is None:
        raise ValueError("save_model needs a model built by build_model (model.config is None).")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    bert_config = getattr(model.text.bert, "config", None)
    payload = {
        "refseg_version": __version__,  # named in load errors: which code wrote this file
        "config": config,
        "model_config": dataclasses.asdict(model.config),
        "encoder_config": bert_config.to_dict() if bert_config is not None else None,
        "state_dict": state,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RefSegModel, dict[str, Any]]:
    """Rebuild the model saved by :func:`save_model` (strict weight load); returns (model in eval
    mode on ``device``, the saved ``config`` dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file '{path}' does not exist; pass the model.pt written by save_model.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt/foreign files: one clear sentence
        raise ValueError(f"model file '{path}' could not be read ({type(e).__name__}); is it a refseg model.pt?") from None
    if not isinstance(payload, dict) or "model_config" not in payload or "state_dict" not in payload:
        raise ValueError(f"model file '{path}' is not a refseg model.pt (missing model_config/state_dict).")
    try:
        model_cfg = model_config_from_dict(payload["model_config"])
    except ConfigError as e:
        raise ValueError(f"model file '{path}' holds an invalid model config: {e}") from None
    build_cfg = copy.deepcopy(model_cfg)
    if build_cfg.text.bert_config is None and payload.get("encoder_config"):
        build_cfg.text.bert_config = _bert_kwargs(payload["encoder_config"])
    model = build_model(build_cfg, pretrained=False)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as e:  # a layout this code no longer builds from that config: one sentence
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        written = f"refseg {payload['refseg_version']}" if payload.get("refseg_version") else "an older refseg"
        raise ValueError(f"model file '{path}' (written by {written}) does not match the model this refseg "
                         f"builds from its config ({first.rstrip('.')}); load it with the refseg version that "
                         "wrote it, or retrain") from None
    model.config = model_cfg
    return model.to(device).eval(), payload.get("config") or {}


def _bert_kwargs(encoder_config: dict) -> dict:
    """HF config dict -> BertConfig kwargs (bookkeeping keys dropped)."""
    drop = {"architectures", "transformers_version", "_name_or_path", "model_type", "torch_dtype", "dtype",
            "gradient_checkpointing", "_attn_implementation_autoset"}
    return {k: v for k, v in encoder_config.items() if k not in drop}
