"""MedVisionLlama's network: a Vision Transformer that segments 2D images or 3D volumes, with an optional
frozen LLM block between its patch embedding and its transformer blocks (model.build_model("vit", ...)
builds it, with model.LLMBridge as that block).

    x (B, C, *S)                       S = (H, W) or (H, W, D), every side a multiple of P
    patches      (B, N, C P^d)         N = prod(S / P) tokens in row-major order over the patch grid; a
                                       patch's values in (C, p_1, .., p_d) order, as torch's Unfold
    patch_embed  Linear(C P^d, E)      (B, N, E)
    bridge       Linear(E, D_llm) -> h + norm(layer(h)) -> Linear(D_llm, E)   (optional; MedVisionLlama)
    + pos_embed  (1, N, E), learned, N(0, 1) at start as the public code
    blocks       depth x pre-LayerNorm:  x = x + MHA(LN(x)),  x = x + MLP(LN(x))
                 MHA: nn.MultiheadAttention, `heads` heads, dropout on the attention weights;
                 MLP: Linear(E, 4E), GELU, Linear(4E, E), Dropout
    head         Linear(E, P^d classes), folded back: (B, classes, *S)

Attention dropout (the public code's nn.MultiheadAttention(dropout=...)) keeps torch's fused attention on
CUDA but not on the CPU, which then materialises every block's N x N weights: at 128^3 / patch 8 a step
takes 33 s and 12.6 GB there, against 3.9 s and 75 MB with dropout 0 (README, "Measured here").
No class token and no final LayerNorm: the ViT-Baseline of the paper at in_channels 1, 128^3, P = 8,
E = 64, 16 blocks is exactly 1,128,000 parameters (tests/test_vit.py). The position embedding has one
row per token of `img_size`, so the network takes inputs of that size only.
"""
import math

import torch
from torch import Tensor, nn


class VisionTransformer(nn.Module):
    """(B, in_channels, *S) -> logits (B, num_classes, *S), S = (img_size,) * spatial_dims."""

    def __init__(self, *, in_channels: int, num_classes: int, spatial_dims: int, img_size: int, patch_size: int,
                 embed_dim: int, depth: int, heads: int, dropout: float, bridge: nn.Module | None = None):
        super().__init__()
        check_patch_grid((img_size,) * spatial_dims, patch_size)
        if embed_dim % heads:
            raise ValueError(f"embed_dim {embed_dim} must be a multiple of heads {heads}")
        self.spatial_dims, self.img_size, self.patch_size = spatial_dims, img_size, patch_size
        patch_volume = patch_size ** spatial_dims
        tokens = (img_size // patch_size) ** spatial_dims
        self.patch_embed = nn.Linear(in_channels * patch_volume, embed_dim)
        self.bridge = bridge
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, embed_dim))
        self.blocks = nn.Sequential(*(TransformerBlock(embed_dim, heads, dropout) for _ in range(depth)))
        self.head = nn.Linear(embed_dim, patch_volume * num_classes)

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.img_size,) * self.spatial_dims
        if x.ndim != 2 + self.spatial_dims or tuple(x.shape[2:]) != expected:
            raise ValueError(f"expected a batch (B, C, {', '.join(map(str, expected))}) for this ViT (its position "
                             f"embedding has one row per patch of that size), got {tuple(x.shape)}")
        tokens = self.patch_embed(patchify(x, self.patch_size))   # (B, N, E)
        if self.bridge is not None:
            tokens = self.bridge.refine(tokens)                   # (B, N, E)
        tokens = self.blocks(tokens + self.pos_embed)             # (B, N, E)
        return unpatchify(self.head(tokens), self.patch_size, x.shape[2:])


class TransformerBlock(nn.Module):
    """Pre-LayerNorm encoder block, (B, N, E) -> (B, N, E)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        normed = self.norm1(x)
        # need_weights=False lets torch use its fused scaled-dot-product attention (no N x N matrix kept).
        x = x + self.attention(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def check_patch_grid(sides: tuple[int, ...], patch_size: int) -> None:
    """Raise unless every side is a positive multiple of patch_size, naming the nearest sizes that are."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    if all(side > 0 and side % patch_size == 0 for side in sides):
        return
    nearest = "x".join(str(max(patch_size, round(side / patch_size) * patch_size)) for side in sides)
    raise ValueError(f"got {'x'.join(map(str, sides))}; every side must be a positive multiple of the patch size "
                     f"{patch_size}: resize, e.g. to {nearest}, or pick another patch size")


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, *S) -> (B, N, C P^d): non-overlapping patches, row-major over the grid S / P."""
    B, C, *sides = x.shape
    check_patch_grid(tuple(sides), patch_size)
    d = len(sides)
    grid = [side // patch_size for side in sides]
    x = x.reshape(B, C, *[n for g in grid for n in (g, patch_size)])        # (B, C, g1, P, g2, P, ..)
    grid_axes = [2 + 2 * i for i in range(d)]
    patch_axes = [3 + 2 * i for i in range(d)]
    x = x.permute(0, *grid_axes, 1, *patch_axes)                            # (B, g1, .., gd, C, P, .., P)
    return x.reshape(B, math.prod(grid), C * patch_size ** d)              # (B, N, C P^d)


def unpatchify(tokens: Tensor, patch_size: int, sides) -> Tensor:
    """(B, N, C P^d) -> (B, C, *S): the inverse of patchify for sides S."""
    B = tokens.shape[0]
    d = len(sides)
    grid = [side // patch_size for side in sides]
    C = tokens.shape[-1] // patch_size ** d
    x = tokens.reshape(B, *grid, C, *[patch_size] * d)                      # (B, g1, .., gd, C, P, .., P)
    order = [0, 1 + d] + [axis for i in range(d) for axis in (1 + i, 2 + d + i)]
    x = x.permute(*order)                                                   # (B, C, g1, P, g2, P, ..)
    return x.reshape(B, C, *sides)                                          # (B, C, *S)
