"""BTCV through data.load_dataset (data/volumes/btcv.py): both layouts users have, the official split and
dataset_0.json's, UNETR's preprocessing against MONAI's own transforms on the same files, the original grid
recorded and mapped back, every kind of bad input as one line naming its file (and all of them listed by
data.check_cases), the cache. Trees are tiny NIfTI files (40 x 36 x 12 voxels, LPS, anisotropic) written by
dataset_trees.make_btcv."""
import json
import re
import shutil

import nibabel
import numpy as np
import pytest
import torch

from llm4seg import data
from llm4seg.files import InputError
from llm4seg.data.volumes import BTCV_TRAIN, BTCV_VAL, to_original_grid
from dataset_trees import BTCV_SHAPE, CACHE_DAMAGE, LPS_AFFINE, SWAPPED_AFFINE, make_btcv

OFFICIAL = (*range(1, 11), *range(21, 41))  # the 30 labelled CTs of RawData.zip
# Voxels of exactly the target spacing, LPS (flipped) and with two axes swapped: resampling is the identity,
# so mapping the preprocessed label back must give the stored label voxel for voxel.
EXACT_LPS = np.array([[-1.5, 0, 0, 10.0], [0, -1.5, 0, 20.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])
EXACT_SWAPPED = np.array([[0, -1.5, 0, 10.0], [1.5, 0, 0, 20.0], [0, 0, -2.0, 5.0], [0, 0, 0, 1]])


def names(dataset) -> list[str]:
    return [case.name for case in dataset.cases]


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory):
    """The challenge's layout with all 30 labelled cases, read-only for the tests that use it."""
    root = tmp_path_factory.mktemp("btcv-challenge")
    make_btcv(root, "challenge", numbers=OFFICIAL)
    return root


@pytest.fixture()
def unetr(tmp_path):
    """UNETR's layout: 3 training cases and 1 validation case in dataset_0.json; case 2 has two axes swapped."""
    make_btcv(tmp_path, "unetr", numbers=(1, 2, 3, 35), affines={2: SWAPPED_AFFINE})
    return tmp_path


@pytest.mark.parametrize("below", ["", "RawData", "RawData/Training"])
def test_the_challenge_layout_is_found_from_each_folder_and_split_officially(raw_data, below):
    root = str(raw_data / below)
    train, val = (data.load_dataset("btcv", root, split) for split in ("train", "val"))
    assert names(train) == list(BTCV_TRAIN) and names(val) == list(BTCV_VAL)
    assert len(BTCV_TRAIN) == 24 and BTCV_TRAIN[9:11] == ("img0010", "img0021") and BTCV_VAL == tuple(
        f"img00{i}" for i in range(35, 41))
    assert len(train) == 24 * 4  # 4 patches per volume and epoch
    case = val.cases[0]
    assert case.image == raw_data / "RawData/Training/img/img0035.nii.gz"
    assert case.masks == (raw_data / "RawData/Training/label/label0035.nii.gz",)


def test_the_unetr_layout_without_dataset_json_is_split_officially(tmp_path):
    make_btcv(tmp_path, "unetr", numbers=OFFICIAL, dataset_json=None)
    assert names(data.load_dataset("btcv", str(tmp_path), "val")) == list(BTCV_VAL)
    assert data.load_dataset("btcv", str(tmp_path), "val").cases[0].masks[0].parent.name == "labelsTr"


def test_dataset_0_json_lists_are_honoured(unetr, tmp_path_factory):
    assert names(data.load_dataset("btcv", str(unetr), "train")) == ["img0001", "img0002", "img0003"]
    assert names(data.load_dataset("btcv", str(unetr), "val")) == ["img0035"]
    # "training" alone: its cases split as the official split does
    only_training = tmp_path_factory.mktemp("training-only")
    make_btcv(only_training, "unetr", numbers=(1, 2, 36), dataset_json="training")
    assert names(data.load_dataset("btcv", str(only_training), "val")) == ["img0036"]


def test_dataset_0_json_naming_absent_files_is_one_error(unetr):
    (unetr / "imagesTr" / "img0002.nii.gz").unlink()
    (unetr / "labelsTr" / "label0035.nii.gz").unlink()
    with pytest.raises(InputError, match=r"dataset_0.json names 2 files that are absent: imagesTr/img0002.nii.gz, "
                                         r"labelsTr/label0035.nii.gz; expected every listed image and label"):
        data.load_dataset("btcv", str(unetr), "train")
    (unetr / "dataset_0.json").write_text("{not json")
    with pytest.raises(InputError, match="dataset_0.json is not a usable dataset_0.json"):
        data.load_dataset("btcv", str(unetr), "train")


