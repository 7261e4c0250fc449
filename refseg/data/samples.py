"""One ref row -> model samples: decode image and mask, augment (training), resize, tokenise.

    opts = sample_opts(cfg.data, train=False)
    out = decode_batch(rows, fast_tokenizer(tokenizer), opts)   # NumPy columns, see COLUMNS
    out["image"]  # (B, 3, S, S) uint8 pixels (resized, padded; normalize_images on the device)
    out["mask"]   # (B, S, S) uint8 {0, 1}; input_ids / attention_mask (B, L) int64
    out["no_target"]  # (B,) float32 {0, 1}: 1 = the expression names nothing (gRefCOCO); its mask is all 0

A row is one ref: its image (a path / URI, or the bytes of a Parquet shard), its mask (a JSON
segmentation, an RLE string column or a PNG path) and its sentences. A training row becomes ONE
sample (a sentence drawn anew on every call, with augmentation when enabled); an evaluation row
becomes one sample per sentence (the image is decoded once for all of them). Rows that cannot be
used raise :class:`~refseg.data.skips.SkipSample` in :func:`load_sample`; :func:`decode_batch`
drops and counts them. Nothing here imports Ray, torch or transformers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from refseg.config import DataConfig
from refseg.data import skips
from refseg.data.masks import decode_mask
from refseg.data.skips import SkipReport, SkipSample
from refseg.data.sources.manifest import load_mask_png
from refseg.data.transforms import (
    ImageError,
    load_image,
    preprocess,
    random_augment,
    resize_geometry,
    tokenize,
)
from refseg.io import is_uri, read_bytes

COLUMNS = ("image", "mask", "input_ids", "attention_mask", "ref_id", "sent_id", "orig_h", "orig_w", "no_target")


@dataclass(frozen=True)
class SampleOptions:
    """How rows become samples (built from a DataConfig by :func:`sample_opts`).

    ``image_size``: the model's side S (pixels); ``max_tokens``: L; ``train``: one random sentence per
    row (else every sentence); ``augment`` / ``hflip_prob`` / ``min_scale``: training augmentation;
    ``override``: ref_id -> [(sent_id, sentence)] replacing the rows' own sentences (shuffle_expressions)."""

    image_size: int
    keep_aspect: bool
    max_tokens: int
    train: bool
    augment: bool = False
    hflip_prob: float = 0.5
    min_scale: float = 0.85
    override: dict[int, list[tuple[int, str]]] | None = None


def sample_opts(data_cfg: DataConfig, train: bool, override: dict | None = None) -> SampleOptions:
    """The :class:`SampleOptions` of ``data_cfg`` (checked by :func:`refseg.config.validate.validate_data`)."""
    return SampleOptions(data_cfg.image_size, data_cfg.keep_aspect, data_cfg.max_tokens, train, data_cfg.augment,
                         data_cfg.hflip_prob, data_cfg.min_scale, override)


def without_override(opts: SampleOptions) -> SampleOptions:
    """``opts`` for rows whose sentences were already replaced (data.cache rows)."""
    return dataclasses.replace(opts, override=None)


# ----------------------------------------------------------------------------- tokenizer
_TOKENIZERS: dict[str, Any] = {}


@dataclass(frozen=True)
class TokenizerSpec:
    """A Hugging Face *fast* tokenizer reduced to its Rust backend (``tokenizers``) JSON.

    Ray workers rebuild it in milliseconds without importing torch or transformers; the output
    equals the transformers call ``tok(texts, padding="max_length", truncation=True, max_length=L)``."""

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


def tokenizer_spec(tokenizer: Any) -> Any:
    """What to send to Ray workers: a :class:`TokenizerSpec` for a fast tokenizer with a pad token
    (or a spec given as is), else ``tokenizer`` itself."""
    if isinstance(tokenizer, TokenizerSpec):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token is None:
        return tokenizer
    text = backend.to_str()
    return TokenizerSpec(json=text, key=hashlib.sha1(text.encode()).hexdigest(), pad_id=int(tokenizer.pad_token_id),
                         pad_token=str(tokenizer.pad_token), padding_side=str(getattr(tokenizer, "padding_side", "right")),
                         truncation_side=str(getattr(tokenizer, "truncation_side", "right")))


