"""The settings of a training run: train.py's flags, the recipes, the --resume rules, the cheap checks, the run
directory's default name, and the model and optimizer the flags describe. A library module, so that train.py and
sweep.py (which spans a grid of these flags) read one definition. The flags fill a run_config.RunConfig, whose
field defaults are the flags' (each defined once, there); it is printed at start and saved in config.json.
"""
import argparse
import math
import os
from dataclasses import fields
from pathlib import Path

import torch

from .checkpoints import has_checkpoint, load_weights_of_run, read_run_config, rebuild_model
from .cli import add_runtime_flags, check_runtime_flags, one_line_error_parser
from .data import (DATASET_TABLE, DATASETS, RAW_DATASETS, check_data_options, input_channels,
                   num_classes, spatial_dims)
from .model import (BACKBONES, DOWNSAMPLING, FINAL_NORMS, MODES, VIT_OPTIONS, backbones_for, build_model,
                    count_activation_bytes)
from .run_config import DATA_DEFAULTS, RunConfig, run_config_defaults
from .runtime import free_memory

# --resume takes every setting from the run's config.json except these, which belong to one invocation,
PER_INVOCATION = ("resume", "out", "stop_after_epoch", "init_from")
# and these, which may be changed (a different --workers changes the augmentations when > 0).
CHANGEABLE_ON_RESUME = ("device", "workers", "compile")
# The two papers' training recipes; --recipe picks one, and a flag given explicitly wins over it.
# mapper_lora_rank applies to runs with an LLM layer (a plain backbone has no mappers).
RECIPES = {
    # LLM4Seg (its CMUNeXt code): SGD, poly decay, 0.5 BCE + Dice
    "llm4seg": dict(optimizer="sgd", lr=0.01, weight_decay=1e-4, batch_size=8, epochs=300, bce_weight=0.5,
                    schedule="poly", mapper_lora_rank=0),
    # MedVisionLlama (paper Sec. 4 and its public code): Adam 2e-3, batch 4, 200 epochs, Dice + BCE, no
    # schedule or weight decay named, loralib's LoRA rank 8 on the two mappers
    "medvisionllama": dict(optimizer="adam", lr=2e-3, weight_decay=0.0, batch_size=4, epochs=200, bce_weight=1.0,
                           schedule="constant", mapper_lora_rank=8),
    # LLM4Seg's 3D column (BTCV), as 3D UX-Net trains under UNETR's protocol: AdamW 1e-4, weight decay 1e-5,
    # 4 crops of 96^3 a step, 40,000 iterations = 1,667 epochs of BTCV's 24 volumes x 4 crops, validated every
    # 500 iterations (every 21 epochs); Dice + CE over softmax (bce_weight 1 gives the binary analogue)
    "llm4seg3d": dict(optimizer="adamw", lr=1e-4, weight_decay=1e-5, batch_size=4, epochs=1667, bce_weight=1.0,
                      schedule="constant", mapper_lora_rank=0, val_every=21),
}
OPTIMIZERS = ("sgd", "adam", "adamw")
# --img-size left None: LLM4Seg's 256 px images (load_dataset's default), MedVisionLlama's 128^3 volumes (its ViT's)
IMG_SIZES = {2: DATA_DEFAULTS["img_size"], 3: VIT_OPTIONS["img_size"]}



TRAIN_DESCRIPTION = """Train a segmentation network with one frozen, pre-trained LLM decoder layer inside: LLM4Seg
(a 2D CNN, or in 3D a MedNeXt or 3D UX-Net, with the layer at the bottleneck) or MedVisionLlama (a ViT
with it after the patch embedding). Writes a run directory (--out): config.json, metrics.jsonl,
curves.png, last / best checkpoints; evaluate it with eval.py.

  python train.py --data kvasir --llm llama3.2-1b --layer 15          # the paper's CMUNeXt + LLaMA row
  python train.py --data kvasir --llm none                            # the plain CMUNeXt baseline
  python train.py --data kvasir --mode random                         # ablation "+Transformer"
  python train.py --data folder --data-dir my_data --test-fraction 0.1
  python train.py --data synthetic --llm smollm2-135m-instruct --layer 28 --img-size 64 --epochs 5   # offline
  python train.py --data btcv --data-dir data/btcv --backbone uxnet3d --recipe llm4seg3d
  python train.py --data msd --data-dir data/Task09_Spleen --backbone vit --llm llama3.1-8b --layer 32 \\
      --recipe medvisionllama
  python train.py --resume RUN_DIR                                    # continue exactly where it stopped"""


