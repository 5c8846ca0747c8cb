"""3D data for MedVisionLlama: any task of the Medical Segmentation Decathlon as shipped (MSDVolumes), and
synthetic volumes that need no files (draw_blob_volume; data.SyntheticCases serves them). data.load_dataset
splits both.

    item = {"image": (C, S, S, S) float32, "mask": (1, S, S, S) float32 in {0, 1}, "name": case id,
            "spacing": (3,) float64, the voxel size in mm along each axis after resizing}

MSD (`--data msd --data-dir TaskNN_Name`), the layout of the decathlon's tarballs:
    TaskNN_Name/dataset.json    "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ..],
                                "modality": {"0": "CT"} (one entry per channel)
    TaskNN_Name/imagesTr/*.nii.gz   3D (X, Y, Z), or 4D (X, Y, Z, C) with the modality last (BrainTumour, Prostate)
    TaskNN_Name/labelsTr/*.nii.gz   3D integer labels
The pairs come from dataset.json, so the tarballs' macOS `._*` files beside them are never opened.
Reading (nibabel) a case: the image as (C, X, Y, Z), the label > 0 as foreground (MedVisionLlama's binary
task), or == `label` for one chosen structure; each channel z-scored over the whole volume, (v - mean) /
std; then resized to S^3, trilinear for the image (align_corners=False) and nearest for the mask. The
voxel spacing is the header's, scaled by (original side / S) per axis, so distances on the resized
grid stay in millimetres (HD95, NSD). Resampling ignores the orientation matrix: axes stay as stored.
No augmentation (the paper names none). Preprocessed cases are cached in the task folder,
`llm4seg_cache/<S>px[_label<k>]/<case>.safetensors` with a CRC-32 of their tensors, and read again until
their NIfTI files change; a cache file that fails to read or to match its checksum is rebuilt, with one
printed line saying so (it is derived data). A NIfTI file that is cut short or not NIfTI, an image and
label of different (X, Y, Z), or a channel count other than dataset.json's is a files.InputError naming
the case; data.check_cases reads every case once before training to list them all.

Synthetic volumes (`--data synthetic3d`): per (seed, index), 1-3 ellipsoids of raised intensity (the mask
is their union) and 1-2 bright distractor ellipsoids that are not, in a smooth random background with
grain; spacing 1 mm.
"""
import gzip
import json
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from files import InputError, write_atomically
from raw_layouts import Case

MSD_LAYOUT = "TaskNN_Name/dataset.json with imagesTr/*.nii.gz and labelsTr/*.nii.gz"


def msd_cases(task_dir: Path) -> tuple[list[Case], int]:
    """The training cases dataset.json lists (name = the image file's name less .nii.gz), and the
    channel count from its "modality" entries."""
    index_file = task_dir / "dataset.json"
    if not index_file.is_file():
        found = "no such folder" if not task_dir.is_dir() else "no dataset.json in it"
        raise FileNotFoundError(f"msd: expected a task folder of the Medical Segmentation Decathlon ({MSD_LAYOUT}) "
                                f"at {task_dir}, found {found}. Download a task from "
                                "http://medicaldecathlon.com, unpack it, and pass --data-dir data/Task09_Spleen")
    try:
        index = json.loads(index_file.read_text())
        pairs = [(entry["image"], entry["label"]) for entry in index["training"]]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{index_file} is not an MSD dataset.json ({err}); expected "
                         '{"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]}') from err
    cases = []
    for image, label in pairs:
        image_path, label_path = task_dir / image, task_dir / label
        for path in (image_path, label_path):
            if not path.is_file():
                raise FileNotFoundError(f"{index_file} lists {path.relative_to(task_dir)}, which is missing; "
                                        "expected the task unpacked whole")
        cases.append(Case(image_path.name.removesuffix(".gz").removesuffix(".nii"), image_path, (label_path,)))
    if not cases:
        raise InputError(f"{index_file} lists no training cases; expected the task's dataset.json as shipped")
    return cases, len(index.get("modality", {"0": "?"}))


