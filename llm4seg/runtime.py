"""Where and how a model runs: the processes torchrun started, the device, the precision.

Library modules never pick a device; the entry scripts (train.py, eval.py) call these:
    Processes.from_env()       rank, local rank and world size from torchrun's environment
    resolve_device(name, p)    "auto" | "cpu" | "cuda" | "cuda:N" -> a torch.device (one GPU per
                               process under torchrun)
    set_cpu_threads(w, p)      torch's CPU threads: OMP_NUM_THREADS if set, else this process's share of
                               the cores it may use less its w DataLoader workers
    rank_zero_first(p)         rank 0 downloads and writes shared files first, the others wait
    max_over_ranks, sum_over_ranks   a tensor reduced over every rank, as every rank must branch alike
    StopRequests()             Ctrl-C / SIGTERM ask a training loop to stop at the next step boundary
    signals_deferred()         Ctrl-C / SIGTERM held back while a file is saved, delivered after it
    ignore_stop_signals(_)     a DataLoader worker's worker_init_fn: Ctrl-C reaches the whole process group,
                               and only the main process decides (it stops the workers itself)
    resolve_precision(name, d) "auto" | "bf16" | "fp32" -> the compute dtype: bf16 where the device
                               multiplies bf16 natively (CUDA; CPUs with AMX / AVX-512 BF16), else fp32
    autocast(d, p)             the one precision policy of training and evaluation (prediction.predict): autocast
                               to p when p is bf16; logits always come back float32
    free_memory(d)             bytes the device has free: CUDA's free memory, the CPU's MemAvailable (Linux)
    memory_format(d), to_device  channels_last for the CNN on the CPU (faster convolutions there),
                               the default layout on CUDA (not faster there)
    compile_mode(flag, d, p)   whether and how torch.compile runs the training step: on CUDA by
                               default, with CUDA graphs ("reduce-overhead") in a single process
"""
import contextlib
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Processes:
    rank: int = 0
    local_rank: int = 0          # the process's number on its machine
    world_size: int = 1
    local_world_size: int = 1    # processes on this machine

    @classmethod
    def from_env(cls) -> "Processes":
        """This process's place among those torchrun started (a single process without torchrun)."""
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), world_size,
                   int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def max_over_ranks(values: Tensor, processes: Processes) -> Tensor:
    """`values` element-wise max over every rank (in place; as they are in a single process)."""
    if processes.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def sum_over_ranks(values: Tensor, processes: Processes) -> Tensor:
    """`values` element-wise summed over every rank (in place; as they are in a single process)."""
    if processes.distributed:
        dist.all_reduce(values)
    return values


def set_cpu_threads(workers: int, processes: Processes) -> int:
    """Set and return torch's intra-op threads for this process: OMP_NUM_THREADS when it is set (torch read it
    at import; `make demo*` pins the count its tables were measured with, since fp32 digits depend on it), else
    this process's share of the cores it may use, less the DataLoader workers it starts, at least 1. torch's own
    default, every core, made a demo 4-7x slower than one thread on two cores beside a busy worker."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // processes.local_world_size - workers)
    torch.set_num_threads(threads)
    return threads


def resolve_device(requested: str, processes: Processes) -> torch.device:
    """The device this process computes on, made current: "auto" is CUDA when there is one. A CUDA
    device always carries its index (torch.cuda.set_device refuses a bare "cuda"); under torchrun
    process k of a node takes GPU k, and more processes per node than GPUs is refused here, before
    any process starts work."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {requested!r}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {requested!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: CUDA is not available here; use --device cpu")
    gpus = torch.cuda.device_count()
    if processes.distributed:
        if processes.local_world_size > gpus:
            raise ValueError(f"torchrun started {processes.local_world_size} processes on this machine but it has {gpus} "
                             f"GPU(s): one process per GPU, so use --nproc_per_node={gpus}")
        device = torch.device("cuda", processes.local_rank)  # torchrun: one GPU per process
    elif device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    elif device.index >= gpus:
        raise ValueError(f"--device {requested}: this machine has {gpus} GPU(s), cuda:0 .. cuda:{gpus - 1}")
    torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def rank_zero_first(processes: Processes):
    """Rank 0 downloads and writes split files alone; the other ranks then read what it wrote."""
    if processes.distributed and not processes.main:
        dist.barrier()
    yield
    if processes.distributed and processes.main:
        dist.barrier()


