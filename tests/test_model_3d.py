"""model/backbones_3d.py: MedNeXt and 3D UX-Net against their references, parameter counts against the
authors' code, G MACs at 96^3 with and without the Llama-3.2-1B layer, shapes, sides and options.

References: MONAI's MedNeXt port (installed; the S size, which it builds exactly as MIC-DKFZ's code) weight for
weight; the 3D UX-Net authors' UXNET through tests/fixtures/uxnet3d_reference.safetensors, its logits at
reduced widths (tests/make_uxnet3d_fixture.py made it once). Full-size networks are built on the meta device:
counting needs only shapes.
"""
import re
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open

from llm4seg.model import BACKBONES, SegmentationNet, build_model, count_gmacs, count_params, mednext_parts
from make_uxnet3d_fixture import FIXTURE, fixture_net, fixture_weights, weights_sha256
from test_model import LLAMA_3_2_1B, TINY_LLAMA, write_one_layer_checkpoint

# Measured from the authors' code at in_channels 1, 14 classes: MASILab/3DUX-Net UXNET (feat 48-96-192-384,
# hidden 768) and MIC-DKFZ/MedNeXt create_mednext_v1(1, 14, size, kernel_size, deep_supervision=False). MedNeXt's
# counts include `dummy_tensor`, one parameter that works around a gradient-checkpointing issue and never
# reaches the output: ours has one fewer.
AUTHORS_PARAMS = {"uxnet3d": 53_006_510, "mednext-s": 5_551_311, "mednext": 10_526_703, "mednext-m": 17_549_359,
                  "mednext-l": 61_779_663, "mednext-b-k5": 10_956_335}
