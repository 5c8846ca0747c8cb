"""A sweep's results (sweep.py runs the grid): each run's record, the table of settings with their paired
statistics against a baseline, and the plots.

    Run                      one run of the grid: its setting, seed, directory, status and, once evaluated, its
                             per-image rows (eval.py's per_image.csv) and computation report (metrics.json)
    summarise(...)           one row per setting: the seeds' mean ± std of each run's mean metric, the model's
                             size, and ΔIoU against the baseline with its bootstrap CI and sign-flip p
                             (metrics.paired_difference over the (seed, image) pairs two settings share);
                             multi-class, ΔDice too (the paper reports BTCV in Dice)
    write_tables(...)        OUT/table.md and table.csv (multi-class: Dice per class below)
    plot(...)                iou_by_setting.png (per seed, and the paired ΔIoU as a forest plot), iou_by_layer.png
                             when --layer varies, spectra.png of the bottleneck analysis
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .files import write_csv, write_text
from .metrics import paired_difference
from .pictures import pyplot, save_figure

REPORTED = ("iou", "dice", "hd95", "nsd")


@dataclass
class Run:
    setting: tuple            # the varying flags' values, in grid order
    seed: int
    train_argv: list[str]     # train.py's flags for this run (without --out)
    run_dir: Path
    status: str = "pending"   # then: done, failed (exit code)
    per_image: list[dict] = field(default_factory=list)
    computation: dict = field(default_factory=dict)
    distance_unit: str = "px"     # of HD95: mm on volumes


# ----------------------------------------------------------------------------------------------
# The table


def setting_label(varying, setting: tuple) -> str:
    return ", ".join(f"{flag.lstrip('-')} {value}" for (flag, _), value in zip(varying, setting, strict=True)) or "all runs"


def find_baseline(args, varying, settings: list[tuple]) -> tuple:
    if args.baseline is None:
        return settings[0]
    if not all("=" in part for part in args.baseline.split(",")):
        raise ValueError(f"--baseline {args.baseline}: expected FLAG=VALUE pairs, e.g. mode=none or mode=none,layer=15")
    wanted = dict(part.split("=", 1) for part in args.baseline.split(","))
    names = [flag.lstrip("-") for flag, _ in varying]
    unknown = set(wanted) - set(names)
    if unknown:
        raise ValueError(f"--baseline {args.baseline}: {', '.join(sorted(unknown))} is not a varying flag "
                         f"(these vary: {', '.join(names)})")
    for setting in settings:
        if all(setting[names.index(name)] == value for name, value in wanted.items()):
            return setting
    raise ValueError(f"--baseline {args.baseline} matches no setting of the grid")


def paired_differences(runs: list[Run], baseline_runs: list[Run], metric: str = "iou") -> list[float]:
    """`metric` differences on the (seed, image) pairs two settings share."""
    by_seed = {run.seed: {row["case"]: row[metric] for row in run.per_image} for run in baseline_runs}
    differences = [row[metric] - by_seed[run.seed][row["case"]] for run in runs if run.seed in by_seed
                   for row in run.per_image if row["case"] in by_seed[run.seed]]
    return [d for d in differences if not np.isnan(d)]  # a multi-class case with no class in its truth: NaN


def run_mean(run: Run, metric: str) -> float:
    """A run's score: its mean over images (multi-class: over the images whose truth holds the class)."""
    values = np.array([image[metric] for image in run.per_image], dtype=np.float64)
    values = values[~np.isnan(values)]  # HD95 of an empty mask, a class absent from a case's truth
    return float(values.mean()) if len(values) else float("nan")  # "n/a" in the table


def class_columns(runs: list[Run]) -> list[str]:
    """The per-class Dice columns of multi-class runs' per_image.csv ("dice/spleen", ...), else none."""
    done = [run for run in runs if run.status == "done" and run.per_image]
    return [key for key in done[0].per_image[0] if key.startswith("dice/")] if done else []


