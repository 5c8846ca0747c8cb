"""Speed of the fused kernels and of the frozen LLM layer, forward + backward.

    python -m kernels.bench        # CUDA: kernels and layer at the paper's shapes
                                   # CPU:  our layer (reference path) against transformers'

On CUDA (bfloat16, B=8, T=256 tokens = the 16 x 16 bottleneck of a 256 x 256 image; the paper's
two LLMs: Llama-3.2-1B D=2048 I=8192 32/8 heads d=64, DeepSeek-R1-Distill-Qwen-1.5B D=1536
I=8960 12/2 heads d=128) every kernel's forward + backward is timed against PyTorch eager, the
same eager code under torch.compile and, for attention, F.scaled_dot_product_attention. The
element-wise kernels report GB/s (bytes read + written: RMSNorm 5 N D, SwiGLU 8 N I), attention
TFLOP/s (forward 4 B Hq T^2 d, backward 10 B Hq T^2 d). Then the whole frozen layer (input
gradient only) on the kernels, on the reference path and on the reference path compiled.

On CPU there are no GPU numbers (they need CUDA): it times llm_layer.DecoderLayer on the
reference path against transformers' LlamaDecoderLayer (sdpa, non-causal, identity rotation
cos = 1, sin = 0) at SmolLM2-135M's width, B=2, T=256, frozen, and prints our time over theirs
(goal: <= 0.9). transformers is needed only by this script, as by the tests.
"""
import contextlib
import json
import math
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import kernels
import llm_layer
from kernels.attention import attention_reference
from kernels.rms_norm import rms_norm_reference
from kernels.swiglu import swiglu_reference

BATCH, TOKENS = 8, 256
LLMS = {  # config.json fields of the paper's two LLMs (one layer's shapes)
    "llama3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                        num_key_value_heads=8, num_hidden_layers=16, rms_norm_eps=1e-5),
    "deepseek-r1-qwen-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                                  num_attention_heads=12, num_key_value_heads=2, num_hidden_layers=28,
                                  rms_norm_eps=1e-6),
}
SMOLLM2 = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, num_hidden_layers=30, rms_norm_eps=1e-5)
CPU_BATCH = 2


def time_ms(step, device: torch.device, repeats: int = 10, inner: int = 1) -> float:
    """Median over `repeats` of the mean time of `inner` back-to-back step() calls, in ms."""
    step()  # warm-up: compilation, autotuning caches, allocator
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) / inner)
    return 1e3 * statistics.median(times)


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


def build_layer(config: dict, dtype: torch.dtype, device: str) -> llm_layer.DecoderLayer:
    """A randomly initialised, then frozen, DecoderLayer of the given config.json fields."""
    with tempfile.TemporaryDirectory() as root:
        with open(os.path.join(root, "config.json"), "w") as f:
            json.dump(config, f)
        layer = llm_layer.load_layer(root, 1, mode="random", dtype=dtype)
    return layer.to(device).requires_grad_(False)


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


def bench_kernels_cuda(name: str, config: dict, device: torch.device, dtype=torch.bfloat16):
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
    for kernel, ours, others, inputs, args, work, unit in cases:
        others = {**others, "torch.compile(eager)": torch.compile(others["eager"])}
        ours_ms = time_ms(forward_backward(ours, inputs, *args), device, inner=20)
        print(f" {kernel}")
        print_row("ours (Triton)", ours_ms, ours_ms, work, unit)
        for other_name, other in others.items():
            other_ms = time_ms(forward_backward(other, inputs, *args), device, inner=20)
            print_row(other_name, other_ms, ours_ms, work, unit)


def bench_layer_cuda(name: str, config: dict, device: torch.device, dtype=torch.bfloat16):
    D, I = config["hidden_size"], config["intermediate_size"]
    Hq, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    d = D // Hq
    linear_flops = 2 * BATCH * TOKENS * (2 * D * Hq * d + 2 * D * Hkv * d + 3 * D * I)
    flops = 2 * linear_flops + 14 * BATCH * Hq * TOKENS**2 * d  # input-gradient backward = forward
    layer = build_layer(config, dtype, str(device))
    x = torch.randn(BATCH, TOKENS, D, device=device, dtype=dtype, requires_grad=True)
    with kernels_path("triton"):
        ours_ms = time_ms(forward_backward(layer, [x]), device, inner=10)
    with kernels_path("torch"):
        eager_ms = time_ms(forward_backward(layer, [x]), device, inner=10)
        compiled_ms = time_ms(forward_backward(torch.compile(layer), [x]), device, inner=10)
    print(f" whole frozen layer ({name}), input gradient only")
    for path, ms in [("ours (Triton)", ours_ms), ("eager (sdpa)", eager_ms), ("torch.compile(eager)", compiled_ms)]:
        print_row(path, ms, ours_ms, flops, "TFLOP/s")


def bench_layer_cpu(repeats: int = 7):
    """Our frozen DecoderLayer (reference path) against transformers' LlamaDecoderLayer."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(0)
    ours = build_layer(SMOLLM2, torch.float32, "cpu")
    hf_config = LlamaConfig(**{k: v for k, v in SMOLLM2.items() if k != "model_type"}, attn_implementation="sdpa")
    theirs = LlamaDecoderLayer(hf_config, layer_idx=0)
    theirs.load_state_dict(ours.state_dict())
    theirs.self_attn.is_causal = False
    theirs.requires_grad_(False)
    head_dim = SMOLLM2["hidden_size"] // SMOLLM2["num_attention_heads"]
    identity_rotation = (torch.ones(CPU_BATCH, TOKENS, head_dim), torch.zeros(CPU_BATCH, TOKENS, head_dim))

    def hf_layer(x):
        return theirs(x, attention_mask=None, position_embeddings=identity_rotation)

    x = torch.randn(CPU_BATCH, TOKENS, SMOLLM2["hidden_size"], requires_grad=True)
    with kernels_path("torch"), torch.no_grad():
        max_diff = (ours(x) - hf_layer(x)).abs().max().item()
    steps = {"ours": forward_backward(ours, [x]), "transformers": forward_backward(hf_layer, [x])}
    times = {name: [] for name in steps}
    with kernels_path("torch"):
        for _ in range(repeats):  # interleaved, so load from other processes hits both alike
            for name, step in steps.items():
                times[name].append(time_ms(step, torch.device("cpu"), repeats=1))
    ours_ms, theirs_ms = (statistics.median(times[name]) for name in steps)
    print(f"CPU, {torch.get_num_threads()} threads: frozen layer at SmolLM2-135M width (D=576, I=1536, "
          f"9/3 heads, d=64), B={CPU_BATCH} T={TOKENS} float32, forward + input gradient")
    print(f"  outputs agree to {max_diff:.1e}")
    print(f"  ours (reference path)  {ours_ms:8.2f} ms")
    print(f"  transformers (sdpa)    {theirs_ms:8.2f} ms")
    print(f"  ratio ours / transformers = {ours_ms / theirs_ms:.2f} (goal <= 0.9)")


def main():
    if not torch.cuda.is_available():
        print("No CUDA device: the kernel and GPU layer numbers need CUDA; timing the CPU reference path.")
        bench_layer_cpu()
        return
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}; 'ours faster by' = their time / ours (> 1: ours is faster)")
    for name, config in LLMS.items():
        bench_kernels_cuda(name, config, device)
        bench_layer_cuda(name, config, device)


if __name__ == "__main__":
    main()
