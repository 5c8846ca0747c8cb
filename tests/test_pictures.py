"""Tests of pictures.py: the PNG helpers write what Pillow reads back, at the image's size, and
to_rgb undoes the data package's normalisation."""
import numpy as np
import pytest
import torch
from PIL import Image

from llm4seg import pictures
from llm4seg.data import IMAGENET_MEAN, IMAGENET_STD


def test_png_helpers_write_images_pillow_opens_at_the_image_size(tmp_path):
    height, width = 24, 32
    image = np.full((height, width, 3), 40, dtype=np.uint8)
    gt, pred = torch.zeros(height, width), torch.zeros(height, width)
    gt[4:12, 4:12] = 1
    pred[10:20, 16:28] = 1
    # Enlarged 8 times (the smallest integer factor taking the long side 32 to >= 256): 192 x 256.
    pictures.overlay_png(image, gt, pred, tmp_path / "overlay.png")
    with Image.open(tmp_path / "overlay.png") as picture:
        assert picture.size == (8 * width, 8 * height) and picture.mode == "RGB"
        assert picture.getpixel((32, 32)) == pictures.GT_COLOUR  # (x, y): a corner of the true square
        assert picture.getpixel((8 * 28 - 1, 8 * 20 - 1)) == pictures.PRED_COLOUR
        assert picture.getpixel((64, 64)) == (40, 40, 40)  # inside the true square: untouched
        assert picture.getpixel((33, 33)) == (40, 40, 40)  # contours stay 1 px wide at the enlarged size

    activation = torch.zeros(height, width)
    activation[0, 0] = 1.0
    pictures.heatmap_png(image[..., 0], activation, tmp_path / "heat.png", opacity=1.0)  # grayscale input
    with Image.open(tmp_path / "heat.png") as picture:
        assert picture.size == (8 * width, 8 * height)
        # jet: 1 -> dark red (128, 0, 0), 0 -> dark blue (0, 0, 128); the hot pixel became an 8 x 8 block
        assert picture.getpixel((7, 7)) == (128, 0, 0) and picture.getpixel((8, 8)) == (0, 0, 128)
    with pytest.raises(ValueError, match="upsample_map"):
        pictures.heatmap_png(image, torch.zeros(6, 8), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="uint8"):
        pictures.overlay_png(image.astype(np.float32), gt, pred, tmp_path / "bad.png")


