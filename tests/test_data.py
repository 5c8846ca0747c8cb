"""Tests of the data package: mask encodings and refused label maps, splits (written once, reused, the authors'
lists), augmentation alignment and its determinism per (seed, epoch, index) across DataLoader workers,
and every bad-input error of load_dataset. data.check_cases has its own file, test_data_checks.py."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from llm4seg import data
from llm4seg.files import InputError
from llm4seg.data.generated import draw_polyp_scene
from dataset_trees import box_mask, make_busi, make_kvasir, symmetries, unnormalise, write_case, write_split


def rgba(mask: np.ndarray) -> Image.Image:
    """Transparent background whose colour is white: only alpha marks the foreground."""
    pixels = np.full(mask.shape + (4,), 255, dtype=np.uint8)
    pixels[..., 3] = mask * 255
    return Image.fromarray(pixels, "RGBA")


def palette(mask: np.ndarray) -> Image.Image:
    image = Image.fromarray(mask.astype(np.uint8), "P")
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)  # index 1 = dark red, max channel 200
    return image


MASK_ENCODINGS = {
    "L 0/255": lambda m: Image.fromarray(m.astype(np.uint8) * 255),
    "L 0/1 labels": lambda m: Image.fromarray(m.astype(np.uint8)),
    "1 bit": lambda m: Image.fromarray(m),
    "RGB red": lambda m: Image.fromarray(np.stack([m * 255, m * 0, m * 0], -1).astype(np.uint8)),
    "RGBA alpha": rgba,
    "P palette": palette,
    "I;16": lambda m: Image.fromarray(m.astype(np.uint16) * 65535),
}


@pytest.mark.parametrize("encoding", MASK_ENCODINGS)
def test_mask_encodings_binarise_to_the_drawn_shape(encoding):
    mask = box_mask(32, 32, np.random.default_rng(4))
    assert np.array_equal(data.mask_to_binary(MASK_ENCODINGS[encoding](mask)), mask)


@pytest.mark.parametrize("quality", [50, 75, 95])
def test_lossy_jpeg_masks_are_binary(quality, tmp_path):
    """Kvasir ships its masks as JPEGs: the compression's noise near both ends and at the edges is no third
    region, and the mask thresholds back to the drawn shape but for a few edge pixels."""
    mask = box_mask(96, 128, np.random.default_rng(5))
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.jpg", quality=quality)
    binary = data.mask_to_binary(Image.open(tmp_path / "mask.jpg"))
    assert (binary != mask).mean() < 0.01


def three_labels() -> np.ndarray:
    labels = np.zeros((8, 8), np.uint8)
    labels[2:4], labels[5:7] = 1, 2
    return labels


LABEL_MAPS = {
    "L {0, 1, 2}": (lambda: Image.fromarray(three_labels()), r"holds the labels \{0, 1, 2\}"),
    "I;16 {0, 1, 2}": (lambda: Image.fromarray(three_labels().astype(np.uint16)), r"holds the labels \{0, 1, 2\}"),
    "P, 3 colours": (lambda: palette(three_labels()), r"holds the palette labels \{0, 1, 2\}"),
    # A third value across a region is a label map however bright (issue 31, item 17): not thresholded at 128.
    "L {0, 37, 200}": (lambda: Image.fromarray(np.choose(three_labels(), [0, 37, 200]).astype(np.uint8)),
                       r"holds the regions of the values \{0, 37, 200\}"),
    "L {0, 200, 255}": (lambda: Image.fromarray(np.choose(three_labels(), [0, 200, 255]).astype(np.uint8)),
                        r"holds the regions of the values \{0, 200, 255\}"),
}


@pytest.mark.parametrize("label_map", LABEL_MAPS)
def test_label_maps_are_refused_not_thresholded(label_map):
    """Thresholded at 128, {0, 1, 2} would be an empty mask; a label map is no binary mask."""
    make, message = LABEL_MAPS[label_map]
    with pytest.raises(ValueError, match=message + r": expected a binary mask \(0/255 or 0/1\)"):
        data.mask_to_binary(make())


def test_include_normal_is_busis_and_ignored_by_generated_data():
    assert len(data.load_dataset("synthetic", split="val", img_size=16, synthetic_size=10, include_normal=True)) == 2
    with pytest.raises(ValueError, match="include_normal applies to busi only, got it for kvasir"):
        data.load_dataset("kvasir", include_normal=True)


def test_split_written_once_reused_disjoint_and_editable(tmp_path):
    make_kvasir(tmp_path / "Kvasir-SEG", 20)
    names = {s: [d["name"] for d in data.load_dataset("kvasir", str(tmp_path), s, img_size=32)]
             for s in data.SPLITS}
    again = {s: [d["name"] for d in data.load_dataset("kvasir", str(tmp_path), s, img_size=32)]
             for s in data.SPLITS}
    assert names == again
    sets = [set(names[s]) for s in data.SPLITS]
    assert sum(map(len, sets)) == len(set.union(*sets)) == 20, "disjoint and complete"
    files = list(tmp_path.glob("llm4seg_split_kvasir_seed41*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert {s: sorted(names[s]) for s in data.SPLITS} == {s: stored[s] for s in data.SPLITS}
    # The file is the source of truth: moving a case in it moves it in the datasets.
    moved = stored["train"].pop()
    stored["val"].append(moved)
    files[0].write_text(json.dumps(stored))
    assert moved in [d["name"] for d in data.load_dataset("kvasir", str(tmp_path), "val", img_size=32)]
    other_seed = data.load_dataset("kvasir", str(tmp_path), "val", img_size=32, seed=7)
    assert len(list(tmp_path.glob("llm4seg_split_kvasir_*.json"))) == 2
    assert [d["name"] for d in other_seed] != sorted(names["val"])


def test_authors_lists_are_used_when_present(tmp_path, capsys):
    make_busi(tmp_path / "Dataset_BUSI_with_GT")
    (tmp_path / "busi_train1.txt").write_text("benign (1)\nbenign (2)\nmalignant (1).png\n")
    (tmp_path / "busi_val1.txt").write_text("benign (3)\n\nmalignant (2)\n")
    train = data.load_dataset("busi", str(tmp_path), "train", img_size=32)
    assert sorted(d["name"] for d in train) == ["benign (1)", "benign (2)", "malignant (1)"]
    assert "5 cases found are in no list and unused" in capsys.readouterr().out
    with pytest.raises(ValueError, match="use_author_lists=False"):
        data.load_dataset("busi", str(tmp_path), "test", img_size=32)
    assert len(data.load_dataset("busi", str(tmp_path), "val", img_size=32,
                                 use_author_lists=False)) == 3
    (tmp_path / "busi_val1.txt").write_text("benign (99)\n")
    with pytest.raises(ValueError, match=r"1 cases named in .* not in the data .*benign \(99\)"):
        data.load_dataset("busi", str(tmp_path), "val", img_size=32)


@pytest.fixture
def l_shape_case(tmp_path) -> str:
    """One 48x32 (W x H) case: a white L on black, the same L in the mask, in the train split.
    Its strokes follow the 3x / 2x resize blocks to 16 x 16, so resizing keeps it exact."""
    mask = np.zeros((32, 48), dtype=bool)
    mask[4:24, 6:12] = True
    mask[20:24, 6:30] = True
    for split_dir in ("images", "masks"):
        (tmp_path / split_dir).mkdir()
    Image.fromarray(np.stack([mask * 255] * 3, -1).astype(np.uint8)).save(tmp_path / "images" / "l.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "masks" / "l.png")
    return write_split(tmp_path / "split.json", ["l"], [])


def test_augmentation_keeps_image_and_mask_aligned_and_reaches_all_symmetries(tmp_path, l_shape_case):
    dataset = data.load_dataset("folder", str(tmp_path), "train", img_size=16, split_file=l_shape_case)
    orientations = set()
    for epoch in range(40):
        dataset.epoch = epoch
        item = dataset[0]
        image = unnormalise(item["image"])
        assert torch.equal((image[0] > 0.5).float(), item["mask"][0])
        orientations.add(str(item["mask"].tolist()))
    assert len(orientations) == 8, "rot90 x flips reach all 8 symmetries of the square"
    val = data.load_dataset("folder", str(tmp_path), "val", img_size=16, split_file=write_split(
        tmp_path / "val.json", [], ["l"]))
    upright = val[0]["mask"]
    assert upright[0, 2:12, 2:4].all() and upright[0, 10:12, 2:10].all(), "val is not augmented"
    assert all(torch.equal(val[0]["mask"], upright) for _ in range(5))


@pytest.fixture
def eight_train_cases(tmp_path) -> data.SegmentationFiles:
    make_kvasir(tmp_path / "Kvasir-SEG", 8)
    names = [f"cju{i:04d}kvasir" for i in range(8)]
    return data.load_dataset("kvasir", str(tmp_path), "train", img_size=32, seed=5,
                             split_file=write_split(tmp_path / "split.json", names, []))


def masks_of(dataset, epoch: int) -> list[torch.Tensor]:
    dataset.epoch = epoch
    return [dataset[index]["mask"] for index in range(len(dataset))]


def test_augmentation_is_a_function_of_seed_epoch_and_index(eight_train_cases):
    """Not of the global RNG: a run resumed mid-epoch redraws the same items. 8 cases, so another epoch
    repeating every draw has chance 8^-8."""
    torch.manual_seed(0)
    first = masks_of(eight_train_cases, 2)
    torch.manual_seed(1)
    torch.rand(5)
    assert all(torch.equal(a, b) for a, b in zip(first, masks_of(eight_train_cases, 2), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, masks_of(eight_train_cases, 3), strict=True))
    eight_train_cases.seed = 6
    assert not all(torch.equal(a, b) for a, b in zip(first, masks_of(eight_train_cases, 2), strict=True))


def test_dataloader_workers_give_the_items_of_one_process(eight_train_cases):
    eight_train_cases.epoch = 3

    def masks(workers: int) -> torch.Tensor:
        loader = torch.utils.data.DataLoader(eight_train_cases, batch_size=3, num_workers=workers)
        return torch.cat([batch["mask"] for batch in loader])   # (8, 1, 32, 32)

    in_process = masks(0)
    assert torch.equal(in_process, masks(2))
    assert len({str(m.tolist()) for m in in_process}) == 8


def test_synthetic_augmentation_is_seeded_apart_from_its_scene():
    """The scene is drawn as before from (seed, scene index); the epoch only turns or flips it."""
    train = data.load_dataset("synthetic", split="train", img_size=32, seed=3, synthetic_size=10)
    _, scene_mask = draw_polyp_scene(32, torch.Generator().manual_seed(3 * 1_000_003 + 4))
    drawn = set()
    for epoch in range(6):
        train.epoch = epoch
        torch.manual_seed(epoch)  # the global RNG must not matter
        mask = train[4]["mask"]
        assert any(torch.equal(mask, s) for s in symmetries(scene_mask))
        assert torch.equal(mask, train[4]["mask"])
        drawn.add(str(mask.tolist()))
    assert len(drawn) > 1


def test_unreadable_image_names_the_file(tmp_path, l_shape_case):
    (tmp_path / "images" / "l.png").write_bytes(b"not a png")
    dataset = data.load_dataset("folder", str(tmp_path), "train", img_size=16, split_file=l_shape_case)
    with pytest.raises(InputError, match=r"cannot read image file .*images/l\.png"):
        dataset[0]


def test_size_mismatch_names_image_and_mask(tmp_path, l_shape_case):
    Image.fromarray(np.zeros((30, 48), np.uint8)).save(tmp_path / "masks" / "l.png")
    dataset = data.load_dataset("folder", str(tmp_path), "train", img_size=16, split_file=l_shape_case)
    with pytest.raises(InputError, match=r"image .*images/l\.png is 48x32 but its mask .*masks/l\.png is 48x30"):
        dataset[0]


def test_wrong_names_options_and_stale_split_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'kvasir-seg': expected one of kvasir"):
        data.check_dataset_name("kvasir-seg")
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        data.load_dataset("synthetic", split="valid")
    make_busi(tmp_path / "Dataset_BUSI_with_GT")
    with pytest.raises(ValueError, match="no test cases .* test fraction > 0 .train.py --test-fraction 0.1."):
        data.load_dataset("busi", str(tmp_path), "test")
    data.load_dataset("busi", str(tmp_path), "val")
    write_case(tmp_path / "Dataset_BUSI_with_GT" / "benign" / "benign (7).png",
               [tmp_path / "Dataset_BUSI_with_GT" / "benign" / "benign (7)_mask.png"],
               [np.ones((8, 8), bool)])
    with pytest.raises(ValueError, match=r"1 cases in the data are in no split .*benign \(7\).*Delete it"):
        data.load_dataset("busi", str(tmp_path), "val")
    with pytest.raises(ValueError, match=r"1 cases are in more than one split .*benign \(1\)"):
        data.load_dataset("busi", str(tmp_path), "val", split_file=write_split(
            tmp_path / "leak.json", ["benign (1)"], ["benign (1)"]))
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(InputError, match=r"split file .*bad\.json is unreadable"):
        data.load_dataset("busi", str(tmp_path), "val", split_file=str(tmp_path / "bad.json"))
