"""SwiGLU gate: silu(gate) * up, where silu(g) = g * sigmoid(g)."""
import torch.nn.functional as F
from torch import Tensor


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up (..., I) -> (..., I)."""
    return swiglu_reference(gate, up)
