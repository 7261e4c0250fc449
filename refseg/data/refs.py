"""Ref rows: what the Ray Data pipeline reads before decoding, one row per referred object.

    refs = load_refs(cfg.data, "val", report)      # [{ref_id, image_path, segmentation, sent_ids, sentences, ...}]
    refs = cap_refs(refs, 100, train=False)        # at most 100 samples, the same ones every run
    table = refs_table(refs)                       # pyarrow.Table, the columns decode_batch reads

A ref groups the records (one per sentence) of one object: its image, its mask and every sentence
naming it. ``data.shuffle_expressions`` (the control run) gives every ref the sentences of another
ref (:func:`derangement`), fixed per seed.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa

from refseg.config import DataConfig
from refseg.config.validate import validate_data
from refseg.data.skips import RefSegDataError, SkipReport
from refseg.data.sources import grefcoco
from refseg.data.sources.manifest import read_manifest
from refseg.data.sources.refer import load_split_refs
from refseg.data.sources.synthetic import ensure_synthetic
from refseg.data.sources.synthetic_generalized import ensure_generalized_synthetic


def derangement(n: int, seed: int) -> np.ndarray:
    """A permutation with no fixed point (Sattolo's cycle), fixed per seed; needs n >= 2."""
    if n < 2:
        raise RefSegDataError(f"shuffle_expressions needs at least 2 refs, the split has {n}")
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(i))  # 0 <= j < i
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def group_refs(records: list[dict]) -> list[dict]:
    """Records (one per sentence) -> ref dicts with ``sent_ids`` / ``sentences`` lists (first-seen order)."""
    refs: dict[int, dict] = {}
    for r in records:
        ref = refs.get(r["ref_id"])
        if ref is None:
            ref = refs[r["ref_id"]] = {**r, "sent_ids": [], "sentences": []}
        ref["sent_ids"].append(int(r["sent_id"]))
        ref["sentences"].append(r["sentence"])
    return list(refs.values())


def shuffled_texts(texts: dict[int, list], seed: int) -> dict[int, list]:
    """ref_id -> the (sent_id, sentence) list of another ref (a derangement over refs)."""
    ids = sorted(texts)
    perm = derangement(len(ids), seed)
    return {ids[i]: texts[ids[int(perm[i])]] for i in range(len(ids))}


def shuffle_ref_texts(refs: list[dict], seed: int) -> list[dict]:
    """The refs with every ref's sentences replaced by another ref's (data.shuffle_expressions)."""
    new = shuffled_texts({int(r["ref_id"]): list(zip(r["sent_ids"], r["sentences"])) for r in refs}, seed)
    return [{**r, "sent_ids": [s for s, _ in new[r["ref_id"]]], "sentences": [t for _, t in new[r["ref_id"]]]}
            for r in refs]


def cap_refs(refs: list[dict], max_samples: int | None, train: bool) -> list[dict]:
    """At most ``max_samples`` samples: refs for training, sentences for evaluation."""
    if max_samples is None:
        return refs
    if train:
        return refs[:max_samples]
    out, left = [], max_samples
    for ref in refs:
        if left <= 0:
            break
        out.append({**ref, "sent_ids": ref["sent_ids"][:left], "sentences": ref["sentences"][:left]})
        left -= len(out[-1]["sent_ids"])
    return out


def refs_table(refs: list[dict]) -> pa.Table:
    """Ref dicts -> a pyarrow Table with the columns :func:`refseg.data.samples.decode_batch` reads
    (the segmentation travels as a JSON string, ``seg_json``; ``no_target`` is False for classic refs)."""
    def ints(key: str, default: int = -1) -> pa.Array:
        return pa.array([default if r.get(key) is None else int(r[key]) for r in refs], pa.int64())

    segs = [json.dumps(r["segmentation"]) if r.get("segmentation") is not None else "" for r in refs]
    return pa.table({
        "ref_id": ints("ref_id"), "ann_id": ints("ann_id"), "image_id": ints("image_id"),
        "image_path": pa.array([str(r["image_path"]) for r in refs], pa.string()),
        "seg_json": pa.array(segs, pa.string()),
        "mask_path": pa.array([r.get("mask_path") or "" for r in refs], pa.string()),
        "height": ints("height"), "width": ints("width"),
        "sent_ids": pa.array([r["sent_ids"] for r in refs], pa.list_(pa.int64())),
        "sentences": pa.array([r["sentences"] for r in refs], pa.list_(pa.string())),
        "no_target": pa.array([bool(r.get("no_target", False)) for r in refs], pa.bool_()),
    })


def ensure_synthetic_data(data_cfg: DataConfig) -> None:
    """With ``data.synthetic``: write the synthetic set of ``data.dataset`` (the generalized one for
    grefcoco) at ``data.root`` unless its refs file is there (a real set at root is never touched)."""
    if not data_cfg.synthetic or data_cfg.source != "refer":
        return
    root = os.path.expanduser(data_cfg.root)
    if data_cfg.dataset == grefcoco.DATASET:
        if not os.path.exists(os.path.join(root, grefcoco.DATASET, f"grefs({data_cfg.split_by}).json")):
            ensure_generalized_synthetic(data_cfg.root, data_cfg.synthetic_images, data_cfg.synthetic_seed)
    elif not os.path.exists(os.path.join(root, data_cfg.dataset, f"refs({data_cfg.split_by}).p")):
        ensure_synthetic(data_cfg.root, data_cfg.synthetic_images, data_cfg.synthetic_seed)


def load_refs(data_cfg: DataConfig, split: str, report: SkipReport | None = None) -> list[dict]:
    """The usable refs of ``split`` from the refer files (gRefCOCO too) or the manifest (listing-time
    skips -> report)."""
    validate_data(data_cfg)
    if data_cfg.source == "refer":
        ensure_synthetic_data(data_cfg)
        refs = load_split_refs(data_cfg.root, data_cfg.dataset, data_cfg.split_by, split,
                               image_dir=data_cfg.image_dir, report=report)
        return [{**r, "sent_ids": [s["sent_id"] for s in r["sentences"]],
                 "sentences": [s["sentence"] for s in r["sentences"]]} for r in refs]
    if data_cfg.source == "manifest":
        return group_refs(read_manifest(data_cfg.manifest, split, report=report))
    raise RefSegDataError("load_refs reads refer or manifest data, not data.source 'parquet'; "
                          "read Parquet shards with build_dataset or count_refs")
