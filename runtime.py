"""Where and how a model runs: the processes torchrun started, the device, the precision.

Library modules never pick a device; the entry scripts (train.py, eval.py) call these:
    Processes.from_env()       rank, local rank and world size from torchrun's environment
    resolve_device(name, p)    "auto" | "cpu" | "cuda" | "cuda:N" -> a torch.device (one GPU per
                               process under torchrun)
    rank_zero_first(p)         rank 0 downloads and writes shared files first, the others wait
    StopRequests()             Ctrl-C / SIGTERM ask a training loop to stop at the next step boundary
    autocast(device), predict  the one precision policy of training and evaluation: bf16 autocast
                               on CUDA, float32 on CPU; logits always come back float32
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
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "Processes":
        """This process's place among those torchrun started (a single process without torchrun)."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str, processes: Processes) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {requested!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: CUDA is not available here; use --device cpu")
        if processes.distributed:
            device = torch.device("cuda", processes.local_rank)  # torchrun: one GPU per process
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {requested!r}")
    return device


@contextlib.contextmanager
def rank_zero_first(processes: Processes):
    """Rank 0 downloads and writes split files alone; the other ranks then read what it wrote."""
    if processes.distributed and not processes.main:
        dist.barrier()
    yield
    if processes.distributed and processes.main:
        dist.barrier()


def autocast(device: torch.device):
    """The precision of training and evaluation: bf16 autocast on CUDA, float32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def predict(net: torch.nn.Module, images: Tensor, device: torch.device) -> Tensor:
    """images (B, C, S, S) -> float32 logits (B, classes, S, S), at the precision of `autocast`."""
    with autocast(device):
        return net(images.to(device, non_blocking=True)).float()


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
