"""sweep.py end to end on a tiny grid (2 modes x 2 seeds, 2 epochs, 32 px, the 2-layer test Llama), and
metrics.paired_difference on cases whose answer is known.

One run is started beforehand and stopped after its first epoch, as a killed sweep leaves it: the sweep
must resume it, not start it again. A second sweep over the same grid, run as a user runs it
(`python sweep.py`), must train nothing. The grid's train.py / eval.py commands run in this process
(sweep.run_child replaced: the same argv, ~5 s less per run than a new Python).
"""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import eval as ev
import sweep
import train
from llm4seg.metrics import paired_difference

REPO = Path(__file__).resolve().parents[1]


def grid(out: Path, tiny_llm: Path) -> list[str]:
    return ["--out", str(out), "--data", "synthetic", "--synthetic-size", "10", "--img-size", "32", "--epochs", "2",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--precision", "fp32",
            "--llm", str(tiny_llm), "--layer", "2", "--mode", "none", "frozen", "--seeds", "41", "42"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_llm):
    out = tmp_path_factory.mktemp("sweep")
    argv = grid(out, tiny_llm)
    _, varying, fixed = sweep.parse_sweep(argv)
    stopped = out / "runs" / "mode-frozen_seed42"
    assert train.main(["--mode", "frozen", *fixed, "--seed", "42", "--out", str(stopped), "--stop-after-epoch", "1"]) == 0
    first_epoch = (stopped / "metrics.jsonl").read_text()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep, "run_child", in_this_process)
        assert sweep.main(argv) == 0
    return out, argv, first_epoch


def in_this_process(command: list[str]) -> int:
    """sweep.run_child's stand-in: [python, <repo>/train.py | eval.py, *argv] -> that script's main(argv)."""
    script = {"train.py": train, "eval.py": ev}[Path(command[1]).name]
    return script.main(command[2:])


