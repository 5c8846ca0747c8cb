"""Tests of pictures.py: the PNG helpers write what Pillow reads back, at the image's size, and
to_rgb undoes data.py's normalisation."""
import numpy as np
import pytest
import torch
from PIL import Image

import pictures
from data import IMAGENET_MEAN, IMAGENET_STD


def test_png_helpers_write_images_pillow_opens_at_the_image_size(tmp_path):
    height, width = 24, 32
    image = np.full((height, width, 3), 40, dtype=np.uint8)
    gt, pred = torch.zeros(height, width), torch.zeros(height, width)
    gt[4:12, 4:12] = 1
    pred[10:20, 16:28] = 1
    pictures.overlay_png(image, gt, pred, tmp_path / "overlay.png")
    with Image.open(tmp_path / "overlay.png") as picture:
        assert picture.size == (width, height) and picture.mode == "RGB"
        assert picture.getpixel((4, 4)) == pictures.GT_COLOUR  # (x, y): a corner of the true square
        assert picture.getpixel((27, 19)) == pictures.PRED_COLOUR
        assert picture.getpixel((8, 8)) == (40, 40, 40)  # inside the true square: untouched

    activation = torch.zeros(height, width)
    activation[0, 0] = 1.0
    pictures.heatmap_png(image[..., 0], activation, tmp_path / "heat.png", opacity=1.0)  # grayscale input
    with Image.open(tmp_path / "heat.png") as picture:
        assert picture.size == (width, height)
        # jet: 1 -> dark red (128, 0, 0), 0 -> dark blue (0, 0, 128)
        assert picture.getpixel((0, 0)) == (128, 0, 0) and picture.getpixel((5, 5)) == (0, 0, 128)
    with pytest.raises(ValueError, match="upsample_map"):
        pictures.heatmap_png(image, torch.zeros(6, 8), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="uint8"):
        pictures.overlay_png(image.astype(np.float32), gt, pred, tmp_path / "bad.png")


def test_to_rgb_undoes_data_normalisation():
    rgb = torch.randint(0, 256, (3, 5, 7), generator=torch.Generator().manual_seed(0))
    normalised = (rgb / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert np.array_equal(pictures.to_rgb(normalised), rgb.permute(1, 2, 0).numpy().astype(np.uint8))
