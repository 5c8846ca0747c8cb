"""A training run's life, which train.py drives: its setup (settings, checks, model, data, the run directory),
the recipe's pieces (learning rate, validation), the epoch's log, the `last` checkpoint and the collectives
every rank must take together.

The default recipe (--recipe llm4seg) is LLM4Seg's (its CMUNeXt code base), every default below;
--recipe medvisionllama swaps in Adam 2e-3 at a constant lr, batch 4, 200 epochs, BCE + Dice (w = 1)
and LoRA rank 8 on the mappers; --recipe llm4seg3d AdamW 1e-4 (weight decay 1e-5), 4 crops of 96^3 a step,
1,667 epochs validated every 21 (40,000 iterations and every 500 on BTCV) (settings.RECIPES). A dataset of
several classes (btcv, synthetic-organs, msd --multiclass, folder --multiclass) trains K logits with
dice_ce_loss (CE + 1 - soft Dice over softmax, MONAI's DiceCELoss) and validates by the mean IoU / Dice over
the classes (volumes of a patch-trained run by sliding windows of --roi-size). Flags given explicitly win
over any recipe. LLM4Seg's:
    loss   = w * BCEWithLogits(z, g) + (1 - mean_b Dice_b),  w = 0.5
             Dice_b = (2 sum(sigmoid(z_b) g_b) + 1e-5) / (sum sigmoid(z_b) + sum g_b + 1e-5)
    SGD(lr 0.01, momentum 0.9, weight decay 1e-4) over the trainable tensors only,
    lr(it) = lr * (1 - it / max_it) ** 0.9 per iteration, max_it = epochs * iterations per epoch,
    300 epochs, batch 8, 256 x 256, seed 41; after each epoch the validation metrics of metrics.py
    (per image, then averaged over images) and the best checkpoint by validation IoU.
--precision auto computes in bf16 (autocast, frozen layer stored in bf16) where the device does
bf16 natively (CUDA, CPUs with AMX / AVX-512 BF16) and in float32 elsewhere; loss, metrics and
optimizer state are float32 always.

Run directory (--out, default runs/<data>_<backbone>_<llm>-L<layer>-<mode>_seed<seed>):
    config.json        the resolved settings, the model config build_model needs and the LLM layer's
                       source and commit (a frozen layer is not in any checkpoint; it is fetched again)
    metrics.jsonl      one line per epoch: train loss, images/s, lr, validation metrics
    curves.png         train loss, validation IoU / Dice and lr against the epoch, redrawn after each
                       epoch (at most every 30 s) and after the last
    last.safetensors   model state_dict ("model.*"), the optimizer's state ("optimizer.*"), and in its
                       metadata epoch, step, best IoU, optimizer settings, every rank's RNG states
    best.safetensors   model state_dict at the best validation IoU, with its epoch and metrics
Every file is written to a temporary name, fsync'd and renamed into place, a checkpoint as one file,
so a kill -9 at any instant loses at most the epoch in progress (README, "What survives what").
Ctrl-C (or SIGTERM) stops after the current optimizer step, saves `last` mid-epoch and exits with
130 (143 for SIGTERM); a second Ctrl-C stops at once, except during a save, which it lets finish.
--resume continues from `last` exactly, with any --workers: the data order is a function of (seed,
epoch), each sample's augmentation of (seed, epoch, index), the RNG states are restored, and the lr
schedule continues from the saved step; a run killed before its first `last` starts again from the
beginning. Every flag is checked, and every image, mask or volume opened once, before the first step.
A non-finite loss stops the run with exit code 1 and leaves the last good checkpoint as it was; so
does a full disk, which leaves the previous checkpoint intact.

Under torchrun, each process trains with --batch-size images on its share of the data
(DistributedSampler, DistributedDataParallel, gloo on CPU and nccl on CUDA): the global batch is
world_size * batch_size. Rank 0 validates on the whole validation set, prints and writes files.
"""
import contextlib
import io
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .checkpoints import (has_checkpoint, keep_metrics_up_to, load_checkpoint, load_weights_of_run, read_run_config,
                          remove_stale_temporaries, rng_state, run_dir_lock, save_checkpoint, set_rng_state,
                          write_run_config)
from .cli import USER_ERRORS
from .data import EpochItems, EpochOrder, check_cases, load_dataset
from .files import write_atomically
from .metrics import evaluate_cases, mean_and_std
from .model import count_params, set_frozen_dtype
from .pictures import curves_png
from .runtime import (Processes, StopRequests, compile_mode, ignore_stop_signals, max_over_ranks, memory_format,
                      rank_zero_first, resolve_device, resolve_precision, set_cpu_threads, sum_over_ranks)
