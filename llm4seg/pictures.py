"""Pictures people would rather look at than read: overlays, panels, heat maps (Pillow), training curves.

    overlay_png(image, gt_mask, pred_mask, path)   the image with the true contour (green) and the
                                                   predicted one (red); contours as metrics.mask_boundary
    panel_png(image, gt_mask, pred_mask, path)     side by side: the overlay | truth | prediction | errors
                                                   (white: both, red: predicted only, blue: missed), under a
                                                   header: the column names, a legend, an optional caption
    label_panel_png(image, gt, pred, path)         panel_png for label maps (H, W) of integers 0..K-1: overlay of
                                                   the predicted classes | truth | prediction in CLASS_COLOURS |
                                                   errors (white: right class, red: wrong or invented, blue: missed)
    volume_panel_png(volume, gt, pred, path)       three panel rows: axial, coronal and sagittal slices of a
                                                   volume (C, X, Y, Z) through the centre of its errors (or of
                                                   the truth); with multiclass=True the
                                                   masks are label maps: overlay of the predicted classes |
                                                   truth | prediction in CLASS_COLOURS | errors (white: right
                                                   organ, red: wrong or invented, blue: missed), each row named,
                                                   and given class_names a key of the classes' colours
    heatmap_png(image, activation, path)           a jet heat map of activation (H, W) in [0, 1] blended
                                                   over the image: the paper's Fig. 2(a)
    heatmap_pair_png(image, before, after, path)   the maps before | after the LLM layer side by side, with a
                                                   colour bar and an optional note
    curves_png(epochs, path)                       train loss, validation IoU / Dice and lr against the
                                                   epoch, from metrics.jsonl's lines (matplotlib, Agg)
    to_rgb(image)                                  a data item's normalised (3, H, W) image -> (H, W, 3) uint8
Images are (H, W, 3) or (H, W) uint8 arrays or tensors; masks and maps are (H, W), at the image's size.
Pictures are enlarged to at least MIN_SIDE pixels on their long side (a 64 px image is hard to see):
the image bilinearly, masks and maps by nearest neighbour, so no mask gains a value it did not have;
contours are drawn at the enlarged size.
"""
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .data import denormalize
from .files import write_atomically, write_png
from .metrics import THRESHOLD, mask_boundary

GT_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 0, 0)
MISSED_COLOUR = (0, 96, 255)
MIN_SIDE = 256
# Label k > 0 of a multi-class map is drawn in CLASS_COLOURS[(k - 1) % 20] (matplotlib's tab20 order, so BTCV's
# 13 organs are 13 distinct colours); background stays the image.
CLASS_COLOURS = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
                          (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
                          (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229)],
                         dtype=np.uint8)


def to_rgb(image: Tensor) -> np.ndarray:
    """A data item's image (3, H, W), ImageNet-normalised -> (H, W, 3) uint8, the normalisation undone."""
    rgb = (denormalize(image.cpu()) * 255).round().clamp(0, 255).to(torch.uint8)
    return rgb.permute(1, 2, 0).numpy()  # (H, W, 3)


def _numpy(array) -> np.ndarray:
    return array.detach().cpu().numpy() if torch.is_tensor(array) else np.asarray(array)


