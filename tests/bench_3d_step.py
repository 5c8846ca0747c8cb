"""LLM4Seg in 3D, measured in one run: one training step of MedNeXt-B, MedNeXt-S and 3D UX-Net, each alone and
with a frozen Llama-3.2-1B-shaped layer 15 in its bridge, and one sliding-window prediction of a volume by
prediction.sliding_window against MONAI's sliding_window_inference on the same model.

    python tests/bench_3d_step.py                                  # CUDA: B2 x 1 x 96^3, volume 1 x 1 x 160 x 160 x 96
    python tests/bench_3d_step.py --size 32 --repeats 2            # a quick look on the CPU (default there: 64^3)
    python tests/bench_3d_step.py --size 32 --threads 1          # beside other work on a 2-core machine

The step, as train.py takes one with --recipe llm4seg3d (eager: train.py compiles on CUDA, this does not): a
fixed random batch (B, 1, S, S, S) with random labels of BTCV's 14 classes, forward under bf16 autocast on
CUDA (the frozen layer stored in bf16, set_frozen_dtype) and float32 on the CPU, losses.dice_ce_loss, backward,
AdamW at the recipe's lr and weight decay. The layer comes from a generated one-layer checkpoint of
Llama-3.2-1B's shapes (tests/bench_step.layer_checkpoint: random bf16 values; the model is gated and the
cost depends on shapes only); at S = 96 it sees (S / 16)^3 = 216 tokens. Time per step: the median of
--repeats, after one warm-up step each, the two models of a backbone timed in turns (kernels.bench.
interleaved_ms). The layer's share = (with - alone) / with: the layer, its two adapters and the optimizer's
work on the adapters. What the paper's 3D column costs, per backbone with the layer: the activations of a step
as train.py counts them before it starts (model.count_activation_bytes; halved under bf16), on CUDA the memory
a step peaked at, and the hours the recipe's 40,000 steps take at the measured rate (eager; train.py compiles
on CUDA).

The sliding window: MedNeXt-S alone, 14 classes, eval mode, the step's precision, over a seeded random volume
(1, 1, *--volume; default 160 x 160 x 96 scaled by S / 96), windows of S (--roi), overlap 0.5, --mode
(default constant, the evaluation's), sw_batch_size 4; both functions call the same predictor. Columns as
tests/bench_sliding_window.py (whose `measured` times each call and its peak memory): median seconds over
--repeats, ours / MONAI's time, max |ours - MONAI's| of the averaged logits, and on CUDA each call's peak
memory.
On a CPU shared with other work, --threads 1: two OpenMP threads on two busy cores made a MedNeXt-B step at
32^3 take 5-12 s where one thread takes 1.1 s.
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from llm4seg.kernels.bench import LLMS, interleaved_ms  # noqa: E402
from llm4seg.losses import dice_ce_loss  # noqa: E402
from llm4seg.model import build_model, count_activation_bytes, count_params, set_frozen_dtype  # noqa: E402
from llm4seg.prediction import predict, sliding_window  # noqa: E402
from llm4seg.runtime import autocast  # noqa: E402
from llm4seg.settings import RECIPES  # noqa: E402
from llm4seg.data.volumes import BTCV_CLASSES  # noqa: E402
from bench_sliding_window import measured  # noqa: E402
from bench_step import TINY, layer_checkpoint  # noqa: E402

BACKBONES = ("mednext", "mednext-s", "uxnet3d")  # LLM4Seg's Table 2 3D rows: MedNeXt (B, kernel 3), S, 3D UX-Net
WINDOW_BACKBONE = "mednext-s"
CUDA_VOLUME = (160, 160, 96)  # at S = 96; scaled by S / 96 for other sizes
CLASSES = len(BTCV_CLASSES)
RECIPE_ITERATIONS = 40_000  # llm4seg3d on BTCV: 1,667 epochs of 24 steps (UNETR's protocol)
SW_BATCH_SIZE = 4


def step_precision(device: torch.device) -> torch.dtype:
    """bf16 autocast on CUDA (train.py's --precision auto there), float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def training_step(net: torch.nn.Module, device: torch.device, batch: int, size: int):
    """A function doing one llm4seg3d step of `net` on a fixed random batch (B, 1, S, S, S) of 14-class labels."""
    precision = step_precision(device)
    set_frozen_dtype(net, precision).to(device).train()
    recipe = RECIPES["llm4seg3d"]
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=recipe["lr"],
                                  weight_decay=recipe["weight_decay"])
    generator = torch.Generator().manual_seed(0)
    volumes = torch.randn(batch, 1, size, size, size, generator=generator).to(device)
    labels = torch.randint(0, CLASSES, (batch, 1, size, size, size), generator=generator).to(device)

    def step():
        with autocast(device, precision):
            logits = net(volumes)                                                  # (B, K, S, S, S)
        loss = dice_ce_loss(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def bench_steps(device: torch.device, backbones, size: int, batch: int, repeats: int, llm_dir: Path,
                layer: int) -> dict:
    """{backbone: {"alone_ms", "with_ms", "share", "trainable_alone", "trainable_with", "counted_gb", "peak_gb",
    "hours_40k"}}, printed as they come. counted_gb: the activations of one step with the layer as train.py sizes
    them before it starts (model.count_activation_bytes, halved under bf16 autocast); peak_gb: on CUDA, the memory
    that step peaked at (torch.cuda.max_memory_allocated; NaN on the CPU); hours_40k: the with-layer step's time
    x the 40,000 iterations of the llm4seg3d recipe on BTCV."""
    results = {}
    for backbone in backbones:
        torch.manual_seed(0)
        nets = {"alone": build_model(backbone, None, num_classes=CLASSES),
                "with": build_model(backbone, str(llm_dir), layer, "frozen", num_classes=CLASSES)}
        trainable = {name: count_params(net)[0] for name, net in nets.items()}
        counted = count_activation_bytes(nets["with"], (batch, 1, size, size, size)) / 1e9
        steps = {name: training_step(net, device, batch, size) for name, net in nets.items()}
        timings = interleaved_ms(steps, device, repeats)
        results[backbone] = {"alone_ms": timings["alone"], "with_ms": timings["with"],
                             "share": (timings["with"] - timings["alone"]) / timings["with"],
                             "trainable_alone": trainable["alone"], "trainable_with": trainable["with"],
                             "counted_gb": counted * (0.5 if step_precision(device) == torch.bfloat16 else 1.0),
                             "peak_gb": step_peak_gb(steps["with"], device),
                             "hours_40k": timings["with"] * RECIPE_ITERATIONS / 3.6e6}
        print(f"  {backbone}: alone {timings['alone']:.1f} ms, with the layer {timings['with']:.1f} ms", flush=True)
        del nets, steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def step_peak_gb(step, device: torch.device) -> float:
    """The memory one more step peaks at on CUDA (GB); NaN on the CPU, whose heap keeps earlier steps' blocks."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 1e9


def bench_window(device: torch.device, volume_size, roi: int, mode: str, repeats: int) -> dict:
    """{"ours_s", "monai_s", "ratio", "max_diff", "ours_mib", "monai_mib"}: sliding windows of MedNeXt-S."""
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    net = build_model(WINDOW_BACKBONE, None, num_classes=CLASSES).to(device).eval()
    precision = step_precision(device)
    volume = torch.randn(1, 1, *volume_size, generator=torch.Generator().manual_seed(1)).to(device)

    def predictor(windows):                                                        # (B, 1, *roi) -> (B, K, *roi)
        return predict(net, windows, device, precision)

    calls = {"ours": lambda: sliding_window(predictor, volume, roi, 0.5, mode, SW_BATCH_SIZE),
             "MONAI": lambda: sliding_window_inference(volume, roi, SW_BATCH_SIZE, predictor, 0.5, mode)}
    results = {name: measured(call, device)[2] for name, call in calls.items()}  # warm-up
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(measured(call, device)[0])
    # The peak on CUDA only: on the CPU the calls reuse heap blocks that earlier calls left resident, so at
    # these sizes the resident set does not grow (bench_sliding_window's measure read 0 MiB at 53 x 53 x 32).
    peaks = {name: measured(call, device)[1] if device.type == "cuda" else float("nan") for name, call in calls.items()}
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["MONAI"])
    return {"ours_s": ours, "monai_s": theirs, "ratio": ours / theirs,
            "max_diff": (results["ours"].float() - results["MONAI"].float()).abs().max().item(),
            "ours_mib": peaks["ours"], "monai_mib": peaks["MONAI"]}


def bench_3d(device: torch.device, size: int, batch: int, repeats: int, llm_dir: Path, layer: int,
             backbones=BACKBONES, volume_size=None, roi: int | None = None, mode: str = "constant") -> dict:
    """Both measurements: {"steps": bench_steps(...), "window": bench_window(...)} (what tests/gpu_check.py
    reports)."""
    volume_size = volume_size or [round(side * size / 96) for side in CUDA_VOLUME]
    return {"steps": bench_steps(device, backbones, size, batch, repeats, llm_dir, layer),
            "window": bench_window(device, volume_size, roi or size, mode, repeats),
            "volume": list(volume_size), "roi": roi or size}


def print_tables(result: dict, device: torch.device, size: int, batch: int, repeats: int, llm: str, mode: str):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    precision = "bf16 autocast" if step_precision(device) == torch.bfloat16 else "float32"
    print(f"\n{name}, torch {torch.__version__}: one training step, B{batch} x 1 x {size}^3, {CLASSES} classes, "
          f"{precision}, Dice + CE, AdamW, eager; {llm}, {(size // 16) ** 3} tokens; median of {repeats}")
    print("| backbone | alone ms/step | + layer ms/step | layer's share | trainable alone | trainable with "
          "| + layer: activations GB (counted) | step peak GB | 40,000 steps h |")
    print("|---|---|---|---|---|---|---|---|---|")
    for backbone, row in result["steps"].items():
        peak = "-" if row["peak_gb"] != row["peak_gb"] else f"{row['peak_gb']:.2f}"
        print(f"| {backbone} | {row['alone_ms']:.1f} | {row['with_ms']:.1f} | {row['share'] * 100:.1f} % "
              f"| {row['trainable_alone']:,} | {row['trainable_with']:,} | {row['counted_gb']:.2f} | {peak} "
              f"| {row['hours_40k']:.1f} |")
    window = result["window"]
    print(f"\nsliding window, {WINDOW_BACKBONE} alone, volume 1 x 1 x {' x '.join(map(str, result['volume']))}, "
          f"roi {result['roi']}, overlap 0.5, {mode}, sw_batch_size {SW_BATCH_SIZE}, {precision}, median of {repeats}")
    print("| ours s | MONAI s | ours / MONAI | max abs diff | ours peak MiB | MONAI peak MiB |")
    print("|---|---|---|---|---|---|")
    peaks = " | ".join("-" if mib != mib else f"{mib:.0f}" for mib in (window["ours_mib"], window["monai_mib"]))
    print(f"| {window['ours_s']:.3f} | {window['monai_s']:.3f} | {window['ratio']:.2f} | {window['max_diff']:.1e} "
          f"| {peaks} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, help="the step's cube side, a multiple of 16 (default: 96 on CUDA, "
                                                 "64 on the CPU); also the sliding window's side")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (and sliding-window calls) per model")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--volume", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="the sliding window's volume (default: 160 x 160 x 96 scaled by size / 96)")
    parser.add_argument("--roi", type=int, help="the sliding window's side (default: --size)")
    parser.add_argument("--mode", default="constant", choices=["constant", "gaussian"])
    parser.add_argument("--tiny", action="store_true", help="a 64-wide 2-layer Llama's layer 2 instead of "
                                                            "Llama-3.2-1B's layer 15 (a quick look)")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = args.size or (96 if device.type == "cuda" else 64)
    if size % 16 or size < 32:
        parser.error(f"--size: expected a multiple of 16 of at least 32 (4 halvings to a bottleneck of 2^3 or "
                     f"more: MedNeXt's GroupNorm needs more than one voxel), got {size}")
    config, layer, llm = (TINY, 2, "a tiny Llama's layer 2") if args.tiny else \
        ({**LLMS["llama3.2-1b"], "head_dim": 64}, 15, "Llama-3.2-1B-shaped layer 15")
    llm_dir = layer_checkpoint(Path(tempfile.mkdtemp(prefix="llm4seg-bench-3d-")) / "llm", config, layer)
    result = bench_3d(device, size, args.batch, args.repeats, llm_dir, layer, args.backbones, args.volume, args.roi,
                      args.mode)
    print_tables(result, device, size, args.batch, args.repeats, llm, args.mode)


if __name__ == "__main__":
    main()