from .run_config import RunConfig
from .settings import (build_or_rebuild_model, check_args, check_no_run_in, check_step_fits, default_run_dir,
                       make_optimizer, parse_args)
from .task import Task

POLY_POWER = 0.9
CURVES_EVERY_S = 30


@dataclass
class Progress:
    """Where training stands; saved in last.safetensors' metadata."""
    epochs_done: int = 0         # trained and validated
    batches_done: int = 0        # of epoch epochs_done + 1, when stopped mid-epoch
    global_step: int = 0         # optimizer steps so far: the poly schedule's `it`
    epoch_loss_sum: float = 0.0  # over those batches_done batches, so the epoch's mean stays exact
    best_iou: float = -1.0
    best_epoch: int = 0


@dataclass
class Run:
    args: RunConfig
    processes: Processes
    device: torch.device
    precision: torch.dtype        # the compute dtype: bf16 (autocast) or float32
    net: torch.nn.Module          # the model itself, for checkpoints and validation
    model: torch.nn.Module        # net, or its DistributedDataParallel wrapper, for training
    optimizer: torch.optim.Optimizer
    sampler: DistributedSampler
    train_set: torch.utils.data.Dataset
    val_loader: DataLoader
    train_loader: DataLoader      # train_set by (index, epoch) keys (EpochOrder); workers live across epochs
    progress: Progress
    run_dir: Path
    max_steps: int
    task: Task                    # binary or multi-class, images or volumes, sliding windows: asked, not tested
    compile_mode: str | None = None          # torch.compile's mode of `model`, None when eager
    compile_seconds: float | None = None     # the first compiled step, compilation included
    curves_drawn_at: float = -math.inf       # time.monotonic() of the last curves.png


def setup(argv: list[str] | None, processes: Processes, held: contextlib.ExitStack) -> Run:
    """Settings, checks, process group, model, data, the run directory (locked for as long as `held` lasts);
    resumes `last` if asked."""
    args = parse_args(argv)
    args.out = args.out or default_run_dir(args)
    check_args(args)
    device = resolve_device(args.device, processes)
    set_cpu_threads(args.workers, processes)
    precision = resolve_precision(args.precision, device)
    if processes.distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    run_dir = Path(args.out)

    # Same seeds on every rank give the same initial weights (DDP also copies rank 0's); the
    # augmentations are then drawn per rank.
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    with rank_zero_first(processes):
        net, train_set, val_set = model_and_data(args, device, precision)
    torch.manual_seed(args.seed + processes.rank)

    set_frozen_dtype(net, precision).to(device, memory_format=memory_format(device, net.config.spatial_dims))
    optimizer = make_optimizer(args, [p for p in net.parameters() if p.requires_grad])
    model = net
    if processes.distributed:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    mode = compile_mode(args.compile, device, processes)
    if mode is not None:
        # dynamic=False: one graph per batch shape (the full batches, an epoch's last), each compiled once.
        model = torch.compile(model, mode=mode, dynamic=False)
    # The data order of an epoch depends on (seed, epoch) only: set_epoch reshuffles reproducibly.
    sampler = DistributedSampler(train_set, num_replicas=processes.world_size, rank=processes.rank,
                                 shuffle=True, seed=args.seed)
    iterations = math.ceil(len(sampler) / args.batch_size)
    task = Task.of(args, net.config.num_classes, net.config.spatial_dims)
    # Trained on crops, validated by sliding windows over whole volumes of differing shapes: one a batch.
    val_loader = DataLoader(val_set, batch_size=1 if task.roi_size else args.batch_size, num_workers=args.workers,
                            persistent_workers=args.workers > 0, worker_init_fn=ignore_stop_signals,
                            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(args.seed))
    # Workers live across epochs, so each index carries its epoch (EpochOrder) and the augmentation, drawn from
    # (seed, epoch, index), stays what it was; 2D items come as uint8, normalised on the device (normalize_batch).
    train_loader = DataLoader(EpochItems(train_set), batch_size=args.batch_size, sampler=EpochOrder(sampler),
                              num_workers=args.workers, persistent_workers=args.workers > 0,
                              pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
                              # worker seeds from (seed, rank), not from the global RNG (the augmentation does
                              # not depend on them)
                              generator=torch.Generator().manual_seed(args.seed * 1_009 + processes.rank))
    run = Run(args, processes, device, precision, net, model, optimizer, sampler, train_set, val_loader, train_loader,
              Progress(), run_dir, max_steps=args.epochs * iterations, task=task, compile_mode=mode)
    if processes.local_rank == 0:  # before the first write; a start refused earlier leaves no folder behind
        held.enter_context(run_dir_lock(run_dir))
    start_in_run_dir(run, len(val_set), iterations)
    print_settings(run, len(val_set), iterations)
    return run


