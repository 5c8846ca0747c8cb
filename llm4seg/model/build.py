"""build_model: a backbone (a row of BACKBONES) with an LLM layer in its bridge, the ModelConfig that rebuilds
it, and parameter, MAC and activation counts.

    build_model(backbone, llm, layer, mode, in_channels=None, num_classes=1, spatial_dims=None, ...)
        config  = ModelConfig(the arguments, None resolved from the row)
        network = row.network(config, bridge_at)
            a CNN: u_shape.SegmentationNet(row's parts(in_channels, num_classes), bridge at its bottleneck)
            "vit": vit.VisionTransformer(shape from row.options, bridge after its patch embedding)
        bridge_at(C) = bridge.LLMBridge(C, llm_layer.load_layer(llm, layer, mode)); None when llm is None or
                       mode "none" (the plain backbone, the papers' baseline rows)
    model.config = that ModelConfig: build_model(**asdict(model.config)) builds the same network again
    (checkpoints rely on it).

Defaults left None come from the backbone's row: in_channels and spatial_dims (3-channel images in 2D for
LLM4Seg's 2D data, 1-channel CT volumes in 3D for BTCV, 1-channel volumes for the ViT), residual and
final_norm (LLM4Seg's for the CNNs, MedVisionLlama's for the ViT), and the ViT's shape (row.options). A
backbone takes the dimensions its row names: asking a 2D CNN for spatial_dims 3, or a 3D one for 2, is refused.
Adding a backbone is one row: a function giving its Parts (backbones_2d.py, backbones_3d.py) and cnn(parts,
dims), or a Backbone whose network(config, bridge_at) builds any other shape.
"""
import contextlib
import copy
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..llm_layer import MODES as LLM_MODES
from ..llm_layer import load_final_norm, load_layer
from ..vit import VisionTransformer, check_patch_grid
from .backbones_2d import cmunext_parts, nnunet_parts, unet_parts
from .backbones_3d import mednext_parts, uxnet3d_parts
from .bridge import LLMBridge, add_lora, lora_mapper, unit_final_norm
from .u_shape import DOWNSAMPLING, Parts, SegmentationNet, check_image_sides

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


# MedVisionLlama's ViT shape (its code's defaults): 128^3 inputs, 8^3 patches, 64-wide tokens, 16 blocks of 4 heads.
VIT_OPTIONS = {"img_size": 128, "patch_size": 8, "embed_dim": 64, "depth": 16, "heads": 4, "dropout": 0.2}
BridgeAt = Callable[[int], "LLMBridge | None"]  # the LLM bridge at a network's width C, or None for a plain one


@dataclass(frozen=True)
class Backbone:
    """One row of BACKBONES: how its network is built around the bridge, the data it takes, its defaults."""
    network: Callable[[ModelConfig, BridgeAt], nn.Module]  # (config, bridge_at) -> the network, config set
    # (2,): (B, C, H, W) images; (3,): (B, C, D, H, W) volumes; both: either, the first by default
    spatial_dims: tuple[int, ...]
    in_channels: int                     # the default
    # The bridge's defaults: LLM4Seg's for the CNNs (h -> layer(h), nothing after it), MedVisionLlama's for the
    # ViT (h + norm(layer(h)) with a unit-weight final RMSNorm).
    residual: bool = False
    final_norm: str = "none"
    # The smallest side it takes (a multiple of DOWNSAMPLING). Instance and per-channel group norms need more
    # than one value per channel: a side of 16 leaves the bottleneck one voxel wide, and they cannot normalise it.
    min_side: int = DOWNSAMPLING
    # The build_model keywords that shape this network (the ViT's) and their defaults; the CNNs have none.
    options: dict = field(default_factory=dict)
    feature_maps: bool = True            # a bottleneck of feature maps (B, C, *S/16): eval.py --analyze reads it

    def check_sides(self, name: str, sides: tuple[int, ...], **options) -> None:
        """Raise unless the network takes inputs of these sides: a multiple of the ViT's patch, or of the U's 16
        halvings and at least min_side."""
        if "patch_size" in self.options:
            check_patch_grid(sides, options.get("patch_size", self.options["patch_size"]))
            return
        check_image_sides(*sides)
        if any(side < self.min_side for side in sides):
            side = min(sides)
            raise ValueError(f"got {side}; the {name} bottleneck would be {side // DOWNSAMPLING} voxel wide, and its "
                             f"instance / group norms need more than one value per channel: expected {self.min_side} "
                             "or more")


