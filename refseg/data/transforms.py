"""Image decoding, resizing, text-safe augmentation and tokenisation for referring segmentation.

    image = load_image("COCO_train2014_000000000009.jpg")            # (H, W, 3) uint8 RGB
    x, m = preprocess(image, mask, size=480, keep_aspect=False)       # (3, S, S) uint8, (S, S) uint8
    x = normalize_images(torch.from_numpy(x[None]).to(device))        # (1, 3, S, S) float32, ImageNet-normalised
    x, m, meta = preprocess_with_meta(image, None, 480, keep_aspect=True)
    prob_full = unresize_logits(prob, meta)                           # (S, S) -> (orig_h, orig_w)
    image, mask, sent = hflip_sample(image, mask, "the man on the left")  # -> "... on the right"

Mode rules of :func:`load_image` (the ones a dataset can surprise you with):
- transparency (RGBA, LA, PA, P with a transparent index, RGBa, La) is composited onto WHITE, the
  way viewers show it (transparent pixels often hold black RGB that is not part of the picture);
- 16-bit greyscale (I;16, I;16B, ...) maps 0..65535 linearly onto 0..255 (v / 257, rounded);
- 32-bit "I" and float "F" are scaled by their range: values already in 0..255 stay, 0..1 floats
  are multiplied by 255, 0..65535 are divided by 257, anything else is min-max stretched;
- 1-bit, L, CMYK (incl. Adobe-inverted JPEG CMYK), YCbCr and palette images use PIL's conversion;
- EXIF orientation is applied (``exif=True``): pass ``exif=False`` when masks were annotated on the
  stored pixel grid (the returned shape then always equals the file's width/height).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from refseg.data.skips import RefSegDataError

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
MEAN_PIXEL = np.rint(IMAGENET_MEAN * 255).astype(np.uint8)  # (3,) the mean colour as uint8: padding / canvas
MAX_PIXELS = 89_478_485  # PIL's default decompression-bomb threshold (0.25 GiB of RGBA)


class ImageError(RefSegDataError):
    """An image that cannot be used (missing, empty, corrupt, too large); the message names it."""


# ----------------------------------------------------------------------------- decoding
def _describe(src: Any, name: str | None) -> str:
    if name is not None:
        return f"'{name}'"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return f"'{os.fspath(src)}'"


def _open(src: Any, label: str) -> Image.Image:
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError(f"image {label} is empty (0 bytes); re-create the shard or drop the sample")
        return Image.open(io.BytesIO(bytes(src)))
    path = os.fspath(src)
    if not os.path.exists(path):
        raise ImageError(f"image file {label} does not exist; check data.root / data.image_dir")
    if os.path.isdir(path):
        raise ImageError(f"image path {label} is a directory, not an image file; point at the file")
    if os.path.getsize(path) == 0:
        raise ImageError(f"image file {label} is empty (0 bytes); re-download it or drop the sample")
    with open(path, "rb") as f:  # read once so the file handle is never left open
        return Image.open(io.BytesIO(f.read()))


def _scale_to_uint8(a: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """Map an integer / float greyscale array onto 0..255 (rules in the module docstring)."""
    a = a.astype(np.float64)
    if sixteen_bit:
        return np.rint(a / 257.0).astype(np.uint8)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    if lo >= 0 and hi <= 1.0 and not np.all(a == np.rint(a)):
        a = a * 255.0
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535:
        a = a / 257.0
    else:
        a = (a - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("PA", "LA", "La", "RGBa") or (mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img).convert("RGB")
    elif img.mode.startswith("I;16") or img.mode in ("I", "F"):
        grey = _scale_to_uint8(np.asarray(img), sixteen_bit=img.mode.startswith("I;16"))
        return np.repeat(grey[..., None], 3, axis=2)
    elif img.mode != "RGB":
        img = img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV
    return np.asarray(img, dtype=np.uint8).reshape(img.height, img.width, 3).copy()


def load_image(src: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS, *,
               target_size: int | None = None, exif: bool = True, name: str | None = None
               ) -> np.ndarray:
    """Decode a file path or encoded bytes into an (H, W, 3) uint8 RGB array.

    ``max_pixels``: larger images raise ImageError before decoding (a decompression-bomb guard).
    ``target_size``: lets a JPEG decode at 1/2, 1/4 or 1/8 scale while both sides stay >= it
    (much faster for big photos); the result is then SMALLER than the file, so pass the original
    size to :func:`preprocess` (``orig_size``) or the mask. ``name`` labels bytes in error messages.
    Any failure raises :class:`ImageError` naming the image and what to do."""
    label = _describe(src, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _open(src, label)
            if img.width * img.height > max_pixels:
                raise ImageError(f"image {label} has {img.width}x{img.height} pixels, more than the "
                                 f"limit of {max_pixels}; downscale it or raise max_pixels")
            if target_size is not None and img.format == "JPEG":
                img.draft(None, (int(target_size), int(target_size)))
            img.load()
            if exif:
                img = ImageOps.exif_transpose(img)
            return pil_to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"image {label} is larger than PIL's decompression-bomb limit; "
                         f"downscale it") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"image {label} is not in a readable image format; "
                         f"re-download it or drop the sample") from None
    except (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError, KeyError) as e:
        raise ImageError(f"image {label} is truncated or corrupt ({type(e).__name__}: {e}); "
                         f"re-download it or drop the sample") from None


# ----------------------------------------------------------------------------- normalising
# (3, 3, 1, 1) float32: the divisor 255, the mean and the std per channel (see normalize_images)
_NORM_STATS = np.stack([np.full(3, 255, np.float32), IMAGENET_MEAN, IMAGENET_STD])[:, :, None, None]
_NORM_ON: dict = {}  # device -> _NORM_STATS as a tensor there (made once: no blocking copy per batch)


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (B, 3, S, S) -> float32 ``(x / 255 - mean) / std`` (ImageNet statistics), on x's device.

    Every step is a float32 tensor-by-tensor operation (also the division by 255: CUDA turns a division
    by a Python scalar into a multiplication by its reciprocal), so the values are bit-identical to
    NumPy's float32 ``(v / 255.0 - IMAGENET_MEAN) / IMAGENET_STD``. A floating-point ``x`` is taken
    as normalised already and returned as it is. Uses only tensor methods: this module never imports torch."""
    if x.is_floating_point():
        return x
    out = x.float()
    stats = _NORM_ON.get(out.device)
    if stats is None:
        stats = _NORM_ON[out.device] = out.new_tensor(_NORM_STATS)
    return out.div_(stats[0]).sub_(stats[1]).div_(stats[2])