def train_epilog() -> str:
    from .llm_layer import ALIASES

    aliases = "\n".join(f"  {alias:<24}{repo}" for alias, repo in ALIASES.items())
    return (f"--llm accepts an alias, a Hub repo id (meta-llama/Llama-3.2-1B: only the layer's bytes are\n"
            f"downloaded; gated repos need their licence accepted and `hf auth login` or HF_TOKEN), a local\n"
            f"model directory (config.json + *.safetensors, single or sharded), a .gguf file, or none.\n"
            f"Aliases:\n{aliases}\n"
            f"Data roots default to $LLM4SEG_DATA/<data> (or ./data/<data>); Kvasir-SEG downloads itself\n"
            f"(from $LLM4SEG_KVASIR_URL when set). Exit codes: 0 done, 1 non-finite loss or disk full,\n"
            f"2 bad settings or input files (one line; LLM4SEG_DEBUG=1 shows the traceback), 130 / 143 stopped\n"
            f"by Ctrl-C / SIGTERM (resumable).")


def make_parser() -> argparse.ArgumentParser:
    p = one_line_error_parser(TRAIN_DESCRIPTION, train_epilog())
    p.add_argument("--data", choices=DATASETS, help="dataset name")
    p.add_argument("--data-dir", help="dataset root; None means $LLM4SEG_DATA/<data>, or ./data/<data>")
    p.add_argument("--synthetic-size", type=int, help="cases of --data synthetic or synthetic3d")
    p.add_argument("--fold", type=int, help="0..4: cross-validation fold on the non-test cases")
    p.add_argument("--test-fraction", type=float,
                   help="of all cases, held out as the test split (eval.py --split test) for the datasets read "
                        "from files; None means the dataset's: 0.1 for kvasir and msd, 0 for the others")
    p.add_argument("--split-file", metavar="JSON",
                   help='the split, {"train": [case names], "val": [...], "test": [...]}: read when it exists, else '
                        "written there; None means a file beside the data (btcv: the official split)")
    p.add_argument("--label", type=int, help="msd: the label value that is foreground; None means every label > 0")
    p.add_argument("--multiclass", action="store_true",
                   help="msd: every label of dataset.json is its own class (softmax, Dice + CE) instead of one "
                        "foreground; folder: each mask is a label map (gray or palette PNG) whose values 0..K-1 are "
                        "the classes, K = 1 + the largest, named by a classes.json in --data-dir if there is one "
                        "(the data package's docstring); btcv and synthetic-organs are always multi-class, the other 2D "
                        "datasets binary")
    p.add_argument("--roi-size", type=int,
                   help="btcv, synthetic-organs: the side of the training crops and of the sliding windows that "
                        "evaluate whole volumes (a multiple of 16)")
    p.add_argument("--backbone", choices=sorted(BACKBONES),
                   help="a row of model.BACKBONES: " + ", ".join(
                       f"{name} ({' or '.join(f'{dims}D' for dims in sorted(row.spatial_dims))})"
                       for name, row in BACKBONES.items()) + "; vit is MedVisionLlama's ViT")
    p.add_argument("--llm",
                   help="alias (listed below), Hub repo id, local model directory or .gguf file; 'none' for the "
                        "plain backbone")
    p.add_argument("--layer", type=int, help="the paper's 1-based layer number")
    p.add_argument("--mode", choices=MODES,
                   help="frozen (paper), trainable ('(T)'), random ('+Transformer') or none (the plain backbone)")
    p.add_argument("--lora-rank", type=int, help="LoRA on q/v inside a frozen layer; 0 = off")
    p.add_argument("--mapper-lora-rank", type=int,
                   help="loralib's LoRA on the two mappers around the layer (MedVisionLlama: weights frozen, "
                        "bias and B A train); 0 = plain Linears; None means the recipe's")
    p.add_argument("--residual", action=argparse.BooleanOptionalAction,
                   help="the bridge computes h + layer(h); None means on for vit, off for the CNNs")
    p.add_argument("--final-norm", choices=FINAL_NORMS,
                   help="after the layer, the LLM's final RMSNorm: unit = weight 1 (MedVisionLlama's code), pretrained "
                        "= its model.norm.weight; None means unit for vit, none for the CNNs")
    p.add_argument("--patch-size", type=int, help="vit: patch side")
    p.add_argument("--embed-dim", type=int, help="vit: token width E")
    p.add_argument("--depth", type=int, help="vit: transformer blocks")
    p.add_argument("--heads", type=int, help="vit: attention heads")
    p.add_argument("--dropout", type=float, help="vit: dropout")
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="sets optimizer, lr, weight decay, batch size, epochs, loss and schedule as that paper; "
                        "flags given explicitly win")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="None means the recipe's")
    p.add_argument("--epochs", type=int, help="passes over the training set; None means the recipe's")
    p.add_argument("--lr", type=float, help="base learning rate; None means the recipe's")
    p.add_argument("--schedule", choices=("poly", "constant"),
                   help="lr per iteration: poly = lr (1 - it / max_it)^0.9; None means the recipe's")
    p.add_argument("--momentum", type=float, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, help="None means the recipe's")
    p.add_argument("--bce-weight", type=float,
                   help="loss = w BCE + (1 - Dice); None means the recipe's (0.5 LLM4Seg, 1 MedVisionLlama)")
    p.add_argument("--img-size", type=int,
                   help=f"sides; None means {IMG_SIZES[2]} (2D) or {IMG_SIZES[3]} (3D). CNNs need a multiple of "
                        f"{DOWNSAMPLING}, vit a multiple of --patch-size")
    p.add_argument("--val-every", type=int, metavar="N",
                   help="validate (and keep the best checkpoint) every N epochs and after the last; None means "
                        "the recipe's (1; 21 for llm4seg3d)")
    p.add_argument("--seed", type=int, help="weights, data split, data order and augmentation")
    add_runtime_flags(p)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the training step (CUDA graphs in one process); None means on CUDA only")
    p.add_argument("--out", help="run directory; None means runs/<name from the settings>")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--init-from", metavar="RUN_DIR",
                   help="start a new run from the weights of RUN_DIR's best checkpoint (fine-tuning, or training "
                        "longer with a new schedule); the model must be the same, the optimizer starts afresh")
    p.add_argument("--stop-after-epoch", type=int, metavar="N",
                   help="save and exit 0 after epoch N, resumable later (e.g. to fit a time slot)")
    # Every default is RunConfig's (run_config.py), batch size included (None: the recipe's).
    p.set_defaults(**run_config_defaults())
    return p