def u_net(parts: Callable[[int, int], Parts], config: ModelConfig, bridge_at: BridgeAt) -> SegmentationNet:
    """A CNN row's network: the U of `parts(in_channels, num_classes)` with the bridge at its bottleneck."""
    built = parts(config.in_channels, config.num_classes)
    return SegmentationNet(built, bridge_at(built.bottleneck), config.spatial_dims, config)


def vision_transformer(config: ModelConfig, bridge_at: BridgeAt) -> VisionTransformer:
    """The ViT row's network: MedVisionLlama's ViT with the bridge after its patch embedding (width embed_dim)."""
    shape = {name: getattr(config, name) for name in VIT_OPTIONS}
    net = VisionTransformer(in_channels=config.in_channels, num_classes=config.num_classes,
                            spatial_dims=config.spatial_dims, bridge=bridge_at(config.embed_dim), **shape)
    net.config = config
    return net


def cnn(parts: Callable[[int, int], Parts], spatial_dims: int, min_side: int = DOWNSAMPLING) -> Backbone:
    """A CNN's row: its U, LLM4Seg's bridge defaults, 3-channel images in 2D, 1-channel CT volumes in 3D."""
    return Backbone(partial(u_net, parts), (spatial_dims,), in_channels=3 if spatial_dims == 2 else 1,
                    min_side=min_side)


NEEDS_TWO_BOTTLENECK_VOXELS = 2 * DOWNSAMPLING  # InstanceNorm (nnU-Net, 3D UX-Net's decoder), MedNeXt's GroupNorm
BACKBONES = {
    "unet": cnn(unet_parts, 2),
    "cmunext": cnn(cmunext_parts, 2),
    "nnunet": cnn(nnunet_parts, 2, NEEDS_TWO_BOTTLENECK_VOXELS),
    # MedNeXt's size B with kernel 3 by default (LLM4Seg does not say which); its other sizes and kernel 5.
    "mednext": cnn(partial(mednext_parts, size="B", kernel=3), 3, NEEDS_TWO_BOTTLENECK_VOXELS),
    "mednext-s": cnn(partial(mednext_parts, size="S", kernel=3), 3, NEEDS_TWO_BOTTLENECK_VOXELS),
    "mednext-m": cnn(partial(mednext_parts, size="M", kernel=3), 3, NEEDS_TWO_BOTTLENECK_VOXELS),
    "mednext-l": cnn(partial(mednext_parts, size="L", kernel=3), 3, NEEDS_TWO_BOTTLENECK_VOXELS),
    "mednext-b-k5": cnn(partial(mednext_parts, size="B", kernel=5), 3, NEEDS_TWO_BOTTLENECK_VOXELS),
    "uxnet3d": cnn(uxnet3d_parts, 3, NEEDS_TWO_BOTTLENECK_VOXELS),
    # Not the paper's: MedNeXt-S at a quarter of its width (8 channels at full resolution), small enough for
    # `make demo3d` to train three runs on 2 CPU cores in minutes.
    "mednext-tiny": cnn(partial(mednext_parts, size="S", kernel=3, width=8), 3, NEEDS_TWO_BOTTLENECK_VOXELS),
    # MedVisionLlama: a ViT on 2D images or 3D volumes (1-channel volumes by default), the layer after the patch
    # embedding with the residual and the LLM's final norm (unit weight) around it.
    "vit": Backbone(vision_transformer, (3, 2), in_channels=1, residual=True, final_norm="unit",
                    options=dict(VIT_OPTIONS), feature_maps=False),
}

