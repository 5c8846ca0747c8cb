"""Tests of the decoded-once cache of 2D datasets (the data/ package: decode_case, check_cases -> cache_cases, the
memory-mapped CachedCases) and of train.py's loader over it (EpochOrder / EpochItems, persistent workers,
uint8 items normalised by normalize_batch): a cached item equals the item decoded as before, bit for bit; a
damaged, outdated or foreign cache file is rebuilt with one line and never used; a changed source file is
decoded again; a read-only root caches elsewhere or nowhere; two builders at once leave one whole file; a run
stopped and resumed with persistent workers equals an uninterrupted one. Trees of 8 cases at 16 px."""
import json
import multiprocessing
import os
import pickle
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from llm4seg import data, losses, training
import train
from llm4seg.files import InputError
from llm4seg.data.cases import tensors_crc32
from dataset_trees import CACHE_DAMAGE, box_mask, textured_rgb, uncached_item, write_split

SIZE = 16
NAMES = [f"case{i}" for i in range(8)]


def mixed_tree(root: Path) -> str:
    """The `folder` layout with odd, non-square sizes: JPEG and PNG images (gray, RGBA among them), JPEG masks
    with compression noise and PNG ones; 6 cases train, 2 val. Returns the split file."""
    rng = np.random.default_rng(0)
    for i, name in enumerate(NAMES):
        width, height = 37 + 5 * i, 29 + 3 * i
        image, jpeg = textured_rgb(width, height, rng), i % 2 == 0
        image = image.convert("L") if i % 4 == 1 else image.convert("RGBA") if i % 4 == 3 else image
        for folder in ("images", "masks"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        image.save(root / "images" / f"{name}{'.jpg' if jpeg else '.png'}")
        mask = Image.fromarray(box_mask(height, width, rng).astype(np.uint8) * 255)
        mask.save(root / "masks" / f"{name}{'.jpg' if jpeg else '.png'}", **({"quality": 75} if jpeg else {}))
    return write_split(root / "split.json", NAMES[:6], NAMES[6:])


def splits(root: Path, split_file: str, size: int = SIZE) -> tuple[data.SegmentationFiles, data.SegmentationFiles]:
    return tuple(data.load_dataset("folder", str(root), split, img_size=size, seed=3, split_file=split_file)
                 for split in ("train", "val"))


def same(a: dict, b: dict) -> bool:
    return a["name"] == b["name"] and torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def cache_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("data: ")]


@pytest.fixture
def tree(tmp_path) -> tuple[Path, str]:
    root = tmp_path / "data"
    return root, mixed_tree(root)


@pytest.fixture
def cached(tree, capsys) -> tuple[Path, str, Path]:
    """The tree with its cache built once; the cache file."""
    root, split_file = tree
    data.check_cases(*splits(root, split_file))
    capsys.readouterr()
    return root, split_file, root / "llm4seg_cache" / f"folder_{SIZE}px.safetensors"


def test_cached_items_are_todays_items_bit_for_bit(tree, capsys):
    root, split_file = tree
    train_set, val_set = splits(root, split_file)
    data.check_cases(train_set, val_set)
    assert re.fullmatch(rf"data: decoded 8 cases in \S+ s into the cache .*folder_{SIZE}px\.safetensors "
                        rf"\(8 cases at {SIZE} px, 0 MB\)", "\n".join(cache_lines(capsys.readouterr().out)))
    assert train_set.rows == list(range(6)) and val_set.rows == [6, 7]
    for dataset in (train_set, val_set):
        for epoch in (1, 2, 7):
            dataset.epoch = epoch
            for index in range(len(dataset)):
                item, raw = dataset[index], dataset.raw_item(index)
                assert same(item, uncached_item(dataset, index))
                assert raw["image"].dtype == raw["mask"].dtype == torch.uint8
                assert torch.equal(data.normalize_batch(raw["image"][None])[0], item["image"])


def test_a_second_run_reads_the_cache_and_decodes_nothing(cached, monkeypatch, capsys):
    """The file is plain safetensors; its checksum is data.cases' tensors_crc32 over its pixels and metadata."""
    root, split_file, path = cached
    with safe_open(path, "pt") as f:
        metadata, pixels = f.metadata(), f.get_tensor("pixels")
    assert pixels.shape == (8, 4, SIZE, SIZE) and metadata["crc32"] == tensors_crc32(
        {"pixels": pixels}, {k: v for k, v in metadata.items() if k != "crc32"})
    monkeypatch.setattr(data.images.cache, "decode_case", None)  # any decoding would fail
    train_set, val_set = splits(root, split_file)
    data.check_cases(train_set, val_set)
    assert cache_lines(capsys.readouterr().out) == []
    assert torch.equal(val_set.raw_item(1)["image"], pixels[7, :3])  # val: not augmented
    assert torch.equal(val_set.raw_item(1)["mask"], pixels[7, 3:])


