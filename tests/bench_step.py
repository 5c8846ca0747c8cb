"""One SGD training step of CMUNeXt + an LLM layer as train.py builds it, against the authors' construction.

    python tests/bench_step.py                   # batch 8, 256 x 256, Llama-3.2-1B-shaped layer 15
    python tests/bench_step.py --batch 2 --size 64 --tiny   # a quick look
    python tests/bench_step.py --compile         # ours under torch.compile, also on the CPU

Ours: the frozen layer from a generated one-layer checkpoint of Llama-3.2-1B's shapes (random bf16; the
real model is gated and speed depends on shapes only), --precision auto, the device's memory format
(channels_last on the CPU), compiled as train.py would (CUDA only, by default). Theirs, rebuilt from the
same operations (our CMUNeXt equals theirs weight for weight): Linear, transformers' LlamaDecoderLayer
in float32 called as their code calls it (no mask, so causal under SDPA; a constant cos / sin), Linear,
float32, eager, default layout; the layer frozen (--authors-trained: trained, as their inverted freeze
flag does by default). Prints ms per step and images/s for both and their ratio, measured in one run.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from llm4seg.kernels.bench import LLMS, interleaved_ms  # noqa: E402
from llm4seg.llm_layer.layers import LayerConfig, expected_shapes  # noqa: E402
from llm4seg.losses import bce_dice_loss  # noqa: E402
from llm4seg.model import CMUNEXT_DIMS, build_model, set_frozen_dtype  # noqa: E402
from llm4seg.runtime import Processes, autocast, compile_mode, memory_format, resolve_precision  # noqa: E402

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_hidden_layers=2, rms_norm_eps=1e-5)


def layer_checkpoint(root: Path, config: dict, layer: int) -> Path:
    """A model directory holding config.json and only layer `layer` (1-based), random bf16 values."""
    config = {**config, "hidden_act": "silu", "torch_dtype": "bfloat16"}
    torch.manual_seed(0)
    tensors = {f"model.layers.{layer - 1}.{name}": (torch.ones(shape) if "norm" in name else 0.02 * torch.randn(shape))
               .to(torch.bfloat16) for name, shape in expected_shapes(LayerConfig.from_hf(config, layer)).items()}
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps(config))
    return root


class AuthorsBridge(torch.nn.Module):
    """The authors' bottleneck: (B, C, h, w) -> Linear(C, D) -> transformers' LlamaDecoderLayer (float32,
    called without a mask, with a constant cos / sin) -> Linear(D, C) -> (B, C, h, w)."""

    def __init__(self, channels: int, config: dict, layer: int):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        hf_config = LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}, attn_implementation="sdpa")
        self.head_dim = hf_config.head_dim
        self.project_in = torch.nn.Linear(channels, hf_config.hidden_size)
        self.layer = LlamaDecoderLayer(hf_config, layer_idx=layer - 1)
        self.project_out = torch.nn.Linear(hf_config.hidden_size, channels)

    def forward(self, x):
        B, C, H, W = x.shape
        hidden = self.project_in(x.flatten(2).transpose(1, 2))                     # (B, N, D)
        rotation = (torch.ones(B, H * W, self.head_dim, device=x.device),
                    torch.zeros(B, H * W, self.head_dim, device=x.device))
        out = self.layer(hidden, position_embeddings=rotation)
        out = out[0] if isinstance(out, tuple) else out                            # (B, N, D)
        return self.project_out(out).transpose(1, 2).reshape(B, C, H, W)


def training_step(net, device, batch: int, size: int, precision_and_compile: bool,
                  compile_requested: bool | None = None):
    """A function doing one SGD step of `net` on a fixed random batch, as train.py does (--precision auto,
    the device's memory format, compiled as runtime.compile_mode chooses for train.py's --compile flag,
    `compile_requested`) or as the authors do (float32, the default layout, eager)."""
    precision = resolve_precision("auto" if precision_and_compile else "fp32", device)
    layout = memory_format(device) if precision_and_compile else torch.contiguous_format  # theirs: as shipped
    set_frozen_dtype(net, precision).to(device, memory_format=layout).train()
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    mode = compile_mode(compile_requested, device, Processes()) if precision_and_compile else None
    model = torch.compile(net, mode=mode, dynamic=False) if mode else net
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device, memory_format=layout)
    masks = (torch.rand(batch, 1, size, size, generator=generator) > 0.8).float().to(device)

    def step():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, precision):
            logits = model(images)
        loss = bce_dice_loss(logits.float(), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def first_call_s(step, device: torch.device) -> float:
    """Seconds of step()'s first call, compilation included."""
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="a 64-wide 2-layer Llama instead of Llama-3.2-1B's shapes")
    parser.add_argument("--authors-trained", action="store_true", help="train their layer, as their default run does")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile ours as train.py --compile / --no-compile would (default: as train.py, CUDA only)")
    args = parser.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    config, layer = (TINY, 2) if args.tiny else ({**LLMS["llama3.2-1b"], "head_dim": 64}, 15)
    llm_dir = layer_checkpoint(Path(tempfile.mkdtemp(prefix="llm4seg-bench-step-")) / "llm", config, layer)
    ours = build_model("cmunext", str(llm_dir), layer, "frozen")
    theirs = build_model("cmunext", None)
    theirs.bridge = AuthorsBridge(CMUNEXT_DIMS[-1], config, layer)
    theirs.bridge.layer.requires_grad_(args.authors_trained)
    precision = resolve_precision("auto", device)
    print(f"{device}, {torch.get_num_threads()} threads, B{args.batch} {args.size}px, layer {layer} of "
          f"{'a tiny Llama' if args.tiny else 'Llama-3.2-1B shapes'}; ours: {precision}, {memory_format(device)}, "
          f"compile {compile_mode(args.compile, device, Processes())}")
    steps = {"ours": training_step(ours, device, args.batch, args.size, True, args.compile)}
    print(f"  ours' first step (compiling, if it does): {first_call_s(steps['ours'], device):.1f} s")
    if compile_mode(args.compile, device, Processes()):  # the same model uncompiled, for what compiling gives
        steps["ours_eager"] = training_step(ours, device, args.batch, args.size, True, False)
    steps["authors"] = training_step(theirs, device, args.batch, args.size, False)
    timings = interleaved_ms(steps, device, repeats=3)
    labels = {"ours": "ours", "ours_eager": "ours, eager", "authors": "authors'"}
    for name, ms in timings.items():
        print(f"  {labels[name]:12s} {ms:10.1f} ms/step  {args.batch * 1e3 / ms:8.2f} images/s  "
              f"{timings['authors'] / ms:5.2f}x the authors' images/s")
    print(json.dumps({f"{name}_ms": ms for name, ms in timings.items()}))


if __name__ == "__main__":
    main()
