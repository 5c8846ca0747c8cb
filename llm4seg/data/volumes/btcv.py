"""BTCV (MICCAI 2015 Multi-Atlas Labeling Beyond the Cranial Vault, abdomen CT, 14 classes) as its users
have it, preprocessed as UNETR / Swin UNETR do, once per case and cached; its original grid kept so that a
prediction can be written back onto the CT it came from.

Layouts (`--data btcv --data-dir DIR`; the shallowest folder at or under DIR holding either is used):
    challenge  RawData/Training/img/img0001.nii.gz + RawData/Training/label/label0001.nii.gz (RawData.zip; DIR
               may be the folder holding RawData, RawData itself or its Training)
    unetr      imagesTr/img0001.nii.gz + labelsTr/label0001.nii.gz [+ dataset_0.json], UNETR's layout
Split: the official one, train img0001-0010 + img0021-0034 (24 cases), val img0035-0040 (6), unless a
dataset_0.json lists "training" and "validation" (then those; with "training" alone, the official split of
the cases it lists). No test split: the challenge's 20 test CTs have no public labels. Case names are the
image files' names without .nii(.gz), e.g. "img0001".

Preprocessing of a case (UNETR's transforms, in their order; MONAI names in brackets):
 1. orientation to RAS (Orientationd "RAS"): ornt = nibabel.io_orientation(affine), the array axes permuted
    and flipped by nibabel.apply_orientation, image and label alike, affine' = affine @ inv_ornt_aff(ornt).
 2. resampling to 1.5 x 1.5 x 2.0 mm (Spacingd, bilinear / nearest, border padding), separably per axis,
    where Spacingd samples: with s the axis's spacing (the column norm of affine'), t the target and n its
    voxels, the new axis has n' = round((n - 1) s / t + 1) voxels and voxel j samples the old axis at
    x_j = j t / s (the first voxel centres coincide), x clamped to [0, n - 1]; the image linearly between
    floor(x) and floor(x) + 1 (trilinear overall), the label at the nearest voxel. Where x_j or n' - 1 is a
    half in exact arithmetic (1 mm -> 1.5 mm and 4 mm -> 2 mm at odd j), float64 rounding decides the tie,
    not a rule: MONAI computes, all in float64 (Spacingd's dtype), x = ((g a + b + 1) n - 1) / 2 (grid_sample's
    unnormalizing) from g = linspace(-1, 1, n') (n' - 1) / n' (affine_grid's, align_corners False) and a, b
    the axis's scale and shift in solve(source affine, target affine) carried to [-1, 1] coordinates
    (to_norm_affine), and rounds x half to even (nearbyint); n' is np.round of compute_shape_offset's corner
    extent, which goes through the affine's origin. resampled_shape and sampling_positions repeat these
    operations in MONAI's order with the same numpy / torch calls, and resample_axis rounds half to even, so
    every tie falls as in Spacingd; a spacing within 1e-3 of the target and an unchanged shape are left as
    they are, as MONAI does (its AFFINE_TOL). Labels are identical to Spacingd's, tie spacings included; the
    images differ by float rounding only (it interpolates in float64, we in float32): at most 1.2e-7 after
    step 3 (tests/test_btcv.py).
 3. HU window (ScaleIntensityRanged a_min -175, a_max 250, b_min 0, b_max 1, clip): (v + 175) / 425 clipped
    to [0, 1].
 4. crop to the body (CropForegroundd, source the image, margin 0): the bounding box of image > 0, i.e.
    HU > -175 after resampling; image and label cropped alike.
Item = {"image": (1, X, Y, Z) float32 in [0, 1], "mask": (1, X, Y, Z) int64 in 0..13, "name": "img0001",
"spacing": (1.5, 1.5, 2.0) float64}; shapes differ between cases (the training split crops them,
patches.py).

The original grid of each case is recorded beside its preprocessed tensors (the cache file's "grid"
metadata, JSON) and returned by BTCVVolumes.original_grid(index):
    {"shape": [X, Y, Z] as stored, "affine": its 4 x 4 affine, "orientation": ornt ([[axis, flip]] x 3,
     nibabel's), "canonical_shape", "canonical_spacing": after step 1, "spacing": the target,
     "resampled_shape": after step 2, "crop": [[start, stop]] x 3 of step 4 in the resampled grid}
to_original_grid(labels, grid) maps a label map on the preprocessed grid back onto the stored one: into the
resampled grid at the crop box (background outside it), nearest-neighbour resampling back to the canonical
grid (voxel i samples x_i = i s / t, the inverse of step 2), the inverse orientation; save it with
grid["affine"]. read_btcv_image(path) preprocesses any CT file alone (no label, any name) by the same steps
and returns its grid: what eval.py --images does to a new scan (outputs.py).

Bad input is a files.InputError naming each bad file, one line each (data.check_cases collects them for
every case before training): a missing, empty or cut NIfTI; an image and label of different shapes or
affines (1e-3 mm tolerance); NaN voxels in the image; label values other than the integers 0..13; an image
with no voxel above -175 HU; a dataset_0.json that is not JSON or names absent files.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ...files import InputError, listed_path
from ..cases import Case, file_stamp, find_dir
from .nifti import checked_labels, not_finite, read_cached, read_nifti_file, write_cached

BTCV_CLASSES = ("background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver",
                "stomach", "aorta", "inferior vena cava", "portal and splenic veins", "pancreas",
                "right adrenal gland", "left adrenal gland")
BTCV_TRAIN = tuple(f"img{i:04d}" for i in (*range(1, 11), *range(21, 35)))  # UNETR's dataset_0.json, as the paper
BTCV_VAL = tuple(f"img{i:04d}" for i in range(35, 41))
TARGET_SPACING = (1.5, 1.5, 2.0)  # mm
HU_WINDOW = (-175.0, 250.0)
AFFINE_TOLERANCE_MM = 1e-3
MONAI_AFFINE_TOL = 1e-3  # monai.data.utils.AFFINE_TOL: Spacing leaves a volume this close to the target as it is
# Part of every cache file's stamp: a change of the preprocessing rebuilds the caches.
PREPROCESSING = ("btcv-2 RAS; 1.5x1.5x2.0 mm at MONAI's float64 grid, linear/nearest; HU -175..250 -> 0..1; "
                 "crop image > 0")
CACHE_NAME = "btcv_1.5x1.5x2.0mm"
BTCV_SOURCE = ("https://www.synapse.org/#!Synapse:syn3193805/wiki/217789 (a free Synapse account and the "
               "challenge's data terms are needed; Files > Abdomen > RawData.zip)")
BTCV_LAYOUTS = ("RawData/Training/img/img0001.nii.gz + RawData/Training/label/label0001.nii.gz (RawData.zip as "
                "unpacked: the folder holding RawData, RawData itself or its Training), or imagesTr/img0001.nii.gz "
                "+ labelsTr/label0001.nii.gz [+ dataset_0.json] (UNETR's layout)")
NIFTI = re.compile(r"^(?P<kind>img|label)(?P<id>\d+)\.nii(\.gz)?$")


# ---------------------------------------------------------------------------------------------
# Layouts and the split


@dataclass(frozen=True)
class BTCVFolder:
    data_dir: Path                  # the folder holding img/ + label/ (challenge) or imagesTr/ + labelsTr/ (unetr)
    layout: str                     # "challenge" or "unetr"
    files: dict[str, Case]          # every case found, or listed by dataset_0.json, by name
    splits: dict[str, list[str]]    # train / val / test case names
    source: str                     # where the split comes from, for messages

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "llm4seg_cache" / CACHE_NAME

    def cases(self, names: list[str]) -> list[Case]:
        """The cases of these names; one InputError listing every file of them that is absent."""
        cases = [self.files.get(name) or self.expected_case(name) for name in names]
        missing = [path for case in cases for path in (case.image, *case.masks) if not path.is_file()]
        if missing:
            shown = ", ".join(str(path.relative_to(self.data_dir)) for path in missing[:10])
            raise InputError(f"btcv: {len(missing)} files of the cases in {self.source} are missing under "
                             f"{self.data_dir}: {shown}{' ...' if len(missing) > 10 else ''}; expected each case's "
                             "image and label (the 30 labelled CTs of RawData.zip). Restore them, or train a run on the "
                             "cases you have (train.py --split-file <JSON of them>).")
        return cases

    def expected_case(self, name: str) -> Case:
        """Where a case's files would be in this layout (for a case named but not found)."""
        number = name.removeprefix("img")
        images, labels = ("img", "label") if self.layout == "challenge" else ("imagesTr", "labelsTr")
        return Case(name, self.data_dir / images / f"{name}.nii.gz",
                    (self.data_dir / labels / f"label{number}.nii.gz",))