OUR_PARAMS = {name: count - (1 if name.startswith("mednext") else 0) for name, count in AUTHORS_PARAMS.items()}
THREE_D = ["mednext", "mednext-s", "mednext-m", "mednext-l", "mednext-b-k5", "uxnet3d"]  # the paper's and MedNeXt's sizes


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_one_layer_checkpoint(tmp_path_factory.mktemp("llm") / "llama-3.2-1b", LLAMA_3_2_1B,
                                      layer=15, dtype=torch.bfloat16, seed=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_one_layer_checkpoint(tmp_path_factory.mktemp("llm") / "tiny-llama", TINY_LLAMA,
                                      layer=2, dtype=torch.float32, seed=2)


def meta_model(backbone: str, llm=None, layer: int = 15, **options):
    """The network on the meta device (the LLM layer is read to the CPU, then moved)."""
    with torch.device("meta"):
        net = build_model(backbone, None if llm is None else str(llm), layer, num_classes=14, **options)
    return net.to("meta")


# ----------------------------------------------------------------------------- counts

def test_the_3d_rows_are_the_papers_two_backbones_mednexts_sizes_and_the_demos():
    assert [name for name, row in BACKBONES.items() if row.spatial_dims == (3,)] == [*THREE_D, "mednext-tiny"]
    # mednext-tiny, make demo-btcv's: MedNeXt-S at width 8, a sixteenth of its parameters
    assert count_params(meta_model("mednext-tiny")) == (374_462, 0)  # at 14 classes


@pytest.mark.parametrize("backbone", THREE_D)
def test_parameters_equal_the_authors_code(backbone):
    assert count_params(meta_model(backbone)) == (OUR_PARAMS[backbone], 0)


def test_mednext_b_differs_from_monais_b_in_the_down_blocks_only():
    """MONAI's port gives the down block that opens encoder k the expansion ratio of encoder k-1, the authors' code
    that of encoder k (B: 3, 4, 4, 4 against MONAI's 2, 3, 4, 4). A down block's ratio r multiplies its 1x1 convs:
    C_in * r C_in + r C_in (conv2) + r C_in * 2 C_in + 2 C_in (conv3), so one more r adds 3 C_in^2 + C_in."""
    from monai.networks.nets.mednext import create_mednext

    with torch.device("meta"):
        monai_b = sum(p.numel() for p in create_mednext("B", in_channels=1, out_channels=14).parameters())
    assert monai_b == 10_511_246
    extra = sum(3 * c * c + c for c in (32, 64))          # down blocks 1 and 2: r 3 vs 2 and 4 vs 3
    assert count_params(meta_model("mednext"))[0] == monai_b + extra


def bottleneck_shape(backbone: str, side: int) -> tuple[int, ...]:
    net = meta_model(backbone)
    shapes = []
    net.encoder5.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        net(torch.zeros(1, 1, side, side, side, device="meta"))
    return shapes[0]


@pytest.mark.parametrize("backbone, channels", [("mednext", 512), ("mednext-l", 512), ("uxnet3d", 768)])
def test_at_96_cubed_the_bottleneck_is_216_tokens(backbone, channels):
    assert bottleneck_shape(backbone, 96) == (1, channels, 6, 6, 6)


# G MACs at 1 x 1 x 96^3, 14 classes (FlopCounterMode: convs and matmuls). FlopCounterMode on the authors'
# UXNET counts the same 577.79; their README's 639.4 "G FLOPs" comes from another counter.
GMACS_96 = {"mednext-s": 53.71, "mednext": 70.14, "mednext-m": 102.58, "mednext-l": 208.08,
            "mednext-b-k5": 86.29, "uxnet3d": 577.79}
# + Llama-3.2-1B layer 15 on the 216 bottleneck tokens: its 60,821,504 weights once per token (13.14 G),
# attention 2 x 216^2 x 2048 (0.19 G), the adapters 2 x 216 x C x 2048 (0.45 G at C = 512, 0.68 G at 768).
BRIDGE_GMACS_96 = {512: 13.78, 768: 14.01}


@pytest.mark.parametrize("backbone", THREE_D)
def test_gmacs_at_96_cubed(backbone):
    assert count_gmacs(meta_model(backbone), 1, 96, spatial_dims=3) == pytest.approx(GMACS_96[backbone], abs=0.005)


@pytest.mark.parametrize("backbone, channels", [("mednext", 512), ("mednext-s", 512), ("mednext-m", 512),
                                                ("mednext-l", 512), ("mednext-b-k5", 512), ("uxnet3d", 768)])
def test_the_frozen_llama_layer_adds_its_adapters_and_its_macs(llama_dir, backbone, channels):
    net = meta_model(backbone, llama_dir)
    adapters = channels * 2048 + 2048 + 2048 * channels + channels
    assert adapters == {512: 2_099_712, 768: 3_148_544}[channels]
    assert count_params(net) == (OUR_PARAMS[backbone] + adapters, 60_821_504)
    gmacs = count_gmacs(net, 1, 96, spatial_dims=3)
    assert gmacs == pytest.approx(GMACS_96[backbone] + BRIDGE_GMACS_96[channels], abs=0.01)


# ----------------------------------------------------------------------------- MedNeXt against MONAI

MONAI_NAMES = [  # MONAI's MedNeXt tensor names -> ours
    (r"stem\.(\w+)", lambda m: f"encoder1.0.{m[1]}"),
    (r"enc_stages\.(\d)\.(\d+)\.(.+)", lambda m: f"encoder{int(m[1]) + 1}.{int(m[2]) + 1}.{m[3]}"),
    (r"down_blocks\.(\d)\.(.+)", lambda m: f"encoder{int(m[1]) + 2}.0.{m[2]}"),
    (r"bottleneck\.(\d+)\.(.+)", lambda m: f"encoder5.{int(m[1]) + 1}.{m[2]}"),
    (r"up_blocks\.(\d)\.(.+)", lambda m: f"decoder{4 - int(m[1])}.up.{m[2]}"),
    (r"dec_stages\.(\d)\.(\d+)\.(.+)", lambda m: f"decoder{4 - int(m[1])}.fuse.{m[2]}.{m[3]}"),
    (r"out_0\.conv_out\.(\w+)", lambda m: f"head.{m[1]}"),
]


def our_names_for_monai(state: dict) -> dict:
    ours = {}
    for key, tensor in state.items():
        rule = next(((pattern, name) for pattern, name in MONAI_NAMES if re.fullmatch(pattern, key)), None)
        assert rule is not None, f"unmapped MONAI MedNeXt tensor {key}"
        ours[rule[1](re.fullmatch(rule[0], key))] = tensor
    return ours


@pytest.mark.parametrize("kernel", [3, 5])
def test_mednext_equals_monais_weight_for_weight(kernel):
    """The S size at 32^3 (a 2^3 bottleneck), 3 classes, GroupNorm affines drawn away from (1, 0): the row
    "mednext-s" at kernel 3, mednext_parts at kernel 5 (no row has S with kernel 5). GroupNorm keeps no running
    statistics and nothing drops out: train and eval mode compute the same, so eval is run. Measured max |diff|
    0.0 (the same operations in the same order); the tolerance leaves room for other kernels' summation order."""
    from monai.networks.nets.mednext import create_mednext

    torch.manual_seed(0)
    reference = create_mednext("S", in_channels=1, out_channels=3, kernel_size=kernel).eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.5, 0.5)
    if kernel == 3:
        ours = build_model("mednext-s", None, num_classes=3).eval()
    else:
        ours = SegmentationNet(mednext_parts(1, 3, size="S", kernel=kernel), None, spatial_dims=3).eval()
    assert not [m for m in ours.modules() if getattr(m, "track_running_stats", False)]
    mapped = our_names_for_monai(reference.state_dict())
    for name, tensor in ours.state_dict().items():
        assert mapped[name].shape == tensor.shape, name
    ours.load_state_dict(mapped)                                   # strict: every tensor named once
    volume = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(volume), reference(volume), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- 3D UX-Net against its authors

