"""A small synthetic RefCOCO-format set: coloured shapes that only language can tell apart.

    root = make_synthetic("data/synth", num_images=400, seed=0)   # refer layout, refcoco / unc
    root = ensure_synthetic("data/synth", 400, 0)                 # create only when missing

On disk (exactly what refer / :func:`refseg.data.load_split` read)::

    <root>/images/mscoco/images/train2014/COCO_train2014_%012d.jpg
    <root>/refcoco/instances.json      COCO; annotations carry an extra "color" key
    <root>/refcoco/refs(unc).p         pickle (protocol 2) of plain dicts
    <root>/.complete                   JSON of the generation arguments, written last

Each image holds 3-5 non-overlapping shapes; most images repeat a colour or a shape, so an
expression ("the left red circle", "the biggest blue shape", "the star in the middle") is needed
to pick one. Every sentence is parsed back (:func:`parse_expression`) and checked against the scene
(:func:`referents`): it must pick out exactly its target. Images are painted from the same pycocotools
rasterisation as the annotation, so image and mask agree pixel for pixel (before JPEG).
Splits are by image: ~80% train, 10% val, 5% testA, 5% testB. Output is deterministic per seed.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from refseg.data.sources.synthetic_expressions import (
    COLORS,
    SHAPES,
    Desc,
    Obj,
    descriptions,
    parse_expression,
    referents,
    render_expression,
)

IMAGE_SUBDIR = "images/mscoco/images/train2014"
_VERSION = 1


# ----------------------------------------------------------------------------- scenes
def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[float]:
    """Flat [x1, y1, ...] outline of ``kind`` centred at (cx, cy) with circumradius ~r."""
    if kind == "circle":
        ang = rot + 2 * np.pi * np.arange(28) / 28
        pts = np.stack([np.cos(ang), np.sin(ang)], 1) * r
    elif kind == "star":
        ang = -np.pi / 2 + rot + np.pi * np.arange(10) / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        pts = np.stack([np.cos(ang) * rad, np.sin(ang) * rad], 1)
    elif kind == "triangle":
        ang = -np.pi / 2 + rot + 2 * np.pi * np.arange(3) / 3
        pts = np.stack([np.cos(ang), np.sin(ang)], 1) * r
    else:
        half = {"square": (0.72, 0.72), "rectangle": (1.0, 0.5), "diamond": (0.62, 1.0)}[kind]
        box = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * np.array(half) * r
        if kind == "diamond":
            box = np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], float) * np.array(half) * r
        c, s = math.cos(rot), math.sin(rot)
        pts = box @ np.array([[c, s], [-s, c]])
    pts = pts + np.array([cx, cy])
    return [round(float(v), 2) for v in pts.reshape(-1)]


def _place(rng: np.random.Generator, w: int, h: int, n: int) -> list[tuple[float, float, float]]:
    """``n`` non-overlapping (cx, cy, r) circles inside a w x h image (fewer if it cannot)."""
    side = min(w, h)
    r_lo, r_hi = max(7.0, 0.08 * side), 0.2 * side
    placed: list[tuple[float, float, float]] = []
    for _ in range(n):
        for attempt in range(200):
            r = float(np.exp(rng.uniform(np.log(r_lo), np.log(r_hi)))) * (0.85 if attempt > 100 else 1.0)
            cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
            if all(math.hypot(cx - x, cy - y) > r + q + 3 for x, y, q in placed):
                placed.append((float(cx), float(cy), r))
                break
    return placed


def _attributes(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """(colour, shape) per object; 95% of scenes draw from small pools so attributes repeat."""
    colors, shapes = list(COLORS), list(SHAPES)
    if rng.random() < 0.05:  # an "easy" scene: every colour and shape may be distinct
        return list(zip(rng.permutation(colors)[:n].tolist(), rng.permutation(shapes)[:n].tolist()))
    pool_c = rng.permutation(colors)[: rng.integers(2, 4)].tolist()
    pool_s = rng.permutation(shapes)[: rng.integers(2, 4)].tolist()
    return [(str(rng.choice(pool_c)), str(rng.choice(pool_s))) for _ in range(n)]


def make_scene(rng: np.random.Generator, min_size: int, max_size: int) -> dict:
    """One image's scene: size, objects (with polygons and RLEs) and its refs' descriptions."""
    while True:
        w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        spots = _place(rng, w, h, int(rng.integers(3, 6)))
        if len(spots) < 3:
            continue
        objs, anns = [], []
        for (cx, cy, r), (color, kind) in zip(spots, _attributes(rng, len(spots))):
            r_eff = r if kind != "rectangle" else r / 1.12  # keep the corners inside the circle
            poly = _polygon(kind, cx, cy, r_eff, float(rng.uniform(-0.25, 0.25)))
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            area = float(mask_utils.area(rle))
            objs.append(Obj(kind, color, x + bw / 2, y + bh / 2, area))
            anns.append({"poly": poly, "rle": rle, "bbox": [x, y, bw, bh], "area": area})
        descs = [descriptions(i, objs, w, h) for i in range(len(objs))]
        if sum(bool(d) for d in descs) >= 2 and all(a["area"] > 0 for a in anns):
            return {"w": w, "h": h, "objs": objs, "anns": anns, "descs": descs}


def render_scene(scene: dict, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: a light, slightly tinted gradient background with the shapes painted in."""
    h, w = scene["h"], scene["w"]
    base = (rng.uniform(150, 235) + rng.uniform(-12, 12, size=3)).astype(np.float32)
    ang, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0, 25)
    xs = np.arange(w, dtype=np.float32) * np.float32(np.cos(ang) * amp / w)
    ys = np.arange(h, dtype=np.float32) * np.float32(np.sin(ang) * amp / h)
    img = base + (ys[:, None] + xs[None, :])[..., None]  # (H, W, 3)
    with warnings.catch_warnings():  # pycocotools' decode warns about numpy 2's copy keyword
        warnings.simplefilter("ignore", DeprecationWarning)
        for o, a in zip(scene["objs"], scene["anns"]):
            img[mask_utils.decode(a["rle"]).astype(bool)] = COLORS[o.color]
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(0.0, 3.0))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def target_sentences(descs: list[Desc], target: int, scene: dict, rng: np.random.Generator) -> list[str]:
    """1-3 distinct sentences for one ref, each re-checked by parsing it back."""
    order = rng.permutation(len(descs))
    out: list[str] = []
    for k in order[: int(rng.integers(1, 4))]:
        sent = render_expression(descs[k], rng)
        if sent in out:
            continue
        if referents(parse_expression(sent), scene["objs"], scene["w"], scene["h"]) != [target]:
            raise AssertionError(f"synthetic expression {sent!r} is ambiguous; this is a generator bug")
        out.append(sent)
    return out


