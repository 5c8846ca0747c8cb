"""Sliding-window inference over a volume: prediction.sliding_window against MONAI's
sliding_window_inference, on the same model and volume, measured in one run.

    python tests/bench_sliding_window.py                       # 1 x 1 x 160 x 160 x 96; roi 96 on CUDA, 64 on the CPU
    python tests/bench_sliding_window.py --size 512 512 200    # a CT's size (CUDA; long on a CPU)
    python tests/bench_sliding_window.py --device cpu --threads 1   # beside other work on a 2-core machine

A seeded 3D conv net (1 -> 8 -> 8 -> 2 channels, 3^3 kernels, float32, eval) and a seeded random volume;
gaussian weights, overlap 0.5, sw_batch_size 4 unless told. Where the tensors live, one row pair each:
  on the device   volume, windows and sums on the device (both functions' defaults)
  sums on cpu     the sums on the CPU: ours accumulate_device="cpu", MONAI's device="cpu"          (CUDA only)
  volume on cpu   volume and sums on the CPU, only the windows on the GPU: ours device="cuda",
                  MONAI's sw_device="cuda"                                                      (CUDA only)
Columns: the median time per call over --repeats (the rows timed in turns, after one warm-up call each),
ours / MONAI's time, max |ours - MONAI's| on the same row pair, and, in one more call each after the
timing, the call's peak memory above what was allocated before it: on CUDA the allocator's peak of GPU
memory; on the CPU the process's resident-set high-water mark (VmHWM, reset before the call through
/proc/self/clear_refs) minus the resident set before, with glibc made to return freed blocks at once.
"""
import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from llm4seg.prediction import sliding_window  # noqa: E402


def resident_mib(field: str) -> float:
    """VmRSS or VmHWM of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def resident_set_follows_tensors():
    """glibc keeps freed blocks resident and hands them out again, so the peak resident set of one call
    measured after another wandered (128 .. 211 MiB for the same call); mapping every block of 1 MiB or
    more on its own (a fixed M_MMAP_THRESHOLD) returns it to the system when freed: 169 MiB each time."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        print("not glibc: the peak resident set also counts freed blocks kept by the allocator")


def conv_net(channels: int = 8, classes: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, channels, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(channels, channels, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(channels, classes, 1)).eval()


def measured(call, device: torch.device) -> tuple[float, float, torch.Tensor]:
    """(seconds, peak MiB above the memory before, result) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2 ** 20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = resident_mib("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        result = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else resident_mib("VmHWM")
    return seconds, peak - before, result


def main():
    from monai.inferers import sliding_window_inference

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, nargs=3, default=[160, 160, 96], metavar=("H", "W", "D"))
    parser.add_argument("--roi", type=int, help="window side (default: 96 on CUDA, 64 on the CPU)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--mode", default="gaussian", choices=["constant", "gaussian"])
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    roi = args.roi or (96 if device.type == "cuda" else 64)
    cpu = torch.device("cpu")
    net = conv_net().to(device)
    volume = torch.randn(1, 1, *args.size, generator=torch.Generator().manual_seed(1))
    settings = {"on the device": (device, {}, {})}
    if device.type == "cuda":
        settings["sums on cpu"] = (device, dict(accumulate_device=cpu), dict(device=cpu))
        settings["volume on cpu"] = (cpu, dict(device=device), dict(sw_device=device))
    calls = {}
    for where, (volume_device, ours, theirs) in settings.items():
        x = volume.to(volume_device)
        calls[("ours", where)] = lambda x=x, kw=ours: sliding_window(net, x, roi, args.overlap, args.mode,
                                                                     args.sw_batch_size, **kw)
        calls[("MONAI", where)] = lambda x=x, kw=theirs: sliding_window_inference(
            x, roi, args.sw_batch_size, net, args.overlap, args.mode, **kw)

    results = {key: measured(call, device)[2] for key, call in calls.items()}  # warm-up
    times = {key: [] for key in calls}
    for _ in range(args.repeats):
        for key, call in calls.items():
            times[key].append(measured(call, device)[0])
    if device.type == "cpu":  # after the timing, which the fixed threshold slows (a page fault per fresh page)
        resident_set_follows_tensors()
    peaks = {key: measured(call, device)[1] for key, call in calls.items()}

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}: volume 1 x 1 x {' x '.join(map(str, args.size))}, roi {roi}, "
          f"overlap {args.overlap}, {args.mode}, sw_batch_size {args.sw_batch_size}, median of {args.repeats}")
    print("| where | ours s | MONAI s | ours / MONAI | max abs diff | ours peak MiB | MONAI peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for where in settings:
        ours, theirs = ("ours", where), ("MONAI", where)
        t_ours, t_theirs = statistics.median(times[ours]), statistics.median(times[theirs])
        diff = (results[ours].to(cpu) - results[theirs].to(cpu)).abs().max().item()
        print(f"| {where} | {t_ours:.3f} | {t_theirs:.3f} | {t_ours / t_theirs:.2f} | {diff:.1e} "
              f"| {peaks[ours]:.0f} | {peaks[theirs]:.0f} |")


if __name__ == "__main__":
    main()
