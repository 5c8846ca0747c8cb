"""Tests of eval.py: the command line end to end on tiny runs trained by train.py, and its choice
of cases to draw."""
import contextlib
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import train
from checkpoints import load_run
from data import load_dataset, normalize

# Singular values of float32 rank-deficient maps leave ~1e-7 residues that add ~1e-5 of entropy.
SPECTRUM_TOL = 1e-4


# --- the command line, end to end on tiny trained runs ---------------------------------------------
# Runs: synthetic polyps at 64 x 64 (10 cases: 7 train / 2 val / 1 test), batch 4, 1 epoch, CPU, one
# thread (two OpenMP threads beside another busy process on this 2-core machine are ~20x slower),
# with the paper's layer 2 of a 2-layer Llama of hidden size 64 saved by transformers.

IMG_SIZE = 64
VAL_CASES, TEST_CASES = 2, 1


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tiny_llm) -> dict:
    """{"llm": a CMUNeXt + tiny-Llama-layer run, "plain": a plain CMUNeXt run}, 1 epoch each."""
    root = tmp_path_factory.mktemp("eval-runs")
    runs = {"llm": root / "llm", "plain": root / "plain"}
    with one_thread():
        for name, llm_flag in (("llm", str(tiny_llm)), ("plain", "none")):
            assert train.main(["--data", "synthetic", "--synthetic-size", "10", "--llm", llm_flag, "--layer", "2",
                               "--img-size", str(IMG_SIZE), "--batch-size", "4", "--workers", "0", "--device", "cpu", "--precision", "fp32",
                               "--epochs", "1", "--out", str(runs[name])]) == 0
    return runs


def run_eval(run_dir, *flags) -> int:
    with one_thread():
        return ev.main([str(run_dir), "--workers", "0", "--device", "cpu", "--precision", "fp32", *flags])


@pytest.fixture(scope="session")
def evaluated(tiny_runs) -> Path:
    """eval-val of the LLM run, with 2 overlays and the analysis."""
    assert run_eval(tiny_runs["llm"], "--samples", "2", "--analyze") == 0
    return tiny_runs["llm"] / "eval-val"


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_json_holds_every_metric_in_range_and_the_checkpoint(evaluated):
    report = json.loads((evaluated / "metrics.json").read_text())
    assert report["split"] == "val" and report["images"] == VAL_CASES
    assert report["checkpoint"] == {"name": "best", "epoch": 1, "global_step": 2}  # 7 cases / batch 4
    assert set(report["metrics"]) == {"iou", "dice", "f1", "sensitivity", "precision", "specificity",
                                      "accuracy", "hd95", "nsd"}
    for name, value in report["metrics"].items():
        upper = math.hypot(IMG_SIZE, IMG_SIZE) if name == "hd95" else 1.0  # HD95 at most the diagonal
        assert 0 <= value["mean"] <= upper and 0 <= value["std"] <= upper, name
    assert 0 <= report["pooled_iou"] <= 1 and 0 <= report["pooled_dice"] <= 1
    # The trivial predictors' IoU, from the masks alone: all foreground scores |G| / (H W) per image,
    # all background 0 (1 on an empty mask, by the authors' smoothing).
    masks = [case["mask"] for case in load_dataset("synthetic", None, "val", IMG_SIZE, 41, synthetic_size=10)]
    assert report["all_foreground_iou"] == pytest.approx(np.mean([(m.sum() + 1e-5) / (m.numel() + 1e-5) for m in masks]))
    assert report["all_background_iou"] == pytest.approx(np.mean([float(m.sum() == 0) for m in masks]), abs=1e-6)
    computation = report["computation"]
    # The counts train.py prints for this run (tests/test_train.py): 36,992 = one layer at D = 64.
    assert (computation["trainable_params"], computation["frozen_params"]) == (3_182_273, 36_992)
    assert computation["input_shape"] == [1, 3, IMG_SIZE, IMG_SIZE]


