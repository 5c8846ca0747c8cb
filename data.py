"""Segmentation datasets: Kvasir-SEG, BUSI, ISIC 2018 and TN-SCUI read in their owners' raw layouts,
the authors' folder layout, and a synthetic polyp set that needs no files (the offline default); in 3D,
any Medical Segmentation Decathlon task, BTCV (abdomen CT, 14 classes), synthetic blob volumes and synthetic
multi-organ volumes (the volumes/ package: their layouts, preprocessing and items). Where each 2D dataset
comes from and how its files pair up is raw_layouts.py's table; the synthetic scenes are drawn by
synthetic.py; this file turns them into torch Datasets and owns the splits.

    load_dataset(name, root, split, img_size=S, seed) -> torch Dataset
    item = {"image": (3, S, S) float32, "mask": (1, S, S) float32 in {0, 1}, "name": case id}
    2D multi-class (folder with multiclass=True): mask (1, S, S) int64 in 0..K-1, each mask file's value its class
    3D binary (msd, synthetic3d): image (C, S, S, S), mask (1, S, S, S) float32 in {0, 1}, plus "spacing" (3,) mm
    3D multi-class (btcv, synthetic-organs, msd with multiclass=True): mask (1, *shape) int64 in 0..K-1;
        btcv's and synthetic-organs' train split = random roi_size^3 patches (samples_per_volume per volume and
        epoch, centred on foreground half the time, flipped / turned / shifted: volumes/patches.py), val / test
        = whole volumes (btcv's of differing shapes, at 1.5 x 1.5 x 2.0 mm: volumes/btcv.py)
    num_classes(name, root, **options): 1 for the binary datasets (one logit, sigmoid), K for the multi-class
        ones (softmax); class_names(...) their K names, background first (["background", "foreground"] if binary)

image = (rgb / 255 - mean) / std with ImageNet mean / std, applied once (the authors' loader divides
by 255 a second time; we don't). mask = 1 where the owner's label is foreground: 8-bit values >= 128
(Kvasir's masks are JPEGs with compression noise, so never test == 255), a map holding only 0 and 1
as it is, colour masks on their brightest channel, RGBA composited over black, palette masks through
their colours, 16-bit masks scaled to 8 bits first. BUSI's several masks of one case are united.
Kvasir, BUSI, ISIC 2018, TN-SCUI and the synthetic polyps are binary by definition, and so is `folder` by
default, so a label map (largest value 2..127, such as {0, 1, 2}, or a palette mask using more than 2 colours)
is refused with an InputError naming the file, never thresholded.

`folder` with multiclass=True (train.py --data folder --multiclass) reads each mask as a label map instead:
its values are the classes, 0 background, 1..K-1 the structures (read_label_map). Accepted: gray PNGs (mode L,
or 16-bit / 1-bit ones holding values <= 255; other lossless formats too) and palette PNGs, whose pixel values
are palette indices (the index is the class, whatever its colour); refused with an InputError naming the file: colour masks (RGB, RGBA,
gray + alpha: a colour is no class number; convert colour-coded masks to indices first), JPEG masks (their
compression invents values between the labels), values above 255. Resized nearest, so no label is blended with
its neighbour's. K = 1 + the largest value in any mask of the dataset (all its cases, whatever the split), at
least 2 (folder_classes; the answer is kept in llm4seg_cache/folder_labels.json with the masks' stamps, so a
run reads the masks once, until one changes). Masks holding only 0 and 255 are binary masks, refused with
multiclass, and so is 255 beside other labels (Pascal VOC's "void" borders; no pixel is ignored here). Class names are "background", "class 1", ..., "class K-1", unless the root (or the folder holding
images/ + masks/) holds one of classes.json or labels.json naming them by value:
    {"0": "background", "1": "polyp", "2": "instrument"}
every value 0..K-1 once (K >= 2), a non-empty name each; K is then the file's, and a mask holding a value the
file does not name is an InputError.

check_cases(dataset), run on each split before the first step, opens every file once and raises one
files.InputError listing every unusable case: an empty, truncated or corrupt image or mask, a mask of
another size than its image, a label map where masks are binary (a colour or JPEG mask where they are label
maps); for MSD and BTCV, every volume read and cached (volumes/), each bad file on its own line (BTCV: missing
or cut NIfTI, image / label grids that differ, NaN voxels, label values outside 0..13).

2D cases read from files are decoded once: check_cases decodes every case of its datasets at img_size into
one cache file per dataset root, size and kind of mask, `<root>/llm4seg_cache/<name>_<S>px.safetensors` (binary
masks) or `<name>_<S>px_labels.safetensors` (label maps, multiclass=True), which the datasets then read
memory-mapped (DataLoader workers share its pages; an item is a copy of one 256 KB row at 256 px):
    "pixels"    (N, 4, S, S) uint8, one row per case: RGB resized bilinear in channels 0..2, the mask resized
                nearest in channel 3, 0 / 1 or the label value (decode_case; a JPEG of both sides >= 4 S is
                decoded at a reduced scale, within a few grey levels: decode_image)
    metadata    "names" (the rows' case ids, JSON), "source" (each row's files' size:mtime, volumes.nifti's
                file_stamp), "img_size", "format", "mask" ("binary" or "labels"; a file without it, written
                before label maps existed, is binary), "crc32" (volumes.nifti's tensors_crc32 of the pixels,
                then of the other values)
One file rather than one per split (splits depend on seed, fold and fractions: every split of every run shares
the decoded cases; a run adds the ones the file lacks) or per case (one map and one checksum, not thousands).
A file cut short, corrupt (its checksum), of another img_size, format or kind of mask is rebuilt with one printed
line, never used; a case whose files' stamp changed is decoded again, the other rows copied; a file is written
beside the old one and renamed over it (files.write_atomically), so two runs building it at once each leave a
whole file, and a process keeps reading the file it opened. A root that cannot be written caches under $LLM4SEG_CACHE
(default ~/.cache/llm4seg), in images/, named after the root's path too; where neither can be written, each
item is decoded from its files every epoch, which is said once. A case's cached row was decoded from files of
the same stamp without a problem, so check_cases does not open them again. An item read from the cache equals
the one decoded from its files (the same decode_case, the same augmentation), bit for bit.

Train items get the paper's augmentation: a random 90-degree rotation and random horizontal and
vertical flips (together all 8 symmetries of the square) after resizing to S x S (bilinear image,
nearest mask; resizing to a square commutes with those symmetries, and resizing first is cheaper).
Val / test items are only resized. btcv's and synthetic-organs' train patches draw their centre, flips,
turn and intensity shift the same way (volumes/patches.py). The draw is a function of (seed, epoch, index) alone
(augmentation_generator), never of torch's global RNG or a DataLoader worker's, so any number of
workers, and a run stopped mid-epoch and resumed, see the same items. Every dataset load_dataset returns has an
`epoch` attribute; train.py's loader, whose workers live across epochs, reads (index, epoch) keys instead
(EpochOrder, EpochItems), and takes 2D items from files as uint8 (raw_item), normalised on the device
(normalize_batch) with the same float32 operations as an item's.

Splits are lists of case ids, written once as a small JSON file in `root` (or at `split_file`) and
reused, so every run and every model sees the same cases:
    kvasir                     train / val / test  80 / 10 / 10 %   (no list was published)
    msd                        train / val / test  70 / 20 / 10 %   (MedVisionLlama; fold=k instead takes
                                                   fold k of 5 on the 90 % outside test as val)
    btcv                       train / val  24 / 6 cases, the official split built in (or dataset_0.json's
                                                   lists, or split_file's); no test split, none was labelled
    synthetic, synthetic3d,    train / val / test  70 / 20 / 10 % of synthetic_size, by index
    synthetic-organs
    busi, isic2018, tnscui     train / val         70 / 30 %  as in the paper, plus an optional
    folder                                         held-out test fraction (the paper picks its best
                                                   epoch on the set it reports; a test set is honest)
val = ceil(val_fraction * n) and test = ceil(test_fraction * n), as sklearn's train_test_split
counts, so BUSI's 647 cases give the authors' 452 / 195. The authors' own lists
`<name>_train.txt` / `<name>_val.txt` (or `..._train1.txt` / `..._val1.txt`), one case id a line,
are used instead when found in `root` or the dataset folder.

Kvasir-SEG downloads itself when its folder is absent (raw_layouts.download_kvasir); the others need
an account with their owners, so a missing one raises an error saying where to get it and which
layout is expected.
"""
import functools
import hashlib
import json
import math
import os
import time
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from files import InputError, WriteError, write_atomically
from raw_layouts import IMAGE_EXTENSIONS, RAW_DATASETS, Case, download_kvasir, missing_dataset
from synthetic import draw_polyp_scene
from volumes import (BTCV_CLASSES, ORGAN_CLASSES, BTCVVolumes, MSDVolumes, RandomPatches, SyntheticOrgans,
                     draw_blob_volume, find_btcv, msd_cases, msd_labels)
