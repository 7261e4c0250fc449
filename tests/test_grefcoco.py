"""gRefCOCO data: the reader on a hand-made layout, no-target rows through manifests / shards / decode_batch,
and the generalized synthetic set whose every expression the logic checker verifies."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from refer_fixtures import GREF_SIZE, write_grefcoco_set, write_tampered_pickle

from refseg.cli import main
from refseg.config import ConfigError, DataConfig, load_config
from refseg.config.presets import tiny
from refseg.config.validate import validate_data
from refseg.data import (
    COLUMNS,
    RefSegDataError,
    SkipReport,
    decode_batch,
    decode_mask,
    load_refs,
    load_split,
    load_split_refs,
    read_manifest,
    write_manifest,
    write_shards,
)
from refseg.data.refs import refs_table
from refseg.data.samples import SampleOptions
from refseg.data.sources.synthetic_expressions import Obj
from refseg.data.sources.synthetic_generalized import (
    Group,
    group_referents,
    make_generalized_synthetic,
    meant,
)
from refseg.data.transforms import preprocess
from refseg.models import load_tokenizer

SPLITS = ("train", "val", "testA", "testB")
SIZE, TOKENS = 48, 8
TOK = load_tokenizer(tiny().text)


@pytest.fixture
def gref(tmp_path):
    return write_grefcoco_set(tmp_path / "gref")


def union_of(parts: list) -> np.ndarray:
    """pycocotools' own union of segmentations (polygon lists / RLE dicts) on the fixture grid."""
    h, w = GREF_SIZE
    masks = []
    for seg in parts:
        rle = seg if isinstance(seg, dict) else mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        if isinstance(rle.get("counts"), str):
            rle = {"size": rle["size"], "counts": rle["counts"].encode()}
        masks.append(mask_utils.decode(rle))
    return (np.sum(masks, axis=0) > 0).astype(np.uint8)


# ----------------------------------------------------------------------------- the reader
def test_records_carry_targets_and_no_target(gref):
    by_ref: dict[int, list[dict]] = {}
    for split in SPLITS:
        records = load_split(gref["root"], "grefcoco", "unc", split)
        assert len(records) == gref["samples"][split], split
        for r in records:
            by_ref.setdefault(r["ref_id"], []).append(r)
    assert {ref_id: rs[0]["ann_ids"] for ref_id, rs in by_ref.items()} == gref["kept"]
    for ref_id, rs in by_ref.items():
        kept = gref["kept"][ref_id]
        for r in rs:
            assert r["no_target"] is (not kept)
            assert r["ann_id"] == (kept[0] if kept else -1)
            assert r["image_path"].startswith(str(gref["image_dir"]))
    assert [r["sentence"] for r in by_ref[4]] == ["the purple star", "a dog"]
    assert by_ref[4][0]["segmentation"] == [] and by_ref[4][0]["category_id"] == -1
    assert len(load_split_refs(gref["root"], "grefcoco", "unc", "train")) == 5


def test_masks_are_the_union_without_crowd_and_degenerate_parts(gref):
    parts = gref["parts"]
    records = {r["ref_id"]: r for s in ("train", "val") for r in load_split(gref["root"], "grefcoco", "unc", s)}
    for ref_id, kept in gref["kept"].items():
        mask = decode_mask(records[ref_id])
        assert mask.dtype == np.uint8 and mask.shape == GREF_SIZE
        if not kept:
            assert not mask.any(), ref_id
            continue
        want = union_of([parts[a] for a in kept])
        assert np.array_equal(mask, want), ref_id
    # the union of 11 and 12 is more than either; 2's crowd annotation and 3's 2-point part left no trace
    assert decode_mask(records[1]).sum() > max(decode_mask(records[0]).sum(), decode_mask(records[2]).sum())
    assert records[3]["segmentation"] == [parts[14][0]]
    assert isinstance(records[5]["segmentation"], list) and all("counts" in p for p in records[5]["segmentation"])


def test_unusable_refs_are_skipped_with_counted_reasons(gref):
    for split in SPLITS:
        report = SkipReport()
        load_split(gref["root"], "grefcoco", "unc", split, report=report)
        assert dict(report.counts) == gref["skipped"][split], split
    report = SkipReport()
    load_split_refs(gref["root"], "grefcoco", "unc", "train", report=report)
    assert dict(report.counts) == gref["skipped"]["train"]