def test_per_image_csv_has_one_row_per_case_and_the_means_of_metrics_json(evaluated):
    rows = read_csv(evaluated / "per_image.csv")
    cases = load_dataset("synthetic", None, "val", IMG_SIZE, 41, synthetic_size=10)
    assert [row["case"] for row in rows] == [cases[i]["name"] for i in range(len(cases))]
    report = json.loads((evaluated / "metrics.json").read_text())
    for name, value in report["metrics"].items():
        column = np.array([float(row[name]) for row in rows])
        assert column.mean() == pytest.approx(value["mean"], rel=1e-12, abs=1e-12), name


def test_samples_are_the_worst_and_best_cases_as_enlarged_panels(evaluated):
    rows = sorted(read_csv(evaluated / "per_image.csv"), key=lambda row: float(row["iou"]))
    expected = [f"best-01_{rows[-1]['case']}.png", f"worst-01_{rows[0]['case']}.png"]
    assert sorted(path.name for path in (evaluated / "samples").iterdir()) == expected
    for name in expected:
        with Image.open(evaluated / "samples" / name) as picture:  # 4 panels of 64 px enlarged to 256, 4 px apart
            assert picture.size == (4 * 256 + 3 * 4, 256) and picture.mode == "RGB"


def test_analyze_writes_finite_numbers_before_and_after_and_heat_maps(evaluated):
    analysis = json.loads((evaluated / "analysis.json").read_text())
    assert analysis["images"] == VAL_CASES and analysis["concentration_threshold"] == 0.4
    for when in ("before", "after"):
        assert set(analysis[when]) == {"concentration_iou", "effective_rank", "lsvr"}
        values = analysis[when]
        assert 0 <= values["concentration_iou"]["mean"] <= 1
        # A 4 x 4 bottleneck map: ER between 1 and 4, LSVR between 0 and log 4.
        assert 1 - SPECTRUM_TOL <= values["effective_rank"]["mean"] <= 4 + SPECTRUM_TOL
        assert -SPECTRUM_TOL <= values["lsvr"]["mean"] <= math.log(4) + SPECTRUM_TOL
        assert all(math.isfinite(v) for value in values.values() for v in value.values())
    maps = sorted((evaluated / "activations").iterdir())
    assert len(maps) == 2 * VAL_CASES and [str(p.relative_to(evaluated)) for p in maps] == sorted(
        analysis["activation_maps"])
    for path in maps:
        with Image.open(path) as picture:
            assert picture.size == (256, 256)  # 64 px enlarged 4 times


def test_gmacs_of_backbone_and_bridge_by_hand(tiny_runs, evaluated):
    """Plain CMUNeXt: model.py's measured 7.23 G MACs at 256 x 256, divided by 16 at 64 x 64 (a conv's MACs
    scale with its output pixels). The bridge at N = 4 x 4 = 16 tokens, C = 256, D = 64, 4 q heads of 16 and
    2 kv heads, intermediate 128 adds:
        adapters         2 N C D         = 524,288
        q, o / k, v      2 N D D + 2 N D 32 = 131,072 + 65,536
        MLP              3 N D 128       = 393,216
        attention        2 * 4 * N N 16  = 32,768       (q k^T and P v)
    total 1,146,880."""
    assert run_eval(tiny_runs["plain"]) == 0
    plain = json.loads((tiny_runs["plain"] / "eval-val" / "metrics.json").read_text())["computation"]
    bridged = json.loads((evaluated / "metrics.json").read_text())["computation"]
    assert plain["gmacs"] * 16 == pytest.approx(7.23, abs=0.005)  # model.py's table rounds to 2 decimals
    assert (bridged["gmacs"] - plain["gmacs"]) * 1e9 == pytest.approx(1_146_880, abs=1)
    assert plain["frozen_params"] == 0


