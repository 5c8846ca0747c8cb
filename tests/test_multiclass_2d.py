"""Multi-class 2D segmentation on one's own folder (the data package's `folder` with multiclass=True, train.py --data folder
--multiclass): masks are label maps whose values are the classes; K and the class names come from the data (and
a classes.json); items are int64 label maps that follow the image through the augmentation; the decoded-once
cache keeps the labels in a file of its own; colour and JPEG masks are refused; the binary 2D datasets refuse
multiclass; a tiny run trains, validates per class and is evaluated with class-coloured sample panels.

The tree: 10 cases of 32 x 32 px, each mask {0, 1, 2} with both classes present (a rectangle with a bar off one
corner as class 1, so no symmetry maps it to itself, and a smaller square as class 2), each image's red channel
40 + 90 * label, so the label of every pixel can be read back from the image."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llm4seg import data
from llm4seg import pictures
import train
from llm4seg.files import InputError
from dataset_trees import box_mask, symmetries, unnormalise, write_split

SIZE = 32
NAMES = [f"case{i}" for i in range(10)]
CLASSES = ["background", "polyp", "instrument"]


def label_map(rng: np.random.Generator) -> np.ndarray:
    """(S, S) uint8: class 1 a box_mask, class 2 a 5 x 5 square in the lower right quarter."""
    labels = box_mask(SIZE, SIZE, rng).astype(np.uint8)
    top, left = rng.integers(SIZE // 2 + 2, SIZE - 6, size=2)
    labels[top:top + 5, left:left + 5] = 2
    return labels


def labelled_image(labels: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 whose red channel says the label: 40 + 90 * label."""
    image = np.full(labels.shape + (3,), 20, np.uint8)
    image[..., 0] = 40 + 90 * labels
    return image


def write_tree(root: Path, names: list[str] = NAMES, seed: int = 0) -> dict[str, np.ndarray]:
    """images/<name>.png + masks/<name>.png (mode L label maps); the drawn label maps by name."""
    rng, drawn = np.random.default_rng(seed), {}
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name in names:
        drawn[name] = label_map(rng)
        Image.fromarray(labelled_image(drawn[name])).save(root / "images" / f"{name}.png")
        Image.fromarray(drawn[name]).save(root / "masks" / f"{name}.png")
    return drawn


def labels_read_back(image: torch.Tensor) -> torch.Tensor:
    """An item's normalised (3, S, S) image -> (1, S, S) int64, the labels its red channel encodes."""
    red = unnormalise(image)[0] * 255
    return ((red - 40) / 90).round().long()[None]


@pytest.fixture
def tree(tmp_path) -> tuple[Path, dict[str, np.ndarray], str]:
    """The tree, 8 cases train and 2 val (a split file)."""
    root = tmp_path / "data"
    drawn = write_tree(root)
    return root, drawn, write_split(tmp_path / "split.json", NAMES[:8], NAMES[8:])


def splits(root: Path, split_file: str) -> tuple[data.SegmentationFiles, data.SegmentationFiles]:
    return tuple(data.load_dataset("folder", str(root), split, img_size=SIZE, seed=3, split_file=split_file,
                                   multiclass=True) for split in ("train", "val"))


# --- classes from the data ---------------------------------------------------------------------------


