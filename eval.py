"""Evaluate a trained run (LLM4Seg, or MedVisionLlama on volumes): the paper's metrics, LLM4Seg's Sec. 4.2
feature analysis, pictures.

    python eval.py runs/kvasir_cmunext_llama3.2-1b-L15-frozen_seed41                  # val, best checkpoint
    python eval.py RUN_DIR --split test --checkpoint last                            # held-out test set
    python eval.py RUN_DIR --samples 8                                               # + 4 worst, 4 best overlays
    python eval.py RUN_DIR --analyze                                                 # + Fig. 2 / Sec. 4.2 analysis
    python eval.py RUN_DIR --data-dir /elsewhere/kvasir --device cpu --batch-size 4 --workers 0
    python eval.py RUN_DIR --images new_scans/ --out masks/                         # segment new images
    python eval.py BTCV_RUN_DIR --images new_cts/ --out labels/                     # NIfTI label maps of new CTs
    python eval.py runs/msd_vit_llama3.1-8b-L32-frozen-mapperlora8_seed41 --split test --samples 4   # MedVisionLlama

The command rebuilds the model from RUN_DIR/config.json (a frozen LLM layer is read again from
its local directory or the local Hub cache, and must be the same commit), loads <checkpoint>.safetensors
and evaluates the split the run's data settings define, writing into RUN_DIR/eval-<split>/:
    metrics.json    mean, std and n over images (population std, so one image gives 0; NaN values such as
                    the HD95 of an empty mask skipped, n counting the rest; over none, 0 with n 0, as MONAI) of
                    every per-image metric of metrics.py, pooled IoU / Dice, the trivial predictors' IoU,
                    the checkpoint (name, epoch, step) and the computation report of the paper's
                    Table 1: trainable and frozen parameters, G MACs of one (1, C, S, S) or (1, C, S, S, S)
                    forward at the size the network runs on: the crops of a patch-trained run
                    (--roi-size), else the run's image size (model.count_gmacs)
    per_image.csv   one row per case: every metric (and with --analyze the analysis values)
    samples/        --samples N: worst-01_<case>.png .. and best-01_<case>.png .., ranked by IoU, each a
                    panel: the image with the true (green) and predicted (red) contours | truth |
                    prediction | errors (red: false positive, blue: missed), enlarged to >= 256 px;
                    of a volume, one such row for each of its middle axial, coronal and sagittal slices
Volumes are scored with their voxel spacing: HD95 and the NSD tolerance in millimetres (metrics.py).
Multi-class runs (btcv, synthetic-organs, msd --multiclass, folder --multiclass): whole volumes of a patch-trained run go
through sliding windows of its --roi-size (prediction.case_probabilities), the argmax is scored per organ
(metrics.class_metrics: Dice, IoU, HD95, NSD; an organ absent from a case's truth has no Dice or IoU, and
by default NSD 0 where it was predicted), and
metrics.json adds "per_class" {organ: {"dice", "iou", "hd95", "nsd"}}, "dice" = their mean over the
organs (Table 2's number) and "classes"; per_image.csv adds "dice/<organ>", ... columns; the printed
table lists every organ; samples/ colour each class.
    analysis.json   --analyze: concentration IoU, effective rank and LSVR before / after the layer
    activations/    --analyze: <case>.png, the heat maps before | after the layer of the first --maps cases,
                    with a colour bar (and a note when the bottleneck is too coarse to show anything)
RUN_DIR/eval-<split>-last/ holds the same for --checkpoint last; pictures an earlier evaluation left in
the folder are removed when this one draws none.
With --images DIR it segments new images instead (outputs.py), into --out (default
RUN_DIR/predict-<DIR's name>): a 2D run writes one mask PNG per readable image of DIR, named by its stem, at
the image's own size, plus overlays/ (and with --probabilities the probability maps); a 3D run writes one
NIfTI label map <stem>.nii.gz per *.nii / *.nii.gz volume of DIR, on that volume's own grid (its shape and
header; 0 background, k class k), preprocessed as the run's data was (btcv, synthetic-organs: as BTCV's CTs,
sliding windows of --roi-size; msd, synthetic3d: z-scored, resized to the run's size and back), plus
label_legend.json (value -> class name). Unreadable files are listed and skipped, and the exit code is then 1.
HD95 and NSD of a case with an empty mask follow --empty-cases (metrics.json's conventions.empty_cases says
which): "monai" (default) gives MONAI 1.6's values, which published BTCV / MSD numbers use: HD95 NaN (left
out of the mean) whenever a mask is empty, NSD 0 for a missed or an invented lesion or organ and NaN when
both masks are empty; "diagonal", this repository's convention before, gives every case a number: HD95 the
image diagonal (worse than any real prediction) and NSD 0 when one mask is empty, HD95 0 and NSD 1 when both
are, and skips an organ absent from the truth. NSD compares distances with its tolerance in float32, as MONAI.
The formulas and their empty-case conventions are in metrics.py (per image, pooled, HD95, NSD) and
analysis.py (activation maps, concentration IoU, effective rank, LSVR); the drawing in pictures.py.
"""
import contextlib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from llm4seg.analysis import (ANALYSED, CONCENTRATION_THRESHOLD, BridgeFeatures, activation_map, cannot_analyze,
                              feature_analysis, upsample_map)
