"""Tests of checkpoints.py: a checkpoint round-trips weights, momentum and RNG states as one file; damaged,
truncated or flipped files are one InputError naming them; a full disk keeps the previous checkpoint;
Ctrl-C waits for a save; runs of the earlier two-file format still load; a metrics log never repeats an
epoch. (Resuming a whole run bit for bit, and kills at every write, are tests/test_train*.py's.)"""
import errno
import json
import os
import random
import signal
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from llm4seg.checkpoints import (checkpoint_info, keep_metrics_up_to, load_checkpoint, read_checkpoint, read_run_config,
                                 remove_stale_temporaries, rng_state, save_checkpoint, set_rng_state)
from llm4seg.files import InputError, WriteError


def small_model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(5, 4)).sum().backward()
    optimizer.step()  # momentum buffers exist from here on
    return net, optimizer


def test_weights_momentum_and_info_round_trip(tmp_path):
    net, optimizer = small_model_and_optimizer(0)
    save_checkpoint(tmp_path, "last", net, {"global_step": 7, "note": "x"}, optimizer)
    other, other_optimizer = small_model_and_optimizer(1)
    info = load_checkpoint(tmp_path, "last", other, other_optimizer)
    assert info["global_step"] == 7 and info["note"] == "x"
    for key, value in net.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key
    momentum = [optimizer.state[p]["momentum_buffer"] for p in net.parameters()]
    assert all(torch.equal(a, other_optimizer.state[p]["momentum_buffer"])
               for a, p in zip(momentum, other.parameters(), strict=True))


def test_a_checkpoint_is_one_file_readable_by_the_world_like_every_run_file(tmp_path):
    net, optimizer = small_model_and_optimizer(0)
    save_checkpoint(tmp_path, "last", net, {"global_step": 7}, optimizer)
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]  # no temporary, no second file
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "last.safetensors").stat().st_mode) == 0o666 & ~umask
    assert checkpoint_info(tmp_path, "last")["global_step"] == 7


def save_two_file_checkpoint(run_dir: Path, name: str, net: torch.nn.Module, info: dict) -> None:
    """The format before one-file checkpoints: tensors with the step in their metadata, the rest in <name>.json."""
    tensors = {f"model.{key}": value.contiguous() for key, value in net.state_dict().items()}
    save_file(tensors, run_dir / f"{name}.safetensors", metadata={"global_step": str(info["global_step"])})
    (run_dir / f"{name}.json").write_text(json.dumps(info))


def test_runs_of_the_two_file_format_still_load_and_a_torn_pair_is_caught(tmp_path):
    net, _ = small_model_and_optimizer(0)
    save_two_file_checkpoint(tmp_path, "best", net, {"global_step": 3, "epoch": 1})
    other, _ = small_model_and_optimizer(1)
    assert load_checkpoint(tmp_path, "best", other) == {"global_step": 3, "epoch": 1}
    assert all(torch.equal(value, other.state_dict()[key]) for key, value in net.state_dict().items())

    (tmp_path / "best.json").write_text(json.dumps({"global_step": 4}))  # the JSON of a later save
    with pytest.raises(InputError, match="the run was killed while saving"):
        load_checkpoint(tmp_path, "best", net)
    (tmp_path / "best.json").write_text('{"global_step": 3, "epo')  # cut short
    with pytest.raises(InputError, match=f"checkpoint info {tmp_path / 'best.json'} is not valid JSON"):
        load_checkpoint(tmp_path, "best", net)

    save_checkpoint(tmp_path, "best", net, {"global_step": 5})  # the next save moves the run to one file
    assert not (tmp_path / "best.json").exists() and checkpoint_info(tmp_path, "best") == {"global_step": 5}


