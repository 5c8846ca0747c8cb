"""Fused kernels for the frozen LLM block: RMSNorm, SwiGLU and non-causal GQA attention.

Each public function takes plain tensors and picks its implementation by device: CUDA -> Triton,
CPU -> the PyTorch reference beside it. `LLM4SEG_KERNELS=triton|torch` forces one (Triton on CPU
tensors needs `TRITON_INTERPRET=1`, Triton's interpreter). triton is optional and imported only
on the first Triton call. `python -m llm4seg.kernels.bench` times them.
"""
from .attention import attention
from .rms_norm import rms_norm
from .swiglu import swiglu

__all__ = ["attention", "rms_norm", "swiglu"]
