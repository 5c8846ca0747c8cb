"""Segmentation networks with one LLM decoder layer inside: LLM4Seg's U-Net, CMUNeXt or nnU-Net with the
layer at the bottleneck (2D, this file), and MedVisionLlama's ViT with it after the patch embedding
(2D or 3D, vit.py). Both go through build_model and the same LLMBridge.

    image (B, in_channels, H, W)
    encoder1 ------------------------------------------------ decoder1 -> head -> logits (B, classes, H, W)
      down, encoder2 -------------------------------- decoder2
        down, encoder3 ------------------------ decoder3
          down, encoder4 ---------------- decoder4
            down, encoder5 -> bridge -----^             encoder5 gives (B, C, H/16, W/16)

Each step down halves the sides (a 2x2 max-pool, or for nnU-Net the stride-2 first conv of the next
encoder), so H and W must be multiples of 16. Decoder k upsamples x2 to the channels of encoder k,
concatenates encoder k's output (the skip connection) and fuses the two.

The bridge (LLM4Seg), N = h*w tokens in row-major order, D = the LLM's hidden size (from its config):
    (B, C, h, w) -> (B, N, C) -> Linear(C, D) -> decoder layer -> Linear(D, C) -> (B, N, C) -> (B, C, h, w)
The layer (llm_layer.py) runs non-causal and without RoPE. Frozen (the paper's default), only the CNN
and the two adapters train: the bridge adds C*D + D + D*C + C trainable parameters. Two options
from MedVisionLlama, both off by default: residual=True computes x + layer(x); lora_rank=r adds
W + B A (alpha = r, so scale alpha / r = 1) to the frozen q_proj and v_proj, with A (r, in) and
B (out, r); B starts at zero so training starts from the pre-trained layer.
A frozen layer's weights are left out of state_dict (llm_layer.PretrainedLayer drops them; LoRA's A, B
stay): they come back from the LLM checkpoint named in `model.config`, which holds everything
`build_model(**asdict(model.config))` needs.

Backbones, trained from scratch:
    U-Net   (the CMUNeXt authors' benchmark code): channels 64-128-256-512-1024; stage = 2 x (3x3 conv,
            BN, ReLU); up = nearest x2, 3x3 conv, BN, ReLU.
    CMUNeXt (Tang et al., ISBI 2024, github.com/FengheTan9/CMUNeXt): dims 16-32-128-160-256, depths
            1-1-1-3-1, kernels 3-3-7-7-7; stage = depth x [x + BN(GELU(depthwise kxk)), 1x1 to 4C, GELU,
            BN, 1x1 to C, GELU, BN] then 3x3 conv, BN, ReLU to the stage's width, after a 3x3 conv+BN+ReLU
            stem; up = bilinear x2, 3x3 conv, BN, ReLU; fusion = 3x3 conv with groups=2 (skip and
            upsampled path apart), then the 4x inverted bottleneck.
    nnU-Net (Isensee et al., Nature Methods 2021; dynamic-network-architectures' PlainConvUNet, 2D, 5
            stages): channels 32-64-128-256-512; stage = 2 x (3x3 conv with bias, InstanceNorm(affine),
            LeakyReLU 0.01), the first conv of encoders 2..5 with stride 2 (no pooling); up = 2x2
            transposed conv, stride 2; concatenation [up, skip] (nnU-Net's order). The 3 deep-supervision
            heads of nnU-Net's own training are left out: the paper trains every backbone with one
            recipe and inference never calls them (with them: 7,766,436 parameters).

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
Left out: the paper's 3D backbones (MedNeXt, 3D UX-Net).

MedVisionLlama (build_model("vit", ...), vit.py): the bridge sits on the ViT's tokens (B, N, E) and, by
default for "vit", adds the residual and the LLM's final RMSNorm: E -> D -> h + norm(layer(h)) -> E.
The public code builds that norm but never loads its weight, so it runs with weight 1 (final_norm="unit");
final_norm="pretrained" loads the checkpoint's model.norm.weight instead. mapper_lora_rank=r makes the two
mappers what the public code's loralib.Linear(r=r) is: weight frozen at its random init, bias and B A trained,
scale 1 / r (lora_mapper); 0 leaves them plain trained Linears (the paper's "Linear" variant). lora_rank=r
adapts q / v inside the layer (the paper's "selectively"; which projections, it does not say). At 1 x 128^3,
patch 8, E 64, 16 blocks (tests/test_vit.py; the Llama-3.1-8B-shaped rows in tests/test_llm_layer.py):
                                             trainable    frozen        paper's Table 5 (trainable / frozen)
    ViT-Baseline                             1,128,000    0             1.16 M (+ an unused head, 33,280)
    + Llama-3.1-8B L32, Linear mappers       1,656,448    218,116,096   "Linear" 6.78 M / 218.12 M
    + Llama-3.1-8B L32, mapper LoRA rank 8   1,198,720    218,640,384   "LoRA" 5.43 M / 218.24 M
(frozen: the layer's 218,112,000, the unit norm's 4,096, and with LoRA the mappers' weights 524,288).
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_layer import MODES as LLM_MODES
from llm_layer import load_final_norm, load_layer
from llm_layer.layers import RMSNorm
from vit import VisionTransformer

DOWNSAMPLING = 16  # four halvings of the sides between encoder1 and encoder5
MODES = ("none", *LLM_MODES)  # "none": the plain backbone, the paper's baseline rows


@dataclass
class ModelConfig:
    """The build_model arguments a model was built with; a checkpoint saves it to rebuild the model."""
    backbone: str
    llm: str | None
    layer: int
    mode: str
    in_channels: int
    num_classes: int
    lora_rank: int
    residual: bool
    revision: str | None = None  # the LLM's Hub revision (a commit pins the exact weights)
    mapper_lora_rank: int = 0
    final_norm: str = "none"
    spatial_dims: int = 2
    # the ViT's shape (vit.py); None for the CNNs
    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    heads: int | None = None
    dropout: float | None = None


# ----------------------------------------------------------------------------- the U-shaped network

class SegmentationNet(nn.Module):
    """Encoder stages, the optional LLM bridge, decoder stages, 1x1 head; named like the diagram above."""

    def __init__(self, encoders: list[nn.Module], down: nn.Module, bridge: nn.Module | None,
                 decoders: list[nn.Module], head: nn.Module, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder1, self.encoder2, self.encoder3, self.encoder4, self.encoder5 = encoders
        self.down = down  # a 2x2 max-pool, or nn.Identity where the encoders stride themselves
        self.bridge = bridge
        self.decoder4, self.decoder3, self.decoder2, self.decoder1 = decoders
        self.head = head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> logits (B, num_classes, H, W); H and W must be multiples of 16."""
        check_image_size(image)
        x1 = self.encoder1(image)            # (B, C1, H, W)
        x2 = self.encoder2(self.down(x1))    # (B, C2, H/2, W/2)
        x3 = self.encoder3(self.down(x2))    # (B, C3, H/4, W/4)
        x4 = self.encoder4(self.down(x3))    # (B, C4, H/8, W/8)
        x5 = self.encoder5(self.down(x4))    # (B, C5, H/16, W/16)
        if self.bridge is not None:
            x5 = self.bridge(x5)
        d4 = self.decoder4(x5, x4)           # (B, C4, H/8, W/8)
        d3 = self.decoder3(d4, x3)
        d2 = self.decoder2(d3, x2)
        d1 = self.decoder1(d2, x1)           # (B, C1, H, W)
        return self.head(d1)


