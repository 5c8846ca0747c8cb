"""Tests of eval.py: metrics on hand-made masks with known answers, agreement with an independent
plain-numpy implementation of the paper's definitions, the Sec. 4.2 analysis, the PNG helpers, and
the command line end to end on tiny runs trained by train.py."""
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
from data import IMAGENET_MEAN, IMAGENET_STD, load_dataset

FLOAT32_TOL = 1e-5  # float32 ratios of pixel counts up to a few hundred: error well below 1e-6


def square(size, top, left, side):
    """(1, 1, size, size) float mask with a side x side square of ones at (top, left)."""
    mask = torch.zeros(1, 1, size, size)
    mask[..., top:top + side, left:left + side] = 1
    return mask


def as_logits(mask):
    """Masks -> logits that the 0.5 threshold on sigmoid turns back into the same masks."""
    return (mask * 2 - 1) * 10


def test_identical_masks_score_perfectly():
    torch.manual_seed(0)
    mask = (torch.rand(2, 1, 16, 16) > 0.6).float()
    metrics = ev.segmentation_metrics(as_logits(mask), mask)
    surface = ev.surface_metrics(as_logits(mask), mask)
    for name in ("iou", "dice", "accuracy"):
        torch.testing.assert_close(metrics[name], torch.ones(2))
    # SE, PC, SP, F1 carry the authors' 1e-6 guard: 1 - O(1e-6 / count).
    for name in ("f1", "sensitivity", "precision", "specificity"):
        torch.testing.assert_close(metrics[name], torch.ones(2), atol=FLOAT32_TOL, rtol=0)
    assert surface["hd95"].tolist() == [0.0, 0.0]
    assert surface["nsd"].tolist() == [1.0, 1.0]


def test_disjoint_masks_score_zero_up_to_the_smoothing():
    pred, true = square(16, 0, 0, 4), square(16, 10, 10, 4)
    metrics = ev.segmentation_metrics(as_logits(pred), true)
    # IoU = (0 + 1e-5) / (32 + 1e-5), about 3e-7.
    assert 0 < metrics["iou"].item() < 1e-6
    assert metrics["dice"].item() < 1e-6
    assert metrics["f1"].item() == 0.0
    assert ev.surface_metrics(as_logits(pred), true)["nsd"].item() == 0.0


def test_shifted_square_hd95_nsd_and_iou_by_hand():
    """G: 8x8 square at rows 4..11, cols 4..11 of a 20x20 image; P: the same shifted 3 columns right.

    Each boundary is the square's 28-pixel ring. Distances from the ring of P to the ring of G:
    top and bottom rows: 5 pixels each lie on G's rows (0), then 1, 2, 3 past G's corner column;
    P's left column (c = 7, rows 5..10) is 1, 2, 3, 3, 2, 1 from G's top/bottom rows or left column;
    P's right column (c = 14, rows 5..10) is 3 from G's right column.
    So P->G sorted: 10 x 0, 4 x 1, 4 x 2, 10 x 3, and G->P is the same by mirror symmetry.
    q95 at index 0.95 * 27 = 25.65 falls among the threes: HD95 = 3.
    NSD at 2 px: (18 + 18) / (28 + 28) = 9/14.
    IoU = 8*5 / (64 + 64 - 40) = 40/88 = 5/11.
    """
    true, pred = square(20, 4, 4, 8), square(20, 4, 7, 8)
    surface = ev.surface_metrics(as_logits(pred), true)
    assert surface["hd95"].item() == pytest.approx(3.0)
    assert surface["nsd"].item() == pytest.approx(9 / 14)
    assert ev.segmentation_metrics(as_logits(pred), true)["iou"].item() == pytest.approx(5 / 11, abs=FLOAT32_TOL)


