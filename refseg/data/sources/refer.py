"""Reader for the refer-format RefCOCO family (refcoco, refcoco+, refcocog), without refer.py.

    records = load_split("data", "refcoco", "unc", "val")        # one dict per (ref, sentence)
    refs = load_split_refs("data", "refcoco", "unc", "train")    # one dict per ref, all sentences

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

import io
import json
import logging
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from refseg.data.masks import segmentation_problem
from refseg.data.skips import (
    EMPTY_SENTENCE,
    MALFORMED_REF,
    MISSING_ANNOTATION,
    MISSING_IMAGE_FILE,
    UNKNOWN_IMAGE,
    RefSegDataError,
    SkipReport,
)

logger = logging.getLogger("refseg.data")

DEFAULT_IMAGE_SUBDIRS = ("images/mscoco/images/train2014", "images/mscoco/train2014")


# ----------------------------------------------------------------------------- refs pickle
class _RestrictedUnpickler(pickle.Unpickler):
    """Loads plain containers and scalars only: every global (class, function) is refused."""

    def __init__(self, file: io.BufferedIOBase, path: Path, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        raise RefSegDataError(
            f"refs file {self._path} contains a pickled object of type {module}.{name}; refusing to "
            "load it: only plain lists/dicts/strings/ints are allowed"
        )


def _fix_latin1(obj: Any) -> Any:
    """Python 2 ``str`` read as latin-1 -> the UTF-8 text it most likely held."""
    if isinstance(obj, str):
        try:
            return obj.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return obj
    if isinstance(obj, list):
        return [_fix_latin1(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_fix_latin1(v) for v in obj)
    if isinstance(obj, dict):
        return {_fix_latin1(k): _fix_latin1(v) for k, v in obj.items()}
    return obj


def read_refs(path: str | Path) -> list[dict]:
    """The list of ref dicts in a ``refs(<split_by>).p`` pickle, loaded without running any code.

    Python 2 byte strings that are not ASCII are read as latin-1 and re-decoded as UTF-8."""
    path = Path(path)
    data = path.read_bytes()
    try:
        try:
            refs = _RestrictedUnpickler(io.BytesIO(data), path).load()
        except UnicodeDecodeError:  # Python 2 str holding non-ASCII bytes
            refs = _fix_latin1(_RestrictedUnpickler(io.BytesIO(data), path, encoding="latin1").load())
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
    ) as e:
        if isinstance(e, RefSegDataError):
            raise
        raise RefSegDataError(
            f"refs file {path} is not a readable pickle ({type(e).__name__}: {e}); re-download it"
        ) from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise RefSegDataError(
            f"refs file {path} holds a {type(refs).__name__}, not a list of ref dicts; re-download it"
        )
    return refs


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
    if image_dir is not None:
        img_dir = Path(image_dir).expanduser().absolute()
        if not img_dir.is_dir():
            raise RefSegDataError(
                f"image directory {img_dir} does not exist; point data.image_dir at COCO train2014"
            )
        return refs_path, instances_path, img_dir
    for sub in DEFAULT_IMAGE_SUBDIRS:
        if (root / sub).is_dir():
            return refs_path, instances_path, root / sub
    raise RefSegDataError(
        f"no image directory at {root / DEFAULT_IMAGE_SUBDIRS[0]} or {root / DEFAULT_IMAGE_SUBDIRS[1]}; "
        "put COCO train2014 there or set data.image_dir"
    )


def check_data_root(data_root: str | Path, dataset: str, split_by: str, image_dir: str | Path | None = None) -> None:
    """Raise :class:`RefSegDataError` (one sentence) unless the refs file, instances.json and image
    directory of ``dataset``/``split_by`` are where :func:`load_split` looks; reads none of them."""
    _resolve_paths(data_root, dataset, split_by, image_dir)


def _read_instances(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(images by id, annotations by id) from a COCO-style instances.json."""
    try:
        with open(path, "rb") as f:
            inst = json.load(f)
        images = {int(im["id"]): im for im in inst["images"]}
        anns = {int(a["id"]): a for a in inst["annotations"]}
    except (ValueError, KeyError, TypeError) as e:
        raise RefSegDataError(
            f"annotation file {path} is not a COCO instances.json ({type(e).__name__}: {e}); re-download it"
        ) from None
    return images, anns