def summarise(args, varying, runs: list[Run], baseline: tuple) -> list[dict]:
    """One row per setting: the seeds' mean ± std of each run's mean metric, the model's size, and the
    paired comparison with the baseline setting."""
    settings = list(dict.fromkeys(run.setting for run in runs))
    done = [run for run in runs if run.status == "done"]
    rows = []
    for setting in settings:
        mine = [run for run in done if run.setting == setting]
        failed = [run.run_dir.name for run in runs if run.setting == setting and run.status != "done"]
        row = {"setting": setting_label(varying, setting),
               **{flag.lstrip("-"): value for (flag, _), value in zip(varying, setting, strict=True)},
               "seeds": len(mine), "failed": " ".join(failed)}
        for metric in (*REPORTED, *class_columns(runs)):
            per_seed = [run_mean(run, metric) for run in mine]
            row[f"{metric}_mean"] = float(np.mean(per_seed)) if per_seed else float("nan")
            row[f"{metric}_std"] = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan")
        if mine:
            row |= {key: mine[0].computation[key] for key in ("trainable_params", "frozen_params", "gmacs")}
        if setting != baseline and mine:
            row |= compared_with(mine, [run for run in done if run.setting == baseline], bool(class_columns(runs)),
                                 args.resamples)
        rows.append(row)
    return rows


def compared_with(mine: list[Run], base: list[Run], multiclass: bool, resamples: int) -> dict:
    """ΔIoU against the baseline's runs ("iou_diff", its CI, "p_value", "paired_images") and, for multi-class runs
    (Table 2 reports BTCV in Dice), ΔDice ("dice_diff", its CI, "dice_p_value")."""
    found = {}
    for metric, p_key in (("iou", "p_value"), *((("dice", "dice_p_value"),) if multiclass else ())):
        differences = paired_differences(mine, base, metric)
        if differences:
            test = paired_difference(differences, resamples=resamples)
            found |= {f"{metric}_diff": test["mean"], f"{metric}_diff_ci_low": test["ci_low"],
                      f"{metric}_diff_ci_high": test["ci_high"], p_key: test["p_value"]}
            found.setdefault("paired_images", test["n"])
    return found


