"""model.py: parameter counts and MACs against the paper's Table 1, nnU-Net against its reference
implementation weight for weight, shapes, gradients, modes, checkpoints.

The LLM layers are read by the real llm_layer.load_layer from local checkpoint directories that
hold config.json and a model.safetensors with just one layer: Llama-3.2-1B's and
DeepSeek-R1-Distill-Qwen-1.5B's real shapes with random bf16 values (no download is possible
here), and a tiny Llama-shaped layer for the tests that run the network.
"""
import copy
import hashlib
import json
import re
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from llm4seg.model import build_model, count_params, set_frozen_dtype

# The keys of the real config.json files that describe one decoder layer.
LLAMA_3_2_1B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048,
                    intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                    num_hidden_layers=16, rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
                    hidden_act="silu", torch_dtype="bfloat16")
DEEPSEEK_R1_QWEN_1_5B = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=1536,
                             intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                             num_hidden_layers=28, rms_norm_eps=1e-6, hidden_act="silu",
                             torch_dtype="bfloat16")
TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_hidden_layers=2, rms_norm_eps=1e-5,
                  attention_bias=False, hidden_act="silu", torch_dtype="float32")

UNET_PARAMS = 34_527_041      # paper: 34.52 M (Table 1)
CMUNEXT_PARAMS = 3_149_185    # paper: 3.14 M
NNUNET_PARAMS = 7_765_985     # paper: 7.76 M (PlainConvUNet's 7,766,436 less its 3 deep-supervision heads)


def layer_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint names (without `model.layers.{i}.`) and nn.Linear (out, in) shapes of one layer."""
    D, I = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or D // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"self_attn.q_proj.weight": (q, D), "self_attn.k_proj.weight": (kv, D),
              "self_attn.v_proj.weight": (kv, D), "self_attn.o_proj.weight": (D, q),
              "mlp.gate_proj.weight": (I, D), "mlp.up_proj.weight": (I, D), "mlp.down_proj.weight": (D, I),
              "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,)}
    if config["model_type"] == "qwen2":  # Qwen2 always has q/k/v biases
        shapes |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    return shapes


def layer_param_count(config: dict) -> int:
    return sum(torch.Size(shape).numel() for shape in layer_shapes(config).values())


def write_one_layer_checkpoint(directory, config: dict, layer: int, dtype: torch.dtype, seed: int):
    """A Hugging Face model directory whose model.safetensors holds only model.layers.{layer-1}."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"model.layers.{layer - 1}.{name}": (0.02 * torch.randn(shape, generator=generator)).to(dtype)
               for name, shape in layer_shapes(config).items()}
    save_file(tensors, directory / "model.safetensors")
    return directory


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return write_one_layer_checkpoint(tmp_path_factory.mktemp("llm") / "llama-3.2-1b", LLAMA_3_2_1B,
                                      layer=15, dtype=torch.bfloat16, seed=0)


@pytest.fixture(scope="session")
def deepseek_dir(tmp_path_factory):
    return write_one_layer_checkpoint(tmp_path_factory.mktemp("llm") / "deepseek-r1-qwen-1.5b",
                                      DEEPSEEK_R1_QWEN_1_5B, layer=28, dtype=torch.bfloat16, seed=1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return write_one_layer_checkpoint(tmp_path_factory.mktemp("llm") / "tiny-llama", TINY_LLAMA,
                                      layer=2, dtype=torch.float32, seed=2)


@pytest.fixture(scope="session")
def real_shape_models(llama_dir, deepseek_dir):
    """The paper's three bridged models with frozen layers, built once (each holds a 47-61 M layer)."""
    return {("cmunext", "llama"): build_model("cmunext", str(llama_dir), 15),
            ("unet", "llama"): build_model("unet", str(llama_dir), 15),
            ("nnunet", "llama"): build_model("nnunet", str(llama_dir), 15),
            ("cmunext", "deepseek"): build_model("cmunext", str(deepseek_dir), 28)}


def macs_at_256(model) -> float:
    """G multiply-accumulates of one 1x3x256x256 forward (FlopCounterMode counts 2 per MAC). On the
    meta device: the count needs only shapes, and a U-Net forward costs seconds on CPU."""
    model = copy.deepcopy(model).to("meta")
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 256, 256, device="meta"))
    return counter.get_total_flops() / 2 / 1e9


# ----------------------------------------------------------------------------- the paper's Table 1

