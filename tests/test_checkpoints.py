"""Tests of checkpoints.py: a checkpoint round-trips weights, momentum and RNG states; a kill between its
two files is caught; a metrics log never repeats an epoch. (Resuming a whole run bit for bit is
tests/test_train.py's.)"""
import json
import random

import numpy as np
import pytest
import torch

from checkpoints import keep_metrics_up_to, load_checkpoint, rng_state, save_checkpoint, set_rng_state


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
               for a, p in zip(momentum, other.parameters()))


def test_a_kill_between_the_two_files_is_caught(tmp_path):
    net, _ = small_model_and_optimizer(0)
    save_checkpoint(tmp_path, "best", net, {"global_step": 3})
    (tmp_path / "best.json").write_text(json.dumps({"global_step": 4}))  # the JSON of a later save
    with pytest.raises(ValueError, match="the run was killed while saving"):
        load_checkpoint(tmp_path, "best", net)


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