def missing_btcv(root: Path, root_help: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"btcv: expected the layout {BTCV_LAYOUTS} at or anywhere under {root}, found none. Get it from "
        f"{BTCV_SOURCE} and unpack it there as it comes, or pass --data-dir <folder> ({root_help}).")


def is_challenge(folder: Path) -> bool:
    return (folder / "img").is_dir() and (folder / "label").is_dir()


def is_unetr(folder: Path) -> bool:
    return (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir()


def find_btcv(root: Path, root_help: str) -> BTCVFolder:
    """The BTCV folder at or under root, its cases and its split (the module docstring)."""
    data_dir = find_dir(root, lambda folder: is_challenge(folder) or is_unetr(folder))
    if data_dir is None:
        raise missing_btcv(root, root_help)
    if is_challenge(data_dir):
        files = paired_files(data_dir / "img", data_dir / "label")
        return BTCVFolder(data_dir, "challenge", files, official_split(), "the official split (UNETR's)")
    index_file = data_dir / "dataset_0.json"
    if not index_file.is_file():
        files = paired_files(data_dir / "imagesTr", data_dir / "labelsTr")
        return BTCVFolder(data_dir, "unetr", files, official_split(), "the official split (UNETR's)")
    files, splits = dataset_json_split(data_dir, index_file)
    return BTCVFolder(data_dir, "unetr", files, splits, str(index_file))


def paired_files(image_dir: Path, label_dir: Path) -> dict[str, Case]:
    """imgNNNN.nii[.gz] in image_dir with labelNNNN.nii[.gz] (or imgNNNN.nii[.gz], as some conversions name
    them) in label_dir, by NNNN; an image without its label keeps the label's expected path
    (BTCVFolder.cases names it when the case is used)."""
    found: dict[tuple[str, str], list[Path]] = {}
    for folder, kind in ((image_dir, "img"), (label_dir, "label")):
        for path in folder.iterdir():
            match = NIFTI.match(path.name)
            if match and (match["kind"] == kind or folder == label_dir) and path.is_file():
                found.setdefault((kind, match["id"]), []).append(path)
    doubled = sorted(sorted(path.name for path in paths) for paths in found.values() if len(paths) > 1)
    if doubled:
        raise ValueError(f"btcv: {len(doubled)} images or labels have two files (first: {' and '.join(doubled[0])}); "
                         "expected one file per image and label. Remove the extras.")
    files = {}
    for number in sorted({number for _, number in found}):
        image = found.get(("img", number), [image_dir / f"img{number}.nii.gz"])[0]
        label = found.get(("label", number), [label_dir / f"label{number}.nii.gz"])[0]
        files[f"img{number}"] = Case(f"img{number}", image, (label,))
    return files


def official_split() -> dict[str, list[str]]:
    """The official train / val case names (which of them are present is checked when a split is used)."""
    return {"train": list(BTCV_TRAIN), "val": list(BTCV_VAL), "test": []}


def dataset_json_split(data_dir: Path, index_file: Path) -> tuple[dict[str, Case], dict[str, list[str]]]:
    """The cases and split of UNETR's dataset_0.json: {"training": [{"image": "imagesTr/img0001.nii.gz",
    "label": "labelsTr/label0001.nii.gz"}, ..], "validation": [..]}; paths relative to its folder. Every
    listed file must exist (one InputError lists the absent ones)."""
    try:
        index = json.loads(index_file.read_text())
        lists = {key: [(entry["image"], entry["label"]) for entry in index[key]]
                 for key in ("training", "validation") if key in index}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"{index_file} is not a usable dataset_0.json ({err!r}); expected "
                         '{"training": [{"image": "imagesTr/img0001.nii.gz", "label": "labelsTr/label0001.nii.gz"}, '
                         '...], "validation": [...]}. Fix or remove it (without it the official split is '
                         "used).") from err
    if "training" not in lists:
        raise InputError(f"{index_file} has no \"training\" list; expected UNETR's dataset_0.json. Fix or remove it.")
    files, names = {}, {}
    for key, pairs in lists.items():
        names[key] = []
        for image, label in pairs:
            image_path, label_path = (listed_path(data_dir, entry, index_file) for entry in (image, label))
            case = Case(image_path.name.removesuffix(".gz").removesuffix(".nii"), image_path, (label_path,))
            files[case.name] = case
            names[key].append(case.name)
    missing = [path for case in files.values() for path in (case.image, *case.masks) if not path.is_file()]
    if missing:
        shown = ", ".join(str(path.relative_to(data_dir)) for path in missing[:10])
        raise InputError(f"{index_file} names {len(missing)} files that are absent: {shown}"
                         f"{' ...' if len(missing) > 10 else ''}; expected every listed image and label under "
                         f"{data_dir}. Restore them or fix the list.")
    if "validation" in names:
        return files, {"train": names["training"], "val": names["validation"], "test": []}
    return files, {"train": [n for n in names["training"] if n not in BTCV_VAL],
                   "val": [n for n in names["training"] if n in BTCV_VAL], "test": []}


