"""The paper's segmentation metrics, per image and pooled, HD95 / NSD, and the loop that computes them.

Segmentation metrics, per image, threshold 0.5 on sigmoid (the authors' CMUNeXt code, validation
batch 1, then averaged over images). P = predicted foreground, G = true foreground, TP/FP/FN/TN
the pixel counts of one image, N = H*W:
    IoU         = (|P∩G| + 1e-5) / (|P∪G| + 1e-5)          empty P and empty G score 1
    Dice        = 2 IoU / (1 + IoU) = (2|P∩G| + 2e-5) / (|P| + |G| + 2e-5)
                  (the authors derive Dice from the smoothed IoU; without smoothing it is 2TP/(2TP+FP+FN))
    SE (recall) = TP / (TP + FN + 1e-6)     PC (precision) = TP / (TP + FP + 1e-6)
    SP          = TN / (TN + FP + 1e-6)     ACC = (TP + TN) / N
    F1          = 2 SE PC / (SE + PC + 1e-6)    per image, the paper's "F1" (not pooled Dice); algebraically
                  2TP/(2TP+FP+FN), so it equals the per-image Dice up to the guards, except on empty cases
The 1e-6 guards are the authors'; they fix the empty cases without NaN: an image with empty G has
SE 0 (and F1 0) whatever is predicted, an empty P has PC 0, so empty-vs-empty scores IoU 1, Dice 1,
SE 0, PC 0, F1 0, SP 1, ACC 1. (The authors' code also binarises G as `G == max(G)`, which turns an
empty G into an all-foreground one for SE/PC/SP/ACC; that is a bug and is not reproduced here.)

Dataset-level (pooled-pixel) IoU and Dice sum TP, FP, FN over all images first, then apply the
same formulas once; papers differ on which of the two they report, so both are given.

Surface metrics (MedVisionLlama reports HD95 and NSD), per image. The boundary of a mask is the
mask minus its erosion by the 4-connected cross, with outside-the-image counted as background
(a mask touching the image edge has boundary there), as MONAI's get_mask_edges. With d(x, S) the
Euclidean distance from x to the nearest point of S (in pixels, or in millimetres given the voxel spacing):
    HD95 = max(q95{d(p, ∂G) : p in ∂P}, q95{d(g, ∂P) : g in ∂G})   q95 = 95th percentile, linear
           interpolation: MONAI's compute_hausdorff_distance(percentile=95, directed=False)
    NSD  = (|{p in ∂P : d(p, ∂G) <= tau}| + |{g in ∂G : d(g, ∂P) <= tau}|) / (|∂P| + |∂G|),  tau = 2 px
           (2 mm on volumes, whose distances are in mm: a choice, the MedVisionLlama paper names none)
Distances are compared with tau in float32, as MONAI does: 7 voxels of 0.1 mm are within 0.7 mm (in float64
7 x 0.1 = 0.7000000000000001 is not). When a mask is empty there is no boundary to measure from; what HD95
and NSD are then is a convention, `empty` (EMPTY_CONVENTIONS):
    "monai" (the default): MONAI 1.6's compute_hausdorff_distance(percentile=95) and compute_surface_dice, which
        published BTCV and MSD numbers use. HD95 is NaN whenever a mask is empty (skipped by every mean);
        NSD is 0 when exactly one is empty (a missed lesion, or one invented where there is none) and NaN
        when both are.
    "diagonal": this project's earlier convention, which gives every case a number: both empty -> HD95 0,
        NSD 1; exactly one empty -> HD95 = the image diagonal sqrt(H^2 + W^2) (larger than any distance two
        pixels can have, so a missed or invented lesion scores worse than any real prediction), NSD 0.

Multi-class (BTCV's 13 organs and background), per case and foreground class k with P = (argmax == k),
G = (label == k): Dice = 2|P∩G| / (|P| + |G|), IoU = |P∩G| / |P∪G|, HD95 and NSD of P and G as above;
a class absent from the case's truth has NaN Dice and IoU, skipped by every mean (MONAI's DiceMetric with
include_background=False and ignore_empty=True, which the 3D works of the paper's Table 2 report); its HD95 and
NSD follow `empty` as above, so by default an organ predicted where the truth has none scores NSD 0 (MONAI's
SurfaceDiceMetric), and with "diagonal" it is skipped too. A case's "dice" is the mean over its scored classes;
a class's, the mean over the cases that have it.

All functions take (B, 1, H, W) logits (or probabilities) and masks, or (B, 1, D, H, W) volumes, and return
one value per image (surface_metrics takes the voxel spacing, so 3D distances are in millimetres);
`evaluate_cases` runs a model over a loader and returns one row per case. Over images: `mean_and_std` (NaNs
skipped; over nothing, 0 with n = 0, as MONAI's aggregate with its not_nans count),
and `paired_difference` (is a gain real? the paired bootstrap CI and sign-flip permutation p of
per-image differences, which sweep.py tabulates).
"""
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .prediction import case_probabilities