def test_an_nnunet_run_trains_evaluates_and_counts_like_model_py(tmp_path):
    """--backbone nnunet end to end: train.py, then eval.py rebuilds it from the run and reports Table 1's
    columns; model.py's measured 12.07 G MACs at 256 x 256 scale by (64 / 256)^2 at 64 x 64."""
    run = tmp_path / "nnunet"
    with one_thread():
        assert train.main(["--data", "synthetic", "--synthetic-size", "10", "--backbone", "nnunet", "--llm", "none",
                           "--img-size", str(IMG_SIZE), "--batch-size", "4", "--workers", "0", "--device", "cpu",
                           "--precision", "fp32", "--epochs", "1", "--out", str(run)]) == 0
    assert run_eval(run) == 0
    report = json.loads((run / "eval-val" / "metrics.json").read_text())
    assert report["computation"]["trainable_params"] == 7_765_985
    assert report["computation"]["gmacs"] * 16 == pytest.approx(12.07, abs=0.005)
    assert 0 <= report["metrics"]["iou"]["mean"] <= 1


def test_test_split_and_last_checkpoint_print_one_screen(tiny_runs, capsys):
    assert run_eval(tiny_runs["llm"], "--split", "test", "--checkpoint", "last") == 0
    report = json.loads((tiny_runs["llm"] / "eval-test" / "metrics.json").read_text())
    assert report["images"] == TEST_CASES and report["checkpoint"]["name"] == "last"
    assert len(read_csv(tiny_runs["llm"] / "eval-test" / "per_image.csv")) == TEST_CASES
    printed = capsys.readouterr().out.splitlines()
    assert any(line.strip().startswith("IoU") for line in printed)
    assert any("G MACs at 1x3x64x64" in line for line in printed)
    assert len(printed) < 25


def test_analyze_refuses_a_plain_backbone_run_in_one_line(tiny_runs, capsys):
    assert run_eval(tiny_runs["plain"], "--analyze", "--split", "test") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --analyze") and "--llm none" in error and "\n" not in error
    assert not (tiny_runs["plain"] / "eval-test").exists()


