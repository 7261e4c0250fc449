"""The no-target head for generalized referring segmentation (gRefCOCO / GRES: "nothing is there").

    head = NoTargetHead(dim=256)
    logit = head(fused (B,256,h,w), sentence (B,256), logits (B,1,H,W))   # (B,); sigmoid > threshold = empty
    head = NoTargetHead(dim=256, region_channels=512, region_stride=4)    # model.no_target_region
    logit = head(fused, sentence, logits, region (B,512,H/4,W/4))
    logit = head.decide(*head.pooled(fused, sentence, logits, region))     # the same, in two halves

A 1x1 conv + GELU turns every fused vision token into match features; their mean and max over the
image (the max asks "does any location match the expression?"), the fused sentence feature and the
mask's own evidence -- its largest logit (squashed by tanh(x / 4)) and its mean probability, from the
decoder's full-resolution logits -- go through a two-layer MLP to one logit. The mask evidence is what
lets the head check the image at the decoder's resolution: on the fused tokens alone (stride 16) a small
object named by a one-target expression looked like a no-target one, and the head learned the wording
instead (BENCHMARKS.md, "gRefCOCO", session 16).

With ``model.no_target_detach`` the head is a probe: it reads all its inputs detached, so its BCE
trains the head's own weights and nothing else -- encoders and decoder learn from the mask losses alone
(the empty-mask loss teaches them to stay dark on no-target samples), and
``model.loss.no_target_pos_weight`` then moves only the head's decision (coupled, a weight of 2 also
pulled the masks toward empty: gIoU 0.46 at epoch 24). Off by default (joint training, as ReLA's); on
the synthetic debug set, with that weight at 1.5, it raised N-acc and lowered T-acc without changing
gIoU beyond the run-to-run spread (two runs each: BENCHMARKS.md, "gRefCOCO", session 19).

With ``model.no_target_region`` the head also checks what lies under the predicted mask: the vision
encoder's stride-4 and stride-8 maps (the stride-8 one upsampled, concatenated) averaged with the mask's
probabilities as weights, layer-normed, projected, and multiplied with a projection of the sentence
feature (the match term) go into the MLP too. The fused tokens alone (stride 16) let a probe head learn
the wording: on the synthetic set, where two thirds of the "the <colour> <shape>" sentences are no-target,
it called 50 of the 53 one-target ones empty; reading the object under the mask it called 3 (val AUC of
the head's probability 0.94 -> 0.98, in every run: BENCHMARKS.md, "gRefCOCO", session 21). Off by
default, so existing checkpoints load as they were written.

``forward`` = :meth:`NoTargetHead.decide` of :meth:`NoTargetHead.pooled`: the inputs reduced to one vector
each (only the token conv has weights there), then everything else. ``train.no_target_refit_epochs``
refits ``decide``'s weights on the pooled vectors of the final model (refseg/train/refit.py).

Built only with ``model.no_target_head``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NoTargetHead(nn.Module):
    """fused (B, dim, h, w), sentence (B, dim), mask logits (B, 1, H, W)[, with ``region_channels``: region
    (B, region_channels, ceil(H / region_stride), ceil(W / region_stride))] -> no-target logit (B,) (see the
    module docstring)."""

    MASK_FEATURES = 2  # tanh(max logit / 4), mean probability

    def __init__(self, dim: int, hidden: int | None = None, detach: bool = False,
                 region_channels: int = 0, region_stride: int = 4) -> None:
        super().__init__()
        hidden = hidden or dim
        # the constructor's arguments: a twin of this head (train.no_target_refit_epochs fits one)
        self.args = {"dim": dim, "hidden": hidden, "detach": detach, "region_channels": region_channels,
                     "region_stride": region_stride}
        self.detach = detach  # read the inputs detached: the head's loss trains the head only
        self.token = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU())
        extra = 0
        self.region = self.region_sentence = None
        self.region_stride = region_stride  # the region maps' stride: ceil(H / stride) x ceil(W / stride)
        if region_channels:  # the fine vision maps pooled under the predicted mask, matched with the sentence
            # normalized first: the FPN maps are unnormalized (pooled std ~60 on the synthetic set), and
            # unnormalized their match term pushed every hidden unit of the MLP into GELU's flat zero
            self.region = nn.Sequential(nn.LayerNorm(region_channels), nn.Linear(region_channels, hidden))
            self.region_sentence = nn.Linear(dim, hidden)
            extra = 2 * hidden
        self.mlp = nn.Sequential(nn.Linear(2 * hidden + dim + self.MASK_FEATURES + extra, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))

    def forward(self, fused: torch.Tensor, sentence: torch.Tensor, logits: torch.Tensor,
                region: torch.Tensor | None = None) -> torch.Tensor:
        return self.decide(*self.pooled(fused, sentence, logits, region))

    def pooled(self, fused: torch.Tensor, sentence: torch.Tensor, logits: torch.Tensor,
               region: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The head's inputs reduced to one vector each per sample: (token mean (B, hidden), token max
        (B, hidden), sentence (B, dim), mask evidence (B, 2)[, region maps pooled under the mask (B, C)]).
        Only the token conv has weights here; :meth:`decide` holds the rest (what
        ``train.no_target_refit_epochs`` refits on these vectors)."""
        if self.detach:  # a probe: the head's loss trains the head only (module docstring)
            fused, sentence, logits = fused.detach(), sentence.detach(), logits.detach()
            region = region.detach() if region is not None else None
        t = self.token(fused)  # (B, hidden, h, w)
        x = logits.flatten(1).to(t.dtype)  # (B, H*W)
        mask = torch.stack([torch.tanh(x.amax(1) / 4), torch.sigmoid(x).mean(1)], dim=1)  # (B, 2)
        parts = (t.mean((2, 3)), t.amax((2, 3)), sentence, mask)
        if self.region is None:
            return parts
        if region is None:
            raise ValueError("this no-target head reads the vision maps under the mask "
                             "(model.no_target_region): pass region (B, C, h, w).")
        # (B, 1, h, w): the mask's probabilities averaged per map cell (a fixed kernel: ONNX-exportable)
        w = F.avg_pool2d(torch.sigmoid(logits.to(t.dtype)), self.region_stride, ceil_mode=True)
        return (*parts, (region.to(t.dtype) * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1e-3))  # + (B, C)

    def decide(self, token_mean: torch.Tensor, token_max: torch.Tensor, sentence: torch.Tensor, mask: torch.Tensor,
               region: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`pooled`'s vectors -> the no-target logit (B,)."""
        parts = [token_mean, token_max, sentence, mask]
        if self.region is not None:
            r = self.region(region)  # (B, hidden)
            parts += [r, r * self.region_sentence(sentence)]
        return self.mlp(torch.cat(parts, dim=1))[:, 0]  # (B,)

    def decision_modules(self) -> list[nn.Module]:
        """The submodules :meth:`decide` trains (everything but the token conv)."""
        return [m for m in (self.region, self.region_sentence, self.mlp) if m is not None]
