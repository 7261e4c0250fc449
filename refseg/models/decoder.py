"""Mask decoder: progressive 2x upsampling with sentence-gated FPN skips, then a 1x1 logit conv.

    dec = Decoder(in_channels=256, channels=[128, 64, 32, 16], skip_channels=256, sent_dim=256, start_stride=16)
    logits = dec(fused (B,256,h,w), feats {4: (B,256,4h,4w), 8: ...}, sentence (B,256))  # (B, 1, 16h, 16w)

Stage i outputs stride ``start_stride / 2**(i+1)``. Every stage but the last upsamples bilinearly,
adds the FPN feature of that stride when there is one (4, 8, 16, 32) -- projected and multiplied by
a sigmoid gate computed from the sentence -- applies conv-GN-ReLU blocks (two on skip stages,
one elsewhere), then a FiLM by the sentence and a ReLU. With ``stem_channels`` (``decoder.stem_skip``) the
stride-2 stage also adds the backbone stem's stride-2 activations ``feats[2]`` through the same kind of
gate, zero at init: boundaries at half resolution for the sub-pixel head. The last stage is sub-pixel
(ESPCN-style): a conv block at the previous resolution makes ``4 * channels[-1]`` maps, the 1x1 head
turns them into 4 logits per pixel and PixelShuffle places them on the 2x grid -- a learned 2x
upsampling that never materialises a full-resolution feature map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from refseg.models.vision import group_norm

PRIOR = 0.05  # initial foreground probability of every pixel (sets the logit head's bias)


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """3x3 conv -> GroupNorm -> ReLU: (B, cin, h, w) -> (B, cout, h, w). GN: batch-size independent."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), group_norm(cout), nn.ReLU(inplace=True))


class SkipGate(nn.Module):
    """FPN skip modulated by the sentence: feat (B, C, h, w), sentence (B, D) -> (B, cout, h, w)."""

    def __init__(self, skip_channels: int, cout: int, sent_dim: int, zero_init: bool = False) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(skip_channels, cout, 1, bias=False), group_norm(cout))
        self.gate = nn.Linear(sent_dim, cout)
        if zero_init:  # adds nothing at step 0: the decoder starts as without this skip
            nn.init.zeros_(self.proj[1].weight)

    def forward(self, feat: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        return self.proj(feat) * torch.sigmoid(self.gate(sentence))[:, :, None, None]


class Decoder(nn.Module):
    """forward: fused (B, Cin, h, w), feats {stride: (B, Cs, H/stride, W/stride)}, sentence (B, D)
    -> logits (B, 1, h * 2**len(channels), w * 2**len(channels))."""

    def __init__(self, in_channels: int, channels: list[int], skip_channels: int, sent_dim: int,
                 start_stride: int = 16, skip_strides: tuple[int, ...] = (4, 8, 16, 32),
                 stem_channels: int | None = None) -> None:
        super().__init__()
        self.strides = [start_stride / 2 ** (i + 1) for i in range(len(channels))]
        self.skip_keys: list[int | None] = [
            int(s) if s.is_integer() and int(s) in skip_strides else None for s in self.strides
        ]
        if not channels:
            raise ValueError("decoder.channels needs at least one entry.")
        self.skip_keys[-1] = None  # the sub-pixel stage works before its upsampling
        self.stages = nn.ModuleList()
        self.skips = nn.ModuleDict()
        cin = in_channels
        for i, (cout, key) in enumerate(zip(channels[:-1], self.skip_keys)):
            if key is not None:
                self.skips[str(i)] = SkipGate(skip_channels, cin, sent_dim)
                self.stages.append(nn.Sequential(conv_block(cin, cout), conv_block(cout, cout)))
            else:
                self.stages.append(conv_block(cin, cout))
            cin = cout
        if stem_channels:  # decoder.stem_skip: feats[2] (the stem's stride-2 map) joins the stride-2 stage
            if 2.0 not in self.strides[:-1]:
                raise ValueError(
                    f"decoder.stem_skip needs a decoder stage at stride 2 before the last one; with fusion.level="
                    f"{start_stride} and {len(channels)} decoder.channels the stages sit at strides "
                    f"{[int(s) if s.is_integer() else s for s in self.strides]}: add a channel or set stem_skip=false.")
            i = self.strides.index(2.0)
            self.skips[str(i)] = SkipGate(stem_channels, channels[i - 1] if i else in_channels, sent_dim, zero_init=True)
            self.skip_keys[i] = 2
        # every stage's output is modulated by the sentence (FiLM, then ReLU): language selects at
        # each resolution, not only through the coarse fused map
        self.films = nn.ModuleList(nn.Linear(sent_dim, 2 * c) for c in channels[:-1])
        self.last = conv_block(cin, 4 * channels[-1])  # (B, 4*c, h, w), seen as (B, c, 2h, 2w)
        self.head = nn.Sequential(nn.Conv2d(4 * channels[-1], 4, 1), nn.PixelShuffle(2))  # -> (B, 1, 2h, 2w)
        # start from the prior "few pixels are the referred object" (RetinaNet's focal-loss init) rather
        # than p=0.5 everywhere: the first epoch then learns objects, not the background rate
        nn.init.constant_(self.head[0].bias, -math.log((1 - PRIOR) / PRIOR))

    @property
    def uses_stem(self) -> bool:
        """Whether forward reads ``feats[2]`` (the backbone stem's stride-2 map)."""
        return 2 in self.skip_keys

    def forward(self, x: torch.Tensor, feats: dict[int, torch.Tensor], sentence: torch.Tensor) -> torch.Tensor:
        for i, (stage, key) in enumerate(zip(self.stages, self.skip_keys)):
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)  # (B, C, 2h, 2w)
            if key is not None:
                x = x + self.skips[str(i)](feats[key], sentence)
            x = stage(x)
            gamma, beta = self.films[i](sentence)[:, :, None, None].to(x.dtype).chunk(2, dim=1)
            x = F.relu(x * (1 + gamma) + beta)
        return self.head(self.last(x))  # (B, 1, H', W')