from volumes.nifti import CHECKSUM, STAMP, file_stamp, tensors_crc32

# The owners' 2D datasets (raw_layouts.py), the generated polyps, and the 3D ones (the volumes/ package).
DATASETS = (*RAW_DATASETS, "synthetic", "msd", "synthetic3d", "btcv", "synthetic-organs")
VOLUME_DATASETS = ("msd", "synthetic3d", "btcv", "synthetic-organs")  # items are (C, X, Y, Z) volumes
GENERATED_DATASETS = ("synthetic", "synthetic3d", "synthetic-organs")  # drawn from (seed, index), fixed splits
MULTICLASS_DATASETS = ("btcv", "synthetic-organs")  # label maps, always
LABEL_MAP_DATASETS = ("msd", "folder")  # label maps with multiclass=True, binary without
PATCH_DATASETS = ("btcv", "synthetic-organs")  # trained on random crops, evaluated by sliding windows
MSD_FRACTIONS = (0.2, 0.1)  # (val, test) of all cases: MedVisionLlama's 70 / 20 / 10
FOLDS = 5  # fold=k: the non-test cases in 5 parts, part k validates
SPLITS = ("train", "val", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_ROOT_ENV = "LLM4SEG_DATA"  # parent folder of every dataset's default root, ./data when unset
SYNTHETIC_FRACTIONS = (0.2, 0.1)  # (val, test); train is the rest
LISTED_PROBLEMS = 20  # check_cases names this many bad files, then counts the rest
CACHE_FOLDER = "llm4seg_cache"  # in a dataset's root, beside its split files (the MSD cache is there too)
CACHE_ENV = "LLM4SEG_CACHE"  # where 2D caches go when the dataset's root cannot be written (~/.cache/llm4seg unset)
CACHE_FORMAT = "llm4seg 2D cases 1"  # what decode_case stores; changing it rebuilds every cache
PIXELS = "pixels"  # the cache file's one tensor, (N, 4, S, S) uint8
MAX_HEADER_BYTES = 1 << 30
DRAFT_FACTOR = 4  # JPEGs with both sides >= 4 S are decoded at a reduced scale (decode_image)
BUILD_PROCESSES = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
PARALLEL_BUILD = 64  # fewer cases to decode are decoded in this process (starting workers costs ~0.1 s each)
STALE_TEMPORARY_S = 3600  # a cache temporary untouched this long was left by a killed build
CLASS_FILES = ("classes.json", "labels.json")  # a multi-class folder's class names, by label value
LABELS_MEMO = "folder_labels.json"  # in CACHE_FOLDER: the label values of a multi-class folder's masks
MAX_LABEL = 255  # a label map's values are stored in the cache's uint8 mask channel


def check_dataset_name(name: str) -> None:
    """Cheap check for entry scripts to run before heavy work: raise on an unknown dataset name."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")


def check_data_options(name: str, fold: int | None, label: int | None, multiclass: bool = False) -> None:
    """Cheap checks of load_dataset's fold, label and multiclass, for entry scripts to run before heavy work too."""
    if fold is not None and not 0 <= fold < FOLDS:
        raise ValueError(f"fold {fold} out of range: expected 0..{FOLDS - 1}")
    if fold is not None and name in GENERATED_DATASETS:
        raise ValueError(f"fold applies to datasets read from files; {name} has fixed splits")
    if label is not None and name != "msd":
        raise ValueError(f"label chooses a structure of an msd task, got it for {name}")
    if multiclass and name in MULTICLASS_DATASETS:
        raise ValueError(f"multiclass applies to msd (every label value its class); {name} is multi-class already")
    if multiclass and name not in LABEL_MAP_DATASETS:
        other = ", or read label-map masks as the folder dataset" if name in RAW_DATASETS else ""
        raise ValueError(f"multiclass applies to msd and folder (every label value its class); {name} is binary by "
                         f"definition (one foreground, one sigmoid): drop multiclass{other}")
    if multiclass and label is not None:
        raise ValueError(f"label {label} makes one structure the foreground, multiclass keeps every label: choose one")



# ---------------------------------------------------------------------------------------------
# The public entry point


def load_dataset(name: str, root: str | None = None, split: str = "train", img_size: int = 256,
                 seed: int = 41, *, include_normal: bool = False, val_fraction: float | None = None,
                 test_fraction: float | None = None, split_file: str | None = None,
                 use_author_lists: bool = True, synthetic_size: int = 300,
                 download: bool = True, fold: int | None = None, label: int | None = None,
                 multiclass: bool = False, roi_size: int = 96, samples_per_volume: int = 4) -> Dataset:
    """One split of a dataset; see the module docstring for layouts, labels and splits.

    include_normal: BUSI only; add the 133 "normal" cases (empty masks) the paper leaves out.
    val_fraction / test_fraction: of all cases, default 0.1 / 0.1 for kvasir, 0.2 / 0.1 for msd and
        0.3 / 0 otherwise.
    split_file: JSON split to reuse, or to write when absent (default: a file in root); for btcv, lists to use
        instead of the official split (the file must exist).
    use_author_lists: read <name>_train.txt / <name>_val.txt when present.
    synthetic_size: total synthetic cases (2D or 3D), split 70 / 20 / 10 %.
    download: fetch Kvasir-SEG when root is absent or empty.
    fold: 0..4, cross-validation on the cases outside the test split (cross_validation_fold).
    label: msd only; the label value that is foreground (default: every label > 0).
    multiclass: msd and folder; every label value is its class (int64 label maps; num_classes gives K).
    roi_size, samples_per_volume: btcv and synthetic-organs, the training split's patches (R^3, this many
        per volume and epoch; volumes/patches.py); the other splits and datasets ignore them.
    img_size: the side of the 2D images and of the msd / synthetic3d / synthetic-organs volumes; btcv ignores
        it (its grid is fixed by the 1.5 x 1.5 x 2.0 mm spacing).
    """
    check_dataset_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    if img_size < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    if roi_size < 1 or samples_per_volume < 1:
        raise ValueError(f"roi_size and samples_per_volume must be positive, got {roi_size} and {samples_per_volume}")
    check_data_options(name, fold, label, multiclass)
    if name in ("synthetic", "synthetic3d"):
        dataset = synthetic_split(name, split, synthetic_size, img_size, seed)
        print(f"{name} {split}: {len(dataset)} generated cases (seed {seed}, {img_size} px)")
        return dataset
    if name == "synthetic-organs":
        first, length = synthetic_range(split, synthetic_size)
        volumes = SyntheticOrgans(length, first, img_size, seed)
        print(f"{name} {split}: {length} generated volumes (seed {seed}, {img_size}^3 voxels, "
              f"{len(ORGAN_CLASSES)} classes){patches_note(split, roi_size, samples_per_volume, length)}")
        if split != "train":
            return volumes
        patches = RandomPatches(name, volumes, roi_size, samples_per_volume, partial(augmentation_generator, seed))
        patches.note_shapes([(f"{name}_{first + i:05d}", [img_size] * 3) for i in range(length)])
        return patches
    if include_normal and name != "busi":
        raise ValueError(f"include_normal applies to busi only, got it for {name}")

    root_dir = Path(root) if root is not None else default_root(name)
    if name == "btcv":
        return load_btcv(root_dir, split, seed, split_file, fold, val_fraction, test_fraction, roi_size,
                         samples_per_volume)
    if name == "msd":
        data_dir = root_dir
        cases, channels = msd_cases(root_dir)
        default_val, default_test = MSD_FRACTIONS
    else:
        raw = RAW_DATASETS[name]
        data_dir = raw.locate(root_dir)
        if data_dir is None and name == "kvasir" and download and \
                (not root_dir.exists() or not any(root_dir.iterdir())):
            download_kvasir(root_dir)
            data_dir = raw.locate(root_dir)
        if data_dir is None:
            raise missing_dataset(name, root_dir, f"default root: ${DATA_ROOT_ENV}/{name}, or ./data/{name} when unset")
        cases = raw.cases(root_dir, data_dir, include_normal)
        default_val, default_test = raw.fractions

    val_fraction = default_val if val_fraction is None else val_fraction
    test_fraction = default_test if test_fraction is None else test_fraction
    if not (0 < val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"expected 0 < val_fraction, 0 <= test_fraction and a sum below 1, got "
                         f"{val_fraction} and {test_fraction}")
    found = sorted(case.name for case in cases)
    author_lists = find_author_lists(name, [root_dir, data_dir]) \
        if split_file is None and use_author_lists else None
    if author_lists is not None:
        source = f"the authors' lists {author_lists[0]} + {author_lists[1].name}"
        if include_normal or split == "test":
            raise ValueError(f"{source} define train / val of the paper's cases only; for "
                             f"{'normal cases' if include_normal else 'a test split'} pass "
                             "use_author_lists=False to split afresh")
        splits = {"train": read_case_list(author_lists[0]), "val": read_case_list(author_lists[1]),
                  "test": []}
    else:
        default = root_dir / (f"llm4seg_split_{name}_seed{seed}_val{val_fraction:g}_test"
                              f"{test_fraction:g}{'_with_normal' if include_normal else ''}.json")
        path = Path(split_file) if split_file else default
        source = str(path)
        splits = split_from_json(name, found, path, path == default, seed, val_fraction,
                                 test_fraction)
    listed = Counter(n for s in SPLITS for n in splits[s])
    unknown = sorted(set(listed) - set(found))
    if unknown:
        raise ValueError(f"{len(unknown)} cases named in {source} are not in the data under "
                         f"{root_dir} (first: {', '.join(unknown[:5])}); expected every listed "
                         "case present.")
    hint = "; a held-out test set needs a test fraction > 0 (train.py --test-fraction 0.1)" if split == "test" else ""
    names, source = split_names(name, splits, split, fold, seed, source, hint)
    by_name = {case.name: case for case in cases}
    chosen = [by_name[n] for n in names]
    note = ""
    if name == "busi":
        note = "; normal cases included" if include_normal else \
            "; benign + malignant only, as the paper (include_normal=True adds the normal cases)"
    if len(listed) < len(cases):
        note += f"; {len(cases) - len(listed)} cases found are in no list and unused"
    if name == "folder" and multiclass:
        note += "; masks read as label maps (multiclass)"
    print(f"{name} {split}: {len(chosen)} cases from {data_dir}, split {source}{note}")
    if name == "msd":
        variant = "_multiclass" if multiclass else "" if label is None else f"_label{label}"
        classes = len(msd_labels(root_dir)) if multiclass else None
        cache = root_dir / "llm4seg_cache" / f"{img_size}px{variant}"
        return MSDVolumes(chosen, img_size, channels, label, cache, classes)
    return SegmentationFiles(chosen, img_size, seed, augment=split == "train",
                             cache_paths=cache_paths(name, root_dir, img_size, multiclass), multiclass=multiclass)


def split_names(name: str, splits: dict[str, list[str]], split: str, fold: int | None, seed: int, source: str,
                hint: str = "") -> tuple[list[str], str]:
    """The case names of `split` (fold `fold` of the non-test cases when given) and the split's source for the
    log; ValueError when a case is in two splits or the split is empty (`hint` says what to do)."""
    listed = Counter(n for s in SPLITS for n in splits[s])
    repeated = sorted(n for n, count in listed.items() if count > 1)
    if repeated:
        raise ValueError(f"{len(repeated)} cases are in more than one split of {source} (first: "
                         f"{', '.join(repeated[:5])}); expected disjoint splits. Fix the lists.")
    if fold is not None:
        splits = cross_validation_fold(splits, fold, seed)
        source += f", fold {fold} of {FOLDS}"
    if not splits[split]:
        raise ValueError(f"{name} has no {split} cases in {source}{hint}")
    return splits[split], source


def load_btcv(root_dir: Path, split: str, seed: int, split_file: str | None, fold: int | None,
              val_fraction: float | None, test_fraction: float | None, roi_size: int,
              samples_per_volume: int) -> Dataset:
    """BTCV's split (volumes/btcv.py: layouts, the official split, preprocessing): whole volumes, or patches
    of them for train. Its cache is `llm4seg_cache/btcv_1.5x1.5x2.0mm/` in the folder holding the layout."""
    if val_fraction is not None or test_fraction is not None:
        raise ValueError("btcv has a fixed split (the official one, or dataset_0.json's); for another pass "
                         "split_file=<JSON of train / val / test case names>, not fractions")
    folder = find_btcv(root_dir, f"default root: ${DATA_ROOT_ENV}/btcv, or ./data/btcv when unset")
    splits, source = folder.splits, folder.source
    if split_file is not None:
        if not Path(split_file).is_file():
            raise FileNotFoundError(f"btcv: split_file {split_file} does not exist; expected JSON "
                                    '{"train": [names], "val": [names], "test": [names]} (without split_file the '
                                    "official split is used)")
        splits, source = split_from_json("btcv", [], Path(split_file), False, seed, 0, 0), split_file
    hint = ("; BTCV has no test split (the challenge's 20 test CTs have no public labels): evaluate on val, or "
            "pass split_file=<JSON with a test list>") if split == "test" else ""
    names, source = split_names("btcv", splits, split, fold, seed, source, hint)
    volumes = BTCVVolumes(folder.cases(names), folder.cache_dir)
    unused = len(set(folder.files) - {n for s in SPLITS for n in splits[s]})
    note = f"; {unused} cases found are in no list and unused" if unused else ""
    print(f"btcv {split}: {len(names)} cases from {folder.data_dir} ({folder.layout} layout), split {source}{note}"
          f"{patches_note(split, roi_size, samples_per_volume, len(names))}")
    if split != "train":
        return volumes
    return RandomPatches("btcv", volumes, roi_size, samples_per_volume, partial(augmentation_generator, seed))


def patches_note(split: str, roi_size: int, samples_per_volume: int, volumes: int) -> str:
    if split != "train":
        return "; whole volumes"
    return f"; random {roi_size}^3 patches, {samples_per_volume} per volume: {volumes * samples_per_volume} items"


def spatial_dims(name: str) -> int:
    """3 for the volume datasets, 2 for the image ones."""
    return 3 if name in VOLUME_DATASETS else 2


def input_channels(name: str, root: str | None = None) -> int:
    """The channels of a dataset's images, known before loading it (to build the model first): RGB in 2D,
    1 for synthetic3d, btcv (CT) and synthetic-organs, an MSD task's modalities."""
    check_dataset_name(name)
    if name == "msd":
        return msd_cases(Path(root) if root is not None else default_root(name))[1]
    return 1 if name in VOLUME_DATASETS else 3


def class_names(name: str, root: str | None = None, **options) -> list[str]:
    """The K class names of a dataset, background first: btcv's 14 organs' classes, synthetic-organs' 6, an msd
    task's dataset.json "labels" with multiclass=True, a folder's with multiclass=True (folder_classes);
    ["background", "foreground"] for the binary datasets.
    options: load_dataset's keywords (fold, label, multiclass are checked; the others are not used)."""
    check_dataset_name(name)
    check_data_options(name, options.get("fold"), options.get("label"), options.get("multiclass", False))
    if name == "btcv":
        return list(BTCV_CLASSES)
    if name == "synthetic-organs":
        return list(ORGAN_CLASSES)
    root_dir = Path(root) if root is not None else default_root(name)
    if name == "msd" and options.get("multiclass"):
        return msd_labels(root_dir)
    if name == "folder" and options.get("multiclass"):
        return folder_classes(root_dir)
    return ["background", "foreground"]


def num_classes(name: str, root: str | None = None, **options) -> int:
    """The output channels a model needs: 1 for every binary dataset (one logit, sigmoid), K for the
    multi-class ones (K logits, softmax): 14 for btcv, 6 for synthetic-organs, len(dataset.json "labels") for
    msd with multiclass=True (e.g. BrainTumour 4), 1 + the largest mask value (or classes.json's count) for folder
    with multiclass=True. options as class_names."""
    names = class_names(name, root, **options)
    multiclass = name in MULTICLASS_DATASETS or (name in LABEL_MAP_DATASETS and options.get("multiclass", False))
    return len(names) if multiclass else 1


def folder_classes(root_dir: Path) -> list[str]:
    """The K class names of a multi-class folder, background first: its classes.json's (or labels.json's), else
    "background", "class 1", ..., "class K-1" with K = 1 + the largest value in any of its masks (at least 2).
    InputError when the masks hold only 0 and 255 (binary masks), or a value the class file does not name."""
    raw = RAW_DATASETS["folder"]
    data_dir = raw.locate(root_dir)
    if data_dir is None:
        raise missing_dataset("folder", root_dir, f"default root: ${DATA_ROOT_ENV}/folder, or ./data/folder when unset")
    values, where = label_values(raw.cases(root_dir, data_dir, False), root_dir)
    if 255 in values and set(values) <= {0, 255}:
        raise InputError(f"the masks under {data_dir} hold only 0 and 255: binary masks, not label maps (whose "
                         "values are the classes 0..K-1). Drop multiclass, or save each mask's classes as 0, 1, 2, ...")
    if 255 in values:
        raise InputError(f"mask {where} holds 255 beside the labels {values[:-1]}: as a class it would make 256 of "
                         "them; if it marks pixels to ignore (as Pascal VOC's borders), expected those pixels "
                         "labelled 0 or as their class")
    named, class_file = named_classes([root_dir, data_dir])
    largest = max(values, default=0)
    if named is None:
        return ["background", *(f"class {k}" for k in range(1, max(2, largest + 1)))]
    if largest >= len(named):
        raise InputError(f"mask {where} holds the label {largest}, but {class_file} names the classes "
                         f"0..{len(named) - 1}; expected a name for every label value: add it, or fix the mask")
    return named


def named_classes(folders: list[Path]) -> tuple[list[str] | None, Path | None]:
    """The class names of the one classes.json or labels.json in `folders` ({"0": "background", "1": "polyp", ...}:
    every value 0..K-1 once, K >= 2, a non-empty name each), in value order, and the file; (None, None) when
    there is none. InputError when there are several or the file is not such a table."""
    found = sorted({(folder / name).resolve() for folder in folders for name in CLASS_FILES
                    if (folder / name).is_file()})
    if len(found) > 1:
        raise InputError(f"found {' and '.join(map(str, found))}; expected one file naming the classes: remove the "
                         "others")
    if not found:
        return None, None
    path = found[0]
    expected = ('expected {"0": "background", "1": "<class 1>", ...}, every label value 0..K-1 once (K >= 2) with '
                'a name')
    try:
        table = json.loads(path.read_text())
        named = {int(key): value for key, value in table.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, ValueError, TypeError) as err:
        raise InputError(f"{path} is unreadable as a class table ({err}); {expected}") from err
    if sorted(named) != list(range(len(named))) or len(named) < 2:
        raise InputError(f"{path} names the label values {sorted(named)}; {expected}")
    if not all(isinstance(value, str) and value.strip() for value in named.values()):
        raise InputError(f"{path} has a name that is empty or not a string; {expected}")
    return [named[k] for k in range(len(named))], path


def label_values(cases: list[Case], root_dir: Path) -> tuple[list[int], Path | None]:
    """The values found in the cases' label-map masks, sorted, and a mask holding the largest; masks that cannot
    be read as label maps are left out (check_cases names them). Kept in <root>/llm4seg_cache/folder_labels.json
    with the masks' stamps (file_stamp), so the masks are read again only when one changed (or the file cannot be
    written: then every call reads them)."""
    masks = sorted(path for case in cases for path in case.masks)
    try:
        stamps = file_stamp(*masks)
    except OSError:
        stamps = None
    memo = root_dir / CACHE_FOLDER / LABELS_MEMO
    key = hashlib.sha1(json.dumps([list(map(str, masks)), stamps]).encode()).hexdigest()
    try:
        stored = json.loads(memo.read_text())
        if stored["key"] == key and stamps is not None:
            return [int(v) for v in stored["values"]], Path(stored["largest_in"]) if stored["largest_in"] else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        pass  # absent, unreadable or outdated: read the masks
    found, where = np.zeros(MAX_LABEL + 1, bool), None
    for path in tqdm(masks, desc="reading label values", unit="mask", leave=False, disable=None):
        try:
            labels = mask_to_labels(open_image(path))
        except (InputError, ValueError):
            continue
        if (largest := int(labels.max(initial=0))) > 0 and (where is None or not found[largest:].any()):
            where = path
        found[np.unique(labels)] = True
    values = np.flatnonzero(found).tolist()
    if stamps is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(memo, lambda tmp: tmp.write_text(json.dumps(
                {"key": key, "values": values, "largest_in": str(where) if where else None})))
        except OSError:
            pass  # a read-only root: the masks are read again next time
    return values, where


def check_cases(*datasets: Dataset) -> None:
    """Open every file of the datasets load_dataset returned, once, before training: raise one InputError
    listing every unusable case of all of them (the module docstring says what is checked), not a crash at
    the first one in the middle of an epoch. MSD and BTCV cases are read and cached, the work their first epoch
    would do (done twice when the data folder is read-only and nothing can be cached), and a split of patches
    says once which of its volumes are smaller than a patch; generated cases need no check. 2D cases are
    decoded into their cache, which the datasets then read (a case whose cached row is as its files are was
    decoded before and is not opened again); without a cache they are checked file by file (case_problems)."""
    problems, bad_cases, total = [], 0, 0
    checked = cache_cases([dataset for dataset in datasets if isinstance(dataset, SegmentationFiles)])
    for dataset in datasets:
        patches = dataset if isinstance(dataset, RandomPatches) else None
        dataset = dataset.volumes if patches is not None else dataset
        if isinstance(dataset, (SyntheticCases, SyntheticOrgans)):
            continue
        volumes, shapes = isinstance(dataset, (MSDVolumes, BTCVVolumes)), []
        total += len(dataset.cases)
        for index, case in enumerate(tqdm(dataset.cases, desc="reading cases" if volumes else "checking files",
                                          unit="case", leave=False, disable=None)):
            if volumes:
                try:
                    shapes.append((case.name, list(dataset[index]["mask"].shape[1:])))
                    found = []
                except InputError as error:
                    found = str(error).splitlines()  # BTCV names each bad file of a case on its own line
            else:
                found = checked[case] if case in checked else case_problems(case, dataset.multiclass)
            problems += found
            bad_cases += bool(found)
        if patches is not None:
            patches.note_shapes(shapes)
    if problems:
        listed = problems[:LISTED_PROBLEMS]
        if len(problems) > len(listed):
            listed.append(f"... and {len(problems) - len(listed)} more")
        raise InputError(f"{bad_cases} of {total} cases cannot be used:\n"
                         + "\n".join(f"  {line}" for line in listed)
                         + "\nexpected every case readable: replace these files, or remove their cases from the "
                         "data and the split file (or delete the split file to split again), then start again.")


# ---------------------------------------------------------------------------------------------
# Reading one case: image, mask(s), resize, augment, normalise



def open_image(path: Path) -> Image.Image:
    """The decoded image; InputError naming the file when it is empty, cut short or not an image."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise unreadable_image(path, err) from err
    return image


def unreadable_image(path: Path, error: Exception) -> InputError:
    reason = "the file is empty (0 bytes)" if path.is_file() and path.stat().st_size == 0 else str(error)
    return InputError(f"cannot read image file {path}: {reason}. Replace it with the dataset's own copy, "
                      "or remove the case.")


def checked_size(path: Path) -> tuple[int, int]:
    """An image file's (W, H) from its header, after checking that the file reads to its end without
    decoding all of it: a PNG by its chunks' checksums (verify), a JPEG decoded at 1/8 scale (draft;
    every byte is still read, so a cut file fails), other formats in full. Measured: a 622 x 530 PNG
    verifies in 0.07 ms against 5.7 ms to decode, a 4000 x 3000 JPEG (ISIC's size) takes 18 ms against
    56 ms; 1000 Kvasir-sized JPEG pairs check in about 2 s, mask decoding included."""
    try:
        with Image.open(path) as image:
            size = image.size
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
                image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise unreadable_image(path, err) from err
    return size


def to_numeric_gray(image: Image.Image) -> np.ndarray | None:
    """(H, W) values on an 8-bit scale for 1-channel integer modes, None for colour modes."""
    if image.mode not in ("L", "I", "I;16", "I;16B", "I;16L"):
        return None
    values = np.asarray(image)
    if values.dtype == np.uint8:
        return values  # "L" as it is: widening ISIC's 4000 x 3000 masks to int64 took 20 ms each
    values = values.astype(np.int64)
    # 16-bit files keep 0..65535; bring them to 0..255 so one threshold fits all.
    return values // 257 if values.max(initial=0) > 255 else values


def read_rgb(path: Path) -> Image.Image:
    return as_rgb(open_image(path))


def as_rgb(image: Image.Image) -> Image.Image:
    """Any decoded image as RGB: gray ones (16-bit scaled to 8 bits) repeated, RGBA / palette / CMYK converted."""
    gray = to_numeric_gray(image)
    if gray is not None:
        return Image.fromarray(gray.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def decode_image(path: Path, img_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(S, S, 3) uint8 RGB resized bilinear (resized_rgb's pixels), and the file's full size (W, H).

    A JPEG whose sides are both >= DRAFT_FACTOR * S is decoded at a reduced DCT scale (PIL's draft: 1/2, 1/4
    or 1/8, the smallest keeping both sides >= 2 S, so the bilinear resize still averages >= 2 pixels per
    output pixel): an ISIC-sized 4000 x 3000 JPEG decodes at 1000 x 750 in 26 ms instead of 151 ms, within
    max 2 / mean 0.21 grey levels of the full decode at 256 px, where bilinear and bicubic resizing of the
    same full decode differ by max 9 / mean 1.49 (tests/bench_loader.py measures it). A Kvasir-sized
    622 x 530 JPEG is below 4 x 256 and decoded in full (a 1/2-scale draft there differed by max 8 /
    mean 0.70, more than the resize filters do). Every other image is decoded in full, as read_rgb does."""
    try:
        image = Image.open(path)
        size = image.size
        if image.format == "JPEG" and min(size) >= DRAFT_FACTOR * img_size:
            image.draft("RGB", (2 * img_size, 2 * img_size))
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise unreadable_image(path, err) from err
    return np.asarray(as_rgb(image).resize((img_size, img_size), Image.Resampling.BILINEAR)), size


def decode_case(case: Case, img_size: int, multiclass: bool = False) -> np.ndarray:
    """One case as the cache stores it: (4, S, S) uint8, RGB in channels 0..2 (decode_image) and in channel 3
    the mask's 0 / 1 (the union of its masks) or, with multiclass, its label values (read_label_map), resized
    nearest so no value is blended with its neighbour's. InputError naming the first unusable file
    (case_problems names them all)."""
    rgb, size = decode_image(case.image, img_size)                                   # (S, S, 3)
    mask = read_labels(case, size) if multiclass else read_mask(case, size).astype(np.uint8)  # (H, W)
    mask = np.asarray(Image.fromarray(mask).resize((img_size, img_size), Image.Resampling.NEAREST))  # (S, S)
    pixels = np.empty((4, img_size, img_size), np.uint8)
    pixels[:3], pixels[3] = rgb.transpose(2, 0, 1), mask                            # (3, S, S) <- (S, S, 3)
    return pixels


def label_map_error(kind: str, values: np.ndarray) -> ValueError:
    shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
    return ValueError(f"holds the {kind} {{{shown}}}: expected a binary mask (0/255 or 0/1); this "
                      "project's 2D datasets are binary")


def mask_to_binary(mask: Image.Image) -> np.ndarray:
    """Any binary mask image -> (H, W) bool foreground; ValueError for a label map (its largest value
    2..127, or a palette mask using more than 2 colours), which no threshold turns into the right mask."""
    if mask.mode == "1":
        return np.asarray(mask, dtype=bool)
    if mask.mode == "P" and len(indices := np.unique(np.asarray(mask))) > 2:
        raise label_map_error("palette labels", indices)
    values = to_numeric_gray(mask)
    if values is None:
        # RGBA over black lets a transparent background count as background whatever its colour;
        # palette masks go through their colours, since the index order means nothing.
        rgba = np.asarray(mask.convert("RGBA"), dtype=np.float32)                # (H, W, 4)
        values = (rgba[..., :3] * rgba[..., 3:] / 255).max(axis=-1).round()    # (H, W)
    largest = values.max(initial=0)
    if largest <= 1:
        return values == 1  # a label map of 0 / 1, not a dark 8-bit picture
    if largest < 128:
        raise label_map_error("labels", np.unique(values).astype(np.int64))
    return values >= 128  # bright foreground; JPEG noise leaves values between 0 and 255


def read_binary_mask(path: Path, image: Path, image_size: tuple[int, int] | None) -> np.ndarray:
    """One mask file -> (H, W) bool; InputError naming it when it is unreadable, of another size than its
    image (image_size (W, H); None: the image is unreadable, sizes are not compared) or a label map."""
    mask = open_mask(path, image, image_size)
    try:
        return mask_to_binary(mask)
    except ValueError as err:
        raise InputError(f"mask {path} {err}. Make it binary or remove the case.") from err


def open_mask(path: Path, image: Path, image_size: tuple[int, int] | None) -> Image.Image:
    """The decoded mask file; InputError naming it when it is unreadable or of another size than its image."""
    mask = open_image(path)
    if image_size is not None and mask.size != image_size:
        raise InputError(f"image {image} is {image_size[0]}x{image_size[1]} but its mask {path} is "
                         f"{mask.size[0]}x{mask.size[1]}; expected the same size. Fix or remove this pair.")
    return mask


def mask_to_labels(mask: Image.Image) -> np.ndarray:
    """A label-map mask image -> (H, W) uint8, its values the classes; ValueError for what holds no class
    numbers (a colour or alpha image, a JPEG, float or negative values) or values above MAX_LABEL."""
    if mask.format == "JPEG":
        raise ValueError("is a JPEG, whose compression invents values between the labels: expected a lossless PNG "
                         "whose values are the classes 0..K-1")
    if mask.mode in ("1", "L", "P"):  # P: the palette index is the class, whatever its colour
        return np.asarray(mask, dtype=np.uint8)
    if mask.mode not in ("I", "I;16", "I;16B", "I;16L"):
        raise ValueError(f"has the mode {mask.mode}: with multiclass a mask is a label map whose values are the "
                         "classes; expected a gray (L) or palette (P) PNG of the values 0..K-1, not colours (convert "
                         "a colour-coded mask to class numbers first)")
    values = np.asarray(mask)
    if values.min(initial=0) < 0 or values.max(initial=0) > MAX_LABEL:
        raise ValueError(f"holds values {values.min()}..{values.max()}: expected labels 0..{MAX_LABEL}")
    return values.astype(np.uint8)


def read_label_map(path: Path, image: Path, image_size: tuple[int, int] | None) -> np.ndarray:
    """One label-map mask file -> (H, W) uint8 labels (mask_to_labels); InputError naming it when it is
    unreadable, of another size than its image (image_size as read_binary_mask's) or holds no class numbers."""
    mask = open_mask(path, image, image_size)
    try:
        return mask_to_labels(mask)
    except ValueError as err:
        raise InputError(f"mask {path} {err}. Save it as a label map or remove the case.") from err


def read_mask(case: Case, image_size: tuple[int, int]) -> np.ndarray:
    """The union of the case's masks, (H, W) bool; each must have the image's size (W, H)."""
    union = np.zeros(image_size[::-1], dtype=bool)  # PIL sizes are (W, H)
    for path in case.masks:
        union |= read_binary_mask(path, case.image, image_size)
    return union


def read_labels(case: Case, image_size: tuple[int, int]) -> np.ndarray:
    """The case's label map, (H, W) uint8, at the image's size (W, H)."""
    assert len(case.masks) == 1, "multiclass datasets (folder) pair one mask with each image"
    return read_label_map(case.masks[0], case.image, image_size)


def case_problems(case: Case, multiclass: bool = False) -> list[str]:
    """What makes a case unusable, one line per bad file; [] when __getitem__ can read it."""
    problems, size = [], None
    try:
        size = checked_size(case.image)
    except InputError as error:
        problems.append(str(error))
    for path in case.masks:
        try:
            (read_label_map if multiclass else read_binary_mask)(path, case.image, size)
        except InputError as error:
            problems.append(str(error))
    return problems


def augmentation_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one item's augmentation: (seed, epoch, index) hashed by numpy's SeedSequence, so
    neighbouring triples give unrelated draws, and nothing else (no global or per-worker RNG) enters."""
    # SeedSequence takes non-negative integers only, and --seed may be negative.
    state = np.random.SeedSequence([seed % 2**64, epoch, index]).generate_state(1)  # one uint32
    return torch.Generator().manual_seed(int(state[0]))


def random_symmetry(image: torch.Tensor, mask: torch.Tensor,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random rotation by k * 90 degrees and flips for image (3, S, S) and mask (1, S, S)."""
    turns, dims = draw_symmetry(generator)
    image, mask = image.rot90(turns, (1, 2)), mask.rot90(turns, (1, 2))
    if dims:
        image, mask = image.flip(dims), mask.flip(dims)
    return image.contiguous(), mask.contiguous()


def draw_symmetry(generator: torch.Generator) -> tuple[int, list[int]]:
    """A random symmetry of the square as (quarter turns from axis 1 towards axis 2, axes to flip after), of a
    (C, S, S) array."""
    turns = int(torch.randint(4, (), generator=generator))
    flip_horizontal, flip_vertical = (torch.rand(2, generator=generator) < 0.5).tolist()
    return turns, [d for d, flip in ((2, flip_horizontal), (1, flip_vertical)) if flip]


def resized_rgb(rgb: Image.Image, img_size: int) -> torch.Tensor:
    """An RGB PIL image -> (3, S, S) float in [0, 1] at S = img_size. PIL's bilinear antialiases when
    shrinking (ISIC images are ~4000 px wide). Training data and new images (prediction.py) both pass here."""
    resized = np.array(rgb.resize((img_size, img_size), Image.Resampling.BILINEAR))   # (S, S, 3)
    return torch.from_numpy(resized).permute(2, 0, 1).float() / 255                  # (3, S, S)


def make_item(image: torch.Tensor, mask: torch.Tensor, name: str,
              augmentation: torch.Generator | None) -> dict:
    """image (3, S, S) in [0, 1], mask (1, S, S) in {0, 1} -> the dataset item, augmented by a random
    symmetry drawn from `augmentation` (None: as it is)."""
    if augmentation is not None:
        image, mask = random_symmetry(image, mask, augmentation)
    return {"image": normalize(image), "mask": mask, "name": name}


def normalize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] -> (rgb - mean) / std with ImageNet's mean and std, once."""
    return (image - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """The inverse of normalize: an item's (3, H, W) image -> RGB in [0, 1]."""
    return image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """A batch on its device: uint8 RGB (B, 3, H, W) of raw items (EpochItems) -> normalize(images / 255), the
    float32 operations of an item's, done there; float batches (normalised items, volumes) as they are."""
    if images.dtype != torch.uint8:
        return images
    mean, std = imagenet_statistics(images.device)
    return (images.float() / 255 - mean) / std


@functools.cache
def imagenet_statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std as (1, 3, 1, 1) tensors on `device`, copied there once (a copy from the host per
    step would wait for the GPU's queue)."""
    return (torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(device),
            torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).to(device))


# ---------------------------------------------------------------------------------------------
# The decoded-once cache of 2D cases (the module docstring says what it holds and when it is rebuilt)


class CachedCases:
    """An open cache file: `pixels` (N, 4, S, S) uint8 memory-mapped, the row of each case name and its stamp,
    and the file's CRC-32. The map is copy-on-write, so torch.from_numpy takes it without a warning and nothing
    ever reaches the file. Pickled (to a DataLoader worker that spawn or forkserver starts; fork shares the map as
    it is), it maps the file again only while the file keeps that checksum: one another build replaced is not
    used, and that process reads its cases from their files."""

    def __init__(self, path: Path, pixels: np.ndarray, names: list[str], stamps: list[str], crc: str, start: int):
        self.path, self.pixels, self.names, self.stamps, self.crc = path, pixels, names, stamps, crc
        self.start = start
        self.rows = {name: row for row, name in enumerate(names)}

    def row_of(self, name: str, stamp: str | None) -> int | None:
        """The row of case `name` when it was decoded from files of this stamp (file_stamp), else None."""
        row = self.rows.get(name)
        return row if row is not None and stamp is not None and self.stamps[row] == stamp else None

    def row(self, row: int) -> np.ndarray | None:
        """One row of the map, (4, S, S) uint8 (a view: copy it before use); None when this process could not
        map the file again."""
        return None if self.pixels is None else self.pixels[row]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "pixels": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        try:
            header, start = read_cache_header(self.path)
            if header["__metadata__"][CHECKSUM] == self.crc and start == self.start:
                self.pixels = map_pixels(self.path, start, tuple(header[PIXELS]["shape"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass


def cache_paths(name: str, root_dir: Path, img_size: int, multiclass: bool = False) -> tuple[Path, Path]:
    """Where the cache of a 2D dataset at img_size may be: in its root, else (a read-only dataset folder) under
    $LLM4SEG_CACHE or ~/.cache/llm4seg, named after the root's absolute path too; label maps (multiclass) in
    files of their own, so a root's binary and multi-class caches never replace each other."""
    fallback = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llm4seg") / "images"
    key = hashlib.sha1(str(root_dir.resolve()).encode()).hexdigest()[:12]
    stem = f"{name}_{img_size}px{'_labels' if multiclass else ''}"
    return root_dir / CACHE_FOLDER / f"{stem}.safetensors", fallback / f"{stem}_{key}.safetensors"


def mask_kind(multiclass: bool) -> str:
    """The cache metadata's "mask": what channel 3 holds."""
    return "labels" if multiclass else "binary"


def case_stamp(case: Case) -> str | None:
    """The sizes and modification times of a case's files (volumes.nifti.file_stamp); None when one is missing."""
    try:
        return file_stamp(case.image, *case.masks)
    except OSError:
        return None


def read_cache_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (JSON) and where its data begin."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or not 2 <= length <= MAX_HEADER_BYTES:
            raise ValueError(f"its first 8 bytes give no header length ({prefix.hex() or 'the file is empty'})")
        text = f.read(length)
    if len(text) < length:
        raise ValueError(f"it ends inside its {length}-byte header")
    return json.loads(text), 8 + length


def map_pixels(path: Path, start: int, shape: tuple[int, ...]) -> np.ndarray:
    if math.prod(shape) == 0:
        return np.zeros(shape, np.uint8)  # mmap cannot map 0 bytes
    return np.memmap(path, np.uint8, "c", offset=start, shape=shape)


def pixels_crc32(pixels: np.ndarray, metadata: dict[str, str]) -> str:
    """volumes.nifti's checksum (tensors_crc32) of the pixels and every metadata value but the checksum."""
    return tensors_crc32({PIXELS: torch.from_numpy(pixels)}, {k: v for k, v in metadata.items() if k != CHECKSUM})


def open_cache(path: Path, img_size: int, multiclass: bool = False) -> CachedCases | None:
    """The cache file at path, checked against its checksum; None when it is absent, or unusable, which is
    printed in one line (cut short, corrupt, another img_size, format or kind of mask): it is then rebuilt."""
    if not path.is_file():
        return None
    try:
        header, start = read_cache_header(path)
        metadata = header["__metadata__"]
        if metadata.get("format") != CACHE_FORMAT:
            raise ValueError(f"its format is {metadata.get('format')!r}, expected {CACHE_FORMAT!r}")
        if metadata.get("img_size") != str(img_size):
            raise ValueError(f"it holds {metadata.get('img_size')} px images, expected {img_size} px")
        # A file written before label maps existed has no "mask" and holds binary masks.
        if (kind := metadata.get("mask", mask_kind(False))) != mask_kind(multiclass):
            raise ValueError(f"its masks are {kind}, expected {mask_kind(multiclass)}")
        names, stamps = json.loads(metadata["names"]), json.loads(metadata[STAMP])
        shape, entry = (len(names), 4, img_size, img_size), header[PIXELS]
        if entry != {"dtype": "U8", "shape": list(shape), "data_offsets": [0, math.prod(shape)]} or \
                len(stamps) != len(names):
            raise ValueError(f"its tensor is {entry}, expected {len(names)} rows of uint8 (4, {img_size}, {img_size})")
        if path.stat().st_size != start + math.prod(shape):
            raise ValueError(f"it is {path.stat().st_size} bytes, expected {start + math.prod(shape)}")
        pixels = map_pixels(path, start, shape)
        if (crc := pixels_crc32(pixels, metadata)) != metadata[CHECKSUM]:
            raise ValueError(f"its CRC-32 is {crc}, expected {metadata[CHECKSUM]}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:  # derived data: rebuild, never stop
        print(f"data: the cache {path} is unusable ({error}); rebuilding it")
        return None
    return CachedCases(path, pixels, names, stamps, metadata[CHECKSUM], start)


def cache_cases(datasets: list["SegmentationFiles"]) -> dict[Case, list[str]]:
    """Bring the cache of each dataset up to date and attach the dataset to it; datasets sharing a cache (a
    run's train and val) are one build. Returns the problems (case_problems' lines) of every case the caches
    vouch for: [] for a row written from the case's current files, found here for each case decoded here."""
    groups: dict[tuple, list[SegmentationFiles]] = {}
    for dataset in datasets:
        if dataset.cache_paths:
            groups.setdefault((dataset.cache_paths, dataset.img_size, dataset.multiclass), []).append(dataset)
    checked = {}
    for (paths, img_size, multiclass), members in groups.items():
        cases = list(dict.fromkeys(case for dataset in members for case in dataset.cases))
        stamps = {case: case_stamp(case) for case in cases}
        cache, decoded = update_cache(paths, cases, img_size, stamps, multiclass)
        for dataset in members:
            dataset.attach(cache, stamps)
        vouched = [case for case in cases if cache is not None and cache.row_of(case.name, stamps[case]) is not None]
        checked |= {case: [] for case in vouched} | decoded
    return checked


def update_cache(paths: tuple[Path, ...], cases: list[Case], img_size: int, stamps: dict[Case, str | None],
                 multiclass: bool = False) -> tuple[CachedCases | None, dict[Case, list[str]]]:
    """The first usable cache file of `paths` when it holds every case as its files now are; otherwise a new one
    holding the old file's rows (but the cases decoded again) and every case decoded here but the unusable
    ones, written at the first of `paths` that can be written. Returns it (the old one, or None, when none can
    be written) and the problems of each case decoded here. multiclass: the masks are label maps."""
    old = None
    for path in paths:
        if (old := open_cache(path, img_size, multiclass)) is not None:
            break
    todo = [case for case in cases if old is None or old.row_of(case.name, stamps[case]) is None]
    if not todo:
        return old, {}
    changed = [case.name for case in todo if old is not None and case.name in old.rows]
    if changed:
        print(f"data: {len(changed)} cases changed since {old.path} was written (first: {changed[0]}); "
              "decoding them again")
    again = {case.name for case in todo}
    kept = [] if old is None else [row for row, name in enumerate(old.names) if name not in again]
    decoded: dict[Case, list[str]] = {}
    written = write_cache(paths, img_size, old, kept, todo, stamps, decoded, multiclass)
    return (open_cache(written, img_size, multiclass) if written is not None else None) or old, decoded


def write_cache(paths: tuple[Path, ...], img_size: int, old: CachedCases | None, kept: list[int], todo: list[Case],
                stamps: dict[Case, str | None], decoded: dict[Case, list[str]],
                multiclass: bool = False) -> Path | None:
    """Write the cache at the first of `paths` that can be written (files.write_atomically: two runs building
    it at once each rename a whole file into place, the last one stays); the path, or None (printed) when
    none can. `decoded` receives each case's problems as it is decoded."""
    reasons, start = [], time.perf_counter()
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path.parent)
            write_atomically(path, partial(fill_cache, img_size=img_size, old=old, kept=kept, todo=todo,
                                           stamps=stamps, decoded=decoded, multiclass=multiclass))
        except WriteError as error:  # a full disk: the cases decoded so far are checked, check_cases reads the rest
            print(f"data: not caching the decoded images ({error}); each is decoded from its files every epoch")
            return None
        except OSError as error:  # a read-only folder, a file where the folder would go
            reasons.append(f"{path.parent}: {error.strerror or error}")
            continue
        if reasons:
            print(f"data: cannot write the cache in {reasons[0]}; caching in {path.parent}")
        added = len(todo) - sum(bool(problems) for problems in decoded.values())
        print(f"data: decoded {added} cases in {time.perf_counter() - start:.1f} s into the cache {path} "
              f"({len(kept) + added} cases at {img_size} px, {path.stat().st_size / 1e6:.0f} MB)")
        return path
    print(f"data: cannot write a cache ({'; '.join(reasons)}); each image is decoded from its files every epoch")
    return None


def fill_cache(temporary: Path, img_size: int, old: CachedCases | None, kept: list[int], todo: list[Case],
               stamps: dict[Case, str | None], decoded: dict[Case, list[str]], multiclass: bool = False) -> None:
    """The cache file's bytes: the header's room (the longest it can be, every case decoded), the old file's
    `kept` rows copied, the rows of the cases of `todo` that decode, then the header written into its room."""
    names, rows_stamps = [old.names[row] for row in kept], [old.stamps[row] for row in kept]
    room = len(cache_header(img_size, names + [case.name for case in todo],
                            rows_stamps + [stamps[case] or "" for case in todo], "0" * 8, multiclass=multiclass))
    with open(temporary, "wb") as f:
        f.write(b" " * room)
        for row in kept:
            f.write(old.pixels[row])
        for case, (pixels, problems) in zip(todo, decoded_cases(todo, img_size, multiclass), strict=True):
            decoded[case] = problems
            if pixels is not None:
                f.write(pixels.numpy())
                names.append(case.name)
                rows_stamps.append(stamps[case])
    metadata = cache_metadata(img_size, names, rows_stamps, "", multiclass)
    crc = pixels_crc32(map_pixels(temporary, room, (len(names), 4, img_size, img_size)), metadata)
    with open(temporary, "r+b") as f:
        f.write(cache_header(img_size, names, rows_stamps, crc, room, multiclass))


def cache_metadata(img_size: int, names: list[str], stamps: list[str], crc: str,
                   multiclass: bool = False) -> dict[str, str]:
    return {"format": CACHE_FORMAT, "img_size": str(img_size), "mask": mask_kind(multiclass),
            "names": json.dumps(names), STAMP: json.dumps(stamps), CHECKSUM: crc}


def cache_header(img_size: int, names: list[str], stamps: list[str], crc: str, length: int | None = None,
                 multiclass: bool = False) -> bytes:
    """The safetensors header of a cache file: its length (8 bytes, little-endian), then the JSON padded with
    spaces to `length` bytes in all (default: a multiple of 8, as safetensors aligns its own)."""
    shape = [len(names), 4, img_size, img_size]
    text = json.dumps({PIXELS: {"dtype": "U8", "shape": shape, "data_offsets": [0, math.prod(shape)]},
                       "__metadata__": cache_metadata(img_size, names, stamps, crc, multiclass)}).encode()
    length = length or (8 + len(text) + 7) // 8 * 8
    assert 8 + len(text) <= length, "the header outgrew the room written for it"
    return (length - 8).to_bytes(8, "little") + text.ljust(length - 8)


def decoded_cases(cases: list[Case], img_size: int, multiclass: bool = False):
    """(pixels (4, S, S) uint8 tensor or None, problems) of each case, in order, with a progress bar; in
    BUILD_PROCESSES worker processes when there are at least PARALLEL_BUILD cases."""
    processes = BUILD_PROCESSES if len(cases) >= PARALLEL_BUILD else 0
    loader = DataLoader(CaseDecoder(cases, img_size, multiclass), batch_size=None, num_workers=processes)
    return tqdm(loader, total=len(cases), desc=f"caching {img_size} px images", unit="case", leave=False,
                disable=None)


class CaseDecoder(Dataset):
    """Item i: (decode_case of case i, []), or (None, its problems) when a file of it is unusable."""

    def __init__(self, cases: list[Case], img_size: int, multiclass: bool = False):
        self.cases, self.img_size, self.multiclass = cases, img_size, multiclass

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tuple[np.ndarray | None, list[str]]:
        try:
            return decode_case(self.cases[index], self.img_size, self.multiclass), []
        except InputError:
            return None, case_problems(self.cases[index], self.multiclass)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporaries (files.write_atomically's `.<name>.<pid>.tmp`, as large as a cache) that a killed
    build left: those untouched for STALE_TEMPORARY_S. Not by process id: a live build writes its temporary every
    few milliseconds, and on a file system that several machines share, a process id names nothing."""
    for temporary in folder.glob(".*.tmp"):
        try:
            if time.time() - temporary.stat().st_mtime > STALE_TEMPORARY_S:
                temporary.unlink()
        except OSError:
            pass  # gone already (another run removed it), or not ours to remove


class SegmentationFiles(Dataset):
    """Cases read from disk, resized to img_size x img_size. When `augment`, item i of epoch `epoch` (set by
    train.py) gets the symmetry drawn from (seed, epoch, i). check_cases attaches the dataset to its cache (the
    first of `cache_paths` that is usable or can be written): items are then read from the memory-mapped file;
    before that, and for a case the cache lacks, from the case's files. Either way an item is the same.
    multiclass: the masks are label maps, items' masks int64 labels; else binary, float32 0 / 1."""

    def __init__(self, cases: list[Case], img_size: int, seed: int, augment: bool, cache_paths: tuple[Path, ...] = (),
                 multiclass: bool = False):
        self.cases, self.img_size, self.seed, self.augment = cases, img_size, seed, augment
        self.cache_paths, self.multiclass = cache_paths, multiclass
        self.epoch = 0
        self.cache: CachedCases | None = None
        self.rows: list[int | None] = [None] * len(cases)  # each case's row in the cache

    def attach(self, cache: CachedCases | None, stamps: dict[Case, str | None]) -> None:
        """Read the cases from `cache` where it holds them as decoded from files of these stamps."""
        self.cache = cache
        self.rows = [None if cache is None else cache.row_of(case.name, stamps[case]) for case in self.cases]

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        item = self.raw_item(index)
        mask = item["mask"].long() if self.multiclass else item["mask"].float()
        return {"image": normalize(item["image"].float() / 255), "mask": mask, "name": item["name"]}

    def raw_item(self, index: int) -> dict:
        """Item `index` before normalisation: image (3, S, S) uint8 RGB, mask (1, S, S) uint8 0 / 1 (multiclass:
        the labels), augmented as __getitem__'s are. train.py's loader reads these (EpochItems) and normalises on
        the device (normalize_batch): a quarter of the bytes through the worker queues, no float work in the
        workers; its losses take the uint8 masks as they are (segmentation_loss)."""
        case, row = self.cases[index], self.rows[index]
        pixels = self.cache.row(row) if row is not None else None
        if pixels is None:
            pixels = decode_case(case, self.img_size, self.multiclass)           # (4, S, S)
        if self.augment:
            # random_symmetry's draw, applied as numpy views: the copy out of the map below is the only one.
            turns, dims = draw_symmetry(augmentation_generator(self.seed, self.epoch, index))
            pixels = np.flip(np.rot90(pixels, turns, axes=(1, 2)), dims)
        pixels = torch.from_numpy(np.array(pixels, order="C"))                   # (4, S, S), a copy
        return {"image": pixels[:3], "mask": pixels[3:], "name": case.name}      # (3, S, S), (1, S, S)


# ---------------------------------------------------------------------------------------------
# Synthetic cases, generated per index from (seed, index), no files: polyps (synthetic.py draws them)
# or blob volumes (volumes.py draws them)


class SyntheticCases(Dataset):
    """`length` scenes of dataset `name` ("synthetic" or "synthetic3d") with global indices first_index..;
    scene i depends only on (seed, i). Polyps are augmented when `augment`, scene i in epoch `epoch` (set by
    train.py) by the symmetry drawn from (seed, epoch, i); volumes are not, and carry a 1 mm spacing."""

    def __init__(self, name: str, length: int, first_index: int, img_size: int, seed: int, augment: bool):
        self.name, self.length, self.first_index = name, length, first_index
        self.img_size, self.seed, self.augment = img_size, seed, augment
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} {self.name} cases")
        scene = self.first_index + index
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + scene)
        if self.name == "synthetic3d":
            image, mask = draw_blob_volume(self.img_size, generator)
            return {"image": image, "mask": mask, "name": f"synthetic3d_{scene:05d}",
                    "spacing": torch.ones(3, dtype=torch.float64)}
        image, mask = draw_polyp_scene(self.img_size, generator)
        # Its own generator: the scene stays the same whatever the epoch.
        augmentation = augmentation_generator(self.seed, self.epoch, scene) if self.augment else None
        return make_item(image, mask, f"synthetic_{scene:05d}", augmentation)


def synthetic_range(split: str, total: int) -> tuple[int, int]:
    """(first index, length) of a split of `total` generated cases: consecutive index ranges per split, so
    the splits are disjoint by construction."""
    val, test = (ceil_count(fraction, total) for fraction in SYNTHETIC_FRACTIONS)
    ranges = {"train": (0, total - val - test), "val": (total - val - test, val),
              "test": (total - test, test)}
    first, length = ranges[split]
    if length < 1:
        raise ValueError(f"synthetic_size={total} leaves no {split} cases; expected at least 3")
    return first, length


def synthetic_split(name: str, split: str, total: int, img_size: int, seed: int) -> SyntheticCases:
    first, length = synthetic_range(split, total)
    return SyntheticCases(name, length, first, img_size, seed, augment=split == "train")


# ---------------------------------------------------------------------------------------------
# train.py's training loader: workers that live across epochs


class EpochOrder(Sampler):
    """The training order as (index, epoch) keys: `order`'s indices (a DistributedSampler) for the epoch that
    start(epoch, skip) set, less the first `skip` (trained before a resume). A DataLoader worker that lives
    across epochs (persistent_workers) keeps the copy of the dataset it started with, so an epoch set on the
    main process's dataset would never reach it; each key carries its epoch instead, to EpochItems."""

    def __init__(self, order: DistributedSampler):
        self.order, self.epoch, self.skip = order, 0, 0

    def start(self, epoch: int, skip: int = 0) -> None:
        self.order.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        epoch = self.epoch  # bound now: the DataLoader draws keys ahead, while the epoch runs
        return iter([(index, epoch) for index in list(self.order)[self.skip:]])

    def __len__(self) -> int:
        return max(len(self.order) - self.skip, 0)


class EpochItems(Dataset):
    """A dataset read by (index, epoch) keys (EpochOrder): its `epoch` set in this process's copy, then item
    `index`. raw: a 2D dataset read from files gives raw_item's uint8 images for normalize_batch on the device;
    the others (generated, volumes) give their items as they are."""

    def __init__(self, dataset: Dataset, raw: bool = True):
        self.dataset, self.raw = dataset, raw  # raw=False: every item as dataset[index] gives it

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        self.dataset.epoch = epoch
        if self.raw and isinstance(self.dataset, SegmentationFiles):
            return self.dataset.raw_item(index)
        return self.dataset[index]


def default_root(name: str) -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV, "data")) / name


# ---------------------------------------------------------------------------------------------
# Splits: authors' lists, or a seeded split written once as JSON and reused


def ceil_count(fraction: float, total: int) -> int:
    """ceil(fraction * total) without float noise: 0.3 * 10 is 3.0000000000000004, not 4 cases."""
    return math.ceil(round(fraction * total, 9))


def seeded_split(names: list[str], val_fraction: float, test_fraction: float,
                 seed: int) -> dict[str, list[str]]:
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [names[i] for i in order]
    test, val = ceil_count(test_fraction, len(names)), ceil_count(val_fraction, len(names))
    return {"train": sorted(shuffled[test + val:]), "val": sorted(shuffled[test:test + val]),
            "test": sorted(shuffled[:test])}


def cross_validation_fold(splits: dict[str, list[str]], fold: int, seed: int) -> dict[str, list[str]]:
    """Fold `fold` of FOLDS on the cases outside the test split: they are shuffled by `seed` and cut in
    FOLDS near-equal parts; part `fold` is val, the others train. The test split is kept as it is, so
    every fold is scored on the same held-out cases (MedVisionLlama: 5-fold CV on 90 %, 10 % test)."""
    rest = sorted(splits["train"] + splits["val"])
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed)).tolist()
    parts = np.array_split(np.array(order), FOLDS)
    val = {rest[i] for i in parts[fold]}
    return {"train": [n for n in rest if n not in val], "val": sorted(val), "test": splits["test"]}