def check_image_size(image: torch.Tensor) -> None:
    if image.ndim != 4:
        raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(image.shape)}")
    check_image_sides(*image.shape[-2:])


def check_image_sides(height: int, width: int) -> None:
    """Raise unless both sides are positive multiples of DOWNSAMPLING, naming the nearest that are."""
    if height > 0 and width > 0 and not height % DOWNSAMPLING and not width % DOWNSAMPLING:
        return
    nearest = "x".join(str(max(DOWNSAMPLING, round(side / DOWNSAMPLING) * DOWNSAMPLING)) for side in (height, width))
    raise ValueError(f"got {height}x{width}; height and width must be positive multiples of {DOWNSAMPLING} "
                     f"(the network halves them 4 times): resize or crop, e.g. to {nearest}")


class DecoderStage(nn.Module):
    """(B, C_deep, h, w), skip (B, C, 2h, 2w) -> (B, C, 2h, 2w): up to C, concat [skip, up], fuse 2C -> C.

    skip_first=False concatenates [up, skip] (nnU-Net's order), so its fusion weights map one to one."""

    def __init__(self, up: nn.Module, fuse: nn.Module, *, skip_first: bool = True):
        super().__init__()
        self.up = up
        self.fuse = fuse
        self.skip_first = skip_first

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        both = [skip, up] if self.skip_first else [up, skip]
        return self.fuse(torch.cat(both, dim=1))  # (B, 2C, 2h, 2w) before the fusion


