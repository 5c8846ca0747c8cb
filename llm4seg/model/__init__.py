"""Segmentation networks with one LLM decoder layer inside: LLM4Seg's CNNs (2D: U-Net, CMUNeXt, nnU-Net;
3D: MedNeXt, 3D UX-Net) with the layer at the bottleneck, and MedVisionLlama's ViT (vit.py, beside this
package) with it after the patch embedding. All go through build_model and the same LLMBridge.

Read in this order; each file opens with its math, shapes and references:
    u_shape.py       SegmentationNet: the one U shape of every CNN, 2D or 3D (encoders, downs, bridge,
                     decoders, head), DecoderStage's merge rules, the rule that sides are multiples of 16
    bridge.py        LLMBridge: (B, C, *spatial) -> tokens -> Linear(C, D) -> LLM layer -> Linear(D, C) -> back;
                     LoRA, MedVisionLlama's final norm; the ViT's parameter table
    backbones_2d.py  U-Net, CMUNeXt, nnU-Net as parts of the U; LLM4Seg's Table 1, measured
    backbones_3d.py  MedNeXt (sizes S, B, M, L; kernel 3 or 5) and 3D UX-Net as parts of the U; their
                     parameters and G MACs at 96^3, measured
    build.py         BACKBONES (one row per backbone, the ViT's too), ModelConfig, build_model, parameter and
                     MAC counts
"""
from .backbones_2d import CMUNEXT_DIMS, NNUNET_CHANNELS, UNET_CHANNELS
from .backbones_3d import MEDNEXT_SIZES, UXNET_WIDTHS, mednext_parts, uxnet3d_parts
from .bridge import LLMBridge, LoRALinear, add_lora, lora_mapper, set_frozen_dtype, unit_final_norm
from .build import (BACKBONES, FINAL_NORMS, MODES, VIT_OPTIONS, Backbone, ModelConfig, backbone_defaults,
                    backbones_for, build_model, cnn, count_activation_bytes, count_gmacs, count_params, llm_bridge)
from .u_shape import DOWNSAMPLING, DecoderStage, Parts, SegmentationNet, check_image_sides, check_image_size

__all__ = ["BACKBONES", "CMUNEXT_DIMS", "DOWNSAMPLING", "FINAL_NORMS", "MEDNEXT_SIZES", "MODES", "NNUNET_CHANNELS",
           "UNET_CHANNELS", "UXNET_WIDTHS", "VIT_OPTIONS", "add_lora", "Backbone", "backbone_defaults",
           "backbones_for", "build_model", "check_image_sides", "check_image_size", "cnn", "count_activation_bytes",
           "count_gmacs", "count_params", "DecoderStage", "llm_bridge", "LLMBridge", "lora_mapper", "LoRALinear",
           "mednext_parts", "ModelConfig", "Parts", "SegmentationNet", "set_frozen_dtype", "unit_final_norm",
           "uxnet3d_parts"]