def split_names(n: int, seed: int) -> list[str]:
    """Per image split: val 10%, testA 5%, testB 5% (each at least one when n allows), rest train."""
    n_val = max(1, round(0.1 * n)) if n >= 2 else 0
    n_a = max(1, round(0.05 * n)) if n >= 3 else 0
    n_b = max(1, round(0.05 * n)) if n >= 4 else 0
    names = ["val"] * n_val + ["testA"] * n_a + ["testB"] * n_b
    names += ["train"] * (n - len(names))
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    return [names[int(p)] for p in perm]


def raw_text(sent: str, rng: np.random.Generator) -> str:
    """A 'raw' form as an annotator might type it (capitalised, maybe a full stop)."""
    raw = sent[0].upper() + sent[1:] if rng.random() < 0.5 else sent
    return raw + "." if rng.random() < 0.3 else raw


# ----------------------------------------------------------------------------- writing
def write_scene_image(img_dir: Path, image_id: int, scene: dict, rng: np.random.Generator) -> dict:
    """Render ``scene`` to ``img_dir/COCO_train2014_<id>.jpg``; return its instances.json image entry."""
    file_name = f"COCO_train2014_{image_id:012d}.jpg"
    buf = io.BytesIO()
    Image.fromarray(render_scene(scene, rng)).save(buf, format="JPEG", quality=95, subsampling=0)
    (img_dir / file_name).write_bytes(buf.getvalue())
    return {"id": image_id, "file_name": file_name, "height": scene["h"], "width": scene["w"]}


def scene_annotation(ann_id: int, image_id: int, obj: Obj, ann: dict) -> dict:
    """The instances.json annotation of one drawn shape (with an extra ``color`` key)."""
    return {"id": ann_id, "image_id": image_id, "category_id": SHAPES.index(obj.shape) + 1,
            "segmentation": [ann["poly"]], "area": ann["area"], "bbox": ann["bbox"], "iscrowd": 0,
            "color": obj.color}


def categories() -> list[dict]:
    """The instances.json categories: one per shape."""
    return [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]