def test_hd95_interpolates_the_95th_percentile_like_monai():
    """G: the single pixel (0, 0); P: row 0, columns 0..19, a 1-pixel-thick line, all boundary.

    P->G distances are 0, 1, ..., 19; G->P is 0. The 95th percentile with linear interpolation
    sits at index 0.95 * 19 = 18.05: 18 + 0.05 * (19 - 18) = 18.05 (the plain Hausdorff would be 19).
    """
    true = torch.zeros(1, 1, 20, 20)
    true[..., 0, 0] = 1
    pred = torch.zeros(1, 1, 20, 20)
    pred[..., 0, :] = 1
    assert ev.surface_metrics(pred, true, from_logits=False)["hd95"].item() == pytest.approx(18.05, abs=1e-5)


def test_empty_cases_follow_the_stated_convention():
    empty, lesion = torch.zeros(1, 1, 12, 16), square(16, 2, 2, 4)[..., :12, :]
    metrics = ev.segmentation_metrics(as_logits(empty), empty)
    assert metrics["iou"].item() == 1.0 and metrics["dice"].item() == 1.0
    assert metrics["sensitivity"].item() == 0.0 and metrics["precision"].item() == 0.0
    assert metrics["f1"].item() == 0.0 and metrics["accuracy"].item() == 1.0
    assert metrics["specificity"].item() == pytest.approx(1.0, abs=FLOAT32_TOL)
    both_empty = ev.surface_metrics(as_logits(empty), empty)
    assert both_empty["hd95"].item() == 0.0 and both_empty["nsd"].item() == 1.0
    for pred, true in ((empty, lesion), (lesion, empty)):
        one_empty = ev.surface_metrics(as_logits(pred), true)
        assert one_empty["hd95"].item() == pytest.approx(math.hypot(12, 16))  # the image diagonal, 20
        assert one_empty["nsd"].item() == 0.0
        assert all(torch.isfinite(v).all() for v in ev.segmentation_metrics(as_logits(pred), true).values())


def reference_metrics(prob, true, tolerance=2.0):
    """The paper's definitions with numpy and loops, one (H, W) image: independent of eval.py."""
    pred, true = prob > 0.5, true > 0.5
    tp = int(np.sum(pred & true)); fp = int(np.sum(pred & ~true))
    fn = int(np.sum(~pred & true)); tn = int(np.sum(~pred & ~true))
    iou = (tp + 1e-5) / (tp + fp + fn + 1e-5)
    se, pc, sp = tp / (tp + fn + 1e-6), tp / (tp + fp + 1e-6), tn / (tn + fp + 1e-6)

    def boundary(mask):
        h, w = mask.shape
        inside = lambda r, c: 0 <= r < h and 0 <= c < w and mask[r, c]
        return [(r, c) for r in range(h) for c in range(w) if mask[r, c] and not all(
            inside(r + dr, c + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)))]

    def nearest(points, others):
        return np.array([min(math.dist(p, o) for o in others) for p in points])

    pred_to_true, true_to_pred = nearest(boundary(pred), boundary(true)), nearest(boundary(true), boundary(pred))
    return {"iou": iou, "dice": 2 * iou / (1 + iou), "sensitivity": se, "precision": pc, "specificity": sp,
            "accuracy": (tp + tn) / pred.size, "f1": 2 * se * pc / (se + pc + 1e-6),
            "hd95": max(np.percentile(pred_to_true, 95), np.percentile(true_to_pred, 95)),
            "nsd": (np.sum(pred_to_true <= tolerance) + np.sum(true_to_pred <= tolerance))
            / (len(pred_to_true) + len(true_to_pred))}


def test_agrees_with_a_plain_numpy_implementation_on_a_random_case():
    torch.manual_seed(1)
    logits = torch.randn(3, 1, 14, 18) * 2
    target = torch.zeros(3, 1, 14, 18)
    target[..., 3:10, 4:13] = 1  # a rectangle with random holes and specks
    target = torch.where(torch.rand_like(target) < 0.15, 1 - target, target)
    ours = {**ev.segmentation_metrics(logits, target), **ev.surface_metrics(logits, target)}
    probs = torch.sigmoid(logits).double().numpy()
    for b in range(3):
        expected = reference_metrics(probs[b, 0], target[b, 0].numpy())
        for name, value in expected.items():
            assert ours[name][b].item() == pytest.approx(value, abs=FLOAT32_TOL), (name, b)


