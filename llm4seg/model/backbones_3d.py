"""LLM4Seg's 3D backbones (Table 2's BTCV column): MedNeXt and 3D UX-Net, each a function (in_channels,
num_classes) -> u_shape.Parts, wired by the same u_shape.SegmentationNet as the 2D ones. Volumes
(B, C, D, H, W), every side a multiple of 16; at 96^3 both bottlenecks are 6^3 = 216 tokens for the bridge.

MedNeXt v1 (Roy et al., MICCAI 2023; github.com/MIC-DKFZ/MedNeXt, create_mednext_v1), width C = 32:
    block(x) = x + conv3(GELU(conv2(GN(conv1(x)))))   conv1 depthwise k^3, GN = GroupNorm with one group per
                                                       channel, conv2 1x1 to r C_in, conv3 1x1 to C_out
    down(x)  = that branch with conv1 at stride 2, to 2 C_in, + res_conv(x) (1x1, stride 2)
    up(x)    = that branch with conv1 a stride-2 transposed conv, to C_in / 2, + res_conv(x) (transposed 1x1,
               stride 2); both give 2n - 1 per side, padded with one zero in front to 2n (the authors' way)
    encoder1 = 1x1 stem conv to C, then n blocks; encoder k = down to 2^(k-1) C, then n blocks (encoder5 is
    MedNeXt's bottleneck, 16 C = 512 channels); the downs are nn.Identity (the down blocks stride);
    decoder k = up, skip + up ("add"), n blocks; head = transposed 1x1 conv (the authors' OutBlock).
    MEDNEXT_SIZES holds r and n for the 9 stages (encoder1..5, decoder4..1); a down or up block takes r of
    the stage it leads into, as the authors' code (MONAI's port gives a down block the r of the stage it
    leaves: its B, M and L have other parameter counts, B 10,511,246; S is the same network).
3D UX-Net (Lee et al., ICLR 2023; github.com/MASILab/3DUX-Net, UXNET), widths 48-96-192-384, hidden 768:
    a ConvNeXt-like path: down1 = 7^3 stride-2 conv + LN (the stem), down2..4 = LN + 2^3 stride-2 conv;
    encoders 2..5 = 2 UX blocks each at 48, 96, 192, 384 channels; encoder1 = nn.Identity (no encoder at full
    resolution);
        UX block(x) = x + gamma * pw2(GELU(pw1(LN(dw(x)))))   dw depthwise 7^3; pw1 1x1 C -> 4C and pw2 4C -> C,
                      both grouped by channel (groups = C, the authors' choice where ConvNeXt has dense
                      Linears); gamma per channel, 1e-6 at start; LN over the channels, eps 1e-6
    encoder5 ends with LN and a residual block 384 -> 768 (the authors' encoder5): the bridge's C is 768;
    skip blocks (the authors' encoder1..4) = a residual block on the raw input to 48 (decoder1's), LN + residual
    block 48 -> 96, 96 -> 192, 192 -> 384 (decoders 2..4);
        residual block(x) = lrelu(IN(conv(lrelu(IN(conv(x))))) + shortcut(x))   3^3 convs without bias, IN =
                      InstanceNorm without affine, lrelu slope 0.01; shortcut = IN(1x1 conv(x)) if widths differ
    decoder k = 2^3 stride-2 transposed conv (no bias), cat[up, skip], residual block 2 C_k -> C_k (UNETR's
    up block); head = residual block 48 -> 48 (the authors' decoder1), 1x1 conv to the classes.

Parameters of the authors' code (in_channels 1, 14 classes) and of these: 3D UX-Net 53,006,510 both; MedNeXt
S 5,551,311, B 10,526,703, M 17,549,359, L 61,779,663 there, one fewer here: their count includes
`dummy_tensor`, a 1-element parameter that only works around a gradient-checkpointing issue and never
enters the output. With the same weights mapped in, at 32^3: ours equal MIC-DKFZ's B, B k5, M and L (max |diff|
0.0; checked once, the suite holds no copy of their code); in tests/test_model_3d.py, MONAI's S at k 3 and 5
(0.0) and the authors' UXNET at reduced widths through a fixture (1.4e-6 on logits of std 0.55).
Measured in tests/test_model_3d.py at 1 x 1 x 96^3, 14 classes: trainable parameters and G MACs
(FlopCounterMode: convs, transposed convs and matmuls, attention included; it counts the authors' UXNET at the
same 577.79, where their README's 639.4 G FLOPs comes from another counter), alone and with the frozen layer
15 of Llama-3.2-1B (60,821,504 parameters, not trainable) on the 216 bottleneck tokens:
                            alone                      + Llama-3.2-1B L15
                            params        G MACs       trainable     G MACs
    MedNeXt-S  (k 3)         5,551,310     53.71        7,651,022     67.49
    MedNeXt-B  (k 3)        10,526,702     70.14       12,626,414     83.92     "mednext", the default
    MedNeXt-M  (k 3)        17,549,358    102.58       19,649,070    116.36
    MedNeXt-L  (k 3)        61,779,662    208.08       63,879,374    221.86
    MedNeXt-B  (k 5)        10,956,334     86.29       13,056,046    100.07
    3D UX-Net               53,006,510    577.79       56,155,054    591.79
The bridge adds C*D + D + D*C + C trainable parameters (2,099,712 at MedNeXt's C = 512, 3,148,544 at UX-Net's
768) and 13.78 / 14.01 G MACs: the layer's weights once per token, attention 2 x 216^2 x 2048, the adapters.

Left out: the authors' DropPath (3D UX-Net trains BTCV with drop_path_rate 0, so it is nn.Identity there),
MedNeXt's deep-supervision heads (off in create_mednext_v1 as measured; LLM4Seg trains every backbone with one
loss), its gradient checkpointing (M, L: memory, not numerics), its 2D variant and its UpKern initialisation
of kernel 5 from a trained kernel-3 network (train "mednext-b-k5" from scratch, or load such weights).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .u_shape import DecoderStage, Parts

# ----------------------------------------------------------------------------- MedNeXt

MEDNEXT_WIDTH = 32
# Expansion ratio r and block count n of the 9 stages: encoder1..4, encoder5 (the bottleneck), decoder4..1.
MEDNEXT_SIZES = {
    "S": {"ratios": (2, 2, 2, 2, 2, 2, 2, 2, 2), "blocks": (2, 2, 2, 2, 2, 2, 2, 2, 2)},
    "B": {"ratios": (2, 3, 4, 4, 4, 4, 4, 3, 2), "blocks": (2, 2, 2, 2, 2, 2, 2, 2, 2)},
    "M": {"ratios": (2, 3, 4, 4, 4, 4, 4, 3, 2), "blocks": (3, 4, 4, 4, 4, 4, 4, 4, 3)},
    "L": {"ratios": (3, 4, 8, 8, 8, 8, 8, 4, 3), "blocks": (3, 4, 8, 8, 8, 8, 8, 4, 3)},
}


class MedNeXtBlock(nn.Module):
    """(B, C_in, *S) -> (B, C_out, *S'): the branch conv3(GELU(conv2(GN(conv1(x))))) plus a residual; resample
    None: S' = S, C_out = C_in, residual x; "down": S' = S/2, residual res_conv(x); "up": S' = 2S, transposed."""

    def __init__(self, c_in: int, c_out: int, ratio: int, kernel: int, resample: str | None = None):
        super().__init__()
        assert resample in (None, "down", "up") and (resample or c_in == c_out), (resample, c_in, c_out)
        conv = nn.ConvTranspose3d if resample == "up" else nn.Conv3d
        stride = 1 if resample is None else 2
        self.resample = resample
        self.conv1 = conv(c_in, c_in, kernel, stride=stride, padding=kernel // 2, groups=c_in)
        self.norm = nn.GroupNorm(c_in, c_in)
        self.conv2 = nn.Conv3d(c_in, ratio * c_in, 1)
        self.act = nn.GELU()
        self.conv3 = nn.Conv3d(ratio * c_in, c_out, 1)
        self.res_conv = conv(c_in, c_out, 1, stride=2) if resample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv3(self.act(self.conv2(self.norm(self.conv1(x)))))
        if self.resample is None:
            return x + branch
        out = branch + self.res_conv(x)
        if self.resample == "up":
            # A stride-2 transposed conv with padding k // 2 gives 2n - 1 per side: one zero in front of
            # each side of (D, H, W) makes it 2n, aligned with the skip as in the authors' code.
            out = F.pad(out, (1, 0, 1, 0, 1, 0))
        return out


def mednext_parts(in_channels: int, num_classes: int, *, size: str = "B", kernel: int = 3,
                  width: int = MEDNEXT_WIDTH) -> Parts:
    """MedNeXt v1 of `size` (MEDNEXT_SIZES) with k^3 depthwise kernels, as u_shape's five levels."""
    ratios, blocks = MEDNEXT_SIZES[size]["ratios"], MEDNEXT_SIZES[size]["blocks"]
    widths = [width * 2 ** level for level in range(5)]                     # C, 2C, .., 16C

    def blocks_of(stage: int, channels: int) -> list[nn.Module]:
        return [MedNeXtBlock(channels, channels, ratios[stage], kernel) for _ in range(blocks[stage])]

    encoders = [nn.Sequential(nn.Conv3d(in_channels, widths[0], 1), *blocks_of(0, widths[0]))]
    encoders += [nn.Sequential(MedNeXtBlock(widths[k - 1], widths[k], ratios[k], kernel, "down"),
                               *blocks_of(k, widths[k]))
                 for k in range(1, 5)]
    decoders = []
    for level in (4, 3, 2, 1):
        stage = 9 - level                                                   # decoder4 is stage 5, decoder1 stage 8
        up = MedNeXtBlock(widths[level], widths[level - 1], ratios[stage], kernel, "up")
        decoders.append(DecoderStage(up, nn.Sequential(*blocks_of(stage, widths[level - 1])), merge="add"))
    head = nn.ConvTranspose3d(widths[0], num_classes, 1)  # the authors' OutBlock: weight (C, classes, 1, 1, 1)
    return Parts(encoders, [nn.Identity() for _ in range(4)], decoders, head, widths[4])


# ----------------------------------------------------------------------------- 3D UX-Net

UXNET_WIDTHS = (48, 96, 192, 384, 768)  # levels 1..5 (skips, decoders, bottleneck); the path has widths[:4]
UXNET_DEPTH = 2                         # UX blocks per encoder
UXNET_KERNEL = 7                        # of the stem and of every UX block's depthwise conv


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, *S), at every voxel (ConvNeXt's "channels_first" LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)   # normalised as (B, *S, C)


class UXBlock(nn.Module):
    """(B, C, *S) -> same: x + gamma * pwconv2(GELU(pwconv1(LN(dwconv(x))))), 1x1 convs grouped by channel."""

    def __init__(self, channels: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv3d(channels, channels, UXNET_KERNEL, padding=UXNET_KERNEL // 2, groups=channels)
        self.norm = ChannelLayerNorm(channels, eps=1e-6)
        self.pwconv1 = nn.Conv3d(channels, 4 * channels, 1, groups=channels)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv3d(4 * channels, channels, 1, groups=channels)
        self.gamma = nn.Parameter(torch.full((channels,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.gamma.view(-1, 1, 1, 1) * branch     # gamma (C,) over (C, D, H, W)


class ResidualConvBlock(nn.Module):
    """(B, C_in, *S) -> (B, C_out, *S): lrelu(IN(conv2(lrelu(IN(conv1(x))))) + shortcut(x)), UNETR's
    residual block (MONAI's UnetResBlock with norm "instance")."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(c_out)
        self.shortcut = nn.Identity() if c_in == c_out else nn.Sequential(
            nn.Conv3d(c_in, c_out, 1, bias=False), nn.InstanceNorm3d(c_out))
        self.act = nn.LeakyReLU(0.01, inplace=True)  # in place: at 96^3 every saved copy is 170 MB per 48 channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))
        return self.act(out + self.shortcut(x))


def uxnet3d_parts(in_channels: int, num_classes: int, *, widths: tuple[int, ...] = UXNET_WIDTHS) -> Parts:
    """3D UX-Net as u_shape's five levels; widths of levels 1..5, the ConvNeXt-like path at levels 2..5 having
    widths[:4] (the authors' feat_size, then hidden_size)."""
    path = widths[:4]
    downs = [nn.Sequential(nn.Conv3d(in_channels, path[0], UXNET_KERNEL, stride=2, padding=UXNET_KERNEL // 2),
                           ChannelLayerNorm(path[0], eps=1e-6))]
    downs += [nn.Sequential(ChannelLayerNorm(c_in, eps=1e-6), nn.Conv3d(c_in, c_out, 2, stride=2))
              for c_in, c_out in zip(path[:-1], path[1:], strict=True)]
    stages = [nn.Sequential(*(UXBlock(c) for _ in range(UXNET_DEPTH))) for c in path]
    encoders = [nn.Identity(), *stages[:3],
                nn.Sequential(stages[3], ChannelLayerNorm(path[3], eps=1e-6), ResidualConvBlock(path[3], widths[4]))]
    skip_blocks = [ResidualConvBlock(in_channels, widths[0])]
    skip_blocks += [nn.Sequential(ChannelLayerNorm(c_in, eps=1e-6), ResidualConvBlock(c_in, c))
                    for c_in, c in zip(path[:3], widths[1:4], strict=True)]
    decoders = [DecoderStage(nn.ConvTranspose3d(widths[level], widths[level - 1], 2, stride=2, bias=False),
                             ResidualConvBlock(2 * widths[level - 1], widths[level - 1]),
                             merge="concat-up-first", skip_block=skip_blocks[level - 1])
                for level in (4, 3, 2, 1)]
    # The authors' out block is built for 48 channels whatever feat_size is; widths[0] is what it means.
    head = nn.Sequential(ResidualConvBlock(widths[0], widths[0]), nn.Conv3d(widths[0], num_classes, 1))
    return Parts(encoders, downs, decoders, head, widths[4])
