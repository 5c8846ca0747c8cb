"""vit.py and build_model("vit", ...): MedVisionLlama's ViT in 2D and 3D, its parameter count against the
paper's, patches against torch's Unfold, the LLM block (mappers, LoRA, final norm, residual) and gradients.
The LLM layer is the tiny Llama-shaped one-layer checkpoint of test_model.py."""
import math
from dataclasses import asdict

import pytest
import torch

from llm4seg.model import build_model, count_params
from llm4seg.vit import patchify, unpatchify
from test_model import TINY_LLAMA, layer_param_count, write_one_layer_checkpoint

VIT_BASELINE_PARAMS = 1_128_000  # the paper's Table 5 says 1.16 M: its code also counts an unused head (+33,280)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A one-layer checkpoint of TINY_LLAMA's shapes (hidden 64), the paper's layer 2."""
    return write_one_layer_checkpoint(tmp_path_factory.mktemp("llm") / "tiny-llama", TINY_LLAMA,
                                      layer=2, dtype=torch.float32, seed=3)


def tiny_vit(llm=None, **options):
    """A 16^3 ViT with 2 blocks (patch 8: 8 tokens), the tiny LLM layer when llm is given."""
    settings = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, heads=4, dropout=0.0) | options
    return build_model("vit", None if llm is None else str(llm), 2, "frozen" if llm else "none", **settings)


def test_vit_baseline_has_the_papers_parameter_count():
    net = build_model("vit", None, 32, "none", in_channels=1, spatial_dims=3, img_size=128, patch_size=8,
                      embed_dim=64, depth=16, heads=4, dropout=0.2)
    assert count_params(net) == (VIT_BASELINE_PARAMS, 0)
    assert net.pos_embed.shape == (1, 16 ** 3, 64)  # 4,096 tokens


@pytest.mark.parametrize("spatial_dims, sides, in_channels, num_classes, patch", [
    (3, 24, 1, 1, 8),      # 3 x 3 x 3 patches
    (3, 20, 4, 2, 4),      # a 4-modality volume (MSD BrainTumour), 2 classes, 5^3 patches
    (2, 40, 3, 1, 8),      # 2D RGB, 5 x 5 patches
    (2, 36, 1, 3, 12),
])
def test_logits_have_the_inputs_shape(spatial_dims, sides, in_channels, num_classes, patch):
    torch.manual_seed(0)
    net = build_model("vit", None, 1, "none", in_channels=in_channels, num_classes=num_classes,
                      spatial_dims=spatial_dims, img_size=sides, patch_size=patch, embed_dim=16, depth=1, heads=2)
    x = torch.randn(2, in_channels, *(sides,) * spatial_dims)
    assert net(x).shape == (2, num_classes, *(sides,) * spatial_dims)


def test_sides_not_multiple_of_the_patch_are_refused_with_sizes_that_work():
    with pytest.raises(ValueError, match=r"got 30x30x30; every side must be a positive multiple of the patch size 8.*"
                                         r"e\.g\. to 32x32x32"):
        build_model("vit", None, 1, "none", img_size=30, patch_size=8, depth=1)
    net = tiny_vit()
    with pytest.raises(ValueError, match=r"expected a batch \(B, C, 16, 16, 16\).*got \(1, 1, 24, 24, 24\)"):
        net(torch.randn(1, 1, 24, 24, 24))


def test_patches_are_torchs_unfold_in_2d_and_slices_in_3d():
    torch.manual_seed(0)
    image = torch.randn(2, 3, 8, 12)
    unfold = torch.nn.functional.unfold(image, kernel_size=4, stride=4).transpose(1, 2)  # (B, N, C*P*P)
    assert torch.equal(patchify(image, 4), unfold)
    volume = torch.randn(2, 2, 4, 6, 8)
    patches = patchify(volume, 2)                                                        # (B, N, C*8)
    by_hand = [volume[:, :, i:i + 2, j:j + 2, k:k + 2].reshape(2, -1)
               for i in range(0, 4, 2) for j in range(0, 6, 2) for k in range(0, 8, 2)]  # row-major grid
    assert torch.equal(patches, torch.stack(by_hand, dim=1))
    assert torch.equal(unpatchify(patches, 2, volume.shape[2:]), volume)


def test_llm_block_is_residual_over_the_unit_final_norm(tiny_dir):
    """h + rmsnorm(layer(h)) with weight 1 and the layer's eps, between the two mappers."""
    torch.manual_seed(0)
    bridge = tiny_vit(tiny_dir).bridge
    tokens = torch.randn(2, 8, 32)
    hidden = bridge.project_in(tokens)
    out = bridge.layer(hidden)
    normed = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + TINY_LLAMA["rms_norm_eps"])
    torch.testing.assert_close(bridge.refine(tokens), bridge.project_out(hidden + normed), rtol=1e-6, atol=1e-6)
    assert not bridge.final_norm.weight.requires_grad and torch.equal(bridge.final_norm.weight, torch.ones(64))
    plain = tiny_vit(tiny_dir, residual=False, final_norm="none").bridge
    plain.load_state_dict(bridge.state_dict(), strict=False)
    torch.testing.assert_close(plain.refine(tokens), bridge.project_out(out), rtol=0, atol=0)