def _rgb_image(image) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 -> (H, W, 3) uint8."""
    image = _numpy(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"expected a uint8 image (H, W, 3) or (H, W), got {image.dtype} {image.shape}; "
                         f"undo the normalisation and convert with .astype(np.uint8)")
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def _check_same_size(image: np.ndarray, other: np.ndarray, what: str) -> None:
    if other.shape != image.shape[:2]:
        raise ValueError(f"expected the {what} at the image's size {image.shape[:2]}, got {other.shape}")


def jet_colours(values: np.ndarray) -> np.ndarray:
    """values (...) in [0, 1] -> (..., 3) uint8 on the jet colour scale (blue low, red high)."""
    x = np.clip(values, 0.0, 1.0)[..., None] * 4.0
    centres = np.array([3.0, 2.0, 1.0])  # where red, green, blue peak on the 0..4 scale
    return (np.clip(1.5 - np.abs(x - centres), 0.0, 1.0) * 255).round().astype(np.uint8)


def enlarged_size(height: int, width: int, min_side: int = MIN_SIDE) -> tuple[int, int]:
    """(H, W) scaled by the smallest integer factor that makes the long side >= min_side (1 if it is)."""
    factor = max(1, -(-min_side // max(height, width)))
    return height * factor, width * factor


def _enlarge_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return image if image.shape[:2] == size else np.asarray(
        Image.fromarray(image).resize(size[::-1], Image.Resampling.BILINEAR))


def _enlarge_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour: each value repeated over the block it became."""
    factor = size[0] // values.shape[0]
    return values.repeat(factor, axis=0).repeat(factor, axis=1)


def _masks(image: np.ndarray, *masks) -> list[np.ndarray]:
    """Each mask (H, W) thresholded to bool, checked against the image's size."""
    binary = []
    for mask in masks:
        mask = _numpy(mask) > THRESHOLD
        _check_same_size(image, mask, "mask")
        binary.append(mask)
    return binary


def heatmap_png(image, activation, path, opacity: float = 0.5) -> None:
    """Write `activation` (H, W) in [0, 1] as a jet heat map blended over `image` (H, W, 3) uint8 to `path`."""
    image, activation = _rgb_image(image), _numpy(activation)
    _check_same_size(image, activation, "activation map (upsample_map it first)")
    size = enlarged_size(*image.shape[:2])
    blended = (1 - opacity) * _enlarge_image(image, size) + opacity * jet_colours(_enlarge_map(activation, size))
    write_png(path, blended.round().astype(np.uint8))


def heatmap_pair_png(image, before, after, path, note: str | None = None, opacity: float = 0.5,
                     gap: int = 4) -> None:
    """Write the activation maps before | after the LLM layer (each (H, W) in [0, 1], blended over `image`
    (H, W, 3) uint8 as heatmap_png) side by side with a jet colour bar (0 at the bottom, 1 at the top) and a
    header naming them, plus `note` (e.g. that the bottleneck is too coarse to show anything) to `path`."""
    from PIL import ImageDraw

    image = _rgb_image(image)
    size = enlarged_size(*image.shape[:2])
    panels = []
    for activation in (before, after):
        activation = _numpy(activation)
        _check_same_size(image, activation, "activation map (upsample_map it first)")
        blended = (1 - opacity) * _enlarge_image(image, size) + opacity * jet_colours(_enlarge_map(activation, size))
        panels.append(blended.round().astype(np.uint8))
    bar = np.repeat(jet_colours(np.linspace(1, 0, size[0]))[:, None], 16, axis=1)          # (H, 16, 3)
    spacer = np.full((size[0], gap, 3), 128, dtype=np.uint8)
    labels = np.full((size[0], 24, 3), 32, dtype=np.uint8)
    row = np.concatenate([panels[0], spacer, panels[1], spacer, bar, labels], axis=1)
    lines = 2 if note else 1
    picture = Image.new("RGB", (row.shape[1], row.shape[0] + lines * HEADER_ROW + 4), (32, 32, 32))
    picture.paste(Image.fromarray(row), (0, lines * HEADER_ROW + 4))
    draw = ImageDraw.Draw(picture)
    draw.text((2, 2), "before the LLM layer", fill=(255, 255, 255))
    draw.text((size[1] + gap + 2, 2), "after the LLM layer", fill=(255, 255, 255))
    if note:
        draw.text((2, HEADER_ROW + 2), note, fill=(255, 200, 0))
    right = row.shape[1] - 22
    draw.text((right, lines * HEADER_ROW + 4), "1", fill=(255, 255, 255))
    draw.text((right, picture.height - HEADER_ROW), "0", fill=(255, 255, 255))
    write_png(path, picture)


