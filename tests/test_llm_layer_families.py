"""The LLM families beyond Llama / Qwen2 (llm_layer/layers.py): Gemma-2, BioGPT, BERT, each against
transformers' own layer, read through the real loader from tiny checkpoints that transformers wrote
with save_pretrained and the Hub stand-in serves; plus the aliases, the soft-capped attention that
Gemma-2 needs, a Gemma-2-9B-shaped fetch and refusing pickled weights.

The references run transformers' eager attention with no mask, which is non-causal, and (Gemma-2)
the identity rotation (cos = 1, sin = 0): RoPE-free, as this project's layer.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from llm4seg import llm_layer
from layer_parity import (FORWARD_TOLERANCE, GRADIENT_TOLERANCE, assert_frozen_layer_matches, parity_errors,
                          reference_forward, reference_layer)
from llm4seg.llm_layer import ALIASES, load_layer
from llm4seg.model import build_model, count_params
from sparse_checkpoints import data_bytes_fetched, write_sparse_safetensors

NUM_LAYERS = 3
GEMMA2_REPO = "tiny-org/tiny-gemma2"
BIOGPT_REPO = "tiny-org/tiny-biogpt"
BERT_REPO = "tiny-org/tiny-bert"              # BertForMaskedLM: tensors under bert.encoder.layer.{i}.
BERT_MODEL_REPO = "tiny-org/tiny-bert-model"  # BertModel alone: under encoder.layer.{i}.
GEMMA2_SOFTCAP = 1.0  # small enough to bind on these weights (the 9B's is 50)


def _randomise_norms_and_biases(model: torch.nn.Module) -> None:
    """Fresh HF models have unit (Gemma: zero) norm weights and zero biases, which would hide a norm
    or bias loaded into the wrong place; make every one of them distinct."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory, hub) -> dict[str, Path]:
    from transformers import (BertConfig, BertForMaskedLM, BertModel, BioGptConfig, BioGptForCausalLM,
                              Gemma2Config, Gemma2ForCausalLM)

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("families")
    shared = dict(vocab_size=128, num_hidden_layers=NUM_LAYERS)
    # Gemma-2: query_pre_attn_scalar 24 != head_dim 32, so the scale is not 1/sqrt(d); weights of std 0.1
    # make logits large enough for the soft-cap to bind.
    gemma2 = Gemma2ForCausalLM(Gemma2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                                            attn_logit_softcapping=GEMMA2_SOFTCAP, initializer_range=0.1,
                                            **shared))
    bert = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, **shared)
    models = {GEMMA2_REPO: gemma2,
              BIOGPT_REPO: BioGptForCausalLM(BioGptConfig(**bert)),
              BERT_REPO: BertForMaskedLM(BertConfig(**bert)),
              BERT_MODEL_REPO: BertModel(BertConfig(**bert), add_pooling_layer=False)}
    dirs = {}
    for repo, model in models.items():
        _randomise_norms_and_biases(model)
        dirs[repo] = root / repo.split("/")[1]
        model.save_pretrained(dirs[repo])
        hub.add_repo(repo, dirs[repo])
    return dirs