def test_plain_backbones_match_the_papers_parameter_counts():
    for backbone, expected in [("unet", UNET_PARAMS), ("cmunext", CMUNEXT_PARAMS), ("nnunet", NNUNET_PARAMS)]:
        for model in (build_model(backbone, llm=None), build_model(backbone, mode="none")):
            assert model.bridge is None
            assert count_params(model) == (expected, 0)


@pytest.mark.parametrize("backbone, llm, adapters, frozen", [
    # adapters = C*D + D + D*C + C with C the bottleneck width, D the LLM width
    ("cmunext", "llama", 256 * 2048 + 2048 + 2048 * 256 + 256, 60_821_504),         # paper: +1.05 M
    ("unet", "llama", 1024 * 2048 + 2048 + 2048 * 1024 + 1024, 60_821_504),         # paper: +4.19 M
    ("nnunet", "llama", 512 * 2048 + 2048 + 2048 * 512 + 512, 60_821_504),          # paper: +2.10 M
    ("cmunext", "deepseek", 256 * 1536 + 1536 + 1536 * 256 + 256, 46_797_824),      # paper: +0.78 M
])
def test_frozen_llm_layer_adds_only_the_two_adapters(real_shape_models, backbone, llm, adapters, frozen):
    assert adapters == {"cmunext": {"llama": 1_050_880, "deepseek": 788_224},
                        "unet": {"llama": 4_197_376}, "nnunet": {"llama": 2_099_712}}[backbone][llm]
    config = {"llama": LLAMA_3_2_1B, "deepseek": DEEPSEEK_R1_QWEN_1_5B}[llm]
    assert frozen == layer_param_count(config)
    backbone_params = {"unet": UNET_PARAMS, "cmunext": CMUNEXT_PARAMS, "nnunet": NNUNET_PARAMS}[backbone]
    assert count_params(real_shape_models[backbone, llm]) == (backbone_params + adapters, frozen)


def test_the_layer_holds_the_checkpoints_tensors(real_shape_models, llama_dir):
    layer = real_shape_models["cmunext", "llama"].bridge.layer
    assert layer.config.hidden_size == 2048 and layer.config.layer == 15
    with safe_open(llama_dir / "model.safetensors", framework="pt") as checkpoint:
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            stored = checkpoint.get_tensor(f"model.layers.14.{name}")
            assert torch.equal(layer.get_parameter(name).to(stored.dtype), stored), name


@pytest.mark.parametrize("name, paper_gmacs", [
    ("cmunext", 7.39), ("cmunext+llama", 23.42), ("unet", 65.56), ("unet+llama", 82.20),
    ("cmunext+deepseek", 19.77), ("nnunet", 12.12), ("nnunet+llama", 12.12 + 16.10)])
def test_macs_within_3_percent_of_the_paper(real_shape_models, name, paper_gmacs):
    """3 %: the paper counts with thop, which adds BatchNorm and upsampling to the conv/matmul MACs
    that FlopCounterMode counts (measured: 7.23, 23.34, 65.35, 82.26, 19.61, 12.07, 28.45)."""
    backbone, _, llm = name.partition("+")
    if llm:
        model = real_shape_models[backbone, llm]
    else:
        with torch.device("meta"):
            model = build_model(backbone, llm=None)
    assert macs_at_256(model) == pytest.approx(paper_gmacs, rel=0.03)


# sha256 of the lines "name [shape]" of each 2D backbone's state_dict (3 channels in, 2 classes), recorded from
# model.py as it was before SegmentationNet took the 3D backbones (commit ed1e748): checkpoints saved then
# must load now. The same weights gave equal logits in both versions (max |diff| 0.0, train and eval).
STATE_DICT_LAYOUTS = {"unet": "735f0348e88bdbebd5c451759e7074236bcb525dc13aa8e494756952af3edb04",
                      "cmunext": "b6750dc8239f0d78443ea0f7742801821ffdd38b16565c05e6c8fe85fb20d195",
                      "nnunet": "2f043270540c1cc6545eb5a68b8f6e651ee9594d06ecef83c08298b93ea288e2"}


@pytest.mark.parametrize("backbone", sorted(STATE_DICT_LAYOUTS))
def test_2d_state_dict_layouts_are_unchanged(backbone):
    with torch.device("meta"):
        state = build_model(backbone, llm=None, num_classes=2).state_dict()
    lines = "".join(f"{name} {list(tensor.shape)}\n" for name, tensor in state.items())
    assert hashlib.sha256(lines.encode()).hexdigest() == STATE_DICT_LAYOUTS[backbone]


# ----------------------------------------------------------------------------- nnU-Net's reference

