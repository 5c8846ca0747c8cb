"""Tests of eval.py: the command line end to end on tiny runs trained by train.py, its choice of cases to
draw, and --images on new images and new volumes (outputs.py's way from a NIfTI file to a 3D network and
back onto the file's grid)."""
import contextlib
import csv
import errno
import json
import math
import os
import shutil
from pathlib import Path

from types import SimpleNamespace

import nibabel
import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
from llm4seg import files, outputs
import train
from llm4seg.checkpoints import load_run
from llm4seg.data import load_dataset, normalize
from llm4seg.files import InputError
from llm4seg.prediction import case_probabilities
from llm4seg.data.volumes import to_original_grid
from llm4seg.data.volumes.btcv import read_btcv_image
from llm4seg.task import Task

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
        # 4 panels of 64 px enlarged to 256, 4 px apart, under pictures.with_header's header
        with Image.open(evaluated / "samples" / name) as picture:
            assert picture.width == 4 * 256 + 3 * 4 and picture.height > 256 and picture.mode == "RGB"


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
    assert len(maps) == VAL_CASES and [str(p.relative_to(evaluated)) for p in maps] == sorted(
        analysis["activation_maps"])
    for path in maps:  # before | after, 64 px enlarged 4 times, a colour bar, the header and the too-coarse note
        with Image.open(path) as picture:
            assert picture.size == (2 * 256 + 2 * 4 + 16 + 24, 256 + 2 * 14 + 4)


def test_gmacs_of_backbone_and_bridge_by_hand(tiny_runs, evaluated):
    """Plain CMUNeXt: model/'s measured 7.23 G MACs at 256 x 256, divided by 16 at 64 x 64 (a conv's MACs
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
    assert plain["gmacs"] * 16 == pytest.approx(7.23, abs=0.005)  # model/'s table rounds to 2 decimals
    assert (bridged["gmacs"] - plain["gmacs"]) * 1e9 == pytest.approx(1_146_880, abs=1)
    assert plain["frozen_params"] == 0


def test_an_nnunet_run_trains_evaluates_and_counts_like_model_py(tmp_path):
    """--backbone nnunet end to end: train.py, then eval.py rebuilds it from the run and reports Table 1's
    columns; model/'s measured 12.07 G MACs at 256 x 256 scale by (64 / 256)^2 at 64 x 64."""
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
    """--checkpoint last writes eval-<split>-last/, beside (not over) the best checkpoint's eval-<split>/."""
    assert run_eval(tiny_runs["llm"], "--split", "test", "--checkpoint", "last") == 0
    report = json.loads((tiny_runs["llm"] / "eval-test-last" / "metrics.json").read_text())
    assert report["images"] == TEST_CASES and report["checkpoint"]["name"] == "last"
    assert len(read_csv(tiny_runs["llm"] / "eval-test-last" / "per_image.csv")) == TEST_CASES
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
    from llm4seg import metrics

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
    diagonal = math.dist((0, 0, 0), [n * s for n, s in zip((12, 10, 8), SPACING, strict=True)])
    assert 0 <= report["metrics"]["hd95"]["mean"] <= diagonal + 1e-4
    panel = Image.open(next((run / "eval-test" / "samples").glob("*.png")))
    assert panel.height > 3 * 256  # the axial, coronal and sagittal rows, each enlarged to >= 256 px
    assert run_eval(run, "--images", str(tmp_path)) == 2  # the task's volumes are in its sub-folders
    assert run_eval(run, "--analyze") == 2
    # New volumes: the binary run labels each as 0 / 1 on its own 12 x 10 x 8 grid; the `._` files the tarball
    # ships beside them are not volumes (exit 0: none skipped).
    out = tmp_path / "labels"
    assert run_eval(run, "--images", str(task / "imagesTr"), "--out", str(out)) == 0
    assert json.loads((out / "label_legend.json").read_text()) == {"0": "background", "1": "foreground"}
    assert len(list(out.glob("*.nii.gz"))) == 10
    for labels in out.glob("*.nii.gz"):
        stored, written = nibabel.load(task / "imagesTr" / labels.name), nibabel.load(labels)
        assert written.shape == stored.shape[:3] and np.array_equal(written.affine, stored.affine)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}


# --- segmenting new volumes: a 3D run's --images -------------------------------------------------
# A synthetic-organs run of the 3D network that trains fastest here, the ViT at 16^3 (patch 4, width 16, one
# block; mednext-tiny needs 32^3 and ten times as long): the way from a file to the network and back is the
# same for every network. The CTs are dataset_trees' BTCV volumes at an odd size, LPS at 0.8 x 0.9 x 2.5 mm.

CT_SHAPE = (25, 29, 9)  # (X, Y, Z) as stored
# The target spacing exactly, LPS (x, y flipped), and with x, y swapped and z flipped: resampling is the
# identity, so a label map comes back onto the stored grid voxel for voxel.
EXACT_AFFINES = {"lps": np.array([[-1.5, 0, 0, 10.0], [0, -1.5, 0, 20.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]]),
                 "swapped": np.array([[0, -1.5, 0, 10.0], [1.5, 0, 0, 20.0], [0, 0, -2.0, 5.0], [0, 0, 0, 1]])}


@pytest.fixture(scope="module")
def organs_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("organs") / "run"
    with one_thread():
        assert train.main(["--data", "synthetic-organs", "--synthetic-size", "3", "--img-size", "16",
                           "--roi-size", "16", "--backbone", "vit", "--patch-size", "4", "--embed-dim", "16",
                           "--depth", "1", "--heads", "2", "--mode", "none", "--recipe", "llm4seg3d", "--epochs", "1",
                           "--workers", "0", "--device", "cpu", "--precision", "fp32", "--out", str(run)]) == 0
    return run


def save_ct(path: Path, hu: np.ndarray, affine: np.ndarray) -> None:
    """A CT as scanners store one: int16 HU + 1024 with the header's intercept -1024, qform and sform "scanner"."""
    image = nibabel.Nifti1Image((hu + 1024).astype(np.int16), affine)
    image.header.set_slope_inter(1.0, -1024.0)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nibabel.save(image, path)


def test_volumes_are_labelled_on_their_own_grid_and_unreadable_files_listed(organs_run, tmp_path, capsys):
    from dataset_trees import LPS_AFFINE, SWAPPED_AFFINE, btcv_volumes

    hu, _ = btcv_volumes(np.random.default_rng(0), CT_SHAPE)
    scans = tmp_path / "scans"
    scans.mkdir()
    save_ct(scans / "lps.nii.gz", hu, LPS_AFFINE)
    one_channel = hu[..., None].astype(np.float32)  # (X, Y, Z, 1), as some converters write a CT
    nibabel.save(nibabel.Nifti1Image(one_channel, SWAPPED_AFFINE), scans / "swapped.nii")
    shutil.copy(scans / "swapped.nii", scans / "swapped.nii.gz")  # not gzipped, and its stem is taken
    (scans / "broken.nii.gz").write_bytes(b"\x1f\x8b not really")
    save_ct(scans / "air.nii.gz", np.full(CT_SHAPE, -1000), LPS_AFFINE)  # no body: nothing above -175 HU
    nibabel.save(nibabel.Nifti1Image(np.where(hu > 100, np.nan, hu).astype(np.float32), LPS_AFFINE), scans / "nan.nii")
    nibabel.save(nibabel.Nifti1Image(np.zeros((5, 6), np.float32), np.eye(4)), scans / "flat.nii")
    (scans / "._lps.nii.gz").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
    (scans / "notes.txt").write_text("not a volume, not a candidate")
    out = tmp_path / "labels"
    assert run_eval(organs_run, "--images", str(scans), "--out", str(out)) == 1
    printed = capsys.readouterr().out
    skipped = {line.split(":")[0].removeprefix("skipped ") for line in printed.splitlines()
               if line.startswith("skipped")}
    assert skipped == {str(scans / name) for name in ("air.nii.gz", "broken.nii.gz", "flat.nii", "nan.nii",
                                                      "swapped.nii.gz")}
    assert "also named swapped" in printed and "._lps" not in printed and "notes.txt" not in printed
    assert {path.name for path in out.iterdir()} == {"lps.nii.gz", "swapped.nii.gz", "label_legend.json"}
    legend = json.loads((out / "label_legend.json").read_text())
    assert legend == {"0": "background", "1": "liver", "2": "spleen", "3": "kidney", "4": "aorta", "5": "stomach"}
    for stem, source in (("lps", "lps.nii.gz"), ("swapped", "swapped.nii")):
        stored, written = nibabel.load(scans / source), nibabel.load(out / f"{stem}.nii.gz")
        labels = np.asarray(written.dataobj)
        assert written.shape == CT_SHAPE and np.array_equal(written.affine, stored.affine)
        assert [int(written.header[key]) for key in ("qform_code", "sform_code")] == \
            [int(stored.header[key]) for key in ("qform_code", "sform_code")]
        assert written.get_data_dtype() == np.uint8 and labels.min() >= 0 and labels.max() <= 5
        assert written.header.get_intent()[0] == "label" and written.header.get_slope_inter() == (None, None)
        assert not labels[:, [0, -1], :].any()  # rows of air outside the body crop: background
    # The file holds what the library composes: BTCV's preprocessing, sliding windows of 16, argmax, the way back.
    net, _, _ = load_run(organs_run)
    image, grid = read_btcv_image(scans / "lps.nii.gz")
    task = Task(net.config.num_classes, 3, tuple(f"class {k}" for k in range(net.config.num_classes)), roi_size=16)
    probabilities = case_probabilities(task, net, torch.device("cpu"), torch.float32)(image[None])[0]
    expected = to_original_grid(probabilities.argmax(0), grid)
    np.testing.assert_array_equal(np.asarray(nibabel.load(out / "lps.nii.gz").dataobj), expected)


