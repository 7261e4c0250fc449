"""The synthetic refer-format set: layout, determinism, unambiguous language, masks that match pixels."""

from __future__ import annotations

import io
import json
import pickle
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from refseg.data.sources.synthetic import IMAGE_SUBDIR, ensure_synthetic, make_synthetic
from refseg.data.sources.synthetic_expressions import COLORS, Desc, Obj, parse_expression, referents


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):  # refs must hold builtins only
        raise pickle.UnpicklingError(f"global {module}.{name} in refs pickle")


def _load(root: Path) -> tuple[dict, list[dict]]:
    instances = json.loads((root / "refcoco" / "instances.json").read_text())
    refs = _NoGlobals(io.BytesIO((root / "refcoco" / "refs(unc).p").read_bytes())).load()
    return instances, refs


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    root = make_synthetic(tmp_path_factory.mktemp("synth") / "data", num_images=100, seed=0)
    return (root, *_load(root))


def _scenes(instances: dict) -> dict[int, tuple[dict, list[dict], list[Obj]]]:
    """image_id -> (image, annotations, objects rebuilt from the annotations alone)."""
    cats = {c["id"]: c["name"] for c in instances["categories"]}
    anns = defaultdict(list)
    for a in instances["annotations"]:
        anns[a["image_id"]].append(a)
    out = {}
    for img in instances["images"]:
        objs = [Obj(cats[a["category_id"]], a["color"], a["bbox"][0] + a["bbox"][2] / 2,
                    a["bbox"][1] + a["bbox"][3] / 2, a["area"]) for a in anns[img["id"]]]
        out[img["id"]] = (img, anns[img["id"]], objs)
    return out


def test_layout_is_what_refer_reads(synth):
    root, instances, refs = synth
    assert (root / ".complete").is_file()
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    images = {im["id"]: im for im in instances["images"]}
    assert len(images) == 100
    for im in images.values():
        assert re.fullmatch(r"COCO_train2014_\d{12}\.jpg", im["file_name"])
        assert im["file_name"] == f"COCO_train2014_{im['id']:012d}.jpg"
        with Image.open(root / IMAGE_SUBDIR / im["file_name"]) as f:
            assert f.format == "JPEG" and f.mode == "RGB" and f.size == (im["width"], im["height"])
        assert 96 <= im["width"] <= 192 and 96 <= im["height"] <= 192
    cat_ids = {c["id"] for c in instances["categories"]}
    assert len(cat_ids) == len(instances["categories"]) >= 4
    anns = {a["id"]: a for a in instances["annotations"]}
    for a in anns.values():
        assert set(a) >= {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
        assert a["iscrowd"] == 0 and a["category_id"] in cat_ids and a["image_id"] in images
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])
    ref_ids, sent_ids = set(), set()
    for r in refs:
        assert type(r) is dict and set(r) == {"ref_id", "ann_id", "image_id", "category_id", "split",
                                              "file_name", "sent_ids", "sentences"}
        ann = anns[r["ann_id"]]
        assert ann["image_id"] == r["image_id"] and ann["category_id"] == r["category_id"]
        assert re.fullmatch(rf"COCO_train2014_{r['image_id']:012d}_\d+\.jpg", r["file_name"])
        assert 1 <= len(r["sentences"]) <= 3 and r["sent_ids"] == [s["sent_id"] for s in r["sentences"]]
        for s in r["sentences"]:
            assert s["tokens"] == s["sent"].split() and s["sent"] == s["sent"].lower()
            assert s["raw"].lower().rstrip(".") == s["sent"]
        ref_ids.add(r["ref_id"])
        sent_ids.update(r["sent_ids"])
    assert len(ref_ids) == len(refs) and len(sent_ids) == sum(len(r["sent_ids"]) for r in refs)


def test_splits_are_by_image(synth):
    _, _, refs = synth
    split_of = {}
    for r in refs:
        assert split_of.setdefault(r["image_id"], r["split"]) == r["split"]
    counts = {s: list(split_of.values()).count(s) for s in ("train", "val", "testA", "testB")}
    assert counts == {"train": 80, "val": 10, "testA": 5, "testB": 5}


def test_every_expression_picks_exactly_its_target(synth):
    _, instances, refs = synth
    scenes = _scenes(instances)
    targets = defaultdict(set)
    for r in refs:
        img, anns, objs = scenes[r["image_id"]]
        target = [a["id"] for a in anns].index(r["ann_id"])
        targets[r["image_id"]].add(target)
        for s in r["sentences"]:
            for text in (s["sent"], s["raw"]):
                desc = parse_expression(text)
                assert referents(desc, objs, img["width"], img["height"]) == [target], (text, objs)
    # several refs with different targets in every image
    assert all(len(t) >= 2 for t in targets.values()) and len(targets) == 100


