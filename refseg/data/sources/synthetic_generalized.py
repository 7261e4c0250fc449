"""The synthetic shapes world in the gRefCOCO layout: expressions naming one shape, several, or none.

    root = make_generalized_synthetic("data/synth_g", num_images=400, seed=0)
    root = ensure_generalized_synthetic("data/synth_g", 400, 0)     # create only when missing
    meant("both red circles", objs, w, h)                            # [1, 3]: the checker

On disk (what :mod:`refseg.data.sources.grefcoco` reads)::

    <root>/images/train2014/COCO_train2014_%012d.jpg
    <root>/grefcoco/instances.json      COCO; annotations carry an extra "color" key
    <root>/grefcoco/grefs(unc).json     refs: ann_id a list ([-1] = no target), category_id a list
    <root>/.complete                    JSON of the generation arguments and ref counts, written last

The scenes and images are those of :mod:`refseg.data.sources.synthetic`. Per image: every shape an
expression can single out gets a one-target ref ("the leftmost red circle"), as in the classic
set; about one ref per three of those names a group of 2+ shapes ("all red shapes", "both
circles", "the two squares on the left"); as many name a colour and/or shape that is not in the
image ("the purple star"), i.e. no target. Over a set that is ~60% / 20% / 20% of the refs. Every
sentence is parsed back and checked against the scene (:func:`meant`): it must pick out exactly its
targets (none for no-target). Splits are by image, as in the classic set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refseg.data.sources.synthetic import (
    categories,
    check_synthetic_args,
    ensure_made,
    make_scene,
    raw_text,
    scene_annotation,
    split_names,
    target_sentences,
    write_atomically,
    write_scene_image,
)
from refseg.data.sources.synthetic_expressions import (
    COLORS,
    NOUNS,
    POS_MARGIN,
    SHAPES,
    Desc,
    Obj,
    parse_expression,
    referents,
    render_expression,
)

IMAGE_SUBDIR = "images/train2014"
_VERSION = "grefcoco-1"
PLURALS = {w: w + "s" for w in (*SHAPES, *NOUNS)}  # circle -> circles, one -> ones
_SINGULAR = {p: w for w, p in PLURALS.items()}
_TWO_SUPERLATIVE = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "lowest"}
_TWO_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


@dataclass(frozen=True)
class Group:
    """The meaning of a plural expression: colour and/or shape, and a quantity: None ("all red
    shapes", "the circles": every match), "both" (exactly two match) or "two" (with ``sel`` left /
    right / top / bottom: the two extreme matches, clearly apart from the rest)."""

    color: str | None = None
    shape: str | None = None
    quantity: str | None = None
    sel: str | None = None


# ----------------------------------------------------------------------------- the logic checker
def group_referents(g: Group, objs: Sequence[Obj], width: int, height: int) -> list[int] | None:
    """Indices of the objects ``g`` names (sorted), or None when its wording does not fit the scene
    ("both" over three matches, "the two on the left" without a clear gap to the third)."""
    cands = referents(Desc(g.color, g.shape), objs, width, height)  # every match (no selector)
    if g.quantity is None:
        return cands
    if g.sel is None:  # "both circles", "the two circles"
        return cands if len(cands) == 2 else None
    if len(cands) < 3:
        return None
    horizontal = g.sel in ("left", "right")
    sign = 1.0 if g.sel in ("left", "top") else -1.0
    order = sorted(cands, key=lambda i: sign * (objs[i].cx if horizontal else objs[i].cy))
    key = [sign * (objs[i].cx if horizontal else objs[i].cy) for i in order]
    if key[2] - key[1] < POS_MARGIN * (width if horizontal else height):
        return None
    return sorted(order[:2])


def is_plural(sentence: str) -> bool:
    """Does ``sentence`` use the plural grammar (a plural noun, "all", "both", "two")?"""
    words = sentence.lower().strip().rstrip(".").split()
    return any(w in _SINGULAR or w in ("all", "both", "two") for w in words)


def parse_group(sentence: str) -> Group:
    """Read a generated plural sentence back into its meaning; raises ValueError on an unknown word."""
    words = sentence.lower().strip().rstrip(".").split()
    sel = None
    for name, phrase in _TWO_PHRASE.items():
        tail = phrase.split()
        if words[-len(tail):] == tail:
            sel, words = name, words[:-len(tail)]
            break
    color = shape = quantity = None
    for w in words:
        if w in ("the", "all") or w in ("shapes", "objects", "ones"):
            continue
        if w in ("both", "two"):
            quantity = w
        elif w in COLORS:
            color = w
        elif w in _SINGULAR:
            shape = _SINGULAR[w]
        elif w in _TWO_SUPERLATIVE.values():
            sel = next(k for k, v in _TWO_SUPERLATIVE.items() if v == w)
        else:
            raise ValueError(f"unknown word {w!r} in synthetic expression {sentence!r}")
    return Group(color, shape, quantity, sel)


def meant(sentence: str, objs: Sequence[Obj], width: int, height: int) -> list[int] | None:
    """The objects a generated sentence (singular or plural) names: [] = none, None = ill-fitting."""
    if is_plural(sentence):
        return group_referents(parse_group(sentence), objs, width, height)
    return referents(parse_expression(sentence), objs, width, height)


# ----------------------------------------------------------------------------- wording
def render_group(g: Group, rng: np.random.Generator) -> str:
    """One lower-case plural sentence for ``g`` (wording picked by ``rng``)."""
    noun = PLURALS[g.shape] if g.shape else str(rng.choice(["shapes", "objects"]))
    color = f"{g.color} " if g.color else ""
    if g.quantity is None:
        return f"{rng.choice(['all', 'all the', 'the'])} {color}{noun}"
    if g.quantity == "both" or g.sel is None:
        return f"{rng.choice(['both', 'both the', 'the two'])} {color}{noun}"
    if rng.random() < 0.5:
        return f"the two {color}{noun} {_TWO_PHRASE[g.sel]}"
    return f"the two {_TWO_SUPERLATIVE[g.sel]} {color}{noun}"


def groups(objs: Sequence[Obj], width: int, height: int) -> dict[tuple[int, ...], list[Group]]:
    """Target set (2+ objects) -> every plural meaning that names exactly it."""
    found: dict[tuple[int, ...], list[Group]] = {}
    colors = sorted({o.color for o in objs}) + [None]
    shapes = sorted({o.shape for o in objs}) + [None]
    for color in colors:
        for shape in shapes:
            if color is None and shape is None:
                continue
            for quantity, sels in ((None, (None,)), ("both", (None,)), ("two", tuple(_TWO_PHRASE))):
                for sel in sels:
                    g = Group(color, shape, quantity, sel)
                    targets = group_referents(g, objs, width, height)
                    if targets is not None and len(targets) >= 2:
                        found.setdefault(tuple(targets), []).append(g)
    return found


def absent(objs: Sequence[Obj], width: int, height: int) -> list[Desc]:
    """Singular meanings that name nothing in the scene: a colour and/or shape no object has."""
    out = []
    for color in (*COLORS, None):
        for shape in (*SHAPES, None):
            if (color or shape) and not referents(Desc(color, shape), objs, width, height):
                out.append(Desc(color, shape))
    return out


def _checked(sentences: list[str], targets: list[int], scene: dict) -> list[str]:
    """``sentences`` without repeats, each verified to name exactly ``targets``."""
    out: list[str] = []
    for sent in sentences:
        if sent in out:
            continue
        if meant(sent, scene["objs"], scene["w"], scene["h"]) != targets:
            raise AssertionError(f"synthetic expression {sent!r} does not name {targets}; this is a generator bug")
        out.append(sent)
    return out


def scene_refs(scene: dict, rng: np.random.Generator) -> list[tuple[list[int], list[str]]]:
    """(target object indices, sentences) per ref of one scene: one-target, multi-target, no-target."""
    w, h, objs = scene["w"], scene["h"], scene["objs"]
    refs = [([k], target_sentences(d, k, scene, rng)) for k, d in enumerate(scene["descs"]) if d]
    n_extra = max(1, round(len(refs) / 3))
    found = groups(objs, w, h)
    for key in [list(found)[int(i)] for i in rng.permutation(len(found))[:n_extra]]:
        means = found[key]
        sents = [render_group(means[int(i)], rng) for i in rng.permutation(len(means))[: int(rng.integers(1, 3))]]
        refs.append((list(key), _checked(sents, list(key), scene)))
    nothing = absent(objs, w, h)
    for _ in range(n_extra):
        picks = rng.permutation(len(nothing))[: int(rng.integers(1, 3))]
        refs.append(([], _checked([render_expression(nothing[int(i)], rng) for i in picks], [], scene)))
    return refs


# ----------------------------------------------------------------------------- writing
def _write(tmp: Path, num_images: int, seed: int, min_size: int, max_size: int) -> None:
    img_dir = tmp / IMAGE_SUBDIR
    img_dir.mkdir(parents=True)
    (tmp / "grefcoco").mkdir()
    images, anns, refs = [], [], []
    splits = split_names(num_images, seed)
    counts = {"one": 0, "multi": 0, "none": 0}
    sent_id = 0
    for idx in range(num_images):
        rng = np.random.default_rng([seed, idx])
        scene = make_scene(rng, min_size, max_size)
        image_id = idx + 1
        images.append(write_scene_image(img_dir, image_id, scene, rng))
        first = len(anns) + 1  # annotation ids run over the whole set
        anns += [scene_annotation(first + k, image_id, o, a)
                 for k, (o, a) in enumerate(zip(scene["objs"], scene["anns"]))]
        for targets, sents in scene_refs(scene, rng):
            ids = list(range(sent_id, sent_id + len(sents)))
            sent_id += len(sents)
            counts["none" if not targets else "one" if len(targets) == 1 else "multi"] += 1
            refs.append({
                "ref_id": len(refs), "image_id": image_id, "split": splits[idx],
                "ann_id": [first + k for k in targets] or [-1], "no_target": not targets,
                "category_id": [SHAPES.index(scene["objs"][k].shape) + 1 for k in targets] or [-1],
                "file_name": f"COCO_train2014_{image_id:012d}_{len(refs)}.jpg", "sent_ids": ids,
                "sentences": [{"sent_id": i, "sent": s, "raw": raw_text(s, rng), "tokens": s.split()}
                              for i, s in zip(ids, sents)],
            })
    instances = {"info": {"description": "refseg synthetic shapes (generalized)", "seed": seed},
                 "images": images, "annotations": anns, "categories": categories()}
    (tmp / "grefcoco" / "instances.json").write_text(json.dumps(instances))
    (tmp / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    marker = {"num_images": num_images, "seed": seed, "min_size": min_size, "max_size": max_size,
              "version": _VERSION, "refs": counts, "sentences": sent_id}
    (tmp / ".complete").write_text(json.dumps(marker))


def make_generalized_synthetic(out_dir: str | os.PathLike, num_images: int = 400, seed: int = 0, *,
                               min_size: int = 96, max_size: int = 192, replace: bool = True) -> Path:
    """Write a synthetic gRefCOCO-layout set under ``out_dir`` atomically and return its path (as
    :func:`refseg.data.sources.synthetic.make_synthetic`: an earlier synthetic set there is replaced
    when ``replace``; any other non-empty directory raises FileExistsError)."""
    check_synthetic_args(num_images, min_size, max_size)
    return write_atomically(out_dir, lambda tmp: _write(tmp, num_images, seed, min_size, max_size), replace)


def ensure_generalized_synthetic(root: str | os.PathLike, num_images: int = 400, seed: int = 0, *,
                                 min_size: int = 96, max_size: int = 192) -> Path:
    """Return ``root`` holding a generalized synthetic set made with these arguments, creating it
    only if missing (safe when several processes call it at once)."""
    want = {"num_images": num_images, "seed": seed, "min_size": min_size, "max_size": max_size,
            "version": _VERSION}
    return ensure_made(root, want, lambda replace: make_generalized_synthetic(
        root, num_images, seed, min_size=min_size, max_size=max_size, replace=replace))
