"""refseg.metrics against hand-computed cases, U = 0 handling, thresholds and exact merging."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from refseg.metrics import SegMetrics, intersection_union


def _mask(h: int, w: int, on: list[tuple[int, int]]) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    for y, x in on:
        m[y, x] = True
    return m


def _rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def test_intersection_union_hand_computed():
    # pred = rows 0-1 x cols 0-3 (8 px); gt = rows 1-2 x cols 2-5 (8 px)
    # I = row 1 x cols 2-3 = 2 px; U = 8 + 8 - 2 = 14
    pred, gt = _rect(4, 6, 0, 2, 0, 4), _rect(4, 6, 1, 3, 2, 6)
    inter, union = intersection_union(pred, gt)
    assert inter.dtype == np.int64 and union.dtype == np.int64
    assert inter.tolist() == [2] and union.tolist() == [14]
    # batch (B, H, W): second sample identical masks -> I = U = 8
    inter, union = intersection_union(np.stack([pred, pred]), np.stack([gt, pred]))
    assert inter.tolist() == [2, 8] and union.tolist() == [14, 8]
    # (B, 1, H, W) and lists of differently sized masks (original-resolution evaluation)
    inter, union = intersection_union(pred[None, None], gt[None, None])
    assert (inter.tolist(), union.tolist()) == ([2], [14])
    inter, union = intersection_union([pred, np.ones((2, 3))], [gt, np.ones((2, 3))])
    assert (inter.tolist(), union.tolist()) == ([2, 6], [14, 6])
    with pytest.raises(ValueError, match="shape"):
        intersection_union(pred, gt[:3])


def test_compute_hand_computed():
    m = SegMetrics()
    # sample A: P=4, G=4, I=2 -> U=6, IoU=1/3, dice=4/8=0.5, prec=2/4, rec=2/4
    # sample B: P=2, G=4, I=2 -> U=4, IoU=0.5, dice=4/6, prec=1, rec=0.5
    # sample C: P=0, G=0, I=0 -> U=0: IoU 0, dice 0, prec 0, rec 0 (all by convention)
    # sample D: P=3, G=0, I=0 -> U=3, IoU 0, dice 0, prec 0, rec 0 (G=0)
    m.add([2, 2, 0, 0], [6, 4, 0, 3], [4, 2, 0, 3], [4, 4, 0, 0])
    r = m.compute()
    assert r["num_samples"] == 4 and len(m) == 4
    assert r["oiou"] == 4 / 13  # (2+2+0+0) / (6+4+0+3)
    assert r["miou"] == pytest.approx((1 / 3 + 0.5) / 4, abs=1e-15)
    assert r["median_iou"] == pytest.approx((0 + 1 / 3) / 2)  # sorted: 0, 0, 1/3, 0.5
    assert r["dice"] == pytest.approx((0.5 + 4 / 6) / 4)
    assert r["mean_precision"] == pytest.approx((0.5 + 1.0) / 4)
    assert r["mean_recall"] == pytest.approx((0.5 + 0.5) / 4)
    # only B (IoU exactly 0.5) reaches 0.5; nothing reaches 0.6+
    assert r["precision_at"] == {"0.5": 0.25, "0.6": 0.0, "0.7": 0.0, "0.8": 0.0, "0.9": 0.0}


def test_update_matches_add():
    pred, gt = _rect(4, 6, 0, 2, 0, 4), _rect(4, 6, 1, 3, 2, 6)  # I=2, U=14, P=8, G=8
    m = SegMetrics()
    m.update(pred, gt)
    assert {k: v.tolist() for k, v in m.state().items()} == {
        "intersection": [2],
        "union": [14],
        "pred_area": [8],
        "gt_area": [8],
        "key": [-1],
    }
    assert m.compute()["oiou"] == 2 / 14


def test_union_zero_everywhere():
    m = SegMetrics()
    empty = np.zeros((2, 5, 5), dtype=bool)
    m.update(empty, empty, keys=[7, 8])
    r = m.compute()
    assert r["oiou"] == 0.0 and r["miou"] == 0.0 and r["dice"] == 0.0
    assert all(v == 0.0 for v in r["precision_at"].values())  # U = 0 never counts, even for 10*0 >= 5*0
    assert m.state()["key"].tolist() == [7, 8]
    assert SegMetrics().compute()["num_samples"] == 0 and SegMetrics().compute()["oiou"] == 0.0


@pytest.mark.parametrize("k", [5, 6, 7, 8, 9])
def test_threshold_edge_is_inclusive(k):
    # IoU exactly k/10 (I = k, U = 10) counts for P@(k/10) (LAVT's >=) but not for the next threshold
    m = SegMetrics()
    m.add([k], [10], [k], [10])
    p = m.compute()["precision_at"]
    assert p[f"0.{k}"] == 1.0
    if k < 9:
        assert p[f"0.{k + 1}"] == 0.0
    # 3/5 == 0.6 and 7/10 == 0.7 etc. also hold for other I/U pairs with the same ratio
    m2 = SegMetrics()
    m2.add([3 * k], [30], [3 * k], [30])
    assert m2.compute()["precision_at"][f"0.{k}"] == 1.0


def test_merge_of_shuffled_partitions_equals_serial_exactly():
    rng = np.random.default_rng(0)
    n = 997
    gt = rng.integers(0, 400, n)
    pred = rng.integers(0, 400, n)
    inter = np.minimum(rng.integers(0, 400, n), np.minimum(gt, pred))
    union = pred + gt - inter
    serial = SegMetrics()
    for i in range(n):  # one sample at a time
        serial.add(inter[i : i + 1], union[i : i + 1], pred[i : i + 1], gt[i : i + 1], keys=[i])
    expected = serial.compute()

    order = list(range(n))
    for trial in range(5):
        random.Random(trial).shuffle(order)
        cuts = sorted(random.Random(100 + trial).sample(range(1, n), 6))
        parts = []
        for lo, hi in zip([0] + cuts, cuts + [n]):
            idx = np.array(order[lo:hi])
            part = SegMetrics()
            part.add(inter[idx], union[idx], pred[idx], gt[idx], keys=idx)
            parts.append(SegMetrics.from_state(part.state()))  # as if sent between workers
        random.Random(200 + trial).shuffle(parts)
        merged = SegMetrics()
        for p in parts:
            merged.merge(p)
        assert merged.compute() == expected  # exact ==, floats included
        assert sorted(merged.state()["key"].tolist()) == list(range(n))


def test_means_are_order_independent_fsum():
    # values whose naive float sum depends on order: fsum makes it exact
    m1, m2 = SegMetrics(), SegMetrics()
    inter, union = [1, 1, 2, 1, 3], [3, 7, 9, 11, 13]
    m1.add(inter, union, union, inter)
    m2.add(inter[::-1], union[::-1], union[::-1], inter[::-1])
    assert m1.compute()["miou"] == m2.compute()["miou"] == math.fsum(i / u for i, u in zip(inter, union)) / 5


def test_torch_input_accepted():
    torch = pytest.importorskip("torch")
    pred = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    gt = torch.zeros(2, 4, 4)
    pred[0, 0, :2] = True  # P0 = 8
    gt[0, 1:3] = 1  # G0 = 8, I0 = row 1 = 4 -> U0 = 12
    pred[1, 0, 0, 0] = True  # P1 = 1, G1 = 0 -> I1 = 0, U1 = 1
    logits = torch.randn(2, 4, 4, requires_grad=True)
    inter, union = intersection_union(pred[:, 0], gt)
    assert inter.tolist() == [4, 0] and union.tolist() == [12, 1]
    m = SegMetrics()
    m.update(pred, gt, keys=torch.tensor([3, 4]))
    m.update(logits > 0, logits.detach() > 0)  # grad-tracking source, bool result
    assert m.compute()["num_samples"] == 4
    assert m.state()["intersection"][:2].tolist() == [4, 0]


def test_add_rejects_inconsistent_areas():
    with pytest.raises(ValueError, match="inconsistent"):
        SegMetrics().add([5], [4], [5], [4])  # I > G
    with pytest.raises(ValueError, match="equal lengths"):
        SegMetrics().add([1, 2], [3], [1], [3])
