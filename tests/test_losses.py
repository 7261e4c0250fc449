"""Loss functions against hand-computed values; fp32 stability under low-precision inputs."""

from __future__ import annotations

import math

import pytest
import torch

from refseg.losses import bce_loss, dice_loss, refseg_loss

X = torch.tensor([[[[0.0, 1.0], [-1.0, 2.0]]]])  # (1, 1, 2, 2) logits
T = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.uint8)  # (1, 2, 2) target


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_bce_hand_computed() -> None:
    # -[t log s(x) + (1-t) log(1-s(x))] for (x, t) = (0,1), (1,0), (-1,0), (2,1)
    terms = [math.log(2.0), math.log(1 + math.e), math.log(1 + math.exp(-1)), math.log(1 + math.exp(-2))]
    expected = sum(terms) / 4  # 0.611650
    assert float(bce_loss(X, T)) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.611650, abs=1e-6)


def test_dice_hand_computed() -> None:
    p = [_sigmoid(v) for v in (0.0, 1.0, -1.0, 2.0)]
    inter = p[0] + p[3]
    expected = 1 - (2 * inter + 1) / (sum(p) + 2 + 1)  # eps = 1
    assert float(dice_loss(X, T)) == pytest.approx(expected, abs=1e-6)
    assert float(refseg_loss(X, T, bce_weight=0.5, dice_weight=2.0)) == pytest.approx(
        0.5 * float(bce_loss(X, T)) + 2.0 * expected, abs=1e-6)


def test_perfect_prediction_has_near_zero_loss() -> None:
    target = (torch.rand(3, 1, 16, 16) > 0.5).float()
    logits = (target * 2 - 1) * 30.0
    assert float(dice_loss(logits, target)) < 1e-6
    assert float(bce_loss(logits, target)) < 1e-6
    assert float(dice_loss(-logits, target)) > 0.9  # the opposite prediction is maximally wrong


def test_target_shapes_and_dtypes_agree() -> None:
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 8, 8) > 0.5)
    ref = refseg_loss(logits, target.float())
    for t in (target.to(torch.uint8), target.float()[:, None], target.to(torch.uint8)[:, None]):
        assert torch.equal(refseg_loss(logits, t), ref)
    with pytest.raises(ValueError, match="do not match"):
        refseg_loss(logits, target[:, :4])


def test_dice_is_per_sample_mean() -> None:
    logits, target = torch.randn(2, 1, 8, 8), (torch.rand(2, 8, 8) > 0.3).float()
    per_sample = [float(dice_loss(logits[i:i + 1], target[i:i + 1])) for i in range(2)]
    assert float(dice_loss(logits, target)) == pytest.approx(sum(per_sample) / 2, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_give_fp32_loss(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 32, 32) * 8  # large magnitudes: fp16 sigmoid/log would be lossy
    target = (torch.rand(4, 32, 32) > 0.5).float()
    ref = refseg_loss(logits.to(dtype).float(), target)
    low = refseg_loss(logits.to(dtype), target)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert float(low) == pytest.approx(float(ref), abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = refseg_loss(logits.to(dtype), target)
    assert auto.dtype == torch.float32 and float(auto) == pytest.approx(float(ref), abs=1e-6)


def test_gradient_flows_to_low_precision_logits() -> None:
    logits = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    refseg_loss(logits, torch.ones(2, 8, 8)).backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    assert torch.isfinite(logits.grad.float()).all() and float(logits.grad.float().abs().sum()) > 0