if TYPE_CHECKING:  # task.py imports this module
    from .task import Task

IOU_SMOOTH = 1e-5  # the authors' smoothing of IoU: empty vs empty scores 1
RATIO_EPS = 1e-6  # the authors' guard in the denominators of SE, PC, SP and F1
THRESHOLD = 0.5  # on sigmoid probabilities, and on target masks
NSD_TOLERANCE = 2.0  # in the distances' unit: pixels in 2D, millimetres on volumes with their spacing
EMPTY_CONVENTIONS = ("monai", "diagonal")  # HD95 and NSD of a case with an empty mask (the docstring above)
# The per-image metrics, in the order tables list them: segmentation_metrics returns the first seven,
# surface_metrics the last two.
SEGMENTATION_METRICS = ("iou", "dice", "f1", "sensitivity", "precision", "specificity", "accuracy")
SURFACE_METRICS = ("hd95", "nsd")
OVERLAP_METRICS = ("dice", "iou")  # what class_metrics gives per class, before the surface metrics

# -----------------------------------------------------------------------------
# masks and pixel counts

def binary_masks(output: Tensor, target: Tensor, from_logits: bool = True) -> tuple[Tensor, Tensor]:
    """output, target (B, 1, H, W), (B, H, W) or (B, 1, D, H, W) -> predicted and true masks, both
    (B, H, W) or (B, D, H, W) bool.

    Prediction: sigmoid(output) > 0.5 (output > 0.5 if from_logits is False); truth: target > 0.5.
    """
    if output.shape != target.shape:
        raise ValueError(f"expected output and target of the same shape, got {tuple(output.shape)} "
                         f"and {tuple(target.shape)}; give the mask the model output's (B, 1, H, W)")
    if output.dim() in (4, 5) and output.shape[1] == 1:
        output, target = output[:, 0], target[:, 0]
    elif output.dim() != 3:
        raise ValueError(f"expected (B, 1, H, W), (B, H, W) or (B, 1, D, H, W) binary-segmentation tensors, got "
                         f"{tuple(output.shape)}")
    probability = torch.sigmoid(output) if from_logits else output
    return probability > THRESHOLD, target > THRESHOLD


def confusion_counts(pred: Tensor, true: Tensor) -> dict[str, Tensor]:
    """pred, true (B, H, W) bool -> {"tp", "fp", "fn", "tn"}, each (B,) float32 pixel counts."""
    pred, true = pred.flatten(1), true.flatten(1)  # (B, N)
    counts = {"tp": pred & true, "fp": pred & ~true, "fn": ~pred & true, "tn": ~pred & ~true}
    return {name: hits.sum(1).float() for name, hits in counts.items()}


def iou_and_dice(tp: Tensor, fp: Tensor, fn: Tensor) -> tuple[Tensor, Tensor]:
    iou = (tp + IOU_SMOOTH) / (tp + fp + fn + IOU_SMOOTH)
    return iou, 2 * iou / (1 + iou)


# -----------------------------------------------------------------------------
# the paper's per-image metrics

def segmentation_metrics(output: Tensor, target: Tensor, from_logits: bool = True) -> dict[str, Tensor]:
    """Per-image metrics of the module docstring.

    output (B, 1, H, W) logits (or probabilities with from_logits=False), target (B, 1, H, W) masks
    -> {"iou", "dice", "f1", "sensitivity", "precision", "specificity", "accuracy"}, each (B,).
    """
    c = confusion_counts(*binary_masks(output, target, from_logits))
    iou, dice = iou_and_dice(c["tp"], c["fp"], c["fn"])
    sensitivity = c["tp"] / (c["tp"] + c["fn"] + RATIO_EPS)
    precision = c["tp"] / (c["tp"] + c["fp"] + RATIO_EPS)
    specificity = c["tn"] / (c["tn"] + c["fp"] + RATIO_EPS)
    accuracy = (c["tp"] + c["tn"]) / (c["tp"] + c["fp"] + c["fn"] + c["tn"])
    f1 = 2 * sensitivity * precision / (sensitivity + precision + RATIO_EPS)
    return {"iou": iou, "dice": dice, "f1": f1, "sensitivity": sensitivity, "precision": precision,
            "specificity": specificity, "accuracy": accuracy}


class PooledOverlap:
    """Dataset-level IoU and Dice: TP, FP, FN summed over every image seen, then the formulas once.

    pooled = PooledOverlap(); for each batch: pooled.update(logits, masks); pooled.compute()
    """

    def __init__(self):
        self.tp = self.fp = self.fn = 0.0

    def update(self, output: Tensor, target: Tensor, from_logits: bool = True) -> None:
        c = confusion_counts(*binary_masks(output, target, from_logits))
        self.tp += c["tp"].sum().item()
        self.fp += c["fp"].sum().item()
        self.fn += c["fn"].sum().item()

    def compute(self) -> dict[str, float]:
        """-> {"pooled_iou", "pooled_dice"} (python floats, float64 sums)."""
        iou, dice = iou_and_dice(*(torch.tensor(n, dtype=torch.float64) for n in (self.tp, self.fp, self.fn)))
        return {"pooled_iou": iou.item(), "pooled_dice": dice.item()}


# -----------------------------------------------------------------------------
# surface metrics: HD95 and normalised surface Dice

def mask_boundary(mask: Tensor, spatial_dims: int = 2) -> Tensor:
    """mask (..., *spatial) bool -> its boundary, same shape: the mask minus its erosion by the cross
    (4-connected in 2D, 6-connected in 3D) over the last `spatial_dims` dimensions.

    Outside the image counts as background, so a mask touching the edge has boundary there.
    """
    padded = F.pad(mask.to(torch.uint8), (1, 1) * spatial_dims).bool()  # each spatial side + 2
    inner = [slice(1, -1)] * spatial_dims
    eroded = mask.clone()
    for axis in range(spatial_dims):
        for shifted in (slice(None, -2), slice(2, None)):  # the neighbour before and after along `axis`
            index = inner.copy()
            index[axis] = shifted
            eroded &= padded[(..., *index)]
    return mask & ~eroded


