"""data/volumes/ through data.load_dataset: MSD task folders in the exact shipped layout (3D and 4D NIfTI
written with nibabel, dataset.json, the tarballs' macOS `._*` files), their splits and folds, the clear
errors, data.check_cases listing every bad case, the cache (rebuilt when it fails to read), and the
synthetic volumes."""
import gzip
import json
import os
import re

import nibabel
import numpy as np
import pytest
import torch

from llm4seg.data import check_cases, class_names, load_dataset, num_classes
from llm4seg.files import InputError
from dataset_trees import CACHE_DAMAGE

SHAPE = (12, 10, 8)          # (X, Y, Z) as stored
SPACING = (0.8, 0.8, 2.5)    # mm, anisotropic like a CT


def write_msd_task(root, cases: int = 10, modalities: int = 1, seed: int = 0, labels=(1,),
                   label_names=("background", "spleen")):
    """TaskNN_Name as the decathlon's tarball unpacks: dataset.json, imagesTr/, labelsTr/, imagesTs/, `._` files."""
    rng = np.random.default_rng(seed)
    task = root / "Task09_Spleen"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (task / folder).mkdir(parents=True)
    affine = np.diag([*SPACING, 1.0])
    training = []
    for i in range(cases):
        name = f"spleen_{i + 2}.nii.gz"
        label = np.zeros(SHAPE, dtype=np.uint8)
        x, y = rng.integers(1, 6, size=2)
        label[x:x + 5, y:y + 4, 2:6] = rng.choice(labels)
        label[0, 0, 0] = labels[-1]  # every label value somewhere
        image_shape = SHAPE if modalities == 1 else (*SHAPE, modalities)
        image = rng.normal(100, 30, image_shape).astype(np.float32)
        nibabel.save(nibabel.Nifti1Image(image, affine), task / "imagesTr" / name)
        nibabel.save(nibabel.Nifti1Image(label, affine), task / "labelsTr" / name)
        for folder in ("imagesTr", "labelsTr"):  # AppleDouble files: not NIfTI, never to be opened
            (task / folder / f"._{name}").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    nibabel.save(nibabel.Nifti1Image(np.zeros(SHAPE, np.float32), affine), task / "imagesTs" / "spleen_1.nii.gz")
    modality = {str(i): name for i, name in enumerate(["FLAIR", "T1w", "t1gd", "T2w"][:modalities])} \
        if modalities > 1 else {"0": "CT"}
    (task / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "tensorImageSize": "3D" if modalities == 1 else "4D", "modality": modality,
        "labels": {str(i): name for i, name in enumerate(label_names)}, "numTraining": cases, "numTest": 1,
        "training": training, "test": ["./imagesTs/spleen_1.nii.gz"]}))
    return task


@pytest.fixture()
def task(tmp_path):
    return write_msd_task(tmp_path)


def split_names(task, **options) -> dict[str, list[str]]:
    return {split: [case.name for case in load_dataset("msd", str(task), split, 8, 41, **options).cases]
            for split in ("train", "val", "test")}


