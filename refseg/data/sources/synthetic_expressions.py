"""The expression language of the synthetic set: meanings, sentences, and the checker.

    desc = parse_expression("the leftmost red circle")   # Desc(color="red", shape="circle", sel="left")
    referents(desc, objs, width, height)                  # [i]: the expression names exactly objs[i]
    render_expression(desc, rng)                          # one sentence for a meaning

An expression names a colour and/or a shape, optionally with a selector (left, right, top, bottom,
big, small, middle) said as a comparative ("the left circle": exactly two candidates), a superlative
("the leftmost circle") or a phrase ("the circle on the left"). :func:`descriptions` lists every
non-redundant meaning that picks out one object of a scene.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (145, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "rectangle")
NOUNS = ("shape", "object", "one")  # stand-ins when the shape is not named
SIZE_RATIO = 1.5  # "bigger" needs at least this area ratio over every rival
POS_MARGIN = 0.1  # "left" needs a lead of this fraction of the image width (height for top/bottom)

# selector -> words; comparatives are only used (and only valid) with exactly two candidates
_COMPARATIVE = {"left": ["left"], "right": ["right"], "top": ["top", "upper"],
                "bottom": ["bottom", "lower"], "big": ["bigger", "larger"], "small": ["smaller"]}
_SUPERLATIVE = {"left": ["leftmost"], "right": ["rightmost"], "top": ["topmost", "highest"],
                "bottom": ["bottommost", "lowest"], "big": ["biggest", "largest"], "small": ["smallest"]}
_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
           "bottom": "at the bottom", "middle": "in the middle"}


@dataclass(frozen=True)
class Obj:
    """One drawn shape; ``cx, cy`` is its bounding-box centre (pixels), ``area`` its mask area."""

    shape: str
    color: str
    cx: float
    cy: float
    area: float


@dataclass(frozen=True)
class Desc:
    """The meaning of an expression. ``sel`` in {None, left, right, top, bottom, big, small, middle};
    ``comparative`` marks two-way words ("left", "bigger") that need exactly two candidates."""

    color: str | None = None
    shape: str | None = None
    sel: str | None = None
    comparative: bool = False


# ----------------------------------------------------------------------------- the logic checker
def referents(desc: Desc, objs: Sequence[Obj], width: int, height: int) -> list[int]:
    """Indices of the objects ``desc`` may mean; an expression is unambiguous iff this is one index.

    Superlatives/phrases pick the extreme candidate, but every candidate within the margin
    (POS_MARGIN of the image side, SIZE_RATIO in area) of the extreme counts as meant too."""
    cands = [i for i, o in enumerate(objs)
             if desc.color in (None, o.color) and desc.shape in (None, o.shape)]
    if desc.sel is None or len(cands) < 2:
        return cands
    if desc.comparative and len(cands) != 2:
        return cands  # "the left circle" among three circles names none of them for sure
    if desc.sel == "middle":
        if len(cands) != 3:
            return cands
        a, b, c = sorted(cands, key=lambda i: objs[i].cx)
        m = POS_MARGIN * width
        ok = objs[b].cx - objs[a].cx >= m and objs[c].cx - objs[b].cx >= m
        return [b] if ok else cands
    if desc.sel in ("big", "small"):
        areas = {i: objs[i].area for i in cands}
        if desc.sel == "big":
            best = max(areas.values())
            return [i for i in cands if areas[i] * SIZE_RATIO > best]
        best = min(areas.values())
        return [i for i in cands if areas[i] < best * SIZE_RATIO]
    horizontal = desc.sel in ("left", "right")
    sign = 1.0 if desc.sel in ("left", "top") else -1.0
    key = {i: sign * (objs[i].cx if horizontal else objs[i].cy) for i in cands}
    best = min(key.values())
    margin = POS_MARGIN * (width if horizontal else height)
    return [i for i in cands if key[i] - best < margin]


def render_expression(desc: Desc, rng: np.random.Generator) -> str:
    """One lower-case sentence for ``desc`` (wording picked by ``rng``)."""
    noun = desc.shape or str(rng.choice(NOUNS))
    color = f"{desc.color} " if desc.color else ""
    if desc.sel is None:
        return f"the {color}{noun}"
    if desc.comparative:
        return f"the {rng.choice(_COMPARATIVE[desc.sel])} {color}{noun}"
    if desc.sel == "middle":
        return f"the middle {color}{noun}" if rng.random() < 0.5 else f"the {color}{noun} in the middle"
    if desc.sel in _PHRASE and rng.random() < 0.4:
        return f"the {color}{noun} {_PHRASE[desc.sel]}"
    return f"the {rng.choice(_SUPERLATIVE[desc.sel])} {color}{noun}"


def parse_expression(sentence: str) -> Desc:
    """Read a generated sentence back into its meaning; raises ValueError on any unknown word."""
    words = sentence.lower().strip().rstrip(".").split()
    sel, comparative = None, False
    for sel_name, phrase in _PHRASE.items():
        tail = phrase.split()
        if words[-len(tail):] == tail:
            sel, words = sel_name, words[:-len(tail)]
            break
    color = shape = None
    for w in words:
        if w == "the" or w in NOUNS:
            continue
        if w in COLORS:
            color = w
        elif w in SHAPES:
            shape = w
        elif w == "middle":
            sel = "middle"
        elif any(w in v for v in _COMPARATIVE.values()):
            sel, comparative = next(k for k, v in _COMPARATIVE.items() if w in v), True
        elif any(w in v for v in _SUPERLATIVE.values()):
            sel = next(k for k, v in _SUPERLATIVE.items() if w in v)
        else:
            raise ValueError(f"unknown word {w!r} in synthetic expression {sentence!r}")
    return Desc(color, shape, sel, comparative)


def descriptions(target: int, objs: Sequence[Obj], width: int, height: int) -> list[Desc]:
    """Every non-redundant description that picks out exactly ``objs[target]``."""
    o = objs[target]
    found = []
    for color in (o.color, None):
        for shape in (o.shape, None):
            if color is None and shape is None and len(objs) > 1:
                plain_unique = False
            else:
                plain_unique = referents(Desc(color, shape), objs, width, height) == [target]
            if plain_unique:
                found.append(Desc(color, shape))
                continue  # a selector on top would be redundant
            for sel in ("left", "right", "top", "bottom", "big", "small", "middle"):
                for comparative in ((False, True) if sel != "middle" else (False,)):
                    d = Desc(color, shape, sel, comparative)
                    if referents(d, objs, width, height) == [target]:
                        found.append(d)
    return found