def test_pickled_refs_and_the_refer_image_folder_are_read(tmp_path, gref):
    other = write_grefcoco_set(tmp_path / "p", refs_format="p", image_layout="refer")
    assert not (other["dataset_dir"] / "grefs(unc).json").exists()
    for split in ("train", "val"):
        got = load_split(other["root"], "grefcoco", "unc", split)
        want = load_split(gref["root"], "grefcoco", "unc", split)
        strip = [({**r, "image_path": None}) for r in got]
        assert strip == [({**r, "image_path": None}) for r in want]
    write_tampered_pickle(other["dataset_dir"] / "grefs(unc).p", tmp_path / "pwned")
    with pytest.raises(RefSegDataError, match="refusing to load it"):
        load_split(other["root"], "grefcoco", "unc", "train")
    assert not (tmp_path / "pwned").exists()


def test_nothing_usable_is_one_sentence(gref, tmp_path):
    with pytest.raises(RefSegDataError, match="split 'test' is not a gRefCOCO split"):
        load_split(gref["root"], "grefcoco", "unc", "test")
    with pytest.raises(RefSegDataError, match=r"grefs\(umd\).json .* does not exist"):
        load_split(gref["root"], "grefcoco", "umd", "train")
    with pytest.raises(RefSegDataError, match="gRefCOCO directory .* does not exist"):
        load_split(tmp_path / "nowhere", "grefcoco", "unc", "train")
    (gref["dataset_dir"] / "grefs(unc).json").write_text("[]")
    with pytest.raises(RefSegDataError, match=r"grefs\(unc\).json holds no refs; re-download it"):
        load_split(gref["root"], "grefcoco", "unc", "train")
    shutil.rmtree(gref["image_dir"])
    with pytest.raises(RefSegDataError, match="no image directory at .*train2014.*set data.image_dir"):
        load_split(gref["root"], "grefcoco", "unc", "train")
    with pytest.raises(ConfigError, match="grefcoco is split by 'unc' only"):
        validate_data(DataConfig(dataset="grefcoco", split_by="umd"))


