"""Small dataset trees in each owner's exact raw layout, written under a test's tmp_path: real file
naming, JPEG masks with compression noise, BUSI's extra masks and normal cases. Shared by the data
tests (test_data.py, test_raw_layouts.py)."""
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data

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
    for path, mask in zip(mask_paths, masks):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(path, **(
            {"quality": 75} if path.suffix == ".jpg" else {}))


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