# ----------------------------------------------------------------------------- the LLM bridge

class LLMBridge(nn.Module):
    """One LLM decoder layer between two adapters: maps (B, C, *spatial) through `forward`, tokens
    (B, N, C) through `refine`:
        hidden = Linear(C, D)(tokens);  out = layer(hidden);  out = final_norm(out) if any;
        out = hidden + out if residual;  Linear(D, C)(out)
    final_norm is MedVisionLlama's: the LLM's final RMSNorm, frozen, with unit or pre-trained weight (FINAL_NORMS)."""

    def __init__(self, channels: int, layer: nn.Module, *, residual: bool, final_norm: nn.Module | None = None):
        super().__init__()
        width = layer.config.hidden_size
        self.project_in = nn.Linear(channels, width)
        self.layer = layer
        self.final_norm = final_norm
        self.project_out = nn.Linear(width, channels)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> same; any spatial size: the token count follows the feature map."""
        tokens = x.flatten(2).transpose(1, 2)                    # (B, N, C), N = prod(spatial)
        return self.refine(tokens).transpose(1, 2).reshape(x.shape)

    def refine(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        hidden = self.project_in(tokens)         # (B, N, D)
        out = self.layer(hidden)                 # (B, N, D)
        if self.final_norm is not None:
            out = self.final_norm(out)
        if self.residual:
            out = hidden + out
        return self.project_out(out)             # (B, N, C)


def pretrained_final_norm(config: ModelConfig, layer: nn.Module) -> torch.Tensor:
    """The LLM's own model.norm.weight, float32, checked against the layer's width."""
    if layer.config.model_type not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"final_norm='pretrained' reads model.norm.weight, the RMSNorm of Llama / Mistral / Qwen2; "
                         f"{config.llm} is a {layer.config.model_type}: use final_norm 'unit' or 'none'")
    weight = load_final_norm(config.llm, revision=layer.config.commit or config.revision).float()
    if weight.shape != (layer.config.hidden_size,):
        raise ValueError(f"{config.llm}'s model.norm.weight has shape {list(weight.shape)}, expected "
                         f"[{layer.config.hidden_size}]")
    return weight


def unit_final_norm(layer: nn.Module) -> nn.Module:
    """The LLM's final RMSNorm as MedVisionLlama's public code runs it: built, its weight never loaded
    from the checkpoint, so it stays 1 (and frozen). x / sqrt(mean(x^2) + eps), eps the layer's."""
    norm = RMSNorm(layer.config.hidden_size, layer.config.norm_eps)
    return norm.requires_grad_(False)


class LoRALinear(nn.Module):
    """y = base(x) + scale * x A^T B^T with base's weight frozen; A (r, in) kaiming-uniform, B (out, r)
    zero at start, scale = alpha / r. The base's bias keeps its requires_grad (loralib's Linear trains it).

    A and B stay float32 (they are trained) and are cast to x's dtype, e.g. a bf16 layer's."""

    def __init__(self, base: nn.Linear, rank: int, scale: float = 1.0):
        super().__init__()
        self.base = base
        self.scale = scale
        base.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear and the LoRA paper's code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = F.linear(x, self.lora_a.to(x.dtype))                 # (B, N, r)
        update = F.linear(low_rank, self.lora_b.to(x.dtype))            # (B, N, out)
        return self.base(x) + (update if self.scale == 1 else self.scale * update)


