"""Adding a dataset or a backbone is one row of its table and, where no existing one fits, its builder: a toy of
each is added at run time (data.DATASET_TABLE, model.BACKBONES) and trained one step, with no other edit."""
from functools import partial

import torch

from llm4seg import data
from llm4seg.data.table import DatasetRow, Request, open_generated
from llm4seg.model import BACKBONES, build_model, cnn
from llm4seg.model.backbones_2d import unet_stage, upsample_conv
from llm4seg.model.u_shape import DecoderStage, Parts


def open_toy(request: Request) -> torch.utils.data.Dataset:
    """A dataset's opener: here the generated polyps under another name."""
    return open_generated(Request(**{**vars(request), "name": "synthetic"}))


def toy_parts(in_channels: int, num_classes: int, width: int) -> Parts:
    """A backbone's builder: five stages of `width` channels, max-pools, decoders merging by concatenation."""
    encoders = [unet_stage(c_in, width) for c_in in (in_channels, width, width, width, width)]
    downs = [torch.nn.MaxPool2d(2) for _ in range(4)]
    decoders = [DecoderStage(upsample_conv(width, width, "nearest"), unet_stage(2 * width, width)) for _ in range(4)]
    return Parts(encoders, downs, decoders, torch.nn.Conv2d(width, num_classes, 1), bottleneck=width)


def test_a_toy_dataset_and_a_toy_backbone_are_rows_and_train_one_step(monkeypatch, tiny_llm):
    monkeypatch.setitem(data.DATASET_TABLE, "toy", DatasetRow(open_toy))
    monkeypatch.setitem(BACKBONES, "toy-net", cnn(partial(toy_parts, width=8), spatial_dims=2))
    dataset = data.load_dataset("toy", split="train", img_size=32, synthetic_size=10)
    assert data.spatial_dims("toy") == 2 and data.num_classes("toy") == 1
    net = build_model("toy-net", str(tiny_llm), 2, "frozen")
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    images = data.normalize_batch(batch["image"]) if batch["image"].dtype == torch.uint8 else batch["image"]
    frozen = {name: p.clone() for name, p in net.bridge.layer.named_parameters()}
    trained = [p for p in net.parameters() if p.requires_grad]
    before = [p.clone() for p in trained]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(images), batch["mask"].float())
    loss.backward()
    torch.optim.SGD(trained, lr=0.1).step()
    assert all(torch.equal(p, frozen[name]) for name, p in net.bridge.layer.named_parameters())
    assert any(not torch.equal(p, q) for p, q in zip(trained, before, strict=True))
