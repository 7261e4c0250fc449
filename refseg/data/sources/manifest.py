"""Your own data as a manifest: one row per referring expression, JSON Lines or Parquet.

    {"image": "images/0001.jpg", "text": "the dog on the left", "mask": "masks/0001_dog.png"}
    {"image": "s3://bucket/img/2.jpg", "text": "red car", "mask": {"size": [480, 640], "counts": "Xk3..."}}
    {"image": "img/3.jpg", "text": "man in blue", "mask": [[10, 10, 50, 10, 50, 60]], "ref_id": 7,
     "sent_id": 70, "split": "val", "height": 480, "width": 640}

``image`` is a path or URI (s3://, gs://, ...); ``mask`` is a PNG path (nonzero = object), a COCO RLE
dict or a list of polygons (flat ``[x1, y1, x2, y2, ...]`` in pixels). Relative paths are resolved
against the manifest's directory. Optional: ``ref_id`` (rows sharing it are one object with several
expressions: training draws one of them per epoch), ``sent_id``, ``split``, ``height``, ``width``,
``ann_id``, ``image_id``, ``category_id``. In Parquet, a ``mask`` that is not a path is a JSON string.
A row with ``"no_target": true`` (gRefCOCO: the text names nothing in the image) has no ``mask``;
its record has ``no_target=True`` and the segmentation ``[]`` (an all-zero mask).

    {"image": "img/4.jpg", "text": "the purple star", "no_target": true, "split": "val"}

    records = read_manifest("data/my_set/{split}.jsonl", split="train", report=report)
    write_manifest(records, "out/train.jsonl")
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from refseg.data.masks import segmentation_problem
from refseg.data.skips import (
    BAD_ROW,
    EMPTY_SENTENCE,
    MISSING_FIELD,
    MISSING_IMAGE_FILE,
    MISSING_MASK_FILE,
    RefSegDataError,
    SkipReport,
)
from refseg.io import filesystem_and_path, is_uri, parent_of, read_bytes, resolve_path, write_bytes_atomic

logger = logging.getLogger("refseg.data")


# ----------------------------------------------------------------------------- reading
def _rows(path: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row: ``line N`` for JSONL, ``row N`` for Parquet (1-based)."""
    if path.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        fs, inner = filesystem_and_path(path)
        table = pq.read_table(inner, filesystem=fs)
        for i, row in enumerate(table.to_pylist(), 1):
            yield f"row {i}", row
        return
    text = read_bytes(path).decode("utf-8")
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"line {i}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"line {i}", ValueError(f"not JSON ({e.msg})")


def _parse_mask(mask: Any, base: str) -> tuple[Any, str | None]:
    """(segmentation, mask_path): a PNG path, an RLE dict, polygons, or a JSON string of either."""
    if isinstance(mask, str) and mask.lstrip()[:1] in ("{", "["):
        mask = json.loads(mask)
    if isinstance(mask, str):
        return None, resolve_path(base, mask)
    if isinstance(mask, dict) and "counts" in mask and "size" in mask:
        return {"size": [int(v) for v in mask["size"]], "counts": mask["counts"]}, None
    if isinstance(mask, list):
        return mask, None
    raise ValueError("mask must be a PNG path, a COCO RLE dict or a list of polygons")


def _opt_int(row: dict, key: str) -> int | None:
    value = row.get(key)
    return None if value is None else int(value)


def _record(row: Any, base: str, split: str | None, check_files: bool) -> tuple[dict | None, str, str]:
    """(record or None, skip reason, detail) for one manifest row."""
    if isinstance(row, Exception):
        return None, BAD_ROW, str(row)
    if not isinstance(row, dict):
        return None, BAD_ROW, f"a {type(row).__name__}, not an object"
    no_target = row.get("no_target") is True
    missing = [k for k in ("image", "text") + (() if no_target else ("mask",)) if row.get(k) is None]
    if missing:
        return None, MISSING_FIELD, f"no {', '.join(missing)}"
    if no_target and row.get("mask") is not None:
        return None, BAD_ROW, "a no_target row has a mask"
    text = row["text"]
    if not isinstance(text, str) or not text.strip():
        return None, EMPTY_SENTENCE, "empty text"
    if split is not None and row.get("split") is not None:
        from refseg.data.sources.refer import split_matches

        if not split_matches(str(row["split"]), split):
            return None, "", ""  # another split: not a skip
    try:
        seg, mask_path = ([], None) if no_target else _parse_mask(row["mask"], base)
        height, width = _opt_int(row, "height"), _opt_int(row, "width")
        if isinstance(seg, dict) and height is None:
            height, width = seg["size"]
        rec = {
            "ref_id": _opt_int(row, "ref_id"),
            "sent_id": _opt_int(row, "sent_id"),
            "ann_id": _opt_int(row, "ann_id"),
            "image_id": _opt_int(row, "image_id"),
            "image_path": resolve_path(base, str(row["image"])),
            "sentence": text,
            "category_id": _opt_int(row, "category_id"),
            "height": height,
            "width": width,
            "split": str(row.get("split") or split or ""),
            "segmentation": seg,
            "mask_path": mask_path,
            **({"no_target": True} if no_target else {}),
        }
    except (ValueError, TypeError, KeyError) as e:
        return None, BAD_ROW, f"{type(e).__name__}: {e}"
    if seg is not None and not no_target:
        problem = segmentation_problem(seg, height, width)
        if problem is not None:
            return None, problem, ""
    if check_files and not is_uri(rec["image_path"]) and not os.path.isfile(rec["image_path"]):
        return None, MISSING_IMAGE_FILE, rec["image_path"]
    if check_files and mask_path and not is_uri(mask_path) and not os.path.isfile(mask_path):
        return None, MISSING_MASK_FILE, mask_path
    return rec, "", ""


