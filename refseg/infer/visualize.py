"""Pictures of predictions (PIL only, safe inside Ray actors: no pyplot state).

    overlay(image (H,W,3) uint8, mask (H,W) bool) -> (H,W,3) uint8     red tint + outline on the mask
    heatmap(attn (h,w) in [0,1], (H, W)) -> (H,W,3) uint8                 jet colours, bilinear upsampling
    save_visualization(image, mask, attn, text, "out.png")               overlay | heat map + caption
    save_png(array, "mask.png")                                          atomic (refseg.io.atomic_path)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from refseg.io import atomic_path

MASK_COLOR = np.array([255, 40, 40], np.float32)
ALPHA = 0.5


def save_png(array_or_image: np.ndarray | Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG atomically (see :func:`refseg.io.atomic_path`); returns ``path``."""
    path = Path(path)
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def mask_png(mask: np.ndarray) -> Image.Image:
    """(H, W) bool -> 8-bit greyscale PIL image, 255 = object."""
    return Image.fromarray(np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8))


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """(H, W, 3) uint8 with the (H, W) mask tinted red and outlined."""
    m = np.asarray(mask, bool)
    out = image.astype(np.float32)
    out[m] = (1 - alpha) * out[m] + alpha * MASK_COLOR
    if m.any():
        pil = Image.fromarray(m.astype(np.uint8) * 255)
        edge = (np.asarray(pil.filter(ImageFilter.MaxFilter(3))) > 0) & ~(np.asarray(pil.filter(ImageFilter.MinFilter(3))) > 0)
        out[edge] = MASK_COLOR
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _jet(v: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> (..., 3) uint8 jet colours."""
    v = np.clip(v, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return np.rint(rgb * 255).astype(np.uint8)


def heatmap(attn: np.ndarray, size: tuple[int, int], image: np.ndarray | None = None) -> np.ndarray:
    """(h, w) heat map -> (H, W, 3) uint8 jet colours (blended 60/40 over ``image`` when given)."""
    a = np.asarray(attn, np.float32)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    up = np.asarray(Image.fromarray(a).resize((size[1], size[0]), Image.BILINEAR), np.float32)
    colours = _jet(up).astype(np.float32)
    if image is not None:
        colours = 0.6 * colours + 0.4 * image.astype(np.float32)
    return np.clip(np.rint(colours), 0, 255).astype(np.uint8)


def save_visualization(image: np.ndarray, mask: np.ndarray, attn: np.ndarray | None, text: str,
                       path: str | os.PathLike) -> Path:
    """overlay | heat map side by side with the expression as a caption, written as a PNG."""
    h, w = image.shape[:2]
    scale = max(1.0, 160 / max(h, w))  # tiny images are upscaled so the picture is readable
    H, W = round(h * scale), round(w * scale)

    def big(a: np.ndarray) -> Image.Image:
        return Image.fromarray(a).resize((W, H), Image.NEAREST) if scale > 1 else Image.fromarray(a)

    panels = [big(overlay(image, mask))]
    if attn is not None:
        panels.append(big(heatmap(attn, (h, w), image)))
    caption_h = 22
    canvas = Image.new("RGB", (W * len(panels) + 4 * (len(panels) - 1), H + caption_h), (255, 255, 255))
    for i, p in enumerate(panels):
        canvas.paste(p, (i * (W + 4), caption_h))
    label = text if len(text) <= 90 else text[:87] + "..."
    ImageDraw.Draw(canvas).text((4, 4), label.encode("ascii", "replace").decode("ascii"), fill=(0, 0, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_png(canvas, path)