# ----------------------------------------------------------------------------- rows and samples
def test_manifest_rows_without_a_mask_are_no_target(gref, tmp_path):
    records = load_split(gref["root"], "grefcoco", "unc", "train")
    for name in ("m.jsonl", "m.parquet"):
        path = write_manifest(records, tmp_path / name)
        back = read_manifest(path)
        assert [r.get("no_target", False) for r in back] == [r["no_target"] for r in records]
        assert [r["sentence"] for r in back] == [r["sentence"] for r in records]
        for r, want in zip(back, records):
            assert np.array_equal(decode_mask(r["segmentation"], *GREF_SIZE), decode_mask(want)), name
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [set(row) & {"mask", "no_target"} for row in rows if row["text"] == "a dog"] == [{"no_target"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": rows[0]["image"], "text": "x", "no_target": True, "mask": [[1, 1, 9, 1, 9, 9]]})
                   + "\n" + json.dumps({"image": rows[0]["image"], "text": "y", "no_target": True}) + "\n")
    report = SkipReport()
    back = read_manifest(bad, report=report)
    assert len(back) == 1 and back[0]["no_target"] and dict(report.counts) == {"invalid manifest row": 1}


def test_shards_carry_no_target_rows(gref, tmp_path):
    records = load_split(gref["root"], "grefcoco", "unc", "train")
    report = SkipReport()
    assert write_shards(records, tmp_path / "shards", report=report) == {"train": len(records)}
    assert report.total == 0
    table = pq.read_table(tmp_path / "shards" / "train")
    rows = table.to_pylist()
    assert [r["no_target"] for r in rows] == [r["no_target"] for r in records]
    empty = [r for r in rows if r["no_target"]]
    assert empty and all(not rle_area(r) for r in empty) and all(rle_area(r) for r in rows if not r["no_target"])
    # decoded from the columns an evaluation pipeline reads; a shard written before the column reads as False
    batch = {k: np.array(table.column(k).to_pylist(), dtype=object) for k in table.column_names
             if k not in ("ref_sent_ids", "ref_sentences")}
    out = decode_batch(batch, TOK, SampleOptions(SIZE, False, TOKENS, train=False))
    assert out["no_target"].tolist() == [float(r["no_target"]) for r in records]
    old = {k: v for k, v in batch.items() if k != "no_target"}
    old_out = decode_batch(old, TOK, SampleOptions(SIZE, False, TOKENS, train=False))  # empty masks: dropped
    assert old_out["no_target"].tolist() == [0.0] * (len(rows) - len(empty))


def rle_area(row: dict) -> int:
    return int(mask_utils.area({"size": [row["mask_h"], row["mask_w"]], "counts": row["mask_rle"].encode()}))


def test_decode_batch_has_a_no_target_column_kept_by_flips(gref):
    refs = [{**r, "sent_ids": [s["sent_id"] for s in r["sentences"]], "sentences": [s["sentence"] for s in r["sentences"]]}
            for r in load_split_refs(gref["root"], "grefcoco", "unc", "train")]
    table = refs_table(refs)
    assert table.column("no_target").to_pylist() == [False, False, False, False, True]
    batch = {k: np.array(table.column(k).to_pylist(), dtype=object) for k in table.column_names}
    out = decode_batch(batch, TOK, SampleOptions(SIZE, False, TOKENS, train=False))
    assert set(out) == set(COLUMNS) and out["no_target"].dtype == np.float32
    assert out["no_target"].tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert not out["mask"][out["no_target"] == 1].any() and out["mask"][out["no_target"] == 0].sum(axis=(1, 2)).all()
    flipped = decode_batch(batch, TOK, SampleOptions(SIZE, False, TOKENS, train=True, augment=True, hflip_prob=1.0))
    assert flipped["no_target"].tolist() == [0, 0, 0, 0, 1]
    assert not flipped["mask"][4].any() and flipped["mask"][:4].sum(axis=(1, 2)).all()
    empty = decode_batch({k: v[:0] for k, v in batch.items()}, TOK, SampleOptions(SIZE, False, TOKENS, train=False))
    assert set(empty) == set(COLUMNS) and empty["no_target"].shape == (0,)


# ----------------------------------------------------------------------------- the synthetic set
def test_checker_on_a_hand_made_scene():
    objs = [Obj("circle", "red", 10, 50, 300), Obj("circle", "blue", 90, 50, 300), Obj("square", "red", 20, 20, 300),
            Obj("square", "green", 30, 80, 300), Obj("square", "red", 85, 20, 300)]
    assert meant("all red shapes", objs, 100, 100) == [0, 2, 4]
    assert meant("both circles", objs, 100, 100) == [0, 1]
    assert meant("the two squares on the left", objs, 100, 100) == [2, 3]
    assert meant("the two lowest squares", objs, 100, 100) is None  # 20 vs 20: no clear gap to the third
    assert meant("both squares", objs, 100, 100) is None  # three squares
    assert meant("the purple star", objs, 100, 100) == []
    assert meant("the blue circle", objs, 100, 100) == [1]
    assert group_referents(Group(color="red", shape="square"), objs, 100, 100) == [2, 4]


def test_generalized_synthetic_set_is_verified_and_mixed(tmp_path):
    root = make_generalized_synthetic(tmp_path / "g", num_images=24, seed=3)
    instances = json.loads((root / "grefcoco" / "instances.json").read_text())
    cats = {c["id"]: c["name"] for c in instances["categories"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    scenes: dict[int, list[int]] = {}
    for a in instances["annotations"]:
        scenes.setdefault(a["image_id"], []).append(a["id"])
    kinds: Counter[str] = Counter()
    for split in SPLITS:
        report = SkipReport()
        for r in load_split(root, "grefcoco", "unc", split, report=report):
            ids = scenes[r["image_id"]]
            objs = [Obj(cats[anns[i]["category_id"]], anns[i]["color"], anns[i]["bbox"][0] + anns[i]["bbox"][2] / 2,
                        anns[i]["bbox"][1] + anns[i]["bbox"][3] / 2, anns[i]["area"]) for i in ids]
            assert [ids[k] for k in meant(r["sentence"], objs, r["width"], r["height"])] == r["ann_ids"], r["sentence"]
            mask = decode_mask(r)
            assert mask.sum() == sum(anns[i]["area"] for i in r["ann_ids"])  # disjoint shapes: areas add up
            kinds["none" if r["no_target"] else "one" if len(r["ann_ids"]) == 1 else "multi"] += 1
        assert report.total == 0
    marker = json.loads((root / ".complete").read_text())
    total = sum(marker["refs"].values())
    assert 0.5 < marker["refs"]["one"] / total < 0.7 and 0.12 < marker["refs"]["none"] / total < 0.3
    assert 0.1 < marker["refs"]["multi"] / total < 0.3 and min(kinds.values()) > 0
    assert sum(kinds.values()) == marker["sentences"]


def test_debug_config_keeps_the_synthetic_shapes_as_drawn(tmp_path):
    """The shape words name the drawn geometry ("square" vs "rectangle"); configs/debug_grefcoco.yaml must not
    squash an elongated scene's square into a rectangle on the way to the model (a plain resize does)."""
    data = load_config("configs/debug_grefcoco.yaml").data
    root = make_generalized_synthetic(tmp_path / "g", num_images=24, seed=3)
    cats = {c["id"]: c["name"] for c in json.loads((root / "grefcoco" / "instances.json").read_text())["categories"]}

    def aspect(m: np.ndarray) -> float:  # the mask's bounding-box width / height
        ys, xs = np.nonzero(m)
        return (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1)

    seen = 0
    for split in SPLITS:
        for r in load_split(root, "grefcoco", "unc", split):
            w, h = r["width"], r["height"]
            if len(r["ann_ids"]) != 1 or cats[r["category_id"]] not in ("square", "circle") or max(w, h) < 1.5 * min(w, h):
                continue
            seen += 1
            mask, blank = decode_mask(r), np.zeros((h, w, 3), np.uint8)
            _, shipped = preprocess(blank, mask, data.image_size, data.keep_aspect)
            _, plain = preprocess(blank, mask, data.image_size, keep_aspect=False)
            assert abs(aspect(shipped) - aspect(mask)) < 0.25, (r["sentence"], aspect(shipped), aspect(mask))
            assert abs(aspect(plain) - aspect(mask)) > 0.35  # what the setting prevents
    assert seen >= 3


def test_synth_cli_and_config_make_the_generalized_set(tmp_path, capsys):
    assert main(["synth", "--generalized", "--out", str(tmp_path / "cli"), "--images", "6"]) == 0
    assert "gRefCOCO-format" in capsys.readouterr().out
    assert (tmp_path / "cli" / "grefcoco" / "grefs(unc).json").is_file()
    assert (tmp_path / "cli" / "images" / "train2014").is_dir()
    cfg = DataConfig(root=str(tmp_path / "cfg"), dataset="grefcoco", synthetic=True, synthetic_images=6)
    refs = load_refs(cfg, "train")
    assert refs and {"no_target", "ann_ids"} <= set(refs[0]) and (tmp_path / "cfg" / ".complete").is_file()


def test_cache_rows_keep_the_flag(gref):
    from refseg.data.cache import cache_batch

    refs = [{**r, "sent_ids": [s["sent_id"] for s in r["sentences"]], "sentences": [s["sentence"] for s in r["sentences"]]}
            for r in load_split_refs(gref["root"], "grefcoco", "unc", "train")]
    table = refs_table(refs)
    batch = {k: np.array(table.column(k).to_pylist(), dtype=object) for k in table.column_names}
    opts = SampleOptions(SIZE, False, TOKENS, train=False)
    cached = cache_batch(batch, opts)
    assert cached["no_target"].tolist() == [False, False, False, False, True]
    out = decode_batch(cached, TOK, opts)
    assert out["no_target"].tolist() == [0, 0, 0, 0, 0, 1, 1] and not out["mask"][5:].any()


def test_ray_training_rows_from_shards_carry_no_target(ray_session, tmp_path):
    from refseg.data import build_dataset

    root = make_generalized_synthetic(tmp_path / "g", num_images=8, seed=1)
    records = load_split(root, "grefcoco", "unc", "train")
    no_target = {r["ref_id"]: float(r["no_target"]) for r in records}
    write_shards(records, tmp_path / "shards")
    cfg = DataConfig(source="parquet", parquet=str(tmp_path / "shards"), image_size=SIZE, max_tokens=TOKENS)
    rows = build_dataset(cfg, "train", train=True, tokenizer=TOK).take_all()  # ref-level rows: one per ref
    assert sorted(int(row["ref_id"]) for row in rows) == sorted(no_target) and 1.0 in no_target.values()
    for row in rows:
        assert row["no_target"] == no_target[int(row["ref_id"])]
        assert bool(row["mask"].any()) != bool(row["no_target"])
