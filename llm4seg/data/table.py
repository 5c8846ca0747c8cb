"""The dataset table: one row per dataset (DatasetRow: 2D or 3D, channels, classes, patches or whole images,
generated or read from files) and the function that opens one split of it, load_dataset's Request in, a torch
Dataset out. The package's docstring says what each dataset's items and splits are.

    DATASET_TABLE[name] = DatasetRow(open, spatial_dims, channels, classes, patches, generated)
    open_raw          the 2D datasets as their owners ship them (images/raw_layouts.py), Kvasir-SEG downloaded
    open_msd          a Medical Segmentation Decathlon task (volumes/msd.py)
    open_btcv         BTCV with UNETR's preprocessing (volumes/btcv.py), random patches for training
    open_generated    synthetic polyps and synthetic3d blob volumes (generated.py)
    open_organs       synthetic-organs, random patches for training (generated.py)
Adding a dataset is a row, and an opener unless one of these fits; the name lists other modules read
(VOLUME_DATASETS, PATCH_DATASETS, ...) are the table's columns.
"""
import os
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from .generated import ORGAN_CLASSES, SyntheticOrgans, synthetic_range, synthetic_split
from .images.cache import SegmentationFiles, cache_paths
from .images.raw_layouts import RAW_DATASETS, download_kvasir, missing_dataset
from .images.read import augmentation_generator
from .splits import FOLDS, SPLITS, cross_validation_fold, find_author_lists, read_case_list, split_from_json
from .volumes import BTCVVolumes, MSDVolumes, RandomPatches, find_btcv, msd_cases, msd_labels

MSD_FRACTIONS = (0.2, 0.1)  # (val, test) of all cases: MedVisionLlama's 70 / 20 / 10
DATA_ROOT_ENV = "LLM4SEG_DATA"  # parent folder of every dataset's default root, ./data when unset


# ---------------------------------------------------------------------------------------------
# The dataset table: one row per dataset, its facts and the function that opens one of its splits


@dataclass(frozen=True)
class Request:
    """load_dataset's arguments, as an opener reads them."""
    name: str
    root: str | None
    split: str
    img_size: int
    seed: int
    include_normal: bool
    val_fraction: float | None
    test_fraction: float | None
    split_file: str | None
    use_author_lists: bool
    synthetic_size: int
    download: bool
    fold: int | None
    label: int | None
    multiclass: bool
    roi_size: int
    samples_per_volume: int

    @property
    def root_dir(self) -> Path:
        return Path(self.root) if self.root is not None else default_root(self.name)


@dataclass(frozen=True)
class DatasetRow:
    """One row of DATASET_TABLE. Adding a dataset is a row and, unless an opener below fits, an opener."""
    open: Callable[[Request], Dataset]   # the split the request names
    spatial_dims: int = 2                # 2: items (C, H, W); 3: (C, X, Y, Z) volumes
    channels: int = 3                    # the images' channels (msd: its dataset.json's modalities instead)
    classes: str = "binary"              # "binary" (one sigmoid logit), "labels" (label maps, always), or
    #                                      "either" (label maps with multiclass=True, binary without)
    patches: bool = False                # trained on random crops, evaluated whole by sliding windows
    generated: bool = False              # drawn from (seed, index): fixed splits, no files

    @property
    def holds(self) -> str:
        """What its items are, in messages: "2D images" or "3D volumes"."""
        return "3D volumes" if self.spatial_dims == 3 else "2D images"


def open_generated(request: Request) -> Dataset:
    """synthetic (polyps) and synthetic3d (blob volumes): drawn from (seed, index), split by index."""
    dataset = synthetic_split(request.name, request.split, request.synthetic_size, request.img_size, request.seed)
    print(f"{request.name} {request.split}: {len(dataset)} generated cases (seed {request.seed}, {request.img_size} px)")
    return dataset