def _fill_ids(records: list[dict]) -> None:
    """Give rows without ids fresh ones: ref/sent ids after the largest given, image ids per path."""
    for key in ("ref_id", "sent_id"):
        nxt = max((r[key] for r in records if r[key] is not None), default=-1) + 1
        for r in records:
            if r[key] is None:
                r[key], nxt = nxt, nxt + 1
    images: dict[str, int] = {}
    nxt = max((r["image_id"] for r in records if r["image_id"] is not None), default=-1) + 1
    for r in records:
        if r["image_id"] is None:
            if r["image_path"] not in images:
                images[r["image_path"]], nxt = nxt, nxt + 1
            r["image_id"] = images[r["image_path"]]
        if r["ann_id"] is None:
            r["ann_id"] = r["ref_id"]
        if r["category_id"] is None:
            r["category_id"] = -1


def read_manifest(
    path: str | Path,
    split: str | None = None,
    report: SkipReport | None = None,
    check_files: bool = True,
) -> list[dict]:
    """Records (the dicts of :func:`refseg.data.load_split`) of a JSONL or Parquet manifest.

    ``"{split}"`` in ``path`` is replaced by ``split``; rows with a ``split`` field are kept when it
    matches (refer's rule), rows without one belong to every split. PNG masks stay paths
    (``record["mask_path"]``, ``segmentation`` None); ``height``/``width`` are None when neither the
    row nor an RLE gives them (read from the image when decoded). Bad rows are skipped and counted in
    ``report`` with their line number; local image/mask files are checked when ``check_files``."""
    path = str(path)
    if "{split}" in path:
        if split is None:
            raise RefSegDataError(f"manifest path {path} contains '{{split}}'; pass the split to read")
        path = path.replace("{split}", split)
    fs, inner = filesystem_and_path(path)
    import pyarrow.fs as pafs

    if fs.get_file_info(inner).type != pafs.FileType.File:
        raise RefSegDataError(f"manifest {path} does not exist; write one with one JSON object per line")
    report = report if report is not None else SkipReport()
    base = parent_of(path if is_uri(path) else os.path.abspath(path))
    records = []
    for where, row in _rows(path):
        rec, reason, detail = _record(row, base, split, check_files)
        if rec is not None:
            records.append(rec)
        elif reason:
            report.add(reason, f"{os.path.basename(path)} {where}" + (f": {detail}" if detail else ""))
    _fill_ids(records)
    line = f"manifest {path}: {len(records)} samples; {report.summary()}"
    (logger.warning if report.total else logger.info)(line)
    return records


# ----------------------------------------------------------------------------- writing
def _relative(path: str, base: str) -> str:
    if is_uri(path) or is_uri(base):
        return path
    rel = os.path.relpath(path, base)
    return path if rel.startswith("..") else rel


def manifest_rows(records: Iterable[dict], base: str) -> Iterator[dict]:
    """Manifest rows (JSON-ready dicts) for records; paths under ``base`` are made relative."""
    for r in records:
        row = {"image": _relative(str(r["image_path"]), base), "text": r["sentence"]}
        if r.get("no_target"):
            row["no_target"] = True
        else:
            mask_path = r.get("mask_path")
            mask = _relative(mask_path, base) if mask_path else r["segmentation"]
            if isinstance(mask, dict) and isinstance(mask.get("counts"), bytes):
                mask = {"size": mask["size"], "counts": mask["counts"].decode("ascii")}
            row["mask"] = mask
        for key in ("ref_id", "sent_id", "ann_id", "image_id", "category_id", "split", "height", "width"):
            if r.get(key) is not None:
                row[key] = r[key]
        yield row


def write_manifest(records: Iterable[dict], path: str | Path) -> str:
    """Write records as a manifest (``.parquet``/``.pq``: Parquet, else JSON Lines), atomically.

    Image and mask paths under the manifest's directory are stored relative to it."""
    path = str(path)
    base = parent_of(path)
    rows = list(manifest_rows(records, base))
    if path.endswith((".parquet", ".pq")):
        import pyarrow as pa
        import pyarrow.parquet as pq

        for row in rows:
            if "mask" in row and not isinstance(row["mask"], str):
                row["mask"] = json.dumps(row["mask"])
        keys = list(dict.fromkeys(k for row in rows for k in row))  # rows may differ in their keys
        buf = io.BytesIO()
        pq.write_table(pa.table({k: [row.get(k) for row in rows] for k in keys}), buf)
        data = buf.getvalue()
    else:
        data = "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")
    fs, inner = filesystem_and_path(path)
    if not is_uri(path):
        os.makedirs(os.path.dirname(inner), exist_ok=True)
        write_bytes_atomic(inner, data)
        return path
    fs.create_dir(posixpath.dirname(inner), recursive=True)
    tmp = f"{inner}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, inner)
    return path


def load_mask_png(src: str | bytes) -> np.ndarray:
    """A mask image (PNG path/URI or bytes) -> (H, W) uint8 {0,1}: nonzero pixel = object.

    Palette images use their indices (index 0 = background), RGB(A) any non-zero colour channel."""
    from PIL import Image

    data = read_bytes(src) if isinstance(src, str) else bytes(src)
    img = Image.open(io.BytesIO(data))
    img.load()
    arr = np.asarray(img)
    if img.mode in ("RGBA", "LA", "PA"):
        arr = arr[..., :-1]  # the alpha channel says nothing about the object
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return (arr > 0).astype(np.uint8)
