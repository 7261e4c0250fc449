"""refseg.data.sources.refer / masks / skips on small refer-format sets written by tests/refer_fixtures.py."""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from refer_fixtures import uncompressed_counts, write_refer_set, write_tampered_pickle

from refseg.data.masks import decode_mask, encode_rle, polygon_area_ok, rle_to_mask, segmentation_problem
from refseg.data.skips import RefSegDataError, SkipReport
from refseg.data.sources.refer import load_split, load_split_refs, read_refs, split_matches

RECORD_FIELDS = {
    "ref_id",
    "sent_id",
    "ann_id",
    "image_id",
    "image_path",
    "sentence",
    "category_id",
    "height",
    "width",
    "split",
    "segmentation",
    "bbox",
}


@pytest.fixture
def refcoco(tmp_path):
    return write_refer_set(tmp_path)  # refcoco/unc, 5 images, one ref each


def test_counts_per_split_unc(refcoco):
    root = refcoco["root"]
    # refs cycle train, val, testA, testB, train with 2, 3, 1, 2, 3 sentences
    expected = {"train": (2, 5), "val": (1, 3), "testA": (1, 1), "testB": (1, 2), "test": (2, 3)}
    for split, (n_refs, n_samples) in expected.items():
        records = load_split(root, "refcoco", "unc", split)
        assert len(records) == n_samples, split
        assert len({r["ref_id"] for r in records}) == n_refs, split
        assert len(load_split_refs(root, "refcoco", "unc", split)) == n_refs, split
    for split in ("train", "val", "testA", "testB"):
        assert len(load_split(root, "refcoco", "unc", split)) == refcoco["samples"][split]
    assert {r["split"] for r in load_split(root, "refcoco", "unc", "test")} == {"testA", "testB"}


def test_test_matches_every_split_containing_test(tmp_path):
    # refcocog/umd-style set whose split names are train, val, test and testB
    exp = write_refer_set(
        tmp_path, images=8, dataset="refcocog", split_by="umd", splits=("train", "val", "test", "testB")
    )
    load = lambda split: load_split(tmp_path, "refcocog", "umd", split)
    # i: split (sentences) = 0 train (2), 1 val (3), 2 test (1), 3 testB (2),
    #                        4 train (3), 5 val (1), 6 test (2), 7 testB (3)
    assert len(load("test")) == 1 + 2 + 2 + 3 == exp["samples"]["test"] + exp["samples"]["testB"]
    assert {r["split"] for r in load("test")} == {"test", "testB"}
    assert len(load("testB")) == 2 + 3  # the letter rule: only splits containing "B"
    assert load("testA") == []
    assert len(load("train")) == 2 + 3 and len(load("val")) == 3 + 1
    with pytest.raises(RefSegDataError, match="split 'tset' is not in refs file"):
        load("tset")


def test_split_matching_rules():
    assert split_matches("testAB", "testA") and split_matches("testAB", "testB")
    assert split_matches("testAB", "test") and split_matches("testAB", "testAB")
    assert not split_matches("testAB", "train") and not split_matches("train", "testA")
    assert not split_matches("val", "test") and split_matches("val", "val")
    assert not split_matches("trainval", "train")  # train / val are exact


def test_records_have_all_fields(refcoco):
    records = load_split(refcoco["root"], "refcoco", "unc", "train")
    assert records[0]["sent_id"] != records[1]["sent_id"] and records[0]["ref_id"] == records[1]["ref_id"]
    for r in records:
        assert set(r) == RECORD_FIELDS
        assert isinstance(r["sentence"], str) and r["sentence"].strip()
        assert r["image_path"].startswith(str(refcoco["image_dir"].absolute()))
        with Image.open(r["image_path"]) as im:
            assert im.size == (r["width"], r["height"])
        assert len(r["bbox"]) == 4 and r["split"] == "train"
        assert all(
            isinstance(r[k], int)
            for k in ("ref_id", "sent_id", "ann_id", "image_id", "category_id", "height", "width")
        )
    refs = load_split_refs(refcoco["root"], "refcoco", "unc", "train")
    assert [len(r["sentences"]) for r in refs] == [2, 3]
    assert set(refs[0]) == (RECORD_FIELDS - {"sent_id", "sentence"}) | {"sentences"}
    assert set(refs[0]["sentences"][0]) == {"sent_id", "sentence"}