def test_classes_come_from_the_masks_or_a_class_file(tree, monkeypatch):
    root, _, _ = tree
    assert data.num_classes("folder", str(root), multiclass=True) == 3
    assert data.class_names("folder", str(root), multiclass=True) == ["background", "class 1", "class 2"]
    assert (data.num_classes("folder", str(root)), data.class_names("folder", str(root))) == \
        (1, ["background", "foreground"])  # binary stays binary: no mask is read
    # The values found are kept with the masks' stamps: asked again, no mask is read.
    monkeypatch.setattr(data.images.classes, "mask_to_labels", None)
    assert data.num_classes("folder", str(root), multiclass=True) == 3
    monkeypatch.undo()
    labels = np.asarray(Image.open(root / "masks" / "case4.png")).copy()
    labels[0, 0] = 3  # a mask that changes is read again
    Image.fromarray(labels).save(root / "masks" / "case4.png")
    assert data.class_names("folder", str(root), multiclass=True)[-1] == "class 3"

    (root / "classes.json").write_text(json.dumps({"0": "background", "1": "polyp", "2": "instrument",
                                                   "3": "clip", "4": "never drawn"}))
    assert data.num_classes("folder", str(root), multiclass=True) == 5  # the file's K: a class may be absent
    assert data.class_names("folder", str(root), multiclass=True)[1:4] == ["polyp", "instrument", "clip"]
    (root / "classes.json").rename(root / "labels.json")
    (root / "labels.json").write_text(json.dumps(dict(enumerate(CLASSES))))
    with pytest.raises(InputError, match=r"mask .*case4\.png holds the label 3, but .*labels\.json names the classes "
                                         r"0\.\.2; expected a name for every label value"):
        data.num_classes("folder", str(root), multiclass=True)
    (root / "classes.json").write_text("{}")
    with pytest.raises(InputError, match=r"found .*classes\.json and .*labels\.json; expected one file"):
        data.class_names("folder", str(root), multiclass=True)
    (root / "labels.json").unlink()
    for table in ('{"0": "background", "2": "polyp"}', '["background", "polyp"]', '{"0": "background", "1": ""}'):
        (root / "classes.json").write_text(table)
        with pytest.raises(InputError, match=r"classes\.json .*expected \{\"0\": \"background\", \"1\": "):
            data.class_names("folder", str(root), multiclass=True)
    # Two classes of one name: the second's metrics would overwrite the first's (issue 31, item 16).
    (root / "classes.json").write_text(json.dumps({"0": "background", "1": "polyp", "2": " polyp"}))
    with pytest.raises(InputError, match=r"classes\.json gives the same name to several label values "
                                         r"\(\{'polyp': \[1, 2\]\}\); expected a different name for each class"):
        data.class_names("folder", str(root), multiclass=True)


def test_masks_of_0_and_255_are_binary_and_255_beside_labels_is_refused(tree):
    root, drawn, _ = tree
    for name, labels in drawn.items():
        Image.fromarray((labels > 0).astype(np.uint8) * 255).save(root / "masks" / f"{name}.png")
    with pytest.raises(InputError, match="hold only 0 and 255: binary masks, not label maps .* Drop multiclass"):
        data.num_classes("folder", str(root), multiclass=True)
    Image.fromarray(drawn["case3"]).save(root / "masks" / "case3.png")  # {0, 1, 2} beside {0, 255}
    with pytest.raises(InputError, match=r"mask .*case0\.png holds 255 beside the labels \[0, 1, 2\]: as a class it "
                                         "would make 256 of them"):
        data.num_classes("folder", str(root), multiclass=True)


# --- items and the cache -----------------------------------------------------------------------------


def test_items_are_int64_label_maps_that_follow_the_image(tree):
    """Val items as drawn; train items one of the 8 symmetries of the drawn map, the same as their image's."""
    root, drawn, split_file = tree
    train_set, val_set = splits(root, split_file)
    for item in val_set:
        assert item["mask"].dtype == torch.int64 and item["mask"].shape == (1, SIZE, SIZE)
        assert torch.equal(item["mask"][0], torch.from_numpy(drawn[item["name"]]).long())
    moved = 0
    for epoch in range(3):
        train_set.epoch = epoch
        for index in range(len(train_set)):
            item = train_set[index]
            truth = torch.from_numpy(drawn[item["name"]]).long()[None]
            assert item["mask"].dtype == torch.int64 and torch.equal(item["mask"], labels_read_back(item["image"]))
            assert any(torch.equal(item["mask"], turned) for turned in symmetries(truth))
            moved += not torch.equal(item["mask"], truth)
            raw = train_set.raw_item(index)  # what train.py's loader reads: uint8, the same labels
            assert raw["mask"].dtype == torch.uint8 and torch.equal(raw["mask"].long(), item["mask"])
    assert moved > 12  # 24 items, 7 in 8 of them moved on average


