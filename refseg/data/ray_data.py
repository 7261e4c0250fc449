"""Ray Data pipelines: refer files, Parquet shards or a manifest -> decoded, tokenised batches.

    report = SkipTally()
    train = build_dataset(cfg.data, "train", train=True, tokenizer_source=cfg.model.text, report=report)
    for batch in train.iter_torch_batches(batch_size=16):
        batch["image"]  # (B, 3, S, S) float32, ImageNet-normalised
        batch["mask"]   # (B, S, S) float32 {0, 1}; input_ids / attention_mask (B, L) int64
    print(report.sync().summary())  # samples skipped while listing and inside the Ray tasks

Rows before decoding are one per ref (its image, mask and list of sentences), in small blocks.
Decoding, augmentation, resizing and tokenisation run inside Ray Data (``map_batches``, NumPy batches):
a training epoch draws ONE sentence per ref with fresh randomness each time the dataset is iterated
(LAVT); evaluation emits every sentence of the ref (the image is decoded once for all of them).
Bad samples (missing/corrupt image, unusable mask, empty sentence) are dropped inside the map, logged
and counted per reason in a small Ray actor that :class:`SkipTally` reads back.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from refseg.config import DataConfig, TextConfig
from refseg.data.cache import cache_batch, cache_bytes, cached_sample, check_fits, keeps_original
from refseg.data.errors import RefSegDataError, SkipReport
from refseg.data.manifest import filesystem_and_path, is_uri, load_mask_png, read_bytes, read_manifest

logger = logging.getLogger("refseg.data")

COLUMNS = ("image", "mask", "input_ids", "attention_mask", "ref_id", "sent_id", "orig_h", "orig_w")
MISSING_IMAGE_FILE = "missing image file"  # reasons match refseg.data.refer where they overlap
CORRUPT_IMAGE = "corrupt image"
INVALID_MASK = "invalid segmentation"
ZERO_AREA = "zero-area segmentation"
SIZE_MISMATCH = "mask/image size mismatch"
EMPTY_SENTENCE = "empty sentence"
PARQUET_REF_COLUMNS = ["ref_id", "image_bytes", "mask_rle", "mask_h", "mask_w", "height", "width",
                       "ref_sent_ids", "ref_sentences", "sent_index"]


# ----------------------------------------------------------------------------- skip counting
@ray.remote(num_cpus=0)
class _SkipCounter:
    """Per-reason counts (and a few examples) of samples dropped inside Ray Data tasks."""

    def __init__(self, max_examples: int) -> None:
        self.max_examples = max_examples
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, counts: dict, examples: dict) -> None:
        self.counts.update(counts)
        for reason, items in examples.items():
            keep = self.examples.setdefault(reason, [])
            keep.extend(items[: self.max_examples - len(keep)])

    def state(self) -> tuple[dict, dict]:
        return dict(self.counts), self.examples


class SkipTally(SkipReport):
    """A :class:`SkipReport` that also counts samples dropped inside Ray Data tasks.

    Pass it as ``report=`` to :func:`build_dataset`: skips found while listing the split land here
    directly; skips found while decoding go to a Ray actor, merged in by :meth:`sync` (``summary``
    syncs too). Counts accumulate over every epoch the dataset is iterated."""

    def __init__(self, max_examples: int = 3) -> None:
        super().__init__(max_examples)
        self._local: Counter = Counter()
        self._local_examples: dict[str, list[str]] = {}
        self._actor = None

    def add(self, reason: str, detail: str = "") -> None:
        super().add(reason, detail)
        self._local[reason] += 1
        ex = self._local_examples.setdefault(reason, [])
        if detail and len(ex) < self.max_examples:
            ex.append(detail)

    def handle(self):
        """The actor handle tasks report to (created on first use; needs a Ray instance)."""
        if self._actor is None:
            self._actor = _SkipCounter.remote(self.max_examples)
        return self._actor

    def sync(self) -> SkipTally:
        """Merge the counts reported by Ray tasks so far into ``counts`` / ``examples``."""
        if self._actor is None:
            return self
        remote, remote_ex = ray.get(self._actor.state.remote())
        self.counts = self._local + Counter(remote)
        self.examples = {k: list(v) for k, v in self._local_examples.items()}
        for reason, items in remote_ex.items():
            keep = self.examples.setdefault(reason, [])
            keep.extend(items[: self.max_examples - len(keep)])
        return self

    def summary(self) -> str:
        self.sync()
        return super().summary()

    def __reduce__(self):  # travels to workers as a plain handle holder (counts stay in the driver)
        return (_tally_from_handle, (self.max_examples, self._actor))


def _tally_from_handle(max_examples: int, actor) -> SkipTally:
    tally = SkipTally(max_examples)
    tally._actor = actor
    return tally


# ----------------------------------------------------------------------------- tokenizer
_TOKENIZERS: dict[str, Any] = {}


@dataclass(frozen=True)
class TokenizerSpec:
    """A Hugging Face *fast* tokenizer reduced to its Rust backend (``tokenizers``) JSON.

    Ray workers rebuild it in milliseconds without importing torch or transformers (a fresh worker
    would otherwise spend seconds on those imports); the output equals the transformers call
    ``tok(texts, padding="max_length", truncation=True, max_length=L)``."""

    json: str
    key: str
    pad_id: int
    pad_token: str
    padding_side: str = "right"
    truncation_side: str = "right"


class FastTokenizer:
    """Callable like a transformers tokenizer (padding="max_length", truncation) over a TokenizerSpec."""

    def __init__(self, spec: TokenizerSpec) -> None:
        from tokenizers import Tokenizer

        self.spec = spec
        self._backend = Tokenizer.from_str(spec.json)
        self._length: int | None = None

    def __call__(self, texts, padding="max_length", truncation=True, max_length=None, return_tensors="np"):
        if padding != "max_length" or not truncation or max_length is None:
            raise ValueError("FastTokenizer only pads and truncates to max_length")
        if self._length != max_length:
            self._backend.enable_truncation(max_length=max_length, direction=self.spec.truncation_side)
            self._backend.enable_padding(length=max_length, pad_id=self.spec.pad_id, pad_token=self.spec.pad_token,
                                         direction=self.spec.padding_side)
            self._length = max_length
        enc = self._backend.encode_batch(list(texts))
        return {"input_ids": np.array([e.ids for e in enc], np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}


def tokenizer_spec(source: Any) -> Any:
    """What the map tasks get: a :class:`TokenizerSpec` when the tokenizer is a fast one, else ``source``."""
    if isinstance(source, TokenizerSpec):
        return source
    tok = get_tokenizer(source)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or tok.pad_token is None:
        return source
    import hashlib

    text = backend.to_str()
    return TokenizerSpec(json=text, key=hashlib.sha1(text.encode()).hexdigest(), pad_id=int(tok.pad_token_id),
                         pad_token=str(tok.pad_token), padding_side=str(getattr(tok, "padding_side", "right")),
                         truncation_side=str(getattr(tok, "truncation_side", "right")))


def get_tokenizer(source: Any) -> Any:
    """A tokenizer from a TextConfig, a name/dir/vocab string, a TokenizerSpec, or a tokenizer object
    (returned as is); cached per process."""
    if isinstance(source, TokenizerSpec):
        if source.key not in _TOKENIZERS:
            _TOKENIZERS[source.key] = FastTokenizer(source)
        return _TOKENIZERS[source.key]
    if not isinstance(source, (str, TextConfig)):
        return source
    key = repr(source)
    if key not in _TOKENIZERS:
        from refseg.models import load_tokenizer

        _TOKENIZERS[key] = load_tokenizer(source)
    return _TOKENIZERS[key]


# ----------------------------------------------------------------------------- decoding (in Ray tasks)
def _texts(batch: dict, i: int, override: dict | None) -> list[tuple[int, str]]:
    """(sent_id, sentence) pairs of row ``i``: list columns (ref rows) or one scalar pair."""
    if override is not None:
        return override[int(batch["ref_id"][i])]
    for ids_key, text_key in (("sent_ids", "sentences"), ("ref_sent_ids", "ref_sentences")):
        if text_key in batch:
            return list(zip((int(s) for s in batch[ids_key][i]), (str(t) for t in batch[text_key][i])))
    return [(int(batch["sent_id"][i]), str(batch["sentence"][i]))]


def usable_texts(batch: dict, i: int, opts: dict, skips: _Skips) -> list[tuple[int, str]]:
    """Row ``i``'s non-empty (sent_id, sentence) pairs; the samples lost to empty ones are counted in
    ``skips`` (training: the ref, only when it has none left; evaluation: each empty sentence)."""
    texts = _texts(batch, i, opts["override"])
    good = [(s, t) for s, t in texts if t.strip()]
    empty = (0 if good else 1) if opts["train"] else len(texts) - len(good)
    if empty:
        skips.add(EMPTY_SENTENCE, f"ref {int(batch['ref_id'][i])}", empty)
    return good


def _known_size(batch: dict, i: int) -> tuple[int, int] | None:
    """The original (H, W) when the row states it (RLE size, or height/width), else None."""
    if "mask_h" in batch:
        return int(batch["mask_h"][i]), int(batch["mask_w"][i])
    h, w = int(batch["height"][i]), int(batch["width"][i])
    return (h, w) if h > 0 and w > 0 else None


def _image(batch: dict, i: int, target_size: int | None) -> np.ndarray:
    """(h, w, 3) uint8; with ``target_size`` a JPEG may decode at 1/2, 1/4, 1/8 scale (sides >= it)."""
    from refseg.data.transforms import load_image

    kw = {"target_size": target_size, "exif": False}  # COCO masks live on the stored pixel grid
    if "image_bytes" in batch:
        return load_image(batch["image_bytes"][i], name=f"ref {int(batch['ref_id'][i])}", **kw)
    path = str(batch["image_path"][i])
    return load_image(read_bytes(path) if is_uri(path) else path, name=path, **kw)


def _mask(batch: dict, i: int, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 {0,1} from an RLE string column, a PNG path or a JSON segmentation."""
    from refseg.data.masks import decode_mask

    if "mask_rle" in batch:
        return decode_mask({"size": list(size), "counts": str(batch["mask_rle"][i])})
    path = str(batch["mask_path"][i]) if "mask_path" in batch else ""
    if path:
        return load_mask_png(path)
    return decode_mask(json.loads(str(batch["seg_json"][i])), size[0], size[1])


