"""The no-target head for generalized referring segmentation (gRefCOCO / GRES: "nothing is there").

    head = NoTargetHead(dim=256)
    logit = head(fused (B,256,h,w), sentence (B,256))   # (B,) no-target logit; sigmoid > threshold = empty

A 1x1 conv + GELU turns every fused vision token into match features; their mean and max over the
image (the max asks "does any location match the expression?") and the fused sentence feature go
through a two-layer MLP to one logit. Built only with ``model.no_target_head``.
"""

from __future__ import annotations

import torch
from torch import nn


class NoTargetHead(nn.Module):
    """fused (B, dim, h, w), sentence (B, dim) -> no-target logit (B,) (see the module docstring)."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.token = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU())
        self.mlp = nn.Sequential(nn.Linear(2 * hidden + dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, fused: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        t = self.token(fused)  # (B, hidden, h, w)
        pooled = torch.cat([t.mean((2, 3)), t.amax((2, 3)), sentence], dim=1)  # (B, 2*hidden + dim)
        return self.mlp(pooled)[:, 0]  # (B,)