def _write(tmp: Path, num_images: int, seed: int, min_size: int, max_size: int) -> None:
    img_dir = tmp / IMAGE_SUBDIR
    img_dir.mkdir(parents=True)
    (tmp / "refcoco").mkdir()
    images, anns, refs = [], [], []
    splits = split_names(num_images, seed)
    ann_id, ref_id, sent_id = 1, 0, 0
    for idx in range(num_images):
        rng = np.random.default_rng([seed, idx])
        scene = make_scene(rng, min_size, max_size)
        image_id = idx + 1
        images.append(write_scene_image(img_dir, image_id, scene, rng))
        for k, (o, a, descs) in enumerate(zip(scene["objs"], scene["anns"], scene["descs"])):
            anns.append(scene_annotation(ann_id, image_id, o, a))
            if descs:
                sents = target_sentences(descs, k, scene, rng)
                ids = list(range(sent_id, sent_id + len(sents)))
                sent_id += len(sents)
                refs.append({
                    "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id,
                    "category_id": SHAPES.index(o.shape) + 1, "split": splits[idx],
                    "file_name": f"COCO_train2014_{image_id:012d}_{k}.jpg", "sent_ids": ids,
                    "sentences": [{"sent_id": i, "sent": s, "raw": raw_text(s, rng), "tokens": s.split()}
                                  for i, s in zip(ids, sents)],
                })
                ref_id += 1
            ann_id += 1
    instances = {
        "info": {"description": "refseg synthetic shapes", "seed": seed, "num_images": num_images},
        "images": images, "annotations": anns,
        "categories": categories(),
    }
    (tmp / "refcoco" / "instances.json").write_text(json.dumps(instances))
    (tmp / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    marker = {"num_images": num_images, "seed": seed, "min_size": min_size, "max_size": max_size,
              "version": _VERSION, "refs": len(refs), "sentences": sent_id}
    (tmp / ".complete").write_text(json.dumps(marker))


def _marker(root: Path) -> dict | None:
    try:
        return json.loads((root / ".complete").read_text())
    except (OSError, ValueError):
        return None


def make_synthetic(out_dir: str | os.PathLike, num_images: int = 400, seed: int = 0, *,
                   min_size: int = 96, max_size: int = 192, _replace: bool = True) -> Path:
    """Write a synthetic refcoco/unc set under ``out_dir`` atomically and return its path.

    The set is built in a hidden sibling directory and renamed into place, so ``out_dir`` either
    holds a complete set (with ``.complete``) or nothing. A previous synthetic set there is replaced;
    a non-empty directory that is not one raises FileExistsError. Image sides are drawn from
    [min_size, max_size] pixels independently (mixed aspect)."""
    check_synthetic_args(num_images, min_size, max_size)
    return write_atomically(out_dir, lambda tmp: _write(tmp, num_images, seed, min_size, max_size), _replace)


def check_synthetic_args(num_images: int, min_size: int, max_size: int) -> None:
    """Raise ValueError unless num_images >= 1 and 32 <= min_size <= max_size."""
    if num_images < 1 or not 32 <= min_size <= max_size:
        raise ValueError(f"make_synthetic needs num_images >= 1 and 32 <= min_size <= max_size, "
                         f"got {num_images}, {min_size}, {max_size}")


def write_atomically(out_dir: str | os.PathLike, write: Callable[[Path], None], replace: bool = True) -> Path:
    """Run ``write(tmp)`` (which fills the new directory ``tmp`` and writes ``tmp/.complete`` last) in a
    hidden sibling of ``out_dir`` and rename it to ``out_dir``; an earlier synthetic set there is
    replaced when ``replace``. A non-empty directory that is not a synthetic set raises FileExistsError."""
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and _marker(out) is None)):
        raise FileExistsError(f"synthetic output '{out}' exists and is not an empty directory or an "
                              f"earlier synthetic set; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        try:
            os.rename(tmp, out)  # succeeds when ``out`` is missing or an empty directory
        except OSError:
            if not replace or _marker(out) is None:
                raise FileExistsError(f"synthetic output '{out}' appeared while it was being written; "
                                      f"choose a new directory") from None
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_synthetic(root: str | os.PathLike, num_images: int = 400, seed: int = 0, *,
                     min_size: int = 96, max_size: int = 192) -> Path:
    """Return ``root`` holding a synthetic set made with these arguments, creating it only if missing.

    Safe when several processes call it at once: each builds privately and the first rename wins."""
    want = {"num_images": num_images, "seed": seed, "min_size": min_size, "max_size": max_size,
            "version": _VERSION}
    return ensure_made(root, want, lambda replace: make_synthetic(
        root, num_images, seed, min_size=min_size, max_size=max_size, _replace=replace))


def ensure_made(root: str | os.PathLike, want: dict, make: Callable[[bool], Path]) -> Path:
    """``root`` when its ``.complete`` marker holds ``want``; else ``make(replace)`` builds it (replacing
    an earlier synthetic set made with other arguments, never a racing writer's)."""
    root = Path(root).absolute()

    def matches() -> bool:
        m = _marker(root)
        return m is not None and all(m.get(k) == v for k, v in want.items())

    if matches():
        return root
    try:
        make(_marker(root) is not None)
    except OSError:
        if not matches():  # another process may have won the race with the same arguments
            raise
    return root
