"""The settings of a training run: train.py's flags and defaults, the --resume rules, the cheap checks
and the run directory's default name. A library module, so that train.py and sweep.py (which spans
a grid of these flags) read one definition; every default is defined once, here or in the signature
of the function a flag configures (build_model, load_dataset), printed at start and saved in config.json.
"""
import argparse
import json
from pathlib import Path

from cli import add_runtime_flags, check_runtime_flags, defaults_of, one_line_error_parser
from data import DATASETS, load_dataset
from model import BACKBONES, DOWNSAMPLING, MODES, build_model, check_image_sides

# --resume takes every setting from the run's config.json except these, which belong to one invocation,
PER_INVOCATION = ("resume", "out", "stop_after_epoch")
# and these, which may be changed (a different --workers changes the augmentations when > 0).
CHANGEABLE_ON_RESUME = ("device", "workers", "compile")
# The flags that configure build_model and load_dataset take their defaults from those signatures.
MODEL_DEFAULTS, DATA_DEFAULTS = defaults_of(build_model), defaults_of(load_dataset)



def make_parser() -> argparse.ArgumentParser:
    p = one_line_error_parser("Train LLM4Seg (see the module docstring for examples).")
    p.add_argument("--data", default="kvasir", choices=DATASETS, help="dataset name")
    p.add_argument("--data-dir", default=None,
                   help="dataset root; None means $LLM4SEG_DATA/<data>, or ./data/<data>")
    p.add_argument("--synthetic-size", type=int, default=DATA_DEFAULTS["synthetic_size"],
                   help="cases of --data synthetic")
    p.add_argument("--backbone", default=MODEL_DEFAULTS["backbone"], choices=sorted(BACKBONES),
                   help="the CNN")
    p.add_argument("--llm", default=MODEL_DEFAULTS["llm"],
                   help="alias, Hub repo id or local directory; 'none' for the plain backbone")
    p.add_argument("--layer", type=int, default=MODEL_DEFAULTS["layer"],
                   help="the paper's 1-based layer number")
    p.add_argument("--mode", default=MODEL_DEFAULTS["mode"], choices=MODES,
                   help="frozen (paper), trainable ('(T)'), random ('+Transformer') or none (the plain backbone)")
    p.add_argument("--lora-rank", type=int, default=MODEL_DEFAULTS["lora_rank"],
                   help="LoRA on q/v of a frozen layer; 0 = off")
    p.add_argument("--residual", action="store_true", help="bridge computes x + layer(x)")
    p.add_argument("--epochs", type=int, default=300, help="passes over the training set")
    p.add_argument("--lr", type=float, default=0.01, help="SGD base lr, poly-decayed (power 0.9) per iteration")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument("--img-size", type=int, default=DATA_DEFAULTS["img_size"],
                   help=f"a multiple of {DOWNSAMPLING}")
    p.add_argument("--seed", type=int, default=DATA_DEFAULTS["seed"],
                   help="weights, data split, data order and augmentation")
    add_runtime_flags(p)
    p.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                   help="torch.compile the training step (CUDA graphs in one process); None means on CUDA only")
    p.add_argument("--out", default=None, help="run directory; None means runs/<name from the settings>")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--stop-after-epoch", type=int, default=None, metavar="N",
                   help="save and exit 0 after epoch N, resumable later (e.g. to fit a time slot)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, or with --resume the run's saved settings, where only the flags of
    CHANGEABLE_ON_RESUME may differ (and those of PER_INVOCATION come from the command line)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.resume is None:
        return args
    run_dir = Path(args.resume)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"--resume {run_dir}: expected a run directory with config.json, found none")
    if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
        raise ValueError(f"--resume {run_dir} writes into that run; got a different --out {args.out}")
    saved = {**vars(parser.parse_args([])), **json.loads((run_dir / "config.json").read_text())["train"]}
    resolved = {}
    for name, value in vars(args).items():
        given = value != parser.get_default(name)
        if name in PER_INVOCATION or (given and name in CHANGEABLE_ON_RESUME):
            resolved[name] = value
        elif given and value != saved[name]:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--resume continues {run_dir} with its saved settings: expected {flag} "
                             f"{saved[name]} or no {flag}, got {value}; start a new run with --out to change it")
        else:
            resolved[name] = saved[name]
    return argparse.Namespace(**{**resolved, "out": str(run_dir)})


def check_args(args: argparse.Namespace) -> None:
    """The cheap checks, before anything is loaded."""
    try:
        check_image_sides(args.img_size, args.img_size)
    except ValueError as error:
        raise ValueError(f"--img-size: {error}") from None
    check_runtime_flags(args)
    for name in ("epochs", "synthetic_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr: expected a positive learning rate, got {args.lr}")
    out = Path(args.out)
    if args.resume is None and (out / "last.json").exists():
        raise ValueError(f"{out} already holds a run: continue it with --resume {out}, or pick another --out")
    if args.resume is not None and not (out / "last.json").exists():
        raise FileNotFoundError(f"{out} has no last.json: the run stopped before its first epoch "
                                f"ended, so there is nothing to resume; start it again")


def default_run_dir(args: argparse.Namespace) -> str:
    if args.llm == "none" or args.mode == "none":
        return f"runs/{args.data}_{args.backbone}_seed{args.seed}"
    extras = (f"-lora{args.lora_rank}" if args.lora_rank else "") + ("-residual" if args.residual else "")
    llm_name = Path(args.llm).name if Path(args.llm).expanduser().exists() else args.llm.replace("/", "--")
    return f"runs/{args.data}_{args.backbone}_{llm_name}-L{args.layer}-{args.mode}{extras}_seed{args.seed}"
