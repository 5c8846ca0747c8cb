"""The U shape every CNN backbone here shares (2D or 3D), with the LLM bridge at its bottleneck.

    input (B, in_channels, *S)                       S = (H, W) or (D, H, W), every side a multiple of 16
    encoder1 --------------------------------------------------- decoder1 -> head -> logits (B, classes, *S)
      down1, encoder2 ---------------------------------- decoder2
        down2, encoder3 ------------------------- decoder3
          down3, encoder4 ---------------- decoder4
            down4, encoder5 -> bridge ----^              encoder5 gives (B, C, *S/16): the N = prod(S/16) tokens

Encoder k works at 1/2^(k-1) of the input's sides: x_1 = encoder1(input), x_k = encoder_k(down_{k-1}(x_{k-1})).
A down halves the sides (a 2x2 max-pool, a strided conv, or nn.Identity where the next encoder opens with a
stride-2 conv). Decoder k brings the level below up to level k and merges x_k, the skip connection:
    up = decoder_k.up(below)                         (B, C_k, *S_k), S_k = S / 2^(k-1)
    skip = decoder_k.skip_block(x_k) if any, else x_k
    decoder_k.fuse(merge(skip, up))                  merge: "concat" cat[skip, up], "concat-up-first" cat[up, skip],
                                                     "add" skip + up
The head maps decoder1's output to the classes. A backbone is a function returning these Parts
(backbones_2d.py, backbones_3d.py); build.py puts the LLM bridge between encoder5 and decoder4.

What the backbones need beyond a plain U (each is one argument here, not a second network):
- downs with weights: 3D UX-Net's ConvNeXt-like path steps down with a 7^3 stride-2 stem conv, then
  LayerNorm + 2^3 stride-2 convs; it has no encoder at full resolution (its encoder1 is nn.Identity);
- skip blocks: 3D UX-Net sends every skip through a residual conv block (UNETR's "encoder" blocks), the
  first on the raw input;
- the merge rule: MedNeXt adds the upsampled map to the skip instead of concatenating.
Every backbone has five levels (four halvings), so every side must be a multiple of DOWNSAMPLING = 16.
"""
from typing import NamedTuple

import torch
import torch.nn as nn

DOWNSAMPLING = 16  # four halvings of the sides between encoder1 and encoder5
MERGES = ("concat", "concat-up-first", "add")


class Parts(NamedTuple):
    """A backbone's modules in the diagram's order, and the width of its bottleneck."""
    encoders: list[nn.Module]   # encoder1..5
    downs: list[nn.Module]      # down1..4, between encoder k and encoder k+1
    decoders: list[nn.Module]   # decoder4..1 (DecoderStage)
    head: nn.Module             # decoder1's output -> logits
    bottleneck: int             # channels of encoder5's output: the bridge's C


class SegmentationNet(nn.Module):
    """Encoders, downs, the optional LLM bridge, decoders, head; named like the diagram above.

    config: the build_model arguments (build.ModelConfig) that rebuild this network, None for one built from
    parts directly (the reduced-width networks of the parity tests)."""

    def __init__(self, parts: Parts, bridge: nn.Module | None, spatial_dims: int, config=None):
        super().__init__()
        self.config = config
        self.spatial_dims = spatial_dims
        self.encoder1, self.encoder2, self.encoder3, self.encoder4, self.encoder5 = parts.encoders
        self.down1, self.down2, self.down3, self.down4 = parts.downs
        self.bridge = bridge
        self.decoder4, self.decoder3, self.decoder2, self.decoder1 = parts.decoders
        self.head = parts.head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, *S) -> logits (B, num_classes, *S); every side of S a multiple of 16."""
        check_image_size(image, self.spatial_dims)
        x1 = self.encoder1(image)                  # (B, C1, *S)
        x2 = self.encoder2(self.down1(x1))         # (B, C2, *S/2)
        x3 = self.encoder3(self.down2(x2))         # (B, C3, *S/4)
        x4 = self.encoder4(self.down3(x3))         # (B, C4, *S/8)
        x5 = self.encoder5(self.down4(x4))         # (B, C5, *S/16)
        if self.bridge is not None:
            x5 = self.bridge(x5)
        d4 = self.decoder4(x5, x4)                 # (B, C4', *S/8)
        d3 = self.decoder3(d4, x3)
        d2 = self.decoder2(d3, x2)
        d1 = self.decoder1(d2, x1)                 # (B, C1', *S)
        return self.head(d1)


class DecoderStage(nn.Module):
    """(B, C_below, *s) and the skip x_k (B, C_skip, *2s) -> (B, C, *2s): up to level k, merge, fuse.

    merge (MERGES): "concat" cat[skip, up] (U-Net, CMUNeXt), "concat-up-first" cat[up, skip] (nnU-Net and
    UNETR's order, so their fusion weights map one to one), "add" skip + up (MedNeXt). skip_block, if given,
    transforms the skip before the merge (3D UX-Net's residual blocks)."""

    def __init__(self, up: nn.Module, fuse: nn.Module, *, merge: str = "concat", skip_block: nn.Module | None = None):
        super().__init__()
        assert merge in MERGES, merge
        self.up = up
        self.skip_block = skip_block
        self.fuse = fuse
        self.merge = merge

    def forward(self, below: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(below)
        if self.skip_block is not None:
            skip = self.skip_block(skip)
        if self.merge == "add":
            return self.fuse(skip + up)
        both = [skip, up] if self.merge == "concat" else [up, skip]
        return self.fuse(torch.cat(both, dim=1))  # (B, C_skip + C_up, *2s) before the fusion


def check_image_size(image: torch.Tensor, spatial_dims: int) -> None:
    if image.ndim != 2 + spatial_dims:
        expected = "(B, C, H, W) images" if spatial_dims == 2 else "(B, C, D, H, W) volumes"
        raise ValueError(f"expected a batch of {expected} for this {spatial_dims}D network, "
                         f"got shape {tuple(image.shape)}")
    check_image_sides(*image.shape[2:])


def check_image_sides(*sides: int) -> None:
    """Raise unless every side is a positive multiple of DOWNSAMPLING, naming the nearest sizes that are."""
    if all(side > 0 and not side % DOWNSAMPLING for side in sides):
        return
    names = "height and width" if len(sides) == 2 else "depth, height and width"
    nearest = "x".join(str(max(DOWNSAMPLING, round(side / DOWNSAMPLING) * DOWNSAMPLING)) for side in sides)
    raise ValueError(f"got {'x'.join(map(str, sides))}; {names} must be positive multiples of {DOWNSAMPLING} "
                     f"(the network halves them 4 times): resize or crop, e.g. to {nearest}")
