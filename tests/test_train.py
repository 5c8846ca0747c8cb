"""Tests for train.py: the recipe end to end on synthetic polyps and a tiny local Llama checkpoint.

Every run: 64 x 64 images, batch 4, 7 train / 2 val synthetic cases (2 iterations per epoch),
workers 0, CPU. Runs go through main(argv) in this process where possible, and through a
subprocess where the exit code, stderr or torchrun matter. Torch runs on one thread: on this
shared 2-core machine two OpenMP threads next to another busy process are ~20x slower.
Resumed runs are compared with uninterrupted ones bit for bit: same seed, same thread count, CPU.
"""
import contextlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
import torch
from safetensors.torch import load_file

import train
from llm4seg import losses, settings
from llm4seg.checkpoints import checkpoint_info
from llm4seg.llm_layer import load_layer
from llm4seg.model import build_model
from llm4seg.task import Task

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_run(tiny_llm: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", "synthetic", "--synthetic-size", "10", "--llm", str(tiny_llm), "--layer", "2",
            "--img-size", "64", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--precision", "fp32",
            "--out", str(out), *extra]


def run_subprocess(args: list[str], launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, str(REPO_ROOT / "train.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_tensors(file_a: Path, file_b: Path) -> None:
    a, b = load_file(file_a), load_file(file_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_metrics(run_a: Path, run_b: Path) -> None:
    """Everything but the speed, exactly."""
    def without_speed(lines):
        return [{k: v for k, v in line.items() if k != "images_per_second"} for line in lines]
    assert without_speed(metrics(run_a)) == without_speed(metrics(run_b))


def reference_run(argv: list[str]) -> None:
    """A session fixture's uninterrupted run, on one thread like the tests that compare with it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main(argv) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def three_epochs(tiny_llm, tmp_path_factory) -> Path:
    """The uninterrupted reference run."""
    out = tmp_path_factory.mktemp("runs") / "three-epochs"
    reference_run(small_run(tiny_llm, out, "--epochs", "3"))
    return out


# --- a whole run ---------------------------------------------------------------------------------


def test_two_epochs_write_config_metrics_checkpoints_and_keep_the_layer_frozen(tiny_llm, tmp_path,
                                                                              monkeypatch, capsys):
    built = {}

    def build_and_keep(*args, **kwargs):
        net = build_model(*args, **kwargs)
        built["net"] = net
        built["adapter_before"] = net.bridge.project_in.weight.detach().clone()
        return net

    monkeypatch.setattr(settings, "build_model", build_and_keep)
    out = tmp_path / "run"
    assert train.main(small_run(tiny_llm, out, "--epochs", "2")) == 0

    printed = capsys.readouterr().out
    assert "3,182,273 trainable / 36,992 frozen parameters" in printed  # 36,992 = one layer, D = 64
    assert f"LLM layer: {tiny_llm} @ local files, model.layers.1 = the paper's layer 2 of 2" in printed
    assert "device: cpu (float32), 1 process(es), global batch 4 = 1 x 4" in printed
    assert "7 train / 2 val images at 64px, 2 iterations per epoch" in printed

    lines = metrics(out)
    assert [line["epoch"] for line in lines] == [1, 2]
    assert [line["global_step"] for line in lines] == [2, 4]
    assert all(0 <= line["val_iou"] <= 1 and line["train_loss"] > 0 for line in lines)
    # poly decay, lr of the last step of each epoch: 0.01 * (1 - 1/4) ** 0.9 and 0.01 * (1 - 3/4) ** 0.9
    assert [line["lr"] for line in lines] == pytest.approx([0.01 * 0.75 ** 0.9, 0.01 * 0.25 ** 0.9], rel=1e-12)

    net = built["net"]
    pristine = load_layer(str(tiny_llm), 2)
    for (name, trained), (_, original) in zip(net.bridge.layer.named_parameters(), pristine.named_parameters(), strict=True):
        assert not trained.requires_grad and torch.equal(trained, original), name
    assert not torch.equal(net.bridge.project_in.weight, built["adapter_before"])

    config = json.loads((out / "config.json").read_text())
    assert config["train"]["epochs"] == 2 and config["train"]["seed"] == 41
    assert config["llm_layer"]["path"] == str(tiny_llm) and config["llm_layer"]["layer"] == 2
    assert config["model"] == {"backbone": "cmunext", "llm": str(tiny_llm), "layer": 2, "mode": "frozen",
                               "in_channels": 3, "num_classes": 1, "lora_rank": 0, "residual": False, "revision": None,
                               "mapper_lora_rank": 0, "final_norm": "none", "spatial_dims": 2, "img_size": None,
                               "patch_size": None, "embed_dim": None, "depth": None, "heads": None, "dropout": None}

    # The checkpoint holds what was trained; the config rebuilds the rest.
    last = load_file(out / "last.safetensors")
    assert not any(key.startswith("model.bridge.layer.") for key in last)
    momentum = [key for key in last if key.startswith("optimizer.")]
    assert len(momentum) == sum(p.requires_grad for p in net.parameters())
    rebuilt = build_model(**config["model"])
    rebuilt.load_state_dict({k.removeprefix("model."): v for k, v in last.items() if k.startswith("model.")})
    for key, value in net.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    best = checkpoint_info(out, "best")
    assert best["val"]["iou"] == max(line["val_iou"] for line in lines)
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "curves.png", "last.safetensors",
                                               "best.safetensors", ".lock"}  # .lock: RUN_DIR's, released
    with Image.open(out / "curves.png") as curves:  # redrawn each epoch from metrics.jsonl
        curves.verify()
        assert curves.format == "PNG"


# --- resuming ------------------------------------------------------------------------------------


def test_stop_after_epoch_two_and_resume_equals_three_uninterrupted_epochs(tiny_llm, tmp_path, three_epochs):
    out = tmp_path / "stopped"
    assert train.main(small_run(tiny_llm, out, "--epochs", "3", "--stop-after-epoch", "2")) == 0
    assert [line["epoch"] for line in metrics(out)] == [1, 2]
    assert train.main(["--resume", str(out)]) == 0
    assert [line["epoch"] for line in metrics(out)] == [1, 2, 3]
    assert_same_metrics(out, three_epochs)
    assert_same_tensors(out / "last.safetensors", three_epochs / "last.safetensors")  # model + momentum
    assert_same_tensors(out / "best.safetensors", three_epochs / "best.safetensors")


@pytest.mark.parametrize("step", [3, 4])
def test_ctrl_c_mid_epoch_saves_last_and_resume_is_exact(tiny_llm, tmp_path, three_epochs, monkeypatch,
                                                         capsys, step):
    """SIGINT during step 3 (epoch 2, batch 1) or 4 (its last batch, before validation): the step
    completes, is saved, and the resumed run continues with the next batch's data and draws."""
    loss_calls, real_loss = itertools.count(1), losses.bce_dice_loss

    def loss_with_ctrl_c(logits, target, bce_weight):
        if next(loss_calls) == step:
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(logits, target, bce_weight)

    monkeypatch.setattr(losses, "bce_dice_loss", loss_with_ctrl_c)
    out = tmp_path / "interrupted"
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when started in the background
    assert train.main(small_run(tiny_llm, out, "--epochs", "3")) == 130
    assert f"stopped in epoch 2 after {step - 2} batches" in capsys.readouterr().out
    saved = checkpoint_info(out, "last")["progress"]
    assert (saved["epochs_done"], saved["batches_done"], saved["global_step"]) == (1, step - 2, step)
    assert [line["epoch"] for line in metrics(out)] == [1]
    assert signal.getsignal(signal.SIGINT) is before  # handler restored

    monkeypatch.setattr(losses, "bce_dice_loss", real_loss)
    assert train.main(["--resume", str(out)]) == 0
    assert_same_metrics(out, three_epochs)
    assert_same_tensors(out / "last.safetensors", three_epochs / "last.safetensors")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_llm, tmp_path, monkeypatch, capsys):
    loss_calls, real_loss = itertools.count(1), losses.bce_dice_loss

    def nan_in_epoch_two(logits, target, bce_weight):
        loss = real_loss(logits, target, bce_weight)
        return loss * float("nan") if next(loss_calls) == 4 else loss

    monkeypatch.setattr(losses, "bce_dice_loss", nan_in_epoch_two)
    out = tmp_path / "nan"
    assert train.main(small_run(tiny_llm, out, "--epochs", "3")) == 1
    assert "error: non-finite loss at epoch 2, step 3 " in capsys.readouterr().err
    assert checkpoint_info(out, "last")["progress"]["epochs_done"] == 1
    assert [line["epoch"] for line in metrics(out)] == [1]
    assert torch.isfinite(torch.cat([t.flatten().float() for t in load_file(out / "last.safetensors").values()])).all()


if torch.cuda.is_available():  # defined only where there is a GPU: the suite's other runs pin the CPU
    def test_the_default_run_trains_and_evaluates_on_the_gpu(tiny_llm, tmp_path):
        """The README's command shape on CUDA with every default (--device auto, compiled with CUDA
        graphs, bf16 autocast, Triton kernels), 2 epochs whose last batch is partial, then eval.py."""
        out = tmp_path / "gpu"
        args = ["--data", "synthetic", "--synthetic-size", "10", "--llm", str(tiny_llm), "--layer", "2",
                "--img-size", "64", "--batch-size", "4", "--epochs", "2", "--workers", "0", "--out", str(out)]
        result = run_subprocess(args)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "device: cuda:0 (bf16 autocast, torch.compile reduce-overhead)" in result.stdout
        assert result.stdout.count("the first step took") == 1
        assert [line["epoch"] for line in metrics(out)] == [1, 2]
        evaluated = subprocess.run([sys.executable, str(REPO_ROOT / "eval.py"), str(out), "--workers", "0"],
                                   capture_output=True, text=True, timeout=300)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        assert json.loads((out / "eval-val" / "metrics.json").read_text())["images"] == 2


# --- distributed ---------------------------------------------------------------------------------


def test_torchrun_two_processes_on_cpu_complete_an_epoch(tiny_llm, tmp_path):
    out = tmp_path / "ddp"
    result = run_subprocess(small_run(tiny_llm, out, "--epochs", "1"),
                            launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("global batch 8 = 2 x 4") == 1  # rank 0 alone prints
    assert "(gloo)" in result.stdout
    assert [line["epoch"] for line in metrics(out)] == [1]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert checkpoint_info(out, "last")["world_size"] == 2


# --- bad settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--data", "imagenet"], "argument --data: invalid choice: 'imagenet'"),
    (["--backbone", "resnet"], "argument --backbone: invalid choice: 'resnet'"),
    (["--llm", "not-an-llm"], "unknown LLM 'not-an-llm'"),
    (["--layer", "3"], "layer 3 out of range"),
    (["--layer", "0"], "layer 0 out of range"),
    (["--img-size", "100"], "--img-size: got 100x100; height and width must be positive multiples of 16 (the network halves them 4 times): resize or crop, e.g. to 96x96"),
    (["--data", "synthetic3d"], "--data synthetic3d holds 3D volumes; the cmunext backbone is 2D: use --backbone mednext, "),
    (["--backbone", "vit", "--patch-size", "12"], "--img-size: got 64x64; every side must be a positive multiple of the patch size 12"),
    (["--fold", "5", "--data", "kvasir"], "--data kvasir: fold 5 out of range: expected 0..4"),
    (["--fold", "0"], "--data synthetic: fold applies to datasets read from files"),
    (["--label", "2"], "--data synthetic: label chooses a structure of an msd task"),
    (["--lr", "nan"], "--lr: expected a finite number in (0, inf), got nan"),
    (["--lr", "inf"], "--lr: expected a finite number in (0, inf), got inf"),
    (["--momentum", "nan"], "--momentum: expected a finite number in [0, 1), got nan"),
    (["--momentum", "1"], "--momentum: expected a finite number in [0, 1), got 1.0"),
    (["--weight-decay", "-0.5"], "--weight-decay: expected a finite number in [0, inf), got -0.5"),
    (["--bce-weight", "-5"], "--bce-weight: expected a finite number in [0, 1], got -5.0"),
    (["--dropout", "1"], "--dropout: expected a finite number in [0, 1), got 1.0"),
    (["--stop-after-epoch", "-1"], "--stop-after-epoch: expected an epoch number >= 1, got -1"),
    (["--stop-after-epoch", "0"], "--stop-after-epoch: expected an epoch number >= 1, got 0"),
    (["--test-fraction", "0.1"], "--test-fraction applies to datasets read from files with a seeded split; "
                                 "synthetic has fixed splits"),
])
def test_bad_flags_exit_2_with_one_line_before_any_work(tiny_llm, tmp_path, capsys, flags, message):
    out = tmp_path / "never-created"
    try:
        code = train.main(small_run(tiny_llm, out, *flags))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err
    assert captured.out == ""
    assert not out.exists()


@pytest.mark.parametrize("where, message", [
    ("a-file", "--out {out} is a file; expected a directory for the run"),
    ("a-file/run", "--out {out}: {tmp}/a-file is a file, so the directory cannot be created"),
])
def test_an_out_that_cannot_be_a_directory_is_refused_before_any_work(tiny_llm, tmp_path, capsys, monkeypatch,
                                                                      where, message):
    monkeypatch.setattr(settings, "build_model", None)  # nothing is built before the check
    (tmp_path / "a-file").write_text("not a directory")
    out = tmp_path / where
    assert train.main(small_run(tiny_llm, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(out=out, tmp=tmp_path) in err, err


def test_an_out_the_system_refuses_is_named_before_any_work(tiny_llm, monkeypatch, capsys):
    """/proc refuses new directories even to root, whom os.access lets through: the check tries it."""
    monkeypatch.setattr(settings, "build_model", None)  # nothing is built before the check
    assert train.main(small_run(tiny_llm, Path("/proc/llm4seg-run"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out /proc/llm4seg-run: cannot write there") and err.count("\n") == 1


def test_ctrl_c_while_setting_up_is_one_line_and_exit_130(tiny_llm, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(settings, "build_model", interrupted)
    assert train.main(small_run(tiny_llm, tmp_path / "run")) == 130
    assert capsys.readouterr().err == "interrupted before training started; run the same command again to start\n"


def test_bad_flag_from_the_command_line_has_no_traceback(tiny_llm, tmp_path):
    result = run_subprocess(small_run(tiny_llm, tmp_path / "run", "--layer", "9"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: layer 9 out of range") and result.stderr.count("\n") == 1


def test_an_existing_run_is_not_overwritten_and_resume_keeps_its_settings(tiny_llm, three_epochs, capsys):
    assert train.main(small_run(tiny_llm, three_epochs, "--epochs", "3")) == 2
    assert f"already holds a run: continue it with --resume {three_epochs}" in capsys.readouterr().err
    assert train.main(["--resume", str(three_epochs), "--epochs", "5"]) == 2
    assert "expected --epochs 3 or no --epochs, got 5" in capsys.readouterr().err


def test_bf16_precision_trains_with_autocast_and_a_bf16_frozen_layer(tiny_llm, tmp_path, capsys):
    """--precision bf16 on the CPU (emulated where the CPU lacks native bf16, so only this tiny layer)."""
    out = tmp_path / "run"
    args = small_run(tiny_llm, out, "--epochs", "1")
    args[args.index("--precision") + 1] = "bf16"
    assert train.main(args) == 0
    assert "device: cpu (bf16 autocast)" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["train"]["precision"] == "bf16"
    assert all(math.isfinite(line["train_loss"]) for line in metrics(out))


def test_compile_wraps_the_training_model_and_reports_its_first_step_once(tiny_llm, tmp_path, monkeypatch, capsys):
    """--compile on the CPU (on CUDA it is the default): the training model goes through torch.compile
    once, with static shapes, and the first step's time is printed once. torch.compile itself is
    replaced by a spy that returns the model, because compiling CMUNeXt here takes minutes (a real
    `--compile` run on this machine: 154 s for the first step); tests/test_kernels.py compiles a
    whole LLM layer for real."""
    calls = []

    def spy(model, **options):
        calls.append((model, options))
        return model

    monkeypatch.setattr(torch, "compile", spy)
    assert train.main(small_run(tiny_llm, tmp_path / "run", "--epochs", "2", "--compile")) == 0
    printed = capsys.readouterr().out
    assert len(calls) == 1 and calls[0][1] == {"mode": "default", "dynamic": False}
    assert type(calls[0][0]).__name__ == "SegmentationNet"
    assert "device: cpu (float32, torch.compile default)" in printed
    assert printed.count("torch.compile (default): the first step took") == 1
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["compile"] is True


# --- MedVisionLlama: the ViT on volumes ----------------------------------------------------------
# synthetic volumes at 16^3, patch 4 (64 tokens), E 32, 2 blocks, the tiny Llama layer; 14 train / 4 val.


def volume_run(tiny_llm: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", "synthetic3d", "--synthetic-size", "20", "--backbone", "vit", "--img-size", "16",
            "--patch-size", "4", "--embed-dim", "32", "--depth", "2", "--llm", str(tiny_llm), "--layer", "2",
            "--recipe", "medvisionllama", "--workers", "0", "--device", "cpu", "--precision", "fp32",
            "--out", str(out), *extra]


@pytest.fixture(scope="session")
def two_volume_epochs(tiny_llm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "volumes"
    reference_run(volume_run(tiny_llm, out, "--epochs", "2"))
    return out


def test_medvisionllama_recipe_trains_the_vit_with_adam_mapper_lora_and_a_constant_lr(two_volume_epochs):
    config = json.loads((two_volume_epochs / "config.json").read_text())
    settings = config["train"]
    assert (settings["optimizer"], settings["lr"], settings["batch_size"], settings["bce_weight"],
            settings["schedule"], settings["weight_decay"]) == ("adam", 2e-3, 4, 1.0, "constant", 0.0)
    assert {key: config["model"][key] for key in ("backbone", "spatial_dims", "in_channels", "mapper_lora_rank",
                                                   "residual", "final_norm", "img_size", "patch_size")} == {
        "backbone": "vit", "spatial_dims": 3, "in_channels": 1, "mapper_lora_rank": 8, "residual": True,
        "final_norm": "unit", "img_size": 16, "patch_size": 4}
    lines = metrics(two_volume_epochs)
    assert [line["lr"] for line in lines] == [2e-3, 2e-3]
    assert [line["global_step"] for line in lines] == [4, 8]  # 14 cases in batches of 4
    last = load_file(two_volume_epochs / "last.safetensors")
    assert "model.bridge.project_in.lora_a" in last and "model.bridge.project_in.base.weight" in last
    assert any(key.endswith(".exp_avg_sq") for key in last)  # Adam's second moments are saved


def test_volume_run_stopped_and_resumed_equals_the_uninterrupted_one(tiny_llm, tmp_path, two_volume_epochs):
    out = tmp_path / "stopped"
    assert train.main(volume_run(tiny_llm, out, "--epochs", "2", "--stop-after-epoch", "1")) == 0
    assert train.main(["--resume", str(out)]) == 0
    assert_same_metrics(out, two_volume_epochs)
    assert_same_tensors(out / "last.safetensors", two_volume_epochs / "last.safetensors")
    import eval as ev

    assert ev.main([str(out), "--split", "test", "--workers", "0", "--device", "cpu", "--samples", "2"]) == 0
    report = json.loads((out / "eval-test" / "metrics.json").read_text())
    assert report["images"] == 2 and report["conventions"]["distance_unit"] == "mm"
    assert all(0 <= report["metrics"][name]["mean"] <= 1 for name in ("iou", "dice", "sensitivity", "specificity", "nsd"))


def test_explicit_flags_win_over_the_recipe():
    from llm4seg.settings import parse_args

    args = parse_args(["--recipe", "medvisionllama", "--lr", "0.1", "--epochs", "3", "--llm", "none",
                       "--data", "synthetic3d", "--backbone", "vit"])
    assert (args.optimizer, args.lr, args.epochs, args.batch_size, args.mapper_lora_rank, args.img_size) == \
        ("adam", 0.1, 3, 4, 0, 128)  # a plain ViT has no mappers; volumes default to 128^3
    default = parse_args([])
    assert (default.optimizer, default.lr, default.epochs, default.batch_size, default.schedule, default.img_size) == \
        ("sgd", 0.01, 300, 8, "poly", 256)


def test_the_vit_trains_on_2d_images_too(tiny_llm, tmp_path):
    out = tmp_path / "vit2d"
    assert train.main(small_run(tiny_llm, out, "--epochs", "1", "--backbone", "vit", "--img-size", "32",
                                "--patch-size", "8", "--depth", "1", "--embed-dim", "16")) == 0
    model = json.loads((out / "config.json").read_text())["model"]
    assert (model["spatial_dims"], model["in_channels"], model["img_size"], model["residual"]) == (2, 3, 32, True)
    assert math.isfinite(metrics(out)[0]["val_iou"])


def test_dice_ce_loss_equals_monais_dice_ce_loss_and_its_gradient():
    """MONAI's DiceCELoss(to_onehot_y=True, softmax=True), the loss of UNETR and 3D UX-Net on BTCV (test-only
    reference), on random logits of 4 classes over a (2, 4, 6, 5, 7) batch: values and gradients agree to
    float32 rounding."""
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 5, 7, requires_grad=True)
    labels = torch.randint(0, 4, (2, 1, 6, 5, 7))
    ours = losses.dice_ce_loss(logits, labels)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(logits, labels)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_grad, expected_grad, rtol=0, atol=1e-7)
    assert Task(4, 3, ("background", "a", "b", "c")).loss(logits, labels, 0.5) == ours  # the multi-class loss


# --- LLM4Seg in 3D: a MedNeXt on multi-class synthetic organs -------------------------------------
# 32^3 volumes cut into 32^3 crops (4 a volume; sliding windows of 32 validate whole volumes), the tiny
# MedNeXt row, the tiny Llama layer on its 2^3 bottleneck tokens; 3 train volumes (12 crops) / 2 val.


def organs_run(tiny_llm: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", "synthetic-organs", "--synthetic-size", "6", "--img-size", "32", "--roi-size", "32",
            "--backbone", "mednext-tiny", "--llm", str(tiny_llm), "--layer", "2", "--recipe", "llm4seg3d",
            "--val-every", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--precision", "fp32",
            "--out", str(out), *extra]


@pytest.fixture(scope="session")
def two_organ_epochs(tiny_llm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "organs"
    reference_run(organs_run(tiny_llm, out, "--epochs", "2"))
    return out


def test_llm4seg3d_trains_a_multiclass_mednext_with_adamw_and_dice_ce(two_organ_epochs):
    config = json.loads((two_organ_epochs / "config.json").read_text())
    assert (config["model"]["backbone"], config["model"]["num_classes"], config["model"]["spatial_dims"]) == \
        ("mednext-tiny", 6, 3)
    assert (config["train"]["optimizer"], config["train"]["lr"], config["train"]["weight_decay"]) == ("adamw", 1e-4, 1e-5)
    lines = metrics(two_organ_epochs)
    assert [line["global_step"] for line in lines] == [3, 6]  # 12 crops in batches of 4
    assert all(0 <= line["val_dice"] <= 1 and set(line) >= {"val_dice", "val_iou"} for line in lines)
    assert any(key.endswith(".exp_avg_sq") for key in load_file(two_organ_epochs / "last.safetensors"))


def test_a_multiclass_run_stopped_and_resumed_equals_the_uninterrupted_one(tiny_llm, tmp_path, two_organ_epochs):
    """The crops and their flips, turns and shifts are drawn from (seed, epoch, index): the resumed run
    cuts the same patches."""
    out = tmp_path / "stopped"
    assert train.main(organs_run(tiny_llm, out, "--epochs", "2", "--stop-after-epoch", "1")) == 0
    assert train.main(["--resume", str(out)]) == 0
    assert_same_metrics(out, two_organ_epochs)
    assert_same_tensors(out / "last.safetensors", two_organ_epochs / "last.safetensors")


def test_a_multiclass_run_is_evaluated_per_organ(two_organ_epochs, capsys):
    import eval as ev

    assert ev.main([str(two_organ_epochs), "--workers", "0", "--device", "cpu", "--samples", "2"]) == 0
    report = json.loads((two_organ_epochs / "eval-val" / "metrics.json").read_text())
    organs = report["classes"][1:]
    assert report["classes"][0] == "background" and len(organs) == 5
    assert set(report["per_class"]) == set(organs)
    assert all(set(scores) == {"dice", "iou", "hd95", "nsd"} for scores in report["per_class"].values())
    scored = [scores["dice"] for scores in report["per_class"].values() if not math.isnan(scores["dice"])]
    assert report["dice"] == pytest.approx(sum(scored) / len(scored))  # the mean over the organs: Table 2's number
    header = (two_organ_epochs / "eval-val" / "per_image.csv").read_text().splitlines()[0].split(",")
    assert {f"dice/{organ}" for organ in organs} <= set(header)
    assert len(list((two_organ_epochs / "eval-val" / "samples").glob("*.png"))) == 2
    printed = capsys.readouterr().out
    assert all(organ in printed for organ in organs) and "mean over the foreground" in printed


@pytest.mark.parametrize("flags, message", [
    (["--backbone", "cmunext"], "--data synthetic-organs holds 3D volumes; the cmunext backbone is 2D: use --backbone mednext, "),
    (["--roi-size", "40"], "--roi-size: got 40x40x40"),
    # a one-voxel bottleneck that MedNeXt's GroupNorm cannot normalise (issue 31, items 6 and 21)
    (["--roi-size", "16"], "--roi-size: got 16; the mednext-tiny bottleneck would be 1 voxel wide, and its instance / "
                           "group norms need more than one value per channel: expected 32 or more"),
    (["--roi-size", "16", "--backbone", "uxnet3d"], "--roi-size: got 16; the uxnet3d bottleneck would be 1 voxel wide"),
    # a step that no memory holds: refused with its estimate before any work (issue 31, item 21)
    (["--roi-size", "512", "--img-size", "512"], "--roi-size 512: one training step of mednext-tiny on batches of 4 "
                                                 "needs about 1,"),
    # what a machine with 1 GiB free is told of 64^3 crops (the suite's machines have more)
    (["--roi-size", "64"], "--roi-size 64: one training step of mednext-tiny on batches of 4 needs about 2.0 GB (2.0 GB "
                           "of activations), and cpu has 1.1 GB free: use a smaller --roi-size or --batch-size"),
    (["--multiclass"], "--data synthetic-organs: multiclass applies to msd (every label value its class); "
                       "synthetic-organs is multi-class already"),
])
def test_bad_3d_flags_exit_2_with_one_line(tiny_llm, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(settings, "free_memory", lambda device: 2**30)
    assert train.main(organs_run(tiny_llm, tmp_path / "never", "--epochs", "1", *flags)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_3d_backbone_on_2d_images_is_refused(tiny_llm, tmp_path, capsys):
    assert train.main(small_run(tiny_llm, tmp_path / "never", "--backbone", "uxnet3d")) == 2
    assert "--data synthetic holds 2D images; the uxnet3d backbone is 3D: use --backbone unet, cmunext, nnunet, vit" in capsys.readouterr().err


def test_the_2d_bottleneck_analysis_is_refused_for_a_3d_run_in_one_line(two_organ_epochs, capsys):
    import eval as ev

    assert ev.main([str(two_organ_epochs), "--analyze", "--workers", "0", "--device", "cpu"]) == 2
    assert "it draws a 2D CNN's bottleneck maps (Fig. 2), and this run is a 3D mednext-tiny" in capsys.readouterr().err


def test_test_fraction_holds_out_a_test_split_of_ones_own_data(tmp_path, capsys):
    """--data folder has no test split by default; --test-fraction 0.2 makes one that eval.py --split test reads."""
    import numpy as np

    import eval as ev
    from dataset_trees import box_mask, write_case

    root, rng = tmp_path / "data", np.random.default_rng(0)
    for i in range(10):
        write_case(root / "images" / f"case{i}.png", [root / "masks" / f"case{i}.png"], [box_mask(32, 32, rng)])
    out = tmp_path / "run"
    assert train.main(["--data", "folder", "--data-dir", str(root), "--test-fraction", "0.2", "--img-size", "32",
                       "--backbone", "vit", "--patch-size", "8", "--embed-dim", "16", "--depth", "1", "--mode", "none",
                       "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    assert "folder train: 5 cases" in capsys.readouterr().out  # 10 - ceil(0.3 * 10) val - ceil(0.2 * 10) test
    assert ev.main([str(out), "--split", "test", "--workers", "0", "--device", "cpu"]) == 0
    assert json.loads((out / "eval-test" / "metrics.json").read_text())["images"] == 2


def test_split_file_gives_the_split_on_the_command_line(tmp_path, capsys):
    """--split-file: the errors that suggest a split of one's own now name a flag that exists (issue 31, item 12);
    the run trains and evaluates on exactly the lists it gives."""
    import numpy as np

    import eval as ev
    from dataset_trees import box_mask, write_case

    root, rng = tmp_path / "data", np.random.default_rng(0)
    for i in range(6):
        write_case(root / "images" / f"case{i}.png", [root / "masks" / f"case{i}.png"], [box_mask(32, 32, rng)])
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["case0", "case1", "case2"], "val": ["case3"], "test": ["case4", "case5"]}))
    out = tmp_path / "run"
    assert train.main(["--data", "folder", "--data-dir", str(root), "--split-file", str(split), "--img-size", "32",
                       "--backbone", "vit", "--patch-size", "8", "--embed-dim", "16", "--depth", "1", "--mode", "none",
                       "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    assert "folder train: 3 cases" in capsys.readouterr().out
    assert ev.main([str(out), "--split", "test", "--workers", "0", "--device", "cpu"]) == 0
    rows = (out / "eval-test" / "per_image.csv").read_text().splitlines()[1:]
    assert sorted(row.split(",")[0] for row in rows) == ["case4", "case5"]


def test_init_from_starts_a_new_run_from_another_runs_best_weights(tiny_llm, tmp_path, three_epochs, capsys):
    from llm4seg.checkpoints import read_checkpoint
    from llm4seg.settings import build_or_rebuild_model, parse_args

    args = parse_args(small_run(tiny_llm, tmp_path / "finetune", "--init-from", str(three_epochs)))
    net = build_or_rebuild_model(args)
    best, _ = read_checkpoint(three_epochs / "best.safetensors")
    state = net.state_dict()
    assert all(torch.equal(state[key.removeprefix("model.")], value) for key, value in best.items())
    assert "weights from" in capsys.readouterr().out

    assert train.main(small_run(tiny_llm, tmp_path / "other", "--init-from", str(three_epochs), "--backbone", "unet")) == 2
    assert "its model has backbone 'cmunext', this run's 'unet'; expected the same model" in capsys.readouterr().err
    assert train.main(small_run(tiny_llm, tmp_path / "nothing", "--init-from", str(tmp_path / "nowhere"))) == 2
    assert "expected a run directory with a best checkpoint" in capsys.readouterr().err


def test_a_run_started_from_another_and_killed_before_its_first_last_restarts_from_those_weights(
        tiny_llm, tmp_path, three_epochs, monkeypatch):
    from llm4seg.checkpoints import read_checkpoint
    from llm4seg.runtime import Processes

    out = tmp_path / "finetune"
    monkeypatch.setattr(train, "train", lambda run, stop: 137)  # killed in its first epoch: config.json, no last
    assert train.main(small_run(tiny_llm, out, "--init-from", str(three_epochs))) == 137
    assert (out / "config.json").is_file() and not (out / "last.safetensors").exists()
    with contextlib.ExitStack() as held:
        run = train.setup(["--resume", str(out)], Processes(), held)
    best, _ = read_checkpoint(three_epochs / "best.safetensors")
    state = run.net.state_dict()
    assert all(torch.equal(state[key.removeprefix("model.")], value) for key, value in best.items())


def test_a_new_run_in_a_folder_an_abandoned_attempt_left_keeps_none_of_its_files(tiny_llm, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_iou": 0.99}) + "\n")
    (out / "best.safetensors").write_bytes(b"the abandoned attempt's best")
    assert train.main(small_run(tiny_llm, out, "--epochs", "1", "--backbone", "vit", "--img-size", "32",
                                "--patch-size", "8", "--depth", "1", "--embed-dim", "16", "--mode", "none")) == 0
    assert [line["epoch"] for line in metrics(out)] == [1] and metrics(out)[0]["val_iou"] != 0.99
    assert checkpoint_info(out, "best")["epoch"] == 1


def test_a_second_train_py_into_a_run_directory_in_use_is_refused_in_one_line(tiny_llm, tmp_path, capsys):
    """Two train.py into one --out both finished and printed "done", one's checkpoints silently replaced by the
    other's (issue 31, item 14). The directory's lock held (here by this process, as the first train.py would),
    a second run and a resume are refused naming the holder's pid, and nothing in the folder changes."""
    from llm4seg.checkpoints import run_dir_lock

    out = tmp_path / "run"
    with run_dir_lock(out):
        before = sorted(p.name for p in out.iterdir())
        assert train.main(small_run(tiny_llm, out, "--epochs", "1")) == 2
        err = capsys.readouterr().err
        assert err == f"error: {out} is in use by another train.py (pid {os.getpid()}): wait for it to end, or " \
                      "pick another --out\n"
        assert sorted(p.name for p in out.iterdir()) == before
    assert train.main(small_run(tiny_llm, out, "--epochs", "1")) == 0  # released: the run goes ahead
    with run_dir_lock(out):
        assert train.main(["--resume", str(out)]) == 2
    assert "is in use by another train.py" in capsys.readouterr().err


def test_a_lock_left_by_a_killed_train_py_is_taken_over(tiny_llm, tmp_path):
    """The lock is the kernel's: a process killed with -9 while holding it leaves the file, not the lock."""
    import multiprocessing

    from llm4seg.checkpoints import run_dir_lock

    out = tmp_path / "run"

    def hold_and_die():
        with run_dir_lock(out):
            os.kill(os.getpid(), signal.SIGKILL)
    child = multiprocessing.get_context("fork").Process(target=hold_and_die)
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL and (out / ".lock").read_text().strip() == str(child.pid)
    assert train.main(small_run(tiny_llm, out, "--epochs", "1")) == 0


def test_the_layer_and_the_data_are_reported_together(tmp_path, capsys):
    """No such LLM and no data: both problems in one line, not the second only after the first is fixed
    (issue 31, item 12)."""
    assert train.main(["--data", "folder", "--data-dir", str(tmp_path / "absent"), "--llm", "tiny-org/no-such-model",
                       "--layer", "1", "--img-size", "32", "--epochs", "1", "--workers", "0", "--device", "cpu",
                       "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tiny-org/no-such-model" in err and str(tmp_path / "absent") in err, err
    assert not (tmp_path / "run").exists()


def test_the_memory_check_asks_cuda_and_halves_the_activations_under_bf16(monkeypatch):
    """settings.check_step_fits on a GPU, its driver faked: 4 x 64^3 MedNeXt-tiny crops keep ~2.0 GB in float32,
    about half under bf16 autocast; with 1.5 GB free the first is refused in one line, the second fits."""
    from llm4seg.run_config import RunConfig

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(1.5e9), int(80e9)))
    net = build_model("mednext-tiny", None, mode="none", num_classes=6)
    config = RunConfig(data="synthetic-organs", backbone="mednext-tiny", roi_size=64, batch_size=4)
    cuda = torch.device("cuda", 0)
    settings.check_step_fits(net, config, cuda, torch.bfloat16)
    with pytest.raises(ValueError, match=r"^--roi-size 64: one training step of mednext-tiny on batches of 4 needs "
                                         r"about 2\.0 GB \(2\.0 GB of activations\), and cuda:0 has 1\.5 GB free"):
        settings.check_step_fits(net, config, cuda, torch.float32)
