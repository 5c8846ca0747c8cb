"""Make tests/fixtures/uxnet3d_reference.safetensors: logits of the 3D UX-Net authors' own code, for
tests/test_model_3d.py to compare ours against. Run once, by hand; the suite does not run it.

    git clone https://github.com/MASILab/3DUX-Net /tmp/uxnet_ref/3DUX-Net     # the commit in AUTHORS_COMMIT
    .venv/bin/python -m pip install --no-deps --target /tmp/uxnet_ref/site timm==1.0.31
    .venv/bin/python tests/make_uxnet3d_fixture.py --authors /tmp/uxnet_ref/3DUX-Net --timm /tmp/uxnet_ref/site

What it does:
1. builds the authors' UXNET (networks/UXNet_3D/network_backbone.py) at reduced widths: in 1, out 3,
   feat_size 8-16-32-64, hidden 128, depths 2-2-2-2, drop_path_rate 0, layer scale 1e-6. Their out block is
   built for 48 channels whatever feat_size is, so it is replaced by the same MONAI UnetOutBlock on 8;
2. draws every tensor of OUR uxnet3d at those widths with fixture_weights (seeded; layer scales and LayerNorm
   affines drawn too, so that no branch is negligible), maps them to the authors' names with AUTHORS_NAMES and
   loads them into theirs, strictly: every tensor named, every shape equal;
3. runs their network in eval mode (it has no dropout or running statistics: train mode is the same) on a
   seeded (1, 1, 32, 32, 32) input and saves input and logits, with the sha256 of the weights in the metadata.
The weights are not stored: at 1,547,291 parameters they would be 6 MB; the test draws them again with
fixture_weights and checks their sha256.

Their encoder imports trunc_normal_ and DropPath from timm.models.layers. timm 1.x imports torchvision at
package import, which the project's venv does not have (and a torchvision wheel pins its own torch), so the
two names are loaded from timm's own layers/drop.py and layers/weight_init.py, which import only torch.
Neither is called here: drop_path_rate 0 makes every DropPath an nn.Identity, and their weight init is
commented out. Their backbone also imports lib/ (a logger, a BN helper) from the same checkout.
"""
import argparse
import hashlib
import importlib.util
import re
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm4seg.model import SegmentationNet, uxnet3d_parts  # noqa: E402

AUTHORS_COMMIT = "14ea46b7b4c4980b46aba066aaaa24b1d9c1bb0d"  # MASILab/3DUX-Net, "Added FeTA split"
FIXTURE_WIDTHS = (8, 16, 32, 64, 128)  # feat_size 8-16-32-64, hidden_size 128
IN_CHANNELS, NUM_CLASSES, SIDE, SEED = 1, 3, 32, 0
FIXTURE = REPO / "tests" / "fixtures" / "uxnet3d_reference.safetensors"

# The authors' tensor names -> ours. R: UnetResBlock's convs (their conv3 is our shortcut's conv); their
# norms are InstanceNorm without affine, no tensors.
RES_BLOCK = [(r"conv1\.conv\.weight", "conv1.weight"), (r"conv2\.conv\.weight", "conv2.weight"),
             (r"conv3\.conv\.weight", "shortcut.0.weight")]
AUTHORS_NAMES = [
    (r"uxnet_3d\.downsample_layers\.(\d)\.(\d)\.(\w+)", lambda m: f"down{int(m[1]) + 1}.{m[2]}.{m[3]}"),
    (r"uxnet_3d\.stages\.([012])\.(\d)\.(.+)", lambda m: f"encoder{int(m[1]) + 2}.{m[2]}.{m[3]}"),
    (r"uxnet_3d\.stages\.3\.(\d)\.(.+)", lambda m: f"encoder5.0.{m[1]}.{m[2]}"),
    (r"uxnet_3d\.norm([012])\.(\w+)", lambda m: f"decoder{int(m[1]) + 2}.skip_block.0.{m[2]}"),
    (r"uxnet_3d\.norm3\.(\w+)", lambda m: f"encoder5.1.{m[1]}"),
    (r"encoder1\.layer\.(.+)", lambda m: f"decoder1.skip_block.{res_block(m[1])}"),
    (r"encoder([234])\.layer\.(.+)", lambda m: f"decoder{m[1]}.skip_block.1.{res_block(m[2])}"),
    (r"encoder5\.layer\.(.+)", lambda m: f"encoder5.2.{res_block(m[1])}"),
    (r"decoder([2-5])\.transp_conv\.conv\.weight", lambda m: f"decoder{int(m[1]) - 1}.up.weight"),
    (r"decoder([2-5])\.conv_block\.(.+)", lambda m: f"decoder{int(m[1]) - 1}.fuse.{res_block(m[2])}"),
    (r"decoder1\.layer\.(.+)", lambda m: f"head.0.{res_block(m[1])}"),
    (r"out\.conv\.conv\.(\w+)", lambda m: f"head.1.{m[1]}"),
]


