"""Speed of the whole frozen LLM layer (llm_layer.DecoderLayer), forward + input gradient.

    python tests/bench_layer.py

CUDA: at the paper's two LLMs' shapes (kernels.bench.LLMS, bfloat16, B=8, T=256) the layer on the
Triton kernels, on the PyTorch reference path, and on the reference path under torch.compile.
CPU: our layer on the reference path against transformers' LlamaDecoderLayer (sdpa, non-causal,
identity rotation cos = 1, sin = 0) at SmolLM2-135M's width, B=2, T=256, float32, frozen, and our
time over theirs (goal: <= 0.9). transformers is needed only here and by the tests.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for a plain `python`
from llm4seg import llm_layer  # noqa: E402
from llm4seg.kernels.bench import (BATCH, LLMS, TOKENS, forward_backward, interleaved_ms, kernels_path,  # noqa: E402
                                   print_row, time_ms)

SMOLLM2 = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, num_hidden_layers=30, rms_norm_eps=1e-5)
CPU_BATCH = 2


def build_layer(config: dict, dtype: torch.dtype, device: str) -> llm_layer.DecoderLayer:
    """A randomly initialised, then frozen, DecoderLayer of the given config.json fields."""
    with tempfile.TemporaryDirectory() as root:
        with open(os.path.join(root, "config.json"), "w") as f:
            json.dump(config, f)
        layer = llm_layer.load_layer(root, 1, mode="random", dtype=dtype)
    return layer.to(device).requires_grad_(False)


def bench_layer_cuda(name: str, config: dict, device: torch.device, dtype=torch.bfloat16) -> dict:
    """Prints, and returns {"ours", "eager", "compiled"}: ms of forward + input gradient."""
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
    return {"ours": ours_ms, "eager": eager_ms, "compiled": compiled_ms}


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
    with kernels_path("torch"):
        timings = interleaved_ms(steps, torch.device("cpu"), repeats)
    ours_ms, theirs_ms = timings["ours"], timings["transformers"]
    print(f"CPU, {torch.get_num_threads()} threads: frozen layer at SmolLM2-135M width (D=576, I=1536, "
          f"9/3 heads, d=64), B={CPU_BATCH} T={TOKENS} float32, forward + input gradient")
    print(f"  outputs agree to {max_diff:.1e}")
    print(f"  ours (reference path)  {ours_ms:8.2f} ms")
    print(f"  transformers (sdpa)    {theirs_ms:8.2f} ms")
    print(f"  ratio ours / transformers = {ours_ms / theirs_ms:.2f} (goal <= 0.9)")





def main():
    if not torch.cuda.is_available():
        print("No CUDA device: timing the CPU reference path against transformers.")
        bench_layer_cpu()
        return
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}; 'ours faster by' = their time / ours (> 1: ours is faster)")
    for name, config in LLMS.items():
        bench_layer_cuda(name, config, device)


if __name__ == "__main__":
    main()