TWO_CLASSES = Task(2, 3, ("background", "foreground"))  # Threshold's two logits, whole volumes
TWO_CLASSES_BY_WINDOWS = Task(2, 3, ("background", "foreground"), roi_size=16)


class Threshold(torch.nn.Module):
    """A network whose answer is known: class 1 where its input is above 0.5, class 0 elsewhere (logits
    (B, 1, *S) -> (B, 2, *S)); its config says one input channel, as a run's model's does."""

    config = SimpleNamespace(in_channels=1)

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), 50 * (x - 0.5)], dim=1)


@pytest.mark.parametrize("orientation", EXACT_AFFINES)
def test_a_ct_labelled_at_the_target_spacing_comes_back_voxel_for_voxel(tmp_path, orientation):
    """At 1.5 x 1.5 x 2.0 mm resampling is the identity, so preprocessing, sliding windows (16^3 over a smaller
    crop: padded) and the way back compose to the identity: Threshold labels the stored voxels above 0.5 on
    the [0, 1] scale, HU > -175 + 0.5 * 425 = 37.5 (HU are integers: no voxel sits on it), and the voxels
    outside the body crop, all below -175 HU, are background."""
    from dataset_trees import btcv_volumes

    hu, _ = btcv_volumes(np.random.default_rng(1), CT_SHAPE)
    save_ct(tmp_path / "ct.nii.gz", hu, EXACT_AFFINES[orientation])
    labels = outputs.segment_volume(TWO_CLASSES_BY_WINDOWS, Threshold(), tmp_path / "ct.nii.gz", "btcv", 0,
                                    torch.device("cpu"), torch.float32)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, hu > 37.5)


def test_a_resized_volume_keeps_a_boundary_through_the_round_trip(tmp_path):
    """msd / synthetic3d runs: the volume is resized to S^3 and the labels back with voxel centres aligned. A
    half space, x < 5 of 10 voxels, resized to 16 and labelled by Threshold after z-scoring (the halves at +-1),
    comes back exact: stored x = 4 lands on S-voxel floor(4.5 * 1.6) = 7, which samples x = 7.5 / 1.6 - 0.5 =
    4.19 (z-score 0.62 > 0.5), x = 5 on 8, which samples 4.81 (-0.62)."""
    volume = np.zeros((10, 7, 5), np.float32)
    volume[:5] = 1
    nibabel.save(nibabel.Nifti1Image(volume, np.diag([0.8, 0.8, 2.5, 1])), tmp_path / "half.nii.gz")
    labels = outputs.segment_volume(TWO_CLASSES, Threshold(), tmp_path / "half.nii.gz", "synthetic3d", 16,
                                    torch.device("cpu"), torch.float32)
    np.testing.assert_array_equal(labels, volume > 0)