class _ImageIndex:
    """Cheap, cached existence check for image files (one listdir of the image directory)."""

    def __init__(self, image_dir: Path) -> None:
        self.image_dir = image_dir
        self._names: set[str] | None = None
        self._cache: dict[str, bool] = {}

    def exists(self, file_name: str) -> bool:
        if os.sep in file_name or "/" in file_name:  # nested name: ask the file system once
            if file_name not in self._cache:
                self._cache[file_name] = (self.image_dir / file_name).is_file()
            return self._cache[file_name]
        if self._names is None:
            self._names = set(os.listdir(self.image_dir))
        return file_name in self._names


# ----------------------------------------------------------------------------- records
def _usable_sentences(ref: dict, report: SkipReport) -> list[dict]:
    """``[{sent_id, sentence}]`` of a ref; empty / whitespace / non-string sentences are reported."""
    sentences = []
    for s in ref.get("sentences", []):
        text = s.get("sent")
        if not isinstance(text, str) or not text.strip():
            report.add(EMPTY_SENTENCE, f"ref {ref['ref_id']} sent {s.get('sent_id')}")
            continue
        sentences.append({"sent_id": int(s["sent_id"]), "sentence": text})
    return sentences


def _ref_problem(
    ref: dict,
    anns: dict[int, dict],
    images: dict[int, dict],
    seg_problem: dict[int, str | None],
    index: _ImageIndex,
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
    images, anns = _read_instances(instances_path)
    index = _ImageIndex(img_dir)
    seg_problem: dict[int, str | None] = {}  # ann_id -> skip reason or None

    for ref in refs:
        try:
            ref_id, ann_id, image_id = int(ref["ref_id"]), int(ref["ann_id"]), int(ref["image_id"])
            sentences = _usable_sentences(ref, report)
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


def _log_summary(what: str, dataset: str, split_by: str, split: str, n: int, report: SkipReport) -> None:
    line = f"{dataset}({split_by}) {split}: {n} {what}; {report.summary()}"
    (logger.warning if report.total else logger.info)(line)


def load_split_refs(data_root: str | Path, dataset: str, split_by: str, split: str,
                    image_dir: str | Path | None = None, report: SkipReport | None = None) -> list[dict]:
    """One dict per ref of ``split`` (file order), for training's one-random-sentence-per-ref draw.

    Fields: ref_id, ann_id, image_id, image_path (absolute), category_id, height, width, split,
    segmentation, bbox, sentences: list[{sent_id, sentence}]. Skipped (ref, sentence) samples are
    counted in ``report``; a ref with no usable sentence is left out."""
    report = report if report is not None else SkipReport()
    refs = list(_iter_refs(data_root, dataset, split_by, split, image_dir, report))
    _log_summary("refs", dataset, split_by, split, len(refs), report)
    return refs


def load_split(data_root: str | Path, dataset: str, split_by: str, split: str,
               image_dir: str | Path | None = None, report: SkipReport | None = None) -> list[dict]:
    """One record per (ref, sentence) of ``split``, refs in file order, sentences in ref order.

    Fields: ref_id, sent_id, ann_id, image_id, image_path (absolute), sentence (refer's ``sent``),
    category_id, height, width, split (the ref's own split, e.g. "testA"), segmentation (polygons
    or RLE dict, shared between a ref's records: do not mutate), bbox [x, y, w, h]."""
    report = report if report is not None else SkipReport()
    records = []
    for ref in _iter_refs(data_root, dataset, split_by, split, image_dir, report):
        sentences = ref.pop("sentences")
        for s in sentences:
            records.append({**ref, "sent_id": s["sent_id"], "sentence": s["sentence"]})
    _log_summary("samples", dataset, split_by, split, len(records), report)
    return records