# After the layer: nothing, the LLM's final RMSNorm with unit weight (MedVisionLlama's code), or with its
# pre-trained weight (model.norm.weight, read alone; Llama, Mistral and Qwen2 families).
FINAL_NORMS = ("none", "unit", "pretrained")


def backbones_for(spatial_dims: int) -> list[str]:
    """The backbones that take inputs of this dimension, in BACKBONES' order."""
    return [name for name, row in BACKBONES.items() if spatial_dims in row.spatial_dims]


def backbone_defaults(backbone: str) -> dict:
    """in_channels, spatial_dims, residual, final_norm where build_model is given None."""
    row = BACKBONES[backbone]
    return {"in_channels": row.in_channels, "spatial_dims": row.spatial_dims[0], "residual": row.residual,
            "final_norm": row.final_norm}


def build_model(backbone: str = "cmunext", llm: str | None = "llama3.2-1b", layer: int = 15,
                mode: str = "frozen", *, in_channels: int | None = None, num_classes: int = 1,
                lora_rank: int = 0, mapper_lora_rank: int = 0, residual: bool | None = None,
                final_norm: str | None = None, revision: str | None = None, spatial_dims: int | None = None,
                img_size: int | None = None, patch_size: int | None = None, embed_dim: int | None = None,
                depth: int | None = None, heads: int | None = None, dropout: float | None = None) -> nn.Module:
    """A U-Net, CMUNeXt, nnU-Net (2D), MedNeXt, 3D UX-Net (3D) or ViT (2D or 3D); with `llm`, the `layer`-th
    (1-based) decoder layer of that LLM in the bridge, loaded by llm_layer.load_layer in `mode` (frozen /
    trainable / random) at the Hub `revision` (branch, tag or commit; None = main). llm=None or mode="none"
    gives the plain backbone (model.bridge is None): for "vit", the paper's ViT-Baseline.

    lora_rank: LoRA on the frozen layer's query and value projections; mapper_lora_rank: LoRA on the
    bridge's two adapters (MedVisionLlama's "LoRA-based dimension mapping layers").
    None takes the backbone's row (backbone_defaults): in_channels (3 for the 2D CNNs, 1 for the 3D ones
    and the ViT), spatial_dims (the CNN's own dimension; 3 for the ViT), residual (x + ... around the layer)
    and final_norm (FINAL_NORMS: "unit" for the ViT, "none" for the CNNs; "pretrained").
    img_size, patch_size, embed_dim, depth, heads, dropout: the ViT's shape (vit.py; None: VIT_OPTIONS,
    MedVisionLlama's); the CNNs take any multiple of 16 and ignore them."""
    if backbone not in BACKBONES:
        raise ValueError(f"expected backbone one of {sorted(BACKBONES)}, got {backbone!r}")
    if mode not in MODES:
        raise ValueError(f"expected mode one of {MODES}, got {mode!r}")
    row, defaults = BACKBONES[backbone], backbone_defaults(backbone)
    in_channels = defaults["in_channels"] if in_channels is None else in_channels
    spatial_dims = defaults["spatial_dims"] if spatial_dims is None else spatial_dims
    plain = llm is None or mode == "none"
    residual = (defaults["residual"] and not plain) if residual is None else residual
    final_norm = (defaults["final_norm"] if not plain else "none") if final_norm is None else final_norm
    check_model_options(backbone, llm, mode, plain, lora_rank, mapper_lora_rank, residual, final_norm, spatial_dims)
    given = {"img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "heads": heads,
             "dropout": dropout}
    shape = {name: default if given[name] is None else given[name] for name, default in row.options.items()}
    config = ModelConfig(backbone=backbone, llm=None if plain else llm, layer=layer,
                         mode="none" if plain else mode, in_channels=in_channels, num_classes=num_classes,
                         lora_rank=lora_rank, residual=residual, revision=None if plain else revision,
                         mapper_lora_rank=mapper_lora_rank, final_norm=final_norm, spatial_dims=spatial_dims, **shape)
    return row.network(config, lambda channels: None if plain else llm_bridge(config, channels))


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
    if spatial_dims not in (2, 3):
        raise ValueError(f"expected spatial_dims 2 (images) or 3 (volumes), got {spatial_dims}")
    own = sorted(BACKBONES[backbone].spatial_dims)
    if spatial_dims not in own:
        data = "volumes" if spatial_dims == 3 else "images"
        fitting = ", ".join(backbones_for(spatial_dims))
        raise ValueError(f"backbone {backbone!r} is {' or '.join(f'{dims}D' for dims in own)}: got "
                         f"spatial_dims={spatial_dims}; for {data} use one of {fitting}")


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


