"""Train LLM4Seg (a CMUNeXt, U-Net or nnU-Net with one frozen LLM decoder layer at the bottleneck; in 3D a
MedNeXt or 3D UX-Net) or MedVisionLlama (a ViT with one after its patch embedding, on volumes).

    python train.py --data kvasir --llm llama3.2-1b --layer 15        # the paper's CMUNeXt + LLaMA row
    python train.py --data kvasir --llm none                          # the plain CMUNeXt baseline
    python train.py --data kvasir --mode random                       # ablation "+Transformer"
    python train.py --data synthetic --llm none --img-size 128 --epochs 5   # smoke test, no downloads
    python train.py --data btcv --data-dir data/btcv --backbone uxnet3d --recipe llm4seg3d   # the 3D column
    python train.py --data msd --data-dir data/Task09_Spleen --backbone vit --llm llama3.1-8b --layer 32 \
        --recipe medvisionllama                                       # MedVisionLlama on 128^3 volumes
    python train.py --resume runs/kvasir_cmunext_llama3.2-1b-L15-frozen_seed41
    torchrun --nproc_per_node=4 train.py --data kvasir --llm llama3.2-1b --layer 15

A step: logits = model(images); loss = task.loss(logits, masks) (binary: w BCE + 1 - Dice; several classes:
CE + 1 - Dice over softmax); backward; the optimizer steps the trainable tensors (the frozen layer has none) at
the recipe's lr. After each epoch (every --val-every): validation, `best` by validation IoU, `last`.
The flags and recipes: llm4seg/settings.py and `--help`; their defaults: llm4seg/run_config.py; the recipes'
math, the run directory, resuming, stopping and torchrun: llm4seg/training.py, which sets a run up.
"""
import contextlib
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from llm4seg.checkpoints import has_checkpoint, save_checkpoint
from llm4seg.cli import USER_ERROR_EXIT, USER_ERRORS, disk_error, user_error
from llm4seg.data import normalize_batch
from llm4seg.files import WriteError
from llm4seg.runtime import Processes, StopRequests, autocast, max_over_ranks, to_device
from llm4seg.training import (Run, learning_rate, log_epoch, mean_loss_over_ranks, save_last, setup,
                              step_flags_over_ranks, validate)


def train_one_epoch(run: Run, epoch: int, stop: StopRequests) -> tuple[int | None, float]:
    """The epoch's remaining optimizer steps -> (an exit code if the run must end now, images / s)."""
    args, progress, device = run.args, run.progress, run.device
    run.model.train()
    # The epoch's order from (seed, epoch), without what was trained before a resume; each index carries the
    # epoch its augmentation is drawn from.
    run.train_loader.sampler.start(epoch, skip=progress.batches_done * args.batch_size)
    bar = tqdm(total=math.ceil(len(run.sampler) / args.batch_size), initial=progress.batches_done,
               desc=f"epoch {epoch}/{args.epochs}", disable=None if run.processes.main else True,
               leave=False, dynamic_ncols=True)
    start, images = time.perf_counter(), 0
    with contextlib.closing(bar):
        for batch in run.train_loader:
            step_start = time.perf_counter()
            lr = learning_rate(args, progress.global_step, run.max_steps)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            if run.compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are not read again
            with autocast(device, run.precision):  # 2D items come as uint8: normalised on the device
                logits = run.model(normalize_batch(to_device(batch["image"], device)))
            loss = run.task.loss(logits.float(), batch["mask"].to(device, non_blocking=True), args.bce_weight)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            non_finite, stopping = step_flags_over_ranks(run, loss, stop)
            if non_finite:
                return non_finite_loss(run, epoch, lr), 0.0
            run.optimizer.step()
            loss_value = loss.item()
            progress.global_step += 1
            progress.batches_done += 1
            progress.epoch_loss_sum += loss_value
            images += len(logits) * run.processes.world_size
            if run.compile_mode and run.compile_seconds is None:
                run.compile_seconds = time.perf_counter() - step_start
                tqdm.write(f"torch.compile ({run.compile_mode}): the first step took {run.compile_seconds:.1f} s, "
                           f"compilation included; images/s are counted from the next step")
                start, images = time.perf_counter(), 0
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{images / max(time.perf_counter() - start, 1e-9):.1f}")
            if stopping:
                # A step boundary: the data of every batch comes from (seed, epoch, index), so only the
                # global RNG (dropout) must continue exactly; its state saved here is the next step's.
                bar.close()
                save_last(run)
                print(f"stopped in epoch {epoch} after {progress.batches_done} batches; saved "
                      f"{run.run_dir / 'last'}; continue with: python train.py --resume {run.run_dir}")
                return 128 + int(stop.signal or signal.SIGINT), 0.0
    return None, images / max(time.perf_counter() - start, 1e-9)