def read_nifti(path: Path, what: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The array (as stored, float32) and the voxel spacing of its first three axes."""
    import nibabel  # only the 3D datasets need it

    try:
        image = nibabel.load(path)
        array = np.asarray(image.dataobj, dtype=np.float32)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, nibabel.filebasedimages.ImageFileError,
            ValueError) as err:
        raise InputError(f"cannot read the {what} {path}: {err}. The file is corrupt or not NIfTI; "
                         "replace it from the task's tarball.") from err
    if array.ndim < 3:
        raise InputError(f"the {what} {path} is {array.ndim}D {list(array.shape)}; expected a 3D volume "
                         "(or 4D with the modality last)")
    return array, tuple(float(z) for z in image.header.get_zooms()[:3])


def resize_volume(volume: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(C, X, Y, Z) -> (C, S, S, S)."""
    options = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(volume[None], size=(size,) * 3, mode=mode, **options)[0]


def tensors_crc32(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 of the tensors' bytes in key order (a few ms for 32 MB), as hex."""
    crc = 0
    for key in sorted(tensors):
        crc = zlib.crc32(tensors[key].contiguous().numpy(), crc)
    return f"{crc:08x}"


class MSDVolumes(Dataset):
    """Cases of an MSD task. A case is read, z-scored and resized once, then kept as a small safetensors
    file in `cache_dir` (None: no cache), stamped with its NIfTI files' sizes and times, so later epochs
    and runs skip the decompression and resampling (seconds per CT volume) until a file changes.
    `epoch` is there because train.py sets it on every dataset; volumes are not augmented, so it changes
    nothing."""

    def __init__(self, cases: list[Case], img_size: int, in_channels: int, label: int | None,
                 cache_dir: Path | None = None):
        self.cases, self.img_size, self.in_channels, self.label = cases, img_size, in_channels, label
        self.cache_dir = cache_dir
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        if self.cache_dir is None:
            return self.read_case(case)
        cached = self.cache_dir / f"{case.name}.safetensors"
        stats = [path.stat() for path in (case.image, *case.masks)]
        stamp = ";".join(f"{stat.st_size}:{stat.st_mtime_ns}" for stat in stats)
        tensors = read_cached(cached, stamp) if cached.is_file() else None
        if tensors is not None:
            return {"name": case.name, **tensors}
        item = self.read_case(case)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tensors = {key: value for key, value in item.items() if key != "name"}
            metadata = {"source": stamp, "crc32": tensors_crc32(tensors)}
            write_atomically(cached, lambda temporary: save_file(tensors, temporary, metadata=metadata))
        except OSError as error:  # a read-only dataset folder: train without the cache
            print(f"volumes: not caching preprocessed cases in {self.cache_dir} ({error})")
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
                             f"{self.in_channels}, as dataset.json's modality lists. Replace it from the task's tarball.")
        image = torch.from_numpy(image).permute(3, 0, 1, 2)                         # (C, X, Y, Z)
        mean = image.mean(dim=(1, 2, 3), keepdim=True)
        std = image.std(dim=(1, 2, 3), correction=0, keepdim=True).clamp_min(1e-6)  # a constant channel stays 0
        foreground = labels > 0 if self.label is None else labels == self.label
        mask = torch.from_numpy(foreground.astype(np.float32))[None]               # (1, X, Y, Z)
        scale = np.array(labels.shape) / self.img_size
        return {"image": resize_volume((image - mean) / std, self.img_size, "trilinear"),
                "mask": resize_volume(mask, self.img_size, "nearest"), "name": case.name,
                "spacing": torch.from_numpy(np.array(spacing) * scale)}


def read_cached(cached: Path, stamp: str) -> dict[str, torch.Tensor] | None:
    """A cache file's tensors, or None when they must be rebuilt: stamped for other NIfTI files (or written
    before checksums), or unreadable, which is printed."""
    try:
        with safe_open(cached, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("source") != stamp or "crc32" not in metadata:
                return None
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        crc = tensors_crc32(tensors)
        if crc != metadata["crc32"]:
            raise ValueError(f"its tensors' CRC-32 is {crc}, expected {metadata['crc32']}")
    except Exception as error:  # whatever failed (a cut file, a bad header, flipped bits): derived data, rebuild
        print(f"volumes: the cached case {cached} is unreadable ({error}); rebuilding it from its NIfTI files")
        return None
    return tensors


def draw_blob_volume(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """image (1, S, S, S), about zero mean and unit spread, and mask (1, S, S, S) in {0, 1}."""
    def uniform(low: float, high: float, shape=()) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    centres = (torch.arange(size) + 0.5) / size
    grid = torch.stack(torch.meshgrid(centres, centres, centres, indexing="ij"))    # (3, S, S, S)

    def ellipsoid(radius_low: float, radius_high: float) -> torch.Tensor:
        centre = uniform(0.25, 0.75, (3, 1, 1, 1))
        radii = uniform(radius_low, radius_high, (3, 1, 1, 1))
        return (((grid - centre) / radii) ** 2).sum(0) <= 1                        # (S, S, S)

    background = F.interpolate(torch.rand(1, 1, 4, 4, 4, generator=generator), size=(size,) * 3,
                               mode="trilinear", align_corners=False)[0, 0]          # smooth, (S, S, S)
    image = 1.5 * background + 0.35 * torch.randn(size, size, size, generator=generator)
    mask = torch.zeros(size, size, size, dtype=torch.bool)
    for _ in range(int(torch.randint(1, 4, (), generator=generator))):
        mask |= ellipsoid(0.1, 0.25)
    # Distractors: brighter than the targets and smaller, so intensity alone does not segment.
    distractors = torch.zeros_like(mask)
    for _ in range(int(torch.randint(1, 3, (), generator=generator))):
        distractors |= ellipsoid(0.05, 0.1)
    image = image + 1.2 * mask + 2.0 * (distractors & ~mask)
    image = (image - image.mean()) / image.std()
    return image[None], mask.float()[None]