def surface_metrics(output: Tensor, target: Tensor, from_logits: bool = True,
                    tolerance: float = NSD_TOLERANCE, spacing=None, empty: str = "monai") -> dict[str, Tensor]:
    """Per-case HD95 and NSD of the module docstring, in 2D or 3D.

    output (B, 1, H, W) or (B, 1, D, H, W) logits (or probabilities with from_logits=False), target the
    masks of the same shape -> {"hd95", "nsd"}, each (B,) float32. spacing: the voxel size along each
    spatial axis (e.g. millimetres, from the NIfTI header), one for the batch (d,) or one per case (B, d);
    None = 1, so distances are in pixels. HD95 and the NSD tolerance are in spacing's unit. The distance
    from each boundary voxel of one mask to the other's boundary is read off a Euclidean distance transform
    of the other boundary's complement (scipy.ndimage, exact, O(voxels): fast on 128^3 volumes), as MONAI
    computes it. empty: what a case with an empty mask scores, one of EMPTY_CONVENTIONS.
    """
    from scipy.ndimage import distance_transform_edt  # 0.2 s of imports that training never needs

    if empty not in EMPTY_CONVENTIONS:
        raise ValueError(f"surface_metrics: unknown empty-case convention {empty!r}: expected one of "
                         f"{', '.join(EMPTY_CONVENTIONS)}")
    pred, true = binary_masks(output, target, from_logits)  # (B, *spatial)
    spatial_dims = pred.ndim - 1
    spacing = np.ones(spatial_dims) if spacing is None else np.asarray(
        spacing.cpu() if torch.is_tensor(spacing) else spacing, dtype=np.float64)
    spacings = np.broadcast_to(spacing, (len(pred), spatial_dims)) if spacing.shape == (spatial_dims,) else spacing
    if spacings.shape != (len(pred), spatial_dims) or (spacings <= 0).any():
        raise ValueError(f"surface_metrics: expected {spatial_dims} positive voxel sizes (or one row of them per "
                         f"case), got {spacing.tolist()}")
    pred_edges = mask_boundary(pred, spatial_dims).cpu().numpy()  # (B, *spatial)
    true_edges = mask_boundary(true, spatial_dims).cpu().numpy()
    hd95, nsd = [], []
    for pred_edge, true_edge, spacing in zip(pred_edges, true_edges, spacings, strict=True):
        if not pred_edge.any() or not true_edge.any():
            case_hd95, case_nsd = empty_case_scores(empty, both_empty=pred_edge.any() == true_edge.any(),
                                                    diagonal=float(np.linalg.norm(np.array(pred.shape[1:]) * spacing)))
            hd95.append(case_hd95)
            nsd.append(case_nsd)
            continue
        pred_to_true = torch.from_numpy(distance_transform_edt(~true_edge, sampling=spacing)[pred_edge])
        true_to_pred = torch.from_numpy(distance_transform_edt(~pred_edge, sampling=spacing)[true_edge])
        hd95.append(max(torch.quantile(pred_to_true, 0.95).item(), torch.quantile(true_to_pred, 0.95).item()))
        # In float32, as MONAI: a distance that is the tolerance up to float64 rounding counts as within it.
        within = (pred_to_true.float() <= tolerance).sum() + (true_to_pred.float() <= tolerance).sum()
        nsd.append(within.item() / (len(pred_to_true) + len(true_to_pred)))
    return {"hd95": torch.tensor(hd95, dtype=torch.float32, device=output.device),
            "nsd": torch.tensor(nsd, dtype=torch.float32, device=output.device)}


def empty_case_scores(empty: str, both_empty: bool, diagonal: float) -> tuple[float, float]:
    """(HD95, NSD) of a case in which at least one mask is empty, by the convention `empty` (module docstring);
    diagonal: the image's diagonal in the distances' unit."""
    if empty == "monai":
        return math.nan, (math.nan if both_empty else 0.0)
    return (0.0, 1.0) if both_empty else (diagonal, 0.0)


# -----------------------------------------------------------------------------
# multi-class: per foreground class, as MONAI's DiceMetric(include_background=False) scores BTCV