def test_the_cache_keeps_the_labels_in_a_file_of_its_own(tree, capsys):
    root, _, split_file = tree
    train_set, val_set = splits(root, split_file)
    before = [[dataset[i] for i in range(len(dataset))] for dataset in (train_set, val_set)]  # from the files
    data.check_cases(train_set, val_set)
    labels_cache = root / "llm4seg_cache" / f"folder_{SIZE}px_labels.safetensors"
    assert f"into the cache {labels_cache} (10 cases" in capsys.readouterr().out
    assert data.cache_paths("folder", root, SIZE, multiclass=True)[0] == labels_cache
    assert data.cache_paths("folder", root, SIZE)[0].name == f"folder_{SIZE}px.safetensors"
    assert train_set.rows == list(range(8)) and val_set.rows == [8, 9]
    for dataset, items in zip((train_set, val_set), before, strict=True):
        for index, item in enumerate(items):
            cached = dataset[index]
            assert torch.equal(cached["image"], item["image"]) and torch.equal(cached["mask"], item["mask"])
            assert cached["mask"].dtype == torch.int64 and set(cached["mask"].unique().tolist()) == {0, 1, 2}

    # A cache of the other kind of mask, in the other's place, is refused (then rebuilt), never read.
    binary_cache = data.cache_paths("folder", root, SIZE)[0]
    shutil.copy(labels_cache, binary_cache)
    assert data.open_cache(binary_cache, SIZE) is None
    assert capsys.readouterr().out == (f"data: the cache {binary_cache} is unusable (its masks are labels, expected "
                                       "binary); rebuilding it\n")
    labels_cache.write_bytes(labels_cache.read_bytes().replace(b'"mask": "labels"', b'"mask": "binary"'))
    assert data.open_cache(labels_cache, SIZE, multiclass=True) is None
    assert "(its masks are binary, expected labels)" in capsys.readouterr().out


# --- what is refused ---------------------------------------------------------------------------------


def rgb_mask(path: Path) -> None:
    labels = np.asarray(Image.open(path))
    Image.fromarray(np.stack([labels * 100] * 3, -1).astype(np.uint8)).save(path)


def jpeg_mask(path: Path) -> None:
    Image.open(path).save(path.with_suffix(".jpg"), quality=95)
    path.unlink()


@pytest.mark.parametrize("breakage, reason", [
    (rgb_mask, (r"mask .*masks/case2\.png has the mode RGB: with multiclass a mask is a label map whose values are "
                r"the classes; expected a gray \(L\) or palette \(P\) PNG")),
    (jpeg_mask, r"mask .*masks/case2\.jpg is a JPEG, whose compression invents values between the labels"),
    (lambda path: Image.new("L", (SIZE, 30)).save(path),
     rf"image .*images/case2\.png is {SIZE}x{SIZE} but its mask .*masks/case2\.png is {SIZE}x30"),
])
def test_colour_jpeg_and_misfit_masks_are_refused_and_named(tree, breakage, reason):
    root, _, split_file = tree
    breakage(root / "masks" / "case2.png")
    train_set, _ = splits(root, split_file)
    with pytest.raises(InputError, match=r"^1 of 8 cases cannot be used:\n  " + reason):
        data.check_cases(train_set)
    with pytest.raises(InputError, match=reason):
        train_set[2]


def test_palette_masks_are_read_by_their_indices(tree):
    """A palette PNG's pixel values are palette indices: the index is the class, whatever colour it shows."""
    root, drawn, split_file = tree
    mask = Image.fromarray(drawn["case9"], "P")
    mask.putpalette([0, 0, 0, 250, 250, 250, 10, 10, 10] + [0] * 759)  # class 2 darker than class 1
    mask.save(root / "masks" / "case9.png")
    val_set = splits(root, split_file)[1]
    data.check_cases(val_set)
    assert torch.equal(val_set[1]["mask"][0], torch.from_numpy(drawn["case9"]).long())


@pytest.mark.parametrize("name", ["kvasir", "busi", "isic2018", "tnscui", "synthetic"])
def test_the_binary_2d_datasets_refuse_multiclass(name):
    with pytest.raises(ValueError, match=rf"multiclass applies to msd and folder .*; {name} is binary by definition"):
        data.check_data_options(name, None, None, multiclass=True)
    with pytest.raises(ValueError, match=rf"{name} is binary by definition"):
        data.num_classes(name, multiclass=True)


# --- a run, end to end ---------------------------------------------------------------------------------


