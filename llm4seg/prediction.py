"""Inference, in one place: a batch, a whole image at its own size, a whole volume by sliding windows. What the
probabilities and labels are (sigmoid or softmax, threshold or argmax) is the run's Task (task.py).

    predict(net, images, device, precision) -> float32 logits (B, K, *S), computed at `precision`
    case_probabilities(task, net, device, precision) -> infer(images (B, C, *S)) -> probabilities (B, K, *S):
        whole inputs at once, or with task.roi_size sliding windows of that side (overlap 0.5, constant weights)
    image_probabilities(task, net, rgb, img_size, device, precision) -> (K, H, W) at the image's own size
    sliding_window(predict, volume, roi_size, overlap=0.5, mode="constant", sw_batch_size=4) -> (N, K, *S)

A new image is read and resized as the training data was (data.read_rgb: grayscale, 16-bit, RGBA and palette
images become RGB; data.resized_rgb: bilinear to img_size x img_size), ImageNet-normalised and predicted; its
probabilities (K, S, S) are resized back to the image's own (H, W) bilinearly, so a mask follows the network's
smooth output rather than the blocks of an enlarged binary mask. outputs.py writes what these give.

Volumes by sliding windows. A network trained on patches of size r (roi_size, per axis) sees a volume
x (N, C, *S), S = (H, W) or (D, H, W), through windows of size r. Along an axis of L voxels the windows start at
    0, t, 2t, ...   with the step t = max(int(r (1 - overlap)), 1),
as many as it takes for one to reach the end; that last one is moved back to start at L - r. An axis
shorter than its window (L < r) is padded with zeros to r, (r - L) // 2 before and the rest after, and
the output cropped back. The windows of all axes form a grid; each window w, with corner a_w, is
predicted, f_w = predict(x[a_w : a_w + r]) (K, *r), and the output at voxel v is the weighted average of
every window covering v:
    y(v) = sum_w g(v - a_w) f_w(v - a_w) / sum_w g(v - a_w)
with the window weight g (*r): 1 everywhere for mode "constant"; for "gaussian" the product over axes
of exp(-u_i^2 / (2 sigma_i^2)), u_i the distance from the window's centre ((r_i - 1) / 2) and sigma_i =
sigma_scale r_i (sigma_scale = 0.125: e^-8 at a window's faces, e^-24 at its corners in 3D), floored at
1e-3 (MONAI's guard: a smaller sigma_scale would underflow to 0, and a voxel that only window corners
cover would be 0 / 0). The gaussian trusts the middle of a window, where the network saw the most
context, over its edges. This is MONAI's sliding_window_inference (window placement, padding, weights
and the order of the sums), tested equal to it in tests/test_prediction.py.
Shapes: volume (N, C, *S) -> windows, cut in batches of sw_batch_size, (B, C, *r) -> predict -> (B, K, *r)
-> y (N, K, *S), float32 (float64 for a float64 volume). Memory: on `device`, one batch of windows, what
predict needs for it, its output and the output's weighted copy (not scaled in place as MONAI does:
predict's tensor may be shared or expanded); on `accumulate_device`, the sums y (N, K, *S) and the
weights (1, 1, *S). A
512 x 512 x 200 CT (52.4 M voxels) with K = 14 classes holds 14 x 210 MB + 210 MB = 3.1 GB of sums:
accumulate_device="cpu" keeps them off a GPU that is short.
"""
import itertools
import numbers
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .data import normalize, resized_rgb
from .runtime import autocast, to_device

if TYPE_CHECKING:  # task.py imports this module (through metrics.py)
    from .task import Task

BLEND_MODES = ("constant", "gaussian")  # sliding_window's window weights
MIN_WEIGHT = 1e-3                       # the gaussian's floor (MONAI's compute_importance_map)


def predict(net: torch.nn.Module, images: Tensor, device: torch.device, precision: torch.dtype) -> Tensor:
    """images (B, C, *S) -> float32 logits (B, classes, *S), computed at `precision`."""
    with autocast(device, precision):
        return net(to_device(images, device)).float()


def case_probabilities(task: "Task", net: torch.nn.Module, device: torch.device, precision: torch.dtype):
    """The evaluation's infer: images (B, C, *S) -> probabilities (B, K, *S) (task.probabilities) on `device`
    (on the CPU for sliding windows). With task.roi_size, volumes larger than the training patches go through
    sliding windows of roi_size per axis, overlap 0.5, the windows' probabilities averaged with constant
    weights (the paper's 3D protocol averages softmax, then argmax)."""
    def whole(images: Tensor) -> Tensor:
        return task.probabilities(predict(net, images, device, precision))
    if task.roi_size is None:
        return whole
    # The volume and the sums stay on the CPU (a 512 x 512 x 200 CT's 14 class sums are 3 GB); only the
    # batches of windows go to `device`.
    return lambda images: sliding_window(whole, images.cpu(), task.roi_size, overlap=0.5, mode="constant",
                                         device=device, accumulate_device="cpu")


