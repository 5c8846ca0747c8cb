"""The training split of the multi-class volume datasets (btcv, synthetic-organs): random R^3 patches, as
UNETR / Swin UNETR train on BTCV (MONAI's RandCropByPosNegLabeld pos 1 neg 1, RandFlipd x 3, RandRotate90d,
RandShiftIntensityd; MONAI names in brackets below).

With V whole volumes and m = samples_per_volume, the split has V m items; item i is a patch of volume
v = i // m, drawn from the generator generator_for(epoch, i) alone (data.augmentation_generator: (seed,
epoch, i) hashed), so a resumed run, or any number of DataLoader workers, repeats its patches, and every
epoch (train.py sets `epoch`) draws new ones. In this order, for a volume of n_a voxels on axis a:
 1. pad (SpatialPadd, symmetric): an axis with n_a < R gets (R - n_a) // 2 voxels before and the rest after,
    the image its minimum (per channel; 0 for BTCV's [0, 1] scale), the label background 0. Said once per
    dataset and process (data.check_cases says it for the whole split before training).
 2. centre (RandCropByPosNegLabeld pos 1 neg 1): u ~ U[0, 1); the candidates are the voxels with label > 0
    when u < pos / (pos + neg) = 1/2, else those with label == 0 (when that set is empty, the other one,
    as MONAI does); the centre c is candidate k, k uniform in 0..count-1, counted in C order (numpy's
    nonzero order). Foreground-centred patches are thus half of them whatever the foreground's size.
 3. window: start_a = min(max(c_a - R // 2, 0), n_a - R), stop_a = start_a + R (MONAI clamps the centre to
    [R // 2, n_a - R + R // 2], then crops from c - R // 2: the same window).
 4. flips (RandFlipd spatial_axis 0, 1, 2, prob 0.1 each): axis a reversed when u_a < 0.1.
 5. rotation (RandRotate90d prob 0.1, max_k 3, spatial_axes (0, 1), the axial plane in RAS): when u < 0.1,
    rot90 by k x 90 degrees, k uniform in {1, 2, 3}.
 6. intensity (RandShiftIntensityd offsets 0.1, prob 0.5): when u < 0.5, image + o, o ~ U(-0.1, 0.1).
Every draw is taken in this order whether or not it applies, so one decision does not shift the others.
item = {"image": (C, R, R, R) float32, "mask": (1, R, R, R) int64, "name": the volume's name, "spacing"}.
Two differences from UNETR's loader: it passes image_threshold 0, so its candidates are also restricted to
voxels where the image is > 0 (here every voxel counts: label > 0 or label == 0, nothing else); and it draws a
volume's 4 patches from one read of it as one item, where here each patch is its own item (the volume is read
from the cache once per patch; a batch mixes patches of different volumes).
"""
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

POSITIVE_FRACTION = 0.5  # pos / (pos + neg) with pos = neg = 1
FLIP_PROBABILITY, ROTATE_PROBABILITY = 0.1, 0.1
SHIFT_PROBABILITY, SHIFT_OFFSET = 0.5, 0.1