def test_uxnet3d_equals_the_authors_logits():
    """Widths 8-16-32-64, hidden 128, 32^3, 3 classes: tests/make_uxnet3d_fixture.py ran the authors' UXNET with
    these weights. Max |diff| measured 1.4e-6 on logits of std 0.55 (float32 summation order). Nothing keeps
    running statistics and DropPath is off (rate 0, as the authors train): train mode computes the same."""
    with safe_open(FIXTURE, framework="pt") as fixture:
        metadata, volume, expected = fixture.metadata(), fixture.get_tensor("input"), fixture.get_tensor("logits")
    net = fixture_net()
    weights = fixture_weights(net)
    assert weights_sha256(weights) == metadata["weights_sha256"], "the weights drawn differ from the fixture's"
    net.load_state_dict(weights)                                    # strict
    assert not [m for m in net.modules() if getattr(m, "track_running_stats", False)]  # eval == train
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(volume), expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- running the networks

@pytest.mark.parametrize("backbone", ["mednext", "uxnet3d"])
@pytest.mark.parametrize("sides", [(32, 32, 32), (64, 48, 32)])
def test_logits_have_the_volumes_size(tiny_dir, backbone, sides):
    """On the meta device: shapes are exact there, and a full-size forward costs seconds on the CPU."""
    with torch.no_grad():
        logits = meta_model(backbone, tiny_dir, layer=2)(torch.zeros(2, 1, *sides, device="meta"))
    assert logits.shape == (2, 14, *sides)


@pytest.mark.parametrize("backbone", THREE_D)
def test_3d_defaults_and_the_config_round_trip(tiny_dir, backbone):
    """in_channels 1 and spatial_dims 3 by default; build_model(**asdict(config)) rebuilds the same tensors."""
    net = meta_model(backbone, tiny_dir, layer=2)
    with torch.device("meta"):
        rebuilt = build_model(**asdict(net.config))
    assert (net.config.in_channels, net.config.spatial_dims, net.config.residual) == (1, 3, False)
    assert rebuilt.config == net.config
    layout = [(key, tensor.shape) for key, tensor in net.state_dict().items()]
    assert layout == [(key, tensor.shape) for key, tensor in rebuilt.state_dict().items()]
    assert not [key for key, _ in layout if key.startswith("bridge.layer.")]   # the frozen layer is not saved


def test_sides_not_multiple_of_16_and_2d_batches_are_refused():
    net = meta_model("uxnet3d")
    with pytest.raises(ValueError, match=r"got 96x96x100; depth, height and width must be positive multiples of "
                                         r"16 \(the network halves them 4 times\): resize or crop, e.g. to 96x96x96"):
        net(torch.zeros(1, 1, 96, 96, 100, device="meta"))
    with pytest.raises(ValueError, match=r"expected a batch of \(B, C, D, H, W\) volumes for this 3D network, "
                                         r"got shape \(1, 1, 96, 96\)"):
        net(torch.zeros(1, 1, 96, 96, device="meta"))


@pytest.mark.parametrize("backbone, spatial_dims, message", [
    ("mednext", 2, "backbone 'mednext' is 3D: got spatial_dims=2; for images use one of unet, cmunext, nnunet, vit"),
    ("uxnet3d", 2, "backbone 'uxnet3d' is 3D: got spatial_dims=2; for images use one of unet, cmunext, nnunet, vit"),
    ("nnunet", 3, "backbone 'nnunet' is 2D: got spatial_dims=3; for volumes use one of mednext, mednext-s, "
                  "mednext-m, mednext-l, mednext-b-k5, uxnet3d, mednext-tiny, vit"),
])
def test_a_backbone_of_the_other_dimension_is_refused(backbone, spatial_dims, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_model(backbone, None, spatial_dims=spatial_dims)