def test_every_run_finished_and_the_stopped_one_was_resumed(swept):
    out, _, first_epoch = swept
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["mode-frozen_seed41", "mode-frozen_seed42", "mode-none_seed41", "mode-none_seed42"]
    for name in runs:
        lines = (out / "runs" / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
        assert (out / "runs" / name / "eval-val" / "per_image.csv").is_file()
        assert (out / "runs" / name / "curves.png").is_file()
        assert (out / "runs" / name / "eval-val" / "analysis.json").is_file() == ("frozen" in name)  # --analyze
    # Resumed, not restarted: its first epoch's line is the one written before the "kill".
    assert (out / "runs" / "mode-frozen_seed42" / "metrics.jsonl").read_text().startswith(first_epoch)


def test_the_table_equals_a_hand_computation_from_the_per_image_csvs(swept):
    out, _, _ = swept
    table = {row["mode"]: row for row in read_csv(out / "table.csv")}
    ious = {(mode, seed): {row["case"]: float(row["iou"]) for row in
                           read_csv(out / "runs" / f"mode-{mode}_seed{seed}" / "eval-val" / "per_image.csv")}
            for mode in ("none", "frozen") for seed in (41, 42)}
    for mode in ("none", "frozen"):
        per_seed = [np.mean(list(ious[mode, seed].values())) for seed in (41, 42)]
        assert float(table[mode]["iou_mean"]) == pytest.approx(np.mean(per_seed), abs=1e-12)
        assert float(table[mode]["iou_std"]) == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
        assert int(table[mode]["seeds"]) == 2
    differences = [ious["frozen", seed][case] - ious["none", seed][case] for seed in (41, 42) for case in ious["none", seed]]
    expected = paired_difference(differences)
    assert float(table["frozen"]["iou_diff"]) == pytest.approx(expected["mean"], abs=1e-12)
    assert float(table["frozen"]["p_value"]) == pytest.approx(expected["p_value"])
    assert int(table["frozen"]["paired_images"]) == len(differences) == 2 * 2  # 2 validation images per seed
    assert table["none"]["iou_diff"] == ""  # the baseline: the first setting
    assert int(table["none"]["frozen_params"]) == 0 and int(table["frozen"]["frozen_params"]) > 0
    markdown = (out / "table.md").read_text()
    assert "| mode none | 2 |" in markdown and "baseline" in markdown
    for name in ("iou_by_setting.png", "spectra.png"):
        with Image.open(out / name) as picture:
            picture.verify()


def test_a_second_sweep_from_the_command_line_trains_nothing(swept):
    """`python sweep.py` as a user runs it, over the finished grid: every run is skipped, the table redone."""
    out, argv, _ = swept
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.safetensors")}
    (out / "table.md").unlink()
    result = subprocess.run([sys.executable, str(REPO / "sweep.py"), *argv], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.safetensors")} == before
    assert result.stdout.count("finished before, skipping") == 4 and (out / "table.md").is_file()


def test_a_sweep_with_other_settings_in_the_same_out_is_refused(swept, capsys):
    out, argv, _ = swept
    changed = list(argv)
    changed[changed.index("--epochs") + 1] = "3"
    assert sweep.main(changed) == 2
    assert "was trained with --epochs 2, this sweep asks for 3" in capsys.readouterr().err


def test_run_child_returns_the_scripts_exit_code():
    assert sweep.run_child([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3


@pytest.mark.parametrize("extra, message", [
    (["--seed", "3"], "--seed is set by the sweep"),
    (["--bogus", "1"], "--bogus is not a train.py flag"),
    (["--residual", "yes"], "--residual is a switch"),
    (["--lora-rank", "3-1"], "expected a range A-B with A <= B"),
    (["--img-size", "48"], "--img-size is given twice"),
    (["--baseline", "mode=trainable"], "matches no setting"),
    (["--baseline", "none"], "expected FLAG=VALUE pairs"),
])
def test_bad_sweeps_are_refused_before_any_run(tmp_path, tiny_llm, capsys, extra, message):
    assert sweep.main(grid(tmp_path, tiny_llm) + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_bad_value_in_the_grid_is_refused_by_train_pys_own_checks(tmp_path, tiny_llm, capsys):
    argv = grid(tmp_path, tiny_llm)
    argv[argv.index("--img-size") + 1: argv.index("--img-size") + 2] = ["32", "30"]
    assert sweep.main(argv) == 2
    assert "--img-size: got 30x30" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_dry_run_lists_the_grid_with_layer_ranges(tmp_path, tiny_llm, capsys):
    argv = grid(tmp_path, tiny_llm)
    argv[argv.index("--layer"):argv.index("--layer") + 2] = ["--layers", "1-2"]
    assert sweep.main(argv + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    # mode none x layers 1, 2 is one plain backbone: trained once, not once per layer it ignores
    assert "layer 2, mode none is the plain backbone of layer 1, mode none: trained once" in printed
    assert "6 runs (3 settings x 2 seeds)" in printed and "layer-2_mode-frozen_seed42" in printed
    assert "layer-2_mode-none" not in printed


# --- the statistics -------------------------------------------------------------------------------


def test_paired_difference_on_cases_with_known_answers():
    # Four equal gains: every resample has mean 1; of the 2^4 sign patterns only all + and all - reach |1|.
    assert paired_difference([1.0, 1.0, 1.0, 1.0]) == {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0,
                                                       "p_value": 2 / 16, "n": 4}
    # Gains and losses that cancel: mean 0, every pattern reaches it, p = 1.
    assert paired_difference([0.5, -0.5, 1.0, -1.0])["p_value"] == 1.0
    # Many units: the Monte Carlo p of a clear gain is its floor 1 / (1 + resamples); of noise, large.
    rng = np.random.default_rng(0)
    clear = paired_difference(0.05 + 0.01 * rng.standard_normal(100), resamples=2000)
    assert clear["p_value"] == 1 / 2001 and 0.047 < clear["ci_low"] < clear["mean"] < clear["ci_high"] < 0.053
    noise = paired_difference(rng.standard_normal(100), resamples=2000)
    assert noise["p_value"] > 0.05 and noise["ci_low"] < 0 < noise["ci_high"]
    with pytest.raises(ValueError, match="no paired units"):
        paired_difference([])


DAMAGES = {
    "empty per_image.csv": ("per_image.csv", lambda data: b""),
    "cut per_image.csv": ("per_image.csv", lambda data: data[: len(data) * 2 // 3]),
    "cut metrics.json": ("metrics.json", lambda data: data[: len(data) // 2]),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_eval_outputs_are_evaluated_again(swept, tmp_path, capsys, damage):
    """A cut or emptied per_image.csv / metrics.json of a finished run (issue 31, item 19): one line naming the
    file and the run, the run evaluated again, the table as before; no traceback."""
    out, argv, _ = swept
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    name, cut = DAMAGES[damage]
    damaged = copy / "runs" / "mode-frozen_seed41" / "eval-val" / name
    damaged.write_bytes(cut(damaged.read_bytes()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep, "run_child", in_this_process)
        assert sweep.main([*argv[:1], str(copy), *argv[2:]]) == 0
    printed = capsys.readouterr().out
    assert f"sweep: {damaged} of the run mode-frozen_seed41 is damaged" in printed
    assert "evaluating mode-frozen_seed41 again" in printed
    assert read_csv(copy / "table.csv") == read_csv(out / "table.csv")


def test_a_run_that_cannot_be_evaluated_leaves_the_complete_table_as_it_was(swept, tmp_path, capsys):
    """The damage stays (eval.py fails): the run is left out in one line, exit 1, and the complete sweep's table.md
    is kept; the table of the runs that remain goes to table-partial.md."""
    out, argv, _ = swept
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    (copy / "runs" / "mode-none_seed42" / "eval-val" / "per_image.csv").write_bytes(b"case,iou\n")
    before = (copy / "table.md").read_bytes()

    def eval_fails(command):
        return 2 if Path(command[1]).name == "eval.py" else in_this_process(command)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep, "run_child", eval_fails)
        assert sweep.main([*argv[:1], str(copy), *argv[2:]]) == 1
    captured = capsys.readouterr()
    assert "sweep: mode-none_seed42 failed (eval.py exit 2): left out of the table" in captured.err
    assert (copy / "table.md").read_bytes() == before
    assert "(failed: mode-none_seed42)" in (copy / "table-partial.md").read_text()


def test_a_multi_class_sweep_compares_dice_as_well_as_iou(tmp_path):
    """BTCV is reported in Dice (issue 31, item 13): multi-class runs get ΔDice with its CI and p beside ΔIoU,
    from the same (seed, image) pairs; binary sweeps keep their table as it was."""
    from types import SimpleNamespace

    from llm4seg import sweeps

    computation = {"trainable_params": 1, "frozen_params": 0, "gmacs": 0.1}

    def run(mode: str, dice: list[float]) -> sweeps.Run:
        rows = [{"case": f"c{i}", "iou": d / (2 - d), "dice": d, "hd95": 1.0, "nsd": 0.9, "dice/liver": d}
                for i, d in enumerate(dice)]
        return sweeps.Run((mode,), 41, [], tmp_path / mode, "done", rows, computation, "mm")

    base, frozen = run("none", [0.8, 0.7, 0.9, 0.6]), run("frozen", [0.7, 0.7, 0.8, 0.5])
    args = SimpleNamespace(resamples=1000)
    rows = sweeps.summarise(args, [("--mode", ["none", "frozen"])], [base, frozen], ("none",))
    expected = paired_difference([0.7 - 0.8, 0.0, 0.8 - 0.9, 0.5 - 0.6], resamples=1000)
    assert rows[1]["dice_diff"] == pytest.approx(expected["mean"]) and rows[1]["dice_p_value"] == expected["p_value"]
    assert "dice_diff" not in rows[0] and "iou_diff" in rows[1]
    text = sweeps.write_tables(rows, tmp_path, "mode none", "val", "mm")
    assert "| mode frozen | -7.50 [" in text.split("ΔDice % against")[1]
    binary = [sweeps.Run(r.setting, 41, [], r.run_dir, "done",
                         [{k: v for k, v in row.items() if k != "dice/liver"} for row in r.per_image], computation)
              for r in (base, frozen)]
    rows = sweeps.summarise(args, [("--mode", ["none", "frozen"])], binary, ("none",))
    assert "dice_diff" not in rows[1] and "ΔDice" not in sweeps.write_tables(rows, tmp_path, "mode none", "val")


def test_evaluations_of_an_earlier_empty_case_convention_are_evaluated_again(swept, tmp_path, capsys):
    """A metrics.json written before MONAI's empty-case values became the default would mix two conventions in one
    table: such a run is evaluated again."""
    out, argv, _ = swept
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    report = copy / "runs" / "mode-none_seed41" / "eval-val" / "metrics.json"
    written = json.loads(report.read_text())
    written["conventions"]["empty_cases"] = "see metrics.py's docstring"  # what earlier versions wrote
    report.write_text(json.dumps(written))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep, "run_child", in_this_process)
        assert sweep.main([*argv[:1], str(copy), *argv[2:]]) == 0
    assert "scores empty masks by an earlier convention; evaluating mode-none_seed41 again" in capsys.readouterr().out
    assert json.loads(report.read_text())["conventions"]["empty_cases"] == "monai"


def test_a_run_folder_another_train_py_holds_is_not_deleted(swept, tmp_path, capsys):
    """A run without `last` is started afresh, its folder deleted first; not while another sweep's train.py holds
    it (its lock): that run is left out in one line and its folder kept."""
    from llm4seg.checkpoints import run_dir_lock

    out, argv, _ = swept
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    busy = copy / "runs" / "mode-frozen_seed41"
    (busy / "last.safetensors").unlink()  # as in its first epoch
    with run_dir_lock(busy), pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep, "run_child", in_this_process)
        assert sweep.main([*argv[:1], str(copy), *argv[2:]]) == 1
    assert "mode-frozen_seed41 failed (" in capsys.readouterr().err and (busy / "config.json").is_file()