def meta_copy(net: nn.Module) -> nn.Module:
    """A copy of `net` on the meta device (shapes, no data), built without copying any weight: each parameter
    and buffer is replaced by an empty meta tensor of its shape, dtype and requires_grad."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in net.parameters()}
    memo |= {id(b): torch.empty_like(b, device="meta") for b in net.buffers()}
    return copy.deepcopy(net, memo)


def count_gmacs(net: nn.Module, in_channels: int, img_size: int, spatial_dims: int = 2) -> float:
    """G multiply-accumulates of one (1, in_channels, S, S) forward (S, S, S with spatial_dims 3):
    FlopCounterMode's FLOPs / 2 (convs and matmuls, attention included; the paper's thop also counts
    BatchNorm and upsampling, ~1-3 % more), run on a meta-device copy, since the count needs only shapes."""
    from torch.utils.flop_counter import FlopCounterMode  # 0.2 s of imports that training never needs

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_copy(net)(torch.zeros(1, in_channels, *(img_size,) * spatial_dims, device="meta"))
    return counter.get_total_flops() / 2 / 1e9


def count_activation_bytes(net: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Bytes of the activations a training forward of a float32 (B, C, *S) batch keeps for backward (autograd's
    saved tensors, the weights left out: each layer's inputs, normalisation statistics, ...) plus its logits,
    counted on a meta copy (no memory used; 0.1 s for MedNeXt after a first call's ~1 s). Attention is counted as
    fused kernels keep it (FusedAttentionShapes); where a CPU materialises the (T, T) weights instead (attention
    dropout) a step needs more, so the count is a lower bound there. Measured against the process's peak RSS:
    MedNeXt-tiny at 4 x 64^3, 1.93 GB counted, 2.16 GB grown (gradients and the allocator's slack)."""
    meta_net, saved = meta_copy(net).train(), 0
    weights = {id(p) for p in meta_net.parameters()}

    def count(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if id(tensor) not in weights and id(tensor._base) not in weights:  # a weight or a view of one: not counted
            saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor), fused_attention_shapes():
        logits = meta_net(torch.zeros(input_shape, device="meta"))
    return saved + logits.numel() * logits.element_size()


class FusedAttentionShapes(torch.autograd.Function):
    """softmax(q k^T) v as a fused kernel runs it, in shapes only: it keeps q, k, v, the output and one float32
    log-sum-exp per query for backward (flash attention on CUDA, kernels/attention.py), never the (T, T) weights
    that the meta device's math path would keep."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])                                  # (B, H, T, d_v)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError("FusedAttentionShapes counts a forward's saved tensors; it has no backward")


@contextlib.contextmanager
def fused_attention_shapes():
    """F.scaled_dot_product_attention (which nn.MultiheadAttention and the LLM layers call) as
    FusedAttentionShapes, for the meta counts above."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: FusedAttentionShapes.apply(q, k, v)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts; shared parameters count once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen
