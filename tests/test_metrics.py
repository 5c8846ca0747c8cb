"""Tests of metrics.py: the paper's per-image metrics and HD95 / NSD on hand-made masks with known
answers, agreement with an independent plain-numpy implementation of the paper's definitions, pooled
versus per-image, and the metric-name table."""
import math

import numpy as np
import pytest
import torch

from llm4seg import metrics
from llm4seg.task import Task

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
    scores = metrics.segmentation_metrics(as_logits(mask), mask)
    surface = metrics.surface_metrics(as_logits(mask), mask)
    for name in ("iou", "dice", "accuracy"):
        torch.testing.assert_close(scores[name], torch.ones(2))
    # SE, PC, SP, F1 carry the authors' 1e-6 guard: 1 - O(1e-6 / count).
    for name in ("f1", "sensitivity", "precision", "specificity"):
        torch.testing.assert_close(scores[name], torch.ones(2), atol=FLOAT32_TOL, rtol=0)
    assert surface["hd95"].tolist() == [0.0, 0.0]
    assert surface["nsd"].tolist() == [1.0, 1.0]


def test_disjoint_masks_score_zero_up_to_the_smoothing():
    pred, true = square(16, 0, 0, 4), square(16, 10, 10, 4)
    scores = metrics.segmentation_metrics(as_logits(pred), true)
    # IoU = (0 + 1e-5) / (32 + 1e-5), about 3e-7.
    assert 0 < scores["iou"].item() < 1e-6
    assert scores["dice"].item() < 1e-6
    assert scores["f1"].item() == 0.0
    assert metrics.surface_metrics(as_logits(pred), true)["nsd"].item() == 0.0


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
    surface = metrics.surface_metrics(as_logits(pred), true)
    assert surface["hd95"].item() == pytest.approx(3.0)
    assert surface["nsd"].item() == pytest.approx(9 / 14)
    assert metrics.segmentation_metrics(as_logits(pred), true)["iou"].item() == pytest.approx(5 / 11, abs=FLOAT32_TOL)


def test_hd95_interpolates_the_95th_percentile_like_monai():
    """G: the single pixel (0, 0); P: row 0, columns 0..19, a 1-pixel-thick line, all boundary.

    P->G distances are 0, 1, ..., 19; G->P is 0. The 95th percentile with linear interpolation
    sits at index 0.95 * 19 = 18.05: 18 + 0.05 * (19 - 18) = 18.05 (the plain Hausdorff would be 19).
    """
    true = torch.zeros(1, 1, 20, 20)
    true[..., 0, 0] = 1
    pred = torch.zeros(1, 1, 20, 20)
    pred[..., 0, :] = 1
    assert metrics.surface_metrics(pred, true, from_logits=False)["hd95"].item() == pytest.approx(18.05, abs=1e-5)


def test_empty_cases_follow_the_stated_conventions():
    empty, lesion = torch.zeros(1, 1, 12, 16), square(16, 2, 2, 4)[..., :12, :]
    scores = metrics.segmentation_metrics(as_logits(empty), empty)
    assert scores["iou"].item() == 1.0 and scores["dice"].item() == 1.0
    assert scores["sensitivity"].item() == 0.0 and scores["precision"].item() == 0.0
    assert scores["f1"].item() == 0.0 and scores["accuracy"].item() == 1.0
    assert scores["specificity"].item() == pytest.approx(1.0, abs=FLOAT32_TOL)
    # MONAI's, the default: HD95 NaN whenever a mask is empty; NSD 0 for one empty mask, NaN for two.
    both_empty = metrics.surface_metrics(as_logits(empty), empty)
    assert both_empty["hd95"].isnan().item() and both_empty["nsd"].isnan().item()
    for pred, true in ((empty, lesion), (lesion, empty)):
        one_empty = metrics.surface_metrics(as_logits(pred), true)
        assert one_empty["hd95"].isnan().item() and one_empty["nsd"].item() == 0.0
        assert all(torch.isfinite(v).all() for v in metrics.segmentation_metrics(as_logits(pred), true).values())
    # "diagonal": every case gets a number.
    both_empty = metrics.surface_metrics(as_logits(empty), empty, empty="diagonal")
    assert both_empty["hd95"].item() == 0.0 and both_empty["nsd"].item() == 1.0
    for pred, true in ((empty, lesion), (lesion, empty)):
        one_empty = metrics.surface_metrics(as_logits(pred), true, empty="diagonal")
        assert one_empty["hd95"].item() == pytest.approx(math.hypot(12, 16))  # the image diagonal, 20
        assert one_empty["nsd"].item() == 0.0
    with pytest.raises(ValueError, match="unknown empty-case convention 'zero': expected one of monai, diagonal"):
        metrics.surface_metrics(as_logits(empty), empty, empty="zero")


def test_means_skip_nans_and_are_zero_over_nothing_as_monai():
    rows = [{"hd95": 2.0}, {"hd95": float("nan")}, {"hd95": 4.0}]
    assert metrics.mean_and_std(rows, "hd95") == {"mean": 3.0, "std": 1.0, "n": 2}
    assert metrics.mean_and_std(rows[1:2], "hd95") == {"mean": 0.0, "std": 0.0, "n": 0}


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
    ours = {**metrics.segmentation_metrics(logits, target), **metrics.surface_metrics(logits, target)}
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
    per_image = metrics.segmentation_metrics(as_logits(pred), true)["iou"].mean().item()
    pooled = metrics.PooledOverlap()
    for i in range(2):  # two updates, as a data loader would
        pooled.update(as_logits(pred[i:i + 1]), true[i:i + 1])
    result = pooled.compute()
    assert per_image == pytest.approx(0.5, abs=FLOAT32_TOL)
    assert result["pooled_iou"] == pytest.approx(100 / 101, abs=1e-9)
    assert result["pooled_dice"] == pytest.approx(200 / 201, abs=1e-9)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        metrics.segmentation_metrics(torch.zeros(1, 1, 8, 8), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="expected"):
        metrics.surface_metrics(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8))


def test_the_metric_name_tables_name_what_the_functions_return():
    logits, masks = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    assert tuple(metrics.segmentation_metrics(logits, masks)) == metrics.SEGMENTATION_METRICS
    assert tuple(metrics.surface_metrics(logits, masks)) == metrics.SURFACE_METRICS


# --- against MONAI, in 2D and 3D with anisotropic spacing ------------------------------------------


def blobs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(2, 1, *shape) masks: a few random boxes each, never empty, overlapping at random."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(2, 1, *shape)
    for case in range(2):
        for _ in range(3):
            corner = [int(torch.randint(0, side - 6, (), generator=generator)) for side in shape]
            size = [int(torch.randint(3, 7, (), generator=generator)) for _ in shape]
            masks[(case, 0, *[slice(c, c + s) for c, s in zip(corner, size, strict=True)])] = 1
    return masks


def one_hot(masks: torch.Tensor) -> torch.Tensor:
    return torch.cat([1 - masks, masks], dim=1)  # (B, 2, *spatial): background, foreground


@pytest.mark.parametrize("shape, spacing", [((40, 36), None), ((40, 36), (0.7, 1.9)),
                                            ((20, 24, 18), None), ((20, 24, 18), (2.5, 0.8, 0.8))])
def test_hd95_and_nsd_equal_monais(shape, spacing):
    """MONAI's compute_hausdorff_distance(percentile=95) and compute_surface_dice (test-only references)
    on non-empty random masks: the same edges (mask minus its erosion by the cross, outside = background)
    and the same Euclidean distances, so they agree to float32 rounding."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    pred, true = blobs(shape, seed=1), blobs(shape, seed=2)
    ours = metrics.surface_metrics(pred, true, from_logits=False, tolerance=1.5, spacing=spacing)
    monai_spacing = spacing or 1.0
    hd95 = compute_hausdorff_distance(one_hot(pred), one_hot(true), percentile=95, spacing=monai_spacing)[:, 0]
    nsd = compute_surface_dice(one_hot(pred), one_hot(true), class_thresholds=[1.5], spacing=monai_spacing)[:, 0]
    torch.testing.assert_close(ours["hd95"], hd95.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["nsd"], nsd.float(), atol=1e-6, rtol=0)
    assert (ours["hd95"] > 0).all() and (ours["nsd"] < 1).all()  # the cases are not trivial


def test_spacing_scales_distances_and_is_checked():
    pred, true = blobs((20, 24, 18), seed=3), blobs((20, 24, 18), seed=4)
    voxels = metrics.surface_metrics(pred, true, from_logits=False)["hd95"]
    doubled = metrics.surface_metrics(pred, true, from_logits=False, spacing=(2.0, 2.0, 2.0))["hd95"]
    torch.testing.assert_close(doubled, 2 * voxels)
    with pytest.raises(ValueError, match="expected 3 positive voxel sizes"):
        metrics.surface_metrics(pred, true, spacing=(1.0, 1.0))
    per_case = metrics.surface_metrics(pred, true, from_logits=False,
                                       spacing=torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]))["hd95"]
    torch.testing.assert_close(per_case, torch.stack([voxels[0], doubled[1]]))  # one spacing per case


def test_class_metrics_equal_monais_per_organ():
    """Random label maps of 5 classes in which class 4 never occurs in the truth but is predicted: per case and
    foreground class, Dice and IoU equal MONAI's DiceMetric / MeanIoU (include_background=False,
    ignore_empty=True), HD95 and NSD its compute_hausdorff_distance(percentile=95) / compute_surface_dice,
    NaN where MONAI gives NaN: the absent organ has NaN Dice and HD95 but NSD 0 (it was predicted)."""
    from monai.metrics import DiceMetric, MeanIoU, compute_hausdorff_distance, compute_surface_dice

    torch.manual_seed(0)
    classes, spacing = 5, (1.5, 1.5, 2.0)
    pred = torch.randint(0, classes, (3, 12, 10, 9))
    true = torch.randint(0, classes - 1, (3, 12, 10, 9))
    ours = metrics.class_metrics(pred, true, classes, spacing=spacing)

    def one_hot(labels):
        return torch.nn.functional.one_hot(labels, classes).permute(0, 4, 1, 2, 3).float()
    expected = {"dice": DiceMetric(include_background=False, reduction="none", ignore_empty=True)(one_hot(pred),
                                                                                                one_hot(true)),
                "iou": MeanIoU(include_background=False, reduction="none", ignore_empty=True)(one_hot(pred),
                                                                                             one_hot(true)),
                "hd95": compute_hausdorff_distance(one_hot(pred), one_hot(true), percentile=95, spacing=spacing),
                "nsd": compute_surface_dice(one_hot(pred), one_hot(true), [metrics.NSD_TOLERANCE] * (classes - 1),
                                            spacing=spacing)}
    for name, reference in expected.items():
        assert torch.equal(ours[name].isnan(), reference.isnan()), name
        torch.testing.assert_close(ours[name].nan_to_num(), reference.float().nan_to_num(), rtol=1e-5, atol=1e-6)
    assert ours["dice"][:, 3].isnan().all() and ours["hd95"][:, 3].isnan().all() and (ours["nsd"][:, 3] == 0).all()
    skipped = metrics.class_metrics(pred, true, classes, spacing=spacing, empty="diagonal")  # the earlier convention
    assert skipped["nsd"][:, 3].isnan().all() and torch.equal(skipped["nsd"][:, :3], ours["nsd"][:, :3])


# --- MONAI's own test tables (tests/metrics/test_surface_dice.py, test_hausdorff_distance.py of MONAI 1.6), the
# rows this project expresses: Euclidean distances, HD95 undirected, one binary mask per class. Expected values
# as MONAI's tables state them, at MONAI's tolerances (assert_allclose rtol 1e-7, assert_array_almost_equal 6 digits).


def binary(labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B, *S) label map -> (B, 1, *S) float mask of class k."""
    return (labels == k)[:, None].float()


def surface_by_class(pred, true, classes, tolerances, spacing=None):
    """{hd95, nsd} (B, classes) of each class's binary masks, background included, as MONAI's include_background."""
    scores = [metrics.surface_metrics(binary(pred, k), binary(true, k), from_logits=False, tolerance=tolerance,
                                      spacing=spacing) for k, tolerance in zip(range(classes), tolerances, strict=True)]
    return {name: torch.stack([s[name] for s in scores], dim=1) for name in metrics.SURFACE_METRICS}


def test_monai_surface_dice_not_predicted_not_present():
    """MONAI's test_not_predicted_not_present: class 1 predicted where the truth has class 2, class 3 nowhere:
    NSD with the background [[1, 0, 0, nan]], mean 1/3; without it [[0, 0, nan]], mean 0; all-empty masks give
    NaN per class and 0 over nothing."""
    pred, true = torch.zeros(1, 80, 80, dtype=torch.long), torch.zeros(1, 80, 80, dtype=torch.long)
    pred[0, 10:20, 10:20] = 1
    true[0, 10:20, 10:20] = 2
    with_background = surface_by_class(pred, true, 4, [1] * 4)["nsd"]
    torch.testing.assert_close(with_background, torch.tensor([[1.0, 0.0, 0.0, float("nan")]]), equal_nan=True)
    assert with_background.nanmean().item() == pytest.approx(1 / 3)
    foreground = metrics.class_metrics(pred, true, 4, spacing=None, surface=True)["nsd"]
    torch.testing.assert_close(foreground, torch.tensor([[0.0, 0.0, float("nan")]]), equal_nan=True)
    assert metrics.foreground_means({"nsd": foreground}, ["background", "a", "b", "c"])["nsd"].item() == 0.0
    empty = torch.zeros(2, 1, 1, dtype=torch.long)
    nsd = surface_by_class(empty + 5, empty + 5, 3, [1] * 3)["nsd"]  # no class 0..2 anywhere
    assert nsd.isnan().all()
    assert metrics.mean_and_std([{"nsd": v} for v in nsd.flatten().tolist()], "nsd") == {"mean": 0.0, "std": 0.0,
                                                                                           "n": 0}


@pytest.mark.parametrize("tolerances, expected", [
    ([0, 0], [1 - (8 + 4) / (36 * 2 + 8 + 4), 0]),
    ([2.8, 5.5], [1 - 3 / (36 * 2 + 8 + 4), 1 - (2 + 2) / (3 + 3)]),
    ([3, 6], [1 - 1 / (36 * 2 + 8 + 4), 1 - 2 / (3 + 3)]),
])
def test_monai_surface_dice_tolerance_all_distances(tolerances, expected):
    """MONAI's test_tolerance_all_distances, Euclidean rows: a 3-pixel bar against another 5 rows down and 5
    columns right, background and class 1, at three pairs of tolerances."""
    pred, true = torch.zeros(1, 10, 10, dtype=torch.long), torch.zeros(1, 10, 10, dtype=torch.long)
    pred[0, 1:4, 1] = 1
    true[0, 5:8, 6] = 1
    nsd = surface_by_class(pred, true, 2, tolerances)["nsd"]
    np.testing.assert_array_almost_equal(nsd.numpy(), [expected])


@pytest.mark.parametrize("spacing", [None, (0.85, 1.2)])
def test_monai_surface_dice_tolerance_euclidean_distance(spacing):
    """MONAI's test_tolerance_euclidean_distance(_with_spacing): 480 x 640, the foreground from column 50 against
    one from column 60, and an all-background second case; at tolerance 0 the expected table, growing with the
    tolerance until the 10-column shift (12 mm with spacing) is within it."""
    pred, true = torch.zeros(2, 480, 640, dtype=torch.long), torch.zeros(2, 480, 640, dtype=torch.long)
    pred[0, :, 50:] = 1
    true[0, :, 60:] = 1
    expected = np.array([[1 - (478 + 480 + 9 * 2) / (480 * 4 + 48 * 2 + 58 * 2),
                          1 - (478 + 480 + 9 * 2) / (480 * 4 + 588 * 2 + 578 * 2)], [1, np.nan]])
    at = {tolerance: surface_by_class(pred, true, 2, [tolerance] * 2, spacing)["nsd"]
          for tolerance in (0, 1, 9, 10, 11, 12, 13)}
    np.testing.assert_allclose(at[0].numpy(), expected, rtol=1e-6)
    assert (at[0][0] < at[1][0]).all() and (at[1][0] < at[9][0]).all() and (at[9][0] < at[10][0]).all()
    saturated = 12 if spacing else 10
    torch.testing.assert_close(at[saturated], at[13], rtol=0, atol=0, equal_nan=True)
    assert (at[13][0] == 1).all()