@pytest.mark.parametrize("entry", ["../elsewhere/img0001.nii.gz", "/etc/passwd", "imagesTr/../../img0001.nii.gz"])
def test_dataset_0_json_entries_outside_the_folder_are_refused(tmp_path, entry):
    """An entry that leaves the data folder was read, trained on and cached without a word (issue 31, item 22);
    /etc/passwd was refused only as "not NIfTI"."""
    make_btcv(tmp_path, "unetr", numbers=(1, 35), dataset_json="split")
    index = json.loads((tmp_path / "dataset_0.json").read_text())
    index["training"][0]["image"] = entry
    (tmp_path / "dataset_0.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=rf"dataset_0\.json lists '{re.escape(entry)}', which is outside .*; expected "
                                         "paths inside the folder it describes"):
        data.load_dataset("btcv", str(tmp_path), "train")


def test_official_cases_missing_from_the_folder_are_listed(tmp_path):
    make_btcv(tmp_path, "challenge", numbers=(1, 2, 35))
    with pytest.raises(InputError, match=r"btcv: 44 files of the cases in the official split \(UNETR's\) are "
                                         r"missing under .*Training: img/img0003.nii.gz, label/label0003.nii.gz, "
                                         r".*Restore them, or train a run on the cases you have \(train.py "
                                         r"--split-file <JSON of them>\)\.$"):
        data.load_dataset("btcv", str(tmp_path), "train")


def test_a_missing_dataset_says_where_to_get_it_and_which_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"btcv: expected the layout RawData/Training/img/img0001.nii.gz .*"
                                                r"imagesTr/img0001.nii.gz .* found none. Get it from "
                                                r"https://www.synapse.org/.*account"):
        data.load_dataset("btcv", str(tmp_path / "nowhere"), "train")


def test_no_test_split_and_the_options_btcv_refuses(unetr):
    with pytest.raises(ValueError, match="btcv has no test cases .*BTCV has no test split .*no public labels"):
        data.load_dataset("btcv", str(unetr), "test")
    with pytest.raises(ValueError, match="btcv has a fixed split"):
        data.load_dataset("btcv", str(unetr), "train", val_fraction=0.2)
    with pytest.raises(ValueError, match="multiclass applies to msd .*btcv is multi-class already"):
        data.load_dataset("btcv", str(unetr), "train", multiclass=True)


def monai_preprocessed(case) -> dict:
    """UNETR's BTCV transforms as its code writes them, up to the random crop."""
    from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, LoadImaged, Orientationd,
                                  ScaleIntensityRanged, Spacingd)

    keys = ["image", "label"]
    transforms = Compose([
        LoadImaged(keys=keys, reader="NibabelReader"), EnsureChannelFirstd(keys=keys, channel_dim="no_channel"),
        Orientationd(keys=keys, axcodes="RAS", labels=None),
        Spacingd(keys=keys, pixdim=(1.5, 1.5, 2.0), mode=("bilinear", "nearest")),
        ScaleIntensityRanged(keys=["image"], a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key="image")])
    return transforms({"image": str(case.image), "label": str(case.masks[0])})


def test_preprocessing_equals_monais_transforms(unetr):
    """Same shapes (orientation, resampled size, body crop), labels voxel for voxel, images within 1e-5 on the
    [0, 1] scale: we interpolate in float32 where MONAI's Spacing does in float64 (measured: 1.2e-7)."""
    dataset = data.load_dataset("btcv", str(unetr), "train").volumes
    for index, case in enumerate(dataset.cases):  # LPS, and LPS with two axes swapped (img0002)
        ours, reference = dataset[index], monai_preprocessed(case)
        assert ours["image"].shape == reference["image"].shape, case.name
        torch.testing.assert_close(ours["image"], reference["image"].as_tensor().float(), atol=1e-5, rtol=0)
        assert torch.equal(ours["mask"], reference["label"].as_tensor().long())
        assert ours["mask"].dtype == torch.int64 and ours["image"].dtype == torch.float32
        assert torch.equal(ours["spacing"], torch.tensor([1.5, 1.5, 2.0], dtype=torch.float64))
        assert 0 <= ours["image"].min() and ours["image"].max() == 1  # the bone spot clipped at 250 HU
    assert dataset[1]["image"].shape[1:3] != dataset[0]["image"].shape[1:3]  # the swapped case is transposed