def class_metrics(pred: Tensor, true: Tensor, num_classes: int, *, surface: bool = True,
                  spacing=None, empty: str = "monai") -> dict[str, Tensor]:
    """pred, true (B, *S) integer label maps in 0..K-1 -> {"dice", "iou"} (+ "hd95", "nsd" when `surface`),
    each (B, K - 1) float32 for the foreground classes 1..K-1, with P = (pred == k), G = (true == k):
        Dice = 2 |P∩G| / (|P| + |G|),   IoU = |P∩G| / |P∪G|,   HD95 and NSD as surface_metrics of P and G.
    A class absent from a case's truth has NaN Dice and IoU (MONAI's ignore_empty: nothing to find, so nothing
    to score; the means over cases and classes skip it); its HD95 and NSD are surface_metrics' with `empty`
    ("monai": NSD 0 if the class was predicted there, else NaN; HD95 NaN), or NaN too with "diagonal".
    No smoothing, as MONAI's DiceMetric."""
    if pred.shape != true.shape:
        raise ValueError(f"expected predicted and true label maps of the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(true.shape)}")
    columns = {name: [] for name in (*OVERLAP_METRICS, *(SURFACE_METRICS if surface else ()))}
    for k in range(1, num_classes):
        predicted, truth = pred == k, true == k                                  # (B, *S) bool
        both = (predicted & truth).flatten(1).sum(1).float()                     # (B,)
        sizes = predicted.flatten(1).sum(1).float() + truth.flatten(1).sum(1).float()
        absent = truth.flatten(1).sum(1) == 0
        scores = {"dice": 2 * both / sizes, "iou": both / (sizes - both)}
        scores = {name: values.masked_fill(absent, float("nan")) for name, values in scores.items()}
        if surface:
            distances = surface_metrics(predicted[:, None].float(), truth[:, None].float(), from_logits=False,
                                        spacing=spacing, empty=empty)
            scores.update({name: values.masked_fill(absent, float("nan")) if empty == "diagonal" else values
                           for name, values in distances.items()})
        for name, values in scores.items():
            columns[name].append(values)
    return {name: torch.stack(values, dim=1) for name, values in columns.items()}  # (B, K - 1) each


# -----------------------------------------------------------------------------
# a model over a loader

@torch.no_grad()
def evaluate_cases(task: "Task", net: torch.nn.Module, loader, device: torch.device, precision: torch.dtype, *,
                   surface: bool = True, extra=None, empty: str = "monai") -> tuple[list[dict], dict[str, float]]:
    """Every case of `loader`, in order, through `net` in eval mode (BatchNorm's running statistics make
    each image's output independent of its batch, so this is the paper's batch-1 protocol), whole or by the
    task's sliding windows (prediction.case_probabilities) ->
      rows: one per case, {"case", "iou", ..., "accuracy"} plus "hd95", "nsd" when `surface`, plus
            what `extra(probabilities, masks)` returns (per-image (B,) tensors by name) when given;
      dataset-level: pooled {"pooled_iou", "pooled_dice"} and the mean IoU of the two trivial
            predictors, "all_foreground_iou" and "all_background_iou", to judge a score by.
    A multi-class task (masks are (B, 1, *S) label maps): the prediction is the argmax; each row holds "dice",
    "iou" (+ "hd95", "nsd") averaged over the foreground classes class_metrics scores (those in the case's
    truth; for NSD by default also those predicted without being there) and each class's as "dice/<name>",
    ...; no dataset-level numbers. empty: the HD95 / NSD convention for empty masks (EMPTY_CONVENTIONS). The
    model's train / eval mode is restored afterwards."""
    was_training = net.training
    net.eval()
    infer = case_probabilities(task, net, device, precision)
    rows, pooled, trivial = [], PooledOverlap(), {"all_foreground_iou": [], "all_background_iou": []}
    for batch in tqdm(loader, desc="evaluating", leave=False, disable=None):
        probabilities = infer(batch["image"])
        masks = batch["mask"].to(probabilities.device)  # sliding windows sum on the CPU
        if task.multiclass:
            per_image = foreground_means(class_metrics(task.labels(probabilities), masks[:, 0], task.num_classes,
                                                       surface=surface, spacing=batch.get("spacing"), empty=empty),
                                         task.class_names)
        else:
            per_image = segmentation_metrics(probabilities, masks, from_logits=False)
            if surface:  # volumes carry their voxel size: distances in mm
                per_image.update(surface_metrics(probabilities, masks, from_logits=False, spacing=batch.get("spacing"),
                                                 empty=empty))
            pooled.update(probabilities, masks, from_logits=False)
            for key, constant in (("all_foreground_iou", torch.ones_like), ("all_background_iou", torch.zeros_like)):
                trivial[key] += segmentation_metrics(constant(masks), masks, from_logits=False)["iou"].tolist()
        if extra is not None:
            per_image.update(extra(probabilities, masks))
        rows += [{"case": name, **{key: values[i].item() for key, values in per_image.items()}}
                 for i, name in enumerate(batch["name"])]
    net.train(was_training)
    if task.multiclass:
        return rows, {}
    return rows, {**pooled.compute(), **{key: float(np.mean(values)) for key, values in trivial.items()}}


