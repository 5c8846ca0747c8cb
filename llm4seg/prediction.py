"""Predicting more than the network saw at once: new images at their own size, new volumes on their own
grid, and volumes larger than the training patches, by sliding windows.

    predict_folder(net, img_size, images_dir, out_dir, device, precision) -> (written, skipped)
    predict_volume_folder(net, data, img_size, roi_size, images_dir, out_dir, device, precision, class_names)
        -> (written, skipped)
    sliding_window(predict, volume, roi_size, overlap=0.5, mode="constant", sw_batch_size=4) -> (N, K, *S)

Images. Each image is read and resized as the training data was (data.read_rgb: grayscale, 16-bit, RGBA
and palette images become RGB; data.resized_rgb: bilinear to img_size x img_size), ImageNet-normalised
and predicted; the foreground probability (S, S) is resized back to the image's own (H, W) bilinearly
and thresholded at metrics.THRESHOLD, so the mask follows the network's smooth output rather than
the blocks of an enlarged binary mask. Written into out_dir:
    <stem>.png               the mask, (H, W) uint8: 255 foreground, 0 background
    <stem>_probability.png   with probabilities=True: the probability * 255, (H, W) uint8
    overlays/<stem>.png      the image with the predicted contour (red), enlarged to >= 256 px
A file that cannot be read is skipped and reported with its reason; the others are still written.

Volumes in NIfTI (a 3D run's eval.py --images). Every *.nii and *.nii.gz file of the folder is segmented and
written as out_dir/<stem>.nii.gz (the name less .nii / .nii.gz): a label map on the input's own grid, i.e. its
shape (X, Y, Z) (a 4D one-channel (X, Y, Z, 1) input gives (X, Y, Z)) and its header (affine, qform / sform and
their codes, voxel sizes), uint8, 0 background and k class k (a binary run: 1 foreground), NIfTI intent
"label": what ITK-SNAP and 3D Slicer open over the scan. out_dir/label_legend.json maps each value to its class
name ({"0": "background", "1": "liver", ...}). How a file becomes the network's input, and its prediction a
label map on the file's grid, follows the run's data:
  btcv, synthetic-organs  as BTCV's CTs (data/volumes/btcv.py, read_btcv_image): RAS, 1.5 x 1.5 x 2.0 mm, HU window
                          [-175, 250] -> [0, 1], cropped to the body (HU > -175); sliding windows of the run's
                          roi_size (case_probabilities: overlap 0.5, constant weights), argmax; back through
                          data.volumes.to_original_grid: nearest neighbour onto the stored grid, background outside the
                          body crop. synthetic-organs' volumes are drawn at BTCV's spacing and on its intensity
                          scale (data/generated.py), so a CT in HU is what such a run reads; its toy abdomen is
                          S voxels wide (48 mm at S = 32), so on a real CT its labels show that the pipeline runs,
                          not organs.
  msd, synthetic3d        as MSD's images (data/volumes/msd.py): (X, Y, Z) or (X, Y, Z, C) with the modalities last,
                          each channel z-scored over the volume, resized to the run's img_size^3 (trilinear, axes
                          as stored: these runs ignore orientation and spacing); one whole-volume prediction, argmax
                          (binary: sigmoid > THRESHOLD); back by resizing the labels to the stored (X, Y, Z), nearest
                          neighbour with the voxel centres aligned (torch's "nearest-exact", the inverse of the
                          image's align_corners=False resize). Such a run records no original grid: a file is
                          mapped as the run's own data was (for synthetic3d, z-scored volumes at 1 mm, any scan at
                          its own voxels).
A file that cannot be read, is not 3D (or 4D as above), has NaN voxels, or (CT) has no voxel above -175 HU is
skipped with its one-line reason; macOS's `._` files beside MSD's volumes are not volumes and are not listed.

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
import json
import numbers
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .data import normalize, read_rgb, resized_rgb
from .files import InputError, write_atomically, write_png, write_text
from .metrics import THRESHOLD, whole_image_probabilities
from .pictures import label_colours, overlay_png
from .data.volumes.btcv import read_btcv_image, to_original_grid
from .data.volumes.nifti import read_nifti, resize_volume

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
VOLUME_SUFFIXES = (".nii", ".nii.gz")
CT_DATASETS = ("btcv", "synthetic-organs")  # trained on CT-like volumes: a file is preprocessed as BTCV's CTs
RESIZED_DATASETS = ("msd", "synthetic3d")   # trained on z-scored volumes resized to img_size^3
LEGEND_NAME = "label_legend.json"
BLEND_MODES = ("constant", "gaussian")  # sliding_window's window weights
MIN_WEIGHT = 1e-3                       # the gaussian's floor (MONAI's compute_importance_map)

# -----------------------------------------------------------------------------
# new images at their own size

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
    """An RGB PIL image (W, H) -> the foreground probability (H, W) float32 at the image's own size; of a
    multi-class network, the class probabilities (K, H, W) (softmax), each resized the same way."""
    image = normalize(resized_rgb(rgb, img_size))                                             # (3, S, S)
    probability = whole_image_probabilities(net, device, precision)(image[None])              # (1, K, S, S)
    width, height = rgb.size
    probability = F.interpolate(probability.cpu(), size=(height, width), mode="bilinear", align_corners=False)
    return probability[0, 0].numpy() if probability.shape[1] == 1 else probability[0].numpy()  # (H, W) or (K, H, W)


def predict_folder(net: torch.nn.Module, img_size: int, images_dir: Path, out_dir: Path, device: torch.device,
                   precision: torch.dtype, *, probabilities: bool = False,
                   class_names: list[str] | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Masks (and overlays, and optionally probabilities) of every image in `images_dir`, written
    into `out_dir` -> (the masks written, [(unreadable file, why)]). A multi-class run (class_names: its K
    names, background first) writes label maps instead: <stem>.png holds each pixel's class (the argmax),
    overlays/ colour them, and label_legend.json names them."""
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
        written.append(out_dir / f"{path.stem}.png")
        if class_names is not None:
            labels = probability.argmax(0).astype(np.uint8)                                    # (H, W)
            write_png(written[-1], labels)
            image = np.asarray(rgb)
            coloured = np.where(labels[..., None] > 0, image // 2 + label_colours(labels) // 2, image)
            write_png(out_dir / "overlays" / f"{path.stem}.png", coloured.astype(np.uint8))
            continue
        mask = probability > THRESHOLD
        write_png(written[-1], mask.astype(np.uint8) * 255)
        if probabilities:
            write_png(out_dir / f"{path.stem}_probability.png", (probability * 255).round().astype(np.uint8))
        overlay_png(np.asarray(rgb), np.zeros_like(mask), mask, out_dir / "overlays" / f"{path.stem}.png")
    if class_names is not None:
        write_legend(out_dir, class_names)
    return written, skipped


def write_legend(out_dir: Path, class_names: list[str]) -> None:
    """out_dir/label_legend.json: {label value: class name}, beside label maps (PNG or NIfTI)."""
    legend = json.dumps({str(k): name for k, name in enumerate(class_names)}, indent=1)
    write_text(out_dir / LEGEND_NAME, legend + "\n")


# -----------------------------------------------------------------------------
# new volumes: NIfTI in, NIfTI label maps on the input's own grid out

def volume_files(images_dir: Path) -> list[Path]:
    """The *.nii and *.nii.gz files of `images_dir`, sorted by name (sub-folders are not searched; macOS's
    `._name` AppleDouble files, which MSD's tarballs ship beside every volume, are not volumes and are left out)."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"--images {images_dir}: expected a folder of NIfTI volumes, found none")
    files = sorted(p for p in images_dir.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)
                   and not p.name.startswith("._"))
    if not files:
        patterns = ", ".join(f"*{suffix}" for suffix in VOLUME_SUFFIXES)
        raise FileNotFoundError(f"--images {images_dir}: no NIfTI files ({patterns}) in it")
    return files


def nifti_stem(path: Path) -> str:
    """ct_01.nii.gz, ct_01.nii -> ct_01."""
    name = Path(path).name
    return name[:-len(".gz")][:-len(".nii")] if name.lower().endswith(".nii.gz") else name[:-len(".nii")]


def check_volume_data(data: str) -> None:
    """A one-line ValueError unless a run trained on `data` has a known way from a NIfTI file to its input."""
    if data not in CT_DATASETS + RESIZED_DATASETS:
        raise ValueError(f"--images: a run trained on {data} has no known mapping from a NIfTI file to its input; "
                         f"expected a run on {', '.join(CT_DATASETS + RESIZED_DATASETS)}")


def resized_volume(path: Path, img_size: int, in_channels: int) -> tuple[Tensor, tuple[int, int, int]]:
    """A NIfTI volume read as data/volumes/msd.py reads an MSD image: (X, Y, Z), or (X, Y, Z, C) with the modality
    last, each channel z-scored over the volume, (v - mean) / std (population std), trilinearly resized to
    S^3 -> ((C, S, S, S) float32, the stored (X, Y, Z)); files.InputError naming the file when it cannot be
    read, is not 3D / 4D or has other than `in_channels` channels. Axes stay as stored (MSD ignores the
    orientation too)."""
    image, _ = read_nifti(path, "image")
    if image.ndim == 3:
        image = image[..., None]                                                   # (X, Y, Z, 1)
    if image.ndim != 4 or image.shape[3] != in_channels:
        raise InputError(f"the image {path} is {list(image.shape)}; expected a 3D volume (X, Y, Z) or "
                         f"(X, Y, Z, {in_channels}) with the run's {in_channels} modalities last")
    volume = torch.from_numpy(image).permute(3, 0, 1, 2)                           # (C, X, Y, Z)
    mean = volume.mean(dim=(1, 2, 3), keepdim=True)
    std = volume.std(dim=(1, 2, 3), correction=0, keepdim=True).clamp_min(1e-6)   # a constant channel stays 0
    return resize_volume((volume - mean) / std, img_size, "trilinear"), tuple(image.shape[:3])


@torch.no_grad()
def segment_volume(net: torch.nn.Module, path: Path, data: str, img_size: int, roi_size: int | None,
                   device: torch.device, precision: torch.dtype) -> np.ndarray:
    """One NIfTI file -> its label map (X, Y, Z) on the file's own grid (the module docstring's "Volumes in
    NIfTI"), uint8 (int16 beyond 256 classes): 0 background, k class k (binary: 1 foreground)."""
    if data in CT_DATASETS:
        image, grid = read_btcv_image(path)                                        # (1, X', Y', Z')
        infer = case_probabilities(net, device, precision, roi_size)
    else:
        image, shape = resized_volume(path, img_size, net.config.in_channels)      # (C, S, S, S)
        infer = case_probabilities(net, device, precision)
    probabilities = infer(image[None])[0].cpu()                                    # (K, *S')
    dtype = torch.uint8 if len(probabilities) <= 256 else torch.int16
    labels = (probabilities.argmax(0) if len(probabilities) > 1 else probabilities[0] > THRESHOLD).to(dtype)
    if data in CT_DATASETS:
        return to_original_grid(labels, grid)
    return F.interpolate(labels[None, None].float(), size=shape, mode="nearest-exact")[0, 0].to(dtype).numpy()


def write_label_nifti(labels: np.ndarray, like: Path, path: Path, classes: int) -> None:
    """Save a label map (X, Y, Z) as gzipped NIfTI with the header of the volume it segments (`like`: its
    affine, qform / sform and their codes, voxel sizes and units), uint8 (int16 beyond 255 classes),
    unscaled, intent "label", display range 0..classes-1; atomically (files.write_atomically)."""
    import gzip

    import nibabel

    source = nibabel.load(like)  # the header only: the voxels stay on the disk
    dtype = np.uint8 if classes <= 256 else np.int16
    image = type(source)(np.asarray(labels).astype(dtype), source.affine, source.header.copy())
    image.set_data_dtype(dtype)
    header = image.header
    header.set_slope_inter(None, None)  # labels as they are, whatever scaling the CT's header had
    header.set_intent("label")
    header["cal_min"], header["cal_max"] = 0, classes - 1
    header["descrip"] = b"LLM4Seg label map"
    write_atomically(path, lambda temporary: Path(temporary).write_bytes(
        gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)))


