"""The datasets as their owners ship them: where each comes from, its layout, how its cases pair up.

RAW_DATASETS is the table: name -> RawDataset(source, layout, fractions, locate, cases).
    locate(root)                         the shallowest folder at or under `root` holding the layout
                                         (an archive may be unpacked anywhere under it), or None
    cases(root, data_dir, include_normal) every image paired with its mask(s), as Case records
A new 2D dataset is one entry there. Pairing is strict: an image without a mask, a mask without an
image, or two images of one id is an error naming the files, never skipped. Kvasir-SEG alone can
be downloaded without an account: download_kvasir fetches the owner's zip into a temp folder beside
the root, checks it holds KVASIR_PAIRS pairs, and renames it into place (nothing is left on failure).
"""
import http.client
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from ..cases import Case, find_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
KVASIR_URL = "https://datasets.simula.no/downloads/kvasir-seg.zip"
KVASIR_URL_ENV = "LLM4SEG_KVASIR_URL"
KVASIR_PAIRS = 1000  # image/mask pairs in the owner's zip; tests serve a smaller zip and patch this
ISIC_INPUT = "ISIC2018_Task1-2_Training_Input"
ISIC_GROUND_TRUTH = "ISIC2018_Task1_Training_GroundTruth"
BUSI_CLASSES = ("benign", "malignant", "normal")
BUSI_MASK = re.compile(r"^(?P<case>.+)_mask(_\d+)?$")


# ---------------------------------------------------------------------------------------------
# Pairing images and masks

def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder}; "
                                "expected the dataset's files there as unpacked")
    return files


def by_key(files: list[Path], key) -> dict[str, list[Path]]:
    keyed: dict[str, list[Path]] = {}
    for path in files:
        keyed.setdefault(key(path), []).append(path)
    return keyed