from llm4seg.checkpoints import load_run, read_run_config
from llm4seg.cli import (USER_ERRORS, add_runtime_flags, check_runtime_flags, disk_error, one_line_error_parser,
                         user_error)
from llm4seg.data import check_cases, load_dataset
from llm4seg.files import WriteError, write_csv, write_text
from llm4seg.metrics import EMPTY_CONVENTIONS, NSD_TOLERANCE, THRESHOLD, evaluate_cases, mean_and_std
from llm4seg.metrics import segmentation_metrics, surface_metrics  # noqa: F401  public names eval.py has always offered
from llm4seg.model import count_gmacs, count_params, set_frozen_dtype
from llm4seg.outputs import LEGEND_NAME, check_volume_data, predict_folder, predict_volume_folder
from llm4seg.pictures import heatmap_pair_png, to_rgb
from llm4seg.prediction import case_probabilities, predict
from llm4seg.runtime import Processes, memory_format, resolve_device, resolve_precision, set_cpu_threads
from llm4seg.run_config import RunConfig
from llm4seg.task import Task

# How the printed table shows each metric: (label, scale, unit); the files keep fractions and pixels unscaled.
LABELS = {"iou": ("IoU", 100, "%"), "dice": ("Dice", 100, "%"), "f1": ("F1", 100, "%"),
          "sensitivity": ("SE", 100, "%"), "precision": ("PC", 100, "%"), "specificity": ("SP", 100, "%"),
          "accuracy": ("ACC", 100, "%"), "hd95": ("HD95", 1, "px"), "nsd": ("NSD", 100, "%")}
MIN_MAP_TOKENS = 8  # an activation map coarser than 8 x 8 tokens shows no structure worth looking at