def lora_mapper(mapper: nn.Linear, rank: int) -> LoRALinear:
    """A mapper as MedVisionLlama's public code builds it, loralib.Linear(in, out, r=rank): the weight is
    frozen at its random initialisation, the bias and B A train, and the update is scaled by
    lora_alpha / r = 1 / r (loralib's default lora_alpha of 1; the code passes none)."""
    return LoRALinear(mapper, rank, scale=1 / rank)


def add_lora(layer: nn.Module, rank: int) -> None:
    """LoRA on the query and value projections (the layer's LORA_TARGETS: q_proj and v_proj, or
    BERT's query and value), the projections the LoRA paper adapts; alpha = r, so the scale is 1."""
    for name in layer.LORA_TARGETS:
        parent_name, _, attribute = name.rpartition(".")
        parent = layer.get_submodule(parent_name)
        setattr(parent, attribute, LoRALinear(getattr(parent, attribute), rank))


# ----------------------------------------------------------------------------- shared conv blocks

def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def upsample_conv(c_in: int, c_out: int, interpolation: str) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=interpolation), conv_bn_relu(c_in, c_out))


# ----------------------------------------------------------------------------- U-Net

UNET_CHANNELS = (64, 128, 256, 512, 1024)


def unet_stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(c_in, c_out), conv_bn_relu(c_out, c_out))


Parts = tuple[list[nn.Module], nn.Module, list[nn.Module], tuple[int, ...]]


def unet_parts(in_channels: int) -> Parts:
    """Encoders 1..5, the step down between them, decoders 4..1 sized from the encoder widths, those widths."""
    widths = UNET_CHANNELS
    encoders = [unet_stage(c_in, c_out) for c_in, c_out in zip((in_channels, *widths[:-1]), widths)]
    decoders = [DecoderStage(upsample_conv(c_deep, c, "nearest"), unet_stage(2 * c, c))
                for c, c_deep in reversed(list(zip(widths[:-1], widths[1:])))]
    return encoders, nn.MaxPool2d(2), decoders, widths


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


def cmunext_parts(in_channels: int) -> Parts:
    """Encoders 1..5 (encoder1 opens with the stem), decoders 4..1 sized from the encoder widths."""
    widths = CMUNEXT_DIMS
    stage_inputs = (widths[0], *widths[:-1])
    encoders = [cmunext_stage(c_in, c_out, depth, kernel)
                for c_in, c_out, depth, kernel in zip(stage_inputs, widths, CMUNEXT_DEPTHS, CMUNEXT_KERNELS)]
    encoders[0] = nn.Sequential(conv_bn_relu(in_channels, widths[0]), encoders[0])  # the stem
    decoders = [DecoderStage(upsample_conv(c_deep, c, "bilinear"), cmunext_fusion(c))
                for c, c_deep in reversed(list(zip(widths[:-1], widths[1:])))]
    return encoders, nn.MaxPool2d(2), decoders, widths


# ----------------------------------------------------------------------------- nnU-Net

NNUNET_CHANNELS = (32, 64, 128, 256, 512)
NNUNET_STRIDES = (1, 2, 2, 2, 2)  # of each encoder's first conv: encoder1 keeps the image's size


def conv_in_lrelu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
                         nn.InstanceNorm2d(c_out, eps=1e-5, affine=True), nn.LeakyReLU(0.01, inplace=True))


