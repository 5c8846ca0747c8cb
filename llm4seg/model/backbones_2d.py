"""LLM4Seg's 2D backbones (its Table 1), trained from scratch; each a function (in_channels, num_classes) ->
u_shape.Parts, wired by u_shape.SegmentationNet. Five levels, widths C1..C5; a 1x1 conv head.

    U-Net   (the CMUNeXt authors' benchmark code): channels 64-128-256-512-1024; stage = 2 x (3x3 conv,
            BN, ReLU); down = 2x2 max-pool; up = nearest x2, 3x3 conv, BN, ReLU; concat [skip, up].
    CMUNeXt (Tang et al., ISBI 2024, github.com/FengheTan9/CMUNeXt): dims 16-32-128-160-256, depths
            1-1-1-3-1, kernels 3-3-7-7-7; stage = depth x [x + BN(GELU(depthwise kxk)), 1x1 to 4C, GELU,
            BN, 1x1 to C, GELU, BN] then 3x3 conv, BN, ReLU to the stage's width, after a 3x3 conv+BN+ReLU
            stem; down = 2x2 max-pool; up = bilinear x2, 3x3 conv, BN, ReLU; fusion = 3x3 conv with groups=2
            (skip and upsampled path apart), then the 4x inverted bottleneck.
    nnU-Net (Isensee et al., Nature Methods 2021; dynamic-network-architectures' PlainConvUNet, 2D, 5
            stages): channels 32-64-128-256-512; stage = 2 x (3x3 conv with bias, InstanceNorm(affine),
            LeakyReLU 0.01), the first conv of encoders 2..5 with stride 2 (no pooling: the downs are
            nn.Identity); up = 2x2 transposed conv, stride 2; concatenation [up, skip] (nnU-Net's order). The
            3 deep-supervision heads of nnU-Net's own training are left out: the paper trains every backbone
            with one recipe and inference never calls them (with them: 7,766,436 parameters).

Measured in tests/test_model.py: trainable parameters and G MACs at 1x3x256x256 (FlopCounterMode,
convs and matmuls; the paper's thop also counts BatchNorm and upsampling, hence its slightly higher MACs):
                           params        G MACs    paper's Table 1
    U-Net                  34,527,041    65.35     34.52 M   65.56
      + Llama-3.2-1B L15   +4,197,376    82.26     +4.19 M   82.20
    CMUNeXt                 3,149,185     7.23      3.14 M    7.39
      + Llama-3.2-1B L15   +1,050,880    23.34     +1.05 M   23.42
      + DeepSeek-1.5B L28    +788,224    19.61     +0.78 M   19.77
    nnU-Net                 7,765,985    12.07      7.76 M   12.12
      + Llama-3.2-1B L15   +2,099,712    28.45     +2.10 M   28.22
"""
import torch
import torch.nn as nn

from .u_shape import DecoderStage, Parts


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def upsample_conv(c_in: int, c_out: int, interpolation: str) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=interpolation), conv_bn_relu(c_in, c_out))


def max_pools() -> list[nn.Module]:
    return [nn.MaxPool2d(2) for _ in range(4)]


def head(c_in: int, num_classes: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, num_classes, 1)


# ----------------------------------------------------------------------------- U-Net

UNET_CHANNELS = (64, 128, 256, 512, 1024)


def unet_stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(c_in, c_out), conv_bn_relu(c_out, c_out))


def unet_parts(in_channels: int, num_classes: int) -> Parts:
    """Encoders 1..5, max-pools between them, decoders 4..1 sized from the encoder widths."""
    widths = UNET_CHANNELS
    encoders = [unet_stage(c_in, c_out) for c_in, c_out in zip((in_channels, *widths[:-1]), widths, strict=True)]
    decoders = [DecoderStage(upsample_conv(c_deep, c, "nearest"), unet_stage(2 * c, c))
                for c, c_deep in reversed(list(zip(widths[:-1], widths[1:], strict=True)))]
    return Parts(encoders, max_pools(), decoders, head(widths[0], num_classes), widths[-1])


# ----------------------------------------------------------------------------- CMUNeXt

CMUNEXT_DIMS = (16, 32, 128, 160, 256)
CMUNEXT_DEPTHS = (1, 1, 1, 3, 1)
CMUNEXT_KERNELS = (3, 3, 7, 7, 7)


def conv_gelu_bn(c_in: int, c_out: int, kernel: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups),
                         nn.GELU(), nn.BatchNorm2d(c_out))


def inverted_bottleneck(c_in: int, c_out: int) -> nn.Sequential:
    """1x1 to 4 * c_out and back: channel mixing after the spatial conv."""
    return nn.Sequential(conv_gelu_bn(c_in, 4 * c_out), conv_gelu_bn(4 * c_out, c_out))


class CMUNeXtBlock(nn.Module):
    """(B, C, H, W) -> same: x + depthwise large-kernel conv (spatial mixing), then the bottleneck."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.spatial = conv_gelu_bn(channels, channels, kernel, groups=channels)
        self.mix = inverted_bottleneck(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x + self.spatial(x))


def cmunext_stage(c_in: int, c_out: int, depth: int, kernel: int) -> nn.Sequential:
    blocks = [CMUNeXtBlock(c_in, kernel) for _ in range(depth)]
    return nn.Sequential(*blocks, conv_bn_relu(c_in, c_out))


def cmunext_fusion(c: int) -> nn.Sequential:
    """[skip, up] (B, 2C, H, W) -> (B, C, H, W); groups=2 convolves the skip and the up path apart."""
    return nn.Sequential(conv_gelu_bn(2 * c, 2 * c, 3, groups=2), inverted_bottleneck(2 * c, c))


def cmunext_parts(in_channels: int, num_classes: int) -> Parts:
    """Encoders 1..5 (encoder1 opens with the stem), max-pools, decoders 4..1 sized from the encoder widths."""
    widths = CMUNEXT_DIMS
    stage_inputs = (widths[0], *widths[:-1])
    encoders = [cmunext_stage(c_in, c_out, depth, kernel)
                for c_in, c_out, depth, kernel in zip(stage_inputs, widths, CMUNEXT_DEPTHS, CMUNEXT_KERNELS, strict=True)]
    encoders[0] = nn.Sequential(conv_bn_relu(in_channels, widths[0]), encoders[0])  # the stem
    decoders = [DecoderStage(upsample_conv(c_deep, c, "bilinear"), cmunext_fusion(c))
                for c, c_deep in reversed(list(zip(widths[:-1], widths[1:], strict=True)))]
    return Parts(encoders, max_pools(), decoders, head(widths[0], num_classes), widths[-1])


# ----------------------------------------------------------------------------- nnU-Net

NNUNET_CHANNELS = (32, 64, 128, 256, 512)
NNUNET_STRIDES = (1, 2, 2, 2, 2)  # of each encoder's first conv: encoder1 keeps the image's size


def conv_in_lrelu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
                         nn.InstanceNorm2d(c_out, eps=1e-5, affine=True), nn.LeakyReLU(0.01, inplace=True))


def nnunet_stage(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(conv_in_lrelu(c_in, c_out, stride), conv_in_lrelu(c_out, c_out))


def nnunet_parts(in_channels: int, num_classes: int) -> Parts:
    """Encoders 1..5 (2..5 open with a stride-2 conv, so the downs are nn.Identity), decoders 4..1.
    Four halvings: sides must be multiples of 16, as for the others, not 32 (96 x 160 is tested)."""
    widths = NNUNET_CHANNELS
    encoders = [nnunet_stage(c_in, c_out, stride)
                for c_in, c_out, stride in zip((in_channels, *widths[:-1]), widths, NNUNET_STRIDES, strict=True)]
    decoders = [DecoderStage(nn.ConvTranspose2d(c_deep, c, 2, stride=2), nnunet_stage(2 * c, c),
                             merge="concat-up-first")
                for c, c_deep in reversed(list(zip(widths[:-1], widths[1:], strict=True)))]
    return Parts(encoders, [nn.Identity() for _ in range(4)], decoders, head(widths[0], num_classes), widths[-1])
