"""The LLM bridge: one decoder layer of a pre-trained LLM between two linear adapters, at a CNN's bottleneck
(LLM4Seg, u_shape.py) or on a ViT's tokens after the patch embedding (MedVisionLlama, vit.py).

LLM4Seg, N = prod(spatial) tokens in row-major order, D = the LLM's hidden size (from its config):
    (B, C, *spatial) -> (B, N, C) -> Linear(C, D) -> decoder layer -> Linear(D, C) -> (B, N, C) -> (B, C, *spatial)
The layer (llm_layer/layers.py) runs non-causal and without RoPE. Frozen (the paper's default), only the CNN
and the two adapters train: the bridge adds C*D + D + D*C + C trainable parameters. Two options from
MedVisionLlama, both off by default for the CNNs: residual=True computes x + layer(x); lora_rank=r adds
W + B A (alpha = r, so scale alpha / r = 1) to the frozen q_proj and v_proj, with A (r, in) and B (out, r);
B starts at zero so training starts from the pre-trained layer. A frozen layer's weights are left out of
state_dict (llm_layer.PretrainedLayer drops them; LoRA's A, B stay): they come back from the LLM checkpoint
named in `model.config`, which holds everything `build_model(**asdict(model.config))` needs.

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
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..llm_layer.layers import RMSNorm


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


def set_frozen_dtype(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the frozen LLM layer's weights in `dtype`, the precision the run computes in (the layer
    computes in its weights' dtype). Trained tensors (adapters, LoRA, a trainable layer) stay float32,
    so that small updates are not rounded away. A plain backbone is left as it is."""
    if net.bridge is not None:
        for parameter in net.bridge.layer.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(dtype)
    return net