def command_line(argv: list[str] | None) -> RunConfig:
    """train.py's flags as given, the fields they leave None unresolved (resolve_defaults)."""
    return RunConfig(**vars(make_parser().parse_args(argv)))


def parse_args(argv: list[str] | None) -> RunConfig:
    """The command line, or with --resume the run's saved settings, where only the flags of
    CHANGEABLE_ON_RESUME may differ (and those of PER_INVOCATION come from the command line)."""
    given = command_line(argv)
    if given.resume is None:
        return resolve_defaults(given)
    run_dir = Path(given.resume)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"--resume {run_dir}: expected a run directory with config.json, found none")
    if given.out is not None and Path(given.out).resolve() != run_dir.resolve():
        raise ValueError(f"--resume {run_dir} writes into that run; got a different --out {given.out}")
    saved = RunConfig.from_saved(read_run_config(run_dir)["train"])
    for field in fields(RunConfig):
        name, value = field.name, getattr(given, field.name)
        flagged = value != field.default
        if name in PER_INVOCATION or (flagged and name in CHANGEABLE_ON_RESUME):
            setattr(saved, name, value)
        elif flagged and value != getattr(saved, name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--resume continues {run_dir} with its saved settings: expected {flag} "
                             f"{getattr(saved, name)} or no {flag}, got {value}; start a new run with --out to "
                             "change it")
    saved.out = str(run_dir)
    # A run saved before a flag existed has it as None: resolved the way that run resolved it.
    return resolve_defaults(saved)