def evaluate_run(args) -> int:
    """The checks that need no model first, then data, model, evaluation, pictures and files."""
    run_dir = Path(args.run_dir)
    config = read_run_config(run_dir)
    check_args(args, config, run_dir)
    settings = RunConfig.from_saved(config["train"])
    device = resolve_device(args.device, Processes())
    set_cpu_threads(args.workers, Processes())
    precision = resolve_precision(args.precision, device)
    data_dir = args.data_dir or settings.data_dir
    dataset = load_dataset(settings.data, data_dir, args.split, settings.img_size, settings.seed,
                           **settings.data_options())
    check_cases(dataset)
    task = Task.of_run(config, data_dir)
    # Sliding windows read whole volumes, of differing shapes: one a batch.
    loader = DataLoader(dataset, batch_size=1 if task.roi_size else args.batch_size, num_workers=args.workers,
                        pin_memory=device.type == "cuda")

    net, _, info = load_run(run_dir, args.checkpoint)
    computation = computation_report(net, config, task)
    set_frozen_dtype(net, precision).to(device, memory_format=memory_format(device, net.config.spatial_dims))

    # One folder per (split, checkpoint): `best` keeps the name sweep.py reads; pictures of an earlier
    # evaluation there are cleared, so nothing beside metrics.json belongs to another run of eval.py.
    out_dir = run_dir / (f"eval-{args.split}" + ("" if args.checkpoint == "best" else f"-{args.checkpoint}"))
    out_dir.mkdir(exist_ok=True)
    for folder, asked in (("samples", args.samples), ("activations", args.analyze)):
        if not asked and (out_dir / folder).is_dir():
            for old in (out_dir / folder).glob("*.png"):
                old.unlink()
            if not any((out_dir / folder).iterdir()):
                (out_dir / folder).rmdir()
    analysis = None
    with BridgeFeatures(net.bridge) if args.analyze else contextlib.nullcontext() as features:
        extra = (lambda logits, masks: feature_analysis(features, masks)) if args.analyze else None
        rows, dataset_level = evaluate_cases(task, net, loader, device, precision, extra=extra,
                                             empty=args.empty_cases)
        if args.analyze:
            maps = write_activation_maps(net, features, dataset, args.maps, device, precision,
                                         clean_folder(out_dir / "activations"))
            analysis = analysis_report(rows, maps, out_dir)
            write_text(out_dir / "analysis.json", json.dumps(analysis, indent=1))
    samples = []
    if args.samples:
        samples = write_samples(task, case_probabilities(task, net, device, precision), dataset, rows, args.samples,
                                clean_folder(out_dir / "samples"))

    epoch = info["epoch"] if "epoch" in info else info["progress"]["epochs_done"]  # best / last
    report = {
        "run_dir": str(run_dir), "split": args.split, "images": len(rows),
        "checkpoint": {"name": args.checkpoint, "epoch": epoch, "global_step": info["global_step"]},
        "metrics": {key: mean_and_std(rows, key) for key in task.reported_metrics},
        **dataset_level,
        **(per_class_report(rows, task) if task.multiclass else {}),
        "computation": computation,
        "conventions": {"threshold": THRESHOLD, "nsd_tolerance": NSD_TOLERANCE, "distance_unit": task.distance_unit,
                        "std": "population (ddof 0) over images", "empty_cases": args.empty_cases},
        "samples": [str(path.relative_to(out_dir)) for path in samples],
    }
    write_text(out_dir / "metrics.json", json.dumps(report, indent=1))
    write_csv(rows, out_dir / "per_image.csv")
    print_report(report, analysis)
    print(f"wrote {out_dir}")
    return 0


def predict_images(args) -> int:
    """--images: segment every image (a 2D run) or NIfTI volume (a 3D run) of a folder with the run's
    checkpoint; 1 if any file was skipped."""
    run_dir = Path(args.run_dir)
    config = read_run_config(run_dir)
    check_runtime_flags(args)
    settings = RunConfig.from_saved(config["train"])
    task = Task.of_run(config, args.data_dir, number_unknown=True)  # the labels of new files need no data
    if task.volumes:
        if args.probabilities:
            raise ValueError(f"--probabilities writes PNG probability maps of 2D images; {run_dir} segments volumes "
                             "into NIfTI label maps only: drop --probabilities")
        check_volume_data(settings.data)
    elif task.multiclass and args.probabilities:
        raise ValueError(f"--probabilities draws a binary run's foreground probability; {run_dir} is multi-class "
                         f"and its masks hold each pixel's class: drop --probabilities")
    device = resolve_device(args.device, Processes())
    set_cpu_threads(0, Processes())  # one image or volume at a time, no DataLoader workers
    precision = resolve_precision(args.precision, device)
    net, _, _ = load_run(run_dir, args.checkpoint)
    set_frozen_dtype(net, precision).to(device, memory_format=memory_format(device, net.config.spatial_dims))
    out_dir = Path(args.out or run_dir / f"predict-{Path(args.images).resolve().name}")
    if task.volumes:
        written, skipped = predict_volume_folder(task, net, settings.data, settings.img_size, args.images,
                                                 out_dir, device, precision)
        print(f"wrote {len(written)} label maps (NIfTI, each on its input's grid) and {LEGEND_NAME} to {out_dir}")
    else:
        written, skipped = predict_folder(task, net, settings.img_size, args.images, out_dir, device, precision,
                                          probabilities=args.probabilities)
        print(f"wrote {len(written)} {'label maps' if task.multiclass else 'masks'} (and overlays/) to {out_dir}")
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    return 1 if skipped else 0