def test_split_is_70_20_10_disjoint_saved_and_reproducible(task):
    first = split_names(task)
    assert [len(first[s]) for s in ("train", "val", "test")] == [7, 2, 1]
    assert set().union(*first.values()) == {f"spleen_{i + 2}" for i in range(10)}
    written = list(task.glob("llm4seg_split_msd_seed41_*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["test"] == first["test"]
    assert split_names(task) == first


def test_folds_cover_the_non_test_cases_once_and_keep_the_test_split(task):
    plain = split_names(task)
    vals = []
    for fold in range(5):
        names = split_names(task, fold=fold)
        assert names["test"] == plain["test"]
        assert not set(names["train"]) & set(names["val"])
        assert sorted(names["train"] + names["val"]) == sorted(plain["train"] + plain["val"])
        vals += names["val"]
    assert sorted(vals) == sorted(plain["train"] + plain["val"])
    with pytest.raises(ValueError, match="fold 5 out of range: expected 0..4"):
        load_dataset("msd", str(task), "train", 8, 41, fold=5)


def test_a_case_is_z_scored_and_its_label_binarised_at_its_own_size(task):
    item = load_dataset("msd", str(task), "train", 12, 41)[0]  # X (12) keeps its size, Y (10) and Z (8) grow
    stored = nibabel.load(task / "imagesTr" / f"{item['name']}.nii.gz").get_fdata()
    label = nibabel.load(task / "labelsTr" / f"{item['name']}.nii.gz").get_fdata()
    assert item["image"].shape == (1, 12, 12, 12) and item["mask"].shape == (1, 12, 12, 12)
    expected = (stored - stored.mean()) / stored.std()  # numpy: population std
    # Index 0 of a grown axis samples stored index 0 (align_corners=False clamps there): the line
    # (:, 0, 0) is the stored line, z-scored; float32 arithmetic, hence 1e-4.
    torch.testing.assert_close(item["image"][0, :, 0, 0].double(), torch.from_numpy(expected[:, 0, 0]),
                               atol=1e-4, rtol=0)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["mask"][0].sum() > 0 and (label > 0).any()
    torch.testing.assert_close(item["spacing"], torch.tensor(SPACING, dtype=torch.float64) * torch.tensor(
        [12 / 12, 10 / 12, 8 / 12], dtype=torch.float64))


def test_the_mask_is_the_label_resampled_by_nearest_neighbour(task):
    dataset = load_dataset("msd", str(task), "val", 12, 41)
    for index, case in enumerate(dataset.cases):
        label = nibabel.load(case.masks[0]).get_fdata()
        item = dataset[index]
        resized = torch.nn.functional.interpolate(torch.from_numpy(label > 0).float()[None, None], size=(12, 12, 12),
                                                  mode="nearest")[0]
        assert torch.equal(item["mask"], resized)


def test_multimodal_4d_images_become_channels_each_z_scored(tmp_path):
    task = write_msd_task(tmp_path, modalities=4)
    dataset = load_dataset("msd", str(task), "train", 8, 41)
    assert dataset.in_channels == 4
    item = dataset[0]
    assert item["image"].shape == (4, 8, 8, 8)
    means = item["image"].mean(dim=(1, 2, 3))
    assert means.abs().max() < 0.1  # trilinear resampling moves the mean a little


def test_one_chosen_label_is_the_foreground(tmp_path):
    task = write_msd_task(tmp_path, labels=(1, 2))
    all_labels = load_dataset("msd", str(task), "train", 12, 41)[0]["mask"]
    only_two = load_dataset("msd", str(task), "train", 12, 41, label=2)[0]["mask"]
    assert only_two.sum() < all_labels.sum() and ((only_two > 0) <= (all_labels > 0)).all()


def test_missing_dataset_json_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="msd: expected a task folder.*no such folder.*--data-dir data/Task09"):
        load_dataset("msd", str(tmp_path / "Task09_Spleen"), "train", 8, 41)
    (tmp_path / "Task09_Spleen").mkdir()
    with pytest.raises(FileNotFoundError, match="no dataset.json in it"):
        load_dataset("msd", str(tmp_path / "Task09_Spleen"), "train", 8, 41)


@pytest.mark.parametrize("entry", ["../../outside/spleen_2.nii.gz", "/etc/passwd"])
def test_dataset_json_entries_outside_the_task_are_refused(task, entry):
    """Issue 31, item 22: an absolute path or one climbing out of the task folder is one line naming it."""
    index = json.loads((task / "dataset.json").read_text())
    index["training"][1]["label"] = entry
    (task / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=rf"dataset\.json lists '{re.escape(entry)}', which is outside "):
        load_dataset("msd", str(task), "train", 8, 41)


def test_label_of_another_shape_is_refused(task):
    name = json.loads((task / "dataset.json").read_text())["training"][0]["label"]
    nibabel.save(nibabel.Nifti1Image(np.zeros((12, 10, 7), np.uint8), np.eye(4)), task / name)
    dataset = load_dataset("msd", str(task), "train", 8, 41)
    index = next(i for i, case in enumerate(dataset.cases) if case.masks[0].name == name.split("/")[-1])
    with pytest.raises(ValueError, match=r"image spleen_2.nii.gz is \[12, 10, 8, 1\] and label spleen_2.nii.gz "
                                         r"is \[12, 10, 7\]; expected the same"):
        dataset[index]


def test_2d_file_and_corrupt_gzip_are_refused(task):
    dataset = load_dataset("msd", str(task), "train", 8, 41)
    flat, broken = dataset.cases[0], dataset.cases[1]
    nibabel.save(nibabel.Nifti1Image(np.zeros((12, 10), np.float32), np.eye(4)), flat.image)
    with pytest.raises(ValueError, match=r"the image .* is 2D \[12, 10\]; expected a 3D volume"):
        dataset[0]
    whole = gzip.decompress(broken.image.read_bytes())
    broken.image.write_bytes(gzip.compress(whole)[:200])  # cut short, as an interrupted download
    with pytest.raises(ValueError, match="cannot read the image .*corrupt or not NIfTI"):
        dataset[1]


def test_synthetic_volumes_are_reproducible_and_disjoint():
    train = load_dataset("synthetic3d", None, "train", 16, 41, synthetic_size=10)
    val = load_dataset("synthetic3d", None, "val", 16, 41, synthetic_size=10)
    item = train[0]
    assert item["image"].shape == (1, 16, 16, 16) and item["mask"].shape == (1, 16, 16, 16)
    assert 0 < item["mask"].mean() < 0.5
    assert torch.equal(item["image"], load_dataset("synthetic3d", None, "train", 16, 41, synthetic_size=10)[0]["image"])
    assert not {train[i]["name"] for i in range(len(train))} & {val[i]["name"] for i in range(len(val))}
    with pytest.raises(ValueError, match="fold applies to datasets read from files"):
        load_dataset("synthetic3d", None, "train", 16, 41, fold=0)


def test_preprocessed_cases_are_cached_until_their_files_change(task):
    dataset = load_dataset("msd", str(task), "train", 8, 41)
    first = dataset[0]
    cached = task / "llm4seg_cache" / "8px" / f"{first['name']}.safetensors"
    assert cached.is_file()
    again = dataset[0]
    assert all(torch.equal(first[key], again[key]) for key in ("image", "mask", "spacing"))
    label_file = dataset.cases[0].masks[0]
    nibabel.save(nibabel.Nifti1Image(np.zeros(SHAPE, np.uint8), np.diag([*SPACING, 1.0])), label_file)
    assert dataset[0]["mask"].sum() == 0  # the label changed: read again, not the stale cache
    assert load_dataset("msd", str(task), "train", 8, 41, label=1).cache_dir.name == "8px_label1"


def test_a_label_replaced_by_one_of_the_same_size_and_mtime_is_read_again(task):
    """cp -p, rsync -t or a restored backup keep size and mtime; the cache keyed on them alone trained on the old
    labels (issue 31, item 15). The stamp has the ctime and inode too."""
    dataset = load_dataset("msd", str(task), "train", 8, 41)
    before = dataset[0]["mask"]
    label_file = dataset.cases[0].masks[0]
    stat = label_file.stat()
    labels = np.asarray(nibabel.load(label_file).dataobj)
    replacement = label_file.with_name("replacement.nii.gz")
    nibabel.save(nibabel.Nifti1Image(np.flip(labels, axis=0).copy(), np.diag([*SPACING, 1.0])), replacement)
    assert replacement.stat().st_size == stat.st_size  # the same bytes, reordered: a same-size file
    os.replace(replacement, label_file)
    os.utime(label_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert label_file.stat().st_mtime_ns == stat.st_mtime_ns and label_file.stat().st_size == stat.st_size
    assert not torch.equal(dataset[0]["mask"], before)


def test_check_cases_reads_every_case_and_lists_each_bad_one(task):
    """A cut .nii.gz, a label of another shape and an image with 2 channels where dataset.json lists 1:
    one message, one line each; the good cases are read and cached on the way."""
    dataset = load_dataset("msd", str(task), "train", 8, 41)
    cut, other_shape, two_channels = dataset.cases[:3]
    cut.image.write_bytes(cut.image.read_bytes()[:300])
    nibabel.save(nibabel.Nifti1Image(np.zeros((12, 10, 7), np.uint8), np.eye(4)), other_shape.masks[0])
    nibabel.save(nibabel.Nifti1Image(np.zeros((*SHAPE, 2), np.float32), np.eye(4)), two_channels.image)
    with pytest.raises(InputError) as raised:
        check_cases(dataset)
    lines = str(raised.value).splitlines()
    assert lines[0] == "3 of 7 cases cannot be used:"
    assert re.match(rf"  cannot read the image .*{cut.image.name}: .*corrupt or not NIfTI", lines[1])
    assert re.match(rf"  case {other_shape.name}: image .* is \[12, 10, 8, 1\] and label .* is \[12, 10, 7\]", lines[2])
    assert re.match(rf"  case {two_channels.name}: image .* has 2 channels; expected 1", lines[3])
    cached = sorted(p.stem for p in (task / "llm4seg_cache" / "8px").iterdir())
    assert cached == sorted(c.name for c in dataset.cases[3:])
    check_cases(load_dataset("msd", str(task), "val", 8, 41))


@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_a_cache_file_that_fails_to_read_is_rebuilt(task, capsys, damage):
    dataset = load_dataset("msd", str(task), "train", 8, 41)
    fresh = dataset.read_case(dataset.cases[0])
    cached = task / "llm4seg_cache" / "8px" / f"{fresh['name']}.safetensors"
    dataset[0]
    CACHE_DAMAGE[damage](cached)
    capsys.readouterr()
    for printed in (rf"volumes: the cached case .*{cached.name} is unreadable \(.+\); rebuilding it from its "
                    r"NIfTI files\n", ""):  # rebuilt once, then read from the rebuilt cache
        item = dataset[0]
        assert all(torch.equal(item[key], fresh[key]) for key in ("image", "mask", "spacing"))
        assert re.fullmatch(printed, capsys.readouterr().out)


def test_multiclass_keeps_every_label_value_as_its_class(tmp_path):
    """BrainTumour-like labels {0, 1, 2, 3} with dataset.json listing 4: the mask is the label map, int64,
    resized by nearest neighbour; binary without multiclass, as before."""
    names = ("background", "edema", "non-enhancing tumor", "enhancing tumour")
    task = write_msd_task(tmp_path, labels=(1, 2, 3), label_names=names)
    dataset = load_dataset("msd", str(task), "train", 12, 41, multiclass=True)
    item = dataset[0]
    label = nibabel.load(dataset.cases[0].masks[0]).get_fdata()
    resized = torch.nn.functional.interpolate(torch.from_numpy(label).float()[None, None], size=(12, 12, 12),
                                              mode="nearest")[0].long()
    assert item["mask"].dtype == torch.int64 and torch.equal(item["mask"], resized)
    assert set(item["mask"].unique().tolist()) > {0, 3}
    assert dataset.cache_dir.name == "12px_multiclass" and torch.equal(dataset[0]["mask"], item["mask"])  # cached
    assert load_dataset("msd", str(task), "train", 12, 41)[0]["mask"].dtype == torch.float32  # binary as before
    assert num_classes("msd", str(task), multiclass=True) == 4 and num_classes("msd", str(task)) == 1
    assert class_names("msd", str(task), multiclass=True) == list(names)
    assert class_names("msd", str(task)) == ["background", "foreground"]


def test_multiclass_refuses_values_outside_dataset_json_labels_and_a_chosen_label(tmp_path):
    task = write_msd_task(tmp_path, labels=(1, 2, 3), label_names=("background", "a", "b"))
    dataset = load_dataset("msd", str(task), "train", 8, 41, multiclass=True)
    with pytest.raises(InputError) as raised:
        check_cases(dataset)
    assert re.search(r"the label .*labelsTr/spleen_\d+.nii.gz holds the values \{3\} \(\d+ voxels\); expected integers "
                     r"0..2 \(the classes of dataset.json's labels\)", str(raised.value))
    with pytest.raises(ValueError, match="label 2 makes one structure the foreground, multiclass keeps every label"):
        load_dataset("msd", str(task), "train", 8, 41, multiclass=True, label=2)
    index = json.loads((task / "dataset.json").read_text())
    (task / "dataset.json").write_text(json.dumps({**index, "labels": {"1": "a"}}))
    with pytest.raises(InputError, match=r"\"labels\" has the keys \[1\]; expected 0..K-1"):
        num_classes("msd", str(task), multiclass=True)
