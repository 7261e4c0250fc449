"""The full referring-segmentation model and its builder.

    model = build_model("tiny")                       # or a ModelConfig, or "r101" / "r50"
    out = model(image (B,3,H,W), input_ids (B,L), attention_mask (B,L), return_attn=True)
    out["logits"]   # (B, 1, H, W) mask logits at input resolution
    out["attn"]     # (B, h, w) language->vision attention heat map in [0, 1] (h = ceil(H / level))
    out["no_target_logit"]  # (B,) with model.no_target_head only: sigmoid > no_target_threshold = empty

Data flow: BERT+BiLSTM -> words + sentence; ResNet+FPN (strides 4..32; with ``fusion.early`` every
ResNet stage is FiLM-modulated by the sentence, LAVT's language-aware visual encoding) -> Fusion on
the FPN level ``fusion.level`` (+ the coarser levels upsampled) -> Decoder (4 x 2x upsampling with
sentence-gated FPN skips -- and, with ``decoder.stem_skip``, the stem's stride-2 map -- and a sentence
FiLM per stage) -> logits. With ``model.no_target_head`` a :class:`~refseg.models.heads.NoTargetHead` on
the fused tokens and sentence adds one no-target logit per sample (gRefCOCO); without it the module
tree, state_dict keys and outputs are the classic model's.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from refseg.config import ModelConfig
from refseg.config.presets import preset_config
from refseg.config.validate import validate_model
from refseg.models.decoder import Decoder
from refseg.models.fusion import Fusion
from refseg.models.heads import NoTargetHead
from refseg.models.text import TextEncoder, build_bert
from refseg.models.vision import VisionEncoder

SIZE_DIVISOR = 32  # inputs are zero-padded (bottom/right) to a multiple of this internally


class RefSegModel(nn.Module):
    """Vision encoder + text encoder + fusion + decoder (+ the optional no-target head; explicit modules,
    see :func:`build_model`)."""

    def __init__(self, vision: VisionEncoder, text: TextEncoder, fusion: Fusion, decoder: Decoder, level: int,
                 config: ModelConfig | None = None, no_target: NoTargetHead | None = None) -> None:
        super().__init__()
        self.vision, self.text, self.fusion, self.decoder = vision, text, fusion, decoder
        self.no_target = no_target  # None: no submodule, so classic state_dict keys stay as they were
        self.level = level
        self.config = config

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                return_attn: bool = False) -> dict[str, torch.Tensor]:
        """image (B,3,H,W) float, input_ids (B,L) long, attention_mask (B,L) {0,1} right-padded
        -> {"logits": (B,1,H,W)} (+ "attn": (B, ceil(H/level), ceil(W/level)) in [0,1])
        (+ "no_target_logit": (B,) with the no-target head)."""
        H, W = image.shape[-2:]
        ph, pw = (-H) % SIZE_DIVISOR, (-W) % SIZE_DIVISOR
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph))
        words, sentence = self.text(input_ids, attention_mask)  # (B, L, Dt), (B, Dt)
        early = sentence if self.vision.film is not None else None  # fusion.early: language-aware encoder
        stem = self.decoder.uses_stem
        feats = {int(k): v for k, v in self.vision(image, early, stem).items()}  # {stride: (B, C, Hp/s, Wp/s)}
        fused, sent, attn = self.fusion(self._fusion_input(feats), words, attention_mask, sentence, return_attn)
        logits = self.decoder(fused, feats, sent)  # (B, 1, Hp*, Wp*)
        if logits.shape[-2:] != image.shape[-2:]:
            logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        out = {"logits": logits[..., :H, :W]}
        if self.no_target is not None:
            region = None
            if self.no_target.region is not None:  # the maps at the head's region stride and the next coarser one
                s = self.no_target.region_stride
                fine = feats[s]
                region = torch.cat([fine, F.interpolate(feats[2 * s], size=fine.shape[-2:], mode="nearest")], dim=1)
                region = region[..., : math.ceil(H / s), : math.ceil(W / s)]
            out["no_target_logit"] = self.no_target(fused, sent, out["logits"], region)  # (B,)
        if return_attn:
            if attn is None:
                raise ValueError("return_attn=True needs fusion.num_layers >= 1.")
            out["attn"] = attn[:, : math.ceil(H / self.level), : math.ceil(W / self.level)]
        return out

    def _fusion_input(self, feats: dict[int, torch.Tensor]) -> torch.Tensor:
        """FPN level ``self.level`` plus every coarser level upsampled to it: (B, C, H/level, W/level).
        (Finer levels feed the decoder's skips, so every FPN output is used.)"""
        x = feats[self.level]
        for stride, f in feats.items():
            if stride > self.level:
                x = x + F.interpolate(f, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x

    def encoder_parameters(self) -> set[int]:
        """ids of the ResNet body and BERT parameters (the 'encoder' learning-rate group)."""
        mods = (self.vision.body, self.text.bert)
        return {id(p) for m in mods for p in m.parameters()}

    def param_groups(self, lr: float, encoder_lr_mult: float = 0.1, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer groups: ResNet body + BERT at ``lr * encoder_lr_mult``, the rest at ``lr``;
        no weight decay on biases and norm weights (every parameter with ndim <= 1).
        Every trainable parameter appears exactly once; empty groups are dropped."""
        enc = self.encoder_parameters()
        groups: dict[str, dict] = {
            name: {"name": name, "params": [], "lr": lr * (encoder_lr_mult if name.startswith("encoder") else 1.0),
                   "weight_decay": 0.0 if name.endswith("no_decay") else weight_decay}
            for name in ("encoder", "encoder_no_decay", "head", "head_no_decay")
        }
        for p in self.parameters():
            if not p.requires_grad:
                continue
            name = ("encoder" if id(p) in enc else "head") + ("_no_decay" if p.ndim <= 1 else "")
            groups[name]["params"].append(p)
        return [g for g in groups.values() if g["params"]]


def build_model(cfg: str | ModelConfig, pretrained: bool = True) -> RefSegModel:
    """Build a :class:`RefSegModel` from a preset name (r101 | r50 | tiny) or a ModelConfig.

    ``pretrained=False`` skips every download/weight file (random init, same architecture): use it
    to count parameters offline or before loading a checkpoint.
    """
    cfg = preset_config(cfg) if isinstance(cfg, str) else copy.deepcopy(cfg)
    validate_model(cfg)
    t = cfg.text
    vision = _build_vision(cfg, pretrained)  # vision, text, fusion, decoder: the order seeded inits depend on
    text = TextEncoder(build_bert(t.encoder, t.bert_config, pretrained), t.lstm_hidden, t.dim, t.freeze_encoder)
    fusion, decoder = _build_fusion_decoder(cfg, vision)
    # the head is built last: classic inits unchanged
    no_target = (NoTargetHead(cfg.dim, detach=cfg.no_target_detach,
                             region_channels=2 * cfg.vision.fpn_channels if cfg.no_target_region else 0)
                 if cfg.no_target_head else None)
    return RefSegModel(vision, text, fusion, decoder, cfg.fusion.level, config=cfg, no_target=no_target)


def _build_vision(cfg: ModelConfig, pretrained: bool) -> VisionEncoder:
    v, f = cfg.vision, cfg.fusion
    return VisionEncoder(v.backbone, v.weights, pretrained, v.widths, v.blocks, v.norm, v.fpn_channels,
                         language_dim=cfg.text.dim if f.early else None)


def _build_fusion_decoder(cfg: ModelConfig, vision: VisionEncoder) -> tuple[Fusion, Decoder]:
    v, f = cfg.vision, cfg.fusion
    fusion = Fusion(v.fpn_channels, cfg.text.dim, cfg.dim, f.num_layers, f.num_heads, f.ffn_dim, f.dropout)
    decoder = Decoder(cfg.dim, list(cfg.decoder.channels), v.fpn_channels, cfg.dim, start_stride=f.level,
                      stem_channels=vision.stem_channels if cfg.decoder.stem_skip else None)
    return fusion, decoder


def check_architecture(cfg: ModelConfig) -> None:
    """Raise the ValueError that building ``cfg``'s vision encoder, fusion and decoder would raise
    beyond :func:`refseg.config.validate.validate_model` (backbone, norm, widths/blocks, the weights'
    form against torchvision), in well under a second and without memory: the modules are made on the
    meta device, no weights are read. The text encoder is left out (its checks need the hub); the
    training driver calls this before any Ray work so such errors are one sentence instead of a
    worker traceback."""
    with torch.device("meta"):
        _build_fusion_decoder(cfg, _build_vision(cfg, pretrained=False))