def check_args(args, config: dict, run_dir: Path) -> None:
    check_runtime_flags(args)
    for name in ("samples", "maps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name}: expected a number >= 0, got {getattr(args, name)}")
    if args.analyze and (reason := cannot_analyze(config["model"])):
        raise ValueError(f"--analyze cannot read {run_dir}: {reason}; drop --analyze for this run")


def computation_report(net: torch.nn.Module, config: dict, task: Task) -> dict:
    """The paper's Table 1 columns for this run's model at the size it runs on: its crops (--roi-size) for a
    patch-trained run (BTCV: the paper's 96^3), else its image size."""
    trainable, frozen = count_params(net)
    size = task.roi_size or config["train"]["img_size"]
    input_shape = [1, config["model"]["in_channels"], *(size,) * task.spatial_dims]
    return {"trainable_params": trainable, "frozen_params": frozen,
            "gmacs": count_gmacs(net, input_shape[1], size, task.spatial_dims), "input_shape": input_shape,
            "counted_with": "torch.utils.flop_counter.FlopCounterMode, FLOPs / 2 (convs and matmuls)"}


def per_class_report(rows: list[dict], task: Task) -> dict:
    """Multi-class: {"per_class": {organ: {"dice", "iou", "hd95", "nsd"}}, each the mean over the cases whose
    truth holds the organ, and "dice": their mean over the foreground classes, the number of Table 2}."""
    def mean_over_cases(key: str) -> float:  # NaN for a class no case scored: absent, not a score of 0
        stats = mean_and_std(rows, key)
        return stats["mean"] if stats["n"] else float("nan")
    per_class = {name: {key: mean_over_cases(f"{key}/{name}") for key in task.reported_metrics}
                 for name in task.class_names[1:]}
    dice = [scores["dice"] for scores in per_class.values() if scores["dice"] == scores["dice"]]  # not NaN
    return {"per_class": per_class, "dice": float(np.mean(dice)) if dice else float("nan"),
            "classes": list(task.class_names)}


def analysis_report(rows: list[dict], maps: list[Path], out_dir: Path) -> dict:
    return {
        "features": {"before": "the LLM bridge's input: the encoder's bottleneck (B, C, h, w)",
                     "after": "the LLM bridge's output after Linear(D, C), which the decoder reads: "
                              "the paper's t_hat' (Sec. 4.2)"},
        "concentration_threshold": CONCENTRATION_THRESHOLD,
        "images": len(rows),
        **{when: {name: mean_and_std(rows, f"{name}_{when}") for name in ANALYSED}
           for when in ("before", "after")},
        "activation_maps": [str(path.relative_to(out_dir)) for path in maps],
    }


# ----------------------------------------------------------------------------------------------
# pictures of chosen cases

def file_stem(case: str) -> str:
    """A case id as a file name: BUSI's "benign (1)" -> "benign_1_"."""
    return re.sub(r"[^\w.-]+", "_", case)


