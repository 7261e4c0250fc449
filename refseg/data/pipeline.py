"""Ray Data pipelines: refer files, Parquet shards or a manifest -> decoded, tokenised batches.

    report = SkipReport()
    train = build_dataset(cfg.data, "train", train=True, tokenizer=tokenizer, report=report)
    for batch in train.iter_torch_batches(batch_size=16):
        batch["image"]  # (B, 3, S, S) uint8 pixels (refseg.data.transforms.normalize_images on the device)
        batch["mask"]   # (B, S, S) uint8 {0, 1}; input_ids / attention_mask (B, L) int64
    print(report.summary())  # samples skipped while listing and inside the Ray tasks

Rows before decoding are one per ref (its image, mask and list of sentences), in small blocks.
Decoding, augmentation, resizing and tokenisation (:func:`refseg.data.samples.decode_batch`) run
inside Ray Data (``map_batches``, NumPy batches): a training epoch draws ONE sentence per ref with
fresh randomness each time the dataset is iterated (LAVT); evaluation emits every sentence of the
ref. Bad samples are dropped inside the map, logged and counted in the report's Ray actor.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.expressions import col

from refseg.config import DataConfig
from refseg.config.validate import validate_data
from refseg.data.cache import cache_batch, cache_bytes, check_fits, keeps_original
from refseg.data.refs import cap_refs, load_refs, refs_table, shuffle_ref_texts, shuffled_texts
from refseg.data.samples import (
    SampleOptions,
    decode_batch,
    fast_tokenizer,
    sample_opts,
    tokenizer_spec,
    without_override,
)
from refseg.data.skips import RefSegDataError, SkipReport
from refseg.io import filesystem_and_path, is_uri

PARQUET_REF_COLUMNS = ["ref_id", "image_bytes", "mask_rle", "mask_h", "mask_w", "height", "width",
                       "ref_sent_ids", "ref_sentences", "sent_index"]
CacheSize = Callable[[bool], tuple[int, float | None]]  # original pixels? -> (rows, their pixels or None)


# ----------------------------------------------------------------------------- Parquet shards
def shards_path(data_cfg: DataConfig, split: str) -> str:
    """``<data.parquet>/<split>``: a URI, or an absolute local path."""
    if is_uri(data_cfg.parquet):
        return posixpath.join(data_cfg.parquet, split)
    return os.path.join(os.path.abspath(os.path.expanduser(data_cfg.parquet)), split)


def _light_table(path: str, columns: list[str]) -> pa.Table:
    """Only ``columns`` of every shard of ``path`` (never the image bytes)."""
    import pyarrow.dataset as pads

    fs, inner = filesystem_and_path(path)
    return pads.dataset(inner, filesystem=fs, format="parquet").to_table(columns=columns)


def _parquet_texts(path: str) -> dict[int, list]:
    """ref_id -> [(sent_id, sentence)] read from the light columns of a shard directory."""
    table = _light_table(path, ["ref_id", "sent_id", "sentence"])
    texts: dict[int, list] = {}
    for ref_id, sent_id, text in zip(*(table.column(c).to_pylist() for c in ("ref_id", "sent_id", "sentence"))):
        texts.setdefault(int(ref_id), []).append((int(sent_id), text))
    return texts


def _collapse_refs(group: pa.Table) -> pa.Table:
    """map_groups: all rows of one ref -> its first row plus ``ref_sent_ids`` / ``ref_sentences``."""
    first = group.slice(0, 1).drop_columns([c for c in ("sent_id", "sentence") if c in group.column_names])
    first = first.append_column("ref_sent_ids", pa.array([group.column("sent_id").to_pylist()], pa.list_(pa.int64())))
    return first.append_column("ref_sentences", pa.array([group.column("sentence").to_pylist()], pa.list_(pa.string())))


def _parquet_dataset(path: str, ref_level: bool, shuffle_seed: int | None, num_cpus: float = 1.0
                     ) -> ray.data.Dataset:
    """Shards of one split: ref rows (first row of each ref) or one row per sentence.

    ``shuffle_seed``: read the files in a new random order every execution (epoch), seeded."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fs, inner = filesystem_and_path(path)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        raise RefSegDataError(f"Parquet shards {path} do not exist; write them with `refseg prepare --out ...`")
    names = pads.dataset(inner, filesystem=fs, format="parquet").schema.names
    base = [c for c in ("ref_id", "image_bytes", "mask_rle", "mask_h", "mask_w", "height", "width", "no_target")
            if c in names]  # shards written before gRefCOCO have no no_target column: read as False
    shuffle = None
    if shuffle_seed is not None:
        shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    ds = ray.data.read_parquet(inner, filesystem=fs, shuffle=shuffle, num_cpus=num_cpus)
    if "ref_sentences" in names:  # written by write_shards: the first row of a ref lists all its sentences
        if not ref_level:
            return ds.select_columns(base + ["sent_id", "sentence"])
        ref_columns = PARQUET_REF_COLUMNS + [c for c in ("no_target",) if c in names]
        return ds.select_columns(ref_columns).filter(expr=col("sent_index") == 0)  # pushed into the read
    ds = ds.select_columns(base + ["sent_id", "sentence"])
    return ds.groupby("ref_id").map_groups(_collapse_refs, batch_format="pyarrow") if ref_level else ds