def test_pooled_and_per_image_differ_on_a_crafted_case():
    """Image 1: a 10x10 lesion found exactly; image 2: a 1-pixel lesion missed (empty prediction).
    Per-image IoU mean = (1 + ~0) / 2 = 0.5; pooled IoU = 100 / (100 + 1) ~ 0.990."""
    true = torch.cat([square(16, 2, 2, 10), square(16, 5, 5, 1)])
    pred = torch.cat([square(16, 2, 2, 10), torch.zeros(1, 1, 16, 16)])
    per_image = ev.segmentation_metrics(as_logits(pred), true)["iou"].mean().item()
    pooled = ev.PooledOverlap()
    for i in range(2):  # two updates, as a data loader would
        pooled.update(as_logits(pred[i:i + 1]), true[i:i + 1])
    result = pooled.compute()
    assert per_image == pytest.approx(0.5, abs=FLOAT32_TOL)
    assert result["pooled_iou"] == pytest.approx(100 / 101, abs=1e-9)
    assert result["pooled_dice"] == pytest.approx(200 / 201, abs=1e-9)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        ev.segmentation_metrics(torch.zeros(1, 1, 8, 8), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="expected"):
        ev.surface_metrics(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8))


# Singular values of float32 rank-deficient maps leave ~1e-7 residues that add ~1e-5 of entropy.
SPECTRUM_TOL = 1e-4


def spectrum_features():
    """(1, 4, 8, 8): rank 1, rank 2 with equal singular values, rank 8 (identity), and an all-zero channel."""
    u, v = torch.arange(1.0, 9.0), torch.linspace(-1, 2, 8)
    rank2 = torch.zeros(8, 8)
    rank2[0, 0] = rank2[1, 1] = 3.0
    return torch.stack([torch.outer(u, v), rank2, torch.eye(8) * 5, torch.zeros(8, 8)])[None]


def test_effective_rank_of_rank_one_and_identity_maps():
    features = spectrum_features()
    assert ev.effective_rank(features[:, :1]).item() == pytest.approx(1.0, abs=SPECTRUM_TOL)
    assert ev.effective_rank(features[:, 2:3]).item() == pytest.approx(8.0, abs=SPECTRUM_TOL)
    # The zero channel has no spectrum and is left out: mean of 1, 2, 8.
    assert ev.effective_rank(features).item() == pytest.approx(11 / 3, abs=SPECTRUM_TOL)


def test_lsvr_grows_as_the_largest_singular_value_dominates_less():
    """The paper: a smaller LSVR means a more dominant largest singular value. Rank 1: -log 1 = 0;
    two equal singular values: log 2; identity 8x8: log 8."""
    values = [ev.lsvr(spectrum_features()[:, c:c + 1]).item() for c in range(3)]
    assert values == pytest.approx([0.0, math.log(2), math.log(8)], abs=SPECTRUM_TOL)


def test_activation_map_is_a_min_max_scaled_channel_mean_of_magnitudes():
    features = torch.zeros(2, 3, 4, 4)
    features[0, :, 1, 2] = torch.tensor([-3.0, 3.0, 0.0])  # mean |f| = 2 at (1, 2)
    features[0, 0, 0, 0] = 3.0  # mean |f| = 1 at (0, 0)
    maps = ev.activation_map(features)
    assert maps[0, 1, 2].item() == 1.0 and maps[0, 0, 0].item() == 0.5 and maps[0, 3, 3].item() == 0.0
    assert maps[1].abs().max().item() == 0.0  # a constant map becomes zeros, not NaN


def test_concentration_iou_on_a_crafted_map():
    """4x4 map: 0.9 on the top-left 2x2 (the lesion), 0.5 at (3, 3), 0.3 elsewhere; thresholded at 0.4
    it highlights 5 pixels, 4 of them the lesion: IoU = 4/5. Bilinear upsampling keeps values in range."""
    activation = torch.full((1, 4, 4), 0.3)
    activation[0, :2, :2] = 0.9
    activation[0, 3, 3] = 0.5
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1
    assert ev.concentration_iou(activation, mask).item() == pytest.approx(0.8, abs=FLOAT32_TOL)
    with pytest.raises(ValueError, match="upsample_map"):
        ev.concentration_iou(activation, torch.zeros(1, 1, 16, 16))
    upsampled = ev.upsample_map(activation, (16, 16))
    assert upsampled.shape == (1, 16, 16) and 0.3 <= upsampled.min() and upsampled.max() <= 0.9