def test_to_rgb_undoes_data_normalisation():
    rgb = torch.randint(0, 256, (3, 5, 7), generator=torch.Generator().manual_seed(0))
    normalised = (rgb / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert np.array_equal(pictures.to_rgb(normalised), rgb.permute(1, 2, 0).numpy().astype(np.uint8))


def test_panel_shows_overlay_truth_prediction_and_errors_side_by_side(tmp_path):
    image = np.full((256, 300, 3), 40, dtype=np.uint8)   # already >= 256: not enlarged
    gt, pred = np.zeros((256, 300)), np.zeros((256, 300))
    gt[10:50, 10:50] = 1
    pred[30:70, 30:70] = 1
    pictures.panel_png(image, gt, pred, tmp_path / "panel.png", gap=4, caption="case7  IoU 14.29 %")
    top = 5 * pictures.HEADER_ROW + 4  # the header: column names, 3 lines of legends, the caption
    with Image.open(tmp_path / "panel.png") as picture:
        assert picture.size == (4 * 300 + 3 * 4, top + 256)
        errors_x = 3 * (300 + 4)  # where the fourth panel starts
        assert picture.getpixel((304 + 20, top + 20)) == (255, 255, 255)            # truth panel: foreground
        assert picture.getpixel((2 * 304 + 20, top + 20)) == (0, 0, 0)              # prediction panel: background
        assert picture.getpixel((errors_x + 40, top + 40)) == (255, 255, 255)      # both
        assert picture.getpixel((errors_x + 60, top + 60)) == pictures.PRED_COLOUR  # predicted only
        assert picture.getpixel((errors_x + 15, top + 15)) == pictures.MISSED_COLOUR
        assert picture.getpixel((errors_x + 200, top + 200)) == (0, 0, 0)
        header = np.asarray(picture)[:top]
        # the errors' legend over the errors column, what the overlay's contours are over the overlay
        assert (header[:, errors_x:] == pictures.MISSED_COLOUR).all(axis=-1).any()
        assert not (header[:, :errors_x] == pictures.MISSED_COLOUR).all(axis=-1).any()
        assert (header[:, :300] == pictures.GT_COLOUR).all(axis=-1).any()
        assert (header[:, :300] == pictures.PRED_COLOUR).all(axis=-1).any()
        assert (header == 255).all(axis=-1).sum() > 50             # and their text


def test_volume_slices_cross_the_error_not_the_middle(tmp_path):
    """A wrong voxel block far from the middle: the axial slice is cut through it, so the worst case shows
    what went wrong."""
    truth, predicted = np.zeros((20, 20, 20)), np.zeros((20, 20, 20))
    truth[2:5, 14:17, 3:6] = 1   # missed, around (3, 15, 4)
    assert pictures.slice_centre(truth, predicted, multiclass=False) == (3, 15, 4)
    predicted[2:5, 14:17, 3:6] = 1
    assert pictures.slice_centre(truth, predicted, multiclass=False) == (3, 15, 4)  # no error: the truth
    assert pictures.slice_centre(np.zeros((8, 6, 4)), np.zeros((8, 6, 4)), multiclass=True) == (4, 3, 2)
    pictures.volume_panel_png(torch.randn(1, 20, 20, 20), truth, np.zeros((20, 20, 20)), tmp_path / "v.png",
                              caption="case 3")
    with Image.open(tmp_path / "v.png") as picture:
        # the axial row (top): truth panel shows the missed block, drawn at the z of its centre
        assert (np.asarray(picture)[5 * pictures.HEADER_ROW + 4:] == pictures.MISSED_COLOUR).all(axis=-1).any()


def test_multi_class_volume_panels_key_their_colours_and_name_their_rows(tmp_path):
    """Issue 31, item 9: which colour is which organ (a key in the header), and which row is axial, coronal,
    sagittal (written in each row's corner, white on a dark box)."""
    truth = np.zeros((20, 20, 20), np.int64)
    truth[2:8, 2:8, 2:8], truth[10:16, 10:16, 10:16] = 1, 2
    names = ["background", "liver", "spleen"]
    pictures.volume_panel_png(torch.randn(1, 20, 20, 20), truth, truth, tmp_path / "v.png", multiclass=True,
                              class_names=names)
    with Image.open(tmp_path / "v.png") as picture:
        pixels = np.asarray(picture)
    row_height = pictures.enlarged_size(20, 20)[0]
    top = pixels.shape[0] - 3 * row_height - 2 * 4
    header = pixels[:top]
    for k in (1, 2):
        assert (header == pictures.label_colours(np.array([k]))[0]).all(axis=-1).any(), names[k]
    for row in range(3):  # each row's name box: light text on dark grey in its top-left corner
        corner = pixels[top + row * (row_height + 4):][:pictures.HEADER_ROW, :60]
        assert (corner > 200).all(axis=-1).any() and (corner == 32).all(axis=-1).any()


def test_curves_png_plots_metrics_jsonl_lines(tmp_path):
    epochs = [{"epoch": e, "train_loss": 1 / e, "val_iou": 0.1 * e, "val_dice": 0.15 * e, "lr": 0.01 / e}
              for e in (1, 2, 3)]
    pictures.curves_png(epochs, tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as picture:
        picture.verify()
        assert picture.format == "PNG" and picture.size == (700, 500)


def test_activation_maps_before_and_after_share_one_picture_with_a_colour_bar(tmp_path):
    image = np.full((32, 32, 3), 40, dtype=np.uint8)
    before, after = torch.zeros(32, 32), torch.ones(32, 32)
    pictures.heatmap_pair_png(image, before, after, tmp_path / "pair.png", note="bottleneck 2 x 2 tokens", opacity=1.0)
    with Image.open(tmp_path / "pair.png") as picture:
        top = 2 * pictures.HEADER_ROW + 4   # the header: the two names, the note
        side = 256                           # 32 px enlarged 8 times
        assert picture.size == (2 * side + 2 * 4 + 16 + 24, top + side)
        assert picture.getpixel((10, top + 10)) == (0, 0, 128)           # before: 0 -> dark blue
        assert picture.getpixel((side + 4 + 10, top + 10)) == (128, 0, 0)  # after: 1 -> dark red
        bar_x = 2 * side + 2 * 4 + 8
        assert picture.getpixel((bar_x, top)) == (128, 0, 0) and picture.getpixel((bar_x, top + side - 1)) == (0, 0, 128)
