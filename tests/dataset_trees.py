"""Small dataset trees in each owner's exact raw layout, written under a test's tmp_path: real file
naming, JPEG masks with compression noise, BUSI's extra masks and normal cases. Shared by the data
tests (test_data.py, test_raw_layouts.py)."""
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llm4seg import data

MEAN = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)


def box_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) bool: a random rectangle plus a bar off one corner, so no symmetry maps it to itself."""
    mask = np.zeros((height, width), dtype=bool)
    top, left = rng.integers(2, height // 2), rng.integers(2, width // 2)
    bottom, right = top + rng.integers(6, height // 2 - 1), left + rng.integers(4, width // 3)
    mask[top:bottom, left:right] = True
    mask[bottom - 3:bottom, right:right + 5] = True
    return mask


def write_case(image_path: Path, mask_paths: list[Path], masks: list[np.ndarray]) -> None:
    """An image whose red channel is bright on the union of the masks, and the masks as 0 / 255."""
    union = np.logical_or.reduce(masks)
    image = np.zeros(union.shape + (3,), dtype=np.uint8)
    image[..., 0] = np.where(union, 230, 20)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(image_path)
    for path, mask in zip(mask_paths, masks, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(path, **(
            {"quality": 75} if path.suffix == ".jpg" else {}))


def textured_rgb(width: int, height: int, rng: np.random.Generator, noise: float = 5.0) -> Image.Image:
    """A photo-like RGB image: smooth colour regions (a 64x coarser random grid, bicubic), finer blotches (8x
    coarser, bilinear) and pixel noise, so its JPEG is about as large as a photo's: 4000 x 3000 at quality 90
    takes ~3 MB (ISIC's are 1-4 MB), 622 x 530 ~85 kB (Kvasir's 40-100 kB)."""
    def layer(step: int, resample) -> np.ndarray:
        grid = rng.integers(0, 256, (max(2, height // step), max(2, width // step), 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(grid).resize((width, height), resample), dtype=np.float32)
    pixels = 0.75 * layer(64, Image.Resampling.BICUBIC) + 0.25 * layer(8, Image.Resampling.BILINEAR)
    pixels += rng.normal(0, noise, pixels.shape) if noise else 0
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def make_kvasir(top: Path, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng, drawn = np.random.default_rng(seed), {}
    for i in range(count):
        stem = f"cju{i:04d}kvasir"
        drawn[stem] = box_mask(32, 32, rng)
        write_case(top / "images" / f"{stem}.jpg", [top / "masks" / f"{stem}.jpg"], [drawn[stem]])
    (top / "kavsir_bboxes.json").write_text("{}")
    return drawn


def make_busi(top: Path) -> dict[str, np.ndarray]:
    """6 benign (the first with two masks), 4 malignant, 3 normal cases with empty masks."""
    rng, drawn = np.random.default_rng(1), {}
    for label, count in (("benign", 6), ("malignant", 4), ("normal", 3)):
        for i in range(1, count + 1):
            case = f"{label} ({i})"
            masks = [box_mask(32, 32, rng) & (label != "normal")]
            paths = [top / label / f"{case}_mask.png"]
            if case == "benign (1)":
                masks.append(np.zeros((32, 32), dtype=bool))
                masks[1][24:30, 20:30] = True
                paths.append(top / label / f"{case}_mask_1.png")
            write_case(top / label / f"{case}.png", paths, masks)
            drawn[case] = np.logical_or.reduce(masks)
    return drawn


def write_split(path: Path, train: list[str], val: list[str], test: list[str] = ()) -> str:
    path.write_text(json.dumps({"train": train, "val": val, "test": list(test)}))
    return str(path)


def unnormalise(image: torch.Tensor) -> torch.Tensor:
    return image * STD + MEAN


def all_items(name: str, root: Path, **options) -> dict[str, dict]:
    return {item["name"]: item for split in ("train", "val")
            for item in data.load_dataset(name, str(root), split, img_size=32, **options)}


def symmetries(mask: torch.Tensor) -> list[torch.Tensor]:
    """The 8 rotations / reflections of a (1, S, S) mask."""
    turns = [mask.rot90(k, (1, 2)) for k in range(4)]
    return turns + [t.flip(2) for t in turns]


# ---------------------------------------------------------------------------------------------
# BTCV trees (NIfTI, written with nibabel): the challenge's RawData and UNETR's imagesTr / labelsTr

BTCV_SHAPE = (40, 36, 12)  # (X, Y, Z) as stored
# LPS (x and y point left and posterior, so RAS flips both), anisotropic, off-centre: as many CTs are stored.
LPS_AFFINE = np.array([[-0.8, 0, 0, 160.0], [0, -0.9, 0, 140.0], [0, 0, 2.5, -75.0], [0, 0, 0, 1]])
# The same voxel sizes with the first two axes swapped as well (array axis 0 runs posterior, axis 1 left).
SWAPPED_AFFINE = np.array([[0, -0.8, 0, 160.0], [-0.9, 0, 0, 140.0], [0, 0, 2.5, -75.0], [0, 0, 0, 1]])


def btcv_volumes(rng: np.random.Generator, shape=BTCV_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """(image in HU as int16, labels as uint8), (X, Y, Z): air (-1000) around an elliptic body (~ 40 HU) that
    reaches the X edges but not the Y ones, so the body crop cuts Y; boxes of 5 organ labels at 60-200 HU
    (gallbladder 4 and aorta 8 among them), a bone spot above the HU window (clipped) and fat below 0 HU."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 1.1) ** 2 + (y / 0.75) ** 2 <= 1                                         # (X, Y)
    image = np.where(body[..., None], 40.0, -1000.0) + rng.normal(0, 15, shape) * body[..., None]
    labels = np.zeros(shape, np.uint8)
    for label, hu in ((1, 60), (6, 90), (4, 20), (8, 200), (11, 120)):
        x0, y0, z0 = rng.integers(6, shape[0] - 14), rng.integers(10, shape[1] - 16), rng.integers(1, shape[2] - 6)
        box = (slice(x0, x0 + rng.integers(4, 9)), slice(y0, y0 + rng.integers(3, 7)),
               slice(z0, z0 + rng.integers(2, 5)))
        labels[box], image[box] = label, hu + rng.normal(0, 10, image[box].shape)
    image[shape[0] // 2 - 2:shape[0] // 2 + 2, shape[1] // 2 + 7:shape[1] // 2 + 10, :] = 700  # bone, clipped at 250
    image[6:9, shape[1] // 2, :] = -120                                                   # fat, inside the window
    return image.round().astype(np.int16), labels


def write_btcv_case(image_path: Path, label_path: Path, seed: int, affine=LPS_AFFINE, shape=BTCV_SHAPE) -> None:
    import nibabel

    image, labels = btcv_volumes(np.random.default_rng(seed), shape)
    for path, array in ((image_path, image), (label_path, labels)):
        path.parent.mkdir(parents=True, exist_ok=True)
        nibabel.save(nibabel.Nifti1Image(array, affine), path)


def make_btcv(root: Path, layout: str = "challenge", numbers=(1, 2, 3, 35), dataset_json: str | None = "split",
              affines: dict | None = None, shape=BTCV_SHAPE) -> Path:
    """BTCV cases img<NNNN> (numbers) in a layout; returns the folder holding the image and label folders.
    challenge: root/RawData/Training/img/img0001.nii.gz + label/label0001.nii.gz (and RawData/Testing/img, no
    labels, as the zip has); unetr: root/imagesTr/img0001.nii.gz + labelsTr/label0001.nii.gz, with dataset_0.json
    holding "training" and "validation" (numbers >= 35 validate) when dataset_json == "split", "training" alone
    when "training", none when None. affines: number -> affine (default LPS_AFFINE)."""
    affines = affines or {}
    top = root / "RawData" / "Training" if layout == "challenge" else root
    images, labels = ("img", "label") if layout == "challenge" else ("imagesTr", "labelsTr")
    for number in numbers:
        write_btcv_case(top / images / f"img{number:04d}.nii.gz", top / labels / f"label{number:04d}.nii.gz",
                        seed=number, affine=affines.get(number, LPS_AFFINE), shape=shape)
    if layout == "challenge":
        import nibabel

        (root / "RawData" / "Testing" / "img").mkdir(parents=True)
        nibabel.save(nibabel.Nifti1Image(np.zeros(shape, np.int16), LPS_AFFINE),
                     root / "RawData" / "Testing" / "img" / "img0061.nii.gz")
    elif dataset_json is not None:
        entries = {n: {"image": f"imagesTr/img{n:04d}.nii.gz", "label": f"labelsTr/label{n:04d}.nii.gz"}
                   for n in numbers}
        index = {"name": "btcv", "labels": {str(i): name for i, name in enumerate(data.class_names("btcv"))},
                 "training": [entries[n] for n in numbers if dataset_json == "training" or n < 35]}
        if dataset_json == "split":
            index["validation"] = [entries[n] for n in numbers if n >= 35]
        (root / "dataset_0.json").write_text(json.dumps(index, indent=1))
    return top


def flip_last_byte(path: Path) -> None:
    data_bytes = bytearray(path.read_bytes())
    data_bytes[-1] ^= 0xFF  # the last tensor's last byte: the header still parses
    path.write_bytes(bytes(data_bytes))


# Ways a cache file gets damaged; each must be rebuilt with one printed line (test_volumes, test_btcv).
CACHE_DAMAGE = {
    "cut short": lambda path: path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2]),
    "a flipped bit": flip_last_byte,
    "not safetensors": lambda path: path.write_bytes(b"\x00" * 64),
    "empty": lambda path: path.write_bytes(b""),
}


def uncached_item(dataset: data.SegmentationFiles, index: int) -> dict:
    """SegmentationFiles.__getitem__ as it was before the cache: every file decoded in full, every time."""
    case, size = dataset.cases[index], (dataset.img_size, dataset.img_size)
    rgb = data.read_rgb(case.image)
    mask = Image.fromarray(data.read_mask(case, rgb.size).astype(np.uint8) * 255)
    mask = np.asarray(mask.resize(size, Image.Resampling.NEAREST))
    mask = torch.from_numpy(mask >= 128).float().unsqueeze(0)
    augmentation = data.augmentation_generator(dataset.seed, dataset.epoch, index) if dataset.augment else None
    return data.make_item(data.resized_rgb(rgb, dataset.img_size), mask, case.name, augmentation)