PRECISIONS = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively. Where it does not, bf16 is emulated: on an
    AVX2-only CPU a 2048^3 bf16 matmul ran at 0.2 GFLOP/s against 102 in float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(requested: str, device: torch.device) -> torch.dtype:
    """--precision -> the dtype the model computes in: "auto" is bf16 where it is native, else fp32."""
    if requested not in PRECISIONS:
        raise ValueError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return PRECISIONS[requested]


def autocast(device: torch.device, precision: torch.dtype):
    """Autocast to `precision` when it is bf16 (loss, metrics and optimizer state stay float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == torch.bfloat16)


def compile_mode(requested: bool | None, device: torch.device, processes: Processes) -> str | None:
    """torch.compile's mode for training, or None for eager. requested None means: compile on CUDA,
    where it pays (an H100 step of CMUNeXt + a Llama-1B-shaped layer: eager bf16 29.7 ms, compiled
    22.3 ms, with CUDA graphs 11.6 ms), and not on the CPU, where it gave nothing (the same step, B8
    256 px, 2 AVX2 cores: 9.86 s compiled vs 9.93 s eager) after 146 s of compiling. CUDA graphs
    replay one fixed launch sequence, which needs static shapes (every batch but an epoch's last
    compiles to one graph, the last to a second, both reused every epoch) and no collectives inside
    the graph, so under torchrun the default mode is used."""
    if requested is False or (requested is None and device.type != "cuda"):
        return None
    return "reduce-overhead" if device.type == "cuda" and not processes.distributed else "default"


def free_memory(device: torch.device) -> int | None:
    """Bytes `device` has free now: on CUDA the driver's free memory, on the CPU /proc/meminfo's MemAvailable (what
    can be allocated without swapping); None where that is not known (other systems)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def memory_format(device: torch.device, spatial_dims: int = 2) -> torch.memory_format:
    """The layout of images and conv weights. One SGD step of CMUNeXt + a Llama-1B-shaped frozen layer,
    B8 256 px, float32, 2 threads: 20.7 s -> 18.8 s channels_last on an AVX2 EPYC, 9.7 s -> 5.9 s on an
    AMX Xeon; on an H100 it was not faster (31 ms vs 29.7 ms). (The bridge's flatten to tokens is then
    a view, too.) 3D networks keep the default layout (channels_last is defined for 4-D tensors only;
    channels_last_3d is unmeasured here)."""
    return torch.channels_last if device.type == "cpu" and spatial_dims == 2 else torch.contiguous_format


def to_device(images: Tensor, device: torch.device) -> Tensor:
    """An image batch (B, C, H, W) on `device`, in its memory_format; volumes (B, C, D, H, W) as they are
    (the ViT reads patches, not convolutions)."""
    if images.dim() != 4:
        return images.to(device, non_blocking=True)
    return images.to(device, non_blocking=True, memory_format=memory_format(device))


class StopRequests:
    """The first SIGINT / SIGTERM asks the loop to stop after the current optimizer step (an
    exception in the middle of one would leave half-updated weights); a second Ctrl-C interrupts
    at once."""

    def __init__(self):
        self.signal = 0

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: saving after the current step (again to abort)",
              file=sys.stderr)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM back until the block ends, then deliver them in order to the handlers
    that were installed before. A checkpoint being saved is never cut short by Ctrl-C (a second one
    included): it is written whole, and then the signal acts. Outside the main thread (where Python
    cannot install handlers) the block runs as it is."""
    try:
        pending = []
        previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    except BaseException:
        for s, handler in previous.items():  # the block's own error wins; the run ends with it
            signal.signal(s, handler)
        raise
    for s, handler in previous.items():
        signal.signal(s, handler)
    for signum in pending:
        signal.raise_signal(signum)


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: the worker ignores SIGINT / SIGTERM, which the main process's StopRequests handles
    (a worker inheriting that handler would print its message once more per worker)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
