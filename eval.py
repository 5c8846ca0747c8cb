"""Evaluation of a trained LLM4Seg model: the paper's metrics, its Sec. 4.2 feature analysis, pictures.

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
Euclidean distance in pixels from x to the nearest point of S:
    HD95 = max(q95{d(p, ∂G) : p in ∂P}, q95{d(g, ∂P) : g in ∂G})   q95 = 95th percentile, linear
           interpolation: MONAI's compute_hausdorff_distance(percentile=95, directed=False)
    NSD  = (|{p in ∂P : d(p, ∂G) <= tau}| + |{g in ∂G : d(g, ∂P) <= tau}|) / (|∂P| + |∂G|),  tau = 2 px
Empty cases: both empty -> HD95 0, NSD 1; exactly one empty -> HD95 = image diagonal sqrt(H^2 + W^2)
(larger than any distance two pixels can have, so a missed or invented lesion scores worse than any
real prediction), NSD 0.

Feature analysis (paper Sec. 4.2, Fig. 2), on bottleneck features (B, C, H, W):
    activation map   A = minmax(mean_c |f_c|) in [0, 1], (B, H, W): the paper's "Act. Before/After"
    concentration    IoU(A > 0.4, G) with A upsampled to the mask's size: Fig. 2(b)
    effective rank   per channel c, sigma = svdvals(f_c) (f_c is an H x W matrix), p = sigma / sum(sigma),
                     ER_c = exp(-sum_i p_i log p_i) (Roy & Vetterli 2007): "the entropy of the singular
                     values, normalized by their sum", exponentiated so a rank-r map with equal singular
                     values has ER r; averaged over channels
    LSVR             LSVR_c = -log(sigma_1 / sum(sigma)): "the ratio of the largest singular value to the
                     other singular values, on a negative logarithmic scale"; 0 for a rank-1 map, larger
                     when the spectrum is spread; averaged over channels
Channels that are exactly zero have no spectrum and are left out of the channel average.

Pictures (Pillow): a jet heat map blended over the image (Fig. 2a) and the image with the ground-truth
contour (green) and the predicted contour (red).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

IOU_SMOOTH = 1e-5  # the authors' smoothing of IoU: empty vs empty scores 1
RATIO_EPS = 1e-6  # the authors' guard in the denominators of SE, PC, SP and F1
THRESHOLD = 0.5  # on sigmoid probabilities, and on target masks
NSD_TOLERANCE = 2.0  # pixels
CONCENTRATION_THRESHOLD = 0.4  # paper Fig. 2(b)
GT_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 0, 0)


# -----------------------------------------------------------------------------
# masks and pixel counts

def binary_masks(output: Tensor, target: Tensor, from_logits: bool = True) -> tuple[Tensor, Tensor]:
    """output, target (B, 1, H, W) or (B, H, W) -> predicted and true masks, both (B, H, W) bool.

    Prediction: sigmoid(output) > 0.5 (output > 0.5 if from_logits is False); truth: target > 0.5.
    """
    if output.shape != target.shape:
        raise ValueError(f"expected output and target of the same shape, got {tuple(output.shape)} "
                         f"and {tuple(target.shape)}; give the mask the model output's (B, 1, H, W)")
    if output.dim() == 4 and output.shape[1] == 1:
        output, target = output[:, 0], target[:, 0]
    if output.dim() != 3:
        raise ValueError(f"expected (B, 1, H, W) or (B, H, W) binary-segmentation tensors, got "
                         f"{tuple(output.shape)}")
    probability = torch.sigmoid(output) if from_logits else output
    return probability > THRESHOLD, target > THRESHOLD


def confusion_counts(pred: Tensor, true: Tensor) -> dict[str, Tensor]:
    """pred, true (B, H, W) bool -> {"tp", "fp", "fn", "tn"}, each (B,) float32 pixel counts."""
    pred, true = pred.flatten(1), true.flatten(1)  # (B, N)
    counts = {"tp": pred & true, "fp": pred & ~true, "fn": ~pred & true, "tn": ~pred & ~true}
    return {name: hits.sum(1).float() for name, hits in counts.items()}


def _iou_and_dice(tp: Tensor, fp: Tensor, fn: Tensor) -> tuple[Tensor, Tensor]:
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
    iou, dice = _iou_and_dice(c["tp"], c["fp"], c["fn"])
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
        iou, dice = _iou_and_dice(*(torch.tensor(n, dtype=torch.float64) for n in (self.tp, self.fp, self.fn)))
        return {"pooled_iou": iou.item(), "pooled_dice": dice.item()}


# -----------------------------------------------------------------------------
# surface metrics: HD95 and normalised surface Dice

def mask_boundary(mask: Tensor) -> Tensor:
    """mask (..., H, W) bool -> its boundary (..., H, W) bool: mask minus its 4-connected erosion.

    Outside the image counts as background, so a mask touching the edge has boundary there.
    """
    padded = F.pad(mask.to(torch.uint8), (1, 1, 1, 1)).bool()  # (..., H+2, W+2)
    eroded = (mask & padded[..., :-2, 1:-1] & padded[..., 2:, 1:-1]
              & padded[..., 1:-1, :-2] & padded[..., 1:-1, 2:])
    return mask & ~eroded


def _nearest_distances(points: Tensor, others: Tensor, chunk_elements: int = 1 << 22) -> Tensor:
    """points (N, 2), others (M, 2) pixel coordinates -> (N,) distance from each point to the nearest other.

    Chunked over points so a noisy prediction (every pixel a boundary) stays within ~16 MB per chunk.
    """
    chunk = max(1, chunk_elements // len(others))
    # The matmul path of cdist rounds: identical points would be ~1e-3 apart and 2 px would be > 2.
    return torch.cat([torch.cdist(part, others, compute_mode="donot_use_mm_for_euclid_dist").amin(1)
                      for part in points.split(chunk)])


def surface_metrics(output: Tensor, target: Tensor, from_logits: bool = True,
                    tolerance: float = NSD_TOLERANCE) -> dict[str, Tensor]:
    """Per-image HD95 and NSD of the module docstring (distances in pixels, tolerance in pixels).

    output (B, 1, H, W) logits (or probabilities with from_logits=False), target (B, 1, H, W) masks
    -> {"hd95", "nsd"}, each (B,) float32.
    """
    pred, true = binary_masks(output, target, from_logits)
    pred_edges, true_edges = mask_boundary(pred), mask_boundary(true)
    diagonal = math.hypot(pred.shape[-2], pred.shape[-1])
    hd95, nsd = [], []
    for pred_edge, true_edge in zip(pred_edges, true_edges):
        pred_points = pred_edge.nonzero().float()  # (|∂P|, 2) row, column
        true_points = true_edge.nonzero().float()  # (|∂G|, 2)
        if len(pred_points) == 0 or len(true_points) == 0:
            both_empty = len(pred_points) == len(true_points)
            hd95.append(0.0 if both_empty else diagonal)
            nsd.append(1.0 if both_empty else 0.0)
            continue
        pred_to_true = _nearest_distances(pred_points, true_points)
        true_to_pred = _nearest_distances(true_points, pred_points)
        hd95.append(max(torch.quantile(pred_to_true, 0.95).item(), torch.quantile(true_to_pred, 0.95).item()))
        within = (pred_to_true <= tolerance).sum() + (true_to_pred <= tolerance).sum()
        nsd.append(within.item() / (len(pred_points) + len(true_points)))
    return {"hd95": torch.tensor(hd95, device=output.device), "nsd": torch.tensor(nsd, device=output.device)}


# -----------------------------------------------------------------------------
# feature analysis (paper Sec. 4.2, Fig. 2)

def activation_map(features: Tensor) -> Tensor:
    """features (B, C, H, W) -> (B, H, W): mean over channels of |features|, min-max scaled to [0, 1]
    per image. A constant map becomes all zeros."""
    activation = features.abs().mean(1)  # (B, H, W)
    low = activation.amin((1, 2), keepdim=True)
    high = activation.amax((1, 2), keepdim=True)
    return (activation - low) / (high - low).clamp_min(torch.finfo(activation.dtype).tiny)


def upsample_map(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """maps (B, h, w) -> (B, H, W) = size, bilinear; values stay in the input's range."""
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def concentration_iou(activation: Tensor, mask: Tensor,
                      threshold: float = CONCENTRATION_THRESHOLD) -> Tensor:
    """activation (B, H, W) in [0, 1], mask (B, H, W) or (B, 1, H, W) -> (B,) IoU of (activation > threshold)
    with (mask > 0.5), smoothed as the segmentation IoU. Upsample the map to the mask's size first."""
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if activation.shape != mask.shape:
        raise ValueError(f"expected an activation map of the mask's shape {tuple(mask.shape)}, got "
                         f"{tuple(activation.shape)}; bring it to the mask's size with upsample_map")
    c = confusion_counts(activation > threshold, mask > THRESHOLD)
    return _iou_and_dice(c["tp"], c["fp"], c["fn"])[0]


