"""eval.py --images: new images and volumes segmented into files, each on its input's own size or grid.

    predict_folder(task, net, img_size, images_dir, out_dir, device, precision) -> (written, skipped)
    predict_volume_folder(task, net, data, img_size, images_dir, out_dir, device, precision) -> (written, skipped)

Images. Each image's probabilities at its own size (prediction.image_probabilities), its labels (the Task's:
the foreground above metrics.THRESHOLD, or the argmax), written into out_dir:
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

"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import read_rgb
from .data.volumes.btcv import read_btcv_image, to_original_grid
from .data.volumes.nifti import read_nifti, resize_volume
from .files import InputError, write_atomically, write_png, write_text
from .pictures import label_colours, overlay_png
from .prediction import case_probabilities, image_probabilities
from .task import Task

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
VOLUME_SUFFIXES = (".nii", ".nii.gz")
CT_DATASETS = ("btcv", "synthetic-organs")  # trained on CT-like volumes: a file is preprocessed as BTCV's CTs
RESIZED_DATASETS = ("msd", "synthetic3d")   # trained on z-scored volumes resized to img_size^3
LEGEND_NAME = "label_legend.json"

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


def predict_folder(task: Task, net: torch.nn.Module, img_size: int, images_dir: Path, out_dir: Path,
                   device: torch.device, precision: torch.dtype, *,
                   probabilities: bool = False) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Masks (and overlays, and optionally probabilities) of every image in `images_dir`, written
    into `out_dir` -> (the masks written, [(unreadable file, why)]). A multi-class run writes label maps
    instead: <stem>.png holds each pixel's class (the argmax), overlays/ colour them, and label_legend.json
    names them."""
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
        probability = image_probabilities(task, net, rgb, img_size, device, precision)        # (K, H, W)
        labels = task.labels(probability[None])[0].numpy().astype(np.uint8)                  # (H, W)
        written.append(out_dir / f"{path.stem}.png")
        image, overlay = np.asarray(rgb), out_dir / "overlays" / f"{path.stem}.png"
        if task.multiclass:
            write_png(written[-1], labels)
            write_png(overlay, np.where(labels[..., None] > 0, image // 2 + label_colours(labels) // 2,
                                        image).astype(np.uint8))
            continue
        write_png(written[-1], labels * 255)
        if probabilities:
            write_png(out_dir / f"{path.stem}_probability.png", (probability[0] * 255).round().to(torch.uint8).numpy())
        overlay_png(image, np.zeros_like(labels), labels, overlay)
    if task.multiclass:
        write_legend(out_dir, task)
    return written, skipped


def write_legend(out_dir: Path, task: Task) -> None:
    """out_dir/label_legend.json: {label value: class name}, beside label maps (PNG or NIfTI)."""
    legend = json.dumps(task.legend(), indent=1)
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
def segment_volume(task: Task, net: torch.nn.Module, path: Path, data: str, img_size: int, device: torch.device,
                   precision: torch.dtype) -> np.ndarray:
    """One NIfTI file -> its label map (X, Y, Z) on the file's own grid (the module docstring's "Volumes in
    NIfTI"), uint8 (int16 beyond 256 classes): 0 background, k class k (binary: 1 foreground)."""
    if data in CT_DATASETS:
        image, grid = read_btcv_image(path)                                        # (1, X', Y', Z')
    else:
        image, shape = resized_volume(path, img_size, net.config.in_channels)      # (C, S, S, S)
    probabilities = case_probabilities(task, net, device, precision)(image[None]).cpu()   # (1, K, *S')
    labels = task.labels(probabilities)[0].to(task.label_dtype)
    if data in CT_DATASETS:
        return to_original_grid(labels, grid)
    return F.interpolate(labels[None, None].float(), size=shape, mode="nearest-exact")[0, 0].to(labels.dtype).numpy()


def write_label_nifti(labels: np.ndarray, like: Path, path: Path, task: Task) -> None:
    """Save a label map (X, Y, Z), integers 0..K-1 (K the task's classes, 2 for a binary run), as gzipped NIfTI
    in the task's label dtype (uint8, int16 beyond 256 classes) with the header of the volume it segments (`like`:
    its affine, qform / sform and their codes, voxel sizes and units), unscaled, intent "label", display range
    0..K-1; atomically (files.write_atomically)."""
    import gzip

    import nibabel

    source = nibabel.load(like)  # the header only: the voxels stay on the disk
    labels = np.asarray(labels).astype(task.label_dtype_numpy)
    image = type(source)(labels, source.affine, source.header.copy())
    image.set_data_dtype(labels.dtype)
    header = image.header
    header.set_slope_inter(None, None)  # labels as they are, whatever scaling the CT's header had
    header.set_intent("label")
    header["cal_min"], header["cal_max"] = 0, len(task.class_names) - 1
    header["descrip"] = b"LLM4Seg label map"
    write_atomically(path, lambda temporary: Path(temporary).write_bytes(
        gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)))


def predict_volume_folder(task: Task, net: torch.nn.Module, data: str, img_size: int, images_dir: Path, out_dir: Path,
                          device: torch.device, precision: torch.dtype) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Label maps of every NIfTI volume in `images_dir` by a run trained on `data` (its img_size; the task's
    roi_size and classes), written into `out_dir` as <stem>.nii.gz, with label_legend.json -> (the label maps
    written, [(skipped file, why)])."""
    from tqdm import tqdm

    check_volume_data(data)
    files = volume_files(images_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_legend(out_dir, task)
    written, skipped = [], []
    for path in tqdm(files, desc="segmenting", unit="volume", leave=False, disable=None):
        target = out_dir / f"{nifti_stem(path)}.nii.gz"
        if target in written:
            skipped.append((path, f"another volume is also named {nifti_stem(path)}: its labels would overwrite "
                                  "that one's"))
            continue
        try:
            labels = segment_volume(task, net, path, data, img_size, device, precision)
        except InputError as error:  # unreadable, not 3D, NaN voxels, no body: one line naming the file
            skipped.append((path, str(error)))
            continue
        write_label_nifti(labels, path, target, task)
        written.append(target)
    return written, skipped