def test_grayscale_and_cmyk_images_are_listed(refcoco):
    records = load_split(refcoco["root"], "refcoco", "unc", "val") + load_split(
        refcoco["root"], "refcoco", "unc", "testA"
    )
    modes = set()
    for r in records:
        with Image.open(r["image_path"]) as im:
            modes.add(im.mode)
    assert modes == {"L", "CMYK"}  # image 2 (val) is grayscale, image 3 (testA) CMYK


def _direct_mask(seg, h, w) -> np.ndarray:
    """refer's getMask written out with pycocotools (the reference): polygons through frPyObjects,
    a list of RLE dicts decoded as it is, then summed over the parts."""
    if isinstance(seg, list):
        m = mask_utils.decode(seg if isinstance(seg[0], dict) else mask_utils.frPyObjects(seg, h, w))  # (H, W, parts)
        return (np.sum(m, axis=2) > 0).astype(np.uint8)
    if isinstance(seg["counts"], list):
        return mask_utils.decode(mask_utils.frPyObjects(seg, h, w))
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})


def test_masks_equal_direct_pycocotools(refcoco):
    records = [
        r
        for s in ("train", "val", "testA", "testB")
        for r in load_split(refcoco["root"], "refcoco", "unc", s)
    ]
    seen = set()
    for r in records:
        mask = decode_mask(r)
        assert mask.dtype == np.uint8 and mask.shape == (r["height"], r["width"])
        assert set(np.unique(mask)) == {0, 1}
        direct = _direct_mask(r["segmentation"], r["height"], r["width"])
        np.testing.assert_array_equal(mask, direct)
        kind = refcoco["ann_kinds"][r["ann_id"]]
        seen.add(kind)
        # bare segmentation + size gives the same mask; RLE round trip is exact and JSON-safe
        np.testing.assert_array_equal(decode_mask(r["segmentation"], r["height"], r["width"]), mask)
        rle = json.loads(json.dumps(encode_rle(mask)))
        assert rle["size"] == [r["height"], r["width"]] and isinstance(rle["counts"], str)
        np.testing.assert_array_equal(rle_to_mask(rle), mask)
    assert seen == {"polygon", "multipart", "rle_str", "rle_list", "rle_parts"}


def test_every_segmentation_form_decodes_like_pycocotools():
    """Polygons, an RLE dict with str / bytes / list counts, and a list of RLE dicts: the mask refer's
    getMask gets from pycocotools (decode, sum over the parts, > 0)."""
    h, w = 24, 30
    rng = np.random.default_rng(0)
    parts = [(rng.random((h, w)) > 0.8).astype(np.uint8) for _ in range(3)]
    compressed = [mask_utils.encode(np.asfortranarray(p)) for p in parts]  # counts bytes
    union = (np.sum(mask_utils.decode(compressed), axis=2) > 0).astype(np.uint8)  # (H, W, 3) -> (H, W)
    as_str = [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in compressed]
    uncompressed = [{"size": [h, w], "counts": uncompressed_counts(p)} for p in parts]
    for seg in (compressed, as_str, uncompressed, as_str[:1] + compressed[1:]):
        np.testing.assert_array_equal(decode_mask(seg), union)
        np.testing.assert_array_equal(decode_mask(seg, h, w), union)
        assert segmentation_problem(seg, h, w) is None
    np.testing.assert_array_equal(decode_mask(as_str), _direct_mask(as_str, h, w))
    for one in (compressed[0], as_str[0], uncompressed[0]):  # a single RLE dict
        np.testing.assert_array_equal(decode_mask(one), parts[0])
    polygons = [[2.0, 2.0, 20.0, 3.0, 10.0, 18.0], [15.0, 15.0, 28.0, 15.0, 28.0, 22.0, 15.0, 22.0]]
    np.testing.assert_array_equal(decode_mask(polygons, h, w), _direct_mask(polygons, h, w))
    # parts of different sizes, or a size other than the image's: invalid; no foreground: zero-area
    assert segmentation_problem([as_str[0], {"size": [h, w + 1], "counts": as_str[1]["counts"]}]) == "invalid segmentation"
    assert segmentation_problem(as_str, h + 1, w) == "invalid segmentation"
    empty = {"size": [h, w], "counts": [h * w]}
    assert segmentation_problem([empty, empty], h, w) == "zero-area segmentation"