def test_a_volume_for_an_msd_run_is_read_as_msd_reads_its_images(tmp_path):
    from test_volumes import write_msd_task
    from llm4seg.data.volumes import MSDVolumes, msd_cases

    task = write_msd_task(tmp_path, cases=1, modalities=2)
    (case,), channels = msd_cases(task)
    expected = MSDVolumes([case], 8, channels, None).read_case(case)["image"]
    image, shape = outputs.resized_volume(case.image, 8, channels)
    assert torch.equal(image, expected) and shape == (12, 10, 8)
    with pytest.raises(InputError, match=r"is \[12, 10, 8, 2\]; expected .* \(X, Y, Z, 3\)"):
        outputs.resized_volume(case.image, 8, 3)


@pytest.mark.parametrize("data", ["synthetic3d", "synthetic-organs"])
def test_non_finite_voxels_are_refused_the_same_way_on_every_volume_path(tmp_path, data):
    """A NaN z-scores a whole MSD-style volume to NaN, which came back as an all-background label map without a
    word (issue 31, item 8); the BTCV path already refused it. Both now say it in the same line."""
    volume = np.full((10, 7, 5), 100.0, np.float32)
    volume[3, 2, 1], volume[4, 2, 1] = np.nan, np.inf
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / "scan.nii.gz")
    with pytest.raises(InputError, match=r"^the image .*scan\.nii\.gz has 2 NaN or infinite voxels; expected finite "
                                         r"values\. Fix or remove the file\.$"):
        outputs.segment_volume(TWO_CLASSES_BY_WINDOWS, Threshold(), tmp_path / "scan.nii.gz", data, 16,
                               torch.device("cpu"), torch.float32)


def test_probabilities_of_volumes_are_refused_in_one_line(organs_run, tmp_path, capsys):
    assert run_eval(organs_run, "--images", str(tmp_path), "--probabilities") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --probabilities") and "\n" not in error


def test_the_legend_names_the_classes_or_numbers_them_when_the_task_is_gone(tmp_path, capsys):
    def names(settings: dict, num_classes: int, data_dir: str | None = None) -> list[str]:
        model = {"num_classes": num_classes, "spatial_dims": 3}
        return list(Task.of_run({"train": settings, "model": model}, data_dir, number_unknown=True).class_names)

    assert names({"data": "btcv"}, 14)[:2] == ["background", "spleen"]
    assert names({"data": "msd"}, 1, str(tmp_path)) == ["background", "foreground"]
    assert names({"data": "msd", "multiclass": True}, 3, str(tmp_path / "gone")) == ["background", "class 1", "class 2"]
    assert "the class names are unknown" in capsys.readouterr().out


def test_pictures_of_an_earlier_evaluation_do_not_stay_beside_a_new_one(tiny_runs, capsys):
    """Samples drawn by one evaluation are removed when the next one (of the same split and checkpoint)
    draws none: every file in eval-<split>/ belongs to the last evaluation."""
    folder = tiny_runs["plain"] / "eval-test"
    assert run_eval(tiny_runs["plain"], "--split", "test", "--samples", "2") == 0
    assert len(list((folder / "samples").iterdir())) == min(2, TEST_CASES)
    assert run_eval(tiny_runs["plain"], "--split", "test") == 0
    assert not (folder / "samples").exists()