def test_a_cache_written_before_label_maps_existed_is_read_as_binary(cached, capsys):
    """Its metadata has no "mask": it holds binary masks, and is used as it is, not rebuilt."""
    root, split_file, path = cached
    header, start = data.read_cache_header(path)
    metadata = {key: value for key, value in header["__metadata__"].items() if key != "mask"}
    pixels = data.map_pixels(path, start, tuple(header["pixels"]["shape"]))
    metadata["crc32"] = data.pixels_crc32(pixels, metadata)
    text = json.dumps({"pixels": header["pixels"], "__metadata__": metadata}).encode().ljust(start - 8)
    with open(path, "r+b") as f:
        f.seek(8)  # after the header's length, which stays: so do the data
        f.write(text)
    assert data.open_cache(path, SIZE) is not None and data.open_cache(path, SIZE, multiclass=True) is None
    capsys.readouterr()
    train_set, val_set = splits(root, split_file)
    data.check_cases(train_set, val_set)
    assert cache_lines(capsys.readouterr().out) == [] and train_set.rows == list(range(6))


def test_only_large_jpegs_are_drafted_and_within_a_few_grey_levels(tmp_path):
    """JPEGs with both sides >= 4 S decode at a reduced scale (here 1/2); smaller ones in full, as before.
    tests/bench_loader.py measures ISIC's and Kvasir's sizes at 256 px."""
    rng = np.random.default_rng(1)
    for (width, height), drafted in (((100, 70), True), ((64, 64), True), ((63, 80), False), ((64, 63), False)):
        path = tmp_path / f"{width}x{height}.jpg"
        textured_rgb(width, height, rng, noise=0).save(path, quality=90)
        pixels, size = data.decode_image(path, SIZE)
        full = np.asarray(data.read_rgb(path).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        difference = np.abs(pixels.astype(np.int16) - full)
        assert size == (width, height) and difference.max() <= 4 and difference.mean() < 1
        assert (difference.max() > 0) == drafted


@pytest.mark.parametrize("damage", [*CACHE_DAMAGE, "another img_size", "another format"])
def test_a_damaged_or_foreign_cache_is_rebuilt_with_one_line(cached, damage, capsys):
    root, split_file, path = cached
    if damage == "another img_size":
        data.check_cases(*splits(root, split_file, size=8))
        shutil.copy(root / "llm4seg_cache" / "folder_8px.safetensors", path)
        reason = "it holds 8 px images, expected 16 px"
    elif damage == "another format":
        path.write_bytes(path.read_bytes().replace(data.CACHE_FORMAT.encode(), b"llm4seg 2D cases 0"))
        reason = f"its format is 'llm4seg 2D cases 0', expected '{data.CACHE_FORMAT}'"
    else:
        CACHE_DAMAGE[damage](path)
        reason = {"cut short": "(it ends inside|it is \\d+ bytes, expected)", "a flipped bit": "its CRC-32 is",
                  "not safetensors": "its first 8 bytes give no header length \\(0000000000000000\\)",
                  "empty": "its first 8 bytes give no header length \\(the file is empty\\)"}[damage]
    capsys.readouterr()
    train_set, val_set = splits(root, split_file)
    data.check_cases(train_set, val_set)
    lines = cache_lines(capsys.readouterr().out)
    assert len(lines) == 2 and re.match(rf"data: the cache {re.escape(str(path))} is unusable \({reason}", lines[0])
    assert lines[1].startswith("data: decoded 8 cases")
    assert all(same(val_set[i], uncached_item(val_set, i)) for i in range(2))
    assert data.open_cache(path, SIZE) is not None


def test_a_changed_source_file_is_decoded_again_and_a_cut_one_named(cached, monkeypatch, capsys):
    root, split_file, path = cached
    image = root / "images" / "case1.png"
    textured_rgb(42, 32, np.random.default_rng(9)).save(image)  # case1 is 42 x 32, its mask too
    decoded, real_decode = [], data.images.cache.decode_case
    monkeypatch.setattr(data.images.cache, "decode_case", lambda case, *options: decoded.append(case.name) or
                        real_decode(case, *options))
    train_set, val_set = splits(root, split_file)
    data.check_cases(train_set, val_set)
    lines = cache_lines(capsys.readouterr().out)
    assert decoded == ["case1"] and lines[0] == (f"data: 1 cases changed since {path} was written (first: case1); "
                                                 "decoding them again")
    assert same(train_set[1], uncached_item(train_set, 1)) and train_set.rows[1] == 7  # its new row, the last
    jpeg = root / "images" / "case6.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:len(jpeg.read_bytes()) // 2])
    with pytest.raises(InputError, match=rf"^1 of 8 cases cannot be used:\n  cannot read image file {jpeg}"):
        data.check_cases(*splits(root, split_file))
    assert decoded == ["case1", "case6"]


def test_a_read_only_root_caches_elsewhere_or_nowhere(tree, tmp_path, monkeypatch, capsys):
    """A file where the cache folder would go stands for a read-only folder (the tests run as root)."""
    root, split_file = tree
    (root / "llm4seg_cache").write_text("not a folder")
    monkeypatch.setenv("LLM4SEG_CACHE", str(tmp_path / "elsewhere"))
    train_set, val_set = splits(root, split_file)
    data.check_cases(train_set, val_set)
    lines = cache_lines(capsys.readouterr().out)
    assert len(lines) == 2 and lines[0].startswith(f"data: cannot write the cache in {root / 'llm4seg_cache'}: ")
    assert lines[0].endswith(f"caching in {tmp_path / 'elsewhere' / 'images'}") and train_set.rows[0] == 0
    data.check_cases(*splits(root, split_file))
    assert cache_lines(capsys.readouterr().out) == []  # found there the next time

    (tmp_path / "nowhere").write_text("not a folder either")
    monkeypatch.setenv("LLM4SEG_CACHE", str(tmp_path / "nowhere"))
    train_set, val_set = splits(root, split_file)
    data.check_cases(train_set, val_set)
    lines = cache_lines(capsys.readouterr().out)
    assert len(lines) == 1 and lines[0].startswith("data: cannot write a cache (") and \
        lines[0].endswith("each image is decoded from its files every epoch")
    assert train_set.cache is None and same(train_set[2], uncached_item(train_set, 2))
    (root / "masks" / "case3.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"1 of 8 cases cannot be used:\n  cannot read image file .*case3\.png"):
        data.check_cases(*splits(root, split_file))


def build_slowly(root: Path, split_file: str) -> None:
    """A forked child: check_cases with each decode 20 ms slower, so two of them overlap."""
    real_decode = data.images.cache.decode_case
    data.images.cache.decode_case = lambda case, *options: time.sleep(0.02) or real_decode(case, *options)
    data.check_cases(*splits(root, split_file))


def test_two_builders_at_once_leave_one_whole_cache(tree, capsys):
    root, split_file = tree
    context = multiprocessing.get_context("fork")
    builders = [context.Process(target=build_slowly, args=(root, split_file)) for _ in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join(60)
    assert [builder.exitcode for builder in builders] == [0, 0]
    assert sorted(p.name for p in (root / "llm4seg_cache").iterdir()) == [f"folder_{SIZE}px.safetensors"]
    train_set, val_set = splits(root, split_file)
    capsys.readouterr()
    data.check_cases(train_set, val_set)
    assert cache_lines(capsys.readouterr().out) == []
    assert all(same(train_set[i], uncached_item(train_set, i)) for i in range(6))


def test_temporaries_a_killed_build_left_are_removed(tree, capsys):
    root, split_file = tree
    folder = root / "llm4seg_cache"
    folder.mkdir()
    left, live = folder / f".folder_{SIZE}px.safetensors.999999.tmp", folder / ".folder_8px.safetensors.1.tmp"
    left.write_bytes(b"x" * 100)
    live.write_bytes(b"x" * 100)
    os.utime(left, (time.time() - 2 * data.STALE_TEMPORARY_S,) * 2)
    data.check_cases(*splits(root, split_file))
    assert not left.exists() and live.exists()


def test_a_pickled_dataset_maps_the_cache_again_or_reads_its_files(cached):
    """As DataLoader workers started by spawn receive it; fork shares the map as it is."""
    root, split_file, path = cached
    train_set, _ = splits(root, split_file)
    data.check_cases(train_set)
    copy = pickle.loads(pickle.dumps(train_set))
    assert copy.cache.pixels is not None and same(copy[3], train_set[3])
    path.unlink()
    data.check_cases(*splits(root, split_file))  # another build of the same cases: the same checksum
    assert pickle.loads(pickle.dumps(train_set)).cache.pixels is not None
    textured_rgb(57, 41, np.random.default_rng(5)).save(root / "images" / "case4.jpg")
    data.check_cases(*splits(root, split_file))  # case4 changed: another file, another checksum
    stale = pickle.loads(pickle.dumps(train_set))
    assert stale.cache.pixels is None and same(stale[3], train_set[3])


def test_persistent_workers_get_each_epochs_items(cached):
    """EpochOrder's (index, epoch) keys reach workers started once; a resume skips the trained items."""
    root, split_file, _ = cached
    train_set, _ = splits(root, split_file)
    data.check_cases(train_set)
    order = torch.utils.data.DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(data.EpochItems(train_set), batch_size=4, sampler=data.EpochOrder(order),
                                         num_workers=2, persistent_workers=True)
    workers = None
    for epoch, skip in ((1, 0), (2, 4), (3, 0)):
        loader.sampler.start(epoch, skip)
        batches = list(loader)
        workers = workers or loader._iterator._workers
        assert loader._iterator._workers is workers  # the same processes every epoch
        order.set_epoch(epoch)
        train_set.epoch = epoch
        expected = [train_set[index] for index in list(order)[skip:]]
        images = torch.cat([data.normalize_batch(batch["image"]) for batch in batches])
        assert torch.equal(images, torch.stack([item["image"] for item in expected]))
        assert torch.equal(torch.cat([batch["mask"] for batch in batches]).float(),
                           torch.stack([item["mask"] for item in expected]))


def tiny_run(out: Path, root: Path, *extra: str) -> list[str]:
    return ["--data", "folder", "--data-dir", str(root), "--img-size", str(SIZE), "--backbone", "vit",
            "--patch-size", "8", "--embed-dim", "16", "--depth", "1", "--heads", "2", "--mode", "none",
            "--batch-size", "2", "--workers", "0", "--device", "cpu", "--precision", "fp32", "--epochs", "2",
            "--out", str(out), *extra]


def test_training_on_uint8_items_resumes_exactly_with_persistent_workers(tree, tmp_path, monkeypatch):
    """A run with float items normalised in the workers (as before), one with uint8 items normalised in the
    step and workers 0, and one stopped by Ctrl-C mid-epoch 2 with 2 persistent workers and resumed: the same
    weights and optimizer state, bit for bit."""
    root, _ = tree
    (root / "split.json").unlink()  # the folder dataset's own 70 / 30 split
    torch.set_num_threads(1)
    monkeypatch.setattr(training, "EpochItems", lambda dataset: data.EpochItems(dataset, raw=False))
    assert train.main(tiny_run(tmp_path / "float", root)) == 0
    monkeypatch.undo()
    assert train.main(tiny_run(tmp_path / "uint8", root)) == 0
    steps, real_loss = iter(range(1, 100)), losses.bce_dice_loss

    def loss_with_ctrl_c(logits, target, bce_weight):
        if next(steps) == 4:  # epoch 2, its second batch
            os.kill(os.getpid(), 2)
        return real_loss(logits, target, bce_weight)

    monkeypatch.setattr(losses, "bce_dice_loss", loss_with_ctrl_c)
    assert train.main(tiny_run(tmp_path / "resumed", root, "--workers", "2")) == 130
    monkeypatch.undo()
    assert train.main(["--resume", str(tmp_path / "resumed")]) == 0
    reference = load_file(tmp_path / "float" / "last.safetensors")
    for run in ("uint8", "resumed"):
        tensors = load_file(tmp_path / run / "last.safetensors")
        assert tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in reference)


def test_a_build_in_worker_processes_writes_the_same_file(tree, monkeypatch):
    """Many cases to decode are decoded by BUILD_PROCESSES workers, in order: the same bytes."""
    root, split_file = tree
    data.check_cases(*splits(root, split_file))
    path = root / "llm4seg_cache" / f"folder_{SIZE}px.safetensors"
    alone = path.read_bytes()
    path.unlink()
    monkeypatch.setattr(data.images.cache, "PARALLEL_BUILD", 4)
    monkeypatch.setattr(data.images.cache, "BUILD_PROCESSES", 2)
    data.check_cases(*splits(root, split_file))
    assert path.read_bytes() == alone