def test_vision_alone_cannot_solve_most_images(synth):
    _, instances, refs = synth
    scenes = _scenes(instances)
    shared = 0
    for _, _, objs in scenes.values():
        assert 3 <= len(objs) <= 5
        colors, shapes = [o.color for o in objs], [o.shape for o in objs]
        shared += len(set(colors)) < len(colors) or len(set(shapes)) < len(shapes)
    assert shared / len(scenes) >= 0.8
    # language beyond "colour + shape" is really used
    words = {w for r in refs for s in r["sentences"] for w in s["tokens"]}
    assert {"left", "leftmost", "right", "bigger", "smallest"} <= words


def test_polygon_masks_match_rendered_pixels(synth):
    root, instances, _ = synth
    for img, anns, objs in list(_scenes(instances).values())[:40]:
        h, w = img["height"], img["width"]
        pixels = np.asarray(Image.open(root / IMAGE_SUBDIR / img["file_name"]).convert("RGB"), np.int16)
        masks = [mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w)))
                 for a in anns]
        for m, a in zip(masks, anns):
            assert m.sum() == a["area"] > 0
            x, y, bw, bh = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m)))
            assert np.allclose([x, y, bw, bh], a["bbox"])
        assert np.stack(masks).sum(0).max() == 1  # shapes do not overlap
        for color in {o.color for o in objs}:
            painted = np.abs(pixels - np.array(COLORS[color])).max(-1) < 40
            want = np.any([m.astype(bool) for m, o in zip(masks, objs) if o.color == color], axis=0)
            iou = (painted & want).sum() / (painted | want).sum()
            assert iou > 0.99, (img["file_name"], color, iou)  # painted from the same raster


def test_deterministic_per_seed(tmp_path):
    a = make_synthetic(tmp_path / "a", num_images=12, seed=3)
    b = make_synthetic(tmp_path / "b", num_images=12, seed=3)
    c = make_synthetic(tmp_path / "c", num_images=12, seed=4)
    for rel in ("refcoco/instances.json", "refcoco/refs(unc).p"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
        assert (a / rel).read_bytes() != (c / rel).read_bytes()
    names = sorted(p.name for p in (a / IMAGE_SUBDIR).iterdir())
    assert len(names) == 12
    assert all((a / IMAGE_SUBDIR / n).read_bytes() == (b / IMAGE_SUBDIR / n).read_bytes() for n in names)


def test_ensure_creates_only_when_missing(tmp_path):
    root = tmp_path / "synth"
    ensure_synthetic(root, num_images=4, seed=0)
    refs_file = root / "refcoco" / "refs(unc).p"
    stamp = refs_file.stat().st_mtime_ns
    assert ensure_synthetic(root, num_images=4, seed=0) == root.absolute()
    assert refs_file.stat().st_mtime_ns == stamp  # not rewritten
    ensure_synthetic(root, num_images=5, seed=0)  # other arguments: replaced
    assert len(_load(root)[0]["images"]) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["synth"]  # no temp or old dirs left behind
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="mine"):
        ensure_synthetic(foreign, num_images=4, seed=0)
    assert (foreign / "notes.txt").read_text() == "x"


def test_checker_on_a_hand_made_scene():
    # two red circles (left big, right small), a blue circle in the middle, a red square at the top
    objs = [Obj("circle", "red", 20, 60, 400), Obj("circle", "blue", 50, 60, 300),
            Obj("circle", "red", 80, 60, 200), Obj("square", "red", 50, 10, 250)]
    ref = lambda text: referents(parse_expression(text), objs, 100, 100)
    assert ref("the red circle") == [0, 2]  # ambiguous
    assert ref("the left red circle") == [0] and ref("The right red circle.") == [2]
    assert ref("the bigger red circle") == [0]  # 400 / 200 >= 1.5
    assert ref("the left circle") == [0, 1, 2]  # a comparative needs exactly two candidates
    assert ref("the leftmost circle") == [0] and ref("the circle in the middle") == [1]
    assert ref("the biggest circle") == [0, 1]  # 400 / 300 < 1.5: not clearly bigger
    assert ref("the red shape at the top") == [3] and ref("the square") == [3]
    assert parse_expression("the lowest blue one") == Desc("blue", None, "bottom", False)
    with pytest.raises(ValueError, match="unknown word"):
        parse_expression("the red circle near the tree")
