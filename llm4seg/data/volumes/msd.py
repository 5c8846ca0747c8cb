"""Any task of the Medical Segmentation Decathlon as shipped (`--data msd --data-dir TaskNN_Name`): MedVisionLlama's
binary task (every label > 0, or one chosen label value), or every label value as its class (multiclass).

    TaskNN_Name/dataset.json    "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ..],
                                "modality": {"0": "CT"} (one entry per channel),
                                "labels": {"0": "background", "1": "edema", ..} (the classes, multiclass)
    TaskNN_Name/imagesTr/*.nii.gz   3D (X, Y, Z), or 4D (X, Y, Z, C) with the modality last (BrainTumour, Prostate)
    TaskNN_Name/labelsTr/*.nii.gz   3D integer labels
The pairs come from dataset.json, so the tarballs' macOS `._*` files beside them are never opened.

Reading (nibabel) a case: the image as (C, X, Y, Z); the mask as label > 0 (binary, float {0, 1}), == `label`
for one chosen structure, or the label values themselves (multiclass: int64 in 0..K-1, K = the entries of
dataset.json's "labels"; another value is an InputError naming the file); each channel z-scored over the
whole volume, (v - mean) / std; then resized to S^3, trilinear for the image (align_corners=False) and
nearest for the mask. The voxel spacing is the header's, scaled by (original side / S) per axis, so distances
on the resized grid stay in millimetres (HD95, NSD). Resampling ignores the orientation matrix: axes stay as
stored. No augmentation (the paper names none). Preprocessed cases are cached in the task folder,
`llm4seg_cache/<S>px[_label<k>|_multiclass]/<case>.safetensors` (nifti.py), and read again until their NIfTI
files change. A NIfTI file that is missing, cut short or not NIfTI, an image and label of different
(X, Y, Z), or a channel count other than dataset.json's is a files.InputError naming the case;
data.check_cases reads every case once before training to list them all.
"""
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ...files import InputError, listed_path
from ..cases import Case, file_stamp
from .nifti import checked_labels, read_cached, read_nifti, resize_volume, write_cached

MSD_LAYOUT = "TaskNN_Name/dataset.json with imagesTr/*.nii.gz and labelsTr/*.nii.gz"


def msd_index(task_dir: Path) -> tuple[Path, dict]:
    """dataset.json's path and its content; FileNotFoundError saying where to get a task when it is absent."""
    index_file = task_dir / "dataset.json"
    if not index_file.is_file():
        found = "no such folder" if not task_dir.is_dir() else "no dataset.json in it"
        raise FileNotFoundError(f"msd: expected a task folder of the Medical Segmentation Decathlon ({MSD_LAYOUT}) "
                                f"at {task_dir}, found {found}. Download a task from "
                                "http://medicaldecathlon.com, unpack it, and pass --data-dir data/Task09_Spleen")
    try:
        return index_file, json.loads(index_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{index_file} is not an MSD dataset.json ({err}); expected the task's dataset.json "
                         "as shipped") from err


def msd_cases(task_dir: Path) -> tuple[list[Case], int]:
    """The training cases dataset.json lists (name = the image file's name less .nii.gz), and the
    channel count from its "modality" entries."""
    index_file, index = msd_index(task_dir)
    try:
        pairs = [(entry["image"], entry["label"]) for entry in index["training"]]
    except (KeyError, TypeError) as err:
        raise InputError(f"{index_file} is not an MSD dataset.json ({err!r} missing or malformed); expected "
                         '{"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, '
                         "...]}") from err
    cases = []
    for image, label in pairs:
        image_path, label_path = (listed_path(task_dir, entry, index_file) for entry in (image, label))
        for path in (image_path, label_path):
            if not path.is_file():
                raise FileNotFoundError(f"{index_file} lists {path.relative_to(task_dir)}, which is missing; "
                                        "expected the task unpacked whole")
        cases.append(Case(image_path.name.removesuffix(".gz").removesuffix(".nii"), image_path, (label_path,)))
    if not cases:
        raise InputError(f"{index_file} lists no training cases; expected the task's dataset.json as shipped")
    return cases, len(index.get("modality", {"0": "?"}))