def model_and_data(args: RunConfig, device: torch.device,
                   precision: torch.dtype) -> tuple[torch.nn.Module, Dataset, Dataset]:
    """The model (its step checked against the device's free memory) and the train / val splits, every file of
    them opened once (check_cases), not found broken an epoch in. The layer (the Hub) and the data fail
    independently: a fresh offline machine hears of both at once."""
    net, problems = None, []
    try:
        net = build_or_rebuild_model(args)
        check_step_fits(net, args, device, precision)
    except USER_ERRORS as error:
        problems.append(error)
    try:  # after a failed layer only for its own problems: quietly, as no work starts
        with contextlib.redirect_stdout(io.StringIO()) if problems else contextlib.nullcontext():
            train_set, val_set = (load_dataset(args.data, args.data_dir, split, args.img_size, args.seed,
                                               **args.data_options()) for split in ("train", "val"))
    except USER_ERRORS as error:
        problems.append(error)
    if len(problems) > 1:
        raise ValueError("; and ".join(str(problem) for problem in problems))
    if problems:
        raise problems[0]
    check_cases(train_set, val_set)
    return net, train_set, val_set


def start_in_run_dir(run: Run, val_cases: int, iterations: int) -> None:
    """The run directory before the first step: a killed writer's temporaries removed; resumed from `last`,
    or started again from the beginning (with an --init-from run's weights), or a new run's config written."""
    args, processes, run_dir = run.args, run.processes, run.run_dir
    if processes.main and run_dir.is_dir():
        for temporary in remove_stale_temporaries(run_dir):
            print(f"removed {temporary.name}, a file a killed process was writing")
    if args.resume and has_checkpoint(run_dir, "last"):
        resume_from_last(run)
    elif args.resume:
        print(f"{run_dir} has no `last` checkpoint yet (stopped before its first epoch ended): starting it "
              f"again from the beginning, with its saved settings")
        init_from = read_run_config(run_dir)["train"].get("init_from")
        if init_from:  # the saved start: the weights of the run it was started from
            load_weights_of_run(run.net, init_from)
        if processes.main:
            keep_metrics_up_to(run_dir / "metrics.jsonl", 0)
    elif processes.main:
        check_no_run_in(run_dir)  # again, under the lock: a run may have ended there while this one loaded
        # A folder an earlier attempt left without a `last` (check_out_dir let it through): its log lines and
        # best checkpoint belong to that attempt.
        keep_metrics_up_to(run_dir / "metrics.jsonl", 0)
        (run_dir / "best.safetensors").unlink(missing_ok=True)
        write_run_config(run_dir, asdict(args), run.net, processes.world_size, len(run.train_set), val_cases,
                         iterations)


def resume_from_last(run: Run) -> None:
    """Weights, momentum, progress and this rank's RNG states from `last`."""
    info = load_checkpoint(run.run_dir, "last", run.net, run.optimizer)
    if info["world_size"] != run.processes.world_size:
        raise ValueError(f"{run.run_dir} was trained by {info['world_size']} processes, got "
                         f"{run.processes.world_size}: expected the same number to continue exactly")
    run.progress = Progress(**info["progress"])
    set_rng_state(info["rng"][run.processes.rank])
    if run.processes.main:
        keep_metrics_up_to(run.run_dir / "metrics.jsonl", run.progress.epochs_done)


def print_settings(run: Run, val_images: int, iterations: int) -> None:
    args, net, processes = run.args, run.net, run.processes
    layer = net.bridge.layer.config if net.bridge is not None else None
    trainable_count, frozen_count = count_params(net)
    print("settings:", json.dumps(asdict(args)))
    print(f"model: {args.backbone}, {trainable_count:,} trainable / {frozen_count:,} frozen parameters")
    if layer:
        print(f"LLM layer: {layer.source} @ {layer.commit or 'local files'}, model.layers.{layer.index} "
              f"= the paper's layer {layer.layer} of {layer.num_hidden_layers}, mode {net.config.mode}, "
              f"hidden {layer.hidden_size}, {net.bridge.layer.input_layernorm.weight.dtype}")
    backend = f" ({dist.get_backend()})" if processes.distributed else ""
    compiled = f", torch.compile {run.compile_mode}" if run.compile_mode else ""
    print(f"device: {run.device} ({'bf16 autocast' if run.precision == torch.bfloat16 else 'float32'}{compiled}), "
          f"{processes.world_size} process(es){backend}, "
          f"global batch {processes.world_size * args.batch_size} = {processes.world_size} x {args.batch_size}")
    print(f"data: {args.data}, {len(run.train_set)} train / {val_images} val images at {args.img_size}px, "
          f"{iterations} iterations per epoch, run dir {run.run_dir}")
    if args.resume and run.progress.global_step:
        progress = run.progress
        print(f"resuming after epoch {progress.epochs_done}"
              f"{f' + {progress.batches_done} batches' if progress.batches_done else ''}, step {progress.global_step}")


