"""Tests of runtime.py's CUDA branches on a machine without a GPU: torch.cuda's queries are faked,
and torch.cuda.set_device is replaced by its own index check (torch.cuda._utils._get_device_index),
which is what raised "Expected a torch.device with a specified index" on a real H100."""
import os

import pytest
import torch

from llm4seg import runtime
import train
from llm4seg.runtime import Processes, compile_mode, resolve_device, resolve_precision


@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine with `count` GPUs (default 1); returns the indices set_device was called with."""
    current = []

    def install(count: int = 1) -> list[int]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "set_device",
                            lambda device: current.append(torch.cuda._utils._get_device_index(device)))
        return current
    return install


@pytest.mark.parametrize("requested", ["auto", "cuda", "cuda:0"])
def test_cuda_devices_carry_their_index(fake_gpus, requested):
    current = fake_gpus(1)
    assert resolve_device(requested, Processes()) == torch.device("cuda", 0)
    assert current == [0]


def test_torchrun_process_k_takes_gpu_k(fake_gpus):
    current = fake_gpus(2)
    processes = Processes(rank=1, local_rank=1, world_size=2, local_world_size=2)
    assert resolve_device("auto", processes) == torch.device("cuda", 1)
    assert current == [1]


def test_more_processes_than_gpus_is_refused_before_any_work(fake_gpus):
    fake_gpus(1)
    with pytest.raises(ValueError, match=r"torchrun started 2 processes on this machine but it has 1 GPU\(s\): "
                                         r"one process per GPU, so use --nproc_per_node=1"):
        resolve_device("auto", Processes(rank=0, local_rank=0, world_size=2, local_world_size=2))


def test_a_gpu_index_past_the_last_is_refused(fake_gpus):
    fake_gpus(1)
    with pytest.raises(ValueError, match=r"--device cuda:1: this machine has 1 GPU\(s\), cuda:0 .. cuda:0"):
        resolve_device("cuda:1", Processes())


def test_cpu_and_missing_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", Processes()) == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available here; use --device cpu"):
        resolve_device("cuda", Processes())
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N, got 'tpu'"):
        resolve_device("tpu", Processes())


def test_train_under_torchrun_with_too_few_gpus_says_so_in_one_line(fake_gpus, monkeypatch, tmp_path, capsys):
    """`torchrun --nproc_per_node=2 train.py` on a one-GPU machine, as rank 0 sees it: exit 2, one line,
    before the process group, the model or the run directory exist."""
    fake_gpus(1)
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    assert train.main(["--data", "synthetic", "--llm", "none", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error == "error: torchrun started 2 processes on this machine but it has 1 GPU(s): one process per " \
                    "GPU, so use --nproc_per_node=1\n"
    assert not out.exists()


@pytest.mark.parametrize("requested, device, processes, mode", [
    (None, "cuda:0", Processes(), "reduce-overhead"),      # the default on a GPU: CUDA graphs
    (None, "cuda:1", Processes(1, 1, 2, 2), "default"),    # torchrun: no collectives inside a CUDA graph
    (None, "cpu", Processes(), None),                      # compiling on the CPU costs minutes: off unless asked
    (True, "cpu", Processes(), "default"),
    (False, "cuda:0", Processes(), None),                  # --no-compile
])
def test_compile_mode(requested, device, processes, mode):
    assert compile_mode(requested, torch.device(device), processes) == mode


@pytest.mark.parametrize("requested, native, expected", [
    ("auto", True, torch.bfloat16), ("auto", False, torch.float32),  # bf16 only where it is native
    ("bf16", False, torch.bfloat16), ("fp32", True, torch.float32),
])
def test_precision(monkeypatch, requested, native, expected):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    assert resolve_precision(requested, torch.device("cpu")) == expected


def test_this_cpu_is_asked_whether_it_has_native_bf16():
    """The query itself runs (on this AVX2-only machine it answers False; on an AMX Xeon, True)."""
    assert runtime.native_bf16(torch.device("cpu")) in (True, False)
    with pytest.raises(ValueError, match="--precision: expected one of auto, bf16, fp32, got 'fp16'"):
        resolve_precision("fp16", torch.device("cpu"))


def test_workers_default_to_the_usable_cores_up_to_4():
    import argparse
    import os

    from llm4seg.cli import check_runtime_flags

    args = argparse.Namespace(workers=None, batch_size=1)
    check_runtime_flags(args)
    assert args.workers == min(4, len(os.sched_getaffinity(0)))


def test_cpu_threads_are_this_processs_share_of_its_cores_less_its_workers(monkeypatch):
    """Issue 31, item 11: torch's default (every core) beside busy DataLoader workers ran 4-7x slower than one
    thread on two cores. OMP_NUM_THREADS, when set, is the user's (make demo* pins the measured count)."""
    from llm4seg.runtime import Processes, set_cpu_threads

    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
        assert set_cpu_threads(4, Processes()) == 12 == torch.get_num_threads()
        assert set_cpu_threads(2, Processes(local_world_size=4)) == 2  # torchrun: 4 processes share 16 cores
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        assert set_cpu_threads(4, Processes()) == 1  # never below one
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert set_cpu_threads(0, Processes()) == 3  # left as the user set it
    finally:
        torch.set_num_threads(threads)


def test_free_memory_asks_cuda_on_a_gpu_and_meminfo_on_the_cpu(monkeypatch):
    """The CUDA branch runs here with the driver's answer faked; the CPU's is /proc/meminfo's MemAvailable."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (7 * 2**30, 80 * 2**30))
    assert runtime.free_memory(torch.device("cuda", 0)) == 7 * 2**30
    with open("/proc/meminfo") as meminfo:
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    assert abs(runtime.free_memory(torch.device("cpu")) - available) < 2**30  # it moves while we read