def nnunet_stage(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(conv_in_lrelu(c_in, c_out, stride), conv_in_lrelu(c_out, c_out))


def nnunet_parts(in_channels: int) -> Parts:
    """Encoders 1..5 (2..5 open with a stride-2 conv, so nothing sits between them), decoders 4..1.
    Four halvings: sides must be multiples of 16, as for the others, not 32 (96 x 160 is tested)."""
    widths = NNUNET_CHANNELS
    encoders = [nnunet_stage(c_in, c_out, stride)
                for c_in, c_out, stride in zip((in_channels, *widths[:-1]), widths, NNUNET_STRIDES)]
    decoders = [DecoderStage(nn.ConvTranspose2d(c_deep, c, 2, stride=2), nnunet_stage(2 * c, c), skip_first=False)
                for c, c_deep in reversed(list(zip(widths[:-1], widths[1:])))]
    return encoders, nn.Identity(), decoders, widths


BACKBONES = {"unet": unet_parts, "cmunext": cmunext_parts, "nnunet": nnunet_parts}


# ----------------------------------------------------------------------------- builders

VIT_DEFAULTS = {"in_channels": 1, "spatial_dims": 3, "residual": True, "final_norm": "unit"}  # MedVisionLlama's
CNN_DEFAULTS = {"in_channels": 3, "spatial_dims": 2, "residual": False, "final_norm": "none"}   # LLM4Seg's
# After the layer: nothing, the LLM's final RMSNorm with unit weight (MedVisionLlama's code), or with its
# pre-trained weight (model.norm.weight, read alone; Llama, Mistral and Qwen2 families).
FINAL_NORMS = ("none", "unit", "pretrained")


def build_model(backbone: str = "cmunext", llm: str | None = "llama3.2-1b", layer: int = 15,
                mode: str = "frozen", *, in_channels: int | None = None, num_classes: int = 1,
                lora_rank: int = 0, mapper_lora_rank: int = 0, residual: bool | None = None,
                final_norm: str | None = None, revision: str | None = None, spatial_dims: int | None = None,
                img_size: int = 128, patch_size: int = 8, embed_dim: int = 64, depth: int = 16, heads: int = 4,
                dropout: float = 0.2) -> nn.Module:
    """A U-Net, CMUNeXt, nnU-Net (2D) or ViT (2D or 3D); with `llm`, the `layer`-th (1-based) decoder layer
    of that LLM in the bridge, loaded by llm_layer.load_layer in `mode` (frozen / trainable / random) at the
    Hub `revision` (branch, tag or commit; None = main). llm=None or mode="none" gives the plain backbone
    (model.bridge is None): for "vit", the paper's ViT-Baseline.

    lora_rank: LoRA on the frozen layer's query and value projections; mapper_lora_rank: LoRA on the
    bridge's two adapters (MedVisionLlama's "LoRA-based dimension mapping layers").
    None takes the backbone's default (VIT_DEFAULTS, CNN_DEFAULTS): in_channels (1 or 3), spatial_dims
    (3 or 2), residual (x + ... around the layer) and final_norm (FINAL_NORMS: "unit" or "none"; "pretrained").
    img_size, patch_size, embed_dim, depth, heads, dropout: the ViT's (vit.py), MedVisionLlama's defaults;
    the CNNs take any multiple of 16 and ignore them."""
    if backbone not in BACKBONES and backbone != "vit":
        raise ValueError(f"expected backbone one of {sorted([*BACKBONES, 'vit'])}, got {backbone!r}")
    if mode not in MODES:
        raise ValueError(f"expected mode one of {MODES}, got {mode!r}")
    defaults = VIT_DEFAULTS if backbone == "vit" else CNN_DEFAULTS
    in_channels = defaults["in_channels"] if in_channels is None else in_channels
    spatial_dims = defaults["spatial_dims"] if spatial_dims is None else spatial_dims
    plain = llm is None or mode == "none"
    residual = (defaults["residual"] and not plain) if residual is None else residual
    final_norm = (defaults["final_norm"] if not plain else "none") if final_norm is None else final_norm
    check_model_options(backbone, llm, mode, plain, lora_rank, mapper_lora_rank, residual, final_norm, spatial_dims)
    config = ModelConfig(backbone=backbone, llm=None if plain else llm, layer=layer,
                         mode="none" if plain else mode, in_channels=in_channels, num_classes=num_classes,
                         lora_rank=lora_rank, residual=residual, revision=None if plain else revision,
                         mapper_lora_rank=mapper_lora_rank, final_norm=final_norm, spatial_dims=spatial_dims)
    if backbone == "vit":
        config.img_size, config.patch_size, config.embed_dim = img_size, patch_size, embed_dim
        config.depth, config.heads, config.dropout = depth, heads, dropout
        bridge = None if plain else llm_bridge(config, embed_dim)
        net = VisionTransformer(in_channels=in_channels, num_classes=num_classes, spatial_dims=spatial_dims,
                                img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                heads=heads, dropout=dropout, bridge=bridge)
        net.config = config
        return net
    encoders, down, decoders, widths = BACKBONES[backbone](in_channels)
    bridge = None if plain else llm_bridge(config, widths[-1])
    head = nn.Conv2d(widths[0], num_classes, 1)
    return SegmentationNet(encoders, down, bridge, decoders, head, config)


def check_model_options(backbone, llm, mode, plain, lora_rank, mapper_lora_rank, residual, final_norm,
                        spatial_dims) -> None:
    for name, rank in (("lora_rank", lora_rank), ("mapper_lora_rank", mapper_lora_rank)):
        if rank < 0:
            raise ValueError(f"expected {name} >= 0 (0 = no LoRA), got {rank}")
    if lora_rank and (plain or mode != "frozen"):
        raise ValueError(f"LoRA adapts a frozen LLM layer: expected llm set and mode='frozen' with "
                         f"lora_rank={lora_rank}, got llm={llm!r}, mode={mode!r}")
    for name, on in (("mapper_lora_rank", mapper_lora_rank), ("residual", residual),
                     ("final_norm", final_norm != "none")):
        if on and plain:
            raise ValueError(f"{name}={on!r} belongs to the LLM bridge: expected an llm and a mode other than "
                             f"'none', got llm={llm!r}, mode={mode!r}")
    if final_norm not in FINAL_NORMS:
        raise ValueError(f"expected final_norm one of {FINAL_NORMS}, got {final_norm!r}")
    allowed = (2, 3) if backbone == "vit" else (2,)
    if spatial_dims not in allowed:
        raise ValueError(f"backbone {backbone!r} is {' or '.join(f'{d}D' for d in allowed)}: got spatial_dims="
                         f"{spatial_dims}{'; for volumes use the vit backbone' if backbone != 'vit' else ''}")


def llm_bridge(config: ModelConfig, channels: int) -> LLMBridge:
    """The LLM layer of `config` between Linear(channels, D) and Linear(D, channels), with its options."""
    # A frozen layer keeps the checkpoint's dtype here; the entry scripts store it in the run's
    # precision (set_frozen_dtype). Trained weights need float32 so small updates are not rounded away.
    decoder_layer = load_layer(config.llm, config.layer, mode=config.mode,
                               dtype=torch.float32 if config.mode == "trainable" else None, revision=config.revision)
    if config.lora_rank:
        add_lora(decoder_layer, config.lora_rank)
    final_norm = None if config.final_norm == "none" else unit_final_norm(decoder_layer)
    if config.final_norm == "pretrained":
        final_norm.weight.data = pretrained_final_norm(config, decoder_layer)
    bridge = LLMBridge(channels, decoder_layer, residual=config.residual, final_norm=final_norm)
    if config.mapper_lora_rank:
        bridge.project_in = lora_mapper(bridge.project_in, config.mapper_lora_rank)
        bridge.project_out = lora_mapper(bridge.project_out, config.mapper_lora_rank)
    return bridge


def set_frozen_dtype(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the frozen LLM layer's weights in `dtype`, the precision the run computes in (the layer
    computes in its weights' dtype). Trained tensors (adapters, LoRA, a trainable layer) stay float32,
    so that small updates are not rounded away. A plain backbone is left as it is."""
    if net.bridge is not None:
        for parameter in net.bridge.layer.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(dtype)
    return net


def count_gmacs(net: nn.Module, in_channels: int, img_size: int, spatial_dims: int = 2) -> float:
    """G multiply-accumulates of one (1, in_channels, S, S) forward (S, S, S with spatial_dims 3):
    FlopCounterMode's FLOPs / 2 (convs and matmuls, attention included; the paper's thop also counts
    BatchNorm and upsampling, ~1-3 % more), run on a meta-device copy, since the count needs only shapes."""
    from torch.utils.flop_counter import FlopCounterMode  # 0.2 s of imports that training never needs

    meta_net = copy.deepcopy(net).to("meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_net(torch.zeros(1, in_channels, *(img_size,) * spatial_dims, device="meta"))
    return counter.get_total_flops() / 2 / 1e9


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts; shared parameters count once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen
