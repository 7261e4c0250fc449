"""Referring-segmentation metrics: per-sample intersection/union and a mergeable accumulator.

    m = SegMetrics()
    m.update(pred, gt)                  # (B, H, W) or (H, W) bool-ish arrays (numpy or torch)
    m.merge(SegMetrics.from_state(other_worker_state))
    m.compute()   # {"oiou", "miou", "median_iou", "dice", "precision_at": {"0.5".."0.9"}, ...}

One sample = one (ref, sentence) pair. With I, U, P, G the sample's intersection, union, predicted
and ground-truth areas in pixels:
- oiou = sum(I) / sum(U) over the split (0 when sum(U) = 0).
- miou = mean of I/U; a sample with U = 0 scores 0 (LAVT).  median_iou = median of the same values.
- dice = mean of 2I/(P+G); a sample with P+G = 0 (both masks empty) scores 0, like miou's U = 0.
- precision_at[t] = share of samples with IoU >= t (LAVT's >=, exact integer test 10*I >= 10t*U;
  U = 0 never counts).
- mean_precision = mean of I/P (P = 0 -> 0); mean_recall = mean of I/G (G = 0 -> 0).
Sums of integers are exact and float means use math.fsum, so merging partial states in any order
gives exactly the serial result. No torch or ray import: tensors are converted with ``.numpy()``.

:class:`GresMetrics` scores generalized data (gRefCOCO: one-, multi- and no-target expressions) by
the GRES conventions of ReLA's ``refer_evaluation`` (its docstring).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

THRESHOLDS = ("0.5", "0.6", "0.7", "0.8", "0.9")
STATE_KEYS = ("intersection", "union", "pred_area", "gt_area", "key")


def _as_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like or a (possibly CUDA / grad-tracking) torch tensor."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_masks(x: Any) -> np.ndarray:
    """(B, H, W) bool from a (B, H, W) / (H, W) / (B, 1, H, W) bool-ish array (nonzero = foreground)."""
    a = _as_numpy(x)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"masks must be (H, W), (B, H, W) or (B, 1, H, W), got shape {a.shape}")
    return a.astype(bool, copy=False)


def _is_mask_list(x: Any) -> bool:
    return isinstance(x, (list, tuple))


def _areas(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample (I, U, P, G) int64 (B,). ``pred``/``gt`` may also be lists of (H_i, W_i) masks."""
    if _is_mask_list(pred) or _is_mask_list(gt):
        if len(pred) != len(gt):
            raise ValueError(f"got {len(pred)} predictions for {len(gt)} ground-truth masks")
        parts = [_areas(p, g) for p, g in zip(pred, gt)]
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty, empty
        return tuple(np.concatenate(c) for c in zip(*parts))  # type: ignore[return-value]
    p, g = _as_masks(pred), _as_masks(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} != ground-truth shape {g.shape}")
    inter = np.count_nonzero(p & g, axis=(1, 2)).astype(np.int64)
    pa = np.count_nonzero(p, axis=(1, 2)).astype(np.int64)
    ga = np.count_nonzero(g, axis=(1, 2)).astype(np.int64)
    return inter, pa + ga - inter, pa, ga