def _cap_parquet(ds: ray.data.Dataset, texts: dict[int, list], n: int, train: bool, ref_level: bool
                 ) -> tuple[ray.data.Dataset, dict[int, list]]:
    """The first ``n`` samples (file order, same every run): a filter pushed into the read."""
    refs = [{"ref_id": r, "sent_ids": [s for s, _ in v], "sentences": [t for _, t in v]} for r, v in texts.items()]
    kept = cap_refs(refs, n, train)
    if ref_level:
        ds = ds.filter(expr=col("ref_id").is_in([r["ref_id"] for r in kept]))
    else:
        ds = ds.filter(expr=col("sent_id").is_in([s for r in kept for s in r["sent_ids"]]))
    return ds, {r["ref_id"]: list(zip(r["sent_ids"], r["sentences"])) for r in kept}


def parquet_cache_size(path: str, shard: tuple[int, int] | None, ref_level: bool, refs: set[int] | None,
                       original: bool) -> tuple[int, float | None]:
    """(rows data.cache will hold, their original pixels when ``original`` and the shards have
    height/width) from the light columns alone: ``ds.count()`` would read every shard's image bytes.
    ``refs``: the refs a max_samples cap keeps (an upper bound for a sentence-level cap)."""
    import pyarrow.dataset as pads

    fs, inner = filesystem_and_path(path)
    files = pads.dataset(inner, filesystem=fs, format="parquet")
    sized = original and {"height", "width"} <= set(files.schema.names)
    table = files.to_table(columns=["ref_id", "height", "width"] if sized else ["ref_id"])
    ids = table.column("ref_id").to_numpy()
    keep = np.ones(len(ids), bool)
    if shard is not None:
        keep &= ids % shard[1] == shard[0]
    if refs is not None:
        keep &= np.isin(ids, np.fromiter(refs, np.int64, len(refs)))
    idx = np.flatnonzero(keep)
    if ref_level:  # one cache row per ref
        idx = idx[np.unique(ids[idx], return_index=True)[1]]
    if not sized:
        return len(idx), None
    h, w = (table.column(c).to_numpy()[idx].astype(np.int64) for c in ("height", "width"))
    return len(idx), float((h * w).sum())


