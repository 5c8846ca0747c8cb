"""Sweep train.py over a grid of settings and seeds, evaluate every run, and answer "is the gain real?".

    python sweep.py --out sweeps/table2 --data kvasir --mode none random trainable frozen --seeds 41 42 43
    python sweep.py --out sweeps/fig3 --data kvasir --layer 1-16 --seeds 41 42             # the paper's Fig. 3
    python sweep.py --out sweeps/llms --data busi --llm llama3.2-1b deepseek-r1-qwen-1.5b --layer 15 --seeds 41 42

Any train.py flag given several values spans the grid (the product of every such flag; integer
ranges as A-B; --layers is read as --layer); a flag given one value, and train.py's switches (--residual, --no-compile), go to
every run. --seeds replaces --seed. Settings without an LLM layer (--mode none or --llm none) ignore
--layer, --llm and the LoRA flags, so those that differ only there are one setting, trained once.
Each setting x seed is an ordinary train.py run, in
OUT/runs/<the varying flags and values>_seed<seed>: a finished run is skipped, a stopped one resumed
(train.py --resume), so a killed sweep picks up where it stopped; each run is then evaluated once
on --split by eval.py (4 sample panels, and --analyze when it has an LLM layer). With several GPUs, one run per GPU
at a time (--device cuda:i); otherwise one after the other.

What it writes into OUT:
    table.md, table.csv    one row per setting, seeds pooled: mean ± std over seeds (sample std; each
                           seed's value is its run's mean over images) of IoU, Dice, HD95 and NSD,
                           trainable / frozen parameters and G MACs, and against the baseline row
                           (--baseline, default the first setting) the IoU difference with its 95 %
                           confidence interval and p-value from metrics.paired_difference: the units
                           are (seed, image) pairs, each the setting's IoU minus the baseline's on the
                           same image of the same seed's split; CI by paired bootstrap over those
                           units, p by a sign-flip permutation test
    iou_by_setting.png     the per-seed IoU of every setting (one dot per seed, a line at their mean) and a
                           forest plot of the paired ΔIoU against the baseline with its 95 % interval
    iou_by_layer.png       when --layer varies: mean IoU ± std over seeds against the layer (Fig. 3)
    spectra.png            when runs have an LLM layer: effective rank and LSVR of the bottleneck
                           features before and after the layer, over images and seeds (Fig. 2c)
Exit code 0 when every run finished, 1 when some failed (named in the table), 2 for a bad setting
(found before any run starts), 130 on Ctrl-C (the current run saves and is resumed next time).
"""
import argparse
import csv
import itertools
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

from llm4seg.analysis import cannot_analyze
from llm4seg.checkpoints import checkpoint_info, has_checkpoint, read_run_config, run_dir_lock
from llm4seg.cli import USER_ERRORS, disk_error, one_line_error_parser, user_error
from llm4seg.files import InputError, WriteError
from llm4seg.run_config import RunConfig
from llm4seg.settings import (CHANGEABLE_ON_RESUME, PER_INVOCATION, check_args, command_line, make_parser,
                              resolve_defaults)
from llm4seg.sweeps import Run, find_baseline, plot, setting_label, summarise, write_tables

HERE = Path(__file__).resolve().parent
# Flags the sweep sets itself, per run.
OWN_FLAGS = {"--seed": "use --seeds", "--out": "runs go to OUT/runs/", "--resume": "the sweep resumes runs itself",
             "--stop-after-epoch": "a run that stops early never finishes, so the sweep would resume it forever"}
RUNTIME_FLAGS = ("--device", "--workers", "--batch-size", "--precision")  # passed to eval.py too


# ----------------------------------------------------------------------------------------------
# The grid


