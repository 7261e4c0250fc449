"""refseg.metrics.GresMetrics: every GRES branch against hand-computed values, ReLA's evaluator loop
re-done independently, exact merging across partial states, bad input."""

from __future__ import annotations

import random

import numpy as np
import pytest

from refseg.metrics import GresMetrics

# (I, U, P, G, gt_no_target, pred_no_target) -- one sample per branch
NT_HIT = (0, 0, 0, 0, True, True)  # no-target, predicted no-target: IoU 1, adds nothing
NT_MISS = (0, 5, 5, 0, True, False)  # no-target, 5 px predicted: IoU 0, U += 5
T_HIT = (8, 10, 9, 9, False, False)  # target: IoU 0.8, I += 8, U += 10
T_CALLED_EMPTY = (0, 6, 0, 6, False, True)  # target predicted no-target (mask cleared): IoU 0, U += 6
T_CALLED_EMPTY_WITH_PIXELS = (3, 7, 4, 6, False, True)  # ReLA: I forced to 0, its U (7) still counts


def _metrics(*samples) -> GresMetrics:
    m = GresMetrics()
    cols = list(zip(*samples))
    m.add(*cols[:4], cols[4], cols[5])
    return m


def test_each_branch_alone() -> None:
    r = _metrics(NT_HIT).compute()
    assert (r["giou"], r["ciou"], r["n_acc"], r["t_acc"]) == (1.0, 0.0, 1.0, 0.0)  # sum(U) = 0 -> cIoU 0
    assert r["precision_at"] == {"0.7": 0.0, "0.8": 0.0, "0.9": 0.0}  # no target sample
    r = _metrics(NT_MISS).compute()
    assert (r["giou"], r["ciou"], r["n_acc"], r["t_acc"]) == (0.0, 0.0, 0.0, 0.0)
    r = _metrics(T_HIT).compute()
    assert (r["giou"], r["ciou"], r["n_acc"], r["t_acc"]) == (0.8, 0.8, 0.0, 1.0)
    assert r["precision_at"] == {"0.7": 1.0, "0.8": 1.0, "0.9": 0.0}  # 10*8 >= 8*10: IoU exactly 0.8 counts
    r = _metrics(T_CALLED_EMPTY).compute()
    assert (r["giou"], r["ciou"], r["n_acc"], r["t_acc"]) == (0.0, 0.0, 0.0, 0.0)
    assert (r["num_samples"], r["num_target"], r["num_no_target"]) == (1, 1, 0)


def test_mixed_split_hand_computed() -> None:
    m = _metrics(NT_HIT, NT_MISS, T_HIT, T_CALLED_EMPTY, T_CALLED_EMPTY_WITH_PIXELS)
    r = m.compute()
    assert r["giou"] == pytest.approx((1 + 0 + 0.8 + 0 + 0) / 5, abs=1e-15)
    assert r["ciou"] == 8 / (0 + 5 + 10 + 6 + 7)  # sum(I) / sum(U)
    assert r["n_acc"] == 1 / 2 and r["t_acc"] == 1 / 3
    assert r["precision_at"] == {"0.7": 1 / 3, "0.8": 1 / 3, "0.9": 0.0}  # over the 3 target samples
    assert (r["num_samples"], r["num_target"], r["num_no_target"]) == (5, 3, 2)
    inter, union, iou = m.scored()
    assert inter.tolist() == [0, 0, 8, 0, 0] and union.tolist() == [0, 5, 10, 6, 7]
    assert iou.tolist() == [1.0, 0.0, 0.8, 0.0, 0.0]


def test_update_from_masks_matches_areas() -> None:
    gt = np.zeros((3, 4, 4), bool)
    gt[1, :2, :2] = True  # target, 4 px
    gt[2, :, :1] = True  # target, 4 px
    pred = np.zeros((3, 4, 4), bool)
    pred[0, 0, :3] = True  # no-target sample, 3 px predicted -> miss
    pred[1, :2, :1] = True  # I = 2, U = 4
    m = GresMetrics()
    m.update(pred, gt, gt_no_target=[True, False, False], pred_no_target=[False, False, True], keys=[7, 8, 9])
    s = m.state()
    assert s["intersection"].tolist() == [0, 2, 0] and s["union"].tolist() == [3, 4, 4]
    assert s["key"].tolist() == [7, 8, 9] and s["gt_no_target"].tolist() == [True, False, False]
    r = m.compute()
    assert r["giou"] == pytest.approx(0.5 / 3) and r["ciou"] == 2 / 11
    assert r["n_acc"] == 0.0 and r["t_acc"] == 0.5


def _rela(samples: list[tuple]) -> dict:
    """ReLA's refer_evaluation loop, re-done from its description (float sums, percent scale dropped)."""
    acc_i = acc_u = acc_iou = 0.0
    tp = fn = fp = tn = 0
    pr = {0.7: 0, 0.8: 0, 0.9: 0}
    targets = 0
    for i, u, _, _, gt_nt, pred_nt in samples:
        if gt_nt:
            if pred_nt:
                tp += 1
                acc_iou += 1
            else:
                fn += 1
                acc_u += u
        else:
            if pred_nt:
                fp += 1
                i = 0
            else:
                tn += 1
            iou = 0.0 if u == 0 else i / u
            acc_iou, acc_i, acc_u = acc_iou + iou, acc_i + i, acc_u + u
            targets += 1
            for t in pr:
                pr[t] += iou >= t
    return {"giou": acc_iou / len(samples), "ciou": acc_i / acc_u, "n_acc": tp / (tp + fn),
            "t_acc": tn / (tn + fp), "precision_at": {str(t): pr[t] / targets for t in pr}}


def _random_samples(rng: random.Random, n: int) -> list[tuple]:
    out = []
    for _ in range(n):
        gt_nt, pred_nt = rng.random() < 0.3, rng.random() < 0.3
        g = 0 if gt_nt else rng.randint(1, 400)
        p = 0 if pred_nt and rng.random() < 0.8 else rng.randint(0, 400)
        i = rng.randint(0, min(p, g))
        out.append((i, p + g - i, p, g, gt_nt, pred_nt))
    return out


def test_matches_relas_evaluator_loop() -> None:
    samples = _random_samples(random.Random(0), 500)
    got, want = _metrics(*samples).compute(), _rela(samples)
    for k in ("giou", "ciou", "n_acc", "t_acc"):
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert got["precision_at"] == pytest.approx(want["precision_at"], abs=1e-12)


def test_merge_is_exact_in_any_order() -> None:
    rng = random.Random(1)
    samples = _random_samples(rng, 300)
    serial = _metrics(*samples).compute()
    cuts = sorted(rng.sample(range(1, 300), 4))
    parts = [samples[a:b] for a, b in zip([0, *cuts], [*cuts, 300])]
    for order in (parts, parts[::-1], parts[2:] + parts[:2]):
        merged = GresMetrics()
        for part in order:
            merged.merge(GresMetrics.from_state(_metrics(*part).state()))  # state travels between actors
        assert merged.compute() == serial  # exactly, floats included
        assert len(merged) == 300


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="no-target sample .* empty ground-truth"):
        _metrics((0, 4, 0, 4, True, True))
    with pytest.raises(ValueError, match="one flag per sample"):
        GresMetrics().add([1, 1], [2, 2], [1, 1], [2, 2], [False], [False, False])
    with pytest.raises(ValueError, match="inconsistent areas"):
        _metrics((5, 4, 4, 4, False, False))
    empty = GresMetrics().compute()
    assert empty["num_samples"] == 0 and empty["giou"] == 0.0 and empty["ciou"] == 0.0
