"""Evaluation of a trained LLM4Seg model: the paper's metrics, its Sec. 4.2 feature analysis, pictures.

    python eval.py runs/kvasir_cmunext_llama3.2-1b-L15-frozen_seed41                  # val, best checkpoint
    python eval.py RUN_DIR --split test --checkpoint last                            # held-out test set
    python eval.py RUN_DIR --samples 8                                               # + 4 worst, 4 best overlays
    python eval.py RUN_DIR --analyze                                                 # + Fig. 2 / Sec. 4.2 analysis
    python eval.py RUN_DIR --data-dir /elsewhere/kvasir --device cpu --batch-size 4 --workers 0

The command rebuilds the model from RUN_DIR/config.json (a frozen LLM layer is read again from
its local directory or the local Hub cache, and must be the same commit), loads <checkpoint>.safetensors
and evaluates the split the run's data settings define, writing into RUN_DIR/eval-<split>/:
    metrics.json    mean and std over images (population std, so one image gives 0) of every
                    per-image metric below, pooled IoU / Dice, the checkpoint (name, epoch, step)
                    and the computation report of the paper's Table 1: trainable and frozen
                    parameters, G MACs of one (1, 3, S, S) forward at the run's image size S
                    (FlopCounterMode FLOPs / 2 on a meta-device copy: convs and matmuls; the
                    paper's thop also counts BatchNorm and upsampling, ~1-3 % more)
    per_image.csv   one row per case: every metric (and with --analyze the analysis values)
    samples/        --samples N: worst-01_<case>.png .. and best-01_<case>.png .., ranked by IoU,
                    the image with the true (green) and predicted (red) contours
    analysis.json   --analyze: concentration IoU, effective rank and LSVR before / after the layer
    activations/    --analyze: <case>_before.png, <case>_after.png heat maps of the first --maps cases
Which tensors --analyze reads: the paper's model is t = Encoder(x), t_hat' = Reshape(Transformer(Flatten(t))),
Decoder(t_hat') (its Eq. 1-3), and Sec. 4.2 takes "the activations t_hat' in R^{C x H x W} before
decoding". Here that is the bridge's output (B, C, h, w), after Linear(D, C), which the decoder reads;
"Act. Before" (Fig. 2a/b) is the bridge's input, the encoder's (B, C, h, w) bottleneck. Both sit at the
CNN's width C (not the LLM's D), so before and after are comparable with each other and with a plain
backbone's bottleneck, the paper's CMUNeXt column. ER and LSVR are reported for both as well.

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
import argparse
import contextlib
import copy
import csv
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import IMAGENET_MEAN, IMAGENET_STD, load_dataset
from model import count_params

IOU_SMOOTH = 1e-5  # the authors' smoothing of IoU: empty vs empty scores 1
RATIO_EPS = 1e-6  # the authors' guard in the denominators of SE, PC, SP and F1
THRESHOLD = 0.5  # on sigmoid probabilities, and on target masks
NSD_TOLERANCE = 2.0  # pixels
CONCENTRATION_THRESHOLD = 0.4  # paper Fig. 2(b)
GT_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 0, 0)
# (key, label, scale, unit) of the printed table; the files keep fractions and pixels unscaled.
REPORTED = (("iou", "IoU", 100, "%"), ("dice", "Dice", 100, "%"), ("f1", "F1", 100, "%"),
            ("sensitivity", "SE", 100, "%"), ("precision", "PC", 100, "%"), ("specificity", "SP", 100, "%"),
            ("accuracy", "ACC", 100, "%"), ("hd95", "HD95", 1, "px"), ("nsd", "NSD", 100, "%"))
ANALYSED = ("concentration_iou", "effective_rank", "lsvr")


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


# -----------------------------------------------------------------------------
# the command line: a run directory in, the paper's numbers and pictures out

def read_run_config(run_dir: Path) -> dict:
    """RUN_DIR/config.json as train.py wrote it: {"train": settings, "model": build_model kwargs, "llm_layer", ...}."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        found = "no config.json in it" if run_dir.is_dir() else "no such directory"
        raise FileNotFoundError(f"{run_dir}: expected a run directory written by train.py (with config.json), "
                                f"found {found}")
    return json.loads(config_file.read_text())


