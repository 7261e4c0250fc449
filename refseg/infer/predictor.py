"""One-image inference: checkpoint -> model + tokenizer + preprocessing, predictions at original size.

    pred = Predictor.from_checkpoint("runs/debug/model.pt")          # or a run dir / DeepSpeed dir
    pred = Predictor.from_pretrained("runs/debug/artifact")         # an artifact folder (refseg export)
    p = pred.predict("photo.jpg", "the dog on the left")             # path, PIL image or ndarray
    p.mask   # (H, W) bool at the ORIGINAL size     p.prob  # (H, W) float32 in [0, 1]
    p.attn   # (h, w) float32 heat map in [0, 1] (the fusion level's grid over the image content)
    p.no_target_prob  # float in [0, 1] with a no-target head (gRefCOCO), else None
    pred.visualize("photo.jpg", "the dog on the left", "out.png")   # overlay | heat map PNG

Image size, keep_aspect, max_tokens and the tokenizer come from the checkpoint's resolved config, so a
checkpoint needs nothing else. Probabilities are warped back bilinearly (``unresize_logits``) and then
thresholded (``prob > threshold``, i.e. ``logit > 0`` at 0.5, like training's validation). A model with
the no-target head (``model.no_target_head``) calls a sample empty when its no-target probability exceeds
``model.no_target_threshold``; that sample's probability map is then all zero, so its mask is empty.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from refseg.config import Config, ConfigError, config_from_dict
from refseg.infer.preflight import MODEL_FILE, checkpoint_form_error, is_artifact_dir, is_deepspeed_dir

ImageLike = Union[str, os.PathLike, bytes, np.ndarray, "PIL.Image.Image"]  # noqa: F821


@dataclass
class Prediction:
    """mask (H, W) bool and prob (H, W) float32 at the original size; attn (h, w) float32 in [0, 1];
    no_target_prob: the no-target head's probability (None for a model without the head)."""

    mask: np.ndarray
    prob: np.ndarray
    attn: np.ndarray | None = None
    no_target_prob: float | None = None


