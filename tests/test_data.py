"""Tests for data.py: each owner's raw layout built small under tmp_path (real file naming, JPEG
masks with compression noise, BUSI's extra masks and normal cases, ISIC's `_segmentation` names,
TN-SCUI's `.PNG`), splits, augmentation alignment, the Kvasir download against a local HTTP server,
every bad-input error, and the synthetic set."""
import http.server
import io
import json
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data

MEAN = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)


# ---------------------------------------------------------------------------------------------
# Building raw trees


def box_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) bool: a random rectangle plus a bar off one corner, so no symmetry maps it to itself."""
    mask = np.zeros((height, width), dtype=bool)
    top, left = rng.integers(2, height // 2), rng.integers(2, width // 2)
    bottom, right = top + rng.integers(6, height // 2 - 1), left + rng.integers(4, width // 3)
    mask[top:bottom, left:right] = True
    mask[bottom - 3:bottom, right:right + 5] = True
    return mask


def write_case(image_path: Path, mask_paths: list[Path], masks: list[np.ndarray]) -> None:
    """An image whose red channel is bright on the union of the masks, and the masks as 0 / 255."""
    union = np.logical_or.reduce(masks)
    image = np.zeros(union.shape + (3,), dtype=np.uint8)
    image[..., 0] = np.where(union, 230, 20)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(image_path)
    for path, mask in zip(mask_paths, masks):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(path, **(
            {"quality": 75} if path.suffix == ".jpg" else {}))


def make_kvasir(top: Path, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng, drawn = np.random.default_rng(seed), {}
    for i in range(count):
        stem = f"cju{i:04d}kvasir"
        drawn[stem] = box_mask(32, 32, rng)
        write_case(top / "images" / f"{stem}.jpg", [top / "masks" / f"{stem}.jpg"], [drawn[stem]])
    (top / "kavsir_bboxes.json").write_text("{}")
    return drawn


def make_busi(top: Path) -> dict[str, np.ndarray]:
    """6 benign (the first with two masks), 4 malignant, 3 normal cases with empty masks."""
    rng, drawn = np.random.default_rng(1), {}
    for label, count in (("benign", 6), ("malignant", 4), ("normal", 3)):
        for i in range(1, count + 1):
            case = f"{label} ({i})"
            masks = [box_mask(32, 32, rng) & (label != "normal")]
            paths = [top / label / f"{case}_mask.png"]
            if case == "benign (1)":
                masks.append(np.zeros((32, 32), dtype=bool))
                masks[1][24:30, 20:30] = True
                paths.append(top / label / f"{case}_mask_1.png")
            write_case(top / label / f"{case}.png", paths, masks)
            drawn[case] = np.logical_or.reduce(masks)
    return drawn


def write_split(path: Path, train: list[str], val: list[str], test: list[str] = ()) -> str:
    path.write_text(json.dumps({"train": train, "val": val, "test": list(test)}))
    return str(path)


def unnormalise(image: torch.Tensor) -> torch.Tensor:
    return image * STD + MEAN


def symmetries(mask: torch.Tensor) -> list[torch.Tensor]:
    """The 8 rotations / reflections of a (1, S, S) mask."""
    turns = [mask.rot90(k, (1, 2)) for k in range(4)]
    return turns + [t.flip(2) for t in turns]


def all_items(name: str, root: Path, **options) -> dict[str, dict]:
    return {item["name"]: item for split in ("train", "val")
            for item in data.load_dataset(name, str(root), split, img_size=32, **options)}


# ---------------------------------------------------------------------------------------------
# Raw layouts: counts, masks equal to the drawn shapes


def test_kvasir_layout_jpeg_masks_thresholded_counts_80_10_10(tmp_path):
    drawn = make_kvasir(tmp_path / "kvasir" / "Kvasir-SEG", 10)
    raw = np.asarray(Image.open(next((tmp_path / "kvasir" / "Kvasir-SEG" / "masks").iterdir())))
    assert len(np.unique(raw)) > 2, "the fixture's JPEG masks should carry compression noise"
    splits = {s: data.load_dataset("kvasir", str(tmp_path / "kvasir"), s, img_size=32)
              for s in data.SPLITS}
    assert {s: len(d) for s, d in splits.items()} == {"train": 8, "val": 1, "test": 1}
    for split, dataset in splits.items():
        for item in dataset:
            expected = torch.from_numpy(drawn[item["name"]]).float().unsqueeze(0)
            assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
            assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
            if split == "train":  # augmented: one of the 8 symmetries of the drawn shape
                assert any(torch.equal(item["mask"], s) for s in symmetries(expected))
            else:
                assert torch.equal(item["mask"], expected)


def test_busi_unites_masks_and_excludes_normal_cases_by_default(tmp_path, capsys):
    drawn = make_busi(tmp_path / "Dataset_BUSI_with_GT")
    items = all_items("busi", tmp_path)
    assert "benign + malignant only" in capsys.readouterr().out
    assert len(items) == 10 and not any(n.startswith("normal") for n in items)
    assert len(data.load_dataset("busi", str(tmp_path), "val", img_size=32)) == 3  # ceil(0.3 * 10)
    for name, item in items.items():
        assert any(torch.equal(item["mask"], s)
                   for s in symmetries(torch.from_numpy(drawn[name]).float().unsqueeze(0)))
    union = data.load_dataset("busi", str(tmp_path), "val", img_size=32, split_file=write_split(
        tmp_path / "one.json", [], ["benign (1)"]))[0]["mask"]
    assert torch.equal(union[0], torch.from_numpy(drawn["benign (1)"]).float())
    assert union[0, 24:30, 20:30].all(), "the second mask file belongs to the label"

    with_normal = all_items("busi", tmp_path, include_normal=True)
    assert "normal cases included" in capsys.readouterr().out
    assert len(with_normal) == 13
    assert all(with_normal[f"normal ({i})"]["mask"].sum() == 0 for i in (1, 2, 3))


def test_isic_segmentation_names_with_input_and_ground_truth_unpacked_apart(tmp_path):
    rng = np.random.default_rng(2)
    inputs = tmp_path / "ISIC2018_Task1-2_Training_Input"
    truths = tmp_path / "gt_zip" / "ISIC2018_Task1_Training_GroundTruth"
    drawn = {f"ISIC_{i:07d}": box_mask(32, 32, rng) for i in range(5)}
    for stem, mask in drawn.items():
        write_case(inputs / f"{stem}.jpg", [truths / f"{stem}_segmentation.png"], [mask])
    (inputs / "LICENSE.txt").write_text("not an image, not a case")
    val = data.load_dataset("isic2018", str(tmp_path), "val", img_size=32)
    assert len(val) == 2 and len(data.load_dataset("isic2018", str(tmp_path), img_size=32)) == 3
    for item in val:
        assert torch.equal(item["mask"][0], torch.from_numpy(drawn[item["name"]]).float())


def test_tnscui_uppercase_png_grayscale_and_resize(tmp_path):
    rng = np.random.default_rng(3)
    drawn = {str(i): box_mask(64, 64, rng) for i in range(1, 5)}
    for folder in ("image", "mask"):
        (tmp_path / "tn" / folder).mkdir(parents=True)
    for stem, mask in drawn.items():
        gray = np.where(mask, 200, 30).astype(np.uint8)
        Image.fromarray(gray).save(tmp_path / "tn" / "image" / f"{stem}.PNG")
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "tn" / "mask" / f"{stem}.PNG")
    val = data.load_dataset("tnscui", str(tmp_path), "val", img_size=32)
    assert len(val) == 2 and len(data.load_dataset("tnscui", str(tmp_path), img_size=32)) == 2
    for item in val:
        # 64 -> 32 px nearest picks one pixel of each 2x2 block; the rectangles' odd edges may
        # move by one pixel, so compare to the mask's own nearest resize.
        expected = Image.fromarray(drawn[item["name"]].astype(np.uint8) * 255).resize(
            (32, 32), Image.Resampling.NEAREST)
        assert torch.equal(item["mask"][0], torch.from_numpy(np.asarray(expected) >= 128).float())
        assert torch.allclose(item["image"][0], item["image"][1] * STD[1] / STD[0]
                              + (MEAN[1] - MEAN[0]) / STD[0], atol=1e-5), "gray -> equal RGB"


@pytest.mark.parametrize("mask_dir", ["masks/0", "masks"])
def test_folder_layouts_and_normalisation_applied_once(tmp_path, mask_dir):
    (tmp_path / "images").mkdir()
    (tmp_path / mask_dir).mkdir(parents=True)
    for stem in ("a", "b", "c"):
        Image.new("RGB", (40, 24), (255, 0, 128)).save(tmp_path / "images" / f"{stem}.png")
        Image.new("L", (40, 24)).save(tmp_path / mask_dir / f"{stem}.png")
    dataset = data.load_dataset("folder", str(tmp_path), "test", img_size=16, test_fraction=0.2)
    item = dataset[0]
    assert len(dataset) == 1 and item["image"].shape == (3, 16, 16)
    # One (x / 255 - mean) / std; float32 rounding only.
    expected = (torch.tensor([1.0, 0.0, 128 / 255]).view(3, 1, 1) - MEAN) / STD
    torch.testing.assert_close(item["image"], expected.expand(3, 16, 16), atol=1e-5, rtol=0)


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


# ---------------------------------------------------------------------------------------------
# Splits


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


# ---------------------------------------------------------------------------------------------
# Augmentation


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


def test_augmentation_keeps_image_and_mask_aligned_and_is_seeded(tmp_path, l_shape_case):
    dataset = data.load_dataset("folder", str(tmp_path), "train", img_size=16, split_file=l_shape_case)
    torch.manual_seed(0)
    draws = [dataset[0] for _ in range(40)]
    orientations = set()
    for item in draws:
        image = unnormalise(item["image"])
        assert torch.equal((image[0] > 0.5).float(), item["mask"][0])
        orientations.add(str(item["mask"].tolist()))
    assert len(orientations) == 8, "rot90 x flips reach all 8 symmetries of the square"
    torch.manual_seed(0)
    assert all(torch.equal(a["image"], dataset[0]["image"]) for a in draws)
    val = data.load_dataset("folder", str(tmp_path), "val", img_size=16, split_file=write_split(
        tmp_path / "val.json", [], ["l"]))
    upright = val[0]["mask"]
    assert upright[0, 2:12, 2:4].all() and upright[0, 10:12, 2:10].all(), "val is not augmented"
    assert all(torch.equal(val[0]["mask"], upright) for _ in range(5))


def test_dataloader_workers_reproducible_under_manual_seed(tmp_path, l_shape_case):
    dataset = data.load_dataset("folder", str(tmp_path), "train", img_size=16, split_file=l_shape_case)
    repeated = torch.utils.data.ConcatDataset([dataset] * 8)

    def masks() -> torch.Tensor:
        torch.manual_seed(3)
        loader = torch.utils.data.DataLoader(repeated, batch_size=4, num_workers=2)
        return torch.cat([batch["mask"] for batch in loader])   # (8, 1, 16, 16)

    first = masks()
    assert torch.equal(first, masks())
    assert len({str(m.tolist()) for m in first}) > 1, "workers must not repeat one draw"


# ---------------------------------------------------------------------------------------------
# Kvasir download from a local server


def kvasir_zip(pairs: int) -> bytes:
    with io.BytesIO() as buffer:
        with tempfile.TemporaryDirectory() as folder:
            make_kvasir(Path(folder) / "Kvasir-SEG", pairs)
            with zipfile.ZipFile(buffer, "w") as archive:
                for path in sorted(Path(folder).rglob("*")):
                    archive.write(path, path.relative_to(folder))
        return buffer.getvalue()


@pytest.fixture(scope="session")
def kvasir_server():
    """127.0.0.1 on an ephemeral port: /good.zip (3 pairs), /short.zip (2 pairs), /cut.zip (claims
    the full length, sends half, closes)."""
    good, short = kvasir_zip(3), kvasir_zip(2)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"/good.zip": good, "/short.zip": short, "/cut.zip": good}[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2] if self.path == "/cut.zip" else body)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_kvasir_downloads_verifies_and_renames_into_place(tmp_path, kvasir_server, monkeypatch,
                                                          capsys):
    monkeypatch.setenv(data.KVASIR_URL_ENV, f"{kvasir_server}/good.zip")
    monkeypatch.setattr(data, "KVASIR_PAIRS", 3)
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(tmp_path))
    train = data.load_dataset("kvasir", None, "train", img_size=32)  # default root: $LLM4SEG_DATA/kvasir
    assert len(train) == 1 and len(list((tmp_path / "kvasir" / "Kvasir-SEG" / "masks").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kvasir"], "no temp files left"
    assert "kvasir-seg.zip" in capsys.readouterr().err, "a tqdm progress bar on stderr"


@pytest.mark.parametrize("path, error", [("/cut.zip", ConnectionError), ("/short.zip", ValueError)])
def test_failed_download_leaves_no_partial_tree(tmp_path, kvasir_server, monkeypatch, path, error):
    monkeypatch.setenv(data.KVASIR_URL_ENV, kvasir_server + path)
    monkeypatch.setattr(data, "KVASIR_PAIRS", 3)
    with pytest.raises(error, match=r"stopped after \d+ of \d+ bytes|2 image/mask pairs, expected 3"):
        data.load_dataset("kvasir", str(tmp_path / "kvasir"))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Bad input


def test_unreadable_image_names_the_file(tmp_path, l_shape_case):
    (tmp_path / "images" / "l.png").write_bytes(b"not a png")
    dataset = data.load_dataset("folder", str(tmp_path), "train", img_size=16, split_file=l_shape_case)
    with pytest.raises(ValueError, match=r"cannot read image file .*images/l\.png"):
        dataset[0]


def test_size_mismatch_names_image_and_mask(tmp_path, l_shape_case):
    Image.fromarray(np.zeros((30, 48), np.uint8)).save(tmp_path / "masks" / "l.png")
    dataset = data.load_dataset("folder", str(tmp_path), "train", img_size=16, split_file=l_shape_case)
    with pytest.raises(ValueError, match=r"image .*images/l\.png is 48x32 but its mask .*masks/l\.png is 48x30"):
        dataset[0]


def test_unpaired_files_reported_with_count_and_examples(tmp_path):
    make_kvasir(tmp_path / "Kvasir-SEG", 4)
    for stem in ("x1", "x2", "x3"):
        Image.new("RGB", (8, 8)).save(tmp_path / "Kvasir-SEG" / "images" / f"{stem}.jpg")
    Image.new("L", (8, 8)).save(tmp_path / "Kvasir-SEG" / "masks" / "lonely.jpg")
    with pytest.raises(ValueError, match=r"3 images in .* have no mask .*first: x1, x2, x3\); "
                                         r"1 masks in .* have no image .*first: lonely"):
        data.load_dataset("kvasir", str(tmp_path))
    for stem in ("x1", "x2", "x3", "lonely"):
        next((tmp_path / "Kvasir-SEG").rglob(f"{stem}.jpg")).unlink()
    Image.new("RGB", (8, 8)).save(tmp_path / "Kvasir-SEG" / "images" / "cju0000kvasir.png")
    with pytest.raises(ValueError, match=r"1 case ids in .*images have more than one image .*cju0000"):
        data.load_dataset("kvasir", str(tmp_path))


def test_empty_and_wrong_directories_say_what_was_looked_for(tmp_path, monkeypatch):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no image files .* in .*empty/images"):
        data.load_dataset("folder", str(tmp_path / "empty"))
    (tmp_path / "wrong" / "photos").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"kvasir: expected the layout Kvasir-SEG/images"):
        data.load_dataset("kvasir", str(tmp_path / "wrong"))  # not empty: no download either
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"Dataset_BUSI_with_GT.*nowhere/busi.*scholar\.cu"):
        data.load_dataset("busi")


def test_wrong_names_options_and_stale_split_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'kvasir-seg': expected one of kvasir"):
        data.check_dataset_name("kvasir-seg")
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        data.load_dataset("synthetic", split="valid")
    make_busi(tmp_path / "Dataset_BUSI_with_GT")
    with pytest.raises(ValueError, match="no test cases .* test_fraction > 0"):
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
    with pytest.raises(ValueError, match=r"split file .*bad\.json is unreadable"):
        data.load_dataset("busi", str(tmp_path), "val", split_file=str(tmp_path / "bad.json"))


# ---------------------------------------------------------------------------------------------
# Synthetic


def test_synthetic_deterministic_disjoint_and_binary():
    sizes = {s: len(data.load_dataset("synthetic", split=s, img_size=32)) for s in data.SPLITS}
    assert sizes == {"train": 210, "val": 60, "test": 30}
    names = [{d["name"] for d in data.load_dataset("synthetic", split=s, img_size=8)}
             for s in data.SPLITS]
    assert sum(map(len, names)) == len(set.union(*names)) == 300
    a, b = (data.load_dataset("synthetic", split="val", img_size=64)[5] for _ in range(2))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    other = data.load_dataset("synthetic", split="val", img_size=64, seed=1)[5]
    assert not torch.equal(a["image"], other["image"])
    assert set(a["mask"].unique().tolist()) == {0.0, 1.0}


def test_synthetic_not_solved_by_one_colour_threshold():
    """Best IoU of 'channel c above / below t' over all channels, 64 thresholds and both
    polarities, one rule for 8 images; the distractors (dark purple, yellow) defeat it."""
    items = [data.load_dataset("synthetic", split="val", img_size=64)[i] for i in range(8)]
    images = torch.stack([unnormalise(i["image"]) for i in items])   # (8, 3, 64, 64)
    masks = torch.stack([i["mask"][0] for i in items]).bool()        # (8, 64, 64)
    best = 0.0
    for channel in range(3):
        for t in torch.linspace(0, 1, 64):
            for predicted in (images[:, channel] > t, images[:, channel] <= t):
                iou = ((predicted & masks).sum((1, 2)) / (predicted | masks).sum((1, 2))).mean()
                best = max(best, iou.item())
    assert best < 0.5, f"a single threshold reaches IoU {best:.2f}"  # measured 0.2