def resolve_defaults(config: RunConfig) -> RunConfig:
    """Fill the fields left None: the recipe's values, and the image size of the data's dimension."""
    for name, value in {"val_every": 1, **RECIPES[config.recipe]}.items():
        if getattr(config, name) is None:
            setattr(config, name, 0 if name == "mapper_lora_rank" and config.plain else value)
    if config.img_size is None:
        config.img_size = IMG_SIZES[spatial_dims(config.data)]
    return config


def check_args(args: RunConfig) -> None:
    """The cheap checks, before anything is loaded."""
    check_data_and_model(args)
    check_runtime_flags(args)
    check_numbers(args)
    if args.init_from is not None:
        if args.resume is not None:
            raise ValueError("--init-from starts a new run from another run's weights; --resume continues a run: "
                             "give one of them")
        if not has_checkpoint(Path(args.init_from), "best"):
            raise FileNotFoundError(f"--init-from {args.init_from}: expected a run directory with a best checkpoint "
                                    "(best.safetensors), found none")
    check_out_dir(Path(args.out), resuming=args.resume is not None)


def check_data_and_model(args: RunConfig) -> None:
    """The data options, and the backbone against the data: its dimension, and the side it runs on (the crops of
    a patch-trained dataset, else the images) against its halvings or patches and its smallest side."""
    try:
        check_data_options(args.data, args.fold, args.label, args.multiclass)
    except ValueError as error:
        raise ValueError(f"--data {args.data}: {error}") from None
    dims, row = spatial_dims(args.data), BACKBONES[args.backbone]
    if dims not in row.spatial_dims:
        fitting = ", ".join(backbones_for(dims))
        raise ValueError(f"--data {args.data} holds {DATASET_TABLE[args.data].holds}; the "
                         f"{args.backbone} backbone is {row.spatial_dims[0]}D: use --backbone {fitting}")
    flag, side = args.input_side
    try:
        row.check_sides(args.backbone, (side,) * dims, patch_size=args.patch_size)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None


