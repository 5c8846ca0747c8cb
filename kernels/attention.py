"""Non-causal grouped-query attention: softmax(q k^T / sqrt(d)) v per head.

q (B, Hq, T, d); k, v (B, Hkv, T, d); kv head j serves q heads j*g .. j*g+g-1, g = Hq / Hkv.
"""
import torch.nn.functional as F
from torch import Tensor


def attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q (B, Hq, T, d), k/v (B, Hkv, T, d) with Hq % Hkv == 0 -> (B, Hq, T, d)."""
    return attention_reference(q, k, v)
