"""The files the refer-format readers share (RefCOCO family and gRefCOCO), read without refer.py.

    refs = read_refs("data/refcoco/refs(unc).p")        # a pickle of plain dicts, globals refused
    images, anns = read_instances("data/refcoco/instances.json")
    img_dir = find_image_dir(root, None, DEFAULT_IMAGE_SUBDIRS)
    index = ImageIndex(img_dir); index.exists("COCO_train2014_000000000001.jpg")

Used by :mod:`refseg.data.sources.refer` and :mod:`refseg.data.sources.grefcoco`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refseg.data.skips import EMPTY_SENTENCE, RefSegDataError, SkipReport


# ----------------------------------------------------------------------------- refs pickle
class _RestrictedUnpickler(pickle.Unpickler):
    """Loads plain containers and scalars only: every global (class, function) is refused."""

    def __init__(self, file: io.BufferedIOBase, path: Path, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        raise RefSegDataError(
            f"refs file {self._path} contains a pickled object of type {module}.{name}; refusing to "
            "load it: only plain lists/dicts/strings/ints are allowed"
        )


def _fix_latin1(obj: Any) -> Any:
    """Python 2 ``str`` read as latin-1 -> the UTF-8 text it most likely held."""
    if isinstance(obj, str):
        try:
            return obj.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return obj
    if isinstance(obj, list):
        return [_fix_latin1(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_fix_latin1(v) for v in obj)
    if isinstance(obj, dict):
        return {_fix_latin1(k): _fix_latin1(v) for k, v in obj.items()}
    return obj


def read_refs(path: str | Path) -> list[dict]:
    """The list of ref dicts in a ``refs(<split_by>).p`` pickle, loaded without running any code.

    Python 2 byte strings that are not ASCII are read as latin-1 and re-decoded as UTF-8."""
    path = Path(path)
    data = path.read_bytes()
    try:
        try:
            refs = _RestrictedUnpickler(io.BytesIO(data), path).load()
        except UnicodeDecodeError:  # Python 2 str holding non-ASCII bytes
            refs = _fix_latin1(_RestrictedUnpickler(io.BytesIO(data), path, encoding="latin1").load())
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
    ) as e:
        if isinstance(e, RefSegDataError):
            raise
        raise RefSegDataError(
            f"refs file {path} is not a readable pickle ({type(e).__name__}: {e}); re-download it"
        ) from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise RefSegDataError(
            f"refs file {path} holds a {type(refs).__name__}, not a list of ref dicts; re-download it"
        )
    return refs


# ----------------------------------------------------------------------------- instances, images
def read_instances(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(images by id, annotations by id) from a COCO-style instances.json."""
    try:
        with open(path, "rb") as f:
            inst = json.load(f)
        images = {int(im["id"]): im for im in inst["images"]}
        anns = {int(a["id"]): a for a in inst["annotations"]}
    except (ValueError, KeyError, TypeError) as e:
        raise RefSegDataError(
            f"annotation file {path} is not a COCO instances.json ({type(e).__name__}: {e}); re-download it"
        ) from None
    return images, anns


def find_image_dir(root: Path, image_dir: str | Path | None, subdirs: Sequence[str]) -> Path:
    """``image_dir`` (checked to exist) or the first of ``root / subdir`` that exists."""
    if image_dir is not None:
        img_dir = Path(image_dir).expanduser().absolute()
        if not img_dir.is_dir():
            raise RefSegDataError(
                f"image directory {img_dir} does not exist; point data.image_dir at COCO train2014"
            )
        return img_dir
    for sub in subdirs:
        if (root / sub).is_dir():
            return root / sub
    places = [str(root / sub) for sub in subdirs]
    raise RefSegDataError(
        f"no image directory at {', '.join(places[:-1])} or {places[-1]}; "
        "put COCO train2014 there or set data.image_dir"
    )


class ImageIndex:
    """Cheap, cached existence check for image files (one listdir of the image directory)."""

    def __init__(self, image_dir: Path) -> None:
        self.image_dir = image_dir
        self._names: set[str] | None = None
        self._cache: dict[str, bool] = {}

    def exists(self, file_name: str) -> bool:
        if os.sep in file_name or "/" in file_name:  # nested name: ask the file system once
            if file_name not in self._cache:
                self._cache[file_name] = (self.image_dir / file_name).is_file()
            return self._cache[file_name]
        if self._names is None:
            self._names = set(os.listdir(self.image_dir))
        return file_name in self._names


def usable_sentences(ref: dict, report: SkipReport) -> list[dict]:
    """``[{sent_id, sentence}]`` of a ref; empty / whitespace / non-string sentences are reported."""
    sentences = []
    for s in ref.get("sentences", []):
        text = s.get("sent")
        if not isinstance(text, str) or not text.strip():
            report.add(EMPTY_SENTENCE, f"ref {ref['ref_id']} sent {s.get('sent_id')}")
            continue
        sentences.append({"sent_id": int(s["sent_id"]), "sentence": text})
    return sentences
