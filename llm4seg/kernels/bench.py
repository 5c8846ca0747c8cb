"""Speed of the fused kernels against PyTorch, forward + backward, on CUDA.

    python -m llm4seg.kernels.bench        # CUDA: each kernel at the paper's shapes

bfloat16, B=8, T=256 tokens = the 16 x 16 bottleneck of a 256 x 256 image; the paper's two LLMs:
Llama-3.2-1B D=2048 I=8192 32/8 heads d=64, DeepSeek-R1-Distill-Qwen-1.5B D=1536 I=8960 12/2 heads
d=128. Every kernel's forward + backward is timed against PyTorch eager, the same eager code under
torch.compile and, for attention, F.scaled_dot_product_attention. The element-wise kernels report
GB/s (bytes read + written: RMSNorm 5 N D, SwiGLU 8 N I), attention TFLOP/s (forward 4 B Hq T^2 d,
backward 10 B Hq T^2 d). The whole layer built from these kernels is timed by tests/bench_layer.py,
outside this package (the package never imports the layer that uses it).
"""
import contextlib
import math
import os
import statistics
import time

import torch

from .. import kernels
from .attention import attention_reference
from .rms_norm import rms_norm_reference
from .swiglu import swiglu_reference

BATCH, TOKENS = 8, 256
LLMS = {  # config.json fields of the paper's two LLMs (one layer's shapes)
    "llama3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                        num_key_value_heads=8, num_hidden_layers=16, rms_norm_eps=1e-5),
    "deepseek-r1-qwen-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                                  num_attention_heads=12, num_key_value_heads=2, num_hidden_layers=28,
                                  rms_norm_eps=1e-6),
}


# Timing effort of every benchmark: the median of REPEATS.repeats measurements, each the mean of
# `inner` back-to-back steps (inner scaled by REPEATS.inner_scale). tests/gpu_check.py --smoke lowers it.
REPEATS = {"repeats": 10, "inner_scale": 1.0}


def time_ms(step, device: torch.device, repeats: int | None = None, inner: int = 1) -> float:
    """Median over `repeats` of the mean time of `inner` back-to-back step() calls, in ms."""
    return interleaved_ms({"step": step}, device, repeats, inner)["step"]


def interleaved_ms(steps: dict, device: torch.device, repeats: int | None = None, inner: int = 1) -> dict:
    """{name: time_ms of step} for several steps measured in turns (A, B, A, B, ...), so a drift in the
    machine's speed (other processes, a compiler's idle workers) falls on every step alike."""
    repeats = repeats or REPEATS["repeats"]
    inner = max(1, round(inner * REPEATS["inner_scale"]))
    for step in steps.values():
        step()  # warm-up: compilation, autotuning caches, allocator
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(inner):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - start) / inner)
    return {name: 1e3 * statistics.median(measured) for name, measured in times.items()}


def forward_backward(fn, inputs, *args):
    """A step running fn(*inputs, *args) and its backward into every input requiring grad."""
    out = fn(*inputs, *args)
    grad_out = torch.randn_like(out)

    def step():
        for t in inputs:
            t.grad = None
        fn(*inputs, *args).backward(grad_out)
    return step


@contextlib.contextmanager
def kernels_path(choice: str):
    """Runs the block with LLM4SEG_KERNELS=choice ('triton' or 'torch')."""
    previous = os.environ.get("LLM4SEG_KERNELS")
    os.environ["LLM4SEG_KERNELS"] = choice
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("LLM4SEG_KERNELS")
        else:
            os.environ["LLM4SEG_KERNELS"] = previous


def attention_eager(q, k, v):
    """Attention as plain PyTorch ops, the way HF's eager path writes it (k, v repeated per q head)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, Hq, T, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, Hq, T, T)
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


UNIT_SCALE = {"GB/s": 1e9, "TFLOP/s": 1e12}


def print_row(name: str, ms: float, ours_ms: float, work: float, unit: str):
    """One timing line; `work` is the bytes or flops of one step, in `unit`'s base."""
    rate = work / (ms / 1e3) / UNIT_SCALE[unit]
    print(f"  {name:<22} {ms:8.3f} ms   ours faster by {ms / ours_ms:5.2f}x   {rate:8.1f} {unit}")