def open_organs(request: Request) -> Dataset:
    """synthetic-organs: generated multi-organ volumes; the train split as random patches of them."""
    name, split, size = request.name, request.split, request.img_size
    first, length = synthetic_range(split, request.synthetic_size)
    volumes = SyntheticOrgans(length, first, size, request.seed)
    print(f"{name} {split}: {length} generated volumes (seed {request.seed}, {size}^3 voxels, "
          f"{len(ORGAN_CLASSES)} classes){patches_note(split, request.roi_size, request.samples_per_volume, length)}")
    if split != "train":
        return volumes
    patches = RandomPatches(name, volumes, request.roi_size, request.samples_per_volume,
                            partial(augmentation_generator, request.seed))
    patches.note_shapes([(f"{name}_{first + i:05d}", [size] * 3) for i in range(length)])
    return patches


def open_btcv(request: Request) -> Dataset:
    """btcv: its layouts, official split and preprocessing (load_btcv, volumes/btcv.py)."""
    return load_btcv(request.root_dir, request.split, request.seed, request.split_file, request.fold,
                     request.val_fraction, request.test_fraction, request.roi_size, request.samples_per_volume)


def open_msd(request: Request) -> Dataset:
    """msd: the cases its dataset.json lists, z-scored volumes resized to img_size^3, cached beside the task."""
    root_dir = request.root_dir
    cases, channels = msd_cases(root_dir)
    chosen = choose_cases(request, root_dir, root_dir, cases, MSD_FRACTIONS)
    variant = "_multiclass" if request.multiclass else "" if request.label is None else f"_label{request.label}"
    classes = len(msd_labels(root_dir)) if request.multiclass else None
    cache = root_dir / "llm4seg_cache" / f"{request.img_size}px{variant}"
    return MSDVolumes(chosen, request.img_size, channels, request.label, cache, classes)


def open_raw(request: Request) -> Dataset:
    """A 2D dataset as its owners ship it (images/raw_layouts.py), found anywhere under the root; Kvasir-SEG downloaded
    when the root is absent or empty."""
    raw, root_dir = RAW_DATASETS[request.name], request.root_dir
    data_dir = raw.locate(root_dir)
    if data_dir is None and request.name == "kvasir" and request.download and \
            (not root_dir.exists() or not any(root_dir.iterdir())):
        download_kvasir(root_dir)
        data_dir = raw.locate(root_dir)
    if data_dir is None:
        raise missing_dataset(request.name, root_dir,
                              f"default root: ${DATA_ROOT_ENV}/{request.name}, or ./data/{request.name} when unset")
    chosen = choose_cases(request, root_dir, data_dir, raw.cases(root_dir, data_dir, request.include_normal),
                          raw.fractions)
    return SegmentationFiles(chosen, request.img_size, request.seed, augment=request.split == "train",
                             cache_paths=cache_paths(request.name, root_dir, request.img_size, request.multiclass),
                             multiclass=request.multiclass)


# The owners' 2D datasets (the images/ package), the generated polyps, and the 3D ones (the volumes/ package).
DATASET_TABLE = {
    **{name: DatasetRow(open_raw, classes="either" if name == "folder" else "binary") for name in RAW_DATASETS},
    "synthetic": DatasetRow(open_generated, generated=True),
    "msd": DatasetRow(open_msd, spatial_dims=3, channels=1, classes="either"),
    "synthetic3d": DatasetRow(open_generated, spatial_dims=3, channels=1, generated=True),
    "btcv": DatasetRow(open_btcv, spatial_dims=3, channels=1, classes="labels", patches=True),
    "synthetic-organs": DatasetRow(open_organs, spatial_dims=3, channels=1, classes="labels", patches=True,
                                   generated=True),
}
# The table's columns as the name lists other modules read.
DATASETS = tuple(DATASET_TABLE)
VOLUME_DATASETS = tuple(name for name, row in DATASET_TABLE.items() if row.spatial_dims == 3)
GENERATED_DATASETS = tuple(name for name, row in DATASET_TABLE.items() if row.generated)
MULTICLASS_DATASETS = tuple(name for name, row in DATASET_TABLE.items() if row.classes == "labels")
LABEL_MAP_DATASETS = tuple(name for name, row in DATASET_TABLE.items() if row.classes == "either")
PATCH_DATASETS = tuple(name for name, row in DATASET_TABLE.items() if row.patches)