def intersection_union(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample intersection and union in pixels, int64 (B,) ((1,) for a single (H, W) mask).

    ``pred``/``gt``: bool-ish (nonzero = foreground) arrays or tensors of equal shape
    (H, W) | (B, H, W) | (B, 1, H, W), or equal-length lists of (H_i, W_i) masks."""
    inter, union, _, _ = _areas(pred, gt)
    return inter, union


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num/den per sample, 0 where den == 0 (float64)."""
    out = np.zeros(num.shape, dtype=np.float64)
    nz = den > 0
    out[nz] = num[nz] / den[nz]
    return out


def _mean(values: np.ndarray) -> float:
    """Order-independent mean (exactly rounded sum)."""
    return math.fsum(values.tolist()) / len(values) if len(values) else 0.0


class SegMetrics:
    """Accumulates per-sample I, U, P, G (int64) and computes the split's metrics.

    ``state()`` / ``from_state()`` / ``merge()`` move partial results between workers; the result
    never depends on merge order. ``key`` (optional, e.g. sent_id; -1 when not given) is carried
    along so per-sample IoUs can be traced back."""

    def __init__(self) -> None:
        self._chunks: dict[str, list[np.ndarray]] = {k: [] for k in STATE_KEYS}

    # -- accumulation
    def add(
        self,
        intersection: Any,
        union: Any,
        pred_area: Any,
        gt_area: Any,
        keys: Any | None = None,
    ) -> None:
        """Add samples from per-sample area arrays (equal length, pixels)."""
        cols = [
            np.atleast_1d(_as_numpy(v)).astype(np.int64).ravel()
            for v in (intersection, union, pred_area, gt_area)
        ]
        n = len(cols[0])
        key = (
            np.full(n, -1, dtype=np.int64)
            if keys is None
            else np.atleast_1d(_as_numpy(keys)).astype(np.int64).ravel()
        )
        if any(len(c) != n for c in cols) or len(key) != n:
            raise ValueError("intersection, union, pred_area, gt_area (and keys) must have equal lengths")
        if np.any(cols[0] > np.minimum(cols[2], cols[3])) or np.any(cols[1] != cols[2] + cols[3] - cols[0]):
            raise ValueError("inconsistent areas: need I <= min(P, G) and U == P + G - I")
        for name, col in zip(STATE_KEYS, cols + [key]):
            self._chunks[name].append(col)

    def update(self, pred: Any, gt: Any, keys: Any | None = None) -> None:
        """Add a batch of predicted / ground-truth masks (see :func:`intersection_union` for shapes)."""
        inter, union, pa, ga = _areas(pred, gt)
        self.add(inter, union, pa, ga, keys)

    def merge(self, other: SegMetrics) -> SegMetrics:
        """Append ``other``'s samples to this accumulator (in place); returns self."""
        state = other.state()
        self.add(state["intersection"], state["union"], state["pred_area"], state["gt_area"], state["key"])
        return self

    # -- state
    def _column(self, name: str) -> np.ndarray:
        chunks = self._chunks[name]
        if len(chunks) != 1:
            chunks[:] = [np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)]
        return chunks[0]

    def state(self) -> dict[str, np.ndarray]:
        """``{"intersection", "union", "pred_area", "gt_area", "key"}`` -> int64 (N,) arrays (copies)."""
        return {name: self._column(name).copy() for name in STATE_KEYS}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SegMetrics:
        """Rebuild from :meth:`state` (``key`` may be absent)."""
        m = cls()
        m.add(state["intersection"], state["union"], state["pred_area"], state["gt_area"], state.get("key"))
        return m

    def __len__(self) -> int:
        return int(sum(len(c) for c in self._chunks["intersection"]))

    # -- results
    def ious(self) -> np.ndarray:
        """Per-sample IoU (float64, U = 0 -> 0), in accumulation order."""
        return _ratio(self._column("intersection"), self._column("union"))

    def compute(self) -> dict:
        """The split's metrics (module docstring); floats in [0, 1]."""
        inter, union = self._column("intersection"), self._column("union")
        pa, ga = self._column("pred_area"), self._column("gt_area")
        n = len(inter)
        total_u = int(union.sum())
        iou = _ratio(inter, union)
        precision_at = {}
        for t in THRESHOLDS:
            k = int(t[2:])  # "0.7" -> 7: IoU >= k/10  <=>  10 I >= k U (exact, integers)
            hits = np.count_nonzero((union > 0) & (10 * inter >= k * union))
            precision_at[t] = hits / n if n else 0.0
        return {
            "oiou": int(inter.sum()) / total_u if total_u else 0.0,
            "miou": _mean(iou),
            "median_iou": float(np.median(iou)) if n else 0.0,
            "dice": _mean(_ratio(2 * inter, pa + ga)),
            "precision_at": precision_at,
            "mean_precision": _mean(_ratio(inter, pa)),
            "mean_recall": _mean(_ratio(inter, ga)),
            "num_samples": n,
        }


GRES_THRESHOLDS = ("0.7", "0.8", "0.9")
GRES_FLAGS = ("gt_no_target", "pred_no_target")


