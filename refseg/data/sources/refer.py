"""Reader for the refer-format RefCOCO family (refcoco, refcoco+, refcocog), without refer.py.

    records = load_split("data", "refcoco", "unc", "val")        # one dict per (ref, sentence)
    refs = load_split_refs("data", "refcoco", "unc", "train")    # one dict per ref, all sentences

``dataset="grefcoco"`` (split_by ``unc``) reads the gRefCOCO layout instead, through
:mod:`refseg.data.sources.grefcoco` (multi-target and no-target refs).

Layout (as the refer API reads it):
    <root>/<dataset>/refs(<split_by>).p     pickle of a list of plain dicts (read with globals refused)
    <root>/<dataset>/instances.json         COCO images / annotations / categories
    <root>/images/mscoco/images/train2014/  images (refer default); <root>/images/mscoco/train2014/ too

Split matching follows refer's ``getRefIds``: ``testA``/``testB``/``testC`` take refs whose split
contains that letter, ``test`` takes every split containing "test", ``train``/``val`` (and any other
name present in the file, e.g. ``testAB``) match exactly.

Samples that cannot be used (annotation or image missing, empty sentence, invalid or zero-area
segmentation) are skipped; each is counted in a :class:`SkipReport` and summarised in one log line
on the ``refseg.data`` logger. A path the user got wrong raises :class:`RefSegDataError`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from refseg.data.masks import segmentation_problem
from refseg.data.skips import (
    MALFORMED_REF,
    MISSING_ANNOTATION,
    MISSING_IMAGE_FILE,
    UNKNOWN_IMAGE,
    RefSegDataError,
    SkipReport,
)
from refseg.data.sources import grefcoco
from refseg.data.sources.coco_files import (
    ImageIndex,
    find_image_dir,
    read_instances,
    read_refs,
    usable_sentences,
)

logger = logging.getLogger("refseg.data")

DEFAULT_IMAGE_SUBDIRS = ("images/mscoco/images/train2014", "images/mscoco/train2014")


# ----------------------------------------------------------------------------- splits
def split_matches(ref_split: str, split: str) -> bool:
    """refer's getRefIds rule: does a ref whose split is ``ref_split`` belong to ``split``?"""
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split
    if split == "test":
        return "test" in ref_split
    return ref_split == split


def select_refs(refs: list[dict], split: str, refs_path: Path | str = "refs") -> list[dict]:
    """The refs of ``split`` (file order); an unknown split name raises :class:`RefSegDataError`."""
    known = sorted({str(r.get("split")) for r in refs})
    if split not in ("train", "val", "test", "testA", "testB", "testC") and split not in known:
        raise RefSegDataError(
            f"split '{split}' is not in refs file {refs_path}; use one of {known} (or 'test')"
        )
    return [r for r in refs if split_matches(str(r.get("split", "")), split)]


# ----------------------------------------------------------------------------- paths
def _resolve_paths(
    data_root: str | Path, dataset: str, split_by: str, image_dir: str | Path | None
) -> tuple[Path, Path, Path]:
    """(refs file, instances.json, image dir), each checked to exist."""
    root = Path(data_root).expanduser().absolute()
    if not root.is_dir():
        raise RefSegDataError(
            f"data root {root} does not exist; point data.root at the directory holding "
            f"{dataset}/ and images/ (or set data.synthetic=true for a synthetic set)"
        )
    ds_dir = root / dataset
    if not ds_dir.is_dir():
        present = sorted(p.name for p in root.iterdir() if (p / "instances.json").exists())
        raise RefSegDataError(
            f"dataset directory {ds_dir} does not exist; download {dataset} into it "
            f"(datasets found under {root}: {present or 'none'})"
        )
    refs_path = ds_dir / f"refs({split_by}).p"
    if not refs_path.is_file():
        present = sorted(p.name for p in ds_dir.glob("refs(*).p"))
        raise RefSegDataError(
            f"refs file {refs_path} does not exist; check data.split_by (files found in {ds_dir}: "
            f"{present or 'none'})"
        )
    instances_path = ds_dir / "instances.json"
    if not instances_path.is_file():
        raise RefSegDataError(
            f"annotation file {instances_path} does not exist; download {dataset}'s instances.json into "
            f"{ds_dir}"
        )
    return refs_path, instances_path, find_image_dir(root, image_dir, DEFAULT_IMAGE_SUBDIRS)


def check_data_root(data_root: str | Path, dataset: str, split_by: str, image_dir: str | Path | None = None) -> None:
    """Raise :class:`RefSegDataError` (one sentence) unless the refs file, instances.json and image
    directory of ``dataset``/``split_by`` are where :func:`load_split` looks; reads none of them."""
    if dataset == grefcoco.DATASET:
        grefcoco.resolve_paths(data_root, split_by, image_dir)
    else:
        _resolve_paths(data_root, dataset, split_by, image_dir)