def _channel_spectra(features: Tensor) -> tuple[Tensor, Tensor]:
    """features (B, C, H, W) -> normalised singular values p (B, C, K), K = min(H, W), descending,
    and which channels have any spectrum at all (B, C) bool."""
    singular_values = torch.linalg.svdvals(features.float())  # (B, C, K): one SVD per H x W channel map
    total = singular_values.sum(-1, keepdim=True)  # (B, C, 1)
    return singular_values / total.clamp_min(torch.finfo(total.dtype).tiny), total[..., 0] > 0


def _mean_over_channels(values: Tensor, has_spectrum: Tensor) -> Tensor:
    """values, has_spectrum (B, C) -> (B,) mean over the channels with a spectrum (NaN if none has)."""
    return torch.where(has_spectrum, values, 0).sum(1) / has_spectrum.sum(1)


def effective_rank(features: Tensor) -> Tensor:
    """features (B, C, H, W) -> (B,) entropy effective rank exp(-sum p log p), p = sigma / sum(sigma),
    per channel map, averaged over channels. Rank-1 map: 1; H x H identity: H. Mean over images: .mean()."""
    p, has_spectrum = _channel_spectra(features)
    entropy = -torch.special.xlogy(p, p).sum(-1)  # (B, C); xlogy makes 0 log 0 = 0
    return _mean_over_channels(entropy.exp(), has_spectrum)