def reference_plain_conv_unet(in_channels: int, num_classes: int):
    """dynamic-network-architectures' PlainConvUNet in the 2D configuration of the paper's Table 1."""
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
    except ImportError as e:
        raise ImportError("the nnU-Net parity test needs its reference: pip install --no-deps "
                          "dynamic-network-architectures==0.4.4 (make test installs it)") from e
    return PlainConvUNet(in_channels, 5, (32, 64, 128, 256, 512), torch.nn.Conv2d, 3, (1, 2, 2, 2, 2), 2,
                         num_classes, 2, conv_bias=True, norm_op=torch.nn.InstanceNorm2d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         nonlin_kwargs={"negative_slope": 1e-2, "inplace": True}, deep_supervision=False)


def our_names_for_plain_conv_unet(reference_state: dict) -> dict:
    """PlainConvUNet's state dict under our module names. Its `all_modules.*` and `decoder.encoder.*`
    entries are second names of the same tensors; seg_layers 0..2 are the deep-supervision heads."""
    conv_or_norm = {"conv": 0, "norm": 1}
    ours = {}
    for key, tensor in reference_state.items():
        if ".all_modules." in key or key.startswith("decoder.encoder.") or re.match(r"decoder\.seg_layers\.[012]\.", key):
            continue
        if m := re.fullmatch(r"encoder\.stages\.(\d)\.0\.convs\.(\d)\.(conv|norm)\.(\w+)", key):
            stage, conv, part, param = m.groups()
            ours[f"encoder{int(stage) + 1}.{conv}.{conv_or_norm[part]}.{param}"] = tensor
        elif m := re.fullmatch(r"decoder\.stages\.(\d)\.convs\.(\d)\.(conv|norm)\.(\w+)", key):
            stage, conv, part, param = m.groups()
            ours[f"decoder{4 - int(stage)}.fuse.{conv}.{conv_or_norm[part]}.{param}"] = tensor
        elif m := re.fullmatch(r"decoder\.transpconvs\.(\d)\.(\w+)", key):
            ours[f"decoder{4 - int(m[1])}.up.{m[2]}"] = tensor
        elif m := re.fullmatch(r"decoder\.seg_layers\.3\.(\w+)", key):
            ours[f"head.{m[1]}"] = tensor
        else:
            raise AssertionError(f"unmapped PlainConvUNet tensor {key}")
    return ours


def test_nnunet_has_plain_conv_unets_parameters_less_its_deep_supervision_heads():
    reference = reference_plain_conv_unet(in_channels=3, num_classes=1)
    assert sum(p.numel() for p in reference.parameters()) == 7_766_436
    heads = sum(p.numel() for p in reference.decoder.seg_layers[:3].parameters())
    assert heads == (256 + 1) + (128 + 1) + (64 + 1)
    assert NNUNET_PARAMS == 7_766_436 - heads


