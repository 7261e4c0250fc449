"""refseg.data.sources.manifest: user data (JSONL / Parquet, PNG / RLE / polygon masks) -> the same samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refseg.config import DataConfig
from refseg.config.presets import tiny
from refseg.data import (
    RefSegDataError,
    SkipReport,
    build_dataset,
    decode_mask,
    encode_rle,
    load_split,
    read_manifest,
    write_manifest,
)
from refseg.models import load_tokenizer

SIZE, TOKENS = 64, 12
TOK = load_tokenizer(tiny().text)


def png_records(records: list[dict], mask_dir: Path) -> list[dict]:
    """The records with their masks written as PNG files (255 = object) instead of polygons."""
    mask_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for r in records:
        path = mask_dir / f"ann{r['ann_id']}.png"
        if not path.exists():
            Image.fromarray(decode_mask(r) * 255).save(path)
        out.append({**r, "segmentation": None, "mask_path": str(path)})
    return out


def rle_records(records: list[dict]) -> list[dict]:
    return [{**r, "segmentation": encode_rle(decode_mask(r))} for r in records]


def samples(ds) -> dict:
    return {(int(r["ref_id"]), int(r["sent_id"])): r for r in ds.take_all()}


@pytest.fixture(scope="module")
def reference(ray_session, synthetic_root):
    cfg = DataConfig(root=str(synthetic_root), image_size=SIZE, max_tokens=TOKENS)
    return samples(build_dataset(cfg, "val", train=False, tokenizer=TOK))


@pytest.mark.parametrize("kind", ["png", "rle", "polygons"])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_manifest_yields_the_same_samples_as_refer_files(ray_session, synthetic_root, reference, tmp_path,
                                                          kind, fmt):
    records = load_split(synthetic_root, "refcoco", "unc", "val")
    if kind == "png":
        records = png_records(records, tmp_path / "masks")
    elif kind == "rle":
        records = rle_records(records)
    path = write_manifest(records, tmp_path / f"val.{fmt}")
    if fmt == "jsonl" and kind == "png":  # paths under the manifest's directory are stored relative
        first = json.loads(Path(path).read_text().splitlines()[0])
        assert first["mask"].startswith("masks/") and Path(first["image"]).is_absolute()
    back = read_manifest(path)
    assert [(r["ref_id"], r["sent_id"], r["sentence"]) for r in back] == \
           [(r["ref_id"], r["sent_id"], r["sentence"]) for r in records]
    cfg = DataConfig(source="manifest", manifest=str(path), image_size=SIZE, max_tokens=TOKENS)
    got = samples(build_dataset(cfg, "val", train=False, tokenizer=TOK))
    assert got.keys() == reference.keys()
    for key, row in got.items():
        for col in ("image", "mask", "input_ids", "attention_mask", "orig_h", "orig_w"):
            np.testing.assert_array_equal(row[col], reference[key][col], err_msg=f"{key} {col}")


def test_minimal_rows_get_ids_and_sizes(ray_session, synthetic_root, tmp_path):
    """Only image/text/mask given: every row is its own ref, sizes come from the image."""
    rec = load_split(synthetic_root, "refcoco", "unc", "val")[0]
    Image.fromarray(decode_mask(rec)).save(tmp_path / "m.png")  # values {0, 1}
    rows = [{"image": rec["image_path"], "text": "first", "mask": "m.png"},
            {"image": rec["image_path"], "text": "second", "mask": rec["segmentation"]}]
    (tmp_path / "my.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_manifest(tmp_path / "my.jsonl")
    assert [(r["ref_id"], r["sent_id"], r["image_id"]) for r in records] == [(0, 0, 0), (1, 1, 0)]
    assert records[0]["mask_path"] == str(tmp_path / "m.png") and records[1]["height"] is None
    cfg = DataConfig(source="manifest", manifest=str(tmp_path / "my.jsonl"), image_size=SIZE, max_tokens=TOKENS)
    out = build_dataset(cfg, "train", train=True, tokenizer=TOK).take_all()
    assert len(out) == 2
    np.testing.assert_array_equal(out[0]["mask"], out[1]["mask"])
    assert {int(r["orig_h"]) for r in out} == {rec["height"]}


def test_bad_rows_are_skipped_and_counted_with_line_numbers(ray_session, synthetic_root, tmp_path):
    good = load_split(synthetic_root, "refcoco", "unc", "val")[:3]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    lines = [json.dumps(r) for r in (json.loads(Path(write_manifest(good, tmp_path / "g.jsonl")).read_text()
                                                 .splitlines()[i]) for i in range(3))]
    base = {"image": good[0]["image_path"], "mask": good[0]["segmentation"], "ref_id": 900}
    lines += [
        "{not json",                                                          # line 4
        json.dumps({"image": good[0]["image_path"], "text": "no mask"}),      # line 5
        json.dumps({**base, "text": "   "}),                                  # line 6: empty sentence
        json.dumps({**base, "text": "a line", "mask": [[1, 1, 5, 5, 9, 9]]}),  # line 7: zero area
        json.dumps({**base, "text": "gone", "image": "missing.jpg"}),         # line 8: missing image
        json.dumps({**base, "text": "junk", "image": str(corrupt)}),          # line 9: found when decoding
    ]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    report = SkipReport()
    records = read_manifest(tmp_path / "bad.jsonl", report=report)
    assert [r["sentence"] for r in records] == [r["sentence"] for r in good] + ["junk"]
    assert report.counts == {"invalid manifest row": 1, "missing manifest field": 1, "empty sentence": 1,
                             "zero-area segmentation": 1, "missing image file": 1}
    assert "bad.jsonl line 4" in report.examples["invalid manifest row"][0]
    assert "line 8" in report.examples["missing image file"][0]

    tally = SkipReport()
    cfg = DataConfig(source="manifest", manifest=str(tmp_path / "bad.jsonl"), image_size=SIZE, max_tokens=TOKENS)
    out = build_dataset(cfg, "val", train=False, tokenizer=TOK, report=tally).take_all()
    assert sorted(int(r["sent_id"]) for r in out) == sorted(r["sent_id"] for r in good)
    assert tally.sync().counts["corrupt image"] == 1 and tally.counts["missing manifest field"] == 1


def test_split_field_and_split_placeholder(tmp_path, synthetic_root):
    records = load_split(synthetic_root, "refcoco", "unc", "val")[:4]
    mixed = [{**r, "split": "train" if i % 2 else "val"} for i, r in enumerate(records)]
    write_manifest(mixed, tmp_path / "all.jsonl")
    assert len(read_manifest(tmp_path / "all.jsonl", "val")) == 2
    assert len(read_manifest(tmp_path / "all.jsonl")) == 4
    write_manifest([{**r, "split": None} for r in records[:3]], tmp_path / "val.jsonl")
    got = read_manifest(str(tmp_path / "{split}.jsonl"), "val")
    assert len(got) == 3 and {r["split"] for r in got} == {"val"}
    with pytest.raises(RefSegDataError, match="does not exist"):
        read_manifest(str(tmp_path / "{split}.jsonl"), "testA")


def test_manifest_to_shards(ray_session, synthetic_root, tmp_path, reference):
    """A manifest with PNG masks -> Parquet shards -> the same samples again."""
    from refseg.data import write_shards

    records = png_records(load_split(synthetic_root, "refcoco", "unc", "val"), tmp_path / "masks")
    path = write_manifest(records, tmp_path / "val.jsonl")
    assert write_shards(path, tmp_path / "shards") == {"val": len(records)}
    cfg = DataConfig(source="parquet", parquet=str(tmp_path / "shards"), image_size=SIZE, max_tokens=TOKENS)
    got = samples(build_dataset(cfg, "val", train=False, tokenizer=TOK))
    assert got.keys() == reference.keys()
    for key, row in got.items():
        np.testing.assert_array_equal(row["mask"], reference[key]["mask"])
        np.testing.assert_array_equal(row["image"], reference[key]["image"])