def lps(spacing, origin=(160.0, 140.0, -75.0)) -> np.ndarray:
    return np.array([[-spacing[0], 0, 0, origin[0]], [0, -spacing[1], 0, origin[1]], [0, 0, spacing[2], origin[2]],
                     [0, 0, 0, 1]])


# Spacings where a new voxel falls exactly halfway between two old ones (j t / s = k + 1/2): odd-mm voxels
# across (1.5 / 1 = 1.5, 1.5 / 3 = 0.5), 4 or 12 mm slices (2 / 4 = 0.5); MONAI's float64 rounding, not half
# to even, decides those (issue 31, item 4). With 0.75 x 1.25 mm, 35 * 0.75 / 1.5 + 1 = 18.5 and
# 39 * 1.25 / 1.5 + 1 = 33.5: the resampled size is such a tie, which MONAI's rounding decides through the
# origin. The last spacing has no ties.
TIE_AFFINES = {
    "1 x 1 x 4 mm": lps((1.0, 1.0, 4.0)),
    "3 x 1 x 12 mm, axes swapped": np.array([[0, -3.0, 0, 160.0], [-1.0, 0, 0, 140.0], [0, 0, 12.0, -75.0],
                                             [0, 0, 0, 1]]),
    "a size tie": lps((1.25, 0.75, 1.0), origin=(237.3, -198.0, -210.1)),
    "no ties": lps((0.83, 0.71, 3.3)),
}


@pytest.mark.parametrize("spacing", TIE_AFFINES)
def test_labels_equal_monais_where_new_voxels_fall_halfway(tmp_path, spacing):
    """Voxel labels drawn at random, so that every voxel picked otherwise than by MONAI's Spacingd shows: the
    resampled labels equal MONAI's voxel for voxel, the images within float32 rounding."""
    make_btcv(tmp_path, "unetr", numbers=(1,), affines={1: TIE_AFFINES[spacing]})
    dataset = data.load_dataset("btcv", str(tmp_path), "train").volumes
    rng = np.random.default_rng(4)
    rewrite(dataset.cases[0].masks[0], lambda labels: rng.integers(0, 14, labels.shape, dtype=np.uint8))
    ours, reference = dataset[0], monai_preprocessed(dataset.cases[0])
    assert ours["mask"].shape == reference["label"].shape
    assert torch.equal(ours["mask"], reference["label"].as_tensor().long())
    torch.testing.assert_close(ours["image"], reference["image"].as_tensor().float(), atol=1e-5, rtol=0)


def test_the_original_grid_is_recorded_and_predictions_map_back_onto_it(tmp_path):
    make_btcv(tmp_path, "unetr", numbers=(1, 2, 3, 35), affines={1: EXACT_LPS, 2: EXACT_SWAPPED})
    dataset = data.load_dataset("btcv", str(tmp_path), "train").volumes
    grid = dataset.original_grid(2)  # img0003, LPS at 0.8 x 0.9 x 2.5 mm
    assert grid["shape"] == list(BTCV_SHAPE) and np.allclose(grid["affine"], LPS_AFFINE)
    assert grid["orientation"] == [[0, -1], [1, -1], [2, 1]]  # x and y flipped to reach RAS
    assert grid["resampled_shape"] == [22, 22, 15]  # round((n - 1) s / t + 1): 39 * 0.8 / 1.5 + 1 = 21.8 -> 22
    (x0, x1), (y0, y1), (z0, z1) = grid["crop"]
    assert list(dataset[2]["mask"].shape[1:]) == [x1 - x0, y1 - y0, z1 - z0] and (y0, y1) != (0, 22)
    back = to_original_grid(dataset[2]["mask"][0], grid)
    stored = np.asarray(nibabel.load(dataset.cases[2].masks[0]).dataobj)
    assert back.shape == stored.shape and (back == stored).mean() > 0.95  # nearest both ways at other spacings
    for index in (0, 1):  # the target spacing: the way back is exact
        stored = np.asarray(nibabel.load(dataset.cases[index].masks[0]).dataobj)
        np.testing.assert_array_equal(to_original_grid(dataset[index]["mask"][0], dataset.original_grid(index)), stored)
    fresh = data.load_dataset("btcv", str(tmp_path), "train").volumes
    assert fresh.original_grid(2) == grid  # read back from the cache file's metadata


