"""One MedVisionLlama training step (Adam, Dice + BCE) of the ViT with a Llama-3.1-8B-shaped frozen layer 32,
against the ViT-Baseline, measured in one run: time per step and the step's peak memory.

    python tests/bench_vit_step.py                        # the paper's 1 x 128^3, patch 8 (4,096 tokens)
    python tests/bench_vit_step.py --size 64 --repeats 1  # a quicker look (512 tokens)

The layer comes from a generated one-layer checkpoint of Llama-3.1-8B's shapes (random bf16 values: the
model is gated, and the cost depends on shapes only), built as train.py builds it: --recipe medvisionllama
(LoRA rank 8 on the mappers, residual, unit final norm), --precision auto. Peak memory: on the CPU the
process's resident-set high-water mark (VmHWM, reset before each measured step through
/proc/self/clear_refs), minus the resident memory before the step; on CUDA max_memory_allocated.
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
sys.path.insert(0, str(REPO / "tests"))
from llm4seg.losses import bce_dice_loss  # noqa: E402
from llm4seg.model import build_model, count_params, set_frozen_dtype  # noqa: E402
from llm4seg.runtime import autocast, resolve_precision  # noqa: E402
from bench_step import layer_checkpoint  # noqa: E402

LLAMA_3_1_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                    num_key_value_heads=8, num_hidden_layers=32, rms_norm_eps=1e-5)


def resident_mib(field: str) -> float:
    """VmRSS or VmHWM of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(net, device, size: int, repeats: int) -> tuple[float, float]:
    """(median seconds per Adam step, peak memory of one step in MiB) on a fixed random 1 x 1 x size^3 batch."""
    precision = resolve_precision("auto", device)
    set_frozen_dtype(net, precision).to(device).train()
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    volume = torch.randn(1, 1, size, size, size, generator=generator).to(device)
    mask = (torch.rand(1, 1, size, size, size, generator=generator) > 0.9).float().to(device)

    def step():
        with autocast(device, precision):
            logits = net(volume)
        loss = bce_dice_loss(logits.float(), mask, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up, and Adam's state exists from here on
    times, peaks = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device) / 2 ** 20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            before = resident_mib("VmRSS")
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else resident_mib("VmHWM")
        peaks.append(peak - before)
    return sorted(times)[len(times) // 2], max(peaks)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    llm_dir = layer_checkpoint(Path(tempfile.mkdtemp(prefix="llm4seg-bench-vit-")) / "llm", LLAMA_3_1_8B, 32)
    shape = dict(img_size=args.size, patch_size=args.patch)
    settings = {"ViT-Baseline": build_model("vit", None, 32, "none", **shape),
                "+ Llama-3.1-8B L32": build_model("vit", str(llm_dir), 32, "frozen", mapper_lora_rank=8, **shape)}
    tokens = (args.size // args.patch) ** 3
    print(f"{device}, {torch.get_num_threads()} threads, batch 1 x 1 x {args.size}^3, patch {args.patch} "
          f"({tokens} tokens), {resolve_precision('auto', device)}, Adam")
    results = {}
    for name, net in settings.items():
        trainable, frozen = count_params(net)
        seconds, peak = measure(net, device, args.size, args.repeats)
        results[name] = {"seconds_per_step": seconds, "step_peak_mib": peak, "trainable": trainable, "frozen": frozen}
        print(f"  {name:20s} {seconds:8.2f} s/step  step peak {peak:8.0f} MiB  "
              f"{trainable:,} trainable / {frozen:,} frozen")
    baseline, llm = results["ViT-Baseline"], results["+ Llama-3.1-8B L32"]
    print(f"  the LLM layer costs {llm['seconds_per_step'] / baseline['seconds_per_step']:.1f}x the baseline's time")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