def non_finite_loss(run: Run, epoch: int, lr: float) -> int:
    """Say where the loss stopped being finite and what was kept; exit code 1 (every rank returns it)."""
    progress = run.progress
    if run.processes.main:
        kept = f"{run.run_dir / 'last'} is the last good checkpoint (epoch {progress.epochs_done})" \
            if has_checkpoint(run.run_dir, "last") else "no checkpoint was saved yet"
        print(f"error: non-finite loss at epoch {epoch}, step {progress.global_step} (lr {lr:.3g}); stopped "
              f"without saving: {kept}. Try a lower --lr.", file=sys.stderr)
    return 1


def end_of_epoch(run: Run, epoch: int, images_per_second: float) -> None:
    """Validate (every --val-every epochs and after the last), keep the best checkpoint, log the epoch's
    line (rank 0), save `last` (every rank's RNG)."""
    progress = run.progress
    epoch_loss = mean_loss_over_ranks(run)
    progress.epochs_done, progress.batches_done, progress.epoch_loss_sum = epoch, 0, 0.0
    if run.processes.main:
        validating = epoch % run.args.val_every == 0 or epoch == run.args.epochs
        metrics = validate(run) if validating else {}
        if validating and metrics["iou"] > progress.best_iou:
            progress.best_iou, progress.best_epoch = metrics["iou"], epoch
            save_checkpoint(run.run_dir, "best", run.net,
                            {"epoch": epoch, "global_step": progress.global_step, "val": metrics})
        log_epoch(run, epoch, epoch_loss, images_per_second, metrics)
    save_last(run)


def train(run: Run, stop: StopRequests) -> int:
    """Exit code: 0 done (or stopped by --stop-after-epoch), 1 non-finite loss, 128 + signal."""
    args = run.args
    for epoch in range(run.progress.epochs_done + 1, args.epochs + 1):
        code, images_per_second = train_one_epoch(run, epoch, stop)
        if code is not None:
            return code
        end_of_epoch(run, epoch, images_per_second)
        stopping = max_over_ranks(torch.tensor(stop.signal, device=run.device), run.processes).item()
        if stopping:
            print(f"stopped after epoch {epoch}; continue with: python train.py --resume {run.run_dir}")
            return 128 + int(stopping)
        if epoch == args.stop_after_epoch and epoch < args.epochs:
            print(f"stopped after epoch {epoch} as asked; continue with: python train.py --resume {run.run_dir}")
            return 0
    print(f"done: best val IoU {run.progress.best_iou:.4f} at epoch {run.progress.best_epoch}, in {run.run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 done, 1 non-finite loss or a checkpoint that could not be written, 2 bad settings or
    input files, 128 + signal when stopped by one."""
    processes = Processes.from_env()
    # Other ranks stay quiet (data and llm_layer print too); errors still reach stderr. `held`: the run
    # directory's lock, released when main returns.
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stdout if processes.main else devnull), \
            contextlib.ExitStack() as held:
        try:
            run = setup(argv, processes, held)
        except KeyboardInterrupt:  # nothing trained yet, so nothing to save
            print("interrupted before training started; run the same command again to start", file=sys.stderr)
            return 128 + signal.SIGINT
        except WriteError as error:
            return disk_error(error)
        except USER_ERRORS as error:
            # Every process meets the same bad setting: one line per machine is enough.
            return user_error(error) if processes.local_rank == 0 else USER_ERROR_EXIT
        try:
            with StopRequests() as stop:
                code = train(run, stop)  # every rank ends here together: its exits are collective decisions
            if processes.distributed:
                # gloo's threads must be idle when the group is torn down: tearing it down while the other
                # rank still finishes its last collective aborted 1 run in 8 ("terminate called ...").
                dist.barrier()
            return code
        except WriteError as error:  # the disk, not the run: exit 1, the previous checkpoint kept
            return disk_error(error)
        except USER_ERRORS as error:  # an input file that changed or broke during the run
            return user_error(error)
        except KeyboardInterrupt:  # a second Ctrl-C; never inside a save (runtime.signals_deferred)
            print(f"interrupted; the checkpoints in {run.run_dir} are whole: continue with "
                  f"python train.py --resume {run.run_dir}", file=sys.stderr)
            return 128 + signal.SIGINT
        finally:
            if processes.distributed:
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