def test_nnunet_equals_plain_conv_unet_weight_for_weight():
    torch.manual_seed(0)
    reference = reference_plain_conv_unet(in_channels=1, num_classes=2)
    ours = build_model("nnunet", llm=None, in_channels=1, num_classes=2)
    ours.load_state_dict(our_names_for_plain_conv_unet(reference.state_dict()))  # strict: every tensor named
    image = torch.randn(2, 1, 96, 160)       # sides multiples of 16, not of 32, height != width
    for mode in ("train", "eval"):           # InstanceNorm keeps no running statistics: both modes agree
        getattr(reference, mode)(), getattr(ours, mode)()
        with torch.no_grad():
            torch.testing.assert_close(ours(image), reference(image), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- running the network

@pytest.mark.parametrize("backbone", ["cmunext", "unet", "nnunet"])
@pytest.mark.parametrize("height, width", [(64, 64), (128, 96), (256, 256)])
def test_logits_have_the_images_size(tiny_dir, backbone, height, width):
    torch.manual_seed(0)
    model = build_model(backbone, str(tiny_dir), 2, in_channels=1, num_classes=2).eval()
    # The U-Net's 65 G MACs at 256x256 take seconds on CPU; shapes on the meta device are exact.
    device = "meta" if backbone == "unet" else "cpu"
    with torch.no_grad():
        logits = model.to(device)(torch.randn(2, 1, height, width, device=device))
    assert logits.shape == (2, 2, height, width)


def test_sides_not_multiple_of_16_are_refused_with_the_sizes_that_work():
    model = build_model("cmunext", llm=None)
    with pytest.raises(ValueError, match=r"got 100x96; height and width must be positive multiples of 16"):
        model(torch.randn(1, 3, 100, 96))


def test_backward_reaches_the_encoder_through_the_frozen_layer(tiny_dir):
    torch.manual_seed(0)
    model = build_model("cmunext", str(tiny_dir), 2)
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert all(p.grad is None for p in model.bridge.layer.parameters())
    for part in (model.encoder1, model.encoder5, model.bridge.project_in, model.bridge.project_out):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------- modes and options

TINY_LAYER = layer_param_count(TINY_LLAMA)                 # 36,992
TINY_ADAPTERS = 256 * 64 + 64 + 64 * 256 + 256             # CMUNeXt bottleneck 256, tiny width 64


@pytest.mark.parametrize("options, trainable, frozen", [
    (dict(mode="frozen"), CMUNEXT_PARAMS + TINY_ADAPTERS, TINY_LAYER),
    (dict(mode="frozen", residual=True), CMUNEXT_PARAMS + TINY_ADAPTERS, TINY_LAYER),
    (dict(mode="trainable"), CMUNEXT_PARAMS + TINY_ADAPTERS + TINY_LAYER, 0),
    (dict(mode="random"), CMUNEXT_PARAMS + TINY_ADAPTERS + TINY_LAYER, 0),
    # rank 4 on q (64 -> 64) and v (64 -> 32): A (4, 64) and B (out, 4) each
    (dict(mode="frozen", lora_rank=4), CMUNEXT_PARAMS + TINY_ADAPTERS + 4 * (64 + 64) + 4 * (64 + 32), TINY_LAYER),
])
def test_modes_train_what_they_should(tiny_dir, options, trainable, frozen):
    assert count_params(build_model("cmunext", str(tiny_dir), 2, **options)) == (trainable, frozen)


def test_random_mode_does_not_read_the_weights(tiny_dir):
    pretrained = build_model("cmunext", str(tiny_dir), 2, mode="frozen").bridge.layer
    random = build_model("cmunext", str(tiny_dir), 2, mode="random").bridge.layer
    assert not torch.equal(pretrained.mlp.up_proj.weight, random.mlp.up_proj.weight)


def test_residual_adds_the_layers_input(tiny_dir):
    torch.manual_seed(0)
    bridge = build_model("cmunext", str(tiny_dir), 2, residual=True).bridge
    x = torch.randn(2, 256, 4, 3)                                   # (B, C, h, w)
    tokens = x.flatten(2).transpose(1, 2)                           # (B, N, C), row-major N = h*w
    hidden = bridge.project_in(tokens)
    expected = bridge.project_out(hidden + bridge.layer(hidden))    # (B, N, C)
    assert torch.equal(bridge(x), expected.transpose(1, 2).reshape(2, 256, 4, 3))


def test_lora_starts_as_the_pretrained_layer_and_trains_only_its_own_weights(tiny_dir):
    torch.manual_seed(0)
    model = build_model("cmunext", str(tiny_dir), 2, lora_rank=4)
    q_proj = model.bridge.layer.self_attn.q_proj
    hidden = torch.randn(2, 16, 64)
    assert torch.equal(q_proj(hidden), q_proj.base(hidden))         # B = 0 at the start
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    lora = {name for name, p in model.named_parameters() if p.grad is not None and "bridge.layer." in name}
    assert lora == {f"bridge.layer.self_attn.{proj}.{ab}" for proj in ("q_proj", "v_proj")
                    for ab in ("lora_a", "lora_b")}
    assert q_proj.lora_b.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- checkpoints

def test_frozen_state_dict_leaves_the_layer_out_and_round_trips(tiny_dir):
    torch.manual_seed(0)
    model = build_model("cmunext", str(tiny_dir), 2).eval()
    state = model.state_dict()
    assert not [key for key in state if key.startswith("bridge.layer.")]
    assert {"bridge.project_in.weight", "bridge.project_out.bias"} <= set(state)

    torch.manual_seed(1)
    rebuilt = build_model(**asdict(model.config)).eval()
    image = torch.randn(1, 3, 32, 32)
    assert not torch.equal(rebuilt(image), model(image))
    rebuilt.load_state_dict(state)                                  # strict: nothing missing
    assert torch.equal(rebuilt(image), model(image))


def test_lora_and_trainable_state_dicts_keep_what_was_trained(tiny_dir):
    lora = build_model("cmunext", str(tiny_dir), 2, lora_rank=4).state_dict()
    assert {key for key in lora if key.startswith("bridge.layer.")} == {
        f"bridge.layer.self_attn.{proj}.{ab}" for proj in ("q_proj", "v_proj") for ab in ("lora_a", "lora_b")}
    trainable = build_model("cmunext", str(tiny_dir), 2, mode="trainable").state_dict()
    assert {key.removeprefix("bridge.layer.") for key in trainable if key.startswith("bridge.layer.")} == set(
        layer_shapes(TINY_LLAMA))


@pytest.mark.parametrize("options, message", [
    (dict(backbone="resnet"), "expected backbone one of"),
    (dict(mode="finetune"), "expected mode one of"),
    (dict(mode="trainable", lora_rank=4), "LoRA adapts a frozen LLM layer"),
    (dict(llm=None, residual=True), "residual=True belongs to the LLM bridge"),
    (dict(llm=None, mapper_lora_rank=2), "mapper_lora_rank=2 belongs to the LLM bridge"),
    (dict(final_norm="learned"), "expected final_norm one of"),
    (dict(spatial_dims=3), r"backbone .cmunext. is 2D: got spatial_dims=3; for volumes use one of .*uxnet3d, mednext-tiny, vit"),
])
def test_inconsistent_options_are_refused(tiny_dir, options, message):
    with pytest.raises(ValueError, match=message):
        build_model(**{"llm": str(tiny_dir), "layer": 2, **options})


def test_set_frozen_dtype_moves_only_the_frozen_weights(tiny_dir):
    """The run's precision decides the frozen layer's storage (bf16 matmuls are emulated, ~500x slower,
    on CPUs without native bf16); adapters and LoRA stay float32 so their updates are not rounded away."""
    net = set_frozen_dtype(build_model("cmunext", str(tiny_dir), 2, "frozen", lora_rank=2), torch.bfloat16)
    dtypes = {name: p.dtype for name, p in net.named_parameters()}
    assert {dtypes[n] for n, p in net.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {dtypes[n] for n, p in net.named_parameters() if p.requires_grad} == {torch.float32}
    assert dtypes["bridge.layer.self_attn.q_proj.lora_a"] == torch.float32
    assert net(torch.randn(1, 3, 32, 32)).dtype == torch.float32
    assert set_frozen_dtype(build_model("cmunext", None), torch.bfloat16).head.weight.dtype == torch.float32


def autograd_saved_bytes(net, shape) -> int:
    """What autograd keeps for backward in a real CPU forward of a random batch (weights, and views of them, left
    out), plus the logits."""
    weights, saved = {id(p) for p in net.parameters()}, []

    def pack(tensor):
        if id(tensor) not in weights and id(tensor._base) not in weights:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = net(torch.randn(shape))
    return sum(saved) + logits.numel() * 4


VIT_SHAPE = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, heads=4)


@pytest.mark.parametrize("backbone, shape, options", [("mednext-tiny", (2, 1, 32, 32, 32), {}),
                                                      ("cmunext", (2, 3, 32, 32), {}),
                                                      ("vit", (2, 1, 32, 32, 32), {**VIT_SHAPE, "dropout": 0.0})])
def test_activation_bytes_counted_on_a_meta_copy_equal_what_autograd_keeps(tiny_llm, backbone, shape, options):
    """count_activation_bytes sizes a step before any memory is used (train.py refuses a --roi-size no memory
    holds): on a meta copy it counts exactly the bytes autograd keeps on the real model (with an LLM layer; the
    CPU's fused attention keeps what the count assumes), and touches no weight of the model."""
    from llm4seg.model import count_activation_bytes

    torch.manual_seed(0)
    net = build_model(backbone, str(tiny_llm), 2, num_classes=3, **options).train()
    assert count_activation_bytes(net, shape) == autograd_saved_bytes(net, shape)
    assert all(p.device.type == "cpu" for p in net.parameters())


def test_activation_bytes_are_a_lower_bound_where_the_cpu_materialises_attention(tiny_llm):
    """Attention dropout keeps the CPU off its fused kernel: it stores each block's (T, T) weights, which the count
    (fused kernels, as on CUDA) leaves out."""
    from llm4seg.model import count_activation_bytes

    net = build_model("vit", None, mode="none", num_classes=3, **VIT_SHAPE, dropout=0.2).train()
    shape = (2, 1, 32, 32, 32)
    tokens = (32 // 4) ** 3
    weights = 2 * 2 * VIT_SHAPE["heads"] * tokens * tokens * 4  # 2 blocks x B 2 x heads x T x T float32
    assert count_activation_bytes(net, shape) < autograd_saved_bytes(net, shape) - weights