def parse_sweep(argv: list[str]) -> tuple[argparse.Namespace, list[tuple[str, list[str]]], list[str]]:
    """-> (the sweep's own flags, the varying train.py flags [(flag, values)], the fixed train.py argv)."""
    train_flags = sorted(option for action in make_parser()._actions for option in action.option_strings
                         if option.startswith("--") and option not in ("--help", "--out", "--resume", "--seed"))
    p = one_line_error_parser(__doc__.split("\nWhat it writes into OUT:")[0],
                              "train.py flags, each of which may be given several values to span the grid "
                              "(python train.py --help says what they do):\n  "
                              + textwrap.fill(" ".join(train_flags), 100, subsequent_indent="  ", break_on_hyphens=False))
    p.allow_abbrev = False  # else --seed would silently mean --seeds
    p.add_argument("--out", required=True, help="the sweep's directory: runs/, table.md, table.csv, plots")
    p.add_argument("--seeds", type=int, nargs="+", default=[41], help="one run per seed of every setting")
    p.add_argument("--split", default="val", choices=("val", "test"), help="what every run is evaluated on")
    p.add_argument("--baseline", default=None, metavar="FLAG=VALUE[,FLAG=VALUE]",
                   help="the row the others are compared with, e.g. mode=none; None means the first setting")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap / permutation resamples")
    p.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    args, rest = p.parse_known_args(argv)
    train_actions = {option: action for action in make_parser()._actions for option in action.option_strings}

    varying, fixed, seen, i = [], [], set(), 0
    while i < len(rest):
        flag = rest[i]
        flag = "--layer" if flag == "--layers" else flag
        if flag in seen:
            raise ValueError(f"{flag} is given twice: list all its values after one {flag}")
        seen.add(flag)
        if flag in OWN_FLAGS:
            raise ValueError(f"{flag} is set by the sweep ({OWN_FLAGS[flag]})")
        if flag not in train_actions or flag in ("-h", "--help"):
            raise ValueError(f"{rest[i]} is not a train.py flag (python train.py --help lists them)")
        values, i = [], i + 1
        while i < len(rest) and not rest[i].startswith("--"):
            values.append(rest[i])
            i += 1
        action = train_actions[flag]
        if action.nargs == 0:  # a switch
            if values:
                raise ValueError(f"{flag} is a switch and takes no value, got {' '.join(values)}")
            fixed.append(flag)
            continue
        values = expand_ranges(flag, values) if action.type is int else values
        if not values:
            raise ValueError(f"{flag}: expected one or more values")
        if len(values) == 1:
            fixed += [flag, values[0]]
        else:
            varying.append((flag, values))
    return args, varying, fixed


def expand_ranges(flag: str, values: list[str]) -> list[str]:
    """["1-3", "7"] -> ["1", "2", "3", "7"] for integer flags."""
    expanded = []
    for value in values:
        if match := re.fullmatch(r"(\d+)-(\d+)", value):
            first, last = int(match[1]), int(match[2])
            if last < first:
                raise ValueError(f"{flag} {value}: expected a range A-B with A <= B")
            expanded += [str(v) for v in range(first, last + 1)]
        else:
            expanded.append(value)
    return expanded


def run_name(varying: list[tuple[str, list[str]]], setting: tuple, seed: int) -> str:
    """The varying flags and values, e.g. mode-frozen_layer-15_seed41 (local paths by their last part)."""
    parts = [f"{flag.lstrip('-')}-{Path(value).name if os.sep in value else value}"
             for (flag, _), value in zip(varying, setting, strict=True)]
    return re.sub(r"[^\w.-]+", "_", "_".join(parts + [f"seed{seed}"]))


def plan_runs(args, varying, fixed) -> list[Run]:
    """Every setting x seed, each checked by train.py's own parser and checks before anything runs. Settings
    that differ only in flags the plain backbone ignores (--mode none or --llm none: no layer, so no --layer,
    --llm, LoRA, ...) are one setting, trained once: the first of them."""
    runs, plain_settings = [], {}
    for setting in itertools.product(*(values for _, values in varying)):
        plain = same_without_llm(args, varying, setting, fixed)
        if plain is not None:
            if plain in plain_settings:
                print(f"sweep: {setting_label(varying, setting)} is the plain backbone of "
                      f"{setting_label(varying, plain_settings[plain])}: trained once")
                continue
            plain_settings[plain] = setting
        for seed in args.seeds:
            train_argv = [part for (flag, _), value in zip(varying, setting, strict=True) for part in (flag, value)]
            train_argv += fixed + ["--seed", str(seed)]
            run_dir = Path(args.out) / "runs" / run_name(varying, setting, seed)
            parsed = resolve_defaults(command_line(train_argv + ["--out", str(run_dir)]))
            check_args(replace(parsed, resume=None, out=str(run_dir / "never")))
            check_same_settings(parsed, run_dir)
            runs.append(Run(setting, seed, train_argv, run_dir))
    return runs


LLM_ONLY_FLAGS = ("--llm", "--layer", "--lora-rank", "--mapper-lora-rank", "--residual", "--final-norm")