def lsvr(features: Tensor) -> Tensor:
    """features (B, C, H, W) -> (B,) largest-singular-value ratio -log(sigma_1 / sum(sigma)) per channel map,
    averaged over channels. Rank-1 map: 0; H x H identity: log H."""
    p, has_spectrum = _channel_spectra(features)
    return _mean_over_channels(-p[..., 0].log(), has_spectrum)


# -----------------------------------------------------------------------------
# pictures

def _numpy(array) -> np.ndarray:
    return array.detach().cpu().numpy() if torch.is_tensor(array) else np.asarray(array)


def _rgb_image(image) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 -> (H, W, 3) uint8."""
    image = _numpy(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"expected a uint8 image (H, W, 3) or (H, W), got {image.dtype} {image.shape}; "
                         f"undo the normalisation and convert with .astype(np.uint8)")
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def _check_same_size(image: np.ndarray, other: np.ndarray, what: str) -> None:
    if other.shape != image.shape[:2]:
        raise ValueError(f"expected the {what} at the image's size {image.shape[:2]}, got {other.shape}")


def jet_colours(values: np.ndarray) -> np.ndarray:
    """values (...) in [0, 1] -> (..., 3) uint8 on the jet colour scale (blue low, red high)."""
    x = np.clip(values, 0.0, 1.0)[..., None] * 4.0
    centres = np.array([3.0, 2.0, 1.0])  # where red, green, blue peak on the 0..4 scale
    return (np.clip(1.5 - np.abs(x - centres), 0.0, 1.0) * 255).round().astype(np.uint8)


def heatmap_png(image, activation, path, opacity: float = 0.5) -> None:
    """Write `activation` (H, W) in [0, 1] as a jet heat map blended over `image` (H, W, 3) uint8 to `path`."""
    image, activation = _rgb_image(image), _numpy(activation)
    _check_same_size(image, activation, "activation map (upsample_map it first)")
    blended = (1 - opacity) * image + opacity * jet_colours(activation)
    Image.fromarray(blended.round().astype(np.uint8)).save(path)


def overlay_png(image, gt_mask, pred_mask, path) -> None:
    """Write `image` (H, W, 3) uint8 with the contours of gt_mask (green) and pred_mask (red), (H, W), to `path`.
    Where the contours coincide the prediction's red is drawn on top."""
    image = _rgb_image(image).copy()
    for mask, colour in ((gt_mask, GT_COLOUR), (pred_mask, PRED_COLOUR)):
        mask = _numpy(mask) > THRESHOLD
        _check_same_size(image, mask, "mask")
        image[_numpy(mask_boundary(torch.from_numpy(mask)))] = colour
    Image.fromarray(image).save(path)