def bench_kernels_cuda(name: str, config: dict, device: torch.device, dtype=torch.bfloat16) -> dict:
    """Prints, and returns {kernel: {implementation: ms}} of one forward + backward at B=8, T=256."""
    D, I = config["hidden_size"], config["intermediate_size"]
    Hq, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    d, N = D // Hq, BATCH * TOKENS
    size = torch.finfo(dtype).bits // 8
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    x, weight = randn(BATCH, TOKENS, D), torch.ones(D, device=device, dtype=dtype)  # frozen weight
    gate, up = randn(BATCH, TOKENS, I), randn(BATCH, TOKENS, I)
    q, k, v = randn(BATCH, Hq, TOKENS, d), randn(BATCH, Hkv, TOKENS, d), randn(BATCH, Hkv, TOKENS, d)
    cases = [  # (kernel, ours, {other: implementation}, inputs, extra args, work per step, unit)
        ("rms_norm", kernels.rms_norm, {"eager": rms_norm_reference}, [x], (weight, config["rms_norm_eps"]),
         5 * N * D * size, "GB/s"),
        ("swiglu", kernels.swiglu, {"eager": swiglu_reference}, [gate, up], (), 8 * N * I * size, "GB/s"),
        ("attention", kernels.attention, {"eager": attention_eager, "sdpa": attention_reference}, [q, k, v], (),
         14 * BATCH * Hq * TOKENS**2 * d, "TFLOP/s"),
    ]
    print(f"\n{name}: B={BATCH} T={TOKENS} D={D} I={I} heads {Hq}/{Hkv} d={d} {dtype}, forward + backward")
    timings = {}
    for kernel, ours, others, inputs, args, work, unit in cases:
        others = {**others, "torch.compile(eager)": torch.compile(others["eager"])}
        ours_ms = time_ms(forward_backward(ours, inputs, *args), device, inner=20)
        timings[kernel] = {"ours": ours_ms}
        print(f" {kernel}")
        print_row("ours (Triton)", ours_ms, ours_ms, work, unit)
        for other_name, other in others.items():
            timings[kernel][other_name] = time_ms(forward_backward(other, inputs, *args), device, inner=20)
            print_row(other_name, timings[kernel][other_name], ours_ms, work, unit)
    return timings


# Attention at the shapes the GPU issue measured: the paper's 16 x 16 bottleneck, a 32 x 32 one, and
# MedVisionLlama's 16^3 tokens with Llama-3.1-8B's heads. (B, Hq, Hkv, T, d)
ATTENTION_SHAPES = [(8, 32, 8, 256, 64), (8, 32, 8, 1024, 64), (2, 32, 8, 4096, 128)]


def bench_attention_cuda(shape: tuple, device: torch.device, dtype=torch.bfloat16) -> dict:
    """{"ours": ms, "sdpa": ms} of attention forward + backward at shape (B, Hq, Hkv, T, d)."""
    B, Hq, Hkv, T, d = shape
    q = torch.randn(B, Hq, T, d, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, Hkv, T, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    with kernels_path("triton"):
        ours_ms = time_ms(forward_backward(kernels.attention, [q, k, v]), device, inner=10)
    sdpa_ms = time_ms(forward_backward(attention_reference, [q, k, v]), device, inner=10)
    print(f" attention B={B} {Hq}/{Hkv} heads T={T} d={d}: ours {ours_ms:.3f} ms, SDPA {sdpa_ms:.3f} ms, "
          f"{14 * B * Hq * T * T * d / ours_ms / 1e9:.0f} vs {14 * B * Hq * T * T * d / sdpa_ms / 1e9:.0f} TFLOP/s")
    return {"ours": ours_ms, "sdpa": sdpa_ms}


def main():
    if not torch.cuda.is_available():
        print("No CUDA device: the kernel timings need one. The whole layer on the CPU against transformers' "
              "is timed by `python tests/bench_layer.py`.")
        return
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}; 'ours faster by' = their time / ours (> 1: ours is faster)")
    for name, config in LLMS.items():
        bench_kernels_cuda(name, config, device)
    print("\nattention, bfloat16, forward + backward")
    for shape in ATTENTION_SHAPES:
        bench_attention_cuda(shape, device)


if __name__ == "__main__":
    main()
