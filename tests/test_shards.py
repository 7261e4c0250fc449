"""refseg.data.sources.shards: Parquet round trip, atomic rewrites, `prepare`, training/eval from shards."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from refseg.config import DataConfig
from refseg.config.presets import tiny
from refseg.data import (
    SkipReport,
    build_dataset,
    decode_mask,
    load_image,
    load_split,
    load_split_refs,
    prepare,
    write_shards,
)
from refseg.data.sources.shards import SCHEMA
from refseg.models import load_tokenizer

SIZE, TOKENS = 64, 12
TOK = load_tokenizer(tiny().text)


@pytest.fixture(scope="module")
def shards(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    counts = prepare(synthetic_root, "refcoco", "unc", f"file://{out}", rows_per_shard=40)
    want = {s: len(load_split(synthetic_root, "refcoco", "unc", s)) for s in ("train", "val", "testA", "testB")}
    assert counts == want
    assert json.loads((out / "_prepare.json").read_text())["counts"] == want
    return out


def read_rows(split_dir: Path) -> list[dict]:
    return [row for f in sorted(split_dir.glob("part-*.parquet")) for row in pq.read_table(f).to_pylist()]


def test_parquet_round_trip_returns_identical_samples(synthetic_root, shards):
    records = load_split(synthetic_root, "refcoco", "unc", "val")
    rows = {(r["ref_id"], r["sent_id"]): r for r in read_rows(shards / "val")}
    assert len(rows) == len(records)
    for rec in records:
        row = rows[(rec["ref_id"], rec["sent_id"])]
        assert row["image_bytes"] == Path(rec["image_path"]).read_bytes()  # the original file
        np.testing.assert_array_equal(load_image(row["image_bytes"]), load_image(rec["image_path"]))
        rle = {"size": [row["mask_h"], row["mask_w"]], "counts": row["mask_rle"]}
        np.testing.assert_array_equal(decode_mask(rle), decode_mask(rec))
        assert row["sentence"] == rec["sentence"] and row["split"] == "val"
        for key in ("ann_id", "image_id", "category_id", "height", "width"):
            assert row[key] == rec[key], key


def test_shard_files_keep_refs_whole_and_rewrites_replace_parts(synthetic_root, tmp_path):
    records = load_split(synthetic_root, "refcoco", "unc", "train")
    assert write_shards(records, tmp_path, rows_per_shard=10) == {"train": len(records)}
    files = sorted((tmp_path / "train").glob("part-*.parquet"))
    assert len(files) > 5
    seen = Counter()
    for f in files:
        table = pq.read_table(f)
        assert table.schema.equals(SCHEMA)
        for ref_id in set(table.column("ref_id").to_pylist()):
            seen[ref_id] += 1
    assert set(seen.values()) == {1}  # every ref lives in exactly one file
    write_shards(records, tmp_path, rows_per_shard=10_000)  # a smaller run replaces the larger one
    assert [p.name for p in (tmp_path / "train").iterdir()] == ["part-00000.parquet"]  # no stale/tmp files
    assert len(read_rows(tmp_path / "train")) == len(records)


def test_write_shards_skips_unusable_samples(tmp_path):
    from refer_fixtures import write_refer_set

    write_refer_set(tmp_path / "set", images=6, splits=("train",))
    records = load_split(tmp_path / "set", "refcoco", "unc", "train")
    bad_image = records[0]["image_path"]
    Path(bad_image).write_bytes(b"not an image")
    gone = next(r for r in records if r["image_path"] != bad_image)
    Path(gone["image_path"]).unlink()
    line = {**records[-1], "ref_id": 999, "segmentation": [[1.0, 1.0, 5.0, 5.0, 9.0, 9.0]]}
    report = SkipReport()
    counts = write_shards(records + [line], tmp_path / "out", report=report)
    lost = Counter(r["image_path"] for r in records)
    assert counts["train"] == len(records) - lost[bad_image] - lost[gone["image_path"]]
    assert report.counts == {"corrupt image": lost[bad_image], "missing image file": lost[gone["image_path"]],
                             "zero-area segmentation": 1}


def cfg(shards: Path, **kw) -> DataConfig:
    return DataConfig(source="parquet", parquet=str(shards), image_size=SIZE, max_tokens=TOKENS, **kw)


def test_dataset_from_shards_equals_dataset_from_refer_files(ray_session, synthetic_root, shards):
    refer = DataConfig(root=str(synthetic_root), image_size=SIZE, max_tokens=TOKENS)
    want = {(int(r["ref_id"]), int(r["sent_id"])): r
            for r in build_dataset(refer, "val", train=False, tokenizer=TOK).take_all()}
    got = build_dataset(cfg(shards), "val", train=False, tokenizer=TOK).take_all()
    assert len(got) == len(want)
    for row in got:
        ref = want[(int(row["ref_id"]), int(row["sent_id"]))]
        for key in ("image", "mask", "input_ids", "attention_mask", "orig_h", "orig_w"):
            np.testing.assert_array_equal(row[key], ref[key], err_msg=key)


def test_training_from_shards_draws_one_sentence_per_ref(ray_session, synthetic_root, shards):
    refs = {r["ref_id"]: {s["sent_id"] for s in r["sentences"]}
            for r in load_split_refs(synthetic_root, "refcoco", "unc", "train")}
    ds = build_dataset(cfg(shards), "train", train=True, tokenizer=TOK)
    epochs = []
    for _ in range(2):
        rows = [(int(r), int(s)) for b in ds.iter_batches(batch_format="numpy") for r, s in zip(b["ref_id"], b["sent_id"])]
        assert sorted(r for r, _ in rows) == sorted(refs)  # one row per ref
        assert all(s in refs[r] for r, s in rows)
        epochs.append(dict(rows))
    assert epochs[0] != epochs[1]  # a fresh draw every epoch
    assert build_dataset(cfg(shards, max_samples=5), "train", train=True, tokenizer=TOK).count() == 5
    capped = [build_dataset(cfg(shards, max_samples=5), "val", train=False, tokenizer=TOK) for _ in range(2)]
    keys = [sorted((int(r["ref_id"]), int(r["sent_id"])) for r in ds.take_all()) for ds in capped]
    assert len(keys[0]) == 5 and keys[0] == keys[1]  # the same 5 samples every time


def test_shards_with_only_the_documented_columns_still_work(ray_session, synthetic_root, shards, tmp_path):
    """Shards made by another tool (no ref_sentences / sent_index) fall back to a group-by on ref_id."""
    for split in ("train",):
        (tmp_path / split).mkdir()
        for f in sorted((shards / split).glob("part-*.parquet")):
            table = pq.read_table(f).drop_columns(["sent_index", "ref_sent_ids", "ref_sentences"])
            pq.write_table(table, tmp_path / split / f.name)
    refs = load_split_refs(synthetic_root, "refcoco", "unc", "train")
    train = build_dataset(cfg(tmp_path), "train", train=True, tokenizer=TOK).take_all()
    assert sorted(int(r["ref_id"]) for r in train) == sorted(r["ref_id"] for r in refs)
    n_eval = build_dataset(cfg(tmp_path), "train", train=False, tokenizer=TOK).count()
    assert n_eval == sum(len(r["sentences"]) for r in refs)


def test_shuffle_expressions_from_shards(ray_session, synthetic_root, shards):
    own = {r["ref_id"]: {s["sent_id"] for s in r["sentences"]}
           for r in load_split_refs(synthetic_root, "refcoco", "unc", "val")}
    rows = build_dataset(cfg(shards, shuffle_expressions=True), "val", train=False, tokenizer=TOK).take_all()
    assert len(rows) == sum(len(v) for v in own.values())
    assert all(int(r["sent_id"]) not in own[int(r["ref_id"])] for r in rows)


def test_missing_shards_raise_one_clear_error(ray_session, tmp_path):
    from refseg.data import RefSegDataError

    with pytest.raises(RefSegDataError, match="refseg prepare"):
        build_dataset(cfg(tmp_path), "val", train=False, tokenizer=TOK)


@pytest.mark.parametrize("source", ["refer", "parquet"])
def test_eval_shards_are_disjoint_and_cover_every_sample(ray_session, synthetic_root, shards, source):
    """build_dataset(shard=(r, n)) for r < n splits an evaluation split exactly (max_samples applied first)."""
    from refseg.data import count_refs

    base = cfg(shards) if source == "parquet" else DataConfig(root=str(synthetic_root), image_size=SIZE,
                                                              max_tokens=TOKENS)
    for max_samples in (None, 9):
        data = dataclasses.replace(base, max_samples=max_samples)
        full = build_dataset(data, "val", train=False, tokenizer=TOK).take_all()
        parts = [build_dataset(data, "val", train=False, tokenizer=TOK, shard=(r, 3)).take_all()
                 for r in range(3)]
        keys = [(int(x["ref_id"]), int(x["sent_id"])) for part in parts for x in part]
        assert len(keys) == len(set(keys)) and sorted(keys) == sorted((int(x["ref_id"]), int(x["sent_id"])) for x in full)
        assert all(int(x["ref_id"]) % 3 == r for r, part in enumerate(parts) for x in part)
    empty = build_dataset(base, "val", train=False, tokenizer=TOK, shard=(999_999, 1_000_000))
    assert empty.take_all() == []
    refs = load_split_refs(synthetic_root, "refcoco", "unc", "train")
    assert count_refs(base, "train") == len(refs)
    assert count_refs(dataclasses.replace(base, max_samples=7), "train") == 7


def test_cache_size_from_shards_matches_the_cache_it_builds(ray_session, shards):
    """data.cache from shards: the object-store check sizes the cache from the light columns (ref_id,
    height, width) without reading image bytes, and gets the numbers of the cache it then builds."""
    from refseg.data.pipeline import parquet_cache_size

    train = build_dataset(cfg(shards, cache=True, augment=True), "train", train=True, tokenizer=TOK,
                          cache_rows=True).take_all()
    n, pixels = parquet_cache_size(str(shards / "train"), None, True, None, True)
    assert n == len(train) > 0
    assert pixels == sum(int(r["orig_h"]) * int(r["orig_w"]) for r in train)  # augmented: original pixels
    for shard in [(0, 2), (1, 2)]:
        part = build_dataset(cfg(shards, cache=True), "val", train=False, tokenizer=TOK, shard=shard,
                             cache_rows=True).take_all()
        assert parquet_cache_size(str(shards / "val"), shard, False, None, False) == (len(part), None)
