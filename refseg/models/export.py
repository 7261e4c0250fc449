"""Self-contained model files: ``model.pt`` = {"config", "model_config", "encoder_config", "state_dict"},
and artifact folders (config.json + model.safetensors, :mod:`refseg.models.artifact`).

    save_model("out/model.pt", model, cfg.to_dict())
    save_artifact("out/artifact", model, cfg.to_dict(), training=summary)
    model, config = load_model("out/model.pt", device="cpu")   # or the artifact folder; no DeepSpeed,
                                                               # Ray or network needed

``encoder_config`` is the text encoder's HF config, so a model whose BERT came from the hub or a
local directory is rebuilt with the right shape even where that source is unavailable. Neither form
is unpickled freely: model.pt is read with ``torch.load(weights_only=True)``, an artifact is JSON +
safetensors.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from refseg import __version__
from refseg.config import TINY_TOKENIZER, ConfigError, ModelConfig, config_from_dict
from refseg.io import atomic_path
from refseg.models.artifact import has_tokenizer, is_artifact_dir, read_artifact, write_artifact
from refseg.models.refseg_model import RefSegModel, build_model
from refseg.models.text import load_tokenizer


def model_config_from_dict(d: dict) -> ModelConfig:
    """``asdict(ModelConfig)`` -> ModelConfig (validated; unknown keys are an error)."""
    return config_from_dict({"model": d}).model


def model_meta(model: RefSegModel, config: dict) -> dict:
    """What model.pt and an artifact's config.json hold besides the weights: the refseg version, the
    resolved ``config``, the model's ModelConfig and its text encoder's HF config."""
    if model.config is None:
        raise ValueError("saving a model needs one built by build_model (model.config is None).")
    bert_config = getattr(model.text.bert, "config", None)
    return {
        "refseg_version": __version__,  # named in load errors: which code wrote this file
        "config": config,
        "model_config": dataclasses.asdict(model.config),
        "encoder_config": bert_config.to_dict() if bert_config is not None else None,
    }


def fp32_state(model: RefSegModel) -> dict[str, torch.Tensor]:
    """The model's state dict on the CPU, floating-point tensors in fp32."""
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in model.state_dict().items()}


def save_model(path: str | Path, model: RefSegModel, config: dict) -> Path:
    """Write the model (fp32 state dict + its ModelConfig + ``config``) atomically."""
    payload = {**model_meta(model, config), "state_dict": fp32_state(model)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def save_artifact(out_dir: str | Path, model: RefSegModel, config: dict, training: dict | None = None) -> Path:
    """Write the artifact folder (config.json + model.safetensors) of ``model``; ``training``: the run's
    summary, kept in config.json. A tokenizer other than the built-in tiny vocab travels with it, so
    the folder needs no network and no file outside it."""
    meta = {**model_meta(model, config), "training": training}
    text = model.config.text
    tokenizer = None if (text.tokenizer or text.encoder) == TINY_TOKENIZER else load_tokenizer(text)
    return write_artifact(out_dir, meta, fp32_state(model), tokenizer)


def export_artifact(src: str | Path, out_dir: str | Path, training: dict | None = None) -> Path:
    """A model.pt (or artifact folder) -> the artifact folder ``out_dir`` (see :func:`save_artifact`)."""
    model, config = load_model(src)
    return save_artifact(out_dir, model, config, training)


def read_model_file(path: Path) -> dict:
    """The payload of a model.pt, read with ``weights_only=True`` (one sentence for anything else)."""
    if not path.is_file():
        raise FileNotFoundError(f"model file '{path}' does not exist; pass the model.pt written by save_model.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt/foreign/crafted files: one clear sentence
        raise ValueError(f"model file '{path}' could not be read ({type(e).__name__}); is it a refseg model.pt?") from None
    if not isinstance(payload, dict) or "model_config" not in payload or "state_dict" not in payload:
        raise ValueError(f"model file '{path}' is not a refseg model.pt (missing model_config/state_dict).")
    return payload


def read_weights(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, fp32 state dict) of a model.pt or an artifact folder, without building the model."""
    path = Path(path)
    if path.is_dir() and is_artifact_dir(path):
        return read_artifact(path)
    payload = read_model_file(path)
    return {k: v for k, v in payload.items() if k != "state_dict"}, payload["state_dict"]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RefSegModel, dict[str, Any]]:
    """Rebuild the model saved by :func:`save_model` or :func:`save_artifact` (strict weight load);
    returns (model in eval mode on ``device``, the saved ``config`` dict). An artifact folder carrying
    its tokenizer becomes the model's ``text.tokenizer``."""
    path = Path(path)
    meta, state = read_weights(path)
    try:
        model_cfg = model_config_from_dict(meta["model_config"])
    except ConfigError as e:
        raise ValueError(f"model file '{path}' holds an invalid model config: {e}") from None
    build_cfg = copy.deepcopy(model_cfg)
    if build_cfg.text.bert_config is None and meta.get("encoder_config"):
        build_cfg.text.bert_config = _bert_kwargs(meta["encoder_config"])
    model = build_model(build_cfg, pretrained=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # a layout this code no longer builds from that config: one sentence
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        written = f"refseg {meta['refseg_version']}" if meta.get("refseg_version") else "an older refseg"
        raise ValueError(f"model file '{path}' (written by {written}) does not match the model this refseg "
                         f"builds from its config ({first.rstrip('.')}); load it with the refseg version that "
                         "wrote it, or retrain") from None
    if path.is_dir() and has_tokenizer(path):
        model_cfg.text.tokenizer = str(path.resolve())
    model.config = model_cfg
    return model.to(device).eval(), meta.get("config") or {}


def _bert_kwargs(encoder_config: dict) -> dict:
    """HF config dict -> BertConfig kwargs (bookkeeping keys dropped)."""
    drop = {"architectures", "transformers_version", "_name_or_path", "model_type", "torch_dtype", "dtype",
            "gradient_checkpointing", "_attn_implementation_autoset"}
    return {k: v for k, v in encoder_config.items() if k not in drop}