def _contours(image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """The image with the true (green) and predicted (red, on top) contours, all at the image's size."""
    image = image.copy()
    for mask, colour in ((gt, GT_COLOUR), (pred, PRED_COLOUR)):
        image[_numpy(mask_boundary(torch.from_numpy(mask)))] = colour
    return image


def overlay_png(image, gt_mask, pred_mask, path) -> None:
    """Write `image` (H, W, 3) uint8 with the contours of gt_mask (green) and pred_mask (red), (H, W), to `path`.
    Where the contours coincide the prediction's red is drawn on top."""
    image = _rgb_image(image)
    gt, pred = _masks(image, gt_mask, pred_mask)
    size = enlarged_size(*image.shape[:2])
    write_png(path, _contours(_enlarge_image(image, size), _enlarge_map(gt, size), _enlarge_map(pred, size)))


def panel_png(image, gt_mask, pred_mask, path, gap: int = 4, caption: str | None = None) -> None:
    """Write overlay | truth | prediction | errors side by side to `path`, each panel enlarged alike, under a
    header naming the columns, the error colours and `caption` (e.g. the case and its IoU / Dice).
    Errors: white where both say foreground, red predicted only (false positive), blue missed (false negative)."""
    row = _panel_row(image, gt_mask, pred_mask, gap)
    write_png(path, with_header(row, (row.shape[1] - 3 * gap) // 4, gap, caption, multiclass=False))


def label_panel_png(image, gt_labels, pred_labels, path, gap: int = 4, caption: str | None = None,
                    class_names: list[str] | None = None) -> None:
    """Write panel_png's four columns for label maps to `path`: `image` (H, W, 3) uint8, gt_labels and pred_labels
    (H, W) integers 0..K-1 (a multi-class 2D case: its truth and the argmax), each class in its CLASS_COLOURS,
    under the header of volume_panel_png(multiclass=True)."""
    row = _label_panel_row(image, gt_labels, pred_labels, gap)
    write_png(path, with_header(row, (row.shape[1] - 3 * gap) // 4, gap, caption, multiclass=True,
                                class_names=class_names))


def _panel_row(image, gt_mask, pred_mask, gap: int) -> np.ndarray:
    image = _rgb_image(image)
    gt, pred = _masks(image, gt_mask, pred_mask)
    size = enlarged_size(*image.shape[:2])
    gt, pred = _enlarge_map(gt, size), _enlarge_map(pred, size)
    white = np.array([255, 255, 255], dtype=np.uint8)
    errors = np.zeros((*size, 3), dtype=np.uint8)
    errors[gt & pred], errors[pred & ~gt], errors[gt & ~pred] = white, PRED_COLOUR, MISSED_COLOUR
    panels = [_contours(_enlarge_image(image, size), gt, pred), np.where(gt[..., None], white, 0).astype(np.uint8),
              np.where(pred[..., None], white, 0).astype(np.uint8), errors]
    spacer = np.full((size[0], gap, 3), 128, dtype=np.uint8)
    return np.concatenate([part for panel in panels for part in (panel, spacer)][:-1], axis=1)  # (H, 4W + 3 gap, 3)


def label_colours(labels: np.ndarray) -> np.ndarray:
    """labels (H, W) integers -> (H, W, 3) uint8: black background, CLASS_COLOURS for the classes."""
    colours = np.concatenate([np.zeros((1, 3), np.uint8), CLASS_COLOURS])
    return colours[np.where(labels > 0, (labels - 1) % len(CLASS_COLOURS) + 1, 0)]


def _label_panel_row(image, gt_labels, pred_labels, gap: int) -> np.ndarray:
    """overlay (the predicted classes blended over the image) | truth | prediction | errors, for label maps."""
    image = _rgb_image(image)
    gt, pred = (_numpy(labels).astype(np.int64) for labels in (gt_labels, pred_labels))
    _check_same_size(image, gt, "truth")
    _check_same_size(image, pred, "prediction")
    size = enlarged_size(*image.shape[:2])
    gt, pred, image = _enlarge_map(gt, size), _enlarge_map(pred, size), _enlarge_image(image, size)
    overlay = np.where(pred[..., None] > 0, image // 2 + label_colours(pred) // 2, image).astype(np.uint8)
    errors = np.zeros((*size, 3), dtype=np.uint8)
    errors[(gt > 0) & (pred == gt)] = 255
    errors[(pred > 0) & (pred != gt)] = PRED_COLOUR
    errors[(gt > 0) & (pred == 0)] = MISSED_COLOUR
    panels = [overlay, label_colours(gt), label_colours(pred), errors]
    spacer = np.full((size[0], gap, 3), 128, dtype=np.uint8)
    return np.concatenate([part for panel in panels for part in (panel, spacer)][:-1], axis=1)  # (H, 4W + 3 gap, 3)


def volume_panel_png(volume: Tensor, gt_mask, pred_mask, path, gap: int = 4, multiclass: bool = False,
                     caption: str | None = None, class_names: list[str] | None = None) -> None:
    """Write an axial, a coronal and a sagittal slice of a volume, one panel_png row each (top to bottom, each
    named in its corner), to `path`, under a header naming the columns, the colours (with class_names, which
    colour is which class) and `caption` (e.g. the case and its scores).
    The slices cross where the prediction is most wrong (the centre of the errors), else the centre of the
    truth, else the middle: a worst case shows its error. volume (C, X, Y, Z), z-scored: its first channel,
    shown from its 1st to 99th percentile; masks (X, Y, Z), or label maps with multiclass. Slices are turned
    90 degrees so the second axis of each runs upward."""
    gray = volume[0].float().cpu()
    low, high = torch.quantile(gray.flatten()[::max(1, gray.numel() // 100_000)], torch.tensor([0.01, 0.99]))
    gray = ((gray - low) / (high - low).clamp_min(1e-6) * 255).clamp(0, 255).round().to(torch.uint8).numpy()
    gt, pred = _numpy(gt_mask), _numpy(pred_mask)
    centre = slice_centre(gt, pred, multiclass)
    rows = []
    for axis, name in zip((2, 1, 0), ROW_NAMES, strict=True):  # across the third, second and first axis
        cut = [np.rot90(np.take(array, centre[axis], axis=axis)) for array in (gray, gt, pred)]
        row = _label_panel_row if multiclass else _panel_row
        rows.append(named_row(row(np.ascontiguousarray(cut[0]), *cut[1:], gap), name))
    width = max(row.shape[1] for row in rows)
    spacer = np.full((gap, width, 3), 128, dtype=np.uint8)
    rows = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=128) for row in rows]
    panel = np.concatenate([part for row in rows for part in (row, spacer)][:-1], axis=0)
    write_png(path, with_header(panel, (rows[0].shape[1] - 3 * gap) // 4, gap, caption, multiclass, class_names))


def slice_centre(gt: np.ndarray, pred: np.ndarray, multiclass: bool) -> tuple[int, ...]:
    """(x, y, z): the rounded centre of the wrongly predicted voxels, else of the true foreground, else the
    middle of the volume."""
    truth, predicted = (gt, pred) if multiclass else (gt > THRESHOLD, pred > THRESHOLD)
    for where in (truth != predicted, truth > 0):
        if where.any():
            return tuple(int(round(axis.mean())) for axis in np.nonzero(where))
    return tuple(side // 2 for side in gt.shape)


HEADER_ROW = 14  # pixels per line of text in a panel's header (PIL's default bitmap font is 11 px high)
ROW_NAMES = ("axial", "coronal", "sagittal")  # volume_panel_png's rows, top to bottom


def with_header(panel: np.ndarray, column: int, gap: int, caption: str | None, multiclass: bool,
                class_names: list[str] | None = None) -> np.ndarray:
    """panel (H, W, 3) of four columns `column` px wide under a header: the column names; under the overlay what
    its contours are (binary) or the class key, each class's colour and name, across the first three columns
    (multi-class, given class_names: background first); the errors' legend stacked over the errors column;
    then the caption."""
    from PIL import ImageDraw

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    errors_x = 3 * (column + gap) + 2
    legend = [("right" + (" class" if multiclass else ""), (255, 255, 255)),
              ("wrong class or invented" if multiclass else "false positive", PRED_COLOUR), ("missed", MISSED_COLOUR)]
    entries = [(errors_x, 1 + line, label, colour) for line, (label, colour) in enumerate(legend)]
    if not multiclass:
        entries += [(2, 1, "truth's contour", GT_COLOUR), (2, 2, "prediction's contour", PRED_COLOUR)]
    elif class_names:
        x, line = 2, 1
        for k, name in enumerate(class_names[1:], start=1):
            width = 12 + int(measure.textlength(name)) + 12
            if x > 2 and x + width > errors_x - gap:  # wrap within the overlay, truth and prediction columns
                x, line = 2, line + 1
            entries.append((x, line, name, label_colours(np.array([k]))[0]))
            x += width
    lines = 1 + max(line for _, line, _, _ in entries) + (1 if caption else 0)
    header = Image.new("RGB", (panel.shape[1], lines * HEADER_ROW + 4), (32, 32, 32))
    draw = ImageDraw.Draw(header)
    for index, name in enumerate(("overlay", "truth", "prediction", "errors")):
        draw.text((index * (column + gap) + 2, 2), name, fill=(255, 255, 255))
    for x, line, label, colour in entries:
        top = line * HEADER_ROW + 4
        draw.rectangle((x, top, x + 8, top + 8), fill=tuple(int(c) for c in colour))
        draw.text((x + 12, top - 2), label, fill=(255, 255, 255))
    if caption:
        draw.text((2, (lines - 1) * HEADER_ROW + 2), caption, fill=(255, 255, 255))
    return np.concatenate([np.asarray(header), panel], axis=0)


def named_row(row: np.ndarray, name: str) -> np.ndarray:
    """A panel row with `name` written in its top-left corner, on a dark box (volume_panel_png's slice names)."""
    from PIL import ImageDraw

    picture = Image.fromarray(row)
    draw = ImageDraw.Draw(picture)
    draw.rectangle((0, 0, int(draw.textlength(name)) + 5, HEADER_ROW), fill=(32, 32, 32))
    draw.text((3, 2), name, fill=(255, 255, 255))
    return np.asarray(picture)


def pyplot():
    """matplotlib.pyplot drawing into files only (the Agg backend: no display needed), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(figure, path) -> None:
    """A matplotlib figure as the PNG `path` at 100 dpi, atomically (files.write_atomically)."""
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))


def curves_png(epochs: list[dict], path) -> None:
    """Training curves from metrics.jsonl's lines: train loss and validation IoU / Dice (top), lr (bottom)."""
    plt = pyplot()

    x = [line["epoch"] for line in epochs]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(3, 1))
    top.plot(x, [line["train_loss"] for line in epochs], color="tab:blue", label="train loss", marker=".")
    top.set_ylabel("train loss")
    scores = top.twinx()
    validated = [line for line in epochs if "val_iou" in line]  # every --val-every epochs
    for key, colour in (("val_iou", "tab:green"), ("val_dice", "tab:orange")):
        scores.plot([line["epoch"] for line in validated], [line[key] for line in validated], color=colour,
                    label=key.replace("_", " "), marker=".")
    scores.set_ylabel("validation")
    scores.set_ylim(0, 1)
    top.legend(handles=top.get_lines() + scores.get_lines(), loc="center right")
    if validated:
        top.set_title(f"best val IoU {max(line['val_iou'] for line in validated):.4f}")
    bottom.plot(x, [line["lr"] for line in epochs], color="tab:gray", marker=".")
    bottom.set_ylabel("lr")
    bottom.set_xlabel("epoch")
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")  # explicit: `path` may be a temporary name
    plt.close(figure)