def load_run(run_dir, checkpoint: str = "best") -> tuple[torch.nn.Module, dict, dict]:
    """A run of train.py -> (model in eval mode on the CPU, its config.json, the checkpoint's JSON part).

    The model is rebuilt from config["model"]. A frozen LLM layer, which no checkpoint holds, is read again
    from where the run found it (a local directory, or the local Hub cache) and must be the same commit."""
    # train.py imports this module for its metrics: importing train at the top would be circular.
    from train import load_checkpoint, rebuild_model

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    for name in (f"{checkpoint}.safetensors", f"{checkpoint}.json"):
        if not (run_dir / name).is_file():
            other = "last" if checkpoint == "best" else "best"
            raise FileNotFoundError(f"{run_dir / name} not found: expected the '{checkpoint}' checkpoint, which "
                                    f"train.py writes at the end of each epoch; let the run finish an epoch, "
                                    f"or try --checkpoint {other}")
    net = rebuild_model(config)
    info = load_checkpoint(run_dir, checkpoint, net)
    return net.eval(), config, info


def count_gmacs(net: torch.nn.Module, in_channels: int, img_size: int) -> float:
    """G multiply-accumulates of one (1, in_channels, S, S) forward: FlopCounterMode's FLOPs / 2 (convs and
    matmuls), run on a meta-device copy, since the count needs only shapes."""
    from torch.utils.flop_counter import FlopCounterMode  # 0.2 s of imports that train.py never needs

    meta_net = copy.deepcopy(net).to("meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_net(torch.zeros(1, in_channels, img_size, img_size, device="meta"))
    return counter.get_total_flops() / 2 / 1e9


class BridgeFeatures:
    """While open, keeps the LLM bridge's input ("before") and output ("after"), (B, C, h, w) float32,
    of the latest forward pass: the tensors of the module docstring's --analyze."""

    def __init__(self, bridge: torch.nn.Module):
        self.bridge = bridge
        self.before = self.after = None

    def __enter__(self):
        self.hook = self.bridge.register_forward_hook(self.record)
        return self

    def __exit__(self, *exc):
        self.hook.remove()

    def record(self, module, inputs, output):
        self.before, self.after = inputs[0].detach().float(), output.detach().float()


def feature_analysis(features: BridgeFeatures, masks: Tensor) -> dict[str, Tensor]:
    """The bridge's features of the latest batch and its masks (B, 1, H, W) -> per image (B,) values
    "<concentration_iou|effective_rank|lsvr>_<before|after>"."""
    results = {}
    for when, tensor in (("before", features.before), ("after", features.after)):
        activation = upsample_map(activation_map(tensor), masks.shape[-2:])  # (B, H, W)
        results[f"concentration_iou_{when}"] = concentration_iou(activation, masks)
        results[f"effective_rank_{when}"] = effective_rank(tensor)
        results[f"lsvr_{when}"] = lsvr(tensor)
    return results


def autocast(device: torch.device):
    """The precision of training and evaluation: bf16 autocast on CUDA, float32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def predict(net: torch.nn.Module, images: Tensor, device: torch.device) -> Tensor:
    """images (B, 3, S, S) -> float32 logits (B, 1, S, S), at the precision of `autocast`."""
    with autocast(device):
        return net(images.to(device, non_blocking=True)).float()


@torch.no_grad()
def evaluate_cases(net: torch.nn.Module, loader, device: torch.device,
                   features: BridgeFeatures | None = None) -> tuple[list[dict], dict[str, float]]:
    """Every case of `loader`, in order -> one row per case {"case", metric: value, ...} (plus the feature
    analysis when `features` is open), and the dataset-level numbers: pooled {"pooled_iou", "pooled_dice"}
    and the mean IoU of the two trivial predictors, all foreground and all background, to judge a score by."""
    rows, pooled, trivial = [], PooledOverlap(), {"all_foreground_iou": [], "all_background_iou": []}
    for batch in tqdm(loader, desc="evaluating", leave=False, disable=None):
        masks = batch["mask"].to(device)
        logits = predict(net, batch["image"], device)
        per_image = {**segmentation_metrics(logits, masks), **surface_metrics(logits, masks)}
        if features is not None:
            per_image.update(feature_analysis(features, masks))
        pooled.update(logits, masks)
        for key, constant in (("all_foreground_iou", torch.ones_like), ("all_background_iou", torch.zeros_like)):
            trivial[key] += segmentation_metrics(constant(masks), masks, from_logits=False)["iou"].tolist()
        rows += [{"case": name, **{key: values[i].item() for key, values in per_image.items()}}
                 for i, name in enumerate(batch["name"])]
    return rows, {**pooled.compute(), **{key: float(np.mean(values)) for key, values in trivial.items()}}


def mean_and_std(rows: list[dict], key: str) -> dict[str, float]:
    """Over images; population std (ddof 0), so a single image gives 0, not NaN."""
    values = np.array([row[key] for row in rows], dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std())}


def to_rgb(image: Tensor) -> np.ndarray:
    """A data.py image (3, H, W), ImageNet-normalised -> (H, W, 3) uint8, the normalisation undone."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = ((image.cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return rgb.permute(1, 2, 0).numpy()  # (H, W, 3)


def file_stem(case: str) -> str:
    """A case id as a file name: BUSI's "benign (1)" -> "benign_1_"."""
    return re.sub(r"[^\w.-]+", "_", case)


def ranked_cases(rows: list[dict], count: int) -> list[tuple[str, int]]:
    """The ceil(count / 2) lowest and floor(count / 2) highest IoU cases, none twice, as (label, row index):
    worst-01 is the lowest IoU, best-01 the highest. Ties go by case name, so the choice is reproducible."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["iou"], rows[i]["case"]))
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
def write_samples(net, dataset, rows: list[dict], count: int, device: torch.device, folder: Path) -> list[Path]:
    """Overlay PNGs of the ranked cases; each is predicted again alone (BatchNorm in eval mode makes that
    the same prediction), so no prediction of the whole split is kept in memory."""
    paths = []
    for label, index in ranked_cases(rows, count):
        item = dataset[index]
        assert item["name"] == rows[index]["case"], "the loader must keep the dataset's order"
        probability = torch.sigmoid(predict(net, item["image"][None], device))[0, 0]  # (S, S)
        paths.append(folder / f"{label}_{file_stem(item['name'])}.png")
        overlay_png(to_rgb(item["image"]), item["mask"][0], probability, paths[-1])
    return paths


@torch.no_grad()
def write_activation_maps(net, features: BridgeFeatures, dataset, count: int, device: torch.device,
                          folder: Path) -> list[Path]:
    """Fig. 2(a): heat maps of the activation before and after the LLM layer, first `count` cases."""
    paths = []
    for index in range(min(count, len(dataset))):
        item = dataset[index]
        predict(net, item["image"][None], device)  # fills `features`
        image = to_rgb(item["image"])
        for when, tensor in (("before", features.before), ("after", features.after)):
            activation = upsample_map(activation_map(tensor), image.shape[:2])[0]  # (S, S)
            paths.append(folder / f"{file_stem(item['name'])}_{when}.png")
            heatmap_png(image, activation, paths[-1])
    return paths


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def print_report(report: dict, analysis: dict | None) -> None:
    """The one-screen summary: the paper's metrics in %, HD95 in pixels, the computation, the analysis."""
    checkpoint, computation = report["checkpoint"], report["computation"]
    print(f"{report['run_dir']}: {report['split']} split, {report['images']} images, checkpoint "
          f"{checkpoint['name']} (epoch {checkpoint['epoch']}, step {checkpoint['global_step']})")
    print(f"  {'metric':<10}{'mean':>8} ± std")
    for key, label, scale, unit in REPORTED:
        value = report["metrics"][key]
        print(f"  {label:<5}{unit:>4} {value['mean'] * scale:8.2f} ± {value['std'] * scale:.2f}")
    print(f"  pooled over pixels: IoU {report['pooled_iou'] * 100:.2f} %, Dice {report['pooled_dice'] * 100:.2f} %")
    print(f"  trivial predictors: IoU {report['all_foreground_iou'] * 100:.2f} % all foreground, "
          f"{report['all_background_iou'] * 100:.2f} % all background")
    print(f"  {computation['trainable_params']:,} trainable + {computation['frozen_params']:,} frozen parameters, "
          f"{computation['gmacs']:.2f} G MACs at {'x'.join(map(str, computation['input_shape']))}")
    if analysis:
        print(f"  {'bottleneck features':<20}{'before':>8}{'after':>8}   (LLM layer)")
        for name in ANALYSED:
            print(f"  {name:<20}{analysis['before'][name]['mean']:8.3f}{analysis['after'][name]['mean']:8.3f}")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a run of train.py (see the module docstring for examples).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (metrics stay per image)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit code 0 when evaluated, 2 for what the user can fix (said in one line on stderr)."""
    args = make_parser().parse_args(argv)
    try:
        return evaluate_run(args)
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def evaluate_run(args: argparse.Namespace) -> int:
    """The checks that need no model first, then data, model, evaluation, pictures and files."""
    from train import Processes, resolve_device  # see load_run

    for name in ("samples", "maps", "workers"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name}: expected a number >= 0, got {getattr(args, name)}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    run_dir = Path(args.run_dir)
    config = read_run_config(run_dir)
    settings = config["train"]
    if args.analyze and config["model"]["mode"] == "none":
        raise ValueError(f"--analyze compares the features before and after the LLM layer, but {run_dir} is a "
                         f"plain {config['model']['backbone']} (trained with --llm none): expected a run with "
                         f"an LLM bridge; drop --analyze for this run")
    device = resolve_device(args.device, Processes())
    dataset = load_dataset(settings["data"], args.data_dir or settings["data_dir"], args.split,
                           settings["img_size"], settings["seed"], synthetic_size=settings["synthetic_size"])
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        pin_memory=device.type == "cuda")

    net, _, info = load_run(run_dir, args.checkpoint)
    trainable, frozen = count_params(net)
    input_shape = [1, config["model"]["in_channels"], settings["img_size"], settings["img_size"]]
    gmacs = count_gmacs(net, input_shape[1], settings["img_size"])
    net.to(device)

    out_dir = run_dir / f"eval-{args.split}"
    out_dir.mkdir(exist_ok=True)
    analysis = None
    with BridgeFeatures(net.bridge) if args.analyze else contextlib.nullcontext() as features:
        rows, pooled = evaluate_cases(net, loader, device, features)
        if args.analyze:
            maps = write_activation_maps(net, features, dataset, args.maps, device, clean_folder(out_dir / "activations"))
            analysis = {
                "features": {"before": "the LLM bridge's input: the encoder's bottleneck (B, C, h, w)",
                             "after": "the LLM bridge's output after Linear(D, C), which the decoder reads: "
                                      "the paper's t_hat' (Sec. 4.2)"},
                "concentration_threshold": CONCENTRATION_THRESHOLD,
                "images": len(rows),
                **{when: {name: mean_and_std(rows, f"{name}_{when}") for name in ANALYSED}
                   for when in ("before", "after")},
                "activation_maps": [str(path.relative_to(out_dir)) for path in maps],
            }
            (out_dir / "analysis.json").write_text(json.dumps(analysis, indent=1))
    samples = []
    if args.samples:
        samples = write_samples(net, dataset, rows, args.samples, device, clean_folder(out_dir / "samples"))

    epoch = info["epoch"] if "epoch" in info else info["progress"]["epochs_done"]  # best.json / last.json
    report = {
        "run_dir": str(run_dir), "split": args.split, "images": len(rows),
        "checkpoint": {"name": args.checkpoint, "epoch": epoch, "global_step": info["global_step"]},
        "metrics": {key: mean_and_std(rows, key) for key, *_ in REPORTED},
        **pooled,
        "computation": {"trainable_params": trainable, "frozen_params": frozen, "gmacs": gmacs,
                        "input_shape": input_shape,
                        "counted_with": "torch.utils.flop_counter.FlopCounterMode, FLOPs / 2 (convs and matmuls)"},
        "conventions": {"threshold": THRESHOLD, "nsd_tolerance_px": NSD_TOLERANCE,
                        "std": "population (ddof 0) over images", "empty_cases": "see eval.py's docstring"},
        "samples": [str(path.relative_to(out_dir)) for path in samples],
    }
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=1))
    write_csv(rows, out_dir / "per_image.csv")
    print_report(report, analysis)
    print(f"wrote {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
