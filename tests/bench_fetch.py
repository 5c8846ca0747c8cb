"""Benchmark: fetch one layer of a Llama-3.2-1B-shaped checkpoint from a local Hub stand-in.

    python tests/bench_fetch.py [--layer 15] [--workdir /tmp/llm4seg-bench]

Writes a 2.47 GB model.safetensors with Llama-3.2-1B's tensor names and shapes (random bf16),
serves it over HTTP with Range support, then runs `load_layer` in a fresh process and prints
the tensor-data bytes fetched against the layer's bytes, the wall time and the peak RSS of that
process (importing torch alone costs ~0.2 GB; that baseline is printed beside it).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from hub_standin import HubStandIn  # noqa: E402

REPO = "meta-llama/Llama-3.2-1B"
CONFIG = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
          "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
          "vocab_size": 128256, "hidden_act": "silu", "tie_word_embeddings": True, "torch_dtype": "bfloat16"}


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    D, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                   p + "self_attn.q_proj.weight": (D, D), p + "self_attn.k_proj.weight": (kv, D),
                   p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, D),
                   p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                   p + "mlp.down_proj.weight": (D, I)}
    return shapes


def write_checkpoint(directory: Path) -> Path:
    """Stream random bf16 tensors into model.safetensors, sorted by name as HF writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG))
    path = directory / "model.safetensors"
    if path.is_file():
        return path
    shapes = dict(sorted(llama_shapes(CONFIG).items()))
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    generator = torch.Generator().manual_seed(0)
    with open(path.with_suffix(".partial"), "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little") + header_bytes)
        for shape in shapes.values():
            f.write(torch.randn(shape, generator=generator).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    os.replace(path.with_suffix(".partial"), path)
    return path


# VmHWM: this process's peak resident memory (ru_maxrss would carry the parent's over fork + exec).
PEAK_RSS_KB = "int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "llm4seg-bench-fetch"))
    args = parser.parse_args()

    checkpoint = write_checkpoint(Path(args.workdir) / "repo")
    hub = HubStandIn().start()
    hub.add_repo(REPO, checkpoint.parent)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": tempfile.mkdtemp(prefix="llm4seg-bench-home-"),
           "HF_TOKEN": "bench", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    child = ("import sys, time, torch; t = time.time(); import llm_layer; "
             f"layer = llm_layer.load_layer('llama3.2-1b', {args.layer}); "
             "print(time.time() - t, sum(p.numel() * p.element_size() for p in layer.parameters()), "
             f"{PEAK_RSS_KB})")
    baseline = f"import torch; print({PEAK_RSS_KB})"
    root = Path(__file__).parents[1]
    run = lambda code: subprocess.run([sys.executable, "-c", code], env=env, cwd=root, check=True,
                                      capture_output=True, text=True).stdout.split()
    seconds, layer_bytes, peak_kb = (float(v) for v in run(child))
    torch_kb = float(run(baseline)[0])
    again = time.time()
    run(child)
    cached_seconds = time.time() - again

    with open(checkpoint, "rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
    sent = hub.sent(REPO, "model.safetensors")
    data = sum(max(0, s.end - max(s.start, data_start)) for s in sent)
    print(f"checkpoint            {checkpoint.stat().st_size / 1e9:.2f} GB ({checkpoint})")
    print(f"layer {args.layer} bytes        {layer_bytes / 1e6:.1f} MB")
    print(f"tensor data fetched   {data / 1e6:.1f} MB = {data / layer_bytes:.4f} x the layer, "
          f"in {sum(1 for s in sent if s.end > data_start)} range request(s); header reads "
          f"{sum(s.end - s.start for s in sent if s.end <= data_start) / 1e3:.1f} kB")
    print(f"load_layer, first     {seconds:.2f} s (fetch + write cache + load), peak RSS "
          f"{peak_kb / 1e3:.0f} MB (python + torch alone: {torch_kb / 1e3:.0f} MB)")
    print(f"load_layer, cached    {cached_seconds:.2f} s including interpreter start, no request")
    hub.stop()


if __name__ == "__main__":
    main()