def predict_volume_folder(net: torch.nn.Module, data: str, img_size: int, roi_size: int | None, images_dir: Path,
                          out_dir: Path, device: torch.device, precision: torch.dtype,
                          class_names: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Label maps of every NIfTI volume in `images_dir` by a run trained on `data` (its img_size, roi_size;
    class_names: the K names, background first, ["background", "foreground"] for a binary run), written into
    `out_dir` as <stem>.nii.gz, with label_legend.json -> (the label maps written, [(skipped file, why)])."""
    from tqdm import tqdm

    check_volume_data(data)
    files = volume_files(images_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_legend(out_dir, class_names)
    written, skipped = [], []
    for path in tqdm(files, desc="segmenting", unit="volume", leave=False, disable=None):
        target = out_dir / f"{nifti_stem(path)}.nii.gz"
        if target in written:
            skipped.append((path, f"another volume is also named {nifti_stem(path)}: its labels would overwrite "
                                  "that one's"))
            continue
        try:
            labels = segment_volume(net, path, data, img_size, roi_size, device, precision)
        except InputError as error:  # unreadable, not 3D, NaN voxels, no body: one line naming the file
            skipped.append((path, str(error)))
            continue
        write_label_nifti(labels, path, target, len(class_names))
        written.append(target)
    return written, skipped


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


def case_probabilities(net: torch.nn.Module, device: torch.device, precision: torch.dtype,
                       roi_size: int | None = None):
    """The evaluation's infer (metrics.evaluate_cases): images (B, C, *S) -> probabilities (B, K, *S) on
    `device` (on the CPU for sliding windows), sigmoid for one output channel and softmax over K > 1. With
    roi_size, volumes larger than the training patches go through sliding windows of roi_size per axis,
    overlap 0.5, the windows' probabilities averaged with constant weights (the paper's 3D protocol averages
    softmax, then argmax)."""
    whole = whole_image_probabilities(net, device, precision)
    if roi_size is None:
        return whole
    # The volume and the sums stay on the CPU (a 512 x 512 x 200 CT's 14 class sums are 3 GB); only the
    # batches of windows go to `device`.
    return lambda images: sliding_window(whole, images.cpu(), roi_size, overlap=0.5, mode="constant", device=device,
                                         accumulate_device="cpu")