def tiny_run(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", "folder", "--data-dir", str(root), "--multiclass", "--backbone", "vit", "--patch-size", "8",
            "--embed-dim", "16", "--depth", "1", "--mode", "none", "--img-size", str(SIZE), "--epochs", "1",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", str(out), *extra]


def test_kvasir_with_multiclass_exits_2_with_one_line(tmp_path, capsys):
    argv = tiny_run(tmp_path / "nowhere", tmp_path / "never")
    argv[1] = "kvasir"
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data kvasir: multiclass applies to msd and folder" in err, err


def test_a_multiclass_folder_trains_validates_per_class_and_is_evaluated(tmp_path, capsys):
    import eval as ev

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root, out = tmp_path / "data", tmp_path / "run"
        write_tree(root)
        (root / "classes.json").write_text(json.dumps(dict(enumerate(CLASSES))))
        assert train.main(tiny_run(root, out)) == 0
        assert "masks read as label maps (multiclass)" in capsys.readouterr().out
        config = json.loads((out / "config.json").read_text())
        assert config["model"]["num_classes"] == 3 and config["train"]["multiclass"] is True
        line = json.loads((out / "metrics.jsonl").read_text())
        assert 0 <= line["val_dice"] <= 1 and 0 <= line["val_iou"] <= 1 and "val_sensitivity" not in line

        assert ev.main([str(out), "--workers", "0", "--device", "cpu", "--samples", "2"]) == 0
        report = json.loads((out / "eval-val" / "metrics.json").read_text())
        assert report["classes"] == CLASSES and list(report["per_class"]) == CLASSES[1:]
        assert all(set(scores) == {"dice", "iou", "hd95", "nsd"} for scores in report["per_class"].values())
        assert report["images"] == 3 and "pooled_iou" not in report  # ceil(0.3 * 10) val cases
        samples = sorted((out / "eval-val" / "samples").glob("*.png"))
        assert len(samples) == 2 and sorted(report["samples"]) == [f"samples/{path.name}" for path in samples]
        panel = np.asarray(Image.open(samples[0]))
        truth_column = panel[-SIZE * 8:, SIZE * 8 + 4:2 * SIZE * 8 + 4].reshape(-1, 3)  # 32 px drawn 8 times larger
        colours = {tuple(colour) for colour in np.unique(truth_column, axis=0)}
        assert colours == {(0, 0, 0), *(tuple(int(c) for c in pictures.CLASS_COLOURS[k]) for k in (0, 1))}
        printed = capsys.readouterr().out
        assert "polyp" in printed and "instrument" in printed and "mean over the foreground" in printed

        # New images: label maps (each pixel's class), coloured overlays and the legend
        new, masks = tmp_path / "new", tmp_path / "masks"
        new.mkdir()
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), np.uint8)).save(new / "a.png")
        assert ev.main([str(out), "--images", str(new), "--out", str(masks), "--workers", "0", "--device", "cpu"]) == 0
        labels = np.asarray(Image.open(masks / "a.png"))
        assert labels.shape == (40, 50) and labels.dtype == np.uint8 and labels.max() < 3
        assert json.loads((masks / "label_legend.json").read_text()) == {str(k): name for k, name in enumerate(CLASSES)}
        assert (masks / "overlays" / "a.png").is_file()
        assert ev.main([str(out), "--images", str(new), "--probabilities", "--workers", "0", "--device", "cpu"]) == 2
    finally:
        torch.set_num_threads(threads)


def test_label_panel_png_draws_each_class_in_its_colour(tmp_path):
    truth = np.zeros((4, 4), np.int64)
    truth[0, :2], truth[3, 3] = 1, 2
    predicted = truth.copy()
    predicted[0, 1], predicted[2, 2] = 2, 1  # a wrong class, an invented one; (3, 3) missed below
    predicted[3, 3] = 0
    pictures.label_panel_png(np.full((4, 4, 3), 100, np.uint8), truth, predicted, tmp_path / "p.png", gap=4,
                             caption="case: mean IoU 12.50 %")
    panel = np.asarray(Image.open(tmp_path / "p.png"))
    rows = panel[-256:]  # the 4 x 4 maps drawn 64 times larger, under the header

    def column(k: int) -> np.ndarray:
        """Panel k (overlay, truth, prediction, errors), one pixel per label: (4, 4, 3)."""
        return rows[::64, k * (256 + 4):k * (256 + 4) + 256:64]

    colour = {k: tuple(int(c) for c in pictures.CLASS_COLOURS[k - 1]) for k in (1, 2)}
    assert tuple(column(1)[0, 0]) == colour[1] and tuple(column(1)[3, 3]) == colour[2]
    assert tuple(column(2)[0, 1]) == colour[2] and tuple(column(2)[2, 2]) == colour[1]
    errors = column(3)
    assert tuple(errors[0, 0]) == (255, 255, 255) and tuple(errors[0, 1]) == pictures.PRED_COLOUR
    assert tuple(errors[2, 2]) == pictures.PRED_COLOUR and tuple(errors[3, 3]) == pictures.MISSED_COLOUR
    assert tuple(errors[1, 1]) == (0, 0, 0)
    assert panel.shape[0] == 256 + 5 * pictures.HEADER_ROW + 4  # the header: names, 3 legend lines, the caption
