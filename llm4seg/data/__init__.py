"""Segmentation datasets: Kvasir-SEG, BUSI, ISIC 2018 and TN-SCUI read in their owners' raw layouts,
the authors' folder layout, and a synthetic polyp set that needs no files (the offline default); in 3D,
any Medical Segmentation Decathlon task, BTCV (abdomen CT, 14 classes), synthetic blob volumes and synthetic
multi-organ volumes. Images read from files are the images/ package's, volumes read from files the volumes/
package's (each package's __init__.py is its map), the generated data generated.py's. This package turns a
dataset name into a torch Dataset and owns the splits. In reading order:

    __init__.py          load_dataset (a DATASET_TABLE row's opener), check_cases, spatial_dims /
                         input_channels / num_classes / class_names (a multi-class folder's: folder_classes)
    table.py             the dataset table: one row per dataset, its facts and the opener of its splits
    images/              2D from files: the owners' layouts (raw_layouts.py), reading one case (read.py), the
                         decoded-once cache and SegmentationFiles (cache.py), a multi-class folder's classes
                         (classes.py)
    volumes/             3D from files: MSD tasks (msd.py), BTCV with UNETR's preprocessing (btcv.py), the
                         training split's random patches (patches.py), NIfTI reading and the volumes' cache
                         (nifti.py)
    generated.py         drawn from (seed, index) alone, no files: the synthetic polyps, synthetic3d's blob volumes,
                         synthetic-organs' abdomen, and the datasets serving them (SyntheticCases and one subclass each)
    cases.py             what images/ and volumes/ share: Case (a case's files), find_dir, and the stamp and
                         checksum of what is cached from a case's files (file_stamp, tensors_crc32)
    splits.py            the authors' lists, seeded splits written once as JSON, cross-validation folds
    loader.py            EpochOrder / EpochItems: train.py's loader, whose workers live across epochs

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

2D cases read from files are decoded once, by check_cases, into one memory-mapped cache file per
dataset root, size and kind of mask (images/cache.py's docstring: what it holds and when it is rebuilt).

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

Kvasir-SEG downloads itself when its folder is absent (images/raw_layouts.py's download_kvasir); the others need
an account with their owners, so a missing one raises an error saying where to get it and which
layout is expected.
"""
from pathlib import Path

from torch.utils.data import Dataset
from tqdm import tqdm

from ..files import InputError
from .generated import ORGAN_CLASSES, SyntheticCases
from .images.cache import (CACHE_FORMAT, STALE_TEMPORARY_S, SegmentationFiles, cache_cases, cache_paths,
                           map_pixels, open_cache, pixels_crc32, read_cache_header)
from .images.classes import label_values, named_classes
from .images.raw_layouts import RAW_DATASETS, missing_dataset
from .images.read import (IMAGENET_MEAN, IMAGENET_STD, as_rgb, augmentation_generator, case_problems, decode_image,
                          denormalize, make_item, mask_to_binary, normalize, normalize_batch, read_mask, read_rgb,
                          resized_rgb)
from .loader import EpochItems, EpochOrder
from .splits import FOLDS, SPLITS
from .table import (DATA_ROOT_ENV, DATASET_TABLE, DATASETS, GENERATED_DATASETS, LABEL_MAP_DATASETS,
                    MULTICLASS_DATASETS, PATCH_DATASETS, VOLUME_DATASETS, DatasetRow, Request, default_root)
from .volumes import BTCV_CLASSES, BTCVVolumes, MSDVolumes, RandomPatches, msd_cases, msd_labels

LISTED_PROBLEMS = 20  # check_cases names this many bad files, then counts the rest


# Every name other modules and the tests read from `data`. Patch a name in the module that looks it up:
# decode_case, BUILD_PROCESSES and PARALLEL_BUILD in data.images.cache, mask_to_labels in data.images.classes.
__all__ = ["DATASETS", "DATASET_TABLE", "DatasetRow", "Request", "VOLUME_DATASETS", "GENERATED_DATASETS",
           "MULTICLASS_DATASETS", "LABEL_MAP_DATASETS", "PATCH_DATASETS", "RAW_DATASETS", "DATA_ROOT_ENV",
           "LISTED_PROBLEMS", "check_dataset_name", "check_data_options", "load_dataset", "spatial_dims",
           "input_channels", "class_names", "num_classes", "check_cases", "IMAGENET_MEAN", "IMAGENET_STD",
           "CACHE_FORMAT", "STALE_TEMPORARY_S", "FOLDS", "SPLITS", "SegmentationFiles", "cache_paths", "map_pixels",
           "open_cache", "pixels_crc32", "read_cache_header", "as_rgb", "augmentation_generator", "decode_image",
           "denormalize", "make_item", "mask_to_binary", "normalize", "normalize_batch", "read_mask", "read_rgb",
           "resized_rgb", "EpochItems", "EpochOrder", "SyntheticCases"]


def check_dataset_name(name: str) -> None:
    """Cheap check for entry scripts to run before heavy work: raise on an unknown dataset name."""
    if name not in DATASET_TABLE:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASET_TABLE)}")


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


def check_request(request: Request) -> None:
    """load_dataset's checks of its arguments, before anything is read."""
    check_dataset_name(request.name)
    if request.split not in SPLITS:
        raise ValueError(f"unknown split {request.split!r}: expected one of {', '.join(SPLITS)}")
    if request.img_size < 1:
        raise ValueError(f"img_size must be positive, got {request.img_size}")
    if request.roi_size < 1 or request.samples_per_volume < 1:
        raise ValueError(f"roi_size and samples_per_volume must be positive, got {request.roi_size} and "
                         f"{request.samples_per_volume}")
    check_data_options(request.name, request.fold, request.label, request.multiclass)
    if request.include_normal and request.name != "busi" and not DATASET_TABLE[request.name].generated:
        raise ValueError(f"include_normal applies to busi only, got it for {request.name}")


# ---------------------------------------------------------------------------------------------
# The public entry point


def load_dataset(name: str, root: str | None = None, split: str = "train", img_size: int = 256,
                 seed: int = 41, *, include_normal: bool = False, val_fraction: float | None = None,
                 test_fraction: float | None = None, split_file: str | None = None,
                 use_author_lists: bool = True, synthetic_size: int = 300,
                 download: bool = True, fold: int | None = None, label: int | None = None,
                 multiclass: bool = False, roi_size: int = 96, samples_per_volume: int = 4) -> Dataset:
    """One split of a dataset: its DATASET_TABLE row's opener; see the module docstring for layouts, labels and
    splits.

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
    request = Request(name, root, split, img_size, seed, include_normal, val_fraction, test_fraction, split_file,
                      use_author_lists, synthetic_size, download, fold, label, multiclass, roi_size,
                      samples_per_volume)
    check_request(request)
    return DATASET_TABLE[name].open(request)


def spatial_dims(name: str) -> int:
    """3 for the volume datasets, 2 for the image ones."""
    return DATASET_TABLE[name].spatial_dims if name in DATASET_TABLE else 2


def input_channels(name: str, root: str | None = None) -> int:
    """The channels of a dataset's images, known before loading it (to build the model first): RGB in 2D,
    1 for synthetic3d, btcv (CT) and synthetic-organs, an MSD task's modalities."""
    check_dataset_name(name)
    if name == "msd":
        return msd_cases(Path(root) if root is not None else default_root(name))[1]
    return DATASET_TABLE[name].channels


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
    classes = DATASET_TABLE[name].classes  # the row, so a row added at run time counts too
    multiclass = classes == "labels" or (classes == "either" and options.get("multiclass", False))
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
        if isinstance(dataset, SyntheticCases):
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
