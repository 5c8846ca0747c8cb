"""Faults against train.py: a kill -9 after every single write of a run, a full disk at every write, a
real EFBIG, two Ctrl-C during a save, Ctrl-C with DataLoader workers, broken data files. After each fault, `--resume` must end
bit-identical to the uninterrupted run (weights, optimizer state, best checkpoint, metrics), and every
failure must be one "error: ..." line with its exit code.

The faulty runs are forked children of this process (torch already imported, one thread each, as
DataLoader workers are), so a run costs its training only, not a Python start: a 2-epoch run of a
7,712-parameter ViT on 32 px synthetic polyps, about 0.4 s. Faults are injected into the project's own
writer from outside it: the child wraps os.replace (a write is visible once renamed) or files.fsync_path
(where a delayed-allocation file system reports a full disk), never a hook in the code under test.
"""
import errno
import json
import multiprocessing
import os
import resource
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llm4seg import files, losses
import train
from llm4seg.checkpoints import has_checkpoint
from dataset_trees import box_mask, write_case

EPOCHS = 2


def tiny_run(out: Path, *extra: str) -> list[str]:
    return ["--data", "synthetic", "--synthetic-size", "10", "--img-size", "32", "--backbone", "vit",
            "--patch-size", "8", "--embed-dim", "16", "--depth", "1", "--heads", "2", "--mode", "none",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--precision", "fp32",
            "--epochs", str(EPOCHS), "--out", str(out), *extra]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def writes_in(run_dir: Path, record: list[str]):
    """An os.replace that records every file renamed into run_dir (i.e. every write of the run)."""
    real_replace = os.replace

    def replace(source, destination):
        real_replace(source, destination)
        if Path(destination).parent == run_dir:
            record.append(Path(destination).name)
    return replace


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[str]]:
    """The uninterrupted run and the names of its writes, in order."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    written = []
    patch = pytest.MonkeyPatch()
    patch.setattr(os, "replace", writes_in(out, written))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main(tiny_run(out)) == 0
    finally:
        patch.undo()
        torch.set_num_threads(threads)
    return out, written


def run_child(out: Path, fault, *extra: str) -> tuple[int, str]:
    """train.main in a forked child with `fault(out)` installed first -> (exit code, its stdout + stderr);
    a kill -9 is exit code -9."""
    log = out.parent / f"{out.name}.log"

    def child():
        sys.stdout = sys.stderr = open(log, "w", buffering=1)  # line-buffered: a kill -9 keeps what was said
        torch.set_num_threads(1)
        fault(out)
        sys.exit(train.main(tiny_run(out, *extra)))

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(120)
    return process.exitcode, log.read_text()


def assert_resumes_to(out: Path, reference_dir: Path) -> None:
    """--resume (or, when the fault came before config.json, the same command again) ends as the reference."""
    again = ["--resume", str(out)] if (out / "config.json").is_file() else tiny_run(out)
    assert train.main(again) == 0
    for name in ("last", "best"):
        a, b = load_file(out / f"{name}.safetensors"), load_file(reference_dir / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name

    def without_speed(run_dir):
        return [{k: v for k, v in json.loads(line).items() if k != "images_per_second"}
                for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert without_speed(out) == without_speed(reference_dir)


def test_the_reference_run_writes_each_file_whole_in_this_order(reference):
    _, written = reference
    # config, then per epoch: best (when it improves), the metrics log, the curves, last.
    assert written[0] == "config.json" and written[-1] == "last.safetensors"
    assert written.count("last.safetensors") == EPOCHS and written.count("metrics.jsonl") == EPOCHS


def test_a_kill_after_any_write_resumes_to_the_uninterrupted_run(reference, tmp_path):
    """SIGKILL right after the k-th file of the run is renamed into place, for every k."""
    reference_dir, written = reference
    for k in range(1, len(written) + 1):
        out = tmp_path / f"killed-after-write-{k}"

        def kill_after_write_k(run_dir, k=k):
            record = []
            renamed = writes_in(run_dir, record)

            def replace(source, destination):
                renamed(source, destination)
                if len(record) == k:
                    os.kill(os.getpid(), signal.SIGKILL)
            os.replace = replace

        code, log = run_child(out, kill_after_write_k)
        assert code == -signal.SIGKILL, (k, log)
        assert_resumes_to(out, reference_dir)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_a_full_disk_at_any_write_is_one_line_exit_1_and_resumes(reference, tmp_path, code):
    reference_dir, written = reference
    for k in range(1, len(written) + 1):
        out = tmp_path / f"full-at-write-{k}"

        def full_at_write_k(run_dir, k=k):
            real_fsync, temporaries = files.fsync_path, []

            def fsync_path(path):
                if Path(path).parent == run_dir and Path(path).name.startswith("."):
                    temporaries.append(path)
                    if len(temporaries) == k:
                        raise OSError(code, os.strerror(code))
                real_fsync(path)
            files.fsync_path = fsync_path

        exit_code, log = run_child(out, full_at_write_k)
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert exit_code == 1 and len(errors) == 1 and "Traceback" not in log, (k, log)
        target = out / written[k - 1]
        assert errors[0].startswith(f"error: {os.strerror(code)} writing {target}"), (k, errors)
        assert not list(out.glob(".*.tmp"))
        assert_resumes_to(out, reference_dir)


def test_a_real_file_size_limit_keeps_the_previous_checkpoint(reference, tmp_path):
    """RLIMIT_FSIZE below `last`'s size: the kernel refuses the bytes (EFBIG) at the first save of last."""
    reference_dir, _ = reference
    limit = (reference_dir / "last.safetensors").stat().st_size // 2
    out = tmp_path / "file-size-limit"

    def limit_file_size(run_dir):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    code, log = run_child(out, limit_file_size)
    assert code == 1 and "Traceback" not in log, log
    assert f"error: File too large writing {out / 'last.safetensors'}" in log
    assert "no earlier checkpoint exists there" in log
    assert not (out / "last.safetensors").exists()
    assert_resumes_to(out, reference_dir)  # the disk freed: the run starts again from its beginning


