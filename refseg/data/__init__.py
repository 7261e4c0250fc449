"""Data: refer-format reader, masks, transforms, synthetic generator, manifests, shards, Ray Data builders.

    from refseg.data import load_split, build_dataset, write_shards, read_manifest

Importing this package does not import Ray: the names below are resolved on first attribute access
(``build_dataset`` and ``SkipTally`` then import :mod:`refseg.data.ray_data`, which imports ray).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "errors": ["RefSegDataError", "SkipReport"],
    "refer": ["load_split", "load_split_refs", "read_refs", "split_matches"],
    "masks": ["decode_mask", "encode_rle", "rle_to_mask", "segmentation_problem"],
    "synthetic": ["make_synthetic", "ensure_synthetic"],
    "transforms": ["load_image", "ImageError", "preprocess", "preprocess_with_meta", "unresize_logits",
                   "random_augment", "hflip_sample", "swap_left_right", "tokenize",
                   "IMAGENET_MEAN", "IMAGENET_STD"],
    "manifest": ["read_manifest", "write_manifest", "load_mask_png", "read_bytes", "filesystem_and_path"],
    "shards": ["write_shards", "prepare"],
    "ray_data": ["build_dataset", "count_refs", "SkipTally", "TokenizerSpec", "tokenizer_spec", "get_tokenizer",
                 "decode_batch", "derangement", "group_refs", "load_refs", "COLUMNS"],
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