# ----------------------------------------------------------------------------------------------
# The recipe, the log and the checkpoint of an epoch

def learning_rate(args: RunConfig, step: int, max_steps: int) -> float:
    """The lr of optimizer step `step` (0-based): constant, or poly-decayed per iteration."""
    if args.schedule == "constant":
        return args.lr
    return args.lr * (1 - step / max_steps) ** POLY_POWER


def validate(run: Run) -> dict[str, float]:
    """The paper's per-image metrics averaged over every validation image; multi-class: mean IoU and Dice over
    the organs (metrics.class_metrics), whole volumes through sliding windows of the training crops' size."""
    rows, _ = evaluate_cases(run.task, run.net, run.val_loader, run.device, run.precision, surface=False)
    return {name: mean_and_std(rows, name)["mean"] for name in run.task.validation_metrics}


def log_epoch(run: Run, epoch: int, train_loss: float, images_per_second: float, metrics: dict) -> None:
    """One line of metrics.jsonl, the curves redrawn from all of them, and one printed line."""
    args, progress = run.args, run.progress
    line = {"epoch": epoch, "global_step": progress.global_step,
            "lr": learning_rate(args, progress.global_step - 1, run.max_steps),  # of the epoch's last step
            "train_loss": train_loss, "images_per_second": images_per_second,
            "batch_images": args.batch_size * run.processes.world_size,
            **{f"val_{name}": value for name, value in metrics.items()},  # none between validations
            "best_iou": progress.best_iou, "best_epoch": progress.best_epoch}
    # Rewritten whole (a few kB), never appended: a kill mid-write cannot leave half a line. Before
    # `last`: a resume drops the lines past it (keep_metrics_up_to).
    metrics_file = run.run_dir / "metrics.jsonl"
    logged = metrics_file.read_text() if metrics_file.is_file() else ""
    write_atomically(metrics_file, lambda tmp: tmp.write_text(logged + json.dumps(line) + "\n"))
    # Drawing takes ~0.5 s: for epochs of seconds, redraw at most every CURVES_EVERY_S, and after the last.
    if epoch == args.epochs or time.monotonic() - run.curves_drawn_at >= CURVES_EVERY_S:
        epochs = [json.loads(text) for text in metrics_file.read_text().splitlines()]
        write_atomically(run.run_dir / "curves.png", lambda path: curves_png(epochs, path))
        run.curves_drawn_at = time.monotonic()
    validated = " | val " + " ".join(f"{name} {value:.4f}" for name, value in metrics.items()) if metrics else ""
    best = f" | best iou {progress.best_iou:.4f} (epoch {progress.best_epoch})" if progress.best_epoch else ""
    print(f"epoch {epoch}/{args.epochs} | loss {train_loss:.4f} | {images_per_second:.1f} img/s"
          f" | lr {line['lr']:.2e}{validated}{best}", flush=True)


def step_flags_over_ranks(run: Run, loss: torch.Tensor, stop: StopRequests) -> tuple[float, float]:
    """(any rank's loss non-finite, any rank asked to stop): every rank must take the same branch,
    or the others wait forever in the next collective."""
    flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                         torch.tensor(float(stop.signal > 0), device=run.device)])
    non_finite, stopping = max_over_ranks(flags, run.processes).tolist()
    return non_finite, stopping


def mean_loss_over_ranks(run: Run) -> float:
    """The epoch's mean training loss over every rank's batches."""
    epoch_loss = torch.tensor([run.progress.epoch_loss_sum, run.progress.batches_done], dtype=torch.float64,
                              device=run.device)  # NCCL reduces CUDA tensors only
    total, batches = sum_over_ranks(epoch_loss, run.processes).tolist()
    return total / batches


def save_last(run: Run) -> None:
    """last.* with every rank's RNG state (gathered, since only rank 0 writes)."""
    rngs = [rng_state()]
    if run.processes.distributed:
        rngs = [None] * run.processes.world_size
        dist.all_gather_object(rngs, rng_state())
    if run.processes.main:
        info = {"global_step": run.progress.global_step, "progress": asdict(run.progress),
                "world_size": run.processes.world_size, "rng": rngs}
        save_checkpoint(run.run_dir, "last", run.net, info, run.optimizer)
