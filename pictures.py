"""Pictures people would rather look at than read: segmentation overlays and activation heat maps (Pillow).

    overlay_png(image, gt_mask, pred_mask, path)   the image with the true contour (green) and the
                                                   predicted one (red); contours as metrics.mask_boundary
    heatmap_png(image, activation, path)           a jet heat map of activation (H, W) in [0, 1] blended
                                                   over the image: the paper's Fig. 2(a)
    to_rgb(image)                                  a data.py item's normalised (3, H, W) image -> (H, W, 3) uint8
Images are (H, W, 3) or (H, W) uint8 arrays or tensors; masks and maps are (H, W), at the image's size.
"""
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from data import denormalize
from metrics import THRESHOLD, mask_boundary

GT_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 0, 0)


def to_rgb(image: Tensor) -> np.ndarray:
    """A data.py image (3, H, W), ImageNet-normalised -> (H, W, 3) uint8, the normalisation undone."""
    rgb = (denormalize(image.cpu()) * 255).round().clamp(0, 255).to(torch.uint8)
    return rgb.permute(1, 2, 0).numpy()  # (H, W, 3)


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

