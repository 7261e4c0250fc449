"""Parquet shards: every sample with its image bytes inside, readable from local disk or object storage.

    counts = prepare("data", "refcoco", "unc", "s3://bucket/refcoco-unc")   # {"train": 120624, ...}
    write_shards(records, "shards/", rows_per_shard=1000)                    # records from load_split

Layout: ``<out>/<split>/part-00000.parquet``, one row per (ref, sentence) with :data:`SCHEMA`'s columns:
ref_id, sent_id, ann_id, image_id, image_bytes (the original file's bytes), sentence, mask_rle (COCO
RLE counts string) + mask_h, mask_w, split, category_id, height, width, no_target (gRefCOCO: the
expression names nothing, its mask is all zero; shards written without the column read as False);
plus ``sent_index`` (0 for a ref's first row) and, on every row, the ref's ``ref_sent_ids`` / ``ref_sentences``, so training reads
only the first row of each ref and draws one of its sentences per epoch. A ref never straddles two
files. Each file is written to a hidden temporary name and renamed into place; parts (and temporary
files) left over from an earlier, larger or killed run are removed, so an interrupted ``prepare``
leaves whole files only and re-running it writes every split again. ``out`` may be any pyarrow
filesystem path (local, s3://, gs://).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import posixpath
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from refseg.data import skips
from refseg.data.masks import decode_mask, encode_rle
from refseg.data.skips import RefSegDataError, SkipReport, SkipSample
from refseg.data.sources.manifest import load_mask_png, read_manifest
from refseg.data.sources.refer import load_split
from refseg.io import filesystem_and_path, is_uri, read_bytes
from refseg.progress import Progress

logger = logging.getLogger("refseg.data")

SCHEMA = pa.schema([
    ("ref_id", pa.int64()), ("sent_id", pa.int64()), ("ann_id", pa.int64()), ("image_id", pa.int64()),
    ("image_bytes", pa.binary()), ("sentence", pa.string()), ("mask_rle", pa.string()),
    ("mask_h", pa.int64()), ("mask_w", pa.int64()), ("split", pa.string()), ("category_id", pa.int64()),
    ("height", pa.int64()), ("width", pa.int64()), ("sent_index", pa.int64()),
    ("ref_sent_ids", pa.list_(pa.int64())), ("ref_sentences", pa.list_(pa.string())), ("no_target", pa.bool_()),
])
SPLITS = {"unc": ["train", "val", "testA", "testB"], "umd": ["train", "val", "test"], "google": ["train", "val"]}


def _join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else str(Path(base).expanduser().absolute().joinpath(*parts))


def _group_refs(records: Iterable[dict]) -> list[list[dict]]:
    """Records -> lists of one ref's records (first-seen order)."""
    refs: dict[Any, list[dict]] = OrderedDict()
    for r in records:
        refs.setdefault(r["ref_id"], []).append(r)
    return list(refs.values())


def _read_image(path: str) -> tuple[bytes | None, str | None, Any]:
    """(bytes, skip reason, (height, width)) of an image file, checking its header only."""
    from PIL import Image

    try:
        data = read_bytes(path)
    except (OSError, ValueError) as e:
        return None, skips.MISSING_IMAGE_FILE, str(e)
    try:
        with Image.open(io.BytesIO(data)) as img:
            return data, None, (img.height, img.width)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:  # junk bytes
        return None, skips.CORRUPT_IMAGE, f"{path}: {type(e).__name__}"


def _mask_rle(rec: dict, size: tuple[int, int]) -> dict:
    if rec.get("no_target"):
        return encode_rle(np.zeros(size, np.uint8))
    if rec.get("mask_path"):
        return encode_rle(load_mask_png(rec["mask_path"]))
    return encode_rle(decode_mask(rec["segmentation"], size[0], size[1]))


