"""Decode once, iterate many times: the ``data.cache`` stage of :func:`refseg.data.build_dataset`.

    cached = ds.map_batches(cache_batch, fn_args=(opts, report.collector())).materialize()  # once per run
    samples = cached.map_batches(decode_batch, ...)  # every epoch: sentence draw, augment, tokenise
    # training: each worker keeps its shard of `cached` in memory and samples it itself (ShardCache)

:func:`cache_batch` turns ref rows into cache rows: the decoded pixels and mask, the original size,
the ref's usable sentences (the shuffle_expressions override already applied) and its ``no_target``
flag. Bad samples are dropped and counted here, once per run instead of once per epoch. Without augmentation (evaluation)
the pixels are the content resized to the model's geometry (``resize_geometry``: bilinear image,
nearest mask), so ``preprocess`` only lays the pixels out channel-first and pads, and the samples are bit-identical to the
uncached path. Augmented training keeps the original pixels: augmentation and resizing then run
exactly as when streaming (augmenting the already-resized content loses small objects' edges).

Memory: 4 bytes per pixel per ref (S x S, or the original size for augmented training) in the object
store -- RefCOCO's train split would need ~40 GB, so the option is off by default and checked against
the store.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from refseg.data.samples import (
    SampleOptions,
    decode_batch,
    fast_tokenizer,
    is_no_target,
    load_sample,
    usable_texts,
)
from refseg.data.skips import RefSegDataError, SkipReport, SkipSample
from refseg.data.transforms import resize_geometry, resize_to


def cache_bytes(num_refs: int, size: int, original_pixels: float | None = None) -> float:
    """Object-store bytes of the cache rows: image (3 B/px) + mask (1 B/px) per ref, at S x S or, for
    augmented training, at the original resolution (``original_pixels`` = their sum when known)."""
    return 4 * (original_pixels if original_pixels is not None else num_refs * size * size)


def check_fits(need_bytes: float, store_bytes: float, what: str) -> None:
    """Raise RefSegDataError when the cache would take over half the object store."""
    if need_bytes > 0.5 * store_bytes:
        raise RefSegDataError(
            f"data.cache=true would keep {need_bytes / 2**30:.1f} GiB of decoded {what} samples in the Ray object "
            f"store, which has {store_bytes / 2**30:.1f} GiB; set data.cache=false (stream and decode every "
            f"epoch) or lower data.image_size")


def keeps_original(opts: SampleOptions) -> bool:
    """Augmented training caches the original pixels: augmentation then runs exactly as when streaming."""
    return opts.train and opts.augment


def cache_batch(batch: dict, opts: SampleOptions, collector: Any = None) -> dict:
    """Ref rows -> cache rows (see the module doc); dropped samples are counted in ``collector``
    (:meth:`refseg.data.skips.SkipReport.collector`) when given."""
    size, dropped, original = opts.image_size, SkipReport(), keeps_original(opts)
    rows: dict[str, list] = {k: [] for k in ("ref_id", "sent_ids", "sentences", "orig_h", "orig_w", "pixels", "pixel_mask",
                                             "no_target")}
    for i in range(len(batch["ref_id"])):
        ref_id = int(batch["ref_id"][i])
        good = usable_texts(batch, i, opts, dropped)
        if not good:
            continue
        try:
            image, mask, (oh, ow) = load_sample(batch, i, opts)
        except SkipSample as e:
            dropped.add(e.reason, e.detail, 1 if opts.train else len(good))
            continue
        if not original:  # the content at the model's geometry: preprocess then only lays out and pads
            rh, rw = resize_geometry(oh, ow, size, opts.keep_aspect)
            image, mask = resize_to(image, rh, rw, Image.BILINEAR), resize_to(mask, rh, rw, Image.NEAREST)
        for key, value in (("ref_id", ref_id), ("sent_ids", [s for s, _ in good]),
                           ("sentences", [t for _, t in good]), ("orig_h", oh), ("orig_w", ow),
                           ("pixels", np.ascontiguousarray(image)), ("pixel_mask", np.ascontiguousarray(mask)),
                           ("no_target", is_no_target(batch, i))):
            rows[key].append(value)
    dropped.send(collector)
    n = len(rows["ref_id"])
    out: dict[str, np.ndarray] = {k: np.asarray(rows[k], np.int64).reshape(n) for k in ("ref_id", "orig_h", "orig_w")}
    out["no_target"] = np.asarray(rows["no_target"], bool).reshape(n)
    for key in ("sent_ids", "sentences", "pixels", "pixel_mask"):  # lists / arrays of varying shape
        out[key] = _objects(rows[key])
    return out


def _objects(values: Any) -> np.ndarray:
    """A 1-D object array with one entry per row (a list, or an array of any shape)."""
    col = np.empty(len(values), dtype=object)
    for j, v in enumerate(values):
        col[j] = v
    return col


class ShardCache:
    """Training with ``data.cache``: this worker's cache rows, pulled once from its Ray Data shard and
    kept in process memory; every epoch draws a new row order, sentences and augmentation in-process.

        cache = ShardCache(shard.iter_batches(batch_format="numpy"), tokenizer, sample_opts(cfg.data, True))
        for batch in cache.epoch(batch_size=16):  # the COLUMNS of decode_batch, like a streamed batch
            ...

    Why not stream the cached set every epoch: each streamed epoch starts a Ray Data execution whose map
    tasks, split coordinator and prefetch threads compete with the training processes for the CPU.
    ``tokenizer``: a loaded tokenizer or a TokenizerSpec."""

    def __init__(self, batches: Any, tokenizer: Any, opts: SampleOptions) -> None:
        parts = [b for b in batches if len(b["ref_id"])]
        # Ray Data hands equal-shaped images as one ndarray and ragged ones as an object array
        self.rows = {k: np.concatenate([p[k] if p[k].ndim == 1 else _objects(p[k]) for p in parts])
                     for k in parts[0]} if parts else {}
        self.tokenizer, self.opts = fast_tokenizer(tokenizer), opts
        self.rng = np.random.default_rng()  # OS entropy, like the streamed path's per-epoch draws

    def __len__(self) -> int:
        return len(self.rows["ref_id"]) if self.rows else 0

    def epoch(self, batch_size: int, num_batches: int | None = None) -> Any:
        """Yield ``num_batches`` (default: all full) batches of ``batch_size`` samples in a new order."""
        order = self.rng.permutation(len(self))
        full = len(self) // batch_size
        for b in range(full if num_batches is None else min(num_batches, full)):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield decode_batch({k: v[idx] for k, v in self.rows.items()}, self.tokenizer, self.opts)

    def every_sentence(self, batch_size: int) -> Any:
        """Every sentence of every row without augmentation (evaluation samples: the rows in their
        order, ``batch_size`` rows per batch)."""
        opts = dataclasses.replace(self.opts, train=False, augment=False)
        for start in range(0, len(self), batch_size):
            yield decode_batch({k: v[start:start + batch_size] for k, v in self.rows.items()}, self.tokenizer, opts)


class KeptBatches:
    """An evaluation stream that is decoded once and replayed: the first complete pass over
    ``make_batches()`` keeps its batches (copied out of the object store) while they total at most
    ``limit_bytes``; later passes replay them without starting a Ray Data execution. Evaluation
    samples carry no randomness (every sentence, no augmentation), so each pass is the same batches.
    Over the limit, every pass streams.

        val = KeptBatches(lambda: shard.iter_batches(batch_size=32, batch_format="numpy"), 2**30)
        for batch in val: ...  # epoch 2: streamed and kept; epoch 4, 6, ...: replayed

    Used for validation during training, where starting a streamed execution and its map tasks costs
    more than the forward pass on small splits. RefCOCO's val split at 480 px (~3.7 MB per decoded
    sample) is far over any sensible limit and keeps streaming."""

    def __init__(self, make_batches: Any, limit_bytes: float) -> None:
        self.make_batches, self.limit = make_batches, limit_bytes
        self.kept: list[dict] | None = None

    def __iter__(self) -> Any:
        if self.kept is not None:
            yield from self.kept
            return
        kept: list[dict] | None = []
        size = 0
        for batch in self.make_batches():
            if kept is not None:
                size += sum(getattr(v, "nbytes", 0) for v in batch.values())
                if size <= self.limit:
                    kept.append({k: np.array(v) for k, v in batch.items()})
                else:
                    kept = None
            yield batch
        self.kept = kept