# ----------------------------------------------------------------------------- ref rows as a dataset
def _default_workers() -> int | None:
    """At most one concurrent map task per cluster CPU (None before ray.init: Ray Data decides).

    More tasks than CPUs (map_cpus < 1) would mean more worker processes than Ray's idle-worker soft
    limit (one per CPU): idle ones are then killed and restarted all the time."""
    if not ray.is_initialized():
        return None
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def refs_per_map_task(image_size: int, train: bool = True, num_refs: int | None = None,
                      workers: int | None = None, fixed: int | None = None) -> int:
    """Refs per map task (= per input block): ``fixed`` (data.map_batch_rows) when set, else ~96 MB of
    decoded uint8 output (3 bytes of image + 1 of mask per pixel), 8..256 refs.

    Between two tasks on a worker Ray Data's streaming executor leaves ~0.15-0.2 s idle (it notices a
    finished task at its next 0.1 s ``ray.wait`` poll and only then submits the next one,
    ray-project/ray#42377), so tasks hold as much work as that memory allows: 26-ref tasks at 480 px kept
    the map workers busy ~60 % of the time (BENCHMARKS.md, "Data pipeline", session 14). Evaluation
    emits ~3 samples per ref; small splits are cut into at least two tasks per worker so every CPU gets
    work."""
    if fixed is not None:
        return fixed
    per_sample = image_size * image_size * 4 * (1 if train else 3)
    rows = int(max(8, min(256, 96e6 // per_sample)))
    if num_refs is not None:
        rows = min(rows, max(1, -(-num_refs // (2 * (workers or 2)))))
    return rows


def _parquet_rows(data_cfg: DataConfig, split: str, train: bool, seed: int, shard: tuple[int, int] | None
                  ) -> tuple[ray.data.Dataset, dict | None, CacheSize]:
    """(ref rows read from the shards, the sentence override or None, the data.cache size)."""
    path = shards_path(data_cfg, split)
    ref_level = train or data_cfg.shuffle_expressions
    capped: set[int] | None = None
    override = None
    ds = _parquet_dataset(path, ref_level, seed if train else None, data_cfg.map_cpus)
    if shard is not None:
        ds = ds.filter(expr=(col("ref_id") % shard[1]) == shard[0])  # pushed into the read
    if data_cfg.shuffle_expressions or data_cfg.max_samples is not None:
        texts = _parquet_texts(path)  # light columns only
        if data_cfg.shuffle_expressions:
            override = texts = shuffled_texts(texts, seed)
        if data_cfg.max_samples is not None:
            ds, texts = _cap_parquet(ds, texts, data_cfg.max_samples, train, ref_level)
            capped = set(texts)
            override = texts if override is not None else None
    return ds, override, lambda original: parquet_cache_size(path, shard, ref_level, capped, original)


def _listed_rows(data_cfg: DataConfig, split: str, train: bool, seed: int, shard: tuple[int, int] | None,
                 report: SkipReport | None, workers: int | None) -> tuple[ray.data.Dataset, int, CacheSize]:
    """(ref rows of the refer files or the manifest, in blocks of ``rows`` refs, ``rows``, the data.cache size)."""
    refs = load_refs(data_cfg, split, report)
    if not refs:
        raise RefSegDataError(f"split '{split}' of {data_cfg.source} data has no usable samples"
                              + (f" ({report.summary()})" if report is not None else ""))
    refs = cap_refs(refs, data_cfg.max_samples, train)  # file order: the same samples every run
    if data_cfg.shuffle_expressions:
        refs = shuffle_ref_texts(refs, seed)
    if shard is not None:
        refs = [r for r in refs if int(r["ref_id"]) % shard[1] == shard[0]]  # may leave none
    if train:  # mix refs across blocks once; block order is re-drawn every epoch
        refs = [refs[i] for i in np.random.default_rng(seed).permutation(len(refs))]
    table = refs_table(refs)
    rows = refs_per_map_task(data_cfg.image_size, train, table.num_rows, workers, data_cfg.map_batch_rows)
    ds = ray.data.from_arrow([table.slice(i, rows) for i in range(0, table.num_rows, rows)] or [table])

    def cache_size(original: bool) -> tuple[int, float | None]:
        if not (original and "height" in table.column_names):
            return table.num_rows, None
        return table.num_rows, float(pc.sum(pc.multiply(table["height"], table["width"])).as_py() or 0)

    return ds, rows, cache_size


def _decode_task(batch: dict, tokenizer: Any, opts: SampleOptions, collector: Any = None) -> dict:
    """Task-based ``map_batches`` function: the tokenizer is rebuilt once per worker process."""
    return decode_batch(batch, fast_tokenizer(tokenizer), opts, collector)


def _reshuffled_blocks(ds: ray.data.Dataset, seed: int) -> ray.data.Dataset:
    """A new block order every epoch (the blocks are in memory: it costs nothing), seeded."""
    return ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))


# ----------------------------------------------------------------------------- the builder
def build_dataset(
    data_cfg: DataConfig,
    split: str,
    *,
    train: bool,
    tokenizer: Any,
    seed: int | None = None,
    report: SkipReport | None = None,
    shard: tuple[int, int] | None = None,
    cache_rows: bool = False,
) -> ray.data.Dataset:
    """A Ray Dataset of decoded samples of ``split`` (columns :data:`refseg.data.samples.COLUMNS`).

    ``train``: one random sentence per ref per epoch, augmentation when ``data_cfg.augment``;
    otherwise every sentence. ``tokenizer``: a loaded tokenizer (e.g. ``refseg.models.load_tokenizer``)
    or a :class:`~refseg.data.samples.TokenizerSpec`; workers get its torch-free spec. ``seed``
    (default 0) fixes the shuffle_expressions derangement and the base of the per-epoch block / file
    order; the per-epoch sentence draw and augmentation are unseeded on purpose. ``report``: skips
    found while listing the split and inside the Ray tasks are counted there (:meth:`SkipReport.sync`).
    Map concurrency: ``data_cfg.num_read_tasks`` or one task per cluster CPU; ``data_cfg.map_cpus``
    CPUs reserved per task (the Parquet read tasks too).
    ``shard=(index, count)``: keep only refs with ``ref_id % count == index`` (before any decoding), so
    ``count`` workers each score a disjoint part of an evaluation split and together every sample.
    ``data_cfg.cache``: decode every ref once here (materialised in the object store, see
    :mod:`refseg.data.cache`); each iteration then only draws, augments and tokenises. ``cache_rows``
    (with data.cache): return those cache rows instead, for a consumer that samples them itself
    (training: :class:`refseg.data.cache.ShardCache` in every worker).
    """
    validate_data(data_cfg)
    if cache_rows and not data_cfg.cache:
        raise ValueError("cache_rows=True needs data.cache=true")
    seed = 0 if seed is None else seed
    workers = data_cfg.num_read_tasks or _default_workers()
    rows = refs_per_map_task(data_cfg.image_size, train, fixed=data_cfg.map_batch_rows)
    override = None
    if data_cfg.source == "parquet":
        ds, override, cache_size = _parquet_rows(data_cfg, split, train, seed, shard)
    else:
        ds, rows, cache_size = _listed_rows(data_cfg, split, train, seed, shard, report, workers)
        if train:
            ds = _reshuffled_blocks(ds, seed)
    opts = sample_opts(data_cfg, train, override)
    collector = report.collector() if report is not None else None
    common = {"batch_size": rows, "batch_format": "numpy", "num_cpus": data_cfg.map_cpus,
              "compute": ray.data.TaskPoolStrategy(size=workers)}
    if data_cfg.cache:  # decode once now; the per-epoch map below only draws, augments and tokenises
        store = ray.cluster_resources().get("object_store_memory", float("inf"))
        num, pixels = cache_size(keeps_original(opts))
        check_fits(cache_bytes(num, data_cfg.image_size, pixels), store, split)
        ds = ds.map_batches(cache_batch, fn_args=(opts, collector), **common).materialize()
        if cache_rows:
            return ds
        if train:
            ds = _reshuffled_blocks(ds, seed)
        opts = without_override(opts)  # applied in the cache rows
    return ds.map_batches(_decode_task, fn_args=(tokenizer_spec(tokenizer), opts, collector), **common)


def count_refs(data_cfg: DataConfig, split: str) -> int:
    """Number of usable refs of ``split`` = rows of one training epoch (one sentence per ref)."""
    validate_data(data_cfg)
    if data_cfg.source == "parquet":
        n = len(set(_light_table(shards_path(data_cfg, split), ["ref_id"]).column("ref_id").to_pylist()))
    else:
        n = len(load_refs(data_cfg, split))
    return n if data_cfg.max_samples is None else min(n, data_cfg.max_samples)
