"""Loss functions against hand-computed values; fp32 stability under low-precision inputs."""

from __future__ import annotations

import math

import pytest
import torch

from refseg.losses import bce_loss, dice_loss, generalized_loss, refseg_loss

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


# ----------------------------------------------------------------------------- generalized (no-target head)
def test_generalized_loss_on_a_mixed_batch_hand_computed() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(4, 1, 8, 8), (torch.rand(4, 8, 8) > 0.5).float()
    target[[1, 3]] = 0  # samples 1 and 3 are no-target: empty masks
    nt_logit, nt = torch.tensor([0.5, 2.0, -1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 1.0])
    # BCE with logits of (x, y) = (0.5, 0), (2, 1), (-1, 0), (0, 1), averaged
    bce_nt = (math.log(1 + math.exp(0.5)) + math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))
              + math.log(2.0)) / 4
    keep = [0, 2]
    mask_part = float(refseg_loss(logits[keep], target[keep], 0.5, 2.0))
    got = generalized_loss(logits, target, nt_logit, nt, bce_weight=0.5, dice_weight=2.0, no_target_weight=3.0)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(3.0 * bce_nt + mask_part, abs=1e-6)
    # the mask logits of no-target samples do not matter
    other = logits.clone()
    other[[1, 3]] = torch.randn(2, 1, 8, 8) * 5
    assert float(generalized_loss(other, target, nt_logit, nt, 0.5, 2.0, 3.0)) == pytest.approx(float(got), abs=1e-6)


def test_empty_mask_weight_adds_the_bce_of_no_target_masks_toward_empty() -> None:
    torch.manual_seed(1)
    logits, target = torch.randn(4, 1, 8, 8), (torch.rand(4, 8, 8) > 0.5).float()
    target[[1, 3]] = 0
    nt_logit, nt = torch.tensor([0.5, 2.0, -1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 1.0])
    base = float(generalized_loss(logits, target, nt_logit, nt, 1.0, 1.0, 1.0))
    # mean over the 2 x 64 pixels of samples 1 and 3 of log(1 + exp(x)), the BCE of x toward 0
    empty_bce = float(torch.log1p(torch.exp(logits[[1, 3]].double())).mean())
    got = generalized_loss(logits, target, nt_logit, nt, 1.0, 1.0, 1.0, empty_mask_weight=0.5)
    assert float(got) == pytest.approx(base + 0.5 * empty_bce, abs=1e-6)
    # the no-target samples' mask logits now matter: lower logits, lower loss; target samples alone: no term
    lower = logits.clone()
    lower[[1, 3]] -= 3.0
    assert float(generalized_loss(lower, target, nt_logit, nt, 1.0, 1.0, 1.0, 0.5)) < float(got)
    none = torch.zeros(4)
    assert float(generalized_loss(logits, target, nt_logit, none, 1.0, 1.0, 1.0, 0.5)) == pytest.approx(
        float(generalized_loss(logits, target, nt_logit, none, 1.0, 1.0, 1.0)), abs=1e-7)


def test_no_target_pos_weight_scales_the_no_target_terms_of_the_head_bce() -> None:
    logits, target = torch.randn(3, 1, 8, 8), torch.zeros(3, 8, 8)
    target[0, 2:5, 2:5] = 1
    nt_logit, nt = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([0.0, 1.0, 1.0])
    # (0.5, 0) weighs 1; (2, 1) and (-1, 1) weigh 2.5: softplus(-x) per no-target term
    want = (math.log(1 + math.exp(0.5)) + 2.5 * (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0)))) / 3
    mask_part = float(refseg_loss(logits[:1], target[:1]))
    got = generalized_loss(logits, target, nt_logit, nt, no_target_pos_weight=2.5)
    assert float(got) == pytest.approx(want + mask_part, abs=1e-6)


def test_generalized_loss_without_target_samples_keeps_a_graph() -> None:
    logits = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    nt_logit = torch.tensor([1.0, -1.0], requires_grad=True)
    loss = generalized_loss(logits, torch.zeros(2, 8, 8), nt_logit, torch.ones(2))
    assert float(loss.detach()) == pytest.approx((math.log(1 + math.exp(-1.0)) + math.log(1 + math.e)) / 2, abs=1e-6)
    loss.backward()
    assert logits.grad is not None and float(logits.grad.float().abs().sum()) == 0.0  # reached, zero gradient
    assert float(nt_logit.grad.abs().sum()) > 0


def test_training_loss_path_classic_unchanged_and_generalized_with_the_head() -> None:
    """refseg.train.epoch.batch_loss: without a no-target logit exactly refseg_loss (classic runs compute
    what they did); with one, generalized_loss against the batch's no_target column."""
    from refseg.config.presets import preset_config
    from refseg.train.epoch import batch_loss, predicted_no_target

    cfg = preset_config("tiny")
    cfg.loss.bce_weight, cfg.loss.dice_weight, cfg.loss.no_target_weight = 0.7, 1.3, 2.0
    logits, target = torch.randn(3, 1, 8, 8), (torch.rand(3, 8, 8) > 0.5).float()
    batch = {"no_target": torch.tensor([0.0, 1.0, 0.0]).numpy()}
    assert torch.equal(batch_loss({"logits": logits}, target, batch, cfg), refseg_loss(logits, target, 0.7, 1.3))
    nt_logit = torch.tensor([-2.0, 3.0, 0.1])
    got = batch_loss({"logits": logits, "no_target_logit": nt_logit}, target, batch, cfg)
    assert torch.equal(got, generalized_loss(logits, target, nt_logit, torch.tensor([0.0, 1.0, 0.0]), 0.7, 1.3, 2.0))
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 2, 2] = True
    masks[1, 0, 0] = True  # sample 1: a pixel, but the head says no-target (sigmoid(3) = 0.95)
    assert predicted_no_target({"no_target_logit": nt_logit}, masks, 0.5).tolist() == [False, True, True]
    assert predicted_no_target({"no_target_logit": nt_logit}, masks, 0.96).tolist() == [False, False, True]
    masks[2, 1, 1] = True  # sample 2 (sigmoid(0.1) = 0.52): no-target at 0.5 only
    assert predicted_no_target({"no_target_logit": nt_logit}, masks, 0.5).tolist() == [False, True, True]
    assert predicted_no_target({"no_target_logit": nt_logit}, masks, 0.6).tolist() == [False, True, False]
    masks[0] = False  # an empty predicted mask is a no-target prediction whatever the head says (GRES)
    assert predicted_no_target({"no_target_logit": nt_logit}, masks, 0.6).tolist() == [True, True, False]
    assert predicted_no_target({}, masks, 0.5).tolist() == [True, False, False]  # no head: the masks alone
