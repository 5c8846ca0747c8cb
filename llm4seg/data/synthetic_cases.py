"""Synthetic cases, generated per index from (seed, index), no files: polyps (synthetic.py draws them)
or blob volumes (volumes/generated.py draws them); splits are consecutive index ranges."""
import torch
from torch.utils.data import Dataset

from ..synthetic import draw_polyp_scene
from .generated import draw_blob_volume
from .images.read import augmentation_generator, make_item
from .splits import ceil_count

SYNTHETIC_FRACTIONS = (0.2, 0.1)  # (val, test); train is the rest


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