class GresMetrics:
    """Mergeable GRES metrics (gRefCOCO; ReLA's ``refer_evaluation``). One sample = one (ref, sentence).

    Per sample: the areas I, U, P, G (as :class:`SegMetrics`) and two flags, ``gt_no_target`` (the
    expression names nothing; G must be 0) and ``pred_no_target`` (the model said so). Scores:
    - a no-target sample predicted no-target: IoU 1, adds nothing to sum(I) or sum(U);
    - a no-target sample not predicted no-target: IoU 0, its U (= its predicted area) adds to sum(U);
    - a target sample predicted no-target: I = 0, IoU 0, its U still adds to sum(U);
    - a target sample: IoU = I / U, adds I and U.
    giou = mean IoU over all samples; ciou = sum(I) / sum(U) (0 when sum(U) = 0); n_acc = share of the
    no-target samples predicted no-target; t_acc = share of the target samples not predicted no-target
    (each 0 without such samples; ReLA reports t_acc = 0 too when a split has no no-target sample);
    precision_at[t] = share of the target samples with IoU >= t (exact integer test, 10 I >= 10t U).
    ``state`` / ``from_state`` / ``merge`` move partial results between actors and ranks; the result never
    depends on merge order (integer sums, math.fsum)."""

    def __init__(self) -> None:
        self.areas = SegMetrics()
        self._flags: dict[str, list[np.ndarray]] = {k: [] for k in GRES_FLAGS}

    def add(self, intersection: Any, union: Any, pred_area: Any, gt_area: Any, gt_no_target: Any,
            pred_no_target: Any, keys: Any | None = None) -> None:
        """Add samples from per-sample areas (pixels) and no-target flags (bool-ish), equal lengths."""
        flags = [np.atleast_1d(_as_numpy(v)).astype(bool).ravel() for v in (gt_no_target, pred_no_target)]
        n = len(np.atleast_1d(_as_numpy(intersection)).ravel())
        if any(len(f) != n for f in flags):
            raise ValueError("gt_no_target and pred_no_target must have one flag per sample")
        if np.any(np.atleast_1d(_as_numpy(gt_area)).ravel()[flags[0]] != 0):
            raise ValueError("a no-target sample (gt_no_target) must have an empty ground-truth mask (gt_area 0)")
        self.areas.add(intersection, union, pred_area, gt_area, keys)
        for name, f in zip(GRES_FLAGS, flags):
            self._flags[name].append(f)

    def update(self, pred: Any, gt: Any, gt_no_target: Any, pred_no_target: Any, keys: Any | None = None) -> None:
        """Add a batch of predicted / ground-truth masks (shapes as :func:`intersection_union`) and flags."""
        self.add(*_areas(pred, gt), gt_no_target, pred_no_target, keys)

    def merge(self, other: GresMetrics) -> GresMetrics:
        """Append ``other``'s samples (in place); returns self."""
        s = other.state()
        self.add(s["intersection"], s["union"], s["pred_area"], s["gt_area"], s["gt_no_target"],
                 s["pred_no_target"], s["key"])
        return self

    def _flag(self, name: str) -> np.ndarray:
        chunks = self._flags[name]
        if len(chunks) != 1:
            chunks[:] = [np.concatenate(chunks) if chunks else np.zeros(0, dtype=bool)]
        return chunks[0]

    def state(self) -> dict[str, np.ndarray]:
        """:meth:`SegMetrics.state` plus ``gt_no_target`` / ``pred_no_target`` bool (N,) arrays (copies)."""
        return {**self.areas.state(), **{k: self._flag(k).copy() for k in GRES_FLAGS}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> GresMetrics:
        """Rebuild from :meth:`state` (``key`` may be absent)."""
        m = cls()
        m.add(state["intersection"], state["union"], state["pred_area"], state["gt_area"], state["gt_no_target"],
              state["pred_no_target"], state.get("key"))
        return m

    def __len__(self) -> int:
        return len(self.areas)

    def scored(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-sample (I, U, IoU) under the GRES conventions (int64, int64, float64), accumulation order."""
        s = self.areas.state()
        gt_nt, pred_nt = self._flag("gt_no_target"), self._flag("pred_no_target")
        inter = np.where(gt_nt | pred_nt, 0, s["intersection"])
        union = np.where(gt_nt & pred_nt, 0, s["union"])
        iou = _ratio(inter, union)
        iou[gt_nt & pred_nt] = 1.0
        return inter, union, iou

    def compute(self) -> dict:
        """``{"giou", "ciou", "n_acc", "t_acc", "precision_at": {"0.7", "0.8", "0.9"}, "num_samples",
        "num_target", "num_no_target"}`` (class docstring); floats in [0, 1]."""
        inter, union, iou = self.scored()
        gt_nt, pred_nt = self._flag("gt_no_target"), self._flag("pred_no_target")
        target = ~gt_nt
        n, n_target = len(iou), int(np.count_nonzero(target))
        n_empty = n - n_target
        total_u = int(union.sum())
        precision_at = {}
        for t in GRES_THRESHOLDS:
            k = int(t[2:])  # "0.7" -> 7: IoU >= k/10  <=>  10 I >= k U (exact, integers)
            hits = np.count_nonzero(target & (union > 0) & (10 * inter >= k * union))
            precision_at[t] = hits / n_target if n_target else 0.0
        return {
            "giou": _mean(iou),
            "ciou": int(inter.sum()) / total_u if total_u else 0.0,
            "n_acc": int(np.count_nonzero(gt_nt & pred_nt)) / n_empty if n_empty else 0.0,
            "t_acc": int(np.count_nonzero(target & ~pred_nt)) / n_target if n_target else 0.0,
            "precision_at": precision_at,
            "num_samples": n,
            "num_target": n_target,
            "num_no_target": n_empty,
        }
