"""The no-target head for generalized referring segmentation (gRefCOCO / GRES: "nothing is there").

    head = NoTargetHead(dim=256)
    logit = head(fused (B,256,h,w), sentence (B,256), logits (B,1,H,W))   # (B,); sigmoid > threshold = empty

A 1x1 conv + GELU turns every fused vision token into match features; their mean and max over the
image (the max asks "does any location match the expression?"), the fused sentence feature and the
mask's own evidence -- its largest logit (squashed by tanh(x / 4)) and its mean probability, from the
decoder's full-resolution logits -- go through a two-layer MLP to one logit. The mask evidence is what
lets the head check the image at the decoder's resolution: on the fused tokens alone (stride 16) a small
object named by a one-target expression looked like a no-target one, and the head learned the wording
instead (BENCHMARKS.md, "gRefCOCO", session 16).

With ``model.no_target_detach`` the head is a probe: it reads all three inputs detached, so its BCE
trains the head's own weights and nothing else -- encoders and decoder learn from the mask losses alone
(the empty-mask loss teaches them to stay dark on no-target samples), and
``model.loss.no_target_pos_weight`` then moves only the head's decision (coupled, a weight of 2 also
pulled the masks toward empty: gIoU 0.46 at epoch 24). Off by default (joint training, as ReLA's); on
the synthetic debug set, with that weight at 1.5, it raised N-acc and lowered T-acc without changing
gIoU beyond the run-to-run spread (two runs each: BENCHMARKS.md, "gRefCOCO", session 19).

Built only with ``model.no_target_head``.
"""

from __future__ import annotations

import torch
from torch import nn


class NoTargetHead(nn.Module):
    """fused (B, dim, h, w), sentence (B, dim), mask logits (B, 1, H, W) -> no-target logit (B,) (see the
    module docstring)."""

    MASK_FEATURES = 2  # tanh(max logit / 4), mean probability

    def __init__(self, dim: int, hidden: int | None = None, detach: bool = False) -> None:
        super().__init__()
        hidden = hidden or dim
        self.detach = detach  # read the inputs detached: the head's loss trains the head only
        self.token = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU())
        self.mlp = nn.Sequential(nn.Linear(2 * hidden + dim + self.MASK_FEATURES, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))

    def forward(self, fused: torch.Tensor, sentence: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.detach:  # a probe: the head's loss trains the head only (module docstring)
            fused, sentence, logits = fused.detach(), sentence.detach(), logits.detach()
        t = self.token(fused)  # (B, hidden, h, w)
        x = logits.flatten(1).to(t.dtype)  # (B, H*W)
        mask = torch.stack([torch.tanh(x.amax(1) / 4), torch.sigmoid(x).mean(1)], dim=1)  # (B, 2)
        pooled = torch.cat([t.mean((2, 3)), t.amax((2, 3)), sentence, mask], dim=1)  # (B, 2*hidden + dim + 2)
        return self.mlp(pooled)[:, 0]  # (B,)
