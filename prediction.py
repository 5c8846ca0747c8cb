"""Segmenting new images with a trained run: every image file of a folder, at its own size.

    predict_folder(net, img_size, images_dir, out_dir, device, precision) -> (written, skipped)

Each image is read and resized as the training data was (data.read_rgb: grayscale, 16-bit, RGBA and
palette images become RGB; data.resized_rgb: bilinear to img_size x img_size), ImageNet-normalised and
predicted; the foreground probability (S, S) is resized back to the image's own (H, W) bilinearly
and thresholded at metrics.THRESHOLD, so the mask follows the network's smooth output rather than
the blocks of an enlarged binary mask. Written into out_dir:
    <stem>.png               the mask, (H, W) uint8: 255 foreground, 0 background
    <stem>_probability.png   with probabilities=True: the probability * 255, (H, W) uint8
    overlays/<stem>.png      the image with the predicted contour (red), enlarged to >= 256 px
A file that cannot be read is skipped and reported with its reason; the others are still written.
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data import normalize, read_rgb, resized_rgb
from metrics import THRESHOLD
from pictures import overlay_png
from runtime import predict

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


def image_files(images_dir: Path) -> list[Path]:
    """The files of `images_dir` with an image suffix, sorted by name (sub-folders are not searched)."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"--images {images_dir}: expected a folder of images, found none")
    files = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--images {images_dir}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
    return files


@torch.no_grad()
def predict_image(net: torch.nn.Module, rgb: Image.Image, img_size: int, device: torch.device,
                  precision: torch.dtype) -> np.ndarray:
    """An RGB PIL image (W, H) -> the foreground probability (H, W) float32 at the image's own size."""
    image = normalize(resized_rgb(rgb, img_size))                                             # (3, S, S)
    probability = torch.sigmoid(predict(net, image[None], device, precision).float())        # (1, 1, S, S)
    width, height = rgb.size
    probability = F.interpolate(probability.cpu(), size=(height, width), mode="bilinear", align_corners=False)
    return probability[0, 0].numpy()                                                          # (H, W)


def predict_folder(net: torch.nn.Module, img_size: int, images_dir: Path, out_dir: Path, device: torch.device,
                   precision: torch.dtype, *, probabilities: bool = False) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Masks (and overlays, and optionally probabilities) of every image in `images_dir`, written
    into `out_dir` -> (the masks written, [(unreadable file, why)])."""
    from tqdm import tqdm

    files = image_files(images_dir)
    out_dir = Path(out_dir)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for path in tqdm(files, desc="predicting", leave=False, disable=None):
        if out_dir / f"{path.stem}.png" in written:
            skipped.append((path, f"another image is also named {path.stem}: its mask would overwrite that one"))
            continue
        try:
            rgb = read_rgb(path)
        except ValueError as error:  # data.open_image's one-line reason
            skipped.append((path, str(error)))
            continue
        probability = predict_image(net, rgb, img_size, device, precision)
        mask = probability > THRESHOLD
        written.append(out_dir / f"{path.stem}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(written[-1])
        if probabilities:
            Image.fromarray((probability * 255).round().astype(np.uint8)).save(out_dir / f"{path.stem}_probability.png")
        overlay_png(np.asarray(rgb), np.zeros_like(mask), mask, out_dir / "overlays" / f"{path.stem}.png")
    return written, skipped