def fast_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer to call: a :class:`FastTokenizer` (built once per process) for a TokenizerSpec
    or a fast tokenizer, any other tokenizer as it is."""
    spec = tokenizer_spec(tokenizer)
    if not isinstance(spec, TokenizerSpec):
        return spec
    if spec.key not in _TOKENIZERS:
        _TOKENIZERS[spec.key] = FastTokenizer(spec)
    return _TOKENIZERS[spec.key]


# ----------------------------------------------------------------------------- one row
def _texts(batch: dict, i: int, override: dict | None) -> list[tuple[int, str]]:
    """(sent_id, sentence) pairs of row ``i``: list columns (ref rows) or one scalar pair."""
    if override is not None:
        return override[int(batch["ref_id"][i])]
    for ids_key, text_key in (("sent_ids", "sentences"), ("ref_sent_ids", "ref_sentences")):
        if text_key in batch:
            return list(zip((int(s) for s in batch[ids_key][i]), (str(t) for t in batch[text_key][i])))
    return [(int(batch["sent_id"][i]), str(batch["sentence"][i]))]


def usable_texts(batch: dict, i: int, opts: SampleOptions, dropped: SkipReport) -> list[tuple[int, str]]:
    """Row ``i``'s non-empty (sent_id, sentence) pairs; the samples lost to empty ones are counted in
    ``dropped`` (training: the ref, only when it has none left; evaluation: each empty sentence)."""
    texts = _texts(batch, i, opts.override)
    good = [(s, t) for s, t in texts if t.strip()]
    empty = (0 if good else 1) if opts.train else len(texts) - len(good)
    if empty:
        dropped.add(skips.EMPTY_SENTENCE, f"ref {int(batch['ref_id'][i])}", empty)
    return good


def is_no_target(batch: dict, i: int) -> bool:
    """Does row ``i`` name nothing? (rows without a ``no_target`` column: no)"""
    return "no_target" in batch and bool(batch["no_target"][i])


def _known_size(batch: dict, i: int) -> tuple[int, int] | None:
    """The original (H, W) when the row states it (RLE size, or height/width), else None."""
    if "mask_h" in batch:
        return int(batch["mask_h"][i]), int(batch["mask_w"][i])
    h, w = int(batch["height"][i]), int(batch["width"][i])
    return (h, w) if h > 0 and w > 0 else None


def _image(batch: dict, i: int, target_size: int | None) -> np.ndarray:
    """(h, w, 3) uint8; with ``target_size`` a JPEG may decode at 1/2, 1/4, 1/8 scale (sides >= it)."""
    kw = {"target_size": target_size, "exif": False}  # COCO masks live on the stored pixel grid
    if "image_bytes" in batch:
        return load_image(batch["image_bytes"][i], name=f"ref {int(batch['ref_id'][i])}", **kw)
    path = str(batch["image_path"][i])
    return load_image(read_bytes(path) if is_uri(path) else path, name=path, **kw)


def _mask(batch: dict, i: int, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 {0,1} from an RLE string column, a PNG path or a JSON segmentation."""
    if "mask_rle" in batch:
        return decode_mask({"size": list(size), "counts": str(batch["mask_rle"][i])})
    path = str(batch["mask_path"][i]) if "mask_path" in batch else ""
    if path:
        return load_mask_png(path)
    return decode_mask(json.loads(str(batch["seg_json"][i])), size[0], size[1])


