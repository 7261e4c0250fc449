"""Reader for gRefCOCO (GRES, CVPR 2023): expressions naming one object, several, or none.

    records = load_split("data", "grefcoco", "unc", "val")   # refseg.data.load_split, as for RefCOCO
    records[0]["ann_ids"], records[0]["no_target"]           # [101, 102], False

Layout (as ReLA's ``grefer.py`` reads it):
    <root>/grefcoco/grefs(unc).json     a list of refs (or grefs(unc).p, read with globals refused)
    <root>/grefcoco/instances.json      COCO images / annotations / categories
    <root>/images/train2014/            images (the refer layout's images/mscoco/images/train2014 too)

A ref: ``ref_id``, ``image_id``, ``ann_id`` (an int, a list of ints, or ``[-1]`` = no target; a
``no_target`` flag may be present), ``category_id`` (a list), ``split`` (train / val / testA /
testB) and ``sentences`` [{sent_id, sent, raw, tokens}]. The target is the union of the ref's
annotations: ``iscrowd`` ones are left out and polygon parts with fewer than 3 points dropped (an
annotation left with no usable part is left out too). A no-target ref has ``ann_ids == []``,
``ann_id == -1``, ``no_target == True`` and the segmentation ``[]`` (an all-zero mask).

Refs that cannot be used are skipped, each of their sentences counted in the :class:`SkipReport`:
a missing annotation, a ``[-1]`` that also lists annotations, an empty ``ann_id`` list, a split
outside train / val / testA / testB, only crowd annotations, a missing image. A refs file with no
refs raises :class:`RefSegDataError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from refseg.data import skips
from refseg.data.masks import decode_mask, encode_rle, segmentation_problem
from refseg.data.skips import RefSegDataError, SkipReport
from refseg.data.sources import coco_files

DATASET = "grefcoco"
SPLITS = ("train", "val", "testA", "testB")
IMAGE_SUBDIRS = ("images/train2014", "images/mscoco/images/train2014", "images/mscoco/train2014")


def resolve_paths(data_root: str | Path, split_by: str, image_dir: str | Path | None) -> tuple[Path, Path, Path]:
    """(refs file, instances.json, image dir), each checked to exist; ``grefs(<split_by>).json`` is
    preferred over ``grefs(<split_by>).p``."""
    root = Path(data_root).expanduser().absolute()
    ds_dir = root / DATASET
    if not ds_dir.is_dir():
        raise RefSegDataError(
            f"gRefCOCO directory {ds_dir} does not exist; put grefs({split_by}).json and instances.json there "
            "(or set data.synthetic=true for a synthetic set)"
        )
    candidates = [ds_dir / f"grefs({split_by}).json", ds_dir / f"grefs({split_by}).p"]
    refs_path = next((p for p in candidates if p.is_file()), None)
    if refs_path is None:
        present = sorted(p.name for p in ds_dir.glob("grefs(*)*")) or "none"
        raise RefSegDataError(f"refs file {candidates[0]} (or {candidates[1].name}) does not exist; gRefCOCO is "
                              f"split by 'unc' (files found in {ds_dir}: {present})")
    instances_path = ds_dir / "instances.json"
    if not instances_path.is_file():
        raise RefSegDataError(f"annotation file {instances_path} does not exist; download gRefCOCO's "
                              f"instances.json into {ds_dir}")
    return refs_path, instances_path, coco_files.find_image_dir(root, image_dir, IMAGE_SUBDIRS)


def read_grefs(path: Path) -> list[dict]:
    """The refs of a ``grefs(unc).json`` or ``grefs(unc).p`` file (a non-empty list of dicts)."""
    if path.suffix == ".p":
        refs = coco_files.read_refs(path)
    else:
        try:
            refs = json.loads(path.read_bytes())
        except ValueError as e:
            raise RefSegDataError(f"refs file {path} is not JSON ({e}); re-download it") from None
        if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
            raise RefSegDataError(f"refs file {path} holds a {type(refs).__name__}, not a list of ref dicts; "
                                  "re-download it")
    if not refs:
        raise RefSegDataError(f"refs file {path} holds no refs; re-download it")
    return refs


def target_ids(ref: dict) -> tuple[list[int], bool]:
    """(annotation ids in file order, no_target) of a ref whose ``ann_id`` is an int, a list of ints
    or ``[-1]``; no_target is True for a ``-1`` or a true ``no_target`` flag (the ids may then still
    list annotations: :func:`iter_refs` skips such a ref)."""
    raw = ref["ann_id"]
    ids = [int(a) for a in (raw if isinstance(raw, list) else [raw])]
    ids = list(dict.fromkeys(ids))  # a repeated id counts once
    return ids, bool(ref.get("no_target", False)) or -1 in ids


def _clean(seg: object) -> object:
    """Polygons without their parts of fewer than 3 points; RLE as it is."""
    if isinstance(seg, list) and seg and all(isinstance(p, (list, tuple)) for p in seg):
        return [list(p) for p in seg if len(p) >= 6 and len(p) % 2 == 0]
    return seg


def _is_polygons(seg: object) -> bool:
    return isinstance(seg, list) and all(isinstance(p, list) for p in seg)


def union_segmentation(segs: list, height: int, width: int) -> object:
    """One segmentation for the union of ``segs``: one of them as it is, their polygon parts side
    by side, or (when any is RLE) a list of RLE dicts (which :func:`decode_mask` unites)."""
    if len(segs) == 1:
        return segs[0]
    if all(_is_polygons(s) for s in segs):
        return [part for s in segs for part in s]
    return [encode_rle(decode_mask(s, height, width)) for s in segs]


def _target(ref_id: int, ids: list[int], anns: dict[int, dict], image: dict, seg_problem: dict
            ) -> tuple[list[int], list, str | None, str]:
    """(kept ann ids, their cleaned segmentations, skip reason, detail) of a target ref."""
    kept, segs, crowd, problem = [], [], 0, None
    for ann_id in ids:
        ann = anns.get(ann_id)
        if ann is None:
            return [], [], skips.MISSING_ANNOTATION, f"ref {ref_id} -> ann {ann_id}"
        if ann.get("iscrowd", 0):
            crowd += 1
            continue
        seg = _clean(ann.get("segmentation"))
        if ann_id not in seg_problem:  # annotations repeat across refs: check each once
            seg_problem[ann_id] = segmentation_problem(seg, image["height"], image["width"])
        if seg_problem[ann_id] is not None:
            problem = problem or seg_problem[ann_id]
            continue
        kept.append(ann_id)
        segs.append(seg)
    if not kept:
        reason = skips.CROWD_ONLY if crowd == len(ids) else problem
        return [], [], reason, f"ref {ref_id} -> anns {ids}"
    return kept, segs, None, ""


def _bbox(anns: list[dict]) -> list[float]:
    """[x, y, w, h] around the boxes of ``anns``."""
    boxes = [[float(v) for v in a["bbox"]] for a in anns if len(a.get("bbox", [])) == 4]
    if not boxes:
        return []
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    return [x0, y0, x1 - x0, y1 - y0]


def iter_refs(data_root: str | Path, split_by: str, split: str, image_dir: str | Path | None,
              report: SkipReport) -> Iterator[dict]:
    """Per usable ref of ``split``: the refer reader's ref fields plus ``ann_ids`` and ``no_target``,
    and ``sentences: [{sent_id, sentence}]`` (see the module doc)."""
    if split not in SPLITS:
        raise RefSegDataError(f"split '{split}' is not a gRefCOCO split; use one of {list(SPLITS)}")
    refs_path, instances_path, img_dir = resolve_paths(data_root, split_by, image_dir)
    refs = read_grefs(refs_path)
    images, anns = coco_files.read_instances(instances_path)
    index = coco_files.ImageIndex(img_dir)
    seg_problem: dict[int, str | None] = {}
    for ref in refs:
        try:
            ref_id, image_id, ref_split = int(ref["ref_id"]), int(ref["image_id"]), str(ref["split"])
            ids, no_target = target_ids(ref)
            counted = ref_split == split or ref_split not in SPLITS  # an unknown split is skipped in every split
            sentences = coco_files.usable_sentences(ref, report) if counted else []
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            report.add(skips.MALFORMED_REF, f"ref {ref.get('ref_id')}: {type(e).__name__} {e}")
            continue
        if not sentences:  # another split, or no usable sentence (counted)
            continue
        reason, detail, kept, segs = None, "", [], []
        image = images.get(image_id)
        if ref_split not in SPLITS:
            reason, detail = skips.UNKNOWN_SPLIT, f"ref {ref_id}: split {ref_split!r}"
        elif no_target and ids != [-1] and ids:
            reason, detail = skips.NO_TARGET_WITH_ANNOTATIONS, f"ref {ref_id} -> anns {ids}"
        elif not ids and not no_target:
            reason, detail = skips.NO_ANNOTATIONS, f"ref {ref_id}"
        elif image is None:
            reason, detail = skips.UNKNOWN_IMAGE, f"ref {ref_id} -> image {image_id}"
        elif not no_target:
            kept, segs, reason, detail = _target(ref_id, ids, anns, image, seg_problem)
        if reason is None and not index.exists(image["file_name"]):
            reason, detail = skips.MISSING_IMAGE_FILE, str(img_dir / image["file_name"])
        if reason is not None:  # every (ref, sentence) sample of this ref is skipped
            report.add(reason, detail, len(sentences))
            continue
        height, width = int(image["height"]), int(image["width"])
        yield {
            "ref_id": ref_id,
            "ann_id": kept[0] if kept else -1,
            "ann_ids": kept,
            "no_target": not kept,
            "image_id": image_id,
            "image_path": str(img_dir / image["file_name"]),
            "category_id": int(anns[kept[0]].get("category_id", -1)) if kept else -1,
            "height": height,
            "width": width,
            "split": ref_split,
            "segmentation": union_segmentation(segs, height, width) if kept else [],
            "bbox": _bbox([anns[a] for a in kept]),
            "sentences": sentences,
        }