# ----------------------------------------------------------------------------- resizing

def resize_geometry(orig_h: int, orig_w: int, size: int, keep_aspect: bool) -> tuple[int, int]:
    """(resized_h, resized_w) of the image content inside the S x S canvas."""
    if not keep_aspect:
        return size, size
    scale = size / max(orig_h, orig_w)
    return max(1, min(size, round(orig_h * scale))), max(1, min(size, round(orig_w * scale)))


def resize_to(a: np.ndarray, h: int, w: int, resample: int) -> np.ndarray:
    """uint8 (H, W[, C]) -> (h, w[, C]) with PIL's ``resample``; unchanged when already that size."""
    if a.shape[:2] == (h, w) and a.dtype == np.uint8:
        return a
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8))
    return np.asarray(img.resize((w, h), resample))


def preprocess_with_meta(image: np.ndarray, mask: np.ndarray | None, size: int, keep_aspect: bool,
                         orig_size: tuple[int, int] | None = None
                         ) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Resize (bilinear image, nearest mask), lay the image out channel-first and pad.

    image: (H, W, 3) uint8; mask: (H', W') {0,1} uint8 or None. The geometry follows ``orig_size``
    (h, w), else the mask's size, else the image's (so a draft-decoded smaller image still lines up).
    keep_aspect=True: the longer side becomes ``size`` and the bottom/right are padded (image with
    :data:`MEAN_PIXEL`, mask with 0); False: plain resize to size x size.
    Returns image uint8 (3, S, S) (:func:`normalize_images` makes the model's input of it, on the
    device), mask uint8 (S, S) or None, and meta {orig_h, orig_w, size, keep_aspect, resized_h,
    resized_w, pad_h, pad_w, scale_y, scale_x} for :func:`unresize_logits`."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"preprocess expects an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if orig_size is not None:
        oh, ow = (int(v) for v in orig_size)
    else:
        oh, ow = (mask.shape[:2] if mask is not None else image.shape[:2])
    rh, rw = resize_geometry(oh, ow, size, keep_aspect)
    pixels = resize_to(image, rh, rw, Image.BILINEAR)  # (rh, rw, 3) uint8
    out = np.empty((3, size, size), np.uint8)
    if (rh, rw) != (size, size):
        out[:] = MEAN_PIXEL[:, None, None]
    out[:, :rh, :rw] = pixels.transpose(2, 0, 1)
    m_out = None
    if mask is not None:
        m_out = np.zeros((size, size), np.uint8)
        m_out[:rh, :rw] = resize_to(mask, rh, rw, Image.NEAREST)
    meta = {"orig_h": oh, "orig_w": ow, "size": size, "keep_aspect": keep_aspect,
            "resized_h": rh, "resized_w": rw, "pad_h": size - rh, "pad_w": size - rw,
            "scale_y": rh / oh, "scale_x": rw / ow}
    return out, m_out, meta