def is_draft_size(orig: tuple[int, int], got: tuple[int, int]) -> bool:
    """Is ``got`` the size of a JPEG draft (scale 1, 1/2, 1/4, 1/8, rounded up) of ``orig``?"""
    return any(got == (-(-orig[0] // f), -(-orig[1] // f)) for f in (1, 2, 4, 8))


def load_sample(batch: dict, i: int, opts: SampleOptions) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Row ``i`` -> (image (h, w, 3) uint8, mask (H, W) uint8, (H, W) original size); raises SkipSample."""
    ref_id = int(batch["ref_id"][i])
    known = _known_size(batch, i)
    # JPEG draft decoding (faster, slightly different pixels) only for training without augmentation
    # (which needs equal image/mask sizes) and when the mask geometry is known; evaluation is exact
    draft = opts.image_size if known is not None and opts.train and not opts.augment else None
    where = str(batch["image_path"][i]) if "image_path" in batch else f"ref {ref_id}"
    try:
        image = _image(batch, i, draft)
    except FileNotFoundError:
        raise SkipSample(skips.MISSING_IMAGE_FILE, where) from None
    except ImageError as e:
        reason = skips.MISSING_IMAGE_FILE if "does not exist" in str(e) else skips.CORRUPT_IMAGE
        raise SkipSample(reason, str(e)) from None
    except OSError as e:  # remote storage errors
        raise SkipSample(skips.MISSING_IMAGE_FILE, f"{where}: {e}") from None
    orig = known or image.shape[:2]
    no_target = is_no_target(batch, i)
    try:
        mask = np.zeros(orig, np.uint8) if no_target else _mask(batch, i, orig)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise SkipSample(skips.INVALID_SEGMENTATION, f"ref {ref_id}: {e}") from None
    if mask.shape != tuple(orig) or not is_draft_size(tuple(orig), image.shape[:2]):
        raise SkipSample(skips.SIZE_MISMATCH, f"ref {ref_id}: mask {mask.shape}, image {image.shape[:2]}")
    if not no_target and not mask.any():
        raise SkipSample(skips.ZERO_AREA, f"ref {ref_id}")
    return image, mask, (int(orig[0]), int(orig[1]))


def cached_sample(batch: dict, i: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Row ``i`` of a cache batch (:mod:`refseg.data.cache`) -> (image (h, w, 3) uint8, mask (h, w)
    uint8, original (H, W))."""
    return batch["pixels"][i], batch["pixel_mask"][i], (int(batch["orig_h"][i]), int(batch["orig_w"][i]))


# ----------------------------------------------------------------------------- a batch of rows
def _empty(size: int, length: int) -> dict:
    return {"image": np.zeros((0, 3, size, size), np.uint8), "mask": np.zeros((0, size, size), np.uint8),
            "input_ids": np.zeros((0, length), np.int64), "attention_mask": np.zeros((0, length), np.int64),
            **{k: np.zeros((0,), np.int64) for k in ("ref_id", "sent_id", "orig_h", "orig_w")},
            "no_target": np.zeros((0,), np.float32)}


def decode_batch(batch: dict, tokenizer: Any, opts: SampleOptions, collector: Any = None) -> dict:
    """Ref rows -> samples: decode image + mask, augment (train), resize, tokenise; drop bad ones.

    Rows may also be cache rows (:func:`refseg.data.cache.cache_batch`). Dropped samples are logged
    and, with ``collector`` (:meth:`SkipReport.collector`), counted there. Returns the
    :data:`COLUMNS` as NumPy arrays."""
    rng = np.random.default_rng()  # OS entropy: each epoch (each execution) draws anew
    cached = "pixels" in batch  # rows of the data.cache stage: decoded already (refseg.data.cache)
    size, dropped = opts.image_size, SkipReport()
    images, masks, meta, sentences, no_target = [], [], [], [], []
    for i in range(len(batch["ref_id"])):
        ref_id = int(batch["ref_id"][i])
        good = usable_texts(batch, i, opts, dropped)
        if not good:
            continue
        if opts.train:
            good = [good[int(rng.integers(len(good)))]]
        try:
            image, mask, (orig_h, orig_w) = cached_sample(batch, i) if cached else load_sample(batch, i, opts)
        except SkipSample as e:
            dropped.add(e.reason, e.detail, len(good))
            continue
        if opts.train and opts.augment:
            image, mask, text = random_augment(  # straight to the model's geometry: one resampling
                image, mask, good[0][1], rng, hflip_prob=opts.hflip_prob, min_scale=opts.min_scale,
                out_size=resize_geometry(orig_h, orig_w, size, opts.keep_aspect))
            good = [(good[0][0], text)]
        image, mask = preprocess(image, mask, size, opts.keep_aspect, orig_size=(orig_h, orig_w))
        for sent_id, text in good:
            images.append(image)
            masks.append(mask)
            sentences.append(text)
            meta.append((ref_id, sent_id, orig_h, orig_w))
            no_target.append(is_no_target(batch, i))
    dropped.send(collector)
    if not images:
        return _empty(size, opts.max_tokens)
    input_ids, attention_mask = tokenize(tokenizer, sentences, opts.max_tokens)
    meta_arr = np.asarray(meta, dtype=np.int64)  # (B, 4)
    return {
        "image": np.stack(images),  # (B, 3, S, S) uint8
        "mask": np.stack(masks).astype(np.uint8, copy=False),  # (B, S, S) uint8 {0, 1}
        "input_ids": np.asarray(input_ids, dtype=np.int64),  # (B, L)
        "attention_mask": np.asarray(attention_mask, dtype=np.int64),  # (B, L)
        "ref_id": meta_arr[:, 0], "sent_id": meta_arr[:, 1], "orig_h": meta_arr[:, 2], "orig_w": meta_arr[:, 3],
        "no_target": np.asarray(no_target, np.float32),  # (B,)
    }