def padded(image: torch.Tensor, labels: torch.Tensor, roi_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """image (C, X, Y, Z) and labels (1, X, Y, Z) with every side shorter than R padded to R (step 1)."""
    pads = []
    for side in reversed(image.shape[1:]):  # F.pad lists the last axis first
        extra = max(0, roi_size - side)
        pads += [extra // 2, extra - extra // 2]
    if not any(pads):
        return image, labels
    floor = image.amin(dim=(1, 2, 3))                                                  # (C,)
    image = torch.stack([F.pad(channel, pads, value=float(low)) for channel, low in zip(image, floor, strict=True)])
    return image, F.pad(labels, pads, value=0)


def kth_voxel(candidates: torch.Tensor, k: int) -> list[int]:
    """The (x, y, z) of the k-th True voxel of candidates (X, Y, Z) in C order, without listing them all
    (a CT's background has millions): the slab x from the per-slab counts, then y, z inside it."""
    cumulative = candidates.sum(dim=(1, 2)).cumsum(0)                                   # (X,)
    x = int(torch.searchsorted(cumulative, torch.tensor(k), right=True))
    before = int(cumulative[x - 1]) if x else 0
    y, z = candidates[x].nonzero()[k - before].tolist()
    return [x, y, z]


def draw_centre(labels: torch.Tensor, generator: torch.Generator) -> list[int]:
    """Step 2: the centre voxel (x, y, z) of a patch of labels (X, Y, Z)."""
    positive = bool(torch.rand((), generator=generator) < POSITIVE_FRACTION)
    foreground = labels > 0
    count = int(foreground.sum())
    if count == 0 or count == labels.numel():  # only one kind of voxel: centre on it
        positive = count > 0
    candidates = foreground if positive else ~foreground
    total = count if positive else labels.numel() - count
    return kth_voxel(candidates, int(torch.randint(total, (), generator=generator)))


def window_start(centre: list[int], shape, roi_size: int) -> list[int]:
    """Step 3: the first voxel of the R^3 window around the centre, kept inside the volume."""
    return [min(max(c - roi_size // 2, 0), n - roi_size) for c, n in zip(centre, shape, strict=True)]


def augmented(image: torch.Tensor, labels: torch.Tensor,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 4-6 on a patch: image (C, R, R, R), labels (1, R, R, R)."""
    flips = [1 + axis for axis, u in enumerate(torch.rand(3, generator=generator).tolist()) if u < FLIP_PROBABILITY]
    rotate = bool(torch.rand((), generator=generator) < ROTATE_PROBABILITY)
    turns = int(torch.randint(1, 4, (), generator=generator))
    shift = bool(torch.rand((), generator=generator) < SHIFT_PROBABILITY)
    offset = float(SHIFT_OFFSET * (2 * torch.rand((), generator=generator) - 1))
    if flips:
        image, labels = image.flip(flips), labels.flip(flips)
    if rotate:
        image, labels = image.rot90(turns, (1, 2)), labels.rot90(turns, (1, 2))
    if shift:
        image = image + offset
    return image.contiguous(), labels.contiguous()


class RandomPatches(Dataset):
    """The module docstring's patches of the whole volumes of `volumes` (a BTCVVolumes or SyntheticOrgans).
    generator_for(epoch, index) -> torch.Generator is the item's only source of randomness; `epoch` is set
    by train.py before each epoch. `cases` are the volumes' cases (None for generated volumes)."""

    def __init__(self, name: str, volumes: Dataset, roi_size: int, samples_per_volume: int, generator_for):
        if roi_size < 1 or samples_per_volume < 1:
            raise ValueError(f"expected roi_size and samples_per_volume >= 1, got {roi_size} and {samples_per_volume}")
        self.name, self.volumes, self.roi_size = name, volumes, roi_size
        self.samples_per_volume, self.generator_for = samples_per_volume, generator_for
        self.epoch = 0
        self.padding_said = False

    @property
    def cases(self):
        return getattr(self.volumes, "cases", None)

    def __len__(self) -> int:
        return len(self.volumes) * self.samples_per_volume

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} {self.name} patches")
        volume = self.volumes[index // self.samples_per_volume]
        shape = list(volume["mask"].shape[1:])
        if min(shape) < self.roi_size and not self.padding_said:
            self.say_padding([(volume["name"], shape)], None)
        image, labels = padded(volume["image"], volume["mask"], self.roi_size)
        generator = self.generator_for(self.epoch, index)
        start = window_start(draw_centre(labels[0], generator), labels.shape[1:], self.roi_size)
        window = (slice(None), *(slice(s, s + self.roi_size) for s in start))
        image, labels = augmented(image[window], labels[window], generator)
        return {"image": image, "mask": labels, "name": volume["name"], "spacing": volume["spacing"]}

    def note_shapes(self, shapes: list[tuple[str, list[int]]]) -> None:
        """Say once, for the whole split, which volumes (name, spatial shape) will be padded (data.check_cases
        calls this with every volume's shape)."""
        small = [(name, shape) for name, shape in shapes if min(shape) < self.roi_size]
        if small and not self.padding_said:
            self.say_padding(small, len(shapes))

    def say_padding(self, small: list[tuple[str, list[int]]], total: int | None) -> None:
        """One line: how many volumes (or which one, when total is None) are smaller than a patch."""
        name, shape = min(small, key=lambda case: min(case[1]))
        side = "x".join(map(str, shape))
        counted = f"{len(small)} of {total} volumes are" if total is not None else f"volume {name} is"
        smallest = f" (smallest: {name}, {side})" if total is not None else f" ({side})"
        print(f"{self.name} train: {counted} smaller than the {self.roi_size}^3 patch on some axis{smallest}; "
              f"such volumes are padded to {self.roi_size} there (image with its minimum, label with background)")
        self.padding_said = True