def _drafted(orig: tuple[int, int], got: tuple[int, int]) -> bool:
    """Is ``got`` the size of a JPEG draft (scale 1, 1/2, 1/4, 1/8, rounded up) of ``orig``?"""
    return any(got == (-(-orig[0] // f), -(-orig[1] // f)) for f in (1, 2, 4, 8))


def _load_sample(batch: dict, i: int, opts: dict) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(image (h, w, 3) uint8, mask (H, W) uint8, (H, W) original size); raises _Skip."""
    from refseg.data.transforms import ImageError

    ref_id = int(batch["ref_id"][i])
    known = _known_size(batch, i)
    # JPEG draft decoding (faster, slightly different pixels) only for training without augmentation
    # (which needs equal image/mask sizes) and when the mask geometry is known; evaluation is exact
    draft = opts["image_size"] if known is not None and opts["train"] and not opts["augment"] else None
    where = str(batch["image_path"][i]) if "image_path" in batch else f"ref {ref_id}"
    try:
        image = _image(batch, i, draft)
    except FileNotFoundError:
        raise _Skip(MISSING_IMAGE_FILE, where) from None
    except ImageError as e:
        raise _Skip(MISSING_IMAGE_FILE if "does not exist" in str(e) else CORRUPT_IMAGE, str(e)) from None
    except OSError as e:  # remote storage errors
        raise _Skip(MISSING_IMAGE_FILE, f"{where}: {e}") from None
    orig = known or image.shape[:2]
    try:
        mask = _mask(batch, i, orig)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise _Skip(INVALID_MASK, f"ref {ref_id}: {e}") from None
    if mask.shape != tuple(orig) or not _drafted(tuple(orig), image.shape[:2]):
        raise _Skip(SIZE_MISMATCH, f"ref {ref_id}: mask {mask.shape}, image {image.shape[:2]}")
    if not mask.any():
        raise _Skip(ZERO_AREA, f"ref {ref_id}")
    return image, mask, (int(orig[0]), int(orig[1]))


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class _Skips:
    """Skips seen in one batch: counted, a few examples kept, logged, sent to the tally once."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, detail: str, n: int = 1) -> None:
        self.counts[reason] += n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(detail)

    def flush(self, tally: SkipTally | None) -> None:
        if not self.counts:
            return
        logger.warning("dropped %d samples in this batch: %s (e.g. %s)", sum(self.counts.values()),
                       dict(self.counts), self.examples)
        if tally is not None:
            # wait for it (rare: batches with skips only), so counts are in before the batch is seen
            ray.get(tally.handle().add.remote(dict(self.counts), self.examples))


def _empty(size: int, length: int) -> dict:
    return {"image": np.zeros((0, 3, size, size), np.float32), "mask": np.zeros((0, size, size), np.float32),
            "input_ids": np.zeros((0, length), np.int64), "attention_mask": np.zeros((0, length), np.int64),
            **{k: np.zeros((0,), np.int64) for k in ("ref_id", "sent_id", "orig_h", "orig_w")}}


def decode_batch(batch: dict, tokenizer: Any, opts: dict, tally: SkipTally | None = None) -> dict:
    """Ref rows -> samples: decode image + mask, augment (train), resize, tokenise; drop bad ones.

    ``opts``: image_size, keep_aspect, max_tokens, train, augment, hflip_prob, min_scale, override (ref_id ->
    [(sent_id, sentence)] or None). Rows may also be cache rows (:func:`refseg.data.cache.cache_batch`).
    Returns the :data:`COLUMNS` as NumPy arrays."""
    from refseg.data.transforms import preprocess, random_augment, resize_geometry, tokenize

    rng = np.random.default_rng()  # OS entropy: each epoch (each execution) draws anew
    cached = "pixels" in batch  # rows of the data.cache stage: decoded already (refseg.data.cache)
    size, skips = opts["image_size"], _Skips()
    images, masks, meta, sentences = [], [], [], []
    for i in range(len(batch["ref_id"])):
        ref_id = int(batch["ref_id"][i])
        good = usable_texts(batch, i, opts, skips)
        if not good:
            continue
        if opts["train"]:
            good = [good[int(rng.integers(len(good)))]]
        try:
            image, mask, (orig_h, orig_w) = cached_sample(batch, i) if cached else _load_sample(batch, i, opts)
        except _Skip as e:
            skips.add(e.reason, e.detail, len(good))
            continue
        if opts["train"] and opts["augment"]:
            image, mask, text = random_augment(  # straight to the model's geometry: one resampling
                image, mask, good[0][1], rng, hflip_prob=opts["hflip_prob"], min_scale=opts.get("min_scale", 0.85),
                out_size=resize_geometry(orig_h, orig_w, size, opts["keep_aspect"]))
            good = [(good[0][0], text)]
        image, mask = preprocess(image, mask, size, opts["keep_aspect"], orig_size=(orig_h, orig_w))
        for sent_id, text in good:
            images.append(image)
            masks.append(mask)
            sentences.append(text)
            meta.append((ref_id, sent_id, orig_h, orig_w))
    skips.flush(tally)
    if not images:
        return _empty(size, opts["max_tokens"])
    input_ids, attention_mask = tokenize(tokenizer, sentences, opts["max_tokens"])
    meta_arr = np.asarray(meta, dtype=np.int64)  # (B, 4)
    return {
        "image": np.stack(images).astype(np.float32, copy=False),  # (B, 3, S, S)
        "mask": np.stack(masks).astype(np.float32),  # (B, S, S)
        "input_ids": np.asarray(input_ids, dtype=np.int64),  # (B, L)
        "attention_mask": np.asarray(attention_mask, dtype=np.int64),  # (B, L)
        "ref_id": meta_arr[:, 0], "sent_id": meta_arr[:, 1], "orig_h": meta_arr[:, 2], "orig_w": meta_arr[:, 3],
    }


class SampleDecoder:
    """Callable class for ``map_batches`` with an actor pool: the tokenizer is loaded once per actor."""

    def __init__(self, tokenizer_source: Any, opts: dict, tally: SkipTally | None = None) -> None:
        self.tokenizer = get_tokenizer(tokenizer_source)
        self.opts, self.tally = opts, tally

    def __call__(self, batch: dict) -> dict:
        return decode_batch(batch, self.tokenizer, self.opts, self.tally)


def _decode_task(batch: dict, tokenizer_source: Any, opts: dict, tally: SkipTally | None = None) -> dict:
    """Task-based ``map_batches`` function: the tokenizer is cached per worker process."""
    return decode_batch(batch, get_tokenizer(tokenizer_source), opts, tally)


# ----------------------------------------------------------------------------- ref rows (driver)
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


def _shuffled_texts(texts: dict[int, list], seed: int) -> dict[int, list]:
    """ref_id -> the (sent_id, sentence) list of another ref (a derangement over refs)."""
    ids = sorted(texts)
    perm = derangement(len(ids), seed)
    return {ids[i]: texts[ids[int(perm[i])]] for i in range(len(ids))}


def shuffle_ref_texts(refs: list[dict], seed: int) -> list[dict]:
    """The refs with every ref's sentences replaced by another ref's (data.shuffle_expressions)."""
    new = _shuffled_texts({int(r["ref_id"]): list(zip(r["sent_ids"], r["sentences"])) for r in refs}, seed)
    return [{**r, "sent_ids": [s for s, _ in new[r["ref_id"]]], "sentences": [t for _, t in new[r["ref_id"]]]}
            for r in refs]


def _cap(refs: list[dict], max_samples: int | None, train: bool) -> list[dict]:
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


def _refs_table(refs: list[dict]) -> pa.Table:
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
    })


def load_refs(data_cfg: DataConfig, split: str, report: SkipReport | None = None) -> list[dict]:
    """The usable refs of ``split`` from the refer files or the manifest (listing-time skips -> report)."""
    if data_cfg.source == "refer":
        from refseg.data.refer import load_split_refs

        refs_file = os.path.join(os.path.expanduser(data_cfg.root), data_cfg.dataset, f"refs({data_cfg.split_by}).p")
        if data_cfg.synthetic and not os.path.exists(refs_file):  # never touches a real set at root
            from refseg.data.synthetic import ensure_synthetic

            ensure_synthetic(data_cfg.root, data_cfg.synthetic_images, data_cfg.synthetic_seed)
        refs = load_split_refs(data_cfg.root, data_cfg.dataset, data_cfg.split_by, split,
                               image_dir=data_cfg.image_dir, report=report)
        return [{**r, "sent_ids": [s["sent_id"] for s in r["sentences"]],
                 "sentences": [s["sentence"] for s in r["sentences"]]} for r in refs]
    if data_cfg.source == "manifest":
        if not data_cfg.manifest:
            raise RefSegDataError("data.source is 'manifest' but data.manifest is not set; give its path")
        return group_refs(read_manifest(data_cfg.manifest, split, report=report))
    raise RefSegDataError(f"data.source '{data_cfg.source}' is not one of refer | parquet | manifest")


# ----------------------------------------------------------------------------- Parquet shards
def _parquet_texts(path: str) -> dict[int, list]:
    """ref_id -> [(sent_id, sentence)] read from the light columns of a shard directory."""
    import pyarrow.dataset as pads

    fs, inner = filesystem_and_path(path)
    table = pads.dataset(inner, filesystem=fs, format="parquet").to_table(columns=["ref_id", "sent_id", "sentence"])
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
    base = [c for c in ("ref_id", "image_bytes", "mask_rle", "mask_h", "mask_w", "height", "width") if c in names]
    shuffle = None
    if shuffle_seed is not None:
        shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    ds = ray.data.read_parquet(inner, filesystem=fs, shuffle=shuffle, num_cpus=num_cpus)
    if "ref_sentences" in names:  # written by write_shards: the first row of a ref lists all its sentences
        if not ref_level:
            return ds.select_columns(base + ["sent_id", "sentence"])
        from ray.data.expressions import col

        return ds.select_columns(PARQUET_REF_COLUMNS).filter(expr=col("sent_index") == 0)  # pushed into the read
    ds = ds.select_columns(base + ["sent_id", "sentence"])
    return ds.groupby("ref_id").map_groups(_collapse_refs, batch_format="pyarrow") if ref_level else ds


def _cap_parquet(ds: ray.data.Dataset, texts: dict[int, list], n: int, train: bool, ref_level: bool
                 ) -> tuple[ray.data.Dataset, dict[int, list]]:
    """The first ``n`` samples (file order, same every run): a filter pushed into the read."""
    from ray.data.expressions import col

    refs = [{"ref_id": r, "sent_ids": [s for s, _ in v], "sentences": [t for _, t in v]} for r, v in texts.items()]
    kept = _cap(refs, n, train)
    if ref_level:
        ds = ds.filter(expr=col("ref_id").is_in([r["ref_id"] for r in kept]))
    else:
        ds = ds.filter(expr=col("sent_id").is_in([s for r in kept for s in r["sent_ids"]]))
    return ds, {r["ref_id"]: list(zip(r["sent_ids"], r["sentences"])) for r in kept}


def _parquet_cache_size(path: str, shard: tuple[int, int] | None, ref_level: bool, refs: set[int] | None,
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


# ----------------------------------------------------------------------------- the builder
def _default_workers() -> int | None:
    """At most one concurrent map task per cluster CPU (None before ray.init: Ray Data decides).

    More tasks than CPUs (map_cpus < 1) means more worker processes than Ray's idle-worker soft limit
    (one per CPU): idle ones are then killed and restarted all the time, which measured 2-3x slower."""
    if not ray.is_initialized():
        return None
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _map_batch_rows(image_size: int, train: bool = True, num_refs: int | None = None,
                    workers: int | None = None) -> int:
    """Refs per map task (= per input block): ~96 MB of decoded output, 8..128 refs.

    Measured on 2 cores: each Ray Data task costs ~0.05-0.1 s of scheduling, so 16-ref tasks ran 1.5-2x
    slower than 128-ref ones at 128 px. Evaluation emits ~3 samples per ref; small splits are cut
    into at least two tasks per worker so both CPUs get work."""
    per_sample = image_size * image_size * 16 * (1 if train else 3)  # float32 image + mask bytes
    rows = int(max(8, min(128, 96e6 // per_sample)))
    if num_refs is not None:
        rows = min(rows, max(1, -(-num_refs // (2 * (workers or 2)))))
    return rows


def sample_opts(data_cfg: DataConfig, train: bool, override: dict | None = None) -> dict:
    """The ``opts`` of :func:`decode_batch` for ``data_cfg``."""
    if not 0.0 < data_cfg.min_scale <= 1.0:
        raise RefSegDataError(f"data.min_scale must lie in (0, 1] (the zoom-out draws a scale in [min_scale, 1]), "
                              f"got {data_cfg.min_scale}; 1 turns the zoom-out off")
    if not 0.0 <= data_cfg.hflip_prob <= 1.0:
        raise RefSegDataError(f"data.hflip_prob must lie in [0, 1], got {data_cfg.hflip_prob}")
    return {"image_size": data_cfg.image_size, "keep_aspect": data_cfg.keep_aspect, "max_tokens": data_cfg.max_tokens,
            "train": train, "augment": data_cfg.augment, "hflip_prob": data_cfg.hflip_prob, "min_scale": data_cfg.min_scale,
            "override": override}


def build_dataset(
    data_cfg: DataConfig,
    split: str,
    *,
    train: bool,
    tokenizer_source: Any,
    seed: int | None = None,
    report: SkipReport | None = None,
    compute: str = "tasks",
    shard: tuple[int, int] | None = None,
    cache_rows: bool = False,
) -> ray.data.Dataset:
    """A Ray Dataset of decoded samples of ``split`` (columns :data:`COLUMNS`, see the module doc).

    ``train``: one random sentence per ref per epoch, augmentation when ``data_cfg.augment``;
    otherwise every sentence. ``tokenizer_source``: a TextConfig, a tokenizer name/dir/vocab, or a
    tokenizer (loaded once here; workers get its torch-free :class:`TokenizerSpec`). ``seed`` (default 0)
    fixes the shuffle_expressions derangement and the base of the per-epoch block / file order; the
    per-epoch sentence draw and augmentation are unseeded on purpose. ``report``: listing-time skips
    are added to it; pass a :class:`SkipTally` to also count the skips found inside the Ray tasks.
    ``compute``: "tasks" (default, measured fastest on 2 cores) or "actors" (an ActorPoolStrategy,
    whose actors restart every epoch). Map concurrency: ``data_cfg.num_read_tasks`` or one task per
    cluster CPU; ``data_cfg.map_cpus`` CPUs reserved per task (the Parquet read tasks too).
    ``shard=(index, count)``: keep only refs with ``ref_id % count == index`` (before any decoding), so
    ``count`` workers each score a disjoint part of an evaluation split and together every sample.
    ``data_cfg.cache``: decode every ref once here (materialised in the object store, see
    :mod:`refseg.data.cache`); each iteration then only draws, augments and tokenises. ``cache_rows``
    (with data.cache): return those cache rows instead, for a consumer that samples them itself
    (training: :class:`refseg.data.cache.ShardCache` in every worker).
    """
    seed = 0 if seed is None else seed
    size = data_cfg.image_size
    workers = data_cfg.num_read_tasks or _default_workers()
    rows = _map_batch_rows(size, train)
    override = None
    if data_cfg.source == "parquet":
        if not data_cfg.parquet:
            raise RefSegDataError("data.source is 'parquet' but data.parquet is not set; give the shards root")
        path = posixpath.join(data_cfg.parquet, split) if is_uri(data_cfg.parquet) else os.path.join(
            os.path.abspath(os.path.expanduser(data_cfg.parquet)), split)
        ref_level = train or data_cfg.shuffle_expressions
        capped: set[int] | None = None
        ds = _parquet_dataset(path, ref_level, seed if train else None, data_cfg.map_cpus)
        if shard is not None:
            from ray.data.expressions import col

            ds = ds.filter(expr=(col("ref_id") % shard[1]) == shard[0])  # pushed into the read
        if data_cfg.shuffle_expressions or data_cfg.max_samples is not None:
            texts = _parquet_texts(path)  # light columns only
            if data_cfg.shuffle_expressions:
                override = texts = _shuffled_texts(texts, seed)
            if data_cfg.max_samples is not None:
                ds, texts = _cap_parquet(ds, texts, data_cfg.max_samples, train, ref_level)
                capped = set(texts)
                override = texts if override is not None else None
    else:
        refs = load_refs(data_cfg, split, report)
        if not refs:
            raise RefSegDataError(f"split '{split}' of {data_cfg.source} data has no usable samples"
                                  + (f" ({report.summary()})" if report is not None else ""))
        refs = _cap(refs, data_cfg.max_samples, train)  # file order: the same samples every run
        if data_cfg.shuffle_expressions:
            refs = shuffle_ref_texts(refs, seed)
        if shard is not None:
            refs = [r for r in refs if int(r["ref_id"]) % shard[1] == shard[0]]  # may leave none
        if train:  # mix refs across blocks once; block order is re-drawn every epoch below
            refs = [refs[i] for i in np.random.default_rng(seed).permutation(len(refs))]
        table = _refs_table(refs)
        rows = _map_batch_rows(size, train, table.num_rows, workers)
        ds = ray.data.from_arrow([table.slice(i, rows) for i in range(0, table.num_rows, rows)] or [table])
        if train:  # the blocks are in memory already: a new block order every epoch costs nothing
            ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
    opts = sample_opts(data_cfg, train, override)
    tok = tokenizer_spec(tokenizer_source)  # loaded here once; workers rebuild it without torch
    tally = report if isinstance(report, SkipTally) else None
    if tally is not None:
        tally.handle()
    common = {"batch_size": rows, "batch_format": "numpy", "num_cpus": data_cfg.map_cpus}
    if data_cfg.cache:  # decode once now; the per-epoch map below only draws, augments and tokenises
        store = ray.cluster_resources().get("object_store_memory", float("inf"))
        if data_cfg.source == "parquet":
            num, pixels = _parquet_cache_size(path, shard, ref_level, capped, keeps_original(opts))
        else:
            num, known = table.num_rows, keeps_original(opts) and "height" in table.column_names
            pixels = float(pc.sum(pc.multiply(table["height"], table["width"])).as_py() or 0) if known else None
        check_fits(cache_bytes(num, size, pixels), store, split)
        ds = ds.map_batches(cache_batch, fn_args=(opts, tally), compute=ray.data.TaskPoolStrategy(size=workers),
                            **common).materialize()
        if cache_rows:
            return ds
        if train:
            ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
        opts = {**opts, "override": None}  # applied in the cache rows
    elif cache_rows:
        raise ValueError("cache_rows=True needs data.cache=true")
    if compute == "actors":
        ds = ds.map_batches(SampleDecoder, fn_constructor_args=(tok, opts, tally),
                            compute=ray.data.ActorPoolStrategy(size=workers or 2), **common)
    elif compute == "tasks":
        ds = ds.map_batches(_decode_task, fn_args=(tok, opts, tally),
                            compute=ray.data.TaskPoolStrategy(size=workers), **common)
    else:
        raise ValueError(f"compute must be 'tasks' or 'actors', got {compute!r}")
    return ds


def count_refs(data_cfg: DataConfig, split: str) -> int:
    """Number of usable refs of ``split`` = rows of one training epoch (one sentence per ref)."""
    if data_cfg.source == "parquet":
        import pyarrow.dataset as pads

        path = posixpath.join(data_cfg.parquet, split) if is_uri(data_cfg.parquet) else os.path.join(
            os.path.abspath(os.path.expanduser(data_cfg.parquet)), split)
        fs, inner = filesystem_and_path(path)
        table = pads.dataset(inner, filesystem=fs, format="parquet").to_table(columns=["ref_id"])
        n = len(set(table.column("ref_id").to_pylist()))
    else:
        n = len(load_refs(data_cfg, split))
    return n if data_cfg.max_samples is None else min(n, data_cfg.max_samples)