def choose_cases(request: Request, root_dir: Path, data_dir: Path, cases: list, fractions: tuple[float, float]) -> list:
    """The cases of the request's split among `cases` (found under data_dir), by the authors' lists, split_file or a
    seeded split written once (fractions: the dataset's default (val, test) of all cases); says which on stdout."""
    name, split = request.name, request.split
    splits, source = read_splits(request, root_dir, data_dir, sorted(case.name for case in cases), fractions)
    listed = Counter(n for s in SPLITS for n in splits[s])
    unknown = sorted(set(listed) - {case.name for case in cases})
    if unknown:
        raise ValueError(f"{len(unknown)} cases named in {source} are not in the data under "
                         f"{root_dir} (first: {', '.join(unknown[:5])}); expected every listed "
                         "case present.")
    hint = "; a held-out test set needs a test fraction > 0 (train.py --test-fraction 0.1)" if split == "test" else ""
    names, source = split_names(name, splits, split, request.fold, request.seed, source, hint)
    by_name = {case.name: case for case in cases}
    chosen = [by_name[n] for n in names]
    note = ""
    if name == "busi":
        note = "; normal cases included" if request.include_normal else \
            "; benign + malignant only, as the paper (include_normal=True adds the normal cases)"
    if len(listed) < len(cases):
        note += f"; {len(cases) - len(listed)} cases found are in no list and unused"
    if name == "folder" and request.multiclass:
        note += "; masks read as label maps (multiclass)"
    print(f"{name} {split}: {len(chosen)} cases from {data_dir}, split {source}{note}")
    return chosen


def read_splits(request: Request, root_dir: Path, data_dir: Path, found: list[str],
                fractions: tuple[float, float]) -> tuple[dict[str, list[str]], str]:
    """({split: case names}, where they come from): the authors' lists when present (and wanted), else the JSON
    split at split_file or beside the data, written on first use from a seeded split of `found`."""
    val_fraction = fractions[0] if request.val_fraction is None else request.val_fraction
    test_fraction = fractions[1] if request.test_fraction is None else request.test_fraction
    if not (0 < val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"expected 0 < val_fraction, 0 <= test_fraction and a sum below 1, got "
                         f"{val_fraction} and {test_fraction}")
    author_lists = find_author_lists(request.name, [root_dir, data_dir]) \
        if request.split_file is None and request.use_author_lists else None
    if author_lists is not None:
        source = f"the authors' lists {author_lists[0]} + {author_lists[1].name}"
        if request.include_normal or request.split == "test":
            raise ValueError(f"{source} define train / val of the paper's cases only; for "
                             f"{'normal cases' if request.include_normal else 'a test split'} pass "
                             "use_author_lists=False to split afresh")
        return {"train": read_case_list(author_lists[0]), "val": read_case_list(author_lists[1]), "test": []}, source
    default = root_dir / (f"llm4seg_split_{request.name}_seed{request.seed}_val{val_fraction:g}_test"
                          f"{test_fraction:g}{'_with_normal' if request.include_normal else ''}.json")
    path = Path(request.split_file) if request.split_file else default
    return split_from_json(request.name, found, path, path == default, request.seed, val_fraction,
                           test_fraction), str(path)


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
                         "--split-file <JSON of train / val / test case names>, not fractions")
    folder = find_btcv(root_dir, f"default root: ${DATA_ROOT_ENV}/btcv, or ./data/btcv when unset")
    splits, source = folder.splits, folder.source
    if split_file is not None:
        if not Path(split_file).is_file():
            raise FileNotFoundError(f"btcv: --split-file {split_file} does not exist; expected JSON "
                                    '{"train": [names], "val": [names], "test": [names]} (without --split-file the '
                                    "official split is used)")
        splits, source = split_from_json("btcv", [], Path(split_file), False, seed, 0, 0), split_file
    hint = ("; BTCV has no test split (the challenge's 20 test CTs have no public labels): evaluate on val, or "
            "pass --split-file <JSON with a test list>") if split == "test" else ""
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


def default_root(name: str) -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV, "data")) / name