def damaged(data: bytes, how: str) -> bytes:
    header_end = 8 + int.from_bytes(data[:8], "little")
    if how == "a flipped byte in a tensor":
        middle = (header_end + len(data)) // 2
        return data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1:]
    if how == "cut in its tensors":
        return data[:len(data) - 5]
    if how == "cut in its header":
        return data[:header_end // 2]
    if how == "zero bytes":
        return b""
    if how == "a damaged header":
        return data[:8] + data[8:header_end].replace(b'"', b"'", 3) + data[header_end:]
    raise AssertionError(how)


@pytest.mark.parametrize("how, message", [
    ("a flipped byte in a tensor", "is corrupt: the sha256 of its tensors and info differs"),
    ("cut in its tensors", "is damaged"),
    ("cut in its header", "is truncated"),
    ("zero bytes", "is truncated"),
    ("a damaged header", "is not valid JSON"),
])
def test_a_damaged_checkpoint_is_one_input_error_naming_it(tmp_path, how, message):
    net, optimizer = small_model_and_optimizer(0)
    save_checkpoint(tmp_path, "last", net, {"global_step": 7}, optimizer)
    path = tmp_path / "last.safetensors"
    path.write_bytes(damaged(path.read_bytes(), how))
    with pytest.raises(InputError, match=message) as error:
        load_checkpoint(tmp_path, "last", net, optimizer)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_random_truncations_and_byte_flips_load_correctly_or_raise_one_input_error(tmp_path):
    """A seeded fuzz loop over a small checkpoint: every outcome is the original checkpoint (a flip that
    changes nothing, e.g. in a header's padding) or files.InputError; no other exception escapes."""
    net, optimizer = small_model_and_optimizer(0)
    save_checkpoint(tmp_path, "last", net, {"global_step": 7, "rng": [rng_state()]}, optimizer)
    path = tmp_path / "last.safetensors"
    original = path.read_bytes()
    expected_tensors, expected_info = read_checkpoint(path)
    rng, outcomes = np.random.default_rng(0), {"loaded": 0, "refused": 0}
    for _ in range(200):
        data = bytearray(original)
        if rng.random() < 0.3:
            data = data[:rng.integers(0, len(data))]
        else:
            for position in rng.integers(0, len(data), rng.integers(1, 4)):
                data[position] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        try:
            tensors, info = read_checkpoint(path)
        except InputError as error:
            assert str(path) in str(error)
            outcomes["refused"] += 1
            continue
        assert info == expected_info and tensors.keys() == expected_tensors.keys()
        assert all(torch.equal(tensors[key], expected_tensors[key]) for key in tensors)
        outcomes["loaded"] += 1
    assert outcomes["refused"] >= 190, outcomes


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    net, _ = small_model_and_optimizer(0)
    save_checkpoint(tmp_path, "best", net, {"global_step": 1})
    with pytest.raises(InputError, match="does not fit the model of"):
        load_checkpoint(tmp_path, "best", torch.nn.Linear(4, 2))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, code):
    net, optimizer = small_model_and_optimizer(0)
    save_checkpoint(tmp_path, "last", net, {"global_step": 7, "progress": {"epochs_done": 3}}, optimizer)
    before = (tmp_path / "last.safetensors").read_bytes()

    def half_then_full(self, data):
        with open(self, "wb") as f:
            f.write(data[:len(data) // 2])
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(WriteError) as error:
        save_checkpoint(tmp_path, "last", net, {"global_step": 8}, optimizer)
    assert error.value.strerror.startswith(f"{os.strerror(code)} writing {tmp_path / 'last.safetensors'}")
    assert error.value.strerror.endswith("the previous checkpoint (epoch 3, step 7) is intact")
    assert error.value.strerror.count("writing") == 1  # said once
    assert (tmp_path / "last.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_ctrl_c_during_a_save_acts_after_the_file_is_whole(tmp_path, monkeypatch):
    """Two SIGINTs while the bytes are written: both wait, then reach the handler that was installed."""
    net, optimizer = small_model_and_optimizer(0)
    real_write_bytes, received = Path.write_bytes, []

    def write_with_two_ctrl_c(self, data):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_with_two_ctrl_c)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(
        (signum, (tmp_path / "last.safetensors").is_file())))
    try:
        save_checkpoint(tmp_path, "last", net, {"global_step": 1}, optimizer)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert received == [(signal.SIGINT, True), (signal.SIGINT, True)]
    assert checkpoint_info(tmp_path, "last")["global_step"] == 1


def test_a_run_config_that_is_not_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"train": {"epochs": 3')
    with pytest.raises(InputError, match=f"the run's settings {tmp_path / 'config.json'} is not valid JSON"):
        read_run_config(tmp_path)


def test_rng_states_round_trip_through_json():
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    state = json.loads(json.dumps(rng_state()))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_metrics_written_before_a_crash_are_not_repeated(tmp_path):
    """A kill between the metrics line and last.* leaves a line ahead of the checkpoint."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))
    keep_metrics_up_to(path, 2)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2]


def test_temporaries_of_killed_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = max_dead_pid()
    stale = tmp_path / f".last.safetensors.{dead}.tmp"
    live = tmp_path / f".best.safetensors.{os.getppid()}.tmp"  # a live process: it may still be writing
    for path in (stale, live):
        path.write_bytes(b"half a checkpoint")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


def max_dead_pid() -> int:
    """A pid no process has now: one of a child that has exited."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid
