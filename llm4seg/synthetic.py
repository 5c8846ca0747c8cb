"""Synthetic polyps: endoscopy-like scenes drawn from a seed, so training and tests need no files.

draw_polyp_scene(S, generator) -> image (3, S, S) in [0, 1], mask (1, S, S) in {0, 1}:
a textured pink "mucosa" with a dark lumen, 1-3 distractor blobs (dark purple or yellow, not in the
mask), then 1-3 dome-shaded polyps of the mucosa's own hue on top (the mask is their union), a
vignette and a random brightness. The distractors span the polyps' range in every channel, so no
single-colour threshold finds the polyps (tests/test_synthetic.py: the best scores IoU ~0.18); the
network has to use outlines and shading. data/ wraps this generator as the "synthetic" dataset.
"""
import math

import torch
import torch.nn.functional as F

MUCOSA = (0.86, 0.52, 0.46)
# Polyps share the mucosa's hue, as real ones do, and stand out by their outline and dome shading.
POLYP_TINT = (0.95, 0.78, 0.78)
# Not in the mask: the dark lumen, vessel-purple and yellow patches. Together they span the
# polyps' range in every channel, so no single-channel threshold finds the polyps.
DISTRACTORS = ((0.40, 0.24, 0.46), (0.95, 0.88, 0.45))


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