def test_a_list_of_rle_segmentation_is_kept(refcoco):
    """refer reads an annotation whose segmentation is a list of RLE dicts; so does load_split."""
    refs = load_split_refs(refcoco["root"], "refcoco", "unc", "train")
    ref = next(r for r in refs if refcoco["ann_kinds"][r["ann_id"]] == "rle_parts")
    assert isinstance(ref["segmentation"], list) and isinstance(ref["segmentation"][0], dict)
    assert len(ref["sentences"]) == 3
    mask = decode_mask(ref)
    np.testing.assert_array_equal(mask, _direct_mask(ref["segmentation"], ref["height"], ref["width"]))
    assert mask.sum() > max(decode_mask(p).sum() for p in ref["segmentation"])  # the union of both parts


def test_multipart_overlap_is_binary():
    # two overlapping squares: refer's sum over parts would give 2 in the overlap; we keep {0,1}
    seg = [[0, 0, 6, 0, 6, 6, 0, 6], [3, 3, 9, 3, 9, 9, 3, 9]]
    m = decode_mask(seg, 10, 10)
    assert m.max() == 1 and m.sum() == int(
        mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(seg, 10, 10)))
    )
    with pytest.raises(ValueError, match="height and width"):
        decode_mask(seg)


def test_polygon_validation():
    assert polygon_area_ok([[0, 0, 4, 0, 4, 4]])
    assert not polygon_area_ok([[0, 0, 4, 4]])  # fewer than 3 points
    assert not polygon_area_ok([[0, 0, 4, 0, float("nan"), 4]])  # non-finite
    assert segmentation_problem([[0, 0, 2, 2, 4, 4]]) == "zero-area segmentation"  # collinear
    assert segmentation_problem([]) == "invalid segmentation"
    assert segmentation_problem({"size": [4, 4], "counts": [16]}) == "zero-area segmentation"
    assert segmentation_problem({"size": [4, 4], "counts": [5, 3, 8]}) is None
    assert segmentation_problem({"size": [4, 4], "counts": [5, 3, 8]}, 5, 4) == "invalid segmentation"
    assert polygon_area_ok([[0, 0, 4, 4], [0, 0, 4, 0, 4, 4]])  # a degenerate part beside a good one


def test_tampered_pickle_is_refused_without_running_code(refcoco, tmp_path):
    refs_path = refcoco["dataset_dir"] / "refs(unc).p"
    marker = tmp_path / "pwned"
    write_tampered_pickle(refs_path, marker)
    with pytest.raises(RefSegDataError) as err:
        load_split(refcoco["root"], "refcoco", "unc", "train")
    msg = str(err.value)
    assert str(refs_path) in msg and "refusing to load it" in msg and "open" in msg
    assert not marker.exists()
    # the fixture is real: an unrestricted load does create the marker
    other = tmp_path / "plain_marker"
    with open(write_tampered_pickle(tmp_path / "t.p", other), "rb") as f:
        pickle.load(f)
    assert other.exists()