def same_without_llm(args, varying, setting: tuple, fixed: list[str]) -> tuple | None:
    """For a setting without an LLM layer (--mode none or --llm none): its values of the flags that still
    matter, which identify it; None for a setting with a layer."""
    train_argv = [part for (flag, _), value in zip(varying, setting, strict=True) for part in (flag, value)] + fixed
    if not command_line(train_argv + ["--out", str(args.out)]).plain:
        return None
    return tuple(value for (flag, _), value in zip(varying, setting, strict=True) if flag not in LLM_ONLY_FLAGS)


def check_same_settings(parsed: RunConfig, run_dir: Path) -> None:
    """A run already in OUT must have been trained with this sweep's settings, or skipping or resuming
    it would put another experiment's numbers in the table."""
    if not (run_dir / "config.json").is_file():
        return
    saved = read_run_config(run_dir)["train"]
    for name, value in asdict(parsed).items():
        if name in PER_INVOCATION or name in CHANGEABLE_ON_RESUME or name not in saved or saved[name] == value:
            continue
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{run_dir} was trained with {flag} {saved[name]}, this sweep asks for {value}: "
                         f"use another --out for a different experiment")


# ----------------------------------------------------------------------------------------------
# Running: skip what is done, resume what stopped, evaluate once


def epochs_done(run_dir: Path) -> tuple[int, int] | None:
    """(epochs done, epochs asked) of a run that saved `last`, else None."""
    if not has_checkpoint(run_dir, "last"):
        return None
    done = checkpoint_info(run_dir, "last")["progress"]["epochs_done"]
    return done, read_run_config(run_dir)["train"]["epochs"]


def runtime_argv(run: Run) -> list[str]:
    """The run's runtime flags, which eval.py and a resumed train.py take too."""
    argv = run.train_argv
    return [part for i, part in enumerate(argv) if part in RUNTIME_FLAGS or (i and argv[i - 1] in RUNTIME_FLAGS)]


def run_child(command: list[str]) -> int:
    """Run a script to its end and return its exit code. Ctrl-C reaches the child too (same process
    group), and train.py then saves `last` before exiting 130: wait for that instead of killing it,
    then raise KeyboardInterrupt."""
    child = subprocess.Popen(command)
    while True:
        try:
            code = child.wait()
            break
        except KeyboardInterrupt:
            continue
    if code in (130, 143):  # stopped by Ctrl-C or SIGTERM, its progress saved: stop the sweep too
        raise KeyboardInterrupt
    return code


def execute(run: Run, split: str, device: str | None) -> None:
    """Train (or skip, or resume) and evaluate one run; sets run.status."""
    device_argv = ["--device", device] if device else []
    progress = epochs_done(run.run_dir)
    if progress is None or progress[0] < progress[1]:
        if progress is None and run.run_dir.is_dir():  # stopped before its first epoch ended: nothing to keep,
            try:  # unless another sweep's train.py is in its first epoch there right now
                with run_dir_lock(run.run_dir):
                    shutil.rmtree(run.run_dir, ignore_errors=True)
            except ValueError as error:
                run.status = f"failed ({error})"
                return
        # train.py --resume accepts the run's own flags again (they equal the saved settings).
        resume = ["--resume", str(run.run_dir)] if progress else ["--out", str(run.run_dir)]
        print(f"sweep: {'resuming' if progress else 'training'} {run.run_dir.name}", flush=True)
        code = run_child([sys.executable, str(HERE / "train.py"), *run.train_argv, *resume, *device_argv])
        if code != 0:
            run.status = f"failed (train.py exit {code})"
            return
    else:
        print(f"sweep: {run.run_dir.name} finished before, skipping its training", flush=True)
    evaluated = run.run_dir / f"eval-{split}" / "per_image.csv"
    stale = not evaluated.is_file() or evaluated.stat().st_mtime < (run.run_dir / "best.safetensors").stat().st_mtime
    if stale and (code := evaluate(run, split, device_argv)) != 0:
        run.status = f"failed (eval.py exit {code})"
        return
    try:
        read_evaluation(run, split)
    except InputError as error:  # cut, emptied or of an earlier convention: evaluate once more
        print(f"sweep: {error}; evaluating {run.run_dir.name} again", flush=True)
        if (code := evaluate(run, split, device_argv)) != 0:
            run.status = f"failed (eval.py exit {code})"
            return
        try:
            read_evaluation(run, split)
        except InputError as again:
            run.status = f"failed ({again})"
            return
    run.status = "done"