def test_g_macs_of_a_patch_trained_run_are_counted_at_its_crop_size():
    """A BTCV-style run computes on --roi-size crops; --img-size (128 by default, which BTCV otherwise ignores)
    would count 3D UX-Net at 1369.57 G MACs where the paper's 96^3 gives 577.79 (issue 31, item 7)."""
    from llm4seg.model import build_model, count_gmacs

    net = build_model("mednext-tiny", None, mode="none", num_classes=3)
    config = {"train": {"data": "synthetic-organs", "img_size": 64, "roi_size": 32},
              "model": {"in_channels": 1, "spatial_dims": 3, "num_classes": 3}}
    report = ev.computation_report(net, config, Task.of_run(config))
    assert report["input_shape"] == [1, 1, 32, 32, 32]
    assert report["gmacs"] == count_gmacs(net, 1, 32, 3) < count_gmacs(net, 1, 64, 3)
    resized = {**config, "train": {**config["train"], "data": "synthetic3d"}}
    msd = ev.computation_report(net, resized, Task.of_run(resized))
    assert msd["input_shape"] == [1, 1, 64, 64, 64]  # whole volumes resized to --img-size


# --- faults: every output whole or absent (issue 31, items 18 and 20) --------------------------------


def eval_outputs(out_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(out_dir)): path.read_bytes() for path in sorted(out_dir.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_a_full_disk_at_any_eval_write_is_one_line_exit_1_and_keeps_what_was_there(tiny_runs, tmp_path, capsys,
                                                                                  monkeypatch, code):
    """The disk refuses the k-th file eval.py writes (metrics, CSV, panels, heat maps), for every k: one "error:"
    line naming the file, exit 1, no temporary left, and every file of the evaluation before it as it was (the
    refused one included), none of them cut."""
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["llm"], run)
    assert run_eval(run, "--samples", "2", "--analyze") == 0
    before = eval_outputs(run / "eval-val")
    writes, real_fsync = [], files.fsync_path

    def counting(path):
        if Path(path).name.startswith(".") and Path(path).name.endswith(".tmp"):
            writes.append(path)
        real_fsync(path)
    monkeypatch.setattr(files, "fsync_path", counting)
    assert run_eval(run, "--samples", "2", "--analyze") == 0
    total = len(writes)
    assert total >= 6, writes  # metrics.json, per_image.csv, analysis.json, 2 panels, heat maps
    capsys.readouterr()
    for k in range(1, total + 1):
        refused = []

        def full_at_k(path, k=k, refused=refused):
            if Path(path).name.startswith(".") and Path(path).name.endswith(".tmp"):
                refused.append(path)
                if len(refused) == k:
                    raise OSError(code, os.strerror(code))
            real_fsync(path)
        monkeypatch.setattr(files, "fsync_path", full_at_k)
        assert run_eval(run, "--samples", "2", "--analyze") == 1, k
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {os.strerror(code)} writing {run / 'eval-val'}"), err
        assert not list((run / "eval-val").rglob(".*.tmp"))
        after = eval_outputs(run / "eval-val")
        assert after.keys() <= before.keys() and all(after[name] == before[name] for name in after), k


def test_a_killed_png_write_leaves_the_previous_picture(tmp_path, monkeypatch):
    """A picture is written under a temporary name and renamed: killed mid-write, the old file stays whole."""
    from llm4seg import pictures

    path = tmp_path / "panel.png"
    image, mask = np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16), bool)
    pictures.overlay_png(image, mask, mask, path)
    old = path.read_bytes()

    def killed(self, target, *args, **kwargs):
        Path(target).write_bytes(b"\x89PNG cut")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        pictures.overlay_png(image + 255, mask, ~mask, path)
    assert path.read_bytes() == old and not list(tmp_path.glob(".*.tmp"))


def test_a_class_no_case_holds_is_left_out_of_the_mean_not_scored_zero():
    """MONAI's mean over nothing is 0 (metrics.mean_and_std, with n = 0); a per-class report must not average that
    0 into Table 2's Dice as if the organ had been missed everywhere."""
    rows = [{"case": "a", "dice/liver": 1.0, "iou/liver": 1.0, "hd95/liver": 0.0, "nsd/liver": 1.0,
             "dice/spleen": float("nan"), "iou/spleen": float("nan"), "hd95/spleen": float("nan"),
             "nsd/spleen": float("nan")}]
    report = ev.per_class_report(rows, Task(3, 3, ("background", "liver", "spleen")))
    assert report["dice"] == 1.0 and math.isnan(report["per_class"]["spleen"]["dice"])