def _ref_rows(ref: list[dict], blob: tuple, split: str, report: SkipReport) -> list[dict]:
    """The shard rows of one ref, or [] (each of its sentences counted in ``report``)."""
    first = ref[0]
    data, reason, info = blob
    try:
        if data is None:
            raise SkipSample(reason, info)
        h, w = info
        if first.get("height") is not None and (int(first["height"]), int(first["width"])) != (h, w):
            raise SkipSample(skips.SIZE_MISMATCH,
                             f"ref {first['ref_id']}: record {first['height']}x{first['width']}, image {h}x{w}")
        try:
            rle = _mask_rle(first, (h, w))
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise SkipSample(skips.INVALID_SEGMENTATION, f"ref {first['ref_id']}: {e}") from None
        if tuple(rle["size"]) != (h, w):
            raise SkipSample(skips.SIZE_MISMATCH, f"ref {first['ref_id']}: mask {rle['size']}, image {h}x{w}")
        if not first.get("no_target") and (rle["counts"] in ("", None) or _rle_empty(rle)):
            raise SkipSample(skips.ZERO_AREA, f"ref {first['ref_id']}")
    except SkipSample as e:
        report.add(e.reason, e.detail, len(ref))
        return []
    sent_ids = [int(r["sent_id"]) for r in ref]
    texts = [r["sentence"] for r in ref]
    return [{
        "ref_id": int(r["ref_id"]), "sent_id": int(r["sent_id"]), "ann_id": _int(r.get("ann_id"), r["ref_id"]),
        "image_id": _int(r.get("image_id"), -1), "image_bytes": data, "sentence": r["sentence"],
        "mask_rle": rle["counts"], "mask_h": h, "mask_w": w, "split": split,
        "category_id": _int(r.get("category_id"), -1), "height": h, "width": w,
        "sent_index": k, "ref_sent_ids": sent_ids, "ref_sentences": texts, "no_target": bool(r.get("no_target", False)),
    } for k, r in enumerate(ref)]


def _int(value: Any, default: Any) -> int:
    return int(default if value is None else value)


def _rle_empty(rle: dict) -> bool:
    from pycocotools import mask as mask_utils

    return int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")})) == 0


def _chunks(refs: list[list[dict]], rows_per_shard: int) -> Iterator[list[list[dict]]]:
    """Consecutive groups of whole refs holding about ``rows_per_shard`` rows each."""
    chunk, n = [], 0
    for ref in refs:
        chunk.append(ref)
        n += len(ref)
        if n >= rows_per_shard:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def _write_table(table: pa.Table, fs, path: str) -> None:
    """Write ``table`` to ``path`` via a hidden temporary file and a rename (readers never see half a file)."""
    directory, name = posixpath.split(path)
    tmp = posixpath.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    compression = {c: ("NONE" if c == "image_bytes" else "SNAPPY") for c in SCHEMA.names}
    try:
        with fs.open_output_stream(tmp) as f:
            pq.write_table(table, f, row_group_size=128, compression=compression,
                           use_dictionary=[c for c in SCHEMA.names if c not in ("image_bytes", "mask_rle")])
    except BaseException:  # Ctrl-C / SIGTERM too: leave no temporary file behind
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise
    fs.move(tmp, path)


def _write_split(refs: list[list[dict]], out: str, split: str, rows_per_shard: int, report: SkipReport,
                 io_threads: int) -> int:
    fs, base = filesystem_and_path(_join(out, split))
    fs.create_dir(base, recursive=True)
    written, n_rows = set(), 0
    total = sum(len(ref) for ref in refs)
    with ThreadPoolExecutor(io_threads) as pool, Progress(f"prepare {split}", total=total, unit="rows") as bar:
        for chunk in _chunks(refs, rows_per_shard):
            paths = list(OrderedDict.fromkeys(ref[0]["image_path"] for ref in chunk))
            blobs = dict(zip(paths, pool.map(_read_image, paths)))
            rows = [row for ref in chunk for row in _ref_rows(ref, blobs[ref[0]["image_path"]], split, report)]
            bar.update(sum(len(ref) for ref in chunk))
            if not rows:
                continue
            name = f"part-{len(written):05d}.parquet"
            _write_table(pa.Table.from_pylist(rows, schema=SCHEMA), fs, posixpath.join(base, name))
            written.add(name)
            n_rows += len(rows)
    from pyarrow.fs import FileSelector

    for info in fs.get_file_info(FileSelector(base)):  # parts of an earlier, larger or killed run
        if info.base_name.startswith(("part-", ".part-")) and info.base_name not in written:
            fs.delete_file(info.path)
    return n_rows