def rewrite(path, change) -> None:
    """Save change(stored array) in place of the NIfTI file at path, with its own affine."""
    stored = nibabel.load(path)
    nibabel.save(nibabel.Nifti1Image(change(np.asarray(stored.dataobj).copy()), stored.affine), path)


def label_out_of_range(case):
    def change(labels):
        labels[0, 0, 0], labels[1, 0, 0] = 14, 200
        return labels
    rewrite(case.masks[0], change)


def fractional_label(case):
    def change(labels):
        labels = labels.astype(np.float32)
        labels[0, 0, 0] = 2.5
        return labels
    rewrite(case.masks[0], change)


def other_shape(case):
    rewrite(case.masks[0], lambda labels: labels[:, :, :11])


def other_affine(case):
    labels = nibabel.load(case.masks[0])
    moved = labels.affine + np.diag([0, 0, 0.5, 0])
    nibabel.save(nibabel.Nifti1Image(np.asarray(labels.dataobj), moved), case.masks[0])


def nan_voxels(case):
    def change(image):
        image = image.astype(np.float32)
        image[3, 4, 5] = np.nan
        return image
    rewrite(case.image, change)


def gantry_tilt(case):
    """Image and label sheared alike by a 15 degree gantry tilt: z advances along y as the table moves."""
    for path in (case.image, *case.masks):
        stored = nibabel.load(path)
        tilted = stored.affine.copy()
        tilted[1, 2] = tilted[2, 2] * np.tan(np.radians(15))
        nibabel.save(nibabel.Nifti1Image(np.asarray(stored.dataobj), tilted), path)


# how case img0002 is broken -> the one line that names it
BAD_INPUTS = {
    "label values outside 0..13": (label_out_of_range, r"the label .*labelsTr/label0002.nii.gz holds the values "
                                                       r"\{14, 200\} \(2 voxels\); expected integers 0..13"),
    "a fractional label": (fractional_label, r"the label .*label0002.nii.gz holds the values \{2.5\}"),
    "label of another shape": (other_shape, r"case img0002: the image .*img0002.nii.gz is \[40, 36, 12\] but the label "
                                            r".*label0002.nii.gz is \[40, 36, 11\]; expected the same grid"),
    "label of another affine": (other_affine, r"case img0002: the affines of the image .*img0002.nii.gz and the label "
                                              r".*label0002.nii.gz differ by up to 0.5 mm"),
    "NaN voxels": (nan_voxels, r"the image .*imagesTr/img0002.nii.gz has 1 NaN or infinite voxels"),
    # issue 31, item 5: resampled along the sheared axes it would differ from MONAI's straightened grid
    "a gantry-tilted CT": (gantry_tilt, r"the image .*imagesTr/img0002.nii.gz lies on a sheared or rotated grid "
                                        r"\(gantry tilt or an oblique scan: its axes are up to 15.00 degrees off"),
    "a missing image": (lambda case: case.image.unlink(),
                        r"the file .*imagesTr/img0002.nii.gz of case img0002 is missing"),
    "a cut image": (lambda case: case.image.write_bytes(case.image.read_bytes()[:200]),
                    r"cannot read the image .*img0002.nii.gz: .*corrupt or not NIfTI"),
    "an empty label": (lambda case: case.masks[0].write_bytes(b""),
                       r"cannot read the label .*label0002.nii.gz: the file is empty \(0 bytes\)"),
}


