"""Tests of data/generated.py's polyps through data.load_dataset: the scenes are deterministic per (seed, index),
the splits disjoint, the masks binary, and no single-colour threshold solves them."""
import torch

from llm4seg import data
from dataset_trees import unnormalise


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