def write_tables(rows: list[dict], out: Path, baseline_label: str, split: str, distance_unit: str = "px",
                 stem: str = "table") -> str:
    """OUT/<stem>.csv and OUT/<stem>.md (returned too)."""
    write_csv(rows, out / f"{stem}.csv")

    def pm(row, metric, scale):
        mean, std = row[f"{metric}_mean"] * scale, row[f"{metric}_std"] * scale
        return "n/a" if np.isnan(mean) else f"{mean:.2f}" + ("" if np.isnan(std) else f" ± {std:.2f}")

    lines = [f"Evaluated on the {split} split. Mean ± std over seeds (each seed: its run's mean over images); "
             f"ΔIoU against \"{baseline_label}\": mean over (seed, image) pairs, 95 % CI by paired bootstrap, "
             f"p by sign-flip permutation test.", "",
             f"| setting | seeds | IoU % | Dice % | HD95 {distance_unit} | NSD % | trainable | frozen | G MACs | ΔIoU % [95 % CI] | p |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "iou_diff" in row:
            diff = (f"{row['iou_diff'] * 100:+.2f} [{row['iou_diff_ci_low'] * 100:+.2f}, "
                    f"{row['iou_diff_ci_high'] * 100:+.2f}]")
            p = f"{row['p_value']:.3g}"
        else:
            diff, p = ("baseline", "") if row["setting"] == baseline_label else ("n/a", "")
        size = ([f"{row['trainable_params']:,}", f"{row['frozen_params']:,}", f"{row['gmacs']:.2f}"]
                if "gmacs" in row else ["n/a"] * 3)
        failed = f" (failed: {row['failed']})" if row["failed"] else ""
        lines.append(f"| {row['setting']}{failed} | {row['seeds']} | {pm(row, 'iou', 100)} | {pm(row, 'dice', 100)} | "
                     f"{pm(row, 'hd95', 1)} | {pm(row, 'nsd', 100)} | {' | '.join(size)} | {diff} | {p} |")
    organs = [key.removesuffix("_mean") for key in rows[0] if key.startswith("dice/") and key.endswith("_mean")]
    if organs:  # multi-class: Table 2's number is the mean Dice over the organs; here each organ's
        lines += ["", "Dice % per class, mean ± std over seeds:", "",
                  "| setting | " + " | ".join(key.removeprefix("dice/") for key in organs) + " |",
                  "|---|" + "---|" * len(organs)]
        lines += [f"| {row['setting']} | " + " | ".join(pm(row, key, 100) for key in organs) + " |" for row in rows]
        lines += ["", f"ΔDice % against \"{baseline_label}\" (mean Dice over the organs; paired as ΔIoU):", "",
                  "| setting | ΔDice % [95 % CI] | p |", "|---|---|---|"]
        lines += [f"| {row['setting']} | {row['dice_diff'] * 100:+.2f} [{row['dice_diff_ci_low'] * 100:+.2f}, "
                  f"{row['dice_diff_ci_high'] * 100:+.2f}] | {row['dice_p_value']:.3g} |"
                  for row in rows if "dice_diff" in row]
    text = "\n".join(lines) + "\n"
    write_text(out / f"{stem}.md", text)
    return text


# ----------------------------------------------------------------------------------------------
# Plots


def plot(varying, runs: list[Run], rows: list[dict], out: Path) -> list[Path]:
    plt = pyplot()

    done = [run for run in runs if run.status == "done"]
    settings = list(dict.fromkeys(run.setting for run in runs))
    labels = [setting_label(varying, s) for s in settings]
    per_seed = [[run_mean(run, "iou") for run in done if run.setting == s] for s in settings]
    written = []
    # Left: each seed's IoU and their mean; right: the table's message, the paired ΔIoU against the baseline
    # with its 95 % interval (a forest plot), which two dots per setting cannot show.
    figure, (points, forest) = plt.subplots(1, 2, figsize=(max(8, 2 * len(settings)), 4), sharey=False)
    for x, values in enumerate(per_seed, 1):
        points.plot([x] * len(values), values, "o", color="tab:blue", alpha=0.6)
        if values:
            points.plot([x - 0.25, x + 0.25], [np.mean(values)] * 2, color="black")
    points.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right")
    points.set_ylabel("IoU, each seed's run mean over images")
    points.set_title("per seed (line: mean)")
    compared = [(label, row) for label, row in zip(labels, rows, strict=True) if "iou_diff" in row]
    for y, (_, row) in enumerate(compared):
        low, high = row["iou_diff_ci_low"] * 100, row["iou_diff_ci_high"] * 100
        forest.plot([low, high], [y, y], color="tab:blue")
        forest.plot(row["iou_diff"] * 100, y, "o", color="tab:blue")
    forest.axvline(0, color="gray", linestyle="--")
    forest.set_yticks(range(len(compared)), [f"{label} (p {row['p_value']:.2g})" for label, row in compared])
    forest.set_xlabel("ΔIoU % vs the baseline, 95 % CI (paired)")
    forest.set_title("is the gain real?")
    figure.tight_layout()
    written.append(out / "iou_by_setting.png")
    save_figure(figure, written[-1])
    plt.close(figure)

    names = [flag for flag, _ in varying]
    if "--layer" in names:
        at = names.index("--layer")
        figure, axes = plt.subplots(figsize=(6, 4))
        others = list(dict.fromkeys(s[:at] + s[at + 1:] for s in settings))
        for other in others:
            points = [(int(s[at]), values) for s, values in zip(settings, per_seed, strict=True) if s[:at] + s[at + 1:] == other and values]
            layers = [layer for layer, _ in points]
            means = np.array([np.mean(values) for _, values in points])
            stds = np.array([np.std(values, ddof=1) if len(values) > 1 else 0.0 for _, values in points])
            axes.errorbar(layers, means, yerr=stds, marker="o", capsize=3,
                          label=setting_label(varying[:at] + varying[at + 1:], other))
        axes.set_xlabel("LLM layer (1-based)")
        axes.set_ylabel("IoU, mean ± std over seeds")
        if any(others[0]):
            axes.legend()
        figure.tight_layout()
        written.append(out / "iou_by_layer.png")
        save_figure(figure, written[-1])
        plt.close(figure)

    analysed = [s for s in settings if any("effective_rank_after" in run.per_image[0] for run in done if run.setting == s)]
    if analysed:
        figure, axes = plt.subplots(1, 2, figsize=(max(7, 2 * len(analysed)), 4))
        for axis, (name, title) in zip(axes, (("effective_rank", "effective rank"), ("lsvr", "LSVR")), strict=True):
            positions = np.arange(len(analysed)) * 3.0
            for offset, when, colour in ((-0.5, "before", "tab:gray"), (0.5, "after", "tab:blue")):
                data = [[r[f"{name}_{when}"] for run in done if run.setting == s for r in run.per_image] for s in analysed]
                boxes = axis.boxplot(data, positions=positions + offset, widths=0.8, patch_artist=True)
                for box in boxes["boxes"]:
                    box.set_facecolor(colour)
                axis.plot([], [], "s", color=colour, label=f"{when} the LLM layer")
            axis.set_xticks(positions, [setting_label(varying, s) for s in analysed], rotation=30, ha="right")
            axis.set_ylabel(f"{title} of the bottleneck features (per image)")
            axis.set_title(title)
            axis.legend()
        figure.tight_layout()
        written.append(out / "spectra.png")
        save_figure(figure, written[-1])
        plt.close(figure)
    return written
