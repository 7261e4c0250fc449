"""Data: sources (refer files, gRefCOCO, manifests, Parquet shards, synthetic) -> ref rows -> decoded samples.

    from refseg.data import load_split, build_dataset, write_shards, read_manifest, SkipReport

- :mod:`refseg.data.sources` -- readers that turn each kind of input into records;
- :mod:`refseg.data.masks` -- COCO polygons / RLE <-> binary masks;
- :mod:`refseg.data.skips` -- the report of skipped samples, the exception, every skip reason;
- :mod:`refseg.data.refs` -- records grouped per ref (capped, shuffled), as an Arrow table;
- :mod:`refseg.data.transforms` / :mod:`refseg.data.samples` -- decode, augment, tokenise one row;
- :mod:`refseg.data.pipeline` -- the Ray Data builders; :mod:`refseg.data.cache` -- decode once.

Importing this package does not import Ray: the names below are resolved on first attribute access
(``build_dataset`` and ``count_refs`` then import :mod:`refseg.data.pipeline`, which imports ray).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "skips": ["RefSegDataError", "SkipReport", "SkipSample"],
    "sources.refer": ["load_split", "load_split_refs", "split_matches"],
    "sources.coco_files": ["read_refs"],
    "sources.synthetic": ["make_synthetic", "ensure_synthetic"],
    "sources.synthetic_generalized": ["make_generalized_synthetic", "ensure_generalized_synthetic"],
    "sources.manifest": ["read_manifest", "write_manifest", "load_mask_png"],
    "sources.shards": ["write_shards", "prepare"],
    "masks": ["decode_mask", "encode_rle", "rle_to_mask", "segmentation_problem"],
    "transforms": ["load_image", "ImageError", "preprocess", "preprocess_with_meta", "unresize_logits",
                   "random_augment", "hflip_sample", "swap_left_right", "tokenize",
                   "IMAGENET_MEAN", "IMAGENET_STD"],
    "refs": ["derangement", "ensure_synthetic_data", "group_refs", "load_refs"],
    "samples": ["COLUMNS", "SampleOptions", "TokenizerSpec", "decode_batch", "fast_tokenizer", "sample_opts",
                "tokenizer_spec"],
    "pipeline": ["build_dataset", "count_refs"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)  # noqa: PLE0605


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'refseg.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"refseg.data.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