def foreground_means(per_class: dict[str, Tensor], class_names: list[str]) -> dict[str, Tensor]:
    """{metric: (B, K - 1)} -> {metric: (B,) mean over the classes scored, "metric/<class name>": (B,)}."""
    means = {name: values.nanmean(dim=1) for name, values in per_class.items()}
    return means | {f"{name}/{class_name}": values[:, k] for name, values in per_class.items()
                    for k, class_name in enumerate(class_names[1:])}


def mean_and_std(rows: list[dict], key: str) -> dict[str, float]:
    """Over images -> {"mean", "std", "n"}: population std (ddof 0), so a single image gives 0, not NaN;
    NaN values (a class absent from a case's truth, HD95 of an empty mask) are skipped and n counts the rest.
    Over nothing (n = 0) the mean and std are 0, as MONAI's aggregate gives with its not_nans count of 0."""
    values = np.array([row[key] for row in rows], dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return {"mean": 0.0, "std": 0.0, "n": 0}
    return {"mean": float(values.mean()), "std": float(values.std()), "n": len(values)}


def paired_difference(differences, *, resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Is a gain real? `differences` (n,): one paired difference per unit (an image of a seed: setting
    minus baseline on the same image, so the image's own difficulty cancels) ->
        mean       the mean difference
        ci_low, ci_high   its 95 % percentile-bootstrap interval (units resampled with replacement)
        p_value    two-sided sign-flip permutation test of "no difference": under it each unit's sign
                   is a coin flip; p = the share of the 2^n sign patterns whose |mean| reaches the
                   observed one, enumerated exactly for n <= 16, else estimated from `resamples`
                   random patterns as (1 + hits) / (1 + resamples), which never gives 0
        n          the number of units
    Both resamplings are seeded, so the same runs give the same table."""
    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    if n == 0:
        raise ValueError("paired_difference: no paired units (do the runs share images?)")
    rng = np.random.default_rng(seed)
    chunks = [min(1000, resamples - start) for start in range(0, resamples, 1000)]  # bounded memory for large n
    boot = np.concatenate([d[rng.integers(0, n, size=(rows, n))].mean(axis=1) for rows in chunks])
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, observed)  # the sign pattern of the data itself must count as reaching it
    if n <= 16:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)         # (2^n, n) of +-1
        p_value = float(np.mean(np.abs((signs * d).mean(axis=1)) >= observed - tolerance))
    else:
        hits = sum(int(np.sum(np.abs((rng.choice([-1.0, 1.0], size=(rows, n)) * d).mean(axis=1))
                              >= observed - tolerance)) for rows in chunks)
        p_value = (1 + hits) / (1 + resamples)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"mean": float(d.mean()), "ci_low": float(low), "ci_high": float(high), "p_value": p_value, "n": n}