def autograd_ops(y: torch.Tensor) -> set[str]:
    """The names of every autograd node that produced y."""
    names, stack, seen = set(), [y.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


# --- parity with transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("repo", [GEMMA2_REPO, BIOGPT_REPO, BERT_REPO, BERT_MODEL_REPO])
@pytest.mark.parametrize("T", [1, 17, 256])
def test_matches_transformers_forward_and_input_gradient(family_checkpoints, repo, T):
    number = 2
    ours = load_layer(repo, number, dtype=torch.float32)
    reference = reference_layer(family_checkpoints[repo], number)
    assert_frozen_layer_matches(ours, lambda x: reference_forward(reference, x), T)


def test_gemma2_on_the_triton_kernels_matches_transformers(family_checkpoints, monkeypatch):
    """The soft-capped attention kernel inside the whole layer (Triton's interpreter without a GPU, compiled
    with one). Measured in the interpreter: 4.4e-6 forward, 1.8e-5 input gradient (its tanh is built from
    exp2, ~6e-8 absolute error, on logits soft-capped at 1)."""
    monkeypatch.setenv("LLM4SEG_KERNELS", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = load_layer(GEMMA2_REPO, 2, dtype=torch.float32).to(device)
    reference = reference_layer(family_checkpoints[GEMMA2_REPO], 2)
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(0))
    forward_error, gradient_error, y_ours = parity_errors(ours, lambda x: reference_forward(reference, x), x, device)
    assert any("llm4seg_attention_forward" in name for name in autograd_ops(y_ours))
    assert forward_error <= FORWARD_TOLERANCE and gradient_error <= GRADIENT_TOLERANCE


def test_gemma2_soft_cap_and_scale_are_in_force(family_checkpoints):
    """The parity above would not notice a soft-cap that never binds; here removing it changes the output."""
    layer = load_layer(GEMMA2_REPO, 2, dtype=torch.float32)
    assert layer.config.softcap == GEMMA2_SOFTCAP and layer.config.attention_scale == 24 ** -0.5
    x = torch.randn(1, 33, 64, generator=torch.Generator().manual_seed(0))
    capped = layer(x)
    layer.config.softcap = 0.0
    assert (layer(x) - capped).abs().max() > 1e-2


def test_configs_read_per_family(family_checkpoints):
    gemma2 = load_layer(GEMMA2_REPO, 1, mode="random").config
    assert (gemma2.activation, gemma2.head_dim, gemma2.num_key_value_heads, gemma2.mlp_bias) == (
        "gelu_pytorch_tanh", 32, 2, False)
    biogpt = load_layer(BIOGPT_REPO, 1, mode="random").config
    assert (biogpt.activation, biogpt.norm_eps, biogpt.attention_bias, biogpt.prefix) == (
        "gelu", 1e-5, True, "biogpt.layers.0.")
    bert = load_layer(BERT_REPO, 3, mode="random").config
    assert (bert.norm_eps, bert.num_key_value_heads, bert.prefixes) == (
        1e-12, 4, ("bert.encoder.layer.2.", "encoder.layer.2."))


def test_random_mode_initialises_each_family_as_transformers_does(family_checkpoints):
    gemma2 = load_layer(GEMMA2_REPO, 1, mode="random")
    assert torch.equal(gemma2.pre_feedforward_layernorm.weight, torch.zeros(64))  # (1 + w): w = 0
    bert = load_layer(BERT_REPO, 1, mode="random")
    norm = bert.output["LayerNorm"]
    assert torch.equal(norm.weight, torch.ones(64)) and torch.equal(norm.bias, torch.zeros(64))


@pytest.mark.parametrize("repo, lora_names", [
    (GEMMA2_REPO, {"self_attn.q_proj", "self_attn.v_proj"}),
    (BIOGPT_REPO, {"self_attn.q_proj", "self_attn.v_proj"}),
    (BERT_REPO, {"attention.self.query", "attention.self.value"}),
])
def test_cmunext_builds_and_trains_with_each_family(family_checkpoints, repo, lora_names):
    """model/ bridges each family (D = 64 here) and LoRA finds each family's query and value."""
    net = build_model("cmunext", repo, 2, lora_rank=2)
    net(torch.randn(2, 3, 32, 32)).square().mean().backward()
    trained = {name.removeprefix("bridge.layer.").rsplit(".", 1)[0]
               for name, p in net.named_parameters() if "bridge.layer." in name and p.grad is not None}
    assert trained == lora_names
    lora = sum(2 * (p.base.in_features + p.base.out_features) for p in map(net.bridge.layer.get_submodule, lora_names))
    assert count_params(net)[0] - count_params(build_model("cmunext", None))[0] == 256 * 64 * 2 + 64 + 256 + lora


# --- aliases, fetching, refusing pickles ----------------------------------------------------------


def test_every_paper_llm_has_an_alias():
    assert {"gemma2-9b", "llama3.1-8b", "mistral-7b", "qwen2-7b", "yi1.5-9b", "biogpt", "biobert",
            "clinicalbert", "llama3.2-1b", "deepseek-r1-qwen-1.5b"} <= set(ALIASES)
    assert len(set(ALIASES.values())) == len(ALIASES)


# Gemma-2-9B's config.json, as the Hub serves it (the keys a layer reads).
GEMMA2_9B = dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], hidden_size=3584,
                 intermediate_size=14336, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                 num_hidden_layers=42, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                 query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                 sliding_window=4096, torch_dtype="bfloat16")


def test_a_gemma2_9b_shaped_fetch_reads_only_its_layer(hub, tmp_path):
    """A sparse file with Gemma-2-9B's embedding and first three layers at their real shapes (zeros, so
    nothing is written to disk): fetching layer 2 reads that layer's 396 MB and no more."""
    config = llm_layer.LayerConfig.from_hf(GEMMA2_9B, 2)
    shapes = {"model.embed_tokens.weight": (256000, 3584)} | {
        f"model.layers.{i}.{name}": shape for i in range(3) for name, shape in llm_layer.layers.expected_shapes(
            llm_layer.LayerConfig.from_hf(GEMMA2_9B, i + 1)).items()}
    write_sparse_safetensors(tmp_path / "model.safetensors", shapes)
    (tmp_path / "config.json").write_text(json.dumps(GEMMA2_9B))
    hub.add_repo("tiny-org/gemma-2-9b-shaped", tmp_path)

    layer = load_layer("tiny-org/gemma-2-9b-shaped", 2)
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert layer_bytes == 2 * sum(math.prod(s) for s in llm_layer.layers.expected_shapes(config).values())
    fetched = data_bytes_fetched(hub, "tiny-org/gemma-2-9b-shaped", tmp_path)["model.safetensors"]
    assert layer_bytes <= fetched <= 1.02 * layer_bytes
    assert (tmp_path / "model.safetensors").stat().st_size >= 7 * layer_bytes  # 3.0 GB: the embedding, three layers
    assert (layer.config.head_dim, layer.config.softcap, layer.config.attention_scale) == (256, 50.0, 1 / 16)


def test_pickled_weights_are_refused_with_a_way_out(family_checkpoints, hub, tmp_path):
    """A repo or folder that ships only pytorch_model.bin: one error naming it and how to convert, and
    the file is never opened (nothing here is a valid pickle)."""
    for directory in (tmp_path / "local", tmp_path / "hub"):
        directory.mkdir()
        (directory / "config.json").write_text((family_checkpoints[BERT_REPO] / "config.json").read_text())
        (directory / "pytorch_model.bin").write_bytes(b"not a pickle")
    hub.add_repo("tiny-org/pickled-bert", tmp_path / "hub")
    for llm in (str(tmp_path / "local"), "tiny-org/pickled-bert"):
        with pytest.raises(ValueError, match=r"only pickled weights \(pytorch_model\.bin\).*save_pretrained"):
            load_layer(llm, 1)