def read_case_list(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    # Accept ids written with their file extension, too.
    return [n[:-len(Path(n).suffix)] if Path(n).suffix.lower() in IMAGE_EXTENSIONS else n
            for n in names]


def find_author_lists(name: str, folders: list[Path]) -> tuple[Path, Path] | None:
    """The authors' <name>_train[1].txt + <name>_val[1].txt in the given folders (any name for
    the generic `folder` dataset)."""
    prefix = "*" if name == "folder" else name
    pairs = set()
    for folder in folders:
        for suffix in ("", "1"):
            for train in folder.glob(f"{prefix}_train{suffix}.txt"):
                val = train.with_name(train.name.replace(f"_train{suffix}.txt", f"_val{suffix}.txt"))
                if val.is_file():
                    pairs.add((train, val))
    if len(pairs) > 1:
        raise ValueError(f"found several split lists {sorted(str(t) for t, _ in pairs)}; expected "
                         "one pair. Remove the others or pass split_file=...")
    return pairs.pop() if pairs else None


def write_json_atomically(path: Path, content: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(content, indent=1)))
    except OSError as err:
        raise OSError(f"cannot write the split file {path}: {err}. Pass split_file=<a writable "
                      "path> to keep it elsewhere.") from err


def split_from_json(name: str, found: list[str], path: Path, must_cover: bool, seed: int,
                    val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    """The split stored at path, or a new seeded one written there. A file we wrote covers every
    case (must_cover); one the user wrote may choose a subset, which the log line counts."""
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            splits = {split: [str(n) for n in stored.get(split, [])] for split in SPLITS}
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as err:
            raise InputError(f"split file {path} is unreadable ({err}); expected JSON like "
                             '{"train": [ids], "val": [ids], "test": [ids]}. Fix or delete it.') from err
    else:
        splits = seeded_split(found, val_fraction, test_fraction, seed)
        write_json_atomically(path, {"dataset": name, "seed": seed, "val_fraction": val_fraction,
                                     "test_fraction": test_fraction, **splits})
    unassigned = sorted(set(found) - {n for split in SPLITS for n in splits[split]})
    if unassigned and must_cover:
        raise ValueError(f"{len(unassigned)} cases in the data are in no split of {path} "
                         f"(first: {', '.join(unassigned[:5])}); the data changed since it was "
                         "written. Delete it to split again.")
    return splits