# ---------------------------------------------------------------------------------------------
# Preprocessing one case


def resample_axis(volume: torch.Tensor, dim: int, positions: np.ndarray, linear: bool) -> torch.Tensor:
    """volume sampled along `dim` at the (float64) positions, clamped to [0, n - 1]: linearly between the two
    neighbours, or at the nearest voxel (halves to even)."""
    n = volume.shape[dim]
    x = torch.from_numpy(np.clip(positions, 0, n - 1))
    if not linear:
        return volume.index_select(dim, torch.round(x).long())
    low = x.floor().long()
    high = (low + 1).clamp(max=n - 1)
    weight = (x - low).to(volume.dtype).view([-1 if d == dim else 1 for d in range(volume.ndim)])
    below = volume.index_select(dim, low)
    return below + (volume.index_select(dim, high) - below) * weight


def spacing_affines(spacing, target, origin) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) 4 x 4 affines of an axis-aligned grid as MONAI's Spacing builds them (zoom_affine): the
    target's axes are the source's rotation src[:3, :3] @ inv(cholesky(src' src)'), the identity up to float
    rounding (s * (1 / s) is one ulp below 1 for 13% of random spacings), times the target spacing; its origin
    is left at 0 (compute_shape_offset's input)."""
    source = np.eye(4)
    source[:3, :3], source[:3, 3] = np.diag(spacing), origin
    scale = np.linalg.cholesky(source[:3, :3].T @ source[:3, :3]).T
    destination = np.eye(4)
    destination[:3, :3] = source[:3, :3] @ np.linalg.inv(scale) @ np.diag(target)
    return source, destination


def resampled_shape(shape, spacing, target, origin=(0.0, 0.0, 0.0)) -> list[int]:
    """MONAI's compute_shape_offset for an axis-aligned grid: round((n - 1) s / t + 1) per axis (np.round, halves
    to even) of the corners mapped in its float64 order, which goes through the affine's origin."""
    source, destination = spacing_affines(spacing, target, origin)
    corners = np.asarray(np.meshgrid(*[(0.0, n - 1.0) for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.linalg.solve(destination, source) @ np.concatenate((corners, np.ones_like(corners[:1])))
    return [int(n) for n in np.round(np.ptp(corners[:3] / corners[3], axis=1) + 1.0)]


def normalizing(shape) -> torch.Tensor:
    """MONAI's normalize_transform (align_corners False), (1, 4, 4) float64: voxel i -> (2 i + 1) / n - 1."""
    size = torch.tensor([float(n) for n in shape], dtype=torch.float64)
    matrix = torch.diag(torch.cat((2.0 / size, torch.ones(1, dtype=torch.float64))))
    matrix[:3, 3] = 1.0 / size - 1.0
    return matrix[None]


def sampling_positions(shape, spacing, target, origin=(0.0, 0.0, 0.0)) -> list[np.ndarray]:
    """Per axis, the old positions (float64) where MONAI's Spacing samples the new voxels: j t / s computed as its
    spatial_resample, AffineTransform, affine_grid and grid_sample do (the module docstring's step 2)."""
    out_shape = resampled_shape(shape, spacing, target, origin)
    source, destination = spacing_affines(spacing, target, origin)
    destination[:3, 3] = origin  # compute_shape_offset's offset: the first voxel centres coincide
    xform = np.linalg.solve(source, destination)
    if out_shape == list(shape) and (np.allclose(source, destination, atol=MONAI_AFFINE_TOL)
                                     or np.allclose(xform, np.eye(4), atol=MONAI_AFFINE_TOL)):
        return [np.arange(n, dtype=np.float64) for n in shape]  # Spacing returns such a volume as it is
    # to_norm_affine: xform between grid_sample's [-1, 1] coordinates of the new and the old grid, (1, 4, 4)
    theta = (normalizing(shape) @ torch.from_numpy(xform)[None]
             @ torch.from_numpy(np.linalg.inv(normalizing(out_shape).numpy())))
    positions = []
    for dim, (n, m) in enumerate(zip(shape, out_shape, strict=True)):
        base = torch.linspace(-1, 1, m, dtype=torch.float64) * (m - 1) / m    # affine_grid's, align_corners False
        grid = base * theta[0, dim, dim] + theta[0, dim, 3]                     # (m,), theta is diagonal
        positions.append((((grid + 1) * n - 1) / 2).numpy())                   # grid_sample's unnormalizing
    return positions


def resample(volume: torch.Tensor, spacing, target, linear: bool, origin=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """(X, Y, Z) at `spacing` (its first voxel at `origin`, mm) -> the target spacing, sampled where MONAI's
    Spacing samples (sampling_positions)."""
    for dim, positions in enumerate(sampling_positions(volume.shape, spacing, target, origin)):
        volume = resample_axis(volume, dim, positions, linear)
    return volume


def canonical(array: np.ndarray, affine: np.ndarray):
    """(array in RAS order, ornt, affine of the reoriented array), as nibabel.as_closest_canonical."""
    from nibabel import orientations

    ornt = orientations.io_orientation(affine)
    return orientations.apply_orientation(array, ornt), ornt, affine @ orientations.inv_ornt_aff(ornt, array.shape)


SKEW_TOLERANCE = 1e-3  # off-axis share of a voxel axis (0.06 degrees) that headers' rounding may leave


def check_axis_aligned(affine: np.ndarray, spacing: np.ndarray, path: Path) -> None:
    """InputError unless the reoriented grid's axes are the RAS axes. A gantry-tilted (sheared) or oblique CT
    would be resampled here along its own axes, while MONAI's Spacingd straightens the grid first (a cropped
    shape of (27, 24, 19) against MONAI's (27, 24, 18)): refused rather than preprocessed otherwise than UNETR."""
    directions = affine[:3, :3] / spacing                                  # unit columns: the voxel axes
    off_axis = float(np.abs(directions - np.diag(np.diag(directions))).max())
    if off_axis > SKEW_TOLERANCE:
        degrees = float(np.degrees(np.arcsin(min(off_axis, 1.0))))
        raise InputError(f"the image {path} lies on a sheared or rotated grid (gantry tilt or an oblique scan: its "
                         f"axes are up to {degrees:.2f} degrees off the RAS axes); expected an axis-aligned CT, as "
                         "BTCV's are. Resample it onto an axis-aligned grid first (e.g. 3D Slicer's Resample Scalar "
                         "Volume, or SimpleITK's Resample), then use it.")


def ct_volume(image: np.ndarray, path: Path) -> np.ndarray:
    """A CT as stored, (X, Y, Z), or (X, Y, Z, 1) as some converters write one channel -> (X, Y, Z); InputError
    naming the file for any other shape."""
    if image.ndim == 4 and image.shape[3] == 1:
        image = image[..., 0]  # a single-channel image stored as 4D
    if image.ndim != 3:
        raise InputError(f"the image {path} is {list(image.shape)}; expected a 3D CT volume")
    return image


def preprocess(image: np.ndarray, nifti, path: Path, labels: np.ndarray | None = None):
    """Steps 1-4 of the module docstring on a CT (X0, Y0, Z0) in HU stored as `nifti` says (its header and
    affine), and on its label map (X0, Y0, Z0) alike when given -> (image (X, Y, Z) float32 in [0, 1], labels
    (X, Y, Z) or None, the original grid); InputError when no voxel is above the HU window's low end."""
    image, ornt, affine = canonical(image, nifti.affine)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    check_axis_aligned(affine, spacing, path)
    origin = affine[:3, 3]  # MONAI's resampled size depends on it on ties (resampled_shape)
    image = resample(torch.from_numpy(np.ascontiguousarray(image)), spacing, TARGET_SPACING, True, origin)
    if labels is not None:
        labels, _, _ = canonical(labels, nifti.affine)
        labels = resample(torch.from_numpy(np.ascontiguousarray(labels)), spacing, TARGET_SPACING, False, origin)
    low, high = HU_WINDOW
    image = ((image - low) / (high - low)).clamp(0, 1)
    body = image > 0
    if not body.any():
        raise InputError(f"the image {path} has no voxel above {low:g} HU; expected an abdominal CT in HU")
    crop = [[int(kept.nonzero()[0]), int(kept.nonzero()[-1]) + 1]
            for kept in (body.any(dim=(1, 2)), body.any(dim=(0, 2)), body.any(dim=(0, 1)))]
    box = tuple(slice(start, stop) for start, stop in crop)
    grid = {"shape": list(nifti.shape[:3]), "affine": nifti.affine.tolist(), "orientation": ornt.tolist(),
            "canonical_shape": list(apply_shape(nifti.shape[:3], ornt)), "canonical_spacing": spacing.tolist(),
            "spacing": list(TARGET_SPACING), "resampled_shape": list(image.shape), "crop": crop}
    return image[box], None if labels is None else labels[box], grid


def read_btcv_case(case: Case) -> tuple[dict, dict]:
    """(item, grid) of one case (the module docstring's steps); InputError listing every problem found."""
    image_path, label_path = case.image, case.masks[0]
    problems, arrays = [], {}
    for what, path, dtype in (("image", image_path, np.float32), ("label", label_path, None)):
        try:
            arrays[what] = read_nifti_file(path, what, dtype)
        except InputError as error:
            problems.append(str(error))
    if problems:
        raise InputError("\n".join(problems))
    (image, image_nifti), (labels, label_nifti) = arrays["image"], arrays["label"]
    image = ct_volume(image, image_path)
    if labels.shape != image.shape:
        problems.append(f"case {case.name}: the image {image_path} is {list(image.shape)} but the label {label_path} "
                        f"is {list(labels.shape)}; expected the same grid. Replace the pair from RawData.zip.")
    elif not np.allclose(image_nifti.affine, label_nifti.affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        difference = np.abs(image_nifti.affine - label_nifti.affine).max()
        problems.append(f"case {case.name}: the affines of the image {image_path} and the label {label_path} differ "
                        f"by up to {difference:.3g} mm; expected the same grid (within {AFFINE_TOLERANCE_MM} mm). "
                        "Replace the pair from RawData.zip.")
    problems += not_finite(image, image_path, "image", "Replace it from RawData.zip.")
    try:
        labels = checked_labels(labels, label_path, len(BTCV_CLASSES), "BTCV's 14 classes", np.uint8)
    except InputError as error:
        problems.append(str(error))
    if problems:
        raise InputError("\n".join(problems))

    image, labels, grid = preprocess(image, image_nifti, image_path, labels)
    item = {"image": image[None].contiguous(), "mask": labels[None].long().contiguous(), "name": case.name,
            "spacing": torch.tensor(TARGET_SPACING, dtype=torch.float64)}
    return item, grid


def read_btcv_image(path: Path) -> tuple[torch.Tensor, dict]:
    """Any CT NIfTI file in HU (no label, any name) preprocessed as a BTCV case's image (the module docstring's
    steps 1-4) -> (image (1, X, Y, Z) float32 in [0, 1], its original grid, for to_original_grid); InputError
    naming the file when it cannot be read, is not 3D (or 4D with one channel), has NaN or infinite voxels, or
    has no voxel above -175 HU."""
    path = Path(path)
    image, nifti = read_nifti_file(path, "image", np.float32)
    image = ct_volume(image, path)
    problems = not_finite(image, path, "image", "Fix or remove the file.")
    if problems:
        raise InputError(problems[0])
    image, _, grid = preprocess(image, nifti, path)
    return image[None].contiguous(), grid


def apply_shape(shape, ornt) -> list[int]:
    """The shape of an array of `shape` after nibabel.apply_orientation(.., ornt)."""
    out = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt):
        out[int(target)] = int(shape[axis])
    return out


def to_original_grid(labels: torch.Tensor | np.ndarray, grid: dict) -> np.ndarray:
    """A label map (X, Y, Z) on a case's preprocessed grid -> (X0, Y0, Z0) on its stored grid (the module
    docstring), to be saved with grid["affine"]; voxels outside the body crop are background (0)."""
    labels = torch.as_tensor(np.asarray(labels))
    crop = [slice(start, stop) for start, stop in grid["crop"]]
    if list(labels.shape) != [s.stop - s.start for s in crop]:
        raise ValueError(f"expected a label map of the preprocessed shape {[s.stop - s.start for s in crop]}, "
                         f"got {list(labels.shape)}")
    full = torch.zeros(grid["resampled_shape"], dtype=labels.dtype)
    full[tuple(crop)] = labels
    for dim, n_out in enumerate(grid["canonical_shape"]):
        positions = np.arange(n_out) * (grid["canonical_spacing"][dim] / grid["spacing"][dim])
        full = resample_axis(full, dim, positions, linear=False)
    from nibabel import orientations

    inverse = np.zeros((3, 2))
    for axis, (target, flip) in enumerate(grid["orientation"]):
        inverse[int(target)] = (axis, flip)  # apply_orientation sent axis -> target (flipped when -1)
    return orientations.apply_orientation(full.numpy(), inverse)


# ---------------------------------------------------------------------------------------------
# The dataset of whole preprocessed volumes


class BTCVVolumes(Dataset):
    """BTCV cases as whole preprocessed volumes (the module docstring's item). A case is preprocessed once and
    kept in `cache_dir` (None: no cache) as a safetensors file stamped with its NIfTI files' sizes and times
    and the preprocessing's version, its original grid in the metadata; later epochs and runs read that
    (tens of ms) instead of decompressing and resampling a CT (seconds). `epoch` is there because train.py
    sets it on every dataset; whole volumes are not augmented (the training split wraps them in
    patches.RandomPatches)."""

    def __init__(self, cases: list[Case], cache_dir: Path | None = None):
        self.cases, self.cache_dir = cases, cache_dir
        self.epoch = 0
        self.grids: dict[str, dict] = {}  # the original grids seen by this process, by case name

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        if self.cache_dir is None:
            item, self.grids[case.name] = read_btcv_case(case)
            return item
        cached = self.cache_dir / f"{case.name}.safetensors"
        stamp = self.stamp(case)
        found = read_cached(cached, stamp)
        if found is not None:
            try:
                tensors, extra = found
                self.grids[case.name] = json.loads(extra["grid"])
                return {"image": tensors["image"], "mask": tensors["mask"].long(), "name": case.name,
                        "spacing": tensors["spacing"]}
            except (KeyError, json.JSONDecodeError) as error:  # checksummed but not ours: rebuild
                print(f"volumes: the cached case {cached} lacks {error}; rebuilding it from its NIfTI files")
        item, grid = read_btcv_case(case)
        self.grids[case.name] = grid
        tensors = {"image": item["image"], "mask": item["mask"].to(torch.uint8), "spacing": item["spacing"]}
        if not write_cached(cached, stamp, tensors, {"grid": json.dumps(grid)}):
            self.cache_dir = None
        return item

    @staticmethod
    def stamp(case: Case) -> str:
        try:
            return f"{file_stamp(case.image, *case.masks)};{PREPROCESSING}"
        except FileNotFoundError as error:
            raise InputError(f"the file {error.filename} of case {case.name} is missing; expected the dataset's "
                             "file there") from error

    def original_grid(self, index: int) -> dict:
        """Case `index`'s original grid (the module docstring's record), read (and cached) on first need."""
        name = self.cases[index].name
        if name not in self.grids:
            self[index]
        return self.grids[name]