def preprocess(image: np.ndarray, mask: np.ndarray | None, size: int, keep_aspect: bool,
               orig_size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`preprocess_with_meta` without the meta: (3, S, S) uint8 image, (S, S) uint8 mask | None."""
    img, m, _ = preprocess_with_meta(image, mask, size, keep_aspect, orig_size)
    return img, m


def unresize_logits(prob: np.ndarray, meta: dict) -> np.ndarray:
    """Warp an (S, S) float map (probabilities or logits) back to (orig_h, orig_w).

    Crops the padding, then resizes bilinearly. ``meta`` needs orig_h, orig_w and either
    resized_h/resized_w or keep_aspect (so Ray batch columns orig_h/orig_w suffice)."""
    prob = np.asarray(prob, np.float32)
    size = prob.shape[-1]
    oh, ow = int(meta["orig_h"]), int(meta["orig_w"])
    if "resized_h" in meta:
        rh, rw = int(meta["resized_h"]), int(meta["resized_w"])
    else:
        rh, rw = resize_geometry(oh, ow, size, bool(meta.get("keep_aspect", False)))
    crop = np.ascontiguousarray(prob[:rh, :rw])
    if crop.shape == (oh, ow):
        return crop.copy()
    return np.asarray(Image.fromarray(crop, mode="F").resize((ow, oh), Image.BILINEAR), np.float32)


# ----------------------------------------------------------------------------- augmentation
_LR = re.compile(r"\b(left|right)(?=(?:-?most|-?hand(?:ed)?|-?wards?|-?side)?\b)", re.IGNORECASE)
# "right" as an intensifier ("right next to", "right behind") is not a direction
_NOT_DIRECTION = re.compile(r"\s+(?:next|behind|in\s+front|above|below|under|beside|there|here|now|"
                            r"away|on\s+top|at\s+the\s+(?:top|bottom|edge|end|back|front)|by)\b",
                            re.IGNORECASE)


def _swap_word(match: re.Match) -> str:
    word = match.group(1)
    text = match.string
    if word.lower() == "right" and _NOT_DIRECTION.match(text, match.end()):
        return word
    new = "right" if word.lower() == "left" else "left"
    if word.isupper():
        return new.upper()
    return new.capitalize() if word[0].isupper() else new


def swap_left_right(sentence: str) -> str:
    """Exchange left <-> right (also leftmost, left-most, lefthand, left-hand, leftward(s), left-side),
    keeping capitalisation and punctuation; "right" as in "right next to" is left alone."""
    return _LR.sub(_swap_word, sentence)


def hflip_sample(image: np.ndarray, mask: np.ndarray | None, sentence: str
                 ) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Mirror image (H, W, 3) and mask (H, W) horizontally and swap left/right in the sentence."""
    image = np.ascontiguousarray(image[:, ::-1])
    mask = None if mask is None else np.ascontiguousarray(mask[:, ::-1])
    return image, mask, swap_left_right(sentence)


def random_augment(image: np.ndarray, mask: np.ndarray | None, sentence: str, rng: np.random.Generator,
                   hflip_prob: float = 0.5, brightness: float = 0.2, contrast: float = 0.2,
                   min_scale: float = 0.85, out_size: tuple[int, int] | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Augmentations that never contradict the expression.

    - horizontal flip with probability ``hflip_prob`` (left/right words swapped);
    - brightness and contrast factors in [1 - b, 1 + b] / [1 - c, 1 + c], applied to all channels
      alike so hue (colour words) is kept;
    - zoom-out: the whole image shrinks by a factor in [min_scale, 1] onto a mean-grey canvas of the
      original size at a random offset. Nothing is cropped, so every object and the relative
      positions ("leftmost", "bigger") survive.

    ``out_size`` (h, w): return image and mask at that size instead (the model's geometry, see
    :func:`resize_geometry`): the zoom-out and the resize are then ONE resampling of the original
    pixels (with the image's bilinear filter for the mask, thresholded at 1/2) -- half the work of
    augmenting first and resizing after, and object edges are resampled once instead of twice.
    Returns uint8 image (H, W, 3), uint8 mask (H, W) or None, sentence."""
    if rng.random() < hflip_prob:
        image, mask, sentence = hflip_sample(image, mask, sentence)
    # photometric change = one affine map of the 256 grey levels, applied as a lookup table (the same
    # uint8 values as computing it per pixel in float32, ~4x less work on a 640x480 image)
    x = np.arange(256, dtype=np.float32)
    if contrast > 0:
        grey = np.float32(image.mean())
        x = (x - grey) * np.float32(rng.uniform(1 - contrast, 1 + contrast)) + grey
    if brightness > 0:
        x = x * np.float32(rng.uniform(1 - brightness, 1 + brightness))
    lut = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    h, w = image.shape[:2]
    nh, nw, oy, ox = h, w, 0, 0
    if min_scale < 1.0:
        s = rng.uniform(min_scale, 1.0)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        if (nh, nw) != (h, w):
            oy, ox = int(rng.integers(0, h - nh + 1)), int(rng.integers(0, w - nw + 1))
    out_h, out_w = out_size if out_size is not None else (h, w)
    if (nh, nw, out_h, out_w) == (h, w, h, w):  # no zoom, no resize
        return lut[image], mask, sentence
    fy, fx = out_h / h, out_w / w  # the zoomed-out content's place in output pixels
    y0, x0 = min(round(oy * fy), out_h - 1), min(round(ox * fx), out_w - 1)
    th, tw = min(max(1, round(nh * fy)), out_h - y0), min(max(1, round(nw * fx)), out_w - x0)
    canvas = np.empty((out_h, out_w, 3), np.uint8)
    canvas[:] = MEAN_PIXEL
    canvas[y0:y0 + th, x0:x0 + tw] = lut[resize_to(image, th, tw, Image.BILINEAR)]
    if mask is not None:
        m = np.zeros((out_h, out_w), np.uint8)
        # the same bilinear filter as the image, thresholded at 1/2: the mask stays on the object
        # (nearest drops or doubles whole rows/columns -- 1 px of a 10-px object)
        # (on 0/255 bytes: the same filter as on 0/1 floats at a quarter of the memory traffic)
        m[y0:y0 + th, x0:x0 + tw] = resize_to(np.ascontiguousarray(mask, dtype=np.uint8) * np.uint8(255),
                                              th, tw, Image.BILINEAR) >= 128
        mask = m
    return canvas, mask, sentence


# ----------------------------------------------------------------------------- text
def tokenize(tokenizer: Any, sentences: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both int64 (B, max_length): padded to max_length, truncated."""
    enc = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")
    return np.asarray(enc["input_ids"], np.int64), np.asarray(enc["attention_mask"], np.int64)
