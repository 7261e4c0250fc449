"""Segmentation masks of the RefCOCO family: COCO polygons / RLE <-> binary numpy masks.

    mask = decode_mask(record)                      # (H, W) uint8 {0,1} at original size
    rle = encode_rle(mask)                          # {"size": [H, W], "counts": str}, JSON-safe
    assert (rle_to_mask(rle) == mask).all()

A segmentation is a list of polygons (each a flat ``[x1, y1, x2, y2, ...]`` in pixels), an RLE dict
``{"size": [H, W], "counts": str | bytes | list[int]}`` (compressed or uncompressed), or a list of
such RLE dicts (one object in several parts). Like refer's ``getMask`` (pycocotools ``decode``, summed
over the parts), polygon and RLE parts are rasterised by pycocotools and united (overlaps stay 1).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from refseg.data.skips import INVALID_SEGMENTATION, ZERO_AREA

Segmentation = Any  # list[list[float]] | dict
MIN_POLYGON_AREA = 1e-6  # px^2; below this a polygon is degenerate (collinear up to float rounding)


def _is_rle(seg: Any) -> bool:
    return isinstance(seg, dict) and "counts" in seg


def _is_rle_list(seg: Any) -> bool:
    return isinstance(seg, list) and bool(seg) and all(_is_rle(p) for p in seg)


def _polygon_parts(seg: list) -> list[list[float]]:
    """The parts that can be rasterised: at least 3 points (6 numbers), an even count.

    pycocotools would read a 4-number part as a box, so degenerate parts are dropped here
    (they have zero area anyway)."""
    return [list(map(float, p)) for p in seg if len(p) >= 6 and len(p) % 2 == 0]


def _to_rle(seg: Segmentation, height: int | None, width: int | None) -> dict:
    """One compressed RLE (counts bytes) for polygons, an RLE dict or a list of RLE dicts."""
    if _is_rle_list(seg):
        rles = [_to_rle(part, height, width) for part in seg]
        if len({tuple(r["size"]) for r in rles}) != 1:
            raise ValueError(f"the RLE parts of a segmentation differ in size: {[r['size'] for r in rles]}")
        return mask_utils.merge(rles)  # union of the parts (refer: sum over parts, then > 0)
    if _is_rle(seg):
        h, w = (int(v) for v in seg["size"])
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed (iscrowd) RLE
            return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        return {"size": [h, w], "counts": counts}
    if height is None or width is None:
        raise ValueError("decode_mask needs height and width to rasterise polygons")
    parts = _polygon_parts(seg)
    if not parts:
        return mask_utils.encode(np.zeros((int(height), int(width)), dtype=np.uint8, order="F"))
    rles = mask_utils.frPyObjects(parts, int(height), int(width))
    return mask_utils.merge(rles)  # union of the parts (refer: sum over parts, then > 0)


def decode_mask(
    record_or_segmentation: dict | list,
    height: int | None = None,
    width: int | None = None,
) -> np.ndarray:
    """The binary mask ``(H, W) uint8 {0,1}`` at the image's original size.

    Accepts a record (uses its ``segmentation``, ``height``, ``width``) or a bare segmentation
    (polygons need ``height`` and ``width``; an RLE carries its own size)."""
    seg = record_or_segmentation
    if isinstance(seg, dict) and "segmentation" in seg:
        height = seg.get("height", height) if height is None else height
        width = seg.get("width", width) if width is None else width
        seg = seg["segmentation"]
    mask = mask_utils.decode(_to_rle(seg, height, width))  # (H, W) uint8
    return (mask > 0).astype(np.uint8)


def encode_rle(mask: np.ndarray) -> dict:
    """``(H, W)`` mask (nonzero = foreground) -> ``{"size": [H, W], "counts": str}`` (JSON-safe)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode_rle expects an (H, W) mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray((mask != 0).astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict) -> np.ndarray:
    """RLE dict (counts str, bytes or list) -> ``(H, W) uint8 {0,1}``."""
    return decode_mask(rle)


def mask_area(seg: Segmentation, height: int | None = None, width: int | None = None) -> int:
    """Number of foreground pixels after rasterisation (exact, but slower than the shoelace check)."""
    return int(mask_utils.area(_to_rle(seg, height, width)))


def _shoelace(poly: list[float]) -> float:
    xs, ys = poly[0::2], poly[1::2]
    xn, yn = xs[1:] + xs[:1], ys[1:] + ys[:1]
    return 0.5 * abs(sum(map(operator.mul, xs, yn)) - sum(map(operator.mul, xn, ys)))


def segmentation_problem(seg: Any, height: int | None = None, width: int | None = None) -> str | None:
    """Why ``seg`` cannot be used (:data:`INVALID_SEGMENTATION` / :data:`ZERO_AREA`), or None.

    Polygons: invalid when not a list of numeric lists, when any coordinate is non-finite, or when
    no part has at least 3 points; zero-area when the parts' shoelace areas sum to at most
    ``MIN_POLYGON_AREA`` (cheap: no rasterisation, so a sliver may still cover no pixel).
    RLE (a dict or a list of dicts): invalid when a size/counts is malformed or a size disagrees
    with ``height``/``width`` or with another part; zero-area when it has no foreground pixel."""
    if _is_rle(seg) or _is_rle_list(seg):
        try:
            for part in seg if isinstance(seg, list) else [seg]:
                h, w = (int(v) for v in part["size"])
                if (height is not None and h != int(height)) or (width is not None and w != int(width)):
                    return INVALID_SEGMENTATION
                if not isinstance(part["counts"], (str, bytes, list)):
                    return INVALID_SEGMENTATION
            area = mask_area(seg)
        except (TypeError, ValueError, KeyError):
            return INVALID_SEGMENTATION
        return None if area > 0 else ZERO_AREA
    if not isinstance(seg, list) or not seg:
        return INVALID_SEGMENTATION
    area = 0.0
    usable = 0
    for part in seg:
        if not isinstance(part, (list, tuple)):
            return INVALID_SEGMENTATION
        try:
            part = [float(v) for v in part]
        except (TypeError, ValueError):
            return INVALID_SEGMENTATION
        if not math.isfinite(sum(part)):  # any nan / inf (or absurdly large) coordinate
            return INVALID_SEGMENTATION
        if len(part) >= 6 and len(part) % 2 == 0:
            usable += 1
            area += _shoelace(part)
    if not usable:
        return INVALID_SEGMENTATION
    return None if area > MIN_POLYGON_AREA else ZERO_AREA


def polygon_area_ok(seg: Any, height: int | None = None, width: int | None = None) -> bool:
    """True when ``seg`` is a usable segmentation with a positive area (see segmentation_problem)."""
    return segmentation_problem(seg, height, width) is None