def ranked_cases(rows: list[dict], count: int) -> list[tuple[str, int]]:
    """The ceil(count / 2) lowest and floor(count / 2) highest IoU cases, none twice, as (label, row index):
    worst-01 is the lowest IoU, best-01 the highest. Ties go by case name, so the choice is reproducible."""
    # A multi-class case whose truth holds no class scores NaN (nothing to find): it is neither worst nor best.
    order = sorted((i for i in range(len(rows)) if not math.isnan(rows[i]["iou"])),
                   key=lambda i: (rows[i]["iou"], rows[i]["case"]))
    count = min(count, len(rows))
    worst = order[:(count + 1) // 2]
    best = order[len(worst):][::-1][:count // 2]
    return ([(f"worst-{rank:02d}", i) for rank, i in enumerate(worst, 1)]
            + [(f"best-{rank:02d}", i) for rank, i in enumerate(best, 1)])


def clean_folder(folder: Path) -> Path:
    """Create `folder`, or empty it of the PNGs a previous evaluation wrote (which may name other cases)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    return folder


@torch.no_grad()
def write_samples(task: Task, infer, dataset, rows: list[dict], count: int, folder: Path) -> list[Path]:
    """Panel PNGs of the ranked cases (task.panel_png: of a volume, its middle axial, coronal and sagittal
    slices; multi-class, the argmax in class colours); each is predicted again alone by `infer` (BatchNorm in
    eval mode makes that the same prediction), so no prediction of the whole split is kept in memory."""
    paths = []
    for label, index in ranked_cases(rows, count):
        item = dataset[index]
        assert item["name"] == rows[index]["case"], "the loader must keep the dataset's order"
        prediction = task.labels(infer(item["image"][None]).cpu())[0]             # (*S)
        paths.append(folder / f"{label}_{file_stem(item['name'])}.png")
        caption = f"{label} {item['name']}: IoU {rows[index]['iou'] * 100:.2f} %, Dice {rows[index]['dice'] * 100:.2f} %"
        task.panel_png(item["image"], item["mask"][0], prediction, paths[-1], caption)
    return paths


@torch.no_grad()
def write_activation_maps(net, features: BridgeFeatures, dataset, count: int, device: torch.device,
                          precision: torch.dtype, folder: Path) -> list[Path]:
    """Fig. 2(a): heat maps of the activation before | after the LLM layer, one picture for each of the first
    `count` cases. A bottleneck of fewer than MIN_MAP_TOKENS tokens a side, upsampled to the image, is a
    smooth gradient that shows nothing: the picture and the log say so."""
    paths, note = [], None
    for index in range(min(count, len(dataset))):
        item = dataset[index]
        predict(net, item["image"][None], device, precision)  # fills `features`
        image = to_rgb(item["image"])
        tokens = tuple(features.before.shape[-2:])
        if note is None and min(tokens) < MIN_MAP_TOKENS:
            note = f"bottleneck {tokens[0]} x {tokens[1]} tokens: too coarse to show where the layer looks"
            print(f"activation maps: the {note}; a larger --img-size gives a finer map")
        before, after = (upsample_map(activation_map(tensor), image.shape[:2])[0]            # (S, S) each
                         for tensor in (features.before, features.after))
        paths.append(folder / f"{file_stem(item['name'])}.png")
        heatmap_pair_png(image, before, after, paths[-1], note=note)
    return paths


def print_report(report: dict, analysis: dict | None) -> None:
    """The one-screen summary: the paper's metrics in %, HD95 in pixels, the computation, the analysis."""
    checkpoint, computation = report["checkpoint"], report["computation"]
    print(f"{report['run_dir']}: {report['split']} split, {report['images']} images, checkpoint "
          f"{checkpoint['name']} (epoch {checkpoint['epoch']}, step {checkpoint['global_step']})")
    if "per_class" in report:
        print_classes(report)
    print(f"  {'metric':<10}{'mean':>8} ± std")
    for key in report["metrics"]:
        label, scale, unit = LABELS[key]
        unit = report["conventions"]["distance_unit"] if key == "hd95" else unit
        value = report["metrics"][key]
        if value.get("n", 1) == 0:  # MONAI's 0 over nothing is no score: say so
            print(f"  {label:<5}{unit:>4}      n/a   (no case has one)")
            continue
        print(f"  {label:<5}{unit:>4} {value['mean'] * scale:8.2f} ± {value['std'] * scale:.2f}")
    if "pooled_iou" in report:
        print(f"  pooled over pixels: IoU {report['pooled_iou'] * 100:.2f} %, Dice {report['pooled_dice'] * 100:.2f} %")
        print(f"  trivial predictors: IoU {report['all_foreground_iou'] * 100:.2f} % all foreground, "
              f"{report['all_background_iou'] * 100:.2f} % all background")
    print(f"  {computation['trainable_params']:,} trainable + {computation['frozen_params']:,} frozen parameters, "
          f"{computation['gmacs']:.2f} G MACs at {'x'.join(map(str, computation['input_shape']))}")
    if analysis:
        print(f"  {'bottleneck features':<20}{'before':>8}{'after':>8}   (LLM layer)")
        for name in ANALYSED:
            print(f"  {name:<20}{analysis['before'][name]['mean']:8.3f}{analysis['after'][name]['mean']:8.3f}")




def print_classes(report: dict) -> None:
    """The per-organ table (Dice and IoU in %, HD95 in the run's distance unit, NSD in %) and their mean."""
    unit = report["conventions"]["distance_unit"]
    print(f"  {'class':<28}{'Dice %':>8}{'IoU %':>8}{'HD95 ' + unit:>10}{'NSD %':>8}")
    for name, scores in report["per_class"].items():
        print(f"  {name:<28}{scores['dice'] * 100:8.2f}{scores['iou'] * 100:8.2f}{scores['hd95']:10.2f}"
              f"{scores['nsd'] * 100:8.2f}")
    print(f"  {'mean over the foreground':<28}{report['dice'] * 100:8.2f}")


def make_parser():
    p = one_line_error_parser("Evaluate a run of train.py (see the module docstring for examples).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by train.py")
    p.add_argument("--split", default="val", choices=("val", "test"), help="which cases to evaluate")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"),
                   help="best validation IoU, or the latest epoch")
    p.add_argument("--data-dir", default=None, help="dataset root; None means where the run read it")
    p.add_argument("--samples", type=int, default=0, metavar="N",
                   help="write N overlay PNGs: the ceil(N/2) worst and floor(N/2) best cases by IoU")
    p.add_argument("--analyze", action="store_true",
                   help="activation maps, concentration IoU, effective rank and LSVR before and after the LLM layer")
    p.add_argument("--maps", type=int, default=4, metavar="N", help="with --analyze: heat maps of the first N cases")
    p.add_argument("--empty-cases", default="monai", choices=EMPTY_CONVENTIONS,
                   help="HD95 / NSD of a case with an empty mask: MONAI's (NaN HD95; NSD 0 for one empty mask, NaN "
                        "for two) or 'diagonal' (HD95 = the image diagonal for one empty mask, 0 for two; NSD 0 / 1)")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="segment the images of DIR instead of evaluating a split (masks at each image's size; "
                        "for a 3D run, NIfTI label maps of its *.nii / *.nii.gz volumes on their own grids)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="with --images: where the masks go; None means RUN_DIR/predict-<DIR's name>")
    p.add_argument("--probabilities", action="store_true",
                   help="with --images: also write <stem>_probability.png (probability * 255)")
    add_runtime_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit code 0 when done, 1 when --images skipped unreadable files or the disk refused a file, 2 for what the
    user can fix (each said in one line on stderr)."""
    args = make_parser().parse_args(argv)
    try:
        if args.images is None and (args.out is not None or args.probabilities):
            raise ValueError("--out and --probabilities go with --images DIR (segmenting new images)")
        return predict_images(args) if args.images is not None else evaluate_run(args)
    except WriteError as error:  # the disk (full, a file-size limit): what was written before is whole
        return disk_error(error)
    except USER_ERRORS as error:
        return user_error(error)


if __name__ == "__main__":
    sys.exit(main())