# ----------------------------------------------------------------------------- records
def _ref_problem(
    ref: dict,
    anns: dict[int, dict],
    images: dict[int, dict],
    seg_problem: dict[int, str | None],
    index: ImageIndex,
) -> tuple[str | None, str]:
    """(skip reason, detail) for a ref whose annotation, segmentation or image is unusable."""
    ref_id, ann_id, image_id = int(ref["ref_id"]), int(ref["ann_id"]), int(ref["image_id"])
    ann = anns.get(ann_id)
    if ann is None:
        return MISSING_ANNOTATION, f"ref {ref_id} -> ann {ann_id}"
    image = images.get(image_id)
    if image is None:
        return UNKNOWN_IMAGE, f"ref {ref_id} -> image {image_id}"
    if ann_id not in seg_problem:  # annotations repeat across refs: check each once
        seg_problem[ann_id] = segmentation_problem(ann.get("segmentation"), image["height"], image["width"])
    if seg_problem[ann_id] is not None:
        return seg_problem[ann_id], f"ref {ref_id} -> ann {ann_id}"
    if not index.exists(image["file_name"]):
        return MISSING_IMAGE_FILE, str(index.image_dir / image["file_name"])
    return None, ""


def _iter_refs(
    data_root: str | Path,
    dataset: str,
    split_by: str,
    split: str,
    image_dir: str | Path | None,
    report: SkipReport,
) -> Iterator[dict]:
    """Per usable ref: its fields (no sentence fields) plus ``sentences: [{sent_id, sentence}]``."""
    refs_path, instances_path, img_dir = _resolve_paths(data_root, dataset, split_by, image_dir)
    refs = select_refs(read_refs(refs_path), split, refs_path)
    images, anns = read_instances(instances_path)
    index = ImageIndex(img_dir)
    seg_problem: dict[int, str | None] = {}  # ann_id -> skip reason or None

    for ref in refs:
        try:
            ref_id, ann_id, image_id = int(ref["ref_id"]), int(ref["ann_id"]), int(ref["image_id"])
            sentences = usable_sentences(ref, report)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            report.add(MALFORMED_REF, f"ref {ref.get('ref_id')}: {type(e).__name__} {e}")
            continue
        if not sentences:
            continue
        reason, detail = _ref_problem(ref, anns, images, seg_problem, index)
        if reason is not None:  # every (ref, sentence) sample of this ref is skipped
            report.add(reason, detail, len(sentences))
            continue
        ann, image = anns[ann_id], images[image_id]
        height, width, file_name = int(image["height"]), int(image["width"]), image["file_name"]
        yield {
            "ref_id": ref_id,
            "ann_id": ann_id,
            "image_id": image_id,
            "image_path": str(img_dir / file_name),
            "category_id": int(ref.get("category_id", ann.get("category_id", 0))),
            "height": height,
            "width": width,
            "split": str(ref["split"]),
            "segmentation": ann["segmentation"],
            "bbox": [float(v) for v in ann.get("bbox", [])],
            "sentences": sentences,
        }


def _refs_of(data_root: str | Path, dataset: str, split_by: str, split: str, image_dir: str | Path | None,
             report: SkipReport) -> Iterator[dict]:
    """The usable refs of ``split``: gRefCOCO's reader for ``grefcoco``, refer's for the rest."""
    if dataset == grefcoco.DATASET:
        return grefcoco.iter_refs(data_root, split_by, split, image_dir, report)
    return _iter_refs(data_root, dataset, split_by, split, image_dir, report)


def _log_summary(what: str, dataset: str, split_by: str, split: str, n: int, report: SkipReport) -> None:
    line = f"{dataset}({split_by}) {split}: {n} {what}; {report.summary()}"
    (logger.warning if report.total else logger.info)(line)


def load_split_refs(data_root: str | Path, dataset: str, split_by: str, split: str,
                    image_dir: str | Path | None = None, report: SkipReport | None = None) -> list[dict]:
    """One dict per ref of ``split`` (file order), for training's one-random-sentence-per-ref draw.

    Fields: ref_id, ann_id, image_id, image_path (absolute), category_id, height, width, split,
    segmentation, bbox, sentences: list[{sent_id, sentence}]. Skipped (ref, sentence) samples are
    counted in ``report``; a ref with no usable sentence is left out. gRefCOCO refs add ``ann_ids``
    and ``no_target`` (:func:`refseg.data.sources.grefcoco.iter_refs`)."""
    report = report if report is not None else SkipReport()
    refs = list(_refs_of(data_root, dataset, split_by, split, image_dir, report))
    _log_summary("refs", dataset, split_by, split, len(refs), report)
    return refs


def load_split(data_root: str | Path, dataset: str, split_by: str, split: str,
               image_dir: str | Path | None = None, report: SkipReport | None = None) -> list[dict]:
    """One record per (ref, sentence) of ``split``, refs in file order, sentences in ref order.

    Fields: ref_id, sent_id, ann_id, image_id, image_path (absolute), sentence (refer's ``sent``),
    category_id, height, width, split (the ref's own split, e.g. "testA"), segmentation (polygons
    or RLE dict, shared between a ref's records: do not mutate), bbox [x, y, w, h]. gRefCOCO
    records add ``ann_ids`` (list) and ``no_target`` (bool); their segmentation is the union of the
    kept annotations (``[]`` for no-target: :func:`refseg.data.decode_mask` gives an all-zero mask)."""
    report = report if report is not None else SkipReport()
    records = []
    for ref in _refs_of(data_root, dataset, split_by, split, image_dir, report):
        sentences = ref.pop("sentences")
        for s in sentences:
            records.append({**ref, "sent_id": s["sent_id"], "sentence": s["sentence"]})
    _log_summary("samples", dataset, split_by, split, len(records), report)
    return records