def test_parameters_add_up_with_mappers_and_lora(tiny_dir):
    """Linear mappers train whole; with mapper LoRA (loralib's Linear) their weights are frozen and only
    their biases and B A train."""
    E, D, r, q_out, v_out = 32, 64, 4, 64, 32
    mapper_weights, mapper_biases = 2 * E * D, D + E
    mapper_lora = r * (E + D) + r * (D + E)
    layer_lora = r * (D + q_out) + r * (D + v_out)
    baseline = count_params(tiny_vit())[0]
    frozen = layer_param_count(TINY_LLAMA) + 64  # the layer and its unit final norm
    assert count_params(tiny_vit(tiny_dir)) == (baseline + mapper_weights + mapper_biases, frozen)
    assert count_params(tiny_vit(tiny_dir, mapper_lora_rank=r, lora_rank=r)) == \
        (baseline + mapper_biases + mapper_lora + layer_lora, frozen + mapper_weights)


def test_gradients_reach_the_mappers_and_lora_but_no_frozen_weight(tiny_dir):
    torch.manual_seed(0)
    net = tiny_vit(tiny_dir, mapper_lora_rank=2, lora_rank=2)
    net(torch.randn(2, 1, 16, 16, 16)).square().mean().backward()
    for name, parameter in net.named_parameters():
        assert (parameter.grad is not None) == parameter.requires_grad, name
    bridge = net.bridge
    for trained in (bridge.project_in.base.bias, bridge.project_in.lora_b, bridge.project_out.lora_b,
                    bridge.layer.self_attn.q_proj.lora_b, bridge.layer.self_attn.v_proj.lora_b, net.patch_embed.weight):
        assert trained.grad.abs().sum() > 0
    frozen = {name for name, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {f"bridge.layer.{name}" for name in (
        "self_attn.q_proj.base.weight", "self_attn.k_proj.weight", "self_attn.v_proj.base.weight",
        "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        "input_layernorm.weight", "post_attention_layernorm.weight")} | {
        "bridge.final_norm.weight", "bridge.project_in.base.weight", "bridge.project_out.base.weight"}


def test_mapper_lora_is_loralibs_linear(tiny_dir):
    """loralib.Linear(r=4) as MedVisionLlama's code builds its mappers: W x + b + (1 / r) x A^T B^T, W frozen."""
    torch.manual_seed(0)
    mapper = tiny_vit(tiny_dir, mapper_lora_rank=4).bridge.project_in
    tokens = torch.randn(1, 8, 32)
    assert torch.equal(mapper(tokens), mapper.base(tokens))  # B = 0 at the start
    with torch.no_grad():
        mapper.lora_b.normal_()
    expected = tokens @ mapper.base.weight.T + mapper.base.bias + (tokens @ mapper.lora_a.T @ mapper.lora_b.T) / 4
    torch.testing.assert_close(mapper(tokens), expected, rtol=1e-5, atol=1e-5)  # float32 sums in another order
    assert not mapper.base.weight.requires_grad and mapper.base.bias.requires_grad


def test_state_dict_round_trips_without_the_frozen_layer(tiny_dir):
    torch.manual_seed(0)
    net = tiny_vit(tiny_dir, mapper_lora_rank=2).eval()
    state = net.state_dict()
    assert not [key for key in state if key.startswith("bridge.layer.")]
    torch.manual_seed(1)
    rebuilt = build_model(**asdict(net.config)).eval()
    volume = torch.randn(1, 1, 16, 16, 16)
    rebuilt.load_state_dict(state)
    assert torch.equal(rebuilt(volume), net(volume))


def test_vit_in_2d_takes_the_llm_block_too(tiny_dir):
    torch.manual_seed(0)
    net = tiny_vit(tiny_dir, spatial_dims=2, in_channels=3, img_size=32)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 1, 32, 32)
    assert net.pos_embed.shape[1] == math.prod((32 // 8,) * 2)


def test_pretrained_final_norm_is_the_checkpoints_model_norm(tiny_llm):
    """final_norm="pretrained": model.norm.weight of the LLM (here transformers' tiny Llama with
    randomised norms), frozen, instead of MedVisionLlama's unit weight."""
    from transformers import AutoModelForCausalLM

    norm = tiny_vit(tiny_llm, final_norm="pretrained").bridge.final_norm
    expected = AutoModelForCausalLM.from_pretrained(tiny_llm, dtype=torch.float32).model.norm.weight
    assert torch.equal(norm.weight, expected) and not norm.weight.requires_grad
