"""Tests of data.check_cases on 2D datasets: every kind of unusable file (empty, cut short, corrupt,
another size, a label map) is found before training and named, all of them in one message, with the same
reason __getitem__ gives; whole datasets in their raw layouts pass. The MSD checks are in test_volumes.py."""
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llm4seg import data
from llm4seg.files import InputError
from dataset_trees import box_mask, make_busi, make_kvasir, write_case, write_split

CASES = [f"case{i}" for i in range(8)]


def folder_tree(root: Path, names: list[str], side: int = 32) -> str:
    """The `folder` layout, images/<name>.png + masks/<name>.png, every case in train; the split file."""
    rng = np.random.default_rng(0)
    for name in names:
        write_case(root / "images" / f"{name}.png", [root / "masks" / f"{name}.png"], [box_mask(side, side, rng)])
    return write_split(root / "split.json", names, [])


def cut_short(path: Path) -> None:
    """As an interrupted copy leaves it."""
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def as_jpeg(root: Path, name: str) -> Path:
    """A noisy JPEG image in place of the case's PNG: mostly compressed data, little header, so cutting it
    in half cuts the data (which check_cases decodes at 1/8 scale)."""
    png = root / "images" / f"{name}.png"
    jpeg = png.with_suffix(".jpg")
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), np.uint8)).save(jpeg, quality=90)
    png.unlink()
    return jpeg


def garbled(path: Path) -> None:
    """The JPEG start marker, then bytes that are no JPEG header (PIL: "Truncated File Read")."""
    path.write_bytes(path.read_bytes()[:2] + np.random.default_rng(1).integers(0, 256, 300, np.uint8).tobytes())


def label_map(path: Path) -> None:
    labels = np.zeros((32, 32), np.uint8)
    labels[4:12], labels[20:28] = 1, 2
    Image.fromarray(labels).save(path)


# what breaks case `name` under root -> the reason check_cases and __getitem__ both give
BREAKAGES = {
    "empty PNG image": (lambda root, name: (root / "images" / f"{name}.png").write_bytes(b""),
                        r"cannot read image file .*images/{name}\.png: the file is empty \(0 bytes\)"),
    "PNG image cut short": (lambda root, name: cut_short(root / "images" / f"{name}.png"),
                            r"cannot read image file .*images/{name}\.png: .*[Tt]runcated"),
    "PNG mask cut short": (lambda root, name: cut_short(root / "masks" / f"{name}.png"),
                           r"cannot read image file .*masks/{name}\.png: .*truncated"),
    "JPEG image cut short": (lambda root, name: cut_short(as_jpeg(root, name)),
                             r"cannot read image file .*images/{name}\.jpg: image file is truncated"),
    "corrupt JPEG image": (lambda root, name: garbled(as_jpeg(root, name)),
                           r"cannot read image file .*images/{name}\.jpg: \S"),
    "mask of another size": (lambda root, name: Image.new("L", (32, 30)).save(root / "masks" / f"{name}.png"),
                             r"image .*images/{name}\.png is 32x32 but its mask .*masks/{name}\.png is 32x30"),
    "label-map mask": (lambda root, name: label_map(root / "masks" / f"{name}.png"),
                       r"mask .*masks/{name}\.png holds the labels \{{0, 1, 2\}}: expected a binary mask"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_each_unusable_file_is_found_and_named(tmp_path, breakage):
    split = folder_tree(tmp_path, CASES[:4])
    damage, reason = BREAKAGES[breakage]
    damage(tmp_path, "case2")
    dataset = data.load_dataset("folder", str(tmp_path), "train", img_size=16, split_file=split)
    reason = reason.format(name="case2")
    with pytest.raises(InputError, match=r"^1 of 4 cases cannot be used:\n  " + reason) as raised:
        data.check_cases(dataset)
    assert "case0" not in str(raised.value) and "case3" not in str(raised.value)
    with pytest.raises(InputError, match=reason):
        dataset[[case.name for case in dataset.cases].index("case2")]


def test_every_unusable_file_is_listed_in_one_message(tmp_path):
    split = folder_tree(tmp_path, CASES)
    broken = dict(zip(CASES[:5], ["empty PNG image", "PNG mask cut short", "corrupt JPEG image", "mask of another size",
                              "label-map mask"], strict=True))
    for name, breakage in broken.items():
        BREAKAGES[breakage][0](tmp_path, name)
    # case5 has two bad files (the image is empty and the mask a label map): both are named.
    BREAKAGES["empty PNG image"][0](tmp_path, "case5")
    BREAKAGES["label-map mask"][0](tmp_path, "case5")
    dataset = data.load_dataset("folder", str(tmp_path), "train", img_size=16, split_file=split)
    with pytest.raises(InputError) as raised:
        data.check_cases(dataset)
    lines = str(raised.value).splitlines()
    assert lines[0] == "6 of 8 cases cannot be used:"
    expected = [BREAKAGES[breakage][1].format(name=name) for name, breakage in broken.items()] + [
        BREAKAGES["empty PNG image"][1].format(name="case5"), BREAKAGES["label-map mask"][1].format(name="case5")]
    assert len(lines) == 1 + len(expected) + 1
    for line, reason in zip(lines[1:-1], expected, strict=True):
        assert re.match("  " + reason, line), (line, reason)
    assert lines[-1].startswith("expected every case readable: replace these files")
    assert not any(name in str(raised.value) for name in ("case6", "case7"))


def test_a_long_list_is_cut_at_twenty_files(tmp_path):
    names = [f"c{i:02d}" for i in range(25)]
    split = folder_tree(tmp_path, names, side=16)
    for name in names[:23]:
        (tmp_path / "masks" / f"{name}.png").write_bytes(b"")
    with pytest.raises(InputError) as raised:
        data.check_cases(data.load_dataset("folder", str(tmp_path), "train", img_size=16, split_file=split))
    lines = str(raised.value).splitlines()
    assert lines[0] == "23 of 25 cases cannot be used:"
    assert len(lines) == 1 + data.LISTED_PROBLEMS + 2 and lines[-2] == "  ... and 3 more"


def test_whole_datasets_in_their_raw_layouts_pass(tmp_path):
    """Kvasir's JPEG masks (with compression noise), BUSI's several masks per case and its normal cases."""
    make_kvasir(tmp_path / "kvasir" / "Kvasir-SEG", 10)
    make_busi(tmp_path / "busi" / "Dataset_BUSI_with_GT")
    for split in ("train", "val"):
        data.check_cases(data.load_dataset("kvasir", str(tmp_path / "kvasir"), split, img_size=16))
        data.check_cases(data.load_dataset("busi", str(tmp_path / "busi"), split, img_size=16, include_normal=True))
    data.check_cases(data.load_dataset("synthetic", split="train", img_size=16))