def write_shards(
    records_or_source: Iterable[dict] | str | Path,
    out: str | Path,
    *,
    rows_per_shard: int = 1000,
    split: str | None = None,
    report: SkipReport | None = None,
    io_threads: int = 8,
) -> dict[str, int]:
    """Write records (or the records of a manifest path) as ``<out>/<split>/part-XXXXX.parquet``.

    Rows go to their record's ``split`` (``split`` overrides it; records without one go to "train").
    Unusable samples (missing/corrupt image, bad or empty mask) are skipped and counted in ``report``.
    Returns rows written per split."""
    if isinstance(records_or_source, (str, Path)):
        records_or_source = read_manifest(str(records_or_source), split, report=report)
    report = report if report is not None else SkipReport()
    by_split: dict[str, list[dict]] = OrderedDict()
    for r in records_or_source:
        by_split.setdefault(split or r.get("split") or "train", []).append(r)
    counts = {}
    for name, records in by_split.items():
        counts[name] = _write_split(_group_refs(records), str(out), name, rows_per_shard, report, io_threads)
        logger.info("wrote %d rows of split %s to %s", counts[name], name, _join(str(out), name))
    return counts


def prepare(
    data_root: str | Path | None,
    dataset: str,
    split_by: str,
    out: str | Path,
    *,
    splits: list[str] | None = None,
    image_dir: str | None = None,
    manifest: str | None = None,
    rows_per_shard: int = 1000,
    report: SkipReport | None = None,
) -> dict[str, int]:
    """``refseg prepare``: write the splits of a refer-format dataset (or of a manifest) as shards.

    ``splits`` defaults to every split of ``split_by`` (unc: train/val/testA/testB, umd:
    train/val/test, google: train/val); with a manifest, to the splits its rows name (or each
    ``{split}`` file). Writes ``<out>/_prepare.json`` with the counts. Returns rows written per split."""
    report = report if report is not None else SkipReport()
    counts: dict[str, int] = {}
    if manifest is not None:
        if "{split}" in str(manifest):
            for s in splits or ["train", "val"]:
                counts.update(write_shards(read_manifest(manifest, s, report=report), out, split=s,
                                           rows_per_shard=rows_per_shard, report=report))
        else:
            records = read_manifest(manifest, None, report=report)
            if splits is not None:
                records = [r for r in records if (r["split"] or "train") in splits]
            counts = write_shards(records, out, rows_per_shard=rows_per_shard, report=report)
    else:
        if data_root is None:
            raise RefSegDataError("prepare needs --data-root (a refer-format directory) or --manifest")
        if splits is None and split_by not in SPLITS:
            raise RefSegDataError(f"split_by '{split_by}' is not one of {sorted(SPLITS)}; pass --splits")
        for s in splits or SPLITS[split_by]:
            records = load_split(data_root, dataset, split_by, s, image_dir=image_dir, report=report)
            counts.update(write_shards(records, out, split=s, rows_per_shard=rows_per_shard, report=report))
    fs, base = filesystem_and_path(str(out))
    with fs.open_output_stream(posixpath.join(base, "_prepare.json")) as f:
        f.write(json.dumps({"counts": counts, "skipped": dict(report.counts)}, indent=1).encode())
    logger.info("prepared %s -> %s: %s; %s", manifest or f"{dataset}({split_by})", out, counts, report.summary())
    return counts