def test_python2_byte_strings_are_read(tmp_path):
    # protocol-2 pickle as Python 2 writes it: [{'sent': 'caf\xc3\xa9' (a py2 str), 'ref_id': 1}]
    data = b"\x80\x02]q\x00}q\x01(U\x04sentq\x02U\x05caf\xc3\xa9q\x03U\x06ref_idq\x04K\x01ua."
    path = tmp_path / "refs(unc).p"
    path.write_bytes(data)
    assert read_refs(path) == [{"sent": "café", "ref_id": 1}]
    path.write_bytes(b"\x80\x02]q\x00(K\x01")  # truncated
    with pytest.raises(RefSegDataError, match="not a readable pickle"):
        read_refs(path)


def test_missing_paths_name_the_path(refcoco, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(RefSegDataError, match=re.escape(f"data root {missing} does not exist")):
        load_split(missing, "refcoco", "unc", "train")
    with pytest.raises(RefSegDataError, match="refcoco\\+ does not exist"):
        load_split(refcoco["root"], "refcoco+", "unc", "train")
    with pytest.raises(RefSegDataError, match=r"refs\(google\)\.p does not exist.*refs\(unc\)\.p"):
        load_split(refcoco["root"], "refcoco", "google", "train")
    with pytest.raises(RefSegDataError, match="image directory .* does not exist"):
        load_split(refcoco["root"], "refcoco", "unc", "train", image_dir=missing)
    instances = refcoco["dataset_dir"] / "instances.json"
    instances.write_text("{not json")
    with pytest.raises(RefSegDataError, match=re.escape(f"{instances} is not a COCO instances.json")):
        load_split(refcoco["root"], "refcoco", "unc", "train")
    instances.unlink()
    with pytest.raises(RefSegDataError) as err:
        load_split(refcoco["root"], "refcoco", "unc", "train")
    assert str(instances) in str(err.value) and "does not exist" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_image_dir_layouts(tmp_path):
    exp = write_refer_set(tmp_path / "seed", image_layout="seed")
    records = load_split(tmp_path / "seed", "refcoco", "unc", "val")
    assert records and all(r["image_path"].startswith(str(exp["image_dir"])) for r in records)
    moved = tmp_path / "elsewhere"
    shutil.move(str(exp["image_dir"]), moved)
    with pytest.raises(RefSegDataError, match="no image directory at .*set data.image_dir"):
        load_split(tmp_path / "seed", "refcoco", "unc", "val")
    records = load_split(tmp_path / "seed", "refcoco", "unc", "val", image_dir=moved)
    assert len(records) == exp["samples"]["val"] and records[0]["image_path"].startswith(str(moved))


def test_skipped_samples_are_counted_by_reason(tmp_path, caplog):
    exp = write_refer_set(tmp_path, bad_samples=True)
    report = SkipReport()
    with caplog.at_level(logging.INFO, logger="refseg.data"):
        records = load_split(tmp_path, "refcoco", "unc", "train", report=report)
    assert (
        dict(report.counts)
        == exp["skipped"]
        == {
            "missing annotation": 2,
            "empty sentence": 1,
            "zero-area segmentation": 1,
            "missing image file": 3,
        }
    )
    assert report.total == 7
    assert len(records) == exp["samples"]["train"] == 5 + 1  # the good sentence beside the empty one
    assert "the left one" in {r["sentence"] for r in records}
    summary = report.summary()
    assert summary.startswith("skipped 7 samples: 3 missing image file, 2 missing annotation")
    assert "COCO_train2014_000000777777.jpg" in summary
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "refseg.data"]
    assert len(logged) == 1 and "refcoco(unc) train: 6 samples; skipped 7 samples" in logged[0]
    # the same counts (per (ref, sentence) sample) come out of the per-ref reader
    report2 = SkipReport()
    refs = load_split_refs(tmp_path, "refcoco", "unc", "train", report=report2)
    assert dict(report2.counts) == exp["skipped"] and len(refs) == exp["refs"]["train"] == 3
    # other splits are untouched by the bad refs
    report3 = SkipReport()
    assert len(load_split(tmp_path, "refcoco", "unc", "val", report=report3)) == 3 and report3.total == 0