def msd_labels(task_dir: Path) -> list[str]:
    """The class names of dataset.json's "labels", in label order (background first): {"0": "background",
    "1": "edema", ..} -> ["background", "edema", ..]; its keys must be 0..K-1."""
    index_file, index = msd_index(task_dir)
    labels = index.get("labels")
    try:
        named = {int(key): str(value) for key, value in labels.items()}
    except (AttributeError, ValueError, TypeError) as err:
        raise InputError(f"{index_file} has no usable \"labels\" ({err}); expected "
                         '{"labels": {"0": "background", "1": "...", ...}} to count the classes') from err
    if sorted(named) != list(range(len(named))) or len(named) < 2:
        raise InputError(f"{index_file} \"labels\" has the keys {sorted(named)}; expected 0..K-1 with K >= 2")
    return [named[k] for k in range(len(named))]


class MSDVolumes(Dataset):
    """Cases of an MSD task. A case is read, z-scored and resized once, then kept as a small safetensors
    file in `cache_dir` (None: no cache), stamped with its NIfTI files' sizes and times, so later epochs
    and runs skip the decompression and resampling (seconds per CT volume) until a file changes.
    classes: None for the binary task, else K (multiclass: the mask is the label map, int64).
    `epoch` is there because train.py sets it on every dataset; volumes are not augmented, so it changes
    nothing."""

    def __init__(self, cases: list[Case], img_size: int, in_channels: int, label: int | None,
                 cache_dir: Path | None = None, classes: int | None = None):
        self.cases, self.img_size, self.in_channels, self.label = cases, img_size, in_channels, label
        self.cache_dir, self.classes = cache_dir, classes
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        if self.cache_dir is None:
            return self.read_case(case)
        cached = self.cache_dir / f"{case.name}.safetensors"
        stamp = file_stamp(case.image, *case.masks)
        found = read_cached(cached, stamp)
        if found is not None:
            return {"name": case.name, **found[0]}
        item = self.read_case(case)
        if not write_cached(cached, stamp, {key: value for key, value in item.items() if key != "name"}):
            self.cache_dir = None
        return item

    def read_case(self, case: Case) -> dict:
        """The case from its NIfTI files: z-scored, resized, the spacing scaled with it."""
        image, spacing = read_nifti(case.image, "image")
        labels, _ = read_nifti(case.masks[0], "label")
        if image.ndim == 3:
            image = image[..., None]                                               # (X, Y, Z, 1)
        if image.ndim != 4 or labels.ndim != 3 or image.shape[:3] != labels.shape:
            raise InputError(f"case {case.name}: image {case.image.name} is {list(image.shape)} and label "
                             f"{case.masks[0].name} is {list(labels.shape)}; expected the same (X, Y, Z) with "
                             "any modalities last on the image")
        if image.shape[3] != self.in_channels:
            raise InputError(f"case {case.name}: image {case.image} has {image.shape[3]} channels; expected "
                             f"{self.in_channels}, as dataset.json's modality lists. Replace it from the task's "
                             "tarball.")
        image = torch.from_numpy(image).permute(3, 0, 1, 2)                         # (C, X, Y, Z)
        mean = image.mean(dim=(1, 2, 3), keepdim=True)
        std = image.std(dim=(1, 2, 3), correction=0, keepdim=True).clamp_min(1e-6)  # a constant channel stays 0
        if self.classes is not None:
            values = checked_labels(labels, case.masks[0], self.classes, "the classes of dataset.json's labels")
            mask = resize_volume(torch.from_numpy(values)[None].float(), self.img_size, "nearest").long()
        else:
            foreground = labels > 0 if self.label is None else labels == self.label
            mask = resize_volume(torch.from_numpy(foreground.astype(np.float32))[None], self.img_size, "nearest")
        scale = np.array(labels.shape) / self.img_size
        return {"image": resize_volume((image - mean) / std, self.img_size, "trilinear"), "mask": mask,
                "name": case.name, "spacing": torch.from_numpy(np.array(spacing) * scale)}
