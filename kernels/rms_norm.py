"""RMSNorm: y = w * x / sqrt(mean(x^2) + eps), statistics in float32, result in x's dtype."""
import torch
from torch import Tensor


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    # Llama casts back to the input dtype before scaling by the weight, so do we.
    return weight * normed.to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x (..., D), weight (D,) -> (..., D)."""
    return rms_norm_reference(x, weight, eps)
