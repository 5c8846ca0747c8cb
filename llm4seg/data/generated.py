"""Data drawn from (seed, index) alone, no files: the offline datasets `synthetic` (polyp scenes),
`synthetic3d` (blob volumes) and `synthetic-organs` (a multi-organ abdomen), and the datasets serving them.
In reading order:

    draw_polyp_scene(S, generator)    image (3, S, S) in [0, 1], mask (1, S, S) in {0, 1}
    draw_blob_volume(S, generator)    image (1, S, S, S) z-scored, mask (1, S, S, S) in {0, 1}
    draw_organ_volume(S, generator)   image (1, S, S, S) in [0, 1], labels (1, S, S, S) int64 in 0..5
    SyntheticCases                    what the generated datasets share (the index checked, case i's generator
                                      seeded with seed * 1_000_003 + i); SyntheticPolyps, SyntheticBlobs and
                                      SyntheticOrgans each draw their items
    synthetic_range, synthetic_split  the splits: consecutive index ranges, 70 / 20 / 10 %

synthetic: endoscopy-like scenes, a textured pink "mucosa" with a dark lumen, 1-3 distractor blobs (dark purple
or yellow, not in the mask), then 1-3 dome-shaded polyps of the mucosa's own hue on top (the mask is their
union), a vignette and a random brightness. The distractors span the polyps' range in every channel, so no
single-colour threshold finds the polyps (tests/test_synthetic.py: the best scores IoU ~0.18); the network has
to use outlines and shading. Train items are augmented as the 2D datasets' (images/read.py).

synthetic3d: 1-3 ellipsoids of raised intensity (the mask is their union) and 1-2 bright distractor
ellipsoids that are not, in a smooth random background with grain; image z-scored; spacing 1 mm.

synthetic-organs: an axial abdomen in miniature, S^3 voxels at spacing (1.5, 1.5, 2.0) mm like BTCV after
preprocessing, intensities on the same [0, 1] scale (0 = air). Axes (X, Y, Z) = (right -> left,
anterior -> posterior, along the body); coordinates p in [0, 1]^3 at voxel centres. A "blob" is
{p : sum(((p - c) / r)^2) + w n(p) <= 1} with n a smooth random field in [-1, 1] (4^3 noise, trilinear) and
w its wobble, so organs are ellipsoid-like but not ellipsoids. The organs, painted in this order (a later
one wins where two overlap, which leaves them touching along a shared boundary):

    class  organ    radii (fraction of S)            place                        texture: mean, grain sd
    1      liver    0.15-0.19, 0.17-0.21, 0.22-0.30  right, middle                0.60, 0.025, smooth shading
    2      spleen   0.08-0.10, 0.10-0.13, 0.14-0.18  left, posterior              0.60, mottled 0.06
    5      stomach  0.09-0.12, 0.08-0.11, 0.10-0.14  on the liver's left edge     wall 0.55, lumen 0.12 (0.65 r)
    3      kidney   two: 0.055-0.075, 0.065-0.085,   both sides, posterior        cortex 0.78, medulla 0.48
                    0.12-0.16                                                     (0.55 r), 0.03
    4      aorta    a tube along Z, radius 0.04-0.055 middle, before the spine    0.86, 0.02

The stomach always touches the liver, the right kidney usually the liver, the left kidney often the spleen.
The background (label 0), painted only where no organ is: an elliptic cylinder of fat (0.30, smooth shading,
grain 0.04; air 0 outside it); muscle of the liver's and spleen's intensity (0.60): the abdominal wall, a band
inside the skin, and two paraspinal muscles; a vertebra behind the aorta (rim 0.90, core 0.70); 3-6 "bowel"
blobs (radius 0.04-0.07, 0.55-0.65); 2-3 round spots of the aorta's intensity (radius 0.03-0.05). Then a
global shift of uniform(-0.03, 0.03) and a clip to [0, 1]. The wobble n and the shading (fat 0.06, liver
0.03, the body's outline 0.08) are two smooth fields per volume, each blob seeing the part of the wobble field
at its place. No intensity band segments an organ: the band holding the middle 90 % of the liver's values is
77 % other tissue, the spleen's 97 %, the aorta's 32 % (10 volumes at 48^3); a model must use shape,
texture and place. Every class is present in every volume down to 16^3 (checked on 100 volumes at 16, 24,
32 and 48). A small 3D U-Net (12-24-48 channels, 2 convs a stage, DiceCE, AdamW 2e-3, batch 4 of 32^3
patches of 48^3 volumes, 70 training volumes) learns it on 2 CPU cores: whole-volume Dice on 20 val volumes
0.70-0.92 per organ after 140 steps, 0.86-0.99 after 280 (about 3 minutes), 0.94-0.99 after 420.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .images.read import augmentation_generator, make_item
from .splits import ceil_count

MUCOSA = (0.86, 0.52, 0.46)
# Polyps share the mucosa's hue, as real ones do, and stand out by their outline and dome shading.
POLYP_TINT = (0.95, 0.78, 0.78)
# Not in the mask: the dark lumen, vessel-purple and yellow patches. Together they span the
# polyps' range in every channel, so no single-channel threshold finds the polyps.
DISTRACTORS = ((0.40, 0.24, 0.46), (0.95, 0.88, 0.45))
ORGAN_CLASSES = ("background", "liver", "spleen", "kidney", "aorta", "stomach")
ORGAN_SPACING = (1.5, 1.5, 2.0)  # mm, as BTCV after preprocessing
SYNTHETIC_FRACTIONS = (0.2, 0.1)  # (val, test); train is the rest


def draw_polyp_scene(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A textured pink background with a dark lumen and 1-3 distractor blobs, then 1-3 shaded
    polyps on top: image (3, S, S) in [0, 1] and mask (1, S, S) = union of the polyps."""
    def uniform(low: float, high: float, shape=()) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    centres = (torch.arange(size) + 0.5) / size
    y, x = torch.meshgrid(centres, centres, indexing="ij")                        # (S, S) each

    def shaded_ellipse(radius_low: float, radius_high: float) -> tuple[torch.Tensor, torch.Tensor]:
        cx, cy = uniform(0.15, 0.85, (2,))
        a, b = uniform(radius_low, radius_high, (2,))
        angle = uniform(0, math.pi)
        u = ((x - cx) * angle.cos() + (y - cy) * angle.sin()) / a
        v = (-(x - cx) * angle.sin() + (y - cy) * angle.cos()) / b
        r2 = u ** 2 + v ** 2
        dome = 0.55 + 0.45 * (1 - r2).clamp(min=0).sqrt()  # lit from the front, darker rim
        return r2 <= 1, dome

    low_frequency = F.interpolate(torch.rand(1, 3, 6, 6, generator=generator), size=(size, size),
                                  mode="bicubic", align_corners=False)[0]          # (3, S, S)
    grain = torch.rand(3, size, size, generator=generator)
    tint = 1 + 0.08 * torch.randn(3, 1, 1, generator=generator)
    mucosa = torch.tensor(MUCOSA).view(3, 1, 1) * tint
    image = mucosa * (0.7 + 0.35 * low_frequency + 0.06 * grain)
    lumen_x, lumen_y, lumen_radius = uniform(0, 1), uniform(0, 1), uniform(0.12, 0.3)
    image = image * (1 - 0.85 * (-((x - lumen_x) ** 2 + (y - lumen_y) ** 2)
                                 / (2 * lumen_radius ** 2)).exp())
    for _ in range(int(torch.randint(1, 4, (), generator=generator))):
        inside, dome = shaded_ellipse(0.04, 0.14)
        colour = torch.tensor(DISTRACTORS[int(torch.randint(2, (), generator=generator))])
        image = torch.where(inside, colour.view(3, 1, 1) * dome, image)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for _ in range(int(torch.randint(1, 4, (), generator=generator))):
        inside, dome = shaded_ellipse(0.06, 0.18)
        colour = mucosa * torch.tensor(POLYP_TINT).view(3, 1, 1) * uniform(0.8, 1.1)
        image = torch.where(inside, colour * dome * (0.94 + 0.06 * grain), image)
        mask |= inside
    vignette = 1 - 0.6 * ((x - 0.5) ** 2 + (y - 0.5) ** 2)  # endoscope light falls off outward
    brightness = uniform(0.75, 1.1)
    return (image * vignette * brightness).clamp(0, 1), mask.float().unsqueeze(0)


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


def draw_organ_volume(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """image (1, S, S, S) float32 in [0, 1] and labels (1, S, S, S) int64 in 0..5 (ORGAN_CLASSES); the
    module docstring gives the scene. The random numbers come from `generator` (torch); the painting is numpy,
    single-threaded: about 20 small operations per structure, which torch's intra-op threads slowed tenfold
    when the cores were shared. Each structure is evaluated and painted inside its bounding box only (a region
    = (box, mask within it)): about 3 ms for 48^3, 20 ms for 96^3."""
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    def smooth() -> np.ndarray:
        """A smooth random field in [-1, 1], (S, S, S): 4^3 uniform noise, trilinear."""
        noise = 2 * torch.rand(1, 1, 4, 4, 4, generator=generator) - 1
        return F.interpolate(noise, size=(size,) * 3, mode="trilinear", align_corners=False)[0, 0].numpy()

    grain_field = torch.randn(size, size, size, generator=generator).numpy()  # one grain field, scaled per structure
    wobble_field, shading_field = smooth(), smooth()  # shared: blobs at different places see different parts
    centres = ((np.arange(size) + 0.5) / size).astype(np.float32)                       # (S,), on every axis
    everywhere = (slice(None),) * 3

    def quadric(box: tuple, centre: tuple, radii: tuple) -> np.ndarray:
        """sum(((p - c) / r)^2) on the box, broadcast from one line per axis."""
        x, y, z = (((centres[part] - c) / r) ** 2 for part, c, r in zip(box, centre, radii, strict=True))
        return x[:, None, None] + y[None, :, None] + z[None, None, :]

    def blob(centre: tuple, radii: tuple, wobble: float = 0.25) -> tuple[tuple, np.ndarray]:
        """The region of sum(((p - c) / r)^2) + wobble n(p) <= 1, in the box that can hold it (|n| <= 1)."""
        box = tuple(slice(max(0, int((c - r * (1 + wobble) ** 0.5) * size)),
                          max(0, min(size, int((c + r * (1 + wobble) ** 0.5) * size) + 1)))
                    for c, r in zip(centre, radii, strict=True))
        return box, quadric(box, centre, radii) + wobble * wobble_field[box] <= 1

    body = quadric(everywhere, (0.5, 0.5, 0.5), (0.47, 0.40, np.inf)) + 0.08 * shading_field <= 1
    labels = np.zeros((size, size, size), dtype=np.int64)
    image = np.zeros((size, size, size), dtype=np.float32)

    def paint(region: tuple[tuple, np.ndarray], value: float, sd: float, label: int | None = None,
              within: int | None = None, shading: float = 0.0) -> None:
        """On the region inside the body: image = value + sd * grain + shading * a smooth field, and labels =
        label. label None paints only where no organ is (background); within: only where labels == within
        (an organ's inner part)."""
        box, where = region
        where = where & body[box]
        if label is None or within is not None:
            where &= labels[box] == (within or 0)
        image[box][where] = value + sd * grain_field[box][where] + shading * shading_field[box][where]
        if label is not None:
            labels[box][where] = label

    paint((everywhere, body), 0.30, 0.04, shading=0.06)                                 # fat
    liver_centre = (uniform(0.28, 0.36), uniform(0.40, 0.50), uniform(0.42, 0.58))
    liver_radii = (uniform(0.15, 0.19), uniform(0.17, 0.21), uniform(0.22, 0.30))
    paint(blob(liver_centre, liver_radii), 0.60, 0.025, 1, shading=0.03)
    spleen = ((uniform(0.70, 0.78), uniform(0.55, 0.65), uniform(0.45, 0.60)),
              (uniform(0.08, 0.10), uniform(0.10, 0.13), uniform(0.14, 0.18)))
    paint(blob(*spleen), 0.60, 0.06, 2)
    # The stomach sits on the liver's left edge, so the two always touch.
    stomach_centre = (liver_centre[0] + liver_radii[0] * uniform(0.9, 1.1),
                      liver_centre[1] - liver_radii[1] * uniform(0.3, 0.6), liver_centre[2] + uniform(-0.05, 0.05))
    stomach_radii = (uniform(0.09, 0.12), uniform(0.08, 0.11), uniform(0.10, 0.14))
    paint(blob(stomach_centre, stomach_radii), 0.55, 0.03, 5)
    paint(blob(stomach_centre, tuple(0.65 * r for r in stomach_radii), 0.1), 0.12, 0.03, 5, within=5)   # lumen
    for side in (-1, 1):
        centre = (0.5 + side * uniform(0.17, 0.22), uniform(0.66, 0.74), uniform(0.45, 0.60))
        radii = (uniform(0.055, 0.075), uniform(0.065, 0.085), uniform(0.12, 0.16))
        paint(blob(centre, radii, 0.15), 0.78, 0.03, 3)
        paint(blob(centre, tuple(0.55 * r for r in radii), 0.1), 0.48, 0.03, 3, within=3)          # medulla
    aorta_x, aorta_y, radius = uniform(0.47, 0.53), uniform(0.62, 0.68), uniform(0.04, 0.055)
    paint(blob((aorta_x, aorta_y, 0.5), (radius, radius, 1e3), 0.0), 0.86, 0.02, 4)  # a tube along Z

    # Background structures, painted where no organ is.
    paint(blob((0.5, 0.82, 0.5), (0.07, 0.06, 1e3), 0.0), 0.90, 0.03)              # vertebra: rim,
    paint(blob((0.5, 0.82, 0.5), (0.07 * 0.45 ** 0.5, 0.06 * 0.45 ** 0.5, 1e3), 0.0), 0.70, 0.04)  # core
    # Muscle of the liver's intensity: the abdominal wall (a band inside the skin) and two paraspinal muscles.
    wall = quadric(everywhere, (0.5, 0.5, 0.5), (0.42, 0.35, np.inf)) + 0.08 * shading_field > 1
    paint((everywhere, wall), 0.60, 0.04)
    for side in (-1, 1):
        paint(blob((0.5 + side * 0.15, 0.84, 0.5), (0.07, 0.05, 2.0), 0.1), 0.60, 0.04)
    for _ in range(int(torch.randint(3, 7, (), generator=generator))):                  # bowel loops
        centre = (uniform(0.2, 0.8), uniform(0.12, 0.6), uniform(0.1, 0.9))
        paint(blob(centre, (uniform(0.04, 0.07),) * 3, 0.2), uniform(0.55, 0.65), 0.05)
    for _ in range(int(torch.randint(2, 4, (), generator=generator))):                  # bright round spots
        centre = (uniform(0.2, 0.8), uniform(0.2, 0.8), uniform(0.1, 0.9))
        paint(blob(centre, (uniform(0.03, 0.05),) * 3, 0.0), 0.86, 0.02)
    image = np.clip(image + np.float32(uniform(-0.03, 0.03)) * body, 0, 1)
    return torch.from_numpy(image)[None], torch.from_numpy(labels)[None]


class SyntheticCases(Dataset):
    """What every generated dataset shares: `length` scenes of dataset `name` with global indices first_index..,
    scene i drawn from (seed, i) alone by the subclass's `draw`; `epoch` is set by train.py on every dataset.
    SyntheticPolyps (synthetic), SyntheticBlobs (synthetic3d) and SyntheticOrgans (synthetic-organs) draw."""

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
        return self.draw(scene, torch.Generator().manual_seed(self.seed * 1_000_003 + scene))

    def draw(self, scene: int, generator: torch.Generator) -> dict:
        """The item of scene `scene` (a global index), its random numbers from `generator`."""
        raise NotImplementedError(f"{type(self).__name__} must define draw")


class SyntheticPolyps(SyntheticCases):
    """synthetic: polyp scenes, augmented when `augment` (scene i in epoch e by the symmetry drawn from
    (seed, e, i)); items as data.images' 2D cases."""

    def draw(self, scene: int, generator: torch.Generator) -> dict:
        image, mask = draw_polyp_scene(self.img_size, generator)
        # Its own generator: the scene stays the same whatever the epoch.
        augmentation = augmentation_generator(self.seed, self.epoch, scene) if self.augment else None
        return make_item(image, mask, f"synthetic_{scene:05d}", augmentation)


class SyntheticBlobs(SyntheticCases):
    """synthetic3d: blob volumes, not augmented, at a 1 mm spacing."""

    def draw(self, scene: int, generator: torch.Generator) -> dict:
        image, mask = draw_blob_volume(self.img_size, generator)
        return {"image": image, "mask": mask, "name": f"synthetic3d_{scene:05d}",
                "spacing": torch.ones(3, dtype=torch.float64)}


class SyntheticOrgans(SyntheticCases):
    """`length` whole organ volumes with global indices first_index..; volume i depends only on (seed, i).
    item = {"image": (1, S, S, S) float32, "mask": (1, S, S, S) int64 in 0..5, "name", "spacing": (3,)}.
    `epoch` is there because train.py sets it on every dataset; whole volumes are not augmented (the
    training split wraps them in volumes.patches.RandomPatches)."""

    def __init__(self, length: int, first_index: int, img_size: int, seed: int):
        super().__init__("synthetic-organs", length, first_index, img_size, seed, augment=False)

    def draw(self, scene: int, generator: torch.Generator) -> dict:
        image, labels = draw_organ_volume(self.img_size, generator)
        return {"image": image, "mask": labels, "name": f"synthetic-organs_{scene:05d}",
                "spacing": torch.tensor(ORGAN_SPACING, dtype=torch.float64)}


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


GENERATED = {"synthetic": SyntheticPolyps, "synthetic3d": SyntheticBlobs}  # synthetic-organs: open_organs


def synthetic_split(name: str, split: str, total: int, img_size: int, seed: int) -> SyntheticCases:
    first, length = synthetic_range(split, total)
    return GENERATED[name](name, length, first, img_size, seed, augment=split == "train")