def test_monai_surface_dice_tolerance_euclidean_distance_3d():
    """MONAI's test_tolerance_euclidean_distance_3d: 200 x 110 x 80, the foreground from slice 20 against one
    from slice 30, at tolerance 0."""
    pred, true = torch.zeros(2, 200, 110, 80, dtype=torch.long), torch.zeros(2, 200, 110, 80, dtype=torch.long)
    pred[0, :, :, 20:] = 1
    true[0, :, :, 30:] = 1
    shared = 200 * 110 + 198 * 108 + 9 * 200 * 2 + 9 * 108 * 2
    expected = np.array([[1 - shared / (200 * 110 * 4 + (28 + 18) * 200 * 2 + (28 + 18) * 108 * 2),
                          1 - shared / (200 * 110 * 4 + (58 + 48) * 200 * 2 + (58 + 48) * 108 * 2)], [1, np.nan]])
    np.testing.assert_allclose(surface_by_class(pred, true, 2, [0, 0])["nsd"].numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("voxels, size, tolerance", [(7, 0.1, 0.7), (3, 0.2, 0.6)])
def test_nsd_counts_a_distance_equal_to_the_tolerance_as_monai(voxels, size, tolerance):
    """A boundary `voxels` voxels of `size` mm from the other, tolerance voxels * size mm: within it (NSD 1).
    In float64, 7 x 0.1 = 0.7000000000000001 > 0.7 (and 3 x 0.2 > 0.6); MONAI compares in float32, as we do."""
    from monai.metrics import compute_surface_dice

    true = torch.zeros(1, 1, 1, 30)
    true[..., :10] = 1
    pred = true.clone()
    pred[..., 10:10 + voxels] = 1
    ours = metrics.surface_metrics(pred, true, from_logits=False, tolerance=tolerance, spacing=(1.0, size))["nsd"]
    reference = compute_surface_dice(one_hot(pred), one_hot(true), [tolerance], spacing=(1.0, size))[:, 0]
    assert ours.item() == 1.0 == reference.item()


def sphere(radius: float, centre: tuple[int, int, int], shape=(99, 99, 99), spacing=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """MONAI's create_spherical_seg_3d: 1 where the physical distance to `centre` is at most `radius`."""
    axes = [torch.arange(n, dtype=torch.float64) * s - c for n, s, c in zip(shape, spacing, centre, strict=True)]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return (x * x + y * y + z * z <= radius * radius).float()[None, None]


@pytest.mark.parametrize("pred, true, spacing, expected", [
    (sphere(20, (20, 33, 22)), sphere(40, (20, 33, 22)), None, 20.09975124224178),
    (torch.zeros(1, 1, 99, 99, 99), sphere(40, (20, 33, 22)), None, float("nan")),
    (sphere(20, (49, 49, 49)), torch.zeros(1, 1, 99, 99, 99), None, float("nan")),
    (torch.zeros(1, 1, 99, 99, 99), torch.zeros(1, 1, 99, 99, 99), (0.85, 1.2, 0.9), float("nan")),
])
def test_monai_hausdorff_distance_table(pred, true, spacing, expected):
    """MONAI's test_hausdorff_distance rows with percentile 95, Euclidean, undirected: two concentric spheres of
    radius 20 and 40 (MONAI's table: 20.09975124224178, rtol 1e-6); one mask empty (MONAI 1.6: NaN at the 95th
    percentile, its table's inf being the maximum's); both empty (NaN, and 0 over nothing: its test_nans)."""
    hd95 = metrics.surface_metrics(pred, true, from_logits=False, spacing=spacing)["hd95"]
    np.testing.assert_allclose(hd95.numpy(), [expected], rtol=1e-6)
    if math.isnan(expected):
        assert metrics.mean_and_std([{"hd95": hd95.item()}], "hd95") == {"mean": 0.0, "std": 0.0, "n": 0}


def test_evaluate_cases_averages_the_organs_a_case_has():
    """A 'model' that returns fixed one-hot logits: each row's dice is the mean over the classes in its truth."""
    truth = torch.tensor([[0, 1, 1, 2], [0, 2, 2, 2]]).view(2, 1, 1, 1, 4)           # (B, 1, D, H, W) labels
    guess = torch.tensor([[0, 1, 2, 2], [0, 2, 2, 1]]).view(2, 1, 1, 4)

    class Fixed(torch.nn.Module):
        def forward(self, images):
            return torch.nn.functional.one_hot(guess, 3).permute(0, 4, 1, 2, 3).float()[: len(images)] * 10

    loader = [{"image": torch.zeros(2, 1, 1, 1, 4), "mask": truth, "name": ["a", "b"],
               "spacing": torch.ones(2, 3, dtype=torch.float64)}]
    task = Task(3, 3, ("background", "liver", "spleen"))
    rows, dataset_level = metrics.evaluate_cases(task, Fixed(), loader, torch.device("cpu"), torch.float32)
    assert dataset_level == {}
    # case a: liver 2*1/(1+2) = 2/3, spleen 2*1/(2+1) = 2/3; case b: liver absent (NaN), spleen 2*2/(2+3) = 4/5
    assert rows[0]["dice"] == pytest.approx(2 / 3) and rows[1]["dice"] == pytest.approx(4 / 5)
    assert math.isnan(rows[1]["dice/liver"]) and rows[1]["dice/spleen"] == pytest.approx(4 / 5)
    assert metrics.mean_and_std(rows, "dice/liver") == {"mean": pytest.approx(2 / 3), "std": 0.0, "n": 1}