@torch.no_grad()
def image_probabilities(task: "Task", net: torch.nn.Module, rgb: Image.Image, img_size: int, device: str | torch.device = "cpu",
                        precision: torch.dtype = torch.float32) -> Tensor:
    """An RGB PIL image (W, H) -> its probabilities (K, H, W) float32 at the image's own size (K = 1: the
    foreground's), each resized bilinearly from the network's img_size; computed on `device` at `precision`."""
    image = normalize(resized_rgb(rgb, img_size))                                             # (3, S, S)
    probabilities = case_probabilities(task, net, torch.device(device), precision)(image[None])   # (1, K, S, S)
    width, height = rgb.size
    return F.interpolate(probabilities.cpu(), size=(height, width), mode="bilinear", align_corners=False)[0]


# -----------------------------------------------------------------------------
# volumes by sliding windows

def per_axis(value, dims: int, name: str) -> tuple:
    """One value, or a sequence of one per spatial axis -> a tuple of `dims` values."""
    values = tuple(value) if isinstance(value, (tuple, list, torch.Size)) else (value,) * dims
    if len(values) != dims:
        raise ValueError(f"{name}: expected one value or {dims} (one per spatial axis), got {value!r}")
    return values


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Where the windows of `roi` voxels along an axis of `size` >= roi voxels start: every
    t = int(roi (1 - overlap)) voxels (at least 1) until one reaches the end, the last moved back to end
    at the axis's end. One window when size == roi."""
    step = max(int(roi * (1 - overlap)), 1)
    last = -(-(size - roi) // step)  # the index of the first window reaching the end: ceil((size - roi) / step)
    return [min(i * step, size - roi) for i in range(last + 1)]


def window_weight(roi: tuple[int, ...], mode: str, sigma_scale: tuple[float, ...], device) -> Tensor:
    """The weight g of each voxel of a window, (*roi) float32: ones ("constant"), or the product over axes
    of exp(-u^2 / (2 (sigma_scale roi)^2)), u the distance from the window's centre, floored at
    MIN_WEIGHT ("gaussian"). Computed as MONAI computes it, so the two agree to the bit."""
    if mode == "constant":
        return torch.ones(roi, dtype=torch.float32, device=device)
    weight = torch.ones((), dtype=torch.float32, device=device)
    for r, scale in zip(roi, sigma_scale, strict=True):
        u = torch.arange(r, dtype=torch.float32, device=device) - (r - 1) / 2          # (r,)
        weight = weight.unsqueeze(-1) * torch.exp(u ** 2 / (-2 * (scale * r) ** 2))   # (*roi so far)
    return weight.clamp(min=MIN_WEIGHT)


def check_window_arguments(volume: Tensor, roi_size, overlap, mode: str, sw_batch_size: int, sigma_scale):
    """sliding_window's arguments -> (roi, overlap, sigma_scale) as per-axis tuples, or a one-line
    ValueError naming the bad value and what is expected."""
    if not isinstance(volume, Tensor) or volume.dim() not in (4, 5):
        shape = tuple(volume.shape) if isinstance(volume, Tensor) else type(volume).__name__
        raise ValueError(f"volume: expected a tensor (N, C, H, W) or (N, C, D, H, W), got {shape}")
    dims = volume.dim() - 2
    roi = per_axis(roi_size, dims, "roi_size")
    if not all(isinstance(r, numbers.Integral) and r > 0 for r in roi):
        raise ValueError(f"roi_size: expected window sizes that are positive ints, got {roi_size!r}")
    overlaps = per_axis(overlap, dims, "overlap")
    if not all(isinstance(o, numbers.Real) and 0 <= o < 1 for o in overlaps):
        raise ValueError(f"overlap: expected the fraction of a window its neighbour shares, in [0, 1), got {overlap!r}")
    if mode not in BLEND_MODES:
        raise ValueError(f"mode: expected one of {', '.join(BLEND_MODES)}, got {mode!r}")
    if not isinstance(sw_batch_size, numbers.Integral) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size: expected a number of windows per batch >= 1, got {sw_batch_size!r}")
    sigmas = per_axis(sigma_scale, dims, "sigma_scale")
    if not all(isinstance(s, numbers.Real) and s > 0 for s in sigmas):
        raise ValueError(f"sigma_scale: expected a positive fraction of the window, got {sigma_scale!r}")
    return tuple(map(int, roi)), tuple(map(float, overlaps)), tuple(map(float, sigmas))


def check_prediction(predicted, windows: Tensor, output: Tensor | None):
    """A one-line ValueError unless predict mapped `windows` (B, C, *roi) to (B, K, *roi), with the K of
    the batches before (those in `output`, None before the first)."""
    batch, roi = windows.shape[0], tuple(windows.shape[2:])
    shape = tuple(predicted.shape) if isinstance(predicted, Tensor) else None
    if shape is None or len(shape) != windows.dim() or shape[0] != batch or shape[2:] != roi or (
            output is not None and shape[1] != output.shape[1]):
        classes = output.shape[1] if output is not None else "K"
        expected = f"({', '.join(map(str, (batch, classes, *roi)))})"
        raise ValueError(f"predict: expected windows {tuple(windows.shape)} -> {expected}, "
                         f"got {shape or type(predicted).__name__}")


@torch.no_grad()
def sliding_window(predict, volume: Tensor, roi_size, overlap=0.5, mode: str = "constant", sw_batch_size: int = 4,
                   *, sigma_scale=0.125, device=None, accumulate_device=None, progress: bool = False) -> Tensor:
    """The weighted average of predict's outputs over windows of roi_size sliding over `volume` (the
    module docstring's y; MONAI's sliding_window_inference(volume, roi_size, sw_batch_size, predict,
    overlap, mode, sigma_scale)).
      predict: windows (B, C, *roi) -> (B, K, *roi), B <= sw_batch_size
      volume: (N, C, H, W) or (N, C, D, H, W); roi_size, overlap, sigma_scale: one value or one per axis
      mode: "constant" (equal weights) or "gaussian" (the windows' middles weigh more)
      device: where the windows are predicted (default: the volume's); accumulate_device: where the
      sums and the result are kept (default: the volume's; "cpu" when a GPU is short)
    -> (N, K, *S) in float32 (float64 for a float64 volume) on accumulate_device. Inference only: no
    gradients are kept."""
    roi, overlaps, sigmas = check_window_arguments(volume, roi_size, overlap, mode, sw_batch_size, sigma_scale)
    device = torch.device(device) if device is not None else volume.device
    accumulate_device = torch.device(accumulate_device) if accumulate_device is not None else volume.device
    dtype = torch.promote_types(volume.dtype, torch.float32)
    size = tuple(volume.shape[2:])

    # Per axis, each window's (voxels of the volume it reads, part of its output that lands there).
    # An axis shorter than the window has one window: the whole axis, padded, its output cropped back.
    pads = [max(r - s, 0) for s, r in zip(size, roi, strict=True)]
    axes = []
    for s, r, o, p in zip(size, roi, overlaps, pads, strict=True):
        if p:
            axes.append([(slice(0, s), slice(p // 2, p // 2 + s))])
        else:
            axes.append([(slice(a, a + r), slice(None)) for a in window_starts(s, r, o)])
    places = [tuple(zip(*place, strict=True)) for place in itertools.product(*axes)]  # [(reads, crops)], first axis slowest
    pad = [side for p in reversed(pads) for side in (p // 2, p - p // 2)]  # F.pad's order: the last axis first
    jobs = [(n, reads, crops) for n in range(volume.shape[0]) for reads, crops in places]

    weight = window_weight(roi, mode, sigmas, device).to(dtype)                      # (*roi)
    weight_sum = torch.zeros((1, 1, *size), dtype=dtype, device=accumulate_device)
    accumulated_weight = weight.to(accumulate_device)
    for reads, crops in places:
        weight_sum[(0, 0, *reads)] += accumulated_weight[crops]
    output = None                                                                    # (N, K, *S) once K is known

    from tqdm import tqdm
    for first in tqdm(range(0, len(jobs), sw_batch_size), desc="windows", leave=False, disable=not progress):
        batch = jobs[first:first + sw_batch_size]
        windows = torch.cat([volume[(slice(n, n + 1), slice(None), *reads)] for n, reads, _ in batch]).to(device)
        if any(pad):
            windows = F.pad(windows, pad)                                            # zeros, as MONAI
        predicted = predict(windows)                                                 # (B, K, *roi)
        check_prediction(predicted, windows, output)
        weighted = (predicted.to(dtype) * weight).to(accumulate_device)              # (B, K, *roi)
        if output is None:
            output = torch.zeros((volume.shape[0], predicted.shape[1], *size), dtype=dtype, device=accumulate_device)
        for (n, reads, crops), window in zip(batch, weighted, strict=True):
            output[(n, slice(None), *reads)] += window[(slice(None), *crops)]
    return output.div_(weight_sum)