# ----------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(path: str | os.PathLike, workdir: str | os.PathLike | None = None) -> Path:
    """The model file behind ``path``: the file itself, ``<dir>/model.pt``, an artifact folder
    (config.json + model.safetensors) as it is, or a DeepSpeed checkpoint dir (config.yaml + ckpt/)
    consolidated into ``<workdir or a temp dir>/model.pt``."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir() and (p / MODEL_FILE).is_file():
        return p / MODEL_FILE
    if p.is_dir() and is_artifact_dir(p):
        return p
    if p.is_dir() and is_deepspeed_dir(p):
        from refseg.train.checkpoint import export_checkpoint

        out = Path(workdir or tempfile.mkdtemp(prefix="refseg-ckpt-")) / MODEL_FILE
        return export_checkpoint(p, out)
    raise checkpoint_form_error(p)


def _full_config(saved: dict, model: Any) -> Config:
    """The checkpoint's resolved config (defaults + the model's own config when none was saved)."""
    if saved:
        try:
            cfg = config_from_dict(saved)
        except ConfigError as e:
            raise ConfigError(f"the checkpoint's stored config is not valid for this refseg version: {e}") from None
    else:
        cfg = Config()
    if model.config is not None:
        cfg.model = model.config
    return cfg


def load_checkpoint_model(path: str | os.PathLike, device: str = "cpu") -> tuple[Any, Config]:
    """(RefSegModel in eval mode on ``device``, the checkpoint's full resolved Config) for a model.pt,
    a training output dir holding model.pt, an artifact folder, or a DeepSpeed checkpoint dir (converted
    first)."""
    from refseg.models.export import load_model

    with tempfile.TemporaryDirectory(prefix="refseg-ckpt-") as tmp:
        model_pt = resolve_checkpoint(path, tmp)
        try:
            model, saved = load_model(model_pt, device=device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return model, _full_config(saved, model)


# ----------------------------------------------------------------------------- images
def to_rgb(image: ImageLike, *, exif: bool = True) -> np.ndarray:
    """A path / URI, encoded bytes, PIL image (any mode) or uint8 array -> (H, W, 3) uint8 RGB.

    Paths and bytes go through ``refseg.data.load_image`` (raises ImageError); PIL images use the same
    mode rules (EXIF orientation applied like for a path); arrays may be (H, W), (H, W, 1|3|4) uint8."""
    from PIL import Image, ImageOps

    from refseg.data.transforms import ImageError, load_image, pil_to_rgb
    from refseg.io import is_uri, read_bytes

    if isinstance(image, (str, os.PathLike)):
        src = os.fspath(image)
        if is_uri(src):
            try:
                return load_image(read_bytes(src), name=src, exif=exif)
            except OSError as e:
                raise ImageError(f"image '{src}' could not be read ({type(e).__name__}: {e}); check the URI") from None
        return load_image(src, exif=exif)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return load_image(bytes(image), exif=exif)
    if isinstance(image, Image.Image):
        return pil_to_rgb(ImageOps.exif_transpose(image) if exif else image)
    a = np.asarray(image)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))):
        raise ImageError(f"an image array must be (H, W) or (H, W, 1|3|4) uint8, got {a.shape} {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 3:
        return np.ascontiguousarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    return pil_to_rgb(Image.fromarray(np.ascontiguousarray(a)))  # (H, W) -> L, (H, W, 4) -> RGBA


# ----------------------------------------------------------------------------- predictor
class Predictor:
    """A loaded model with its preprocessing; see the module docstring.

    The pieces (``prepare`` -> ``forward`` -> ``finish``) are public so the Ray Data actors of
    ``refseg evaluate`` / ``refseg segment`` batch many images through exactly this code."""

    def __init__(self, model: Any, tokenizer: Any, image_size: int, keep_aspect: bool, max_tokens: int,
                 device: str = "cpu", config: Config | None = None, compile: bool = False) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.model = model.to(self.device).eval()
        if self.cuda:  # bf16 weights in channels-last layout, as DeepSpeed trains them
            self.model = self.model.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
        # torch.compile: compiles on the first batch (about a minute), then runs faster
        self._run = torch.compile(self.model) if compile else self.model
        self.tokenizer = tokenizer
        self.image_size, self.keep_aspect, self.max_tokens = int(image_size), bool(keep_aspect), int(max_tokens)
        self.config = config
        model_cfg = getattr(model, "config", None)  # the no-target head's threshold (model.no_target_threshold)
        self.no_target_threshold = model_cfg.no_target_threshold if model_cfg is not None else 0.5
        # CUDA: the uint8 batch travels through one reused page-locked buffer (an asynchronous copy)
        self.pin = self.cuda
        self._staging = None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", compile: bool = False) -> Predictor:
        """Load a model.pt / training output dir / artifact folder / DeepSpeed checkpoint dir (see
        load_checkpoint_model)."""
        from refseg.models import load_tokenizer

        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("device 'cuda' was requested but CUDA is not available; use device='cpu'")
        model, cfg = load_checkpoint_model(path, device)
        return cls(model, load_tokenizer(cfg.model.text), cfg.data.image_size, cfg.data.keep_aspect,
                   cfg.data.max_tokens, device, cfg, compile)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str = "cpu", compile: bool = False) -> Predictor:
        """Load an artifact folder (``refseg export --format safetensors``: config.json + model.safetensors
        + tokenizer files when needed) with no network; any other checkpoint form works too."""
        return cls.from_checkpoint(path, device, compile)

    # -- pieces
    def prepare(self, image: np.ndarray, orig_size: tuple[int, int] | None = None) -> tuple[np.ndarray, dict]:
        """(H, W, 3) uint8 -> (image uint8 (3, S, S), resized and padded, meta for :meth:`finish`)."""
        from refseg.data.transforms import preprocess_with_meta

        x, _, meta = preprocess_with_meta(image, None, self.image_size, self.keep_aspect, orig_size)
        return x, meta

    def forward(self, images: np.ndarray, texts: Sequence[str], return_attn: bool = False,
                return_no_target: bool = False) -> tuple:
        """images (B, 3, S, S) uint8 pixels from :meth:`prepare` (normalised on the device) or float32
        already ImageNet-normalised, B texts -> (prob (B, S, S) float32, attn (B, h, w) float32 | None)
        (+ no-target probability (B,) float32, None without the head, when ``return_no_target``). The
        probability map of a sample the no-target head calls empty is all zero."""
        import torch

        from refseg.data.transforms import normalize_images, tokenize

        ids, am = tokenize(self.tokenizer, [str(t) for t in texts], self.max_tokens)
        images = np.asarray(images)
        x = torch.from_numpy(np.ascontiguousarray(images, None if images.dtype == np.uint8 else np.float32))
        if self.pin:
            if self._staging is None or self._staging.shape != x.shape or self._staging.dtype != x.dtype:
                self._staging = torch.empty(x.shape, dtype=x.dtype).pin_memory()
            # safe to reuse next call: the .cpu() of the outputs below waits for this copy's stream
            x = self._staging.copy_(x).to(self.device, non_blocking=True)
        else:
            x = x.to(self.device)
        x = normalize_images(x)
        if self.cuda:
            x = x.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
        with torch.inference_mode():
            out = self._run(x, torch.from_numpy(ids).to(self.device), torch.from_numpy(am).to(self.device),
                            return_attn=return_attn)
        prob = torch.sigmoid(out["logits"].float())[:, 0]  # (B, S, S)
        no_target = None
        if "no_target_logit" in out:
            no_target = torch.sigmoid(out["no_target_logit"].float())  # (B,)
            prob = prob * (no_target <= self.no_target_threshold)[:, None, None].to(prob.dtype)
            no_target = no_target.cpu().numpy()
        attn = out["attn"].float().cpu().numpy() if return_attn else None
        if return_no_target:
            return prob.cpu().numpy(), attn, no_target
        return prob.cpu().numpy(), attn

    def finish(self, prob: np.ndarray, meta: dict, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        """(S, S) probabilities -> (mask (H, W) bool, prob (H, W) float32) at the original size."""
        from refseg.data.transforms import unresize_logits

        full = np.clip(unresize_logits(prob, meta), 0.0, 1.0)
        return full > threshold, full

    def crop_attn(self, attn: np.ndarray, meta: dict) -> np.ndarray:
        """(h, w) heat map over the S x S canvas -> the cells covering the image content (no padding)."""
        level = self.model.level
        return attn[: -(-int(meta["resized_h"]) // level), : -(-int(meta["resized_w"]) // level)]

    # -- convenience
    def predict(self, image: ImageLike, text: str, threshold: float = 0.5) -> Prediction:
        """One image (path / URI / bytes / PIL / uint8 array) and one expression -> :class:`Prediction`."""
        return self.predict_batch([image], [text], threshold)[0]

    def predict_batch(self, images: Sequence[ImageLike], texts: Sequence[str], threshold: float = 0.5
                      ) -> list[Prediction]:
        """One expression per image, one forward pass; every prediction at its image's original size."""
        if len(images) != len(texts):
            raise ValueError(f"predict_batch got {len(images)} images but {len(texts)} texts")
        if not images:
            return []
        prepared = [self.prepare(to_rgb(im)) for im in images]
        probs, attns, no_target = self.forward(np.stack([x for x, _ in prepared]), texts, return_attn=True,
                                               return_no_target=True)
        out = []
        for i, ((_, meta), prob, attn) in enumerate(zip(prepared, probs, attns)):
            mask, full = self.finish(prob, meta, threshold)
            nt = None if no_target is None else float(no_target[i])
            out.append(Prediction(mask, full, self.crop_attn(attn, meta), nt))
        return out

    def visualize(self, image: ImageLike, text: str, path: str | os.PathLike, threshold: float = 0.5) -> Path:
        """Write a PNG: the mask overlaid on the image | the attention heat map, side by side (the caption
        adds the no-target probability for a model with the no-target head)."""
        from refseg.infer.visualize import save_visualization

        rgb = to_rgb(image)
        pred = self.predict(rgb, text, threshold)
        if pred.no_target_prob is not None:
            text = f"{text}  [no-target p={pred.no_target_prob:.2f}]"
        return save_visualization(rgb, pred.mask, pred.attn, text, path)
