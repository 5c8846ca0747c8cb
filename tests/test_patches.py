"""The training split of btcv and synthetic-organs (data/volumes/patches.py): R^3 patches centred on foreground half
the time, the window kept inside the volume, MONAI's flips / rotation / intensity shift at their
probabilities with image and label moved together, every draw a function of (seed, epoch, index) alone, and
volumes smaller than a patch padded (said once)."""
import numpy as np
import pytest
import torch

from llm4seg import data
from llm4seg.data.volumes.patches import augmented, draw_centre, kth_voxel, padded, window_start
from dataset_trees import make_btcv


def generators(count: int, seed: int = 41, epoch: int = 0):
    return (data.augmentation_generator(seed, epoch, index) for index in range(count))


def test_kth_voxel_counts_in_numpys_nonzero_order():
    candidates = torch.rand(7, 5, 6, generator=torch.Generator().manual_seed(0)) < 0.3
    listed = np.argwhere(candidates.numpy())
    assert all(kth_voxel(candidates, k) == listed[k].tolist() for k in range(len(listed)))


def test_centres_are_on_foreground_half_the_time_and_uniform_within_each_set():
    """Foreground is 1 % of the volume; 2000 draws: the foreground share is 1/2 within 4 standard errors
    (sd of a proportion at 2000 draws: 0.011), and every foreground voxel is drawn about equally."""
    labels = torch.zeros(20, 20, 25, dtype=torch.int64)
    labels[3:5, 4:9, 10:15] = 2                                                        # 50 voxels
    centres = [draw_centre(labels, generator) for generator in generators(2000)]
    on_foreground = [bool(labels[tuple(c)] > 0) for c in centres]
    assert abs(np.mean(on_foreground) - 0.5) < 0.045
    hits = np.bincount([c[1] for c, fg in zip(centres, on_foreground, strict=True) if fg], minlength=9)[4:9]
    assert hits.min() > 0.6 * hits.mean()  # y of the foreground box: each of its 5 rows hit


def test_a_volume_of_one_kind_centres_on_it():
    background = torch.zeros(6, 6, 6, dtype=torch.int64)
    assert all(background[tuple(draw_centre(background, g))] == 0 for g in generators(20))
    assert all(draw_centre(torch.ones(6, 6, 6, dtype=torch.int64), g) for g in generators(20))


def test_the_window_keeps_inside_the_volume_as_monai_clamps_the_centre():
    """MONAI: centre clamped to [R // 2, n - R + R // 2], window from c - R // 2; for n = 30, R = 16 the
    centre range is [8, 22], i.e. starts in [0, 14]."""
    assert window_start([0, 8, 29], (30, 30, 30), 16) == [0, 0, 14]
    assert window_start([15, 22, 23], (30, 30, 30), 16) == [7, 14, 14]
    assert window_start([2, 2, 2], (16, 17, 16), 16) == [0, 0, 0]
    assert window_start([3, 3, 3], (16, 17, 16), 15) == [0, 0, 0]  # odd R: R // 2 = 7 before the centre


def test_padding_reaches_the_patch_side_with_the_minimum_and_background():
    image, labels = torch.rand(2, 5, 20, 8) + 3, torch.ones(1, 5, 20, 8, dtype=torch.int64)
    big_image, big_labels = padded(image, labels, 12)
    assert big_image.shape == (2, 12, 20, 12) and big_labels.shape == (1, 12, 20, 12)
    assert torch.equal(big_image[:, 3:8, :, 2:10], image)  # (12 - 5) // 2 = 3 before, 4 after
    assert torch.equal(big_image[:, 0], image.amin(dim=(1, 2, 3))[:, None, None].expand(2, 20, 12))
    assert big_labels.sum() == labels.sum()


def test_flips_rotations_and_shifts_are_the_documented_draws_at_their_probabilities():
    """Replaying each generator by the module docstring (3 flip u's, rotation u, k, shift u, offset) gives
    the same patch as augmented(); the image is the label map / 1000, so both must move alike. Over 1000
    draws each transform's rate is its probability within about 3 standard errors."""
    labels = torch.arange(5 ** 3).reshape(1, 5, 5, 5)
    image = labels.float() / 1000
    applied = np.zeros(5)  # flip x, flip y, flip z, rotation, shift
    for generator in generators(1000):
        replay = torch.Generator()
        replay.set_state(generator.get_state())
        flips = torch.rand(3, generator=replay) < 0.1
        rotate = bool(torch.rand((), generator=replay) < 0.1)
        turns = int(torch.randint(1, 4, (), generator=replay))
        shift = bool(torch.rand((), generator=replay) < 0.5)
        offset = 0.1 * (2 * float(torch.rand((), generator=replay)) - 1)
        expected = labels.flip([1 + axis for axis in range(3) if flips[axis]])
        expected = expected.rot90(turns, (1, 2)) if rotate else expected
        new_image, new_labels = augmented(image, labels, generator)
        assert torch.equal(new_labels, expected)
        torch.testing.assert_close(new_image, expected.float() / 1000 + (offset if shift else 0.0))
        applied += [*flips.tolist(), rotate, shift]
    rates = applied / 1000
    assert np.all(np.abs(rates[:4] - 0.1) < 0.03) and abs(rates[4] - 0.5) < 0.05, rates


def test_patches_are_a_function_of_seed_epoch_and_index_alone(tmp_path):
    make_btcv(tmp_path, "unetr", numbers=(1, 2, 35))
    train = data.load_dataset("btcv", str(tmp_path), "train", roi_size=12, samples_per_volume=3)
    assert len(train) == 6
    torch.manual_seed(0)
    first = [train[i] for i in range(len(train))]
    torch.manual_seed(1)
    again = data.load_dataset("btcv", str(tmp_path), "train", roi_size=12, samples_per_volume=3)
    for a, b in zip(first, (again[i] for i in range(len(again))), strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert [item["name"] for item in first] == ["img0001"] * 3 + ["img0002"] * 3
    assert all(item["image"].shape == (1, 12, 12, 12) and item["mask"].dtype == torch.int64 for item in first)
    assert len({item["image"].sum().item() for item in first}) == 6  # the patches of a volume differ
    train.epoch = 1
    assert sum(torch.equal(train[i]["image"], first[i]["image"]) for i in range(len(train))) <= 1
    other_seed = data.load_dataset("btcv", str(tmp_path), "train", 256, 42, roi_size=12, samples_per_volume=3)
    assert not torch.equal(other_seed[0]["image"], first[0]["image"])


@pytest.mark.parametrize("name", ["btcv", "synthetic-organs"])
def test_volumes_smaller_than_a_patch_are_padded_and_it_is_said_once(tmp_path, capsys, name):
    if name == "btcv":
        make_btcv(tmp_path, "unetr", numbers=(1, 2, 35))
    train = data.load_dataset(name, str(tmp_path) if name == "btcv" else None, "train", 12, 41, roi_size=24,
                              synthetic_size=5, samples_per_volume=2)
    shown = capsys.readouterr().out
    items = [train[i] for i in range(len(train))]
    shown += capsys.readouterr().out
    assert all(item["image"].shape == (1, 24, 24, 24) and item["mask"].shape == (1, 24, 24, 24) for item in items)
    assert shown.count("smaller than the 24^3 patch") == 1 and "padded to 24" in shown
