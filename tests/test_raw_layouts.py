"""Tests of data/images/raw_layouts.py through data.load_dataset: each owner's raw layout built small under tmp_path
(Kvasir's JPEG masks with compression noise, BUSI's extra masks and normal cases, ISIC's
`_segmentation` names unpacked apart, TN-SCUI's `.PNG`), unpaired and missing files, and the Kvasir
download against a local HTTP server."""
import http.server
import io
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llm4seg import data
from llm4seg.data.images import raw_layouts
from dataset_trees import MEAN, STD, all_items, box_mask, make_busi, make_kvasir, symmetries, write_case, write_split


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
    monkeypatch.setenv(raw_layouts.KVASIR_URL_ENV, f"{kvasir_server}/good.zip")
    monkeypatch.setattr(raw_layouts, "KVASIR_PAIRS", 3)
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(tmp_path))
    train = data.load_dataset("kvasir", None, "train", img_size=32)  # default root: $LLM4SEG_DATA/kvasir
    assert len(train) == 1 and len(list((tmp_path / "kvasir" / "Kvasir-SEG" / "masks").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kvasir"], "no temp files left"
    assert "kvasir-seg.zip" in capsys.readouterr().err, "a tqdm progress bar on stderr"


@pytest.mark.parametrize("path, error", [("/cut.zip", ConnectionError), ("/short.zip", ValueError)])
def test_failed_download_leaves_no_partial_tree(tmp_path, kvasir_server, monkeypatch, path, error):
    monkeypatch.setenv(raw_layouts.KVASIR_URL_ENV, kvasir_server + path)
    monkeypatch.setattr(raw_layouts, "KVASIR_PAIRS", 3)
    with pytest.raises(error, match=r"stopped after \d+ of \d+ bytes|2 image/mask pairs, expected 3"):
        data.load_dataset("kvasir", str(tmp_path / "kvasir"))
    assert list(tmp_path.iterdir()) == []