def test_png_helpers_write_images_pillow_opens_at_the_image_size(tmp_path):
    height, width = 24, 32
    image = np.full((height, width, 3), 40, dtype=np.uint8)
    gt, pred = torch.zeros(height, width), torch.zeros(height, width)
    gt[4:12, 4:12] = 1
    pred[10:20, 16:28] = 1
    ev.overlay_png(image, gt, pred, tmp_path / "overlay.png")
    with Image.open(tmp_path / "overlay.png") as picture:
        assert picture.size == (width, height) and picture.mode == "RGB"
        assert picture.getpixel((4, 4)) == ev.GT_COLOUR  # (x, y): a corner of the true square
        assert picture.getpixel((27, 19)) == ev.PRED_COLOUR
        assert picture.getpixel((8, 8)) == (40, 40, 40)  # inside the true square: untouched

    activation = torch.zeros(height, width)
    activation[0, 0] = 1.0
    ev.heatmap_png(image[..., 0], activation, tmp_path / "heat.png", opacity=1.0)  # grayscale input
    with Image.open(tmp_path / "heat.png") as picture:
        assert picture.size == (width, height)
        # jet: 1 -> dark red (128, 0, 0), 0 -> dark blue (0, 0, 128)
        assert picture.getpixel((0, 0)) == (128, 0, 0) and picture.getpixel((5, 5)) == (0, 0, 128)
    with pytest.raises(ValueError, match="upsample_map"):
        ev.heatmap_png(image, torch.zeros(6, 8), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="uint8"):
        ev.overlay_png(image.astype(np.float32), gt, pred, tmp_path / "bad.png")


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
                               "--img-size", str(IMG_SIZE), "--batch-size", "4", "--workers", "0",
                               "--epochs", "1", "--out", str(runs[name])]) == 0
    return runs


def run_eval(run_dir, *flags) -> int:
    with one_thread():
        return ev.main([str(run_dir), "--workers", "0", "--device", "cpu", *flags])


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


def test_samples_are_the_worst_and_best_cases_as_pngs_of_the_image_size(evaluated):
    rows = sorted(read_csv(evaluated / "per_image.csv"), key=lambda row: float(row["iou"]))
    expected = [f"best-01_{rows[-1]['case']}.png", f"worst-01_{rows[0]['case']}.png"]
    assert sorted(path.name for path in (evaluated / "samples").iterdir()) == expected
    for name in expected:
        with Image.open(evaluated / "samples" / name) as picture:
            assert picture.size == (IMG_SIZE, IMG_SIZE) and picture.mode == "RGB"


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
            assert picture.size == (IMG_SIZE, IMG_SIZE)


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


def test_ranked_cases_takes_the_worst_and_best_once_each():
    rows = [{"case": name, "iou": iou} for name, iou in (("a", 0.5), ("b", 0.1), ("c", 0.9), ("d", 0.1))]
    assert ev.ranked_cases(rows, 3) == [("worst-01", 1), ("worst-02", 3), ("best-01", 2)]  # b before d: by name
    assert [label for label, _ in ev.ranked_cases(rows, 10)] == ["worst-01", "worst-02", "best-01", "best-02"]
    assert ev.ranked_cases(rows, 0) == []


def test_to_rgb_undoes_data_normalisation():
    rgb = torch.randint(0, 256, (3, 5, 7), generator=torch.Generator().manual_seed(0))
    normalised = (rgb / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert np.array_equal(ev.to_rgb(normalised), rgb.permute(1, 2, 0).numpy().astype(np.uint8))
    assert ev.file_stem("benign (12)") == "benign_12_"
