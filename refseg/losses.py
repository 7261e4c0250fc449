"""Segmentation losses (pure functions), always computed in fp32 whatever the autocast dtype.

    loss = refseg_loss(logits (B,1,H,W), target (B,H,W) or (B,1,H,W) in {0,1}, bce_weight=1, dice_weight=1)
    loss = generalized_loss(logits, target, no_target_logit (B,), no_target (B,) {0,1}, 1, 1, no_target_weight=1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _prepare(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logits, target) as fp32 (B, H*W); accepts (B,H,W) or (B,1,H,W) for either input."""
    if logits.dim() == 4:
        if logits.shape[1] != 1:
            raise ValueError(f"logits must have one channel, got shape {tuple(logits.shape)}.")
        logits = logits[:, 0]
    if target.dim() == 4:
        target = target[:, 0]
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match.")
    return logits.float().flatten(1), target.float().flatten(1)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with logits over all pixels (fp32 scalar)."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x, t = _prepare(logits, target)
        return F.binary_cross_entropy_with_logits(x, t)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss ``1 - (2|P.T| + eps) / (|P| + |T| + eps)`` per sample, then the mean (fp32 scalar)."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x, t = _prepare(logits, target)
        p = torch.sigmoid(x)
        inter = (p * t).sum(1)
        dice = (2 * inter + eps) / (p.sum(1) + t.sum(1) + eps)
        return (1 - dice).mean()


def refseg_loss(logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 1.0,
                dice_weight: float = 1.0) -> torch.Tensor:
    """``bce_weight * BCE + dice_weight * Dice`` on logits (B,1,H,W) vs target (B,[1,]H,W) {0,1}."""
    return bce_weight * bce_loss(logits, target) + dice_weight * dice_loss(logits, target)


def generalized_loss(logits: torch.Tensor, target: torch.Tensor, no_target_logit: torch.Tensor,
                     no_target: torch.Tensor, bce_weight: float = 1.0, dice_weight: float = 1.0,
                     no_target_weight: float = 1.0, empty_mask_weight: float = 0.0,
                     no_target_pos_weight: float = 1.0) -> torch.Tensor:
    """gRefCOCO training loss: ``no_target_weight * BCE(no_target_logit (B,), no_target (B,) {0,1})`` (its
    no-target terms weighted ``no_target_pos_weight``, torch's ``pos_weight``) plus
    :func:`refseg_loss` on the target samples only (``no_target == 0``), plus ``empty_mask_weight *`` the
    mean pixel BCE of the no-target samples' mask logits toward an empty mask (as ReLA trains them). A
    batch without a target sample adds a mask loss of 0 that still reaches every mask parameter (a graph,
    zero gradients), so every rank runs the same backward. fp32 scalar."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        label = no_target.float().reshape(-1)
        pos = torch.tensor(no_target_pos_weight, dtype=torch.float32, device=label.device)
        nt = F.binary_cross_entropy_with_logits(no_target_logit.float().reshape(-1), label, pos_weight=pos)
        keep = label < 0.5  # (B,) target samples
        if bool(keep.any()):
            mask = refseg_loss(logits[keep], target[keep], bce_weight, dice_weight)
        else:
            mask = logits.float().sum() * 0.0
        if empty_mask_weight > 0 and not bool(keep.all()):
            empty = logits[~keep].float()
            mask = mask + empty_mask_weight * F.binary_cross_entropy_with_logits(empty, torch.zeros_like(empty))
        return no_target_weight * nt + mask