def check_numbers(args: RunConfig) -> None:
    """Counts positive, real-valued flags finite and in their ranges, --test-fraction where a split is drawn."""
    for name in ("epochs", "synthetic_size", "val_every", "roi_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        raise ValueError(f"--stop-after-epoch: expected an epoch number >= 1, got {args.stop_after_epoch}")
    for flag, value, low, high, closed in numeric_ranges(args):
        inside = math.isfinite(value) and (low < value or (closed[0] and value == low)) and \
            (value < high or (closed[1] and value == high))
        if not inside:
            bounds = f"{'[' if closed[0] else '('}{low:g}, {high:g}{']' if closed[1] else ')'}"
            raise ValueError(f"{flag}: expected a finite number in {bounds}, got {value}")
    if args.test_fraction is not None:
        if args.data not in (*RAW_DATASETS, "msd"):
            raise ValueError(f"--test-fraction applies to datasets read from files with a seeded split; {args.data} "
                             "has fixed splits")
        if not (math.isfinite(args.test_fraction) and 0 <= args.test_fraction < 1):
            raise ValueError(f"--test-fraction: expected a finite number in [0, 1), got {args.test_fraction}")


def numeric_ranges(args: RunConfig) -> list[tuple[str, float, float, float, tuple[bool, bool]]]:
    """(flag, value, low, high, (low included, high included)) of every real-valued flag."""
    return [("--lr", args.lr, 0, math.inf, (False, False)),
            ("--momentum", args.momentum, 0, 1, (True, False)),
            ("--weight-decay", args.weight_decay, 0, math.inf, (True, False)),
            ("--bce-weight", args.bce_weight, 0, 1, (True, True)),
            ("--dropout", args.dropout, 0, 1, (True, False))]


def check_out_dir(out: Path, resuming: bool) -> None:
    """The run directory: a directory (or creatable as one) that this user can write, holding no other run."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a directory for the run (or a path to create one)")
    existing = next(parent for parent in (out, *out.parents) if parent.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, so the directory cannot be created; pick another --out")
    # Tried, not judged from permission bits: root passes os.access everywhere, /proc and read-only mounts
    # refuse anyway. What the probe creates is removed; train.py creates the directory when it writes. Under
    # torchrun one process per machine tries (the others would race it for the same folders).
    if int(os.environ.get("LOCAL_RANK", 0)) != 0:
        return
    missing = [parent for parent in (out, *out.parents) if not parent.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".llm4seg-probe.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"--out {out}: cannot write there ({error.strerror or error}); pick a directory "
                              "you can write") from None
    finally:
        for created in missing:  # deepest first
            if created.is_dir():
                created.rmdir()
    if not resuming:
        check_no_run_in(out)


def check_no_run_in(out: Path) -> None:
    """Refuse to start a new run where one has a `last` checkpoint (before any work, and again under the run
    directory's lock, for a run that finished meanwhile)."""
    if has_checkpoint(out, "last"):
        raise ValueError(f"{out} already holds a run: continue it with --resume {out}, or pick another --out")


def default_run_dir(args: RunConfig) -> str:
    fold = f"_fold{args.fold}" if args.fold is not None else ""
    if args.plain:
        return f"runs/{args.data}_{args.backbone}{fold}_seed{args.seed}"
    extras = (f"-lora{args.lora_rank}" if args.lora_rank else "") + \
        (f"-mapperlora{args.mapper_lora_rank}" if args.mapper_lora_rank else "") + ("-residual" if args.residual else "")
    llm_name = Path(args.llm).name if Path(args.llm).expanduser().exists() else args.llm.replace("/", "--")
    return f"runs/{args.data}_{args.backbone}_{llm_name}-L{args.layer}-{args.mode}{extras}{fold}_seed{args.seed}"


def build_or_rebuild_model(args: RunConfig) -> torch.nn.Module:
    """A resumed run's model exactly as it was built (LLM commit pinned), or a new one from the flags."""
    if args.resume:
        return rebuild_model(read_run_config(Path(args.out)))
    # A local directory or .gguf is recorded by absolute path, so eval.py finds it from anywhere.
    local = Path(args.llm).expanduser()
    llm = None if args.llm == "none" else str(local.resolve()) if local.exists() else args.llm
    in_channels = input_channels(args.data, args.data_dir)
    classes = num_classes(args.data, args.data_dir, multiclass=args.multiclass)
    net = build_model(args.backbone, llm, args.layer, args.mode, in_channels=in_channels, num_classes=classes,
                      lora_rank=args.lora_rank,
                      mapper_lora_rank=args.mapper_lora_rank, residual=args.residual, final_norm=args.final_norm,
                      spatial_dims=spatial_dims(args.data), img_size=args.img_size,
                      patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth, heads=args.heads,
                      dropout=args.dropout)
    if args.init_from:
        info = load_weights_of_run(net, args.init_from)
        print(f"weights from {args.init_from} (best checkpoint: epoch {info.get('epoch')}, step {info['global_step']})")
    return net


def check_step_fits(net: torch.nn.Module, args: RunConfig, device: torch.device, precision: torch.dtype) -> None:
    """Refuse, before any work, a run whose training step cannot fit in the memory `device` has free: the
    activations one step keeps for backward (model.count_activation_bytes on a batch of the crops or images, a
    lower bound; about half of it under bf16 autocast), the frozen weights at the run's precision, and the
    trainable ones with their gradients and Adam's two moments."""
    free = free_memory(device)
    if free is None:
        return
    flag, side = args.input_side
    batch = (args.batch_size, net.config.in_channels, *(side,) * net.config.spatial_dims)
    bf16 = precision == torch.bfloat16
    activations = count_activation_bytes(net, batch) * (0.5 if bf16 else 1.0)
    weights = sum(p.numel() * (16 if p.requires_grad else 2 if bf16 else 4) for p in net.parameters())
    if activations + weights > free:
        raise ValueError(f"{flag} {side}: one training step of {args.backbone} on batches of {args.batch_size} needs "
                         f"about {(activations + weights) / 1e9:,.1f} GB ({activations / 1e9:,.1f} GB of activations), "
                         f"and {device} has {free / 1e9:,.1f} GB free: use a smaller {flag} or --batch-size")


def make_optimizer(args: RunConfig, trainable: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum (LLM4Seg), Adam (MedVisionLlama) or AdamW (LLM4Seg in 3D, as 3D UX-Net) over the
    trainable tensors only."""
    if args.optimizer == "adam":
        return torch.optim.Adam(trainable, lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(trainable, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