def pair_cases(images: dict[str, list[Path]], masks: dict[str, list[Path]],
               image_dir: Path, mask_dir: Path, several_masks: bool = False) -> list[Case]:
    """Match images to masks by case id; anything unmatched or ambiguous is an error, never
    skipped. several_masks: a case may have more than one mask (BUSI), united later."""
    def first(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")

    for kind, files, folder in (("image", images, image_dir), ("mask", masks, mask_dir)):
        duplicated = sorted(k for k, paths in files.items() if len(paths) > 1)
        if duplicated and not (kind == "mask" and several_masks):
            raise ValueError(f"{len(duplicated)} case ids in {folder} have more than one {kind} "
                             f"(first: {first(duplicated)}); expected one {kind} per case id. "
                             "Remove the extras.")
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    problems = []
    if no_mask:
        problems.append(f"{len(no_mask)} images in {image_dir} have no mask in {mask_dir} "
                        f"(first: {first(no_mask)})")
    if no_image:
        problems.append(f"{len(no_image)} masks in {mask_dir} have no image in {image_dir} "
                        f"(first: {first(no_image)})")
    if problems:
        raise ValueError("; ".join(problems) + ". Every case needs both: add the missing files or "
                         "remove the extras.")
    return [Case(key, images[key][0], tuple(sorted(masks[key]))) for key in sorted(images)]


def has_subdirs(*names: str):
    return lambda folder: all((folder / name).is_dir() for name in names)


def stem_pairs(image_dir: Path, mask_dir: Path, mask_suffix: str = "") -> list[Case]:
    """Pairs whose mask stem is the image stem plus mask_suffix."""
    def mask_key(path: Path) -> str:
        return path.stem[:-len(mask_suffix)] if mask_suffix and path.stem.endswith(mask_suffix) \
            else path.stem
    images = by_key(image_files(image_dir), lambda p: p.stem)
    return pair_cases(images, by_key(image_files(mask_dir), mask_key), image_dir, mask_dir)


# ---------------------------------------------------------------------------------------------
# Each dataset's cases


def busi_cases(root: Path, data_dir: Path, include_normal: bool) -> list[Case]:
    """Dataset_BUSI_with_GT/<class>/<case>.png with <case>_mask.png [+ <case>_mask_1.png ...]."""
    cases = []
    for label in BUSI_CLASSES:
        folder = data_dir / label
        if not folder.is_dir() or (label == "normal" and not include_normal):
            continue
        files = image_files(folder)
        masks = [p for p in files if BUSI_MASK.match(p.stem)]
        images = [p for p in files if not BUSI_MASK.match(p.stem)]
        cases += pair_cases(by_key(images, lambda p: p.stem),
                            by_key(masks, lambda p: BUSI_MASK.match(p.stem)["case"]), folder, folder,
                            several_masks=True)
    return cases


def isic_cases(root: Path, data_dir: Path, include_normal: bool) -> list[Case]:
    # The input and ground-truth zips unpack separately, so look for the masks from root.
    ground_truth = find_dir(root, has_subdirs(ISIC_GROUND_TRUTH))
    if ground_truth is None:
        raise FileNotFoundError(f"found {ISIC_INPUT} in {data_dir} but no {ISIC_GROUND_TRUTH} "
                                f"under {root}; unpack the ground-truth zip there too")
    return stem_pairs(data_dir / ISIC_INPUT, ground_truth / ISIC_GROUND_TRUTH, "_segmentation")


def tnscui_cases(root: Path, data_dir: Path, include_normal: bool) -> list[Case]:
    return stem_pairs(data_dir / "image", data_dir / "mask")


def images_and_masks_cases(root: Path, data_dir: Path, include_normal: bool) -> list[Case]:
    masks = data_dir / "masks"
    # The authors' layout keeps class c's masks in masks/c/; a binary task has only masks/0.
    return stem_pairs(data_dir / "images", masks / "0" if (masks / "0").is_dir() else masks)


def finds(matches) -> Callable[[Path], Path | None]:
    return lambda root: find_dir(root, matches)


@dataclass(frozen=True)
class RawDataset:
    source: str                    # where to get it, for the message when it is missing
    layout: str                    # the files read, likewise
    fractions: tuple[float, float]  # default (val, test) fractions of all cases
    locate: Callable[[Path], Path | None]
    cases: Callable[[Path, Path, bool], list[Case]]


# (val, test) fractions: the paper's 7/3 split has no test set; for Kvasir the authors report a test
# set from U-Bench's folders, whose lists are unpublished, so we draw one.
RAW_DATASETS = {
    "kvasir": RawDataset(
        "https://datasets.simula.no/kvasir-seg/ (kvasir-seg.zip; downloaded automatically into an absent "
        "or empty root)",
        "Kvasir-SEG/images/<id>.jpg + Kvasir-SEG/masks/<id>.jpg",
        (0.1, 0.1), finds(has_subdirs("images", "masks")), images_and_masks_cases),
    "busi": RawDataset(
        "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset (Dataset_BUSI_with_GT.zip)",
        "Dataset_BUSI_with_GT/{benign,malignant,normal}/benign (1).png + benign (1)_mask.png "
        "[+ benign (1)_mask_1.png ...]",
        (0.3, 0.0), finds(lambda d: any((d / label).is_dir() for label in BUSI_CLASSES[:2])), busi_cases),
    "isic2018": RawDataset(
        "https://challenge.isic-archive.com/data/#2018 (task 1 training input and ground truth zips)",
        f"{ISIC_INPUT}/ISIC_<id>.jpg + {ISIC_GROUND_TRUTH}/ISIC_<id>_segmentation.png",
        (0.3, 0.0), finds(has_subdirs(ISIC_INPUT)), isic_cases),
    "tnscui": RawDataset(
        "https://tn-scui2020.grand-challenge.org/ (registration required)",
        "image/<id>.PNG + mask/<id>.PNG",
        (0.3, 0.0), finds(has_subdirs("image", "mask")), tnscui_cases),
    "folder": RawDataset(
        "your own data",
        "images/<id>.png + masks/0/<id>.png (the authors' layout), or images/<id>.* + masks/<id>.*",
        (0.3, 0.0), finds(has_subdirs("images", "masks")), images_and_masks_cases),
}


def missing_dataset(name: str, root: Path, root_help: str) -> FileNotFoundError:
    dataset = RAW_DATASETS[name]
    return FileNotFoundError(
        f"{name}: expected the layout {dataset.layout} at or anywhere under {root}, found none. Get it "
        f"from {dataset.source} and unpack it there as it comes (any top folder is fine), or pass "
        f"--data-dir <folder> ({root_help}).")


# ---------------------------------------------------------------------------------------------
# Kvasir-SEG download: temp folder beside root, verified, then renamed into place


def fetch(url: str, destination: Path) -> None:
    """Stream url to destination with a progress bar; a short or broken transfer raises."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(destination, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="kvasir-seg.zip") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as err:  # URLError and resets are OSErrors
        raise ConnectionError(f"downloading {url} failed: {err}") from err
    received = destination.stat().st_size
    if total is not None and received != total:
        raise ConnectionError(f"downloading {url} stopped after {received} of {total} bytes")


def download_kvasir(root: Path) -> None:
    """Download, unzip and check the owner's zip, then rename it to root; on any failure nothing
    is left at root and the temp folder is removed."""
    url = os.environ.get(KVASIR_URL_ENV, KVASIR_URL)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-download-", dir=root.parent))
    try:
        archive, unpacked = staging / "kvasir-seg.zip", staging / "unpacked"
        try:
            fetch(url, archive)
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(unpacked)
        except (ConnectionError, zipfile.BadZipFile) as err:
            raise ConnectionError(
                f"{err}. Nothing was written to {root}. Retry, set {KVASIR_URL_ENV} to a "
                f"reachable copy, or unpack kvasir-seg.zip into {root} yourself.") from err
        kvasir = RAW_DATASETS["kvasir"]
        data_dir = kvasir.locate(unpacked)
        if data_dir is None:
            raise ValueError(f"the zip from {url} holds no images/ + masks/ folders; expected "
                             f"{kvasir.layout}; nothing was written to {root}")
        pairs = len(kvasir.cases(unpacked, data_dir, False))
        if pairs != KVASIR_PAIRS:
            raise ValueError(f"the zip from {url} unpacked to {pairs} image/mask pairs, expected "
                             f"{KVASIR_PAIRS}; nothing was written to {root}")
        if root.exists():
            root.rmdir()  # only an empty root reaches here
        unpacked.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

