"""Small refer-format sets written on the fly for tests.

    expected = write_refer_set(tmp_path)                 # refcoco/unc, 5 refs, 11 sentences
    load_split(tmp_path, "refcoco", "unc", "train")      # -> expected["samples"]["train"] records

The set has one annotation per image, in this order (image ``i`` has id ``i + 1``):
    0: RGB image,       single polygon (a triangle)
    1: grayscale 'L',   multi-part polygon (two rectangles)
    2: CMYK JPEG,       compressed RLE (counts str)
    3: RGB image,       uncompressed RLE (counts list, iscrowd=1)
    4: RGB image,       a list of two overlapping compressed RLE dicts (what refer's getMask decodes)
    5+: RGB images,     single polygon (rectangle)
Ref ``i`` points at annotation ``i``; its split cycles through ``splits`` and its sentence count
through 2, 3, 1. ``bad_samples=True`` adds one ref per skip reason (see ``expected["skipped"]``).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SENTENCE_COUNTS = (2, 3, 1)
WORDS = ("man", "dog", "left", "red", "car", "woman", "right", "blue", "tree", "cup")


def coco_file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def _size(i: int) -> tuple[int, int]:
    """(height, width) of image i: small and all different."""
    return 32 + 4 * (i % 5), 40 + 6 * (i % 4)


def _write_image(path: Path, h: int, w: int, mode: str, rng: np.random.Generator) -> None:
    rgb = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")
    img = rgb.convert(mode) if mode != "RGB" else rgb
    img.save(path, format="JPEG", quality=90)


def uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts: column-major runs, starting with a (possibly empty) run of 0s."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = int(v), 1
    counts.append(run)
    return counts


def _segmentation(kind: int, h: int, w: int) -> tuple[object, int]:
    """(segmentation, iscrowd) for annotation kind 0..5 (see module docstring)."""
    if kind == 0:
        return [[2.0, 2.0, w - 3.0, 4.0, w / 2.0, h - 3.0]], 0
    if kind == 1:
        return [
            [1.0, 1.0, 10.0, 1.0, 10.0, 8.0, 1.0, 8.0],
            [w - 12.0, h - 10.0, w - 2.0, h - 10.0, w - 2.0, h - 2.0, w - 12.0, h - 2.0],
        ], 0
    yy, xx = np.mgrid[:h, :w]
    disc = (((yy - h / 2) ** 2 + (xx - w / 3) ** 2) <= (min(h, w) / 3) ** 2).astype(np.uint8)
    if kind == 2:
        rle = mask_utils.encode(np.asfortranarray(disc))
        return {"size": [h, w], "counts": rle["counts"].decode("ascii")}, 0
    if kind == 3:
        return {"size": [h, w], "counts": uncompressed_counts(disc)}, 1
    if kind == 4:
        box = np.zeros((h, w), np.uint8)
        box[2:h // 2, 2:w // 2] = 1  # overlaps the disc
        return [{"size": [h, w], "counts": mask_utils.encode(np.asfortranarray(m))["counts"].decode("ascii")}
                for m in (disc, box)], 0
    return [[3.0, 3.0, w - 4.0, 3.0, w - 4.0, h / 2.0, 3.0, h / 2.0]], 0


def _annotation(ann_id: int, image_id: int, seg: object, iscrowd: int, h: int, w: int) -> dict:
    if isinstance(seg, dict):
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
    elif isinstance(seg[0], dict):
        rle = mask_utils.merge([{"size": p["size"], "counts": p["counts"].encode()} for p in seg])
    else:
        parts = [p for p in seg if len(p) >= 6]
        rle = mask_utils.merge(mask_utils.frPyObjects(parts, h, w)) if parts else None
    area = float(mask_utils.area(rle)) if rle is not None else 0.0
    bbox = [float(v) for v in mask_utils.toBbox(rle)] if rle is not None else [0.0, 0.0, 0.0, 0.0]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1 + ann_id % 3,
        "segmentation": seg,
        "area": area,
        "bbox": bbox,
        "iscrowd": iscrowd,
    }


def _ref(ref_id: int, ann_id: int, image_id: int, split: str, sentences: list[str], next_sent: int) -> dict:
    sents = [
        {"sent_id": next_sent + j, "sent": s, "raw": s, "tokens": s.split()} for j, s in enumerate(sentences)
    ]
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "category_id": 1 + ann_id % 3,
        "split": split,
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        "sent_ids": [s["sent_id"] for s in sents],
        "sentences": sents,
    }


def write_refer_set(
    root: str | Path,
    *,
    images: int = 5,
    dataset: str = "refcoco",
    split_by: str = "unc",
    splits: Sequence[str] = ("train", "val", "testA", "testB"),
    with_grayscale: bool = True,
    with_cmyk: bool = True,
    image_layout: str = "refer",
    bad_samples: bool = False,
    seed: int = 0,
) -> dict:
    """Write a refer-format set under ``root``; return what a reader should find.

    ``image_layout``: "refer" (images/mscoco/images/train2014) or "seed" (images/mscoco/train2014).
    Returns {"root", "image_dir", "dataset_dir", "refs": {split: n}, "samples": {split: n},
    "ann_kinds": {ann_id: "polygon"|"multipart"|"rle_str"|"rle_list"|"rle_parts"}, "skipped": {reason: n}}
    where refs/samples are keyed by each ref's own split name."""
    root = Path(root)
    sub = {"refer": "images/mscoco/images/train2014", "seed": "images/mscoco/train2014"}[image_layout]
    image_dir = root / sub
    ds_dir = root / dataset
    image_dir.mkdir(parents=True, exist_ok=True)
    ds_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    imgs, anns, refs = [], [], []
    kinds = {0: "polygon", 1: "multipart", 2: "rle_str", 3: "rle_list", 4: "rle_parts"}
    expected = {"refs": {}, "samples": {}, "ann_kinds": {}, "skipped": {}}
    next_sent = 100
    for i in range(images):
        image_id, ann_id, (h, w) = i + 1, 1000 + i, _size(i)
        mode = "L" if (i == 1 and with_grayscale) else "CMYK" if (i == 2 and with_cmyk) else "RGB"
        _write_image(image_dir / coco_file_name(image_id), h, w, mode, rng)
        imgs.append({"id": image_id, "file_name": coco_file_name(image_id), "height": h, "width": w})
        seg, iscrowd = _segmentation(min(i, 5), h, w)
        anns.append(_annotation(ann_id, image_id, seg, iscrowd, h, w))
        expected["ann_kinds"][ann_id] = kinds.get(i, "polygon")
        split = splits[i % len(splits)]
        n = SENTENCE_COUNTS[i % len(SENTENCE_COUNTS)]
        sentences = [
            f"{WORDS[(i + j) % len(WORDS)]} {WORDS[(i + 2 * j + 3) % len(WORDS)]} {j}" for j in range(n)
        ]
        refs.append(_ref(i, ann_id, image_id, split, sentences, next_sent))
        next_sent += n
        expected["refs"][split] = expected["refs"].get(split, 0) + 1
        expected["samples"][split] = expected["samples"].get(split, 0) + n

    if bad_samples:
        next_sent = _add_bad_samples(imgs, anns, refs, image_dir, splits[0], next_sent, rng, expected)

    (ds_dir / "instances.json").write_text(
        json.dumps(
            {
                "images": imgs,
                "annotations": anns,
                "categories": [{"id": c, "name": f"cat{c}", "supercategory": "thing"} for c in (1, 2, 3)],
            }
        )
    )
    with open(ds_dir / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    expected.update(root=root, image_dir=image_dir, dataset_dir=ds_dir)
    return expected


def _add_bad_samples(imgs, anns, refs, image_dir, split, next_sent, rng, expected) -> int:
    """Refs that load_split must skip, all in ``split``; fills expected["skipped"] (per sentence)."""
    skipped = expected["skipped"]
    base_ref = len(refs) + 500
    # 1) ref -> annotation id that instances.json does not have (2 sentences -> 2 skipped)
    refs.append(_ref(base_ref, 99999, 1, split, ["ghost one", "ghost two"], next_sent))
    next_sent += 2
    skipped["missing annotation"] = 2
    # 2) a whitespace-only sentence next to a good one (1 skipped, 1 kept)
    refs.append(
        _ref(base_ref + 1, anns[0]["id"], anns[0]["image_id"], split, ["   ", "the left one"], next_sent)
    )
    next_sent += 2
    skipped["empty sentence"] = 1
    expected["refs"][split] = expected["refs"].get(split, 0) + 1
    expected["samples"][split] = expected["samples"].get(split, 0) + 1
    # 3) a zero-area (collinear) polygon (1 sentence -> 1 skipped)
    h, w = imgs[0]["height"], imgs[0]["width"]
    anns.append(_annotation(5000, imgs[0]["id"], [[1.0, 1.0, 5.0, 5.0, 9.0, 9.0]], 0, h, w))
    refs.append(_ref(base_ref + 2, 5000, imgs[0]["id"], split, ["a line"], next_sent))
    next_sent += 1
    skipped["zero-area segmentation"] = 1
    # 4) an image listed in instances.json whose file was never written (3 sentences -> 3 skipped)
    image_id = 777777
    imgs.append({"id": image_id, "file_name": coco_file_name(image_id), "height": h, "width": w})
    anns.append(_annotation(5001, image_id, [[2.0, 2.0, 20.0, 2.0, 20.0, 20.0]], 0, h, w))
    refs.append(_ref(base_ref + 3, 5001, image_id, split, ["gone a", "gone b", "gone c"], next_sent))
    next_sent += 3
    skipped["missing image file"] = 3
    return next_sent


class _WriteMarker:
    """Unpickling this calls ``builtins.open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_tampered_pickle(path: str | Path, marker_file: str | Path) -> Path:
    """A refs pickle that looks normal but whose plain ``pickle.load`` would create ``marker_file``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    refs = [
        {
            "ref_id": 0,
            "ann_id": 1,
            "image_id": 1,
            "split": "train",
            "category_id": 1,
            "sentences": [{"sent_id": 0, "sent": "x"}],
            "payload": _WriteMarker(os.fspath(marker_file)),
        }
    ]
    with open(path, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return path


# ----------------------------------------------------------------------------- gRefCOCO layout
GREF_SIZE = (40, 48)  # (height, width) of every gRefCOCO fixture image


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def write_grefcoco_set(root: str | Path, *, refs_format: str = "json", image_layout: str = "grefcoco") -> dict:
    """Write a gRefCOCO-layout set under ``root``; return what the reader should find.

    Images 1 and 2 exist, image 3 is listed but its file is missing. Annotations (all on a 40x48 grid):
    11 triangle, 12 rectangle, 13 crowd (uncompressed RLE), 14 rectangle plus a 2-point part, 21 compressed
    RLE disc, 22 rectangle, 31 on the missing image. ``refs_format``: "json" (grefs(unc).json) or "p"
    (a protocol-2 pickle, grefs(unc).p); ``image_layout``: "grefcoco" (images/train2014) or "refer".
    Returns {"root", "image_dir", "dataset_dir", "kept": {ref_id: ann ids}, "samples": {split: n},
    "skipped": {split: {reason: n}}, "parts": {ann_id: the usable parts}} (no-target refs keep [])."""
    root = Path(root)
    sub = {"grefcoco": "images/train2014", "refer": "images/mscoco/images/train2014"}[image_layout]
    image_dir, ds_dir = root / sub, root / "grefcoco"
    image_dir.mkdir(parents=True, exist_ok=True)
    ds_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    h, w = GREF_SIZE
    for image_id in (1, 2):
        _write_image(image_dir / coco_file_name(image_id), h, w, "RGB", rng)
    imgs = [{"id": i, "file_name": coco_file_name(i), "height": h, "width": w} for i in (1, 2, 3)]
    yy, xx = np.mgrid[:h, :w]
    disc = (((yy - 20) ** 2 + (xx - 30) ** 2) <= 81).astype(np.uint8)
    crowd = np.zeros((h, w), np.uint8)
    crowd[30:38, 2:12] = 1
    segs = {
        11: ([[2.0, 2.0, 20.0, 3.0, 10.0, 18.0]], 0, 1),
        12: ([_rect(24.0, 4.0, 44.0, 14.0)], 0, 1),
        13: ({"size": [h, w], "counts": uncompressed_counts(crowd)}, 1, 1),
        14: ([_rect(4.0, 22.0, 16.0, 34.0), [1.0, 1.0, 5.0, 5.0]], 0, 1),
        21: ({"size": [h, w], "counts": mask_utils.encode(np.asfortranarray(disc))["counts"].decode("ascii")}, 0, 2),
        22: ([_rect(2.0, 2.0, 12.0, 12.0)], 0, 2),
        31: ([_rect(2.0, 2.0, 12.0, 12.0)], 0, 3),
    }
    anns = [_annotation(a, image_id, seg, crowd_flag, h, w) for a, (seg, crowd_flag, image_id) in segs.items()]
    # (ref_id, ann_id as written, image_id, split, sentences, extra fields)
    table = [
        (0, 11, 1, "train", ["the triangle", "pointy thing"], {}),
        (1, [11, 12], 1, "train", ["the triangle and the box"], {}),
        (2, [12, 13], 1, "train", ["box and crowd"], {}),
        (3, [14], 1, "train", ["the square"], {}),
        (4, [-1], 1, "train", ["the purple star", "a dog"], {"no_target": True}),
        (5, [21, 22], 2, "val", ["the disc and the box", "both"], {}),
        (6, [-1], 2, "val", ["a cat"], {}),
        (7, [11, 999], 1, "train", ["ghost a", "ghost b"], {}),  # missing annotation
        (8, [-1, 12], 1, "train", ["contradiction"], {}),  # no target yet an annotation
        (9, [], 1, "train", ["nothing listed"], {}),  # empty annotation list
        (10, [12], 1, "trainval", ["odd split"], {}),  # unknown split
        (11, [13], 1, "train", ["only the crowd"], {}),  # only crowd annotations
        (12, [31], 3, "train", ["lost image"], {}),  # missing image file
    ]
    refs, next_sent = [], 100
    for ref_id, ann_id, image_id, split, sentences, extra in table:
        ids = ann_id if isinstance(ann_id, list) else [ann_id]
        refs.append({"ref_id": ref_id, "image_id": image_id, "ann_id": ann_id, "split": split,
                     "category_id": [1 for _ in ids], "sent_ids": list(range(next_sent, next_sent + len(sentences))),
                     "sentences": [{"sent_id": next_sent + j, "sent": s, "raw": s, "tokens": s.split()}
                                   for j, s in enumerate(sentences)], **extra})
        next_sent += len(sentences)
    (ds_dir / "instances.json").write_text(json.dumps({
        "images": imgs, "annotations": anns,
        "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}]}))
    if refs_format == "json":
        (ds_dir / "grefs(unc).json").write_text(json.dumps(refs))
    else:
        with open(ds_dir / "grefs(unc).p", "wb") as f:
            pickle.dump(refs, f, protocol=2)
    every_split = {"unknown split": 1}
    return {
        "root": root, "image_dir": image_dir, "dataset_dir": ds_dir,
        "kept": {0: [11], 1: [11, 12], 2: [12], 3: [14], 4: [], 5: [21, 22], 6: []},
        "samples": {"train": 7, "val": 3, "testA": 0, "testB": 0},
        "skipped": {
            "train": {"missing annotation": 2, "no-target ref with annotations": 1, "ref without annotations": 1,
                      "only crowd annotations": 1, "missing image file": 1, **every_split},
            "val": every_split, "testA": every_split, "testB": every_split,
        },
        "parts": {11: segs[11][0], 12: segs[12][0], 14: [segs[14][0][0]], 21: segs[21][0], 22: segs[22][0]},
    }