def res_block(name: str) -> str:
    for pattern, ours in RES_BLOCK:
        if re.fullmatch(pattern, name):
            return ours
    raise KeyError(f"unmapped residual-block tensor {name}")


def our_name(authors_name: str) -> str:
    for pattern, ours in AUTHORS_NAMES:
        if m := re.fullmatch(pattern, authors_name):
            return ours(m)
    raise KeyError(f"unmapped UXNET tensor {authors_name}")


def fixture_net() -> SegmentationNet:
    return SegmentationNet(uxnet3d_parts(IN_CHANNELS, NUM_CLASSES, widths=FIXTURE_WIDTHS), None, spatial_dims=3)


def fixture_weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of `net`'s state_dict, drawn in name order from one seeded generator: layer scales
    gamma U(0.5, 1) (the authors start them at 1e-6, which would hide their blocks), LayerNorm weights
    U(0.5, 1.5) and biases U(-0.5, 0.5), conv weights and biases U(-b, b) with b = 1 / sqrt(fan_in), PyTorch's
    default bound (fan_in = the weight's numel per output row: (C_in / groups) k^3)."""
    layer_norms = {f"{module_name}.{name}" for module_name, module in net.named_modules()
                   if isinstance(module, torch.nn.LayerNorm) for name in ("weight", "bias")}
    generator = torch.Generator().manual_seed(SEED)
    weights = {}
    for name, tensor in sorted(net.state_dict().items()):
        if name.endswith("gamma"):
            low, high = 0.5, 1.0
        elif name in layer_norms:
            low, high = (0.5, 1.5) if name.endswith("weight") else (-0.5, 0.5)
        else:
            weight = name.removesuffix("bias") + "weight" if name.endswith("bias") else name
            fan_in = net.get_parameter(weight)[0].numel()
            low, high = -fan_in ** -0.5, fan_in ** -0.5
        u = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)     # U(0, 1)
        weights[name] = (low + (high - low) * u).float()
    return weights


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def fixture_input() -> torch.Tensor:
    return torch.randn(1, IN_CHANNELS, SIDE, SIDE, SIDE, generator=torch.Generator().manual_seed(SEED + 1))


def import_authors_uxnet(authors: Path, timm_dir: Path):
    """The authors' UXNET class, their two timm names served from timm's own files (see the docstring)."""
    layers = types.ModuleType("timm.models.layers")
    for file in ("drop", "weight_init"):
        path = timm_dir / "timm" / "layers" / f"{file}.py"
        spec = importlib.util.spec_from_file_location(f"timm_layers_{file}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name in ("DropPath", "trunc_normal_"):
            if hasattr(module, name):
                setattr(layers, name, getattr(module, name))
    sys.modules.update({"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
                        "timm.models.layers": layers})
    sys.path.insert(0, str(authors))
    from networks.UXNet_3D.network_backbone import UXNET
    return UXNET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--authors", type=Path, required=True, help="a checkout of MASILab/3DUX-Net")
    parser.add_argument("--timm", type=Path, required=True, help="a folder holding the timm package")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args()
    from monai.networks.blocks.dynunet_block import UnetOutBlock
    from safetensors.torch import save_file

    UXNET = import_authors_uxnet(args.authors, args.timm)
    theirs = UXNET(in_chans=IN_CHANNELS, out_chans=NUM_CLASSES, depths=[2, 2, 2, 2], feat_size=list(FIXTURE_WIDTHS[:4]),
                   drop_path_rate=0, layer_scale_init_value=1e-6, hidden_size=FIXTURE_WIDTHS[4], spatial_dims=3)
    theirs.out = UnetOutBlock(spatial_dims=3, in_channels=FIXTURE_WIDTHS[0], out_channels=NUM_CLASSES)
    weights = fixture_weights(fixture_net())
    mapped = {name: weights[our_name(name)] for name in theirs.state_dict()}
    assert sorted(map(our_name, mapped)) == sorted(weights), "the table must name every tensor once"
    for name, tensor in theirs.state_dict().items():
        assert tensor.shape == mapped[name].shape, (name, tensor.shape, mapped[name].shape)
    theirs.load_state_dict(mapped, strict=True)
    image = fixture_input()
    with torch.no_grad():
        logits = theirs.eval()(image)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"input": image, "logits": logits.contiguous()}, args.out, metadata={
        "source": f"MASILab/3DUX-Net@{AUTHORS_COMMIT} UXNET, tests/make_uxnet3d_fixture.py",
        "widths": ",".join(map(str, FIXTURE_WIDTHS)), "weights_sha256": weights_sha256(weights),
        "torch": torch.__version__})
    print(f"wrote {args.out}: logits {tuple(logits.shape)}, {sum(t.numel() for t in weights.values()):,} parameters")


if __name__ == "__main__":
    main()