@pytest.mark.parametrize("breakage", BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_file(unetr, breakage):
    dataset = data.load_dataset("btcv", str(unetr), "train")
    break_case, message = BAD_INPUTS[breakage]
    break_case(dataset.cases[1])
    with pytest.raises(InputError) as raised:
        dataset[4]  # a patch of case 1
    assert re.fullmatch(message + r".*", str(raised.value)) and "\n" not in str(raised.value)


def test_check_cases_lists_every_bad_file_in_one_message(unetr):
    train, val = (data.load_dataset("btcv", str(unetr), split) for split in ("train", "val"))
    first, second, third = train.cases
    BAD_INPUTS["label values outside 0..13"][0](first)
    nan_voxels(first)
    second.image.write_bytes(second.image.read_bytes()[:200])
    second.masks[0].write_bytes(b"")
    other_shape(third)
    with pytest.raises(InputError) as raised:
        data.check_cases(train, val)
    lines = str(raised.value).splitlines()
    assert lines[0] == "3 of 4 cases cannot be used:"
    assert [re.sub(r"[ (].*", "", line.strip().removeprefix("the ").removeprefix("cannot read the ").removeprefix(
        "case img0003: the ")) for line in lines[1:6]] == ["image", "label", "image", "label", "image"]
    assert "img0001.nii.gz has 1 NaN" in lines[1] and "label0001.nii.gz holds the values {14, 200}" in lines[2]
    assert "img0002.nii.gz: " in lines[3] and "label0002.nii.gz: the file is empty" in lines[4]
    assert "[40, 36, 11]" in lines[5] and lines[6].startswith("expected every case readable")
    data.check_cases(val)  # the good case was read and cached on the way


def test_check_cases_says_once_which_volumes_a_patch_pads(unetr, capsys):
    train = data.load_dataset("btcv", str(unetr), "train", roi_size=20)
    capsys.readouterr()
    data.check_cases(train)
    assert capsys.readouterr().out == ("btcv train: 3 of 3 volumes are smaller than the 20^3 patch on some axis "
                                       "(smallest: img0002, 14x24x15); such volumes are padded to 20 there (image "
                                       "with its minimum, label with background)\n")
    assert all(train[i]["image"].shape == (1, 20, 20, 20) for i in range(len(train)))
    assert capsys.readouterr().out == ""


def test_cases_are_cached_and_read_again_when_their_files_change(unetr):
    dataset = data.load_dataset("btcv", str(unetr), "val")
    first = dataset[0]
    cached = unetr / "llm4seg_cache" / "btcv_1.5x1.5x2.0mm" / "img0035.safetensors"
    assert cached.is_file()
    again = dataset[0]
    assert all(torch.equal(first[key], again[key]) for key in ("image", "mask", "spacing"))
    rewrite(dataset.cases[0].masks[0], lambda labels: np.where(labels > 0, 13, 0).astype(np.uint8))
    assert set(dataset[0]["mask"].unique().tolist()) == {0, 13}  # the label changed: read again, not the stale cache


@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_a_damaged_cache_file_is_rebuilt(unetr, capsys, damage):
    dataset = data.load_dataset("btcv", str(unetr), "val")
    fresh = dataset[0]
    cached = unetr / "llm4seg_cache" / "btcv_1.5x1.5x2.0mm" / "img0035.safetensors"
    CACHE_DAMAGE[damage](cached)
    capsys.readouterr()
    for printed in (r"volumes: the cached case .*img0035.safetensors is unreadable \(.+\); rebuilding it from its "
                    r"NIfTI files\n", ""):  # rebuilt once, then read from the rebuilt cache
        item = dataset[0]
        assert all(torch.equal(item[key], fresh[key]) for key in ("image", "mask", "spacing"))
        assert re.fullmatch(printed, capsys.readouterr().out)


def test_a_read_only_folder_trains_without_the_cache(unetr, capsys):
    shutil.rmtree(unetr / "llm4seg_cache", ignore_errors=True)
    (unetr / "llm4seg_cache").write_text("a file where the cache folder would go")
    dataset = data.load_dataset("btcv", str(unetr), "val")
    assert dataset[0]["mask"].dtype == torch.int64
    assert "volumes: not caching preprocessed cases" in capsys.readouterr().out
    assert dataset.cache_dir is None and json.dumps(dataset.original_grid(0))


def test_labels_named_like_their_images_split_files_and_doubled_files(tmp_path):
    """Some conversions name UNETR's labels imgNNNN too; split_file replaces the official split; two files for
    one image are an error naming both."""
    top = make_btcv(tmp_path, "unetr", numbers=(1, 2, 35), dataset_json=None)
    (top / "labelsTr" / "label0002.nii.gz").rename(top / "labelsTr" / "img0002.nii.gz")
    split_file = tmp_path / "mine.json"
    split_file.write_text(json.dumps({"train": ["img0001", "img0002"], "val": ["img0035"]}))
    train = data.load_dataset("btcv", str(tmp_path), "train", split_file=str(split_file))
    assert [case.masks[0].name for case in train.cases] == ["label0001.nii.gz", "img0002.nii.gz"]
    assert train[4]["mask"].dtype == torch.int64
    with pytest.raises(FileNotFoundError, match="--split-file .*absent.json does not exist"):
        data.load_dataset("btcv", str(tmp_path), "train", split_file=str(tmp_path / "absent.json"))
    shutil.copy(top / "imagesTr" / "img0001.nii.gz", top / "imagesTr" / "img0001.nii")
    with pytest.raises(ValueError, match="1 images or labels have two files .*img0001.nii and img0001.nii.gz"):
        data.load_dataset("btcv", str(tmp_path), "train", split_file=str(split_file))