def test_missing_run_checkpoint_or_data_is_a_one_line_error(tiny_runs, tmp_path, capsys):
    assert run_eval(tmp_path / "nowhere") == 2
    assert "expected a run directory written by train.py" in capsys.readouterr().err
    shutil.copy(tiny_runs["llm"] / "config.json", tmp_path / "config.json")
    assert run_eval(tmp_path) == 2
    error = capsys.readouterr().err.strip()
    assert "best.safetensors not found" in error and "--checkpoint last" in error and "\n" not in error
    config = json.loads((tmp_path / "config.json").read_text())
    config["train"].update(data="busi", data_dir=str(tmp_path / "no-busi"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert run_eval(tmp_path) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "Dataset_BUSI_with_GT" in error and "\n" not in error


# --- segmenting new images -----------------------------------------------------------------------


def test_images_are_segmented_at_their_own_size_and_unreadable_files_listed(tiny_runs, tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = tmp_path / "new"
    images.mkdir()
    Image.fromarray(rng.integers(0, 256, (53, 37, 3), dtype=np.uint8)).save(images / "odd.png")
    Image.fromarray(rng.integers(0, 256, (70, 20), dtype=np.uint8), mode="L").save(images / "gray.jpg")
    Image.fromarray(rng.integers(0, 256, (33, 33, 4), dtype=np.uint8), mode="RGBA").save(images / "rgba.png")
    square = rng.integers(0, 256, (IMG_SIZE, IMG_SIZE, 3), dtype=np.uint8)
    Image.fromarray(square).save(images / "square.png")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    (images / "notes.txt").write_text("not an image, not a candidate")
    out = tmp_path / "masks"
    with one_thread():
        code = ev.main([str(tiny_runs["llm"]), "--images", str(images), "--out", str(out), "--probabilities",
                        "--workers", "0", "--device", "cpu", "--precision", "fp32"])
    printed = capsys.readouterr().out
    assert code == 1 and "skipped" in printed and "broken.png" in printed and "notes.txt" not in printed
    sizes = {"odd": (37, 53), "gray": (20, 70), "rgba": (33, 33), "square": (IMG_SIZE, IMG_SIZE)}
    assert {p.name for p in out.glob("*.png")} == {f"{stem}{tail}.png" for stem in sizes for tail in ("", "_probability")}
    for stem, size in sizes.items():
        with Image.open(out / f"{stem}.png") as mask, Image.open(out / "overlays" / f"{stem}.png") as overlay:
            assert mask.size == size and mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}
            assert max(overlay.size) >= 256
    # At the run's own size nothing is resized: the mask is the thresholded prediction, computed here.
    net, _, _ = load_run(tiny_runs["llm"])
    image = normalize(torch.from_numpy(square).permute(2, 0, 1).float() / 255)
    with torch.no_grad():
        expected = torch.sigmoid(net(image[None]))[0, 0].numpy() > 0.5
    with Image.open(out / "square.png") as mask:
        assert np.array_equal(np.asarray(mask) == 255, expected)


def test_out_without_images_is_a_one_line_error(tiny_runs, capsys):
    assert ev.main([str(tiny_runs["llm"]), "--out", "somewhere"]) == 2
    assert "--out and --probabilities go with --images" in capsys.readouterr().err


def test_ranked_cases_takes_the_worst_and_best_once_each():
    rows = [{"case": name, "iou": iou} for name, iou in (("a", 0.5), ("b", 0.1), ("c", 0.9), ("d", 0.1))]
    assert ev.ranked_cases(rows, 3) == [("worst-01", 1), ("worst-02", 3), ("best-01", 2)]  # b before d: by name
    assert [label for label, _ in ev.ranked_cases(rows, 10)] == ["worst-01", "worst-02", "best-01", "best-02"]
    assert ev.ranked_cases(rows, 0) == []


def test_file_stem_makes_case_ids_file_names():
    assert ev.file_stem("benign (12)") == "benign_12_"


def test_the_metric_functions_are_still_offered_by_eval():
    """segmentation_metrics and surface_metrics moved to metrics.py; `from eval import ...` keeps working."""
    import metrics

    assert ev.segmentation_metrics is metrics.segmentation_metrics and ev.surface_metrics is metrics.surface_metrics


# --- volumes: a MedVisionLlama run on an MSD task in its shipped layout ---------------------------


def test_an_msd_run_trains_and_evaluates_its_test_split_in_millimetres(tmp_path, tiny_llm):
    from test_volumes import SPACING, write_msd_task

    task = write_msd_task(tmp_path, cases=10, modalities=2)
    run = tmp_path / "run"
    with one_thread():
        assert train.main(["--data", "msd", "--data-dir", str(task), "--backbone", "vit", "--img-size", "8",
                           "--patch-size", "4", "--embed-dim", "16", "--depth", "1", "--llm", str(tiny_llm),
                           "--layer", "2", "--recipe", "medvisionllama", "--epochs", "1", "--workers", "0",
                           "--device", "cpu", "--precision", "fp32", "--out", str(run)]) == 0
    assert run_eval(run, "--split", "test", "--samples", "1") == 0
    report = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert report["images"] == 1 and report["computation"]["input_shape"] == [1, 2, 8, 8, 8]
    assert report["conventions"]["distance_unit"] == "mm"
    # A miss scores the volume's diagonal in mm: the 8^3 grid spans the stored 12 x 10 x 8 voxels of SPACING.
    diagonal = math.dist((0, 0, 0), [n * s for n, s in zip((12, 10, 8), SPACING)])
    assert 0 <= report["metrics"]["hd95"]["mean"] <= diagonal + 1e-4
    panel = Image.open(next((run / "eval-test" / "samples").glob("*.png")))
    assert panel.height > 3 * 256  # the axial, coronal and sagittal rows, each enlarged to >= 256 px
    assert run_eval(run, "--images", str(tmp_path)) == 2
    assert run_eval(run, "--analyze") == 2
