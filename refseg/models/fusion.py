"""Vision-language fusion: FiLM + coordinate channels + bidirectional cross-attention layers.

    fusion = Fusion(vis_channels=256, word_dim=256, dim=256, num_layers=3, num_heads=8, ffn_dim=1024)
    fused, sentence, attn = fusion(vis (B,256,h,w), words (B,L,256), word_mask (B,L), sentence (B,256))
    # fused (B, dim, h, w); sentence (B, dim); attn (B, h, w) in [0,1] or None

Vision tokens carry normalised x/y coordinates (concatenated before the input projection, as in
CRIS) so that words such as "left" or "bottom" can be grounded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over context ``ctx``.

    forward: x (B, Nq, D), ctx (B, Nk, D), key_mask (B, Nk) bool (True = attend) or None
      -> out (B, Nq, D), weights (B, heads, Nq, Nk) when ``need_weights`` else None.
    Uses ``F.scaled_dot_product_attention`` unless the weights are requested.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model.dim={dim} must be divisible by fusion.num_heads={num_heads}.")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, key_mask: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, Nq, D = x.shape
        Nk, H = ctx.shape[1], self.num_heads
        q = self.q(x).view(B, Nq, H, D // H).transpose(1, 2)  # (B, H, Nq, Dh)
        k, v = self.kv(ctx).view(B, Nk, 2, H, D // H).permute(2, 0, 3, 1, 4)  # each (B, H, Nk, Dh)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Nk)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * (D // H) ** -0.5  # (B, H, Nq, Nk)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.float().softmax(-1).to(q.dtype)
            out = F.dropout(weights, p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out(out.transpose(1, 2).reshape(B, Nq, D)), weights


class FeedForward(nn.Sequential):
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear (pre-norm FFN branch): (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, dim), nn.Dropout(dropout))


class FusionLayer(nn.Module):
    """Vision->language and language->vision cross-attention, then one FFN per modality.

    forward: v (B, N, D), w (B, L, D), word_mask (B, L) bool
      -> v, w (same shapes), l2v weights (B, heads, L, N) or None.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_v = nn.LayerNorm(dim)
        self.norm_w = nn.LayerNorm(dim)
        self.v2l = CrossAttention(dim, num_heads, dropout)  # vision queries attend words
        self.l2v = CrossAttention(dim, num_heads, dropout)  # word queries attend vision
        self.drop = nn.Dropout(dropout)
        self.ffn_v = FeedForward(dim, ffn_dim, dropout)
        self.ffn_w = FeedForward(dim, ffn_dim, dropout)

    def forward(self, v: torch.Tensor, w: torch.Tensor, word_mask: torch.Tensor,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        nv, nw = self.norm_v(v), self.norm_w(w)
        dv, _ = self.v2l(nv, nw, key_mask=word_mask)
        dw, weights = self.l2v(nw, nv, need_weights=need_weights)
        v = v + self.drop(dv)
        w = w + self.drop(dw)
        v = v + self.ffn_v(v)
        w = (w + self.ffn_w(w)) * word_mask[..., None].to(w.dtype)  # padding stays zero
        return v, w, weights


def coord_channels(B: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w): x then y, each in [-1, 1] (left/top = -1)."""
    ys = torch.linspace(-1.0, 1.0, h, device=like.device, dtype=like.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=like.device, dtype=like.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy])[None].expand(B, -1, -1, -1)


class Fusion(nn.Module):
    """FiLM (by the sentence) of the coordinate-augmented vision map, then ``num_layers`` FusionLayers.

    The returned sentence feature adds the mean of the fused word tokens, so every parameter
    (including the last layer's word branch) reaches the output -- no unused parameters under DDP.

    forward: vis (B, C, h, w), words (B, L, Dw), word_mask (B, L) {0,1}, sentence (B, Dw)
      -> fused (B, dim, h, w), sentence (B, dim), attn heat map (B, h, w) in [0,1] or None.
    """

    def __init__(self, vis_channels: int, word_dim: int, dim: int = 256, num_layers: int = 3, num_heads: int = 8,
                 ffn_dim: int = 1024, dropout: float = 0.0) -> None:
        super().__init__()
        self.vis_proj = nn.Conv2d(vis_channels + 2, dim, 1)
        self.word_proj = nn.Linear(word_dim, dim)
        self.sent_proj = nn.Linear(word_dim, dim)
        self.film = nn.Linear(dim, 2 * dim)
        nn.init.zeros_(self.film.weight)  # starts as the identity modulation
        nn.init.zeros_(self.film.bias)
        self.layers = nn.ModuleList(FusionLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, vis: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor, sentence: torch.Tensor,
                return_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        B, _, h, w = vis.shape
        keep = word_mask.bool()  # (B, L)
        sentence = self.sent_proj(sentence)  # (B, D)
        gamma, beta = self.film(sentence)[:, :, None, None].chunk(2, dim=1)  # (B, D, 1, 1) each
        x = self.vis_proj(torch.cat([vis, coord_channels(B, h, w, vis)], dim=1))  # (B, D, h, w)
        x = x * (1 + gamma) + beta
        v = x.flatten(2).transpose(1, 2)  # (B, N, D), N = h*w
        t = self.word_proj(words) * keep[..., None].to(words.dtype)  # (B, L, D)
        weights = None
        for i, layer in enumerate(self.layers):
            v, t, weights = layer(v, t, keep, need_weights=return_attn and i == len(self.layers) - 1)
        fused = self.norm_out(v).transpose(1, 2).reshape(B, -1, h, w)  # (B, D, h, w)
        m = keep[..., None].to(t.dtype)
        sentence = sentence + (t * m).sum(1) / m.sum(1).clamp(min=1)  # + mean of the fused real words
        attn = None
        if weights is not None:
            a = weights.float().mean(1)  # (B, L, N), average over heads
            m = keep[..., None].float()
            a = (a * m).sum(1) / m.sum(1).clamp(min=1)  # (B, N), average over real words
            attn = (a / a.amax(1, keepdim=True).clamp(min=1e-12)).view(B, h, w)
        return fused, sentence, attn
