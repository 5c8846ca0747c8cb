"""Reading one 2D case: the image as RGB, its mask(s) as one binary mask or one label map (the package
docstring says which encodings are accepted and which refused), resized to S x S, augmented by the symmetry
drawn from (seed, epoch, index), normalised with ImageNet's mean and std; case_problems names each unusable
file of a case."""
import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...files import InputError
from ..cases import Case

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DRAFT_FACTOR = 4  # JPEGs with both sides >= 4 S are decoded at a reduced scale (decode_image)
MAX_LABEL = 255  # a label map's values are stored in the cache's uint8 mask channel


def open_image(path: Path) -> Image.Image:
    """The decoded image; InputError naming the file when it is empty, cut short or not an image."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise unreadable_image(path, err) from err
    return image


def unreadable_image(path: Path, error: Exception) -> InputError:
    reason = "the file is empty (0 bytes)" if path.is_file() and path.stat().st_size == 0 else str(error)
    return InputError(f"cannot read image file {path}: {reason}. Replace it with the dataset's own copy, "
                      "or remove the case.")


def checked_size(path: Path) -> tuple[int, int]:
    """An image file's (W, H) from its header, after checking that the file reads to its end without
    decoding all of it: a PNG by its chunks' checksums (verify), a JPEG decoded at 1/8 scale (draft;
    every byte is still read, so a cut file fails), other formats in full. Measured: a 622 x 530 PNG
    verifies in 0.07 ms against 5.7 ms to decode, a 4000 x 3000 JPEG (ISIC's size) takes 18 ms against
    56 ms; 1000 Kvasir-sized JPEG pairs check in about 2 s, mask decoding included."""
    try:
        with Image.open(path) as image:
            size = image.size
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
                image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise unreadable_image(path, err) from err
    return size


def to_numeric_gray(image: Image.Image) -> np.ndarray | None:
    """(H, W) values on an 8-bit scale for 1-channel integer modes, None for colour modes."""
    if image.mode not in ("L", "I", "I;16", "I;16B", "I;16L"):
        return None
    values = np.asarray(image)
    if values.dtype == np.uint8:
        return values  # "L" as it is: widening ISIC's 4000 x 3000 masks to int64 took 20 ms each
    values = values.astype(np.int64)
    # 16-bit files keep 0..65535; bring them to 0..255 so one threshold fits all.
    return values // 257 if values.max(initial=0) > 255 else values


def read_rgb(path: Path) -> Image.Image:
    return as_rgb(open_image(path))


def as_rgb(image: Image.Image) -> Image.Image:
    """Any decoded image as RGB: gray ones (16-bit scaled to 8 bits) repeated, RGBA / palette / CMYK converted."""
    gray = to_numeric_gray(image)
    if gray is not None:
        return Image.fromarray(gray.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def decode_image(path: Path, img_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(S, S, 3) uint8 RGB resized bilinear (resized_rgb's pixels), and the file's full size (W, H).

    A JPEG whose sides are both >= DRAFT_FACTOR * S is decoded at a reduced DCT scale (PIL's draft: 1/2, 1/4
    or 1/8, the smallest keeping both sides >= 2 S, so the bilinear resize still averages >= 2 pixels per
    output pixel): an ISIC-sized 4000 x 3000 JPEG decodes at 1000 x 750 in 26 ms instead of 151 ms, within
    max 2 / mean 0.21 grey levels of the full decode at 256 px, where bilinear and bicubic resizing of the
    same full decode differ by max 9 / mean 1.49 (tests/bench_loader.py measures it). A Kvasir-sized
    622 x 530 JPEG is below 4 x 256 and decoded in full (a 1/2-scale draft there differed by max 8 /
    mean 0.70, more than the resize filters do). Every other image is decoded in full, as read_rgb does."""
    try:
        image = Image.open(path)
        size = image.size
        if image.format == "JPEG" and min(size) >= DRAFT_FACTOR * img_size:
            image.draft("RGB", (2 * img_size, 2 * img_size))
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise unreadable_image(path, err) from err
    return np.asarray(as_rgb(image).resize((img_size, img_size), Image.Resampling.BILINEAR)), size


def decode_case(case: Case, img_size: int, multiclass: bool = False) -> np.ndarray:
    """One case as the cache stores it: (4, S, S) uint8, RGB in channels 0..2 (decode_image) and in channel 3
    the mask's 0 / 1 (the union of its masks) or, with multiclass, its label values (read_label_map), resized
    nearest so no value is blended with its neighbour's. InputError naming the first unusable file
    (case_problems names them all)."""
    rgb, size = decode_image(case.image, img_size)                                   # (S, S, 3)
    mask = read_labels(case, size) if multiclass else read_mask(case, size).astype(np.uint8)  # (H, W)
    mask = np.asarray(Image.fromarray(mask).resize((img_size, img_size), Image.Resampling.NEAREST))  # (S, S)
    pixels = np.empty((4, img_size, img_size), np.uint8)
    pixels[:3], pixels[3] = rgb.transpose(2, 0, 1), mask                            # (3, S, S) <- (S, S, 3)
    return pixels


def label_map_error(kind: str, values: np.ndarray) -> ValueError:
    shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
    return ValueError(f"holds the {kind} {{{shown}}}: expected a binary mask (0/255 or 0/1); a folder of "
                      "label maps trains with --multiclass")


# A binary mask's pixels sit near its two ends, background and foreground; a lossy format (Kvasir's masks are
# JPEGs) spreads a few of them over other values, each a sliver of the image. A value that covers at least
# PLATEAU_SHARE of the image away from both ends by more than JPEG_NOISE is a third region: a label map.
PLATEAU_SHARE = 0.01
JPEG_NOISE = 16


def mask_to_binary(mask: Image.Image) -> np.ndarray:
    """Any binary mask image -> (H, W) bool foreground; ValueError for a label map (its largest value
    2..127, a palette mask using more than 2 colours, or regions of a third value such as {0, 37, 200}), which
    no threshold turns into the right mask."""
    if mask.mode == "1":
        return np.asarray(mask, dtype=bool)
    if mask.mode == "P" and len(indices := np.unique(np.asarray(mask))) > 2:
        raise label_map_error("palette labels", indices)
    values = to_numeric_gray(mask)
    if values is None:
        # RGBA over black lets a transparent background count as background whatever its colour;
        # palette masks go through their colours, since the index order means nothing.
        rgba = np.asarray(mask.convert("RGBA"), dtype=np.float32)                # (H, W, 4)
        values = (rgba[..., :3] * rgba[..., 3:] / 255).max(axis=-1).round()    # (H, W)
    largest = values.max(initial=0)
    if largest <= 1:
        return values == 1  # a label map of 0 / 1, not a dark 8-bit picture
    if largest < 128:
        raise label_map_error("labels", np.unique(values).astype(np.int64))
    counts = np.bincount(values.astype(np.int64).ravel(), minlength=256)
    plateaus = np.flatnonzero(counts >= PLATEAU_SHARE * values.size)   # the values that cover whole regions
    if len(plateaus) and (np.minimum(plateaus - plateaus[0], plateaus[-1] - plateaus) > JPEG_NOISE).any():
        raise label_map_error("regions of the values", plateaus)
    return values >= 128  # bright foreground; JPEG noise leaves values between 0 and 255


def read_binary_mask(path: Path, image: Path, image_size: tuple[int, int] | None) -> np.ndarray:
    """One mask file -> (H, W) bool; InputError naming it when it is unreadable, of another size than its
    image (image_size (W, H); None: the image is unreadable, sizes are not compared) or a label map."""
    mask = open_mask(path, image, image_size)
    try:
        return mask_to_binary(mask)
    except ValueError as err:
        raise InputError(f"mask {path} {err}. Make it binary or remove the case.") from err


def open_mask(path: Path, image: Path, image_size: tuple[int, int] | None) -> Image.Image:
    """The decoded mask file; InputError naming it when it is unreadable or of another size than its image."""
    mask = open_image(path)
    if image_size is not None and mask.size != image_size:
        raise InputError(f"image {image} is {image_size[0]}x{image_size[1]} but its mask {path} is "
                         f"{mask.size[0]}x{mask.size[1]}; expected the same size. Fix or remove this pair.")
    return mask


def mask_to_labels(mask: Image.Image) -> np.ndarray:
    """A label-map mask image -> (H, W) uint8, its values the classes; ValueError for what holds no class
    numbers (a colour or alpha image, a JPEG, float or negative values) or values above MAX_LABEL."""
    if mask.format == "JPEG":
        raise ValueError("is a JPEG, whose compression invents values between the labels: expected a lossless PNG "
                         "whose values are the classes 0..K-1")
    if mask.mode in ("1", "L", "P"):  # P: the palette index is the class, whatever its colour
        return np.asarray(mask, dtype=np.uint8)
    if mask.mode not in ("I", "I;16", "I;16B", "I;16L"):
        raise ValueError(f"has the mode {mask.mode}: with multiclass a mask is a label map whose values are the "
                         "classes; expected a gray (L) or palette (P) PNG of the values 0..K-1, not colours (convert "
                         "a colour-coded mask to class numbers first)")
    values = np.asarray(mask)
    if values.min(initial=0) < 0 or values.max(initial=0) > MAX_LABEL:
        raise ValueError(f"holds values {values.min()}..{values.max()}: expected labels 0..{MAX_LABEL}")
    return values.astype(np.uint8)


def read_label_map(path: Path, image: Path, image_size: tuple[int, int] | None) -> np.ndarray:
    """One label-map mask file -> (H, W) uint8 labels (mask_to_labels); InputError naming it when it is
    unreadable, of another size than its image (image_size as read_binary_mask's) or holds no class numbers."""
    mask = open_mask(path, image, image_size)
    try:
        return mask_to_labels(mask)
    except ValueError as err:
        raise InputError(f"mask {path} {err}. Save it as a label map or remove the case.") from err


def read_mask(case: Case, image_size: tuple[int, int]) -> np.ndarray:
    """The union of the case's masks, (H, W) bool; each must have the image's size (W, H)."""
    union = np.zeros(image_size[::-1], dtype=bool)  # PIL sizes are (W, H)
    for path in case.masks:
        union |= read_binary_mask(path, case.image, image_size)
    return union


def read_labels(case: Case, image_size: tuple[int, int]) -> np.ndarray:
    """The case's label map, (H, W) uint8, at the image's size (W, H)."""
    assert len(case.masks) == 1, "multiclass datasets (folder) pair one mask with each image"
    return read_label_map(case.masks[0], case.image, image_size)


def case_problems(case: Case, multiclass: bool = False) -> list[str]:
    """What makes a case unusable, one line per bad file; [] when __getitem__ can read it."""
    problems, size = [], None
    try:
        size = checked_size(case.image)
    except InputError as error:
        problems.append(str(error))
    for path in case.masks:
        try:
            (read_label_map if multiclass else read_binary_mask)(path, case.image, size)
        except InputError as error:
            problems.append(str(error))
    return problems


def augmentation_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one item's augmentation: (seed, epoch, index) hashed by numpy's SeedSequence, so
    neighbouring triples give unrelated draws, and nothing else (no global or per-worker RNG) enters."""
    # SeedSequence takes non-negative integers only, and --seed may be negative.
    state = np.random.SeedSequence([seed % 2**64, epoch, index]).generate_state(1)  # one uint32
    return torch.Generator().manual_seed(int(state[0]))


def random_symmetry(image: torch.Tensor, mask: torch.Tensor,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random rotation by k * 90 degrees and flips for image (3, S, S) and mask (1, S, S)."""
    turns, dims = draw_symmetry(generator)
    image, mask = image.rot90(turns, (1, 2)), mask.rot90(turns, (1, 2))
    if dims:
        image, mask = image.flip(dims), mask.flip(dims)
    return image.contiguous(), mask.contiguous()


def draw_symmetry(generator: torch.Generator) -> tuple[int, list[int]]:
    """A random symmetry of the square as (quarter turns from axis 1 towards axis 2, axes to flip after), of a
    (C, S, S) array."""
    turns = int(torch.randint(4, (), generator=generator))
    flip_horizontal, flip_vertical = (torch.rand(2, generator=generator) < 0.5).tolist()
    return turns, [d for d, flip in ((2, flip_horizontal), (1, flip_vertical)) if flip]


def resized_rgb(rgb: Image.Image, img_size: int) -> torch.Tensor:
    """An RGB PIL image -> (3, S, S) float in [0, 1] at S = img_size. PIL's bilinear antialiases when
    shrinking (ISIC images are ~4000 px wide). Training data and new images (prediction.py, outputs.py) both pass here."""
    resized = np.array(rgb.resize((img_size, img_size), Image.Resampling.BILINEAR))   # (S, S, 3)
    return torch.from_numpy(resized).permute(2, 0, 1).float() / 255                  # (3, S, S)


def make_item(image: torch.Tensor, mask: torch.Tensor, name: str,
              augmentation: torch.Generator | None) -> dict:
    """image (3, S, S) in [0, 1], mask (1, S, S) in {0, 1} -> the dataset item, augmented by a random
    symmetry drawn from `augmentation` (None: as it is)."""
    if augmentation is not None:
        image, mask = random_symmetry(image, mask, augmentation)
    return {"image": normalize(image), "mask": mask, "name": name}


def normalize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] -> (rgb - mean) / std with ImageNet's mean and std, once."""
    return (image - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """The inverse of normalize: an item's (3, H, W) image -> RGB in [0, 1]."""
    return image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """A batch on its device: uint8 RGB (B, 3, H, W) of raw items (EpochItems) -> normalize(images / 255), the
    float32 operations of an item's, done there; float batches (normalised items, volumes) as they are."""
    if images.dtype != torch.uint8:
        return images
    mean, std = imagenet_statistics(images.device)
    return (images.float() / 255 - mean) / std


@functools.cache
def imagenet_statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std as (1, 3, 1, 1) tensors on `device`, copied there once (a copy from the host per
    step would wait for the GPU's queue)."""
    return (torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(device),
            torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).to(device))