def test_two_ctrl_c_during_a_save_leave_it_whole_and_exit_130(reference, tmp_path):
    reference_dir, _ = reference
    out = tmp_path / "ctrl-c-twice"

    def ctrl_c_twice_while_saving_last(run_dir):
        real_replace = os.replace

        def replace(source, destination):
            if Path(destination) == run_dir / "last.safetensors":
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            real_replace(source, destination)
        os.replace = replace

    code, log = run_child(out, ctrl_c_twice_while_saving_last)
    assert code == 130 and "Traceback" not in log, log
    assert f"interrupted; the checkpoints in {out} are whole" in log
    assert_resumes_to(out, reference_dir)


def test_ctrl_c_mid_epoch_with_two_workers_resumes_exactly(reference, tmp_path, monkeypatch):
    """Workers prefetch batches and are seeded per epoch; the augmentation depends on (seed, epoch,
    index) only, so stopping mid-epoch with --workers 2 and resuming gives the run made with --workers 0."""
    reference_dir, _ = reference
    steps, real_loss = iter(range(1, 100)), losses.bce_dice_loss

    def loss_with_ctrl_c(logits, target, bce_weight):
        if next(steps) == 3:  # epoch 2, its first batch
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(logits, target, bce_weight)

    monkeypatch.setattr(losses, "bce_dice_loss", loss_with_ctrl_c)
    out = tmp_path / "workers"
    assert train.main(tiny_run(out, "--workers", "2")) == 130
    monkeypatch.setattr(losses, "bce_dice_loss", real_loss)
    assert_resumes_to(out, reference_dir)


def test_broken_data_files_are_all_named_before_the_first_step(tmp_path, monkeypatch, capsys):
    """A zero-byte image and a label-map mask in a `folder` dataset: exit 2 with both files in one message,
    before any step is taken or any checkpoint written."""
    root, rng = tmp_path / "data", np.random.default_rng(0)
    for i in range(10):
        write_case(root / "images" / f"case{i}.png", [root / "masks" / f"case{i}.png"], [box_mask(32, 32, rng)])
    (root / "images" / "case3.png").write_bytes(b"")
    Image.fromarray(np.array([[0, 1], [2, 0]], np.uint8).repeat(16, 0).repeat(16, 1)).save(root / "masks" / "case7.png")
    monkeypatch.setattr(train, "train_one_epoch", None)  # never reached
    out = tmp_path / "run"
    assert train.main(tiny_run(out, "--data", "folder", "--data-dir", str(root))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 of 10 cases cannot be used:") and "Traceback" not in err, err
    assert str(root / "images" / "case3.png") in err and str(root / "masks" / "case7.png") in err
    assert not has_checkpoint(out, "last")


def test_eval_and_resume_refuse_a_local_layer_whose_weights_changed(tiny_llm, tmp_path, capsys):
    """The frozen layer is in no checkpoint: a run from a local folder records its fingerprint, and a
    folder whose layer was replaced since is refused by name, not silently used."""
    import eval as evaluation

    llm = tmp_path / "llm"
    shutil.copytree(tiny_llm, llm)
    out = tmp_path / "run"
    argv = tiny_run(out, "--mode", "frozen", "--llm", str(llm), "--layer", "2", "--epochs", "2",
                    "--stop-after-epoch", "1")
    assert train.main(argv) == 0
    assert json.loads((out / "config.json").read_text())["llm_layer"]["fingerprint"]["sha256"]
    weights_file = llm / "model.safetensors"
    with safe_open(weights_file, "pt") as f:
        metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    tensors["model.layers.1.mlp.down_proj.weight"] += 0.01
    save_file(tensors, weights_file, metadata=metadata)
    capsys.readouterr()

    assert evaluation.main([str(out), "--workers", "0", "--device", "cpu"]) == 2
    assert train.main(["--resume", str(out)]) == 2
    for line in capsys.readouterr().err.splitlines():
        assert line.startswith("error: the frozen layer in") and str(weights_file) in line and "changed" in line


@pytest.mark.parametrize("damage", ["flip a byte", "cut short"])
def test_eval_and_resume_refuse_a_damaged_checkpoint_in_one_line(reference, tmp_path, capsys, damage):
    import eval as evaluation

    out = tmp_path / "damaged"
    shutil.copytree(reference[0], out)
    for name in ("best", "last"):
        path = out / f"{name}.safetensors"
        data = bytearray(path.read_bytes())
        if damage == "flip a byte":
            data[-100] ^= 0x01  # inside the last tensor's bytes
        path.write_bytes(bytes(data) if damage == "flip a byte" else bytes(data[:len(data) // 2]))
    capsys.readouterr()
    assert evaluation.main([str(out), "--workers", "0", "--device", "cpu"]) == 2
    assert train.main(["--resume", str(out), "--epochs", str(EPOCHS)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2, errors
    assert all(line.startswith(f"error: checkpoint {out}") and "Traceback" not in line for line in errors)
