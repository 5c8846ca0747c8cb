"""One command for whoever has a GPU: does the CUDA path work, and is it as fast as it should be?

    make gpu-check                       # = python tests/gpu_check.py --out gpu-check.md
    python tests/gpu_check.py --smoke    # every step at toy sizes, on any device: checks the plumbing only

Needs a Python whose torch sees the GPU, with triton, transformers and pytest (pip install -r
requirements.txt -r requirements-test.txt). The LLM layer is a generated one-layer checkpoint of
Llama-3.2-1B's shapes (random bf16 values: the real model is gated, and speed depends on shapes only).

  1. the test suite on this machine (`pytest tests`: the compiled kernels on CUDA tensors, the interpreter
     in a subprocess with the GPU hidden, a default training run on the GPU)
  2. attention forward + backward, bf16, at three shapes, against F.scaled_dot_product_attention;
     RMSNorm and SwiGLU against eager PyTorch (Llama-3.2-1B shapes, B = 8, T = 256)
  3. the whole frozen layer on the kernels against torch.compile of the reference path
  4. one SGD step of CMUNeXt + that layer at 15, batch 8, 256 x 256: train.py's construction (bf16
     autocast, torch.compile with CUDA graphs, frozen layer) against the authors' construction as their
     main.py trains it (float32, eager, transformers' LlamaDecoderLayer called without a mask, so causal,
     and trained, since their freeze flag is inverted). Theirs is rebuilt here from the same operations:
     our CMUNeXt equals theirs weight for weight, and their bridge is Linear, the HF layer, Linear.
  5. train.py for 2 epochs and eval.py with every default (--device auto); train.py's own images/s in
     its second epoch against the step rate of 4.
  5b. the same on a generated folder of Kvasir-sized JPEGs with the default --workers (decoded once into the
     cache, issue "Feed the GPU"): images/s in epoch 2 against the step rate, goal >= 0.9
  6. MedVisionLlama: the ViT with that layer on synthetic volumes (64^3, patch 8), --recipe medvisionllama,
     2 epochs, then eval.py on the test split (HD95 in mm, slice panels): both exit 0.
  7. LLM4Seg in 3D (tests/bench_3d_step.py): one llm4seg3d training step (B2 x 96^3, 14 classes, bf16 autocast,
     Dice + CE, AdamW) of MedNeXt-B, MedNeXt-S and 3D UX-Net, alone and with that layer, and MedNeXt-S's
     sliding-window prediction of 1 x 1 x 160 x 160 x 96 against MONAI's. No speed goal: the rows report each
     step's time and the layer's share of it, and ours / MONAI's time; the goal is that every step runs and
     the two sliding windows agree loosely (max |diff| of the averaged logits <= 0.1: the same bf16 predictor
     twice, whose transposed convs may sum in another order on CUDA; tests/test_prediction.py holds them to
     1e-6 in float32).

It writes a markdown table (date, GPU, versions, each measured ratio beside its goal) and exits 1 if a
goal is missed, 0 if all are met.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
if not torch.cuda.is_available():  # --smoke on a CPU: the Triton kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llm4seg.kernels.bench import (ATTENTION_SHAPES, LLMS, REPEATS, bench_attention_cuda,  # noqa: E402
                                   bench_kernels_cuda, time_ms)
from llm4seg.model import CMUNEXT_DIMS, build_model  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from bench_3d_step import WINDOW_BACKBONE, bench_3d  # noqa: E402
from bench_layer import bench_layer_cuda  # noqa: E402
from bench_loader import write_tree  # noqa: E402
from bench_step import TINY, AuthorsBridge, layer_checkpoint, training_step  # noqa: E402

def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, **kwargs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check.md", help="the markdown report")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on any device, no test suite")
    args = parser.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda" and not args.smoke:
        print("error: no CUDA device; this check measures a GPU (use --smoke to check the script itself)",
              file=sys.stderr)
        return 2
    if args.smoke:
        REPEATS.update(repeats=1, inner_scale=0)  # one timed call each: the point is that every step runs
    llama = {**LLMS["llama3.2-1b"], "head_dim": 64}
    config, layer, batch, size = (TINY, 2, 2, 64) if args.smoke else (llama, 15, 8, 256)
    rows = []  # (what, measured, goal, met)

    def check(what: str, value: float, goal: float, unit: str = "x") -> None:
        rows.append((what, f"{value:.2f}{unit}", f">= {goal:g}{unit}", value >= goal))

    work = Path(tempfile.mkdtemp(prefix="llm4seg-gpu-check-"))
    if not args.smoke:
        suite = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], timeout=3600)
        summary = (suite.stdout.strip().splitlines() or ["no output"])[-1]
        rows.append(("test suite on this machine (pytest tests)", summary, "all pass", suite.returncode == 0))

    shapes = [(1, 4, 2, 32, 16)] if args.smoke else ATTENTION_SHAPES
    for shape in shapes:
        timing = bench_attention_cuda(shape, device)
        B, Hq, Hkv, T, d = shape
        check(f"attention fwd+bwd B{B} {Hq}/{Hkv} T{T} d{d}: SDPA time / ours", timing["sdpa"] / timing["ours"], 0.9)
    kernel_config = TINY if args.smoke else LLMS["llama3.2-1b"]
    timings = bench_kernels_cuda("llama3.2-1b" if not args.smoke else "tiny", kernel_config, device)
    check("SwiGLU fwd+bwd: eager time / ours", timings["swiglu"]["eager"] / timings["swiglu"]["ours"], 1.0)
    check("RMSNorm fwd+bwd: eager time / ours", timings["rms_norm"]["eager"] / timings["rms_norm"]["ours"], 1.0)
    layer_timing = bench_layer_cuda("llama3.2-1b" if not args.smoke else "tiny", kernel_config, device)
    check("frozen layer fwd + input grad: torch.compile(reference) time / ours",
          layer_timing["compiled"] / layer_timing["ours"], 1.0)

    llm_dir = layer_checkpoint(work / "llm", config, layer)
    ours_net = build_model("cmunext", str(llm_dir), layer, "frozen")
    authors_net = build_model("cmunext", None)
    authors_net.bridge = AuthorsBridge(CMUNEXT_DIMS[-1], config, layer)
    ours_ms = time_ms(training_step(ours_net, device, batch, size, True), device, inner=5)
    authors_ms = time_ms(training_step(authors_net, device, batch, size, False), device, inner=3)
    print(f"training step B{batch} {size}px: ours {ours_ms:.1f} ms, the authors' construction {authors_ms:.1f} ms")
    check(f"training step, CMUNeXt + Llama-1B-shaped L{layer}, B{batch} {size}px: authors' time / ours "
          f"({authors_ms:.1f} / {ours_ms:.1f} ms)", authors_ms / ours_ms, 4.0)

    run_dir = work / "run"
    trained = run([sys.executable, "train.py", "--data", "synthetic", "--synthetic-size", "40" if args.smoke else "400",
                   "--img-size", str(size), "--batch-size", str(batch), "--epochs", "2", "--llm", str(llm_dir),
                   "--layer", str(layer), "--workers", "2" if args.smoke else "8", "--out", str(run_dir)], timeout=3600)
    evaluated = run([sys.executable, "eval.py", str(run_dir), "--samples", "2"], timeout=3600)
    rows.append(("train.py 2 epochs + eval.py, --device auto", f"exit {trained.returncode}, {evaluated.returncode}",
                 "exit 0, 0", trained.returncode == 0 and evaluated.returncode == 0))
    if trained.returncode == 0:
        epoch_rate = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
        check("train.py's images/s in epoch 2 / the step rate", epoch_rate["images_per_second"] / (batch * 1e3 / ours_ms),
              0.9)
    else:
        print(trained.stderr[-3000:], file=sys.stderr)

    # Issue "Feed the GPU": the same run on a folder of Kvasir-sized JPEGs (622 x 530), with the default
    # --workers, decoded once into the cache: train.py's images/s in epoch 2 against the step rate.
    folder_dir, folder_run = write_tree(work / "kvasir-sized", 40 if args.smoke else 400, (622, 530), ".jpg", 0), \
        work / "run-folder"
    trained = run([sys.executable, "train.py", "--data", "folder", "--data-dir", str(folder_dir), "--img-size", str(size),
                   "--batch-size", str(batch), "--epochs", "2", "--llm", str(llm_dir), "--layer", str(layer),
                   "--out", str(folder_run)], timeout=3600)
    if trained.returncode == 0:
        epoch_rate = [json.loads(line) for line in (folder_run / "metrics.jsonl").read_text().splitlines()][-1]
        check("train.py on Kvasir-sized JPEGs, default --workers: images/s in epoch 2 / the step rate",
              epoch_rate["images_per_second"] / (batch * 1e3 / ours_ms), 0.9)
    else:
        rows.append(("train.py on Kvasir-sized JPEGs", f"exit {trained.returncode}", "exit 0", False))
        print(trained.stderr[-3000:], file=sys.stderr)

    volume_dir = work / "run3d"  # MedVisionLlama: the ViT on volumes with that layer, its recipe, 64^3 / patch 8
    trained = run([sys.executable, "train.py", "--data", "synthetic3d", "--synthetic-size", "20" if args.smoke else "80",
                   "--backbone", "vit", "--img-size", "16" if args.smoke else "64", "--patch-size", "4" if args.smoke else "8",
                   "--recipe", "medvisionllama", "--epochs", "2", "--llm", str(llm_dir), "--layer", str(layer),
                   "--workers", "2", "--out", str(volume_dir)], timeout=3600)
    evaluated = run([sys.executable, "eval.py", str(volume_dir), "--split", "test", "--samples", "2"], timeout=3600)
    rows.append(("MedVisionLlama: train.py --backbone vit --data synthetic3d --recipe medvisionllama 2 epochs + eval.py "
                 "--split test", f"exit {trained.returncode}, {evaluated.returncode}", "exit 0, 0",
                 trained.returncode == 0 and evaluated.returncode == 0))
    if trained.returncode or evaluated.returncode:
        print((trained.stderr + evaluated.stderr)[-3000:], file=sys.stderr)

    # LLM4Seg in 3D: the steps must run; their times and the layer's share are reported, not judged.
    size3d, batch3d = (32, 1) if args.smoke else (96, 2)
    try:
        three_d = bench_3d(device, size3d, batch3d, 1 if args.smoke else 5, llm_dir, layer)
    except Exception as error:  # a row saying what failed, and the other rows still written
        rows.append((f"LLM4Seg 3D training steps B{batch3d} {size3d}^3 and sliding window",
                     f"failed: {type(error).__name__}: {str(error)[:200]}", "runs", False))
    else:
        for backbone, step in three_d["steps"].items():
            rows.append((f"3D training step {backbone}, B{batch3d} {size3d}^3, alone / + layer {layer}: the layer's "
                         "share of the step", f"{step['alone_ms']:.1f} / {step['with_ms']:.1f} ms, "
                         f"{step['share'] * 100:.0f} %", "runs (reported)", True))
        window = three_d["window"]
        rows.append((f"sliding window {WINDOW_BACKBONE}, 1 x 1 x {' x '.join(map(str, three_d['volume']))}, roi "
                     f"{three_d['roi']}: ours / MONAI's time ({window['ours_s']:.3f} / {window['monai_s']:.3f} s), "
                     "max abs diff", f"{window['ratio']:.2f}x, {window['max_diff']:.1e}", "diff <= 0.1",
                     window["max_diff"] <= 0.1))

    versions = (f"torch {torch.__version__}, triton {__import__('triton').__version__}, "
                f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'no GPU (smoke run)'}")
    lines = [f"# GPU check, {datetime.date.today()}: {versions}", "",
             "| check | measured | goal | met |", "|---|---|---|---|"]
    lines += [f"| {what} | {measured} | {goal} | {'yes' if met else '**no**'} |" for what, measured, goal, met in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {args.out}")
    return 0 if all(met for *_, met in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
