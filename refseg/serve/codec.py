"""Requests and responses of the segmentation service, without Ray or a web framework.

    kind = body_kind(content_type)                       # "json" | "multipart", else BadRequest (415)
    image, texts = json_fields(body, batch=False)        # base64 image bytes, [text]
    rgb = decode_image(image, max_pixels)                # (H, W, 3) uint8, else BadRequest (400 / 413)
    check_texts(texts, max_chars, max_texts)
    result_json(pred, threshold)                         # {"mask": COCO RLE, "width", "height", "score", ...}
    mask_png(pred.mask)                                  # PNG bytes, 255 = object

Every refusal is a :class:`BadRequest` carrying an HTTP status and one sentence saying what is wrong,
where, and what to send instead; the service answers it as ``{"error": sentence}``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

import numpy as np

JSON_TYPES = ("application/json",)
MULTIPART_TYPES = ("multipart/form-data",)
SEND = "send multipart/form-data with fields 'image' (the file) and 'text', or JSON {\"image\": <base64>, \"text\": ...}"


class BadRequest(ValueError):
    """A request the service refuses: ``status`` (4xx) and one sentence (``str(e)``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def body_kind(content_type: str | None) -> str:
    """'json' or 'multipart' for a request's Content-Type header, else BadRequest 415."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media in JSON_TYPES:
        return "json"
    if media in MULTIPART_TYPES:
        return "multipart"
    shown = f"Content-Type '{media}'" if media else "a request without a Content-Type"
    raise BadRequest(415, f"{shown} is not supported; {SEND}")


def check_body_size(size: int, max_bytes: int) -> None:
    """BadRequest 413 when a body of ``size`` bytes exceeds ``max_bytes``."""
    if size > max_bytes:
        raise BadRequest(413, f"the request body has {size} bytes, more than the limit of {max_bytes}; "
                              f"send a smaller image")


def decode_base64(value: Any) -> bytes:
    """The bytes of a base64 string (standard or URL-safe alphabet; a ``data:...;base64,`` prefix is allowed)."""
    if not isinstance(value, str) or not value:
        raise BadRequest(400, "JSON field 'image' must be a non-empty base64 string of the image file's bytes")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    text = "".join(value.split())
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, "JSON field 'image' is not valid base64; encode the image file's bytes with "
                              "base64 (e.g. `base64 -w0 photo.jpg`)") from None


def json_fields(body: bytes, batch: bool) -> tuple[bytes, list[Any]]:
    """(image bytes, texts) of a JSON body: {"image", "text"}, or {"image", "texts": [...]} when ``batch``."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(400, f"the request body is not valid JSON ({e.__class__.__name__}); {SEND}") from None
    if not isinstance(doc, dict):
        raise BadRequest(400, f"the JSON body must be an object, got {type(doc).__name__}; {SEND}")
    if "image" not in doc:
        raise BadRequest(400, "the JSON body has no 'image' field; add the image file's bytes as base64")
    key = "texts" if batch else "text"
    if key not in doc:
        example = '"texts": ["the dog", "the cat"]' if batch else '"text": "the dog on the left"'
        raise BadRequest(400, f"the JSON body has no '{key}' field; add it, e.g. {example}")
    texts = doc[key] if batch else [doc[key]]
    if batch and not isinstance(texts, list):
        raise BadRequest(400, "JSON field 'texts' must be a list of strings")
    return decode_base64(doc["image"]), texts


def check_texts(texts: list[Any], max_chars: int, max_texts: int) -> list[str]:
    """The referring expressions, stripped: each a non-empty string of at most ``max_chars``, 1..max_texts."""
    if not texts:
        raise BadRequest(400, "the request has no text; send at least one referring expression")
    if len(texts) > max_texts:
        raise BadRequest(400, f"the request has {len(texts)} texts, more than the limit of {max_texts}; "
                              f"split it into several requests")
    out = []
    for i, t in enumerate(texts):
        where = "the text" if len(texts) == 1 else f"text {i}"
        if not isinstance(t, str):
            raise BadRequest(400, f"{where} must be a string, got {type(t).__name__}")
        t = t.strip()
        if not t:
            raise BadRequest(400, f"{where} is empty; type a referring expression such as 'the dog on the left'")
        if len(t) > max_chars:
            raise BadRequest(400, f"{where} has {len(t)} characters, more than the limit of {max_chars}; "
                                  f"shorten the expression")
        out.append(t)
    return out


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Image file bytes -> (H, W, 3) uint8 RGB (EXIF orientation applied, as ``Predictor.predict`` does).

    BadRequest 413 for more than ``max_pixels`` pixels (checked before decoding), 400 for bytes that are
    empty, not an image, truncated or corrupt."""
    from PIL import Image

    from refseg.data.transforms import ImageError, load_image

    if not data:
        raise BadRequest(400, "the image is empty (0 bytes); attach the image file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Exception:  # noqa: BLE001 -- PIL raises many kinds for bytes that are no image
        raise BadRequest(400, f"the uploaded {len(data)} bytes are not an image in a format the service reads; "
                              f"send a JPEG, PNG or WebP file") from None
    if w * h > max_pixels:
        raise BadRequest(413, f"the image has {w}x{h} pixels, more than the limit of {max_pixels}; downscale it")
    try:
        return load_image(data, max_pixels=max_pixels, name="in the request")
    except ImageError:
        raise BadRequest(400, f"the {w}x{h} image is truncated or corrupt and could not be decoded; "
                              f"send the complete file") from None


def score(pred: Any) -> float:
    """Mean probability over the mask's pixels (0.0 for an empty mask)."""
    return float(pred.prob[pred.mask].mean()) if pred.mask.any() else 0.0


def result_json(pred: Any, with_attn: bool = False) -> dict[str, Any]:
    """A prediction -> {"mask": {"size": [h, w], "counts": str}, "width", "height", "score"} plus
    ``no_target_prob`` when the model predicts one, and ``attn`` ({"size": [h, w], "values": row-major
    floats, 3 decimals}) when asked for."""
    from refseg.data.masks import encode_rle

    h, w = pred.mask.shape
    out: dict[str, Any] = {"mask": encode_rle(pred.mask), "width": int(w), "height": int(h),
                           "score": round(score(pred), 6)}
    no_target = getattr(pred, "no_target_prob", None)
    if no_target is not None:
        out["no_target_prob"] = round(float(no_target), 6)
    if with_attn and pred.attn is not None:
        a = np.asarray(pred.attn, np.float32)
        out["attn"] = {"size": [int(a.shape[0]), int(a.shape[1])], "values": np.round(a, 3).ravel().tolist()}
    return out


def mask_png(mask: np.ndarray) -> bytes:
    """(H, W) bool -> PNG bytes of an 8-bit greyscale image, 255 = object."""
    from refseg.infer.visualize import mask_png as mask_image

    buf = io.BytesIO()
    mask_image(mask).save(buf, format="PNG")
    return buf.getvalue()