def evaluate(run: Run, split: str, device_argv: list[str]) -> int:
    """eval.py on the run's best checkpoint (with --analyze where it has a 2D CNN's bottleneck); its exit code."""
    config = read_run_config(run.run_dir)
    analyze = [] if cannot_analyze(config["model"]) else ["--analyze"]
    return run_child([sys.executable, str(HERE / "eval.py"), str(run.run_dir), "--split", split, "--samples", "4",
                      *analyze, *runtime_argv(run), *device_argv])


def read_evaluation(run: Run, split: str) -> None:
    """run.per_image, .computation, .distance_unit from eval.py's per_image.csv and metrics.json; InputError
    naming the file when one is empty, cut or not what eval.py writes."""
    folder = run.run_dir / f"eval-{split}"
    table, report = folder / "per_image.csv", folder / "metrics.json"
    try:
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "case" not in rows[0]:
            raise ValueError("no cases")
        per_image = [{k: (v if k == "case" else float(v)) for k, v in row.items()} for row in rows]
    except (OSError, ValueError, TypeError, csv.Error) as error:  # a cut row: a None key or value
        raise InputError(f"{table} of the run {run.run_dir.name} is damaged ({error})") from None
    try:
        written = json.loads(report.read_text())
        computation, unit = written["computation"], written["conventions"].get("distance_unit", "px")
        convention = written["conventions"].get("empty_cases")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"{report} of the run {run.run_dir.name} is damaged ({type(error).__name__}: {error})") \
            from None
    if convention != "monai":  # written before MONAI's empty-case values: its HD95 / NSD would mix with theirs
        raise InputError(f"{report} of the run {run.run_dir.name} scores empty masks by an earlier convention")
    run.per_image, run.computation, run.distance_unit = per_image, computation, unit


def execute_all(runs: list[Run], split: str, explicit_device: bool) -> None:
    """One after the other, or with several GPUs (and no --device given) one run per GPU at a time."""
    import torch

    gpus = 0 if explicit_device else torch.cuda.device_count()
    if gpus <= 1:
        for run in runs:
            execute(run, split, None)
        return
    free = queue.Queue()
    for index in range(gpus):
        free.put(f"cuda:{index}")

    def on_a_free_gpu(run: Run) -> None:
        device = free.get()
        try:
            execute(run, split, device)
        finally:
            free.put(device)

    with ThreadPoolExecutor(max_workers=gpus) as pool:
        list(pool.map(on_a_free_gpu, runs))


def main(argv: list[str] | None = None) -> int:
    try:
        args, varying, fixed = parse_sweep(sys.argv[1:] if argv is None else argv)
        runs = plan_runs(args, varying, fixed)
        baseline = find_baseline(args, varying, list(dict.fromkeys(run.setting for run in runs)))
    except USER_ERRORS as error:
        return user_error(error)
    print(f"sweep: {len(runs)} runs ({len(runs) // len(args.seeds)} settings x {len(args.seeds)} seeds) "
          f"in {Path(args.out) / 'runs'}")
    if args.dry_run:
        for run in runs:
            print(f"  {run.run_dir.name}: python train.py {' '.join(run.train_argv)}")
        return 0
    try:
        execute_all(runs, args.split, explicit_device="--device" in fixed)
    except KeyboardInterrupt:
        print("sweep: stopped; run the same command again to continue", file=sys.stderr)
        return 130
    out = Path(args.out)
    rows = summarise(args, varying, runs, baseline)
    units = {run.distance_unit for run in runs if run.status == "done"}
    failed = [run for run in runs if run.status != "done"]
    for run in failed:
        print(f"sweep: {run.run_dir.name} {run.status}: left out of the table", file=sys.stderr)
    # A table from fewer runs never replaces one a complete sweep wrote.
    stem = "table-partial" if failed and (out / "table.md").is_file() else "table"
    try:
        print(write_tables(rows, out, setting_label(varying, baseline), args.split,
                           units.pop() if len(units) == 1 else "px", stem))
        for path in plot(varying, runs, rows, out) if stem == "table" else []:
            print(f"wrote {path}")
    except WriteError as error:  # the disk: the tables written before are whole, the runs untouched
        return disk_error(error)
    print(f"wrote {out / f'{stem}.md'} and {out / f'{stem}.csv'}" +
          (f" (the earlier {out / 'table.md'} is kept: {len(failed)} run(s) failed)" if stem != "table" else ""))
    return 0 if all(run.status == "done" for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
