"""One layer of a GGUF file (llama.cpp's format), dequantised to float32 in the Hugging Face layout.

The config comes from the file's metadata (`<arch>.block_count`, `.embedding_length`, ...; the
eps is stored as float32, so 9.9999997e-06 is read back as 1e-5). Tensors `blk.{i}.attn_q ...
ffn_down` are renamed to ours (GGUF_NAMES) and dequantised by the optional `gguf` package (F32,
F16, Q8_0, Q4_0, Q4_1 and whatever else it knows). llama.cpp's converter reorders the rows of q
and k inside each head for its RoPE kernel; the order is undone so the weights equal the HF ones
(the RoPE-free attention here would give the same result either way: q.k sums over the same pairs).

Parsing a GGUF reads all its metadata (SmolLM2's holds a 49k-token vocabulary: ~5.5 s on 2 cores), so
the layer's config, fingerprint and dequantised tensors are cached the first time, like a Hub layer, under
    $HF_HOME/llm4seg/gguf/<file stem>-<hash of its path, size and mtime>/layer<N>.json, .safetensors
and later loads (each run and evaluation of a sweep) read those instead. A changed file gets a new key;
a cache file that does not read (cut short, edited, from an older version) is rebuilt from the GGUF. The
cache key cannot see a file replaced by one of the same size and time (`cp -p`, `rsync -t`) or bytes
flipped on the disk, so every cached load also re-reads the layer's own bytes from the GGUF (its byte
ranges are in the cache entry: a few MB, no metadata parse) and checks them against the fingerprint, and
checks the cached float32 tensors against their own sha256; either mismatch re-parses the GGUF.

The fingerprint (LayerConfig.fingerprint) is the sha256 of the layer's tensors as the GGUF stores them
(quantised), so it changes when the file's layer does. A truncated or corrupt GGUF raises files.InputError
naming it, whatever the `gguf` package raised.
"""
import hashlib
import json
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..files import InputError, write_atomically
from .layers import LayerConfig, expected_shapes
from .safetensors_file import layer_fingerprint

GGUF_NAMES = {  # llama.cpp's names within `blk.{i}.` -> ours
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def from_gguf(path: Path, layer: int, need_weights: bool):
    """(config, tensors or None) of the `layer`-th (1-based) layer of a GGUF file: from the cache when
    it holds them, else parsed and then cached. With the weights, config.fingerprint pins them."""
    path = Path(path)
    stat = path.stat()
    cache = _cache_dir(path, stat)
    hf_file, tensors_file = cache / f"layer{layer}.json", cache / f"layer{layer}.safetensors"
    cached = _read_cache(hf_file, tensors_file, path, layer, need_weights)
    if cached is not None:
        return cached
    hf, config, tensors, stored = _parse(path, layer, need_weights, stat)
    cache.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        write_atomically(tensors_file, lambda temporary: save_file(tensors, temporary))
    entry = {"config": hf, "fingerprint": config.fingerprint, "stored": stored,
             "tensors_sha256": None if tensors is None else tensors_sha256(tensors)}
    write_atomically(hf_file, lambda temporary: temporary.write_text(json.dumps(entry)))
    return config, tensors


def _cache_dir(path: Path, stat) -> Path:
    from huggingface_hub import constants

    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(constants.HF_HOME) / "llm4seg" / "gguf" / f"{path.stem}-{key}"


def _read_cache(hf_file: Path, tensors_file: Path, path: Path, layer: int, need_weights: bool):
    """(config, tensors or None) from the cache; None when it lacks them or they do not read back as
    what _parse wrote (the GGUF is then parsed again and the cache rewritten)."""
    if not hf_file.is_file() or (need_weights and not tensors_file.is_file()):
        return None
    try:
        entry = json.loads(hf_file.read_bytes())
        config = LayerConfig.from_hf(entry["config"], layer, path=str(path), origin=str(hf_file))
        if not need_weights:
            return config, None
        fingerprint = entry["fingerprint"]
        if not isinstance(fingerprint["sha256"], str):
            raise TypeError(f"expected a fingerprint's sha256 to be a string, got {fingerprint['sha256']!r}")
        tensors = load_file(tensors_file)
        shapes = {name: tuple(t.shape) for name, t in tensors.items() if t.dtype == torch.float32}
        if shapes != expected_shapes(config):
            raise ValueError(f"expected float32 tensors of shapes {expected_shapes(config)}, got {shapes}")
        if tensors_sha256(tensors) != entry["tensors_sha256"]:
            raise ValueError(f"{tensors_file}'s tensors differ from the ones written there")
        if stored_fingerprint(path, entry["stored"])["sha256"] != fingerprint["sha256"]:
            raise ValueError(f"the layer's bytes in {path} changed since the cache was written")
    except (KeyError, TypeError, ValueError, OSError, SafetensorError) as e:  # InputError is a ValueError
        print(f"llm_layer: the cache of {path} layer {layer} does not read ({type(e).__name__}: {e}); "
              f"parsing the GGUF again", file=sys.stderr)
        return None
    return replace(config, fingerprint=fingerprint), tensors


@contextmanager
def _parsing(path: Path):
    """Turn whatever the `gguf` package raises into one InputError naming the file. It is a third-party
    parser of untrusted bytes: a truncated or corrupt file makes it fail in many ways (IndexError,
    numpy's reshape ValueError, struct and Unicode errors, ...), each of which means a bad file."""
    try:
        yield
    except Exception as e:
        reason = " ".join(str(e).split())  # one line, whatever the parser wrote
        raise InputError(f"{path} is truncated or corrupt: the gguf package cannot read it ({type(e).__name__}: "
                         f"{reason}); expected a complete GGUF file, download it again") from e


def _parse(path: Path, layer: int, need_weights: bool, stat):
    """(config.json-like dict, config, tensors or None) read from the GGUF file itself."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"reading {path} needs the optional `gguf` package: pip install gguf") from e
    with _parsing(path):
        reader = gguf.GGUFReader(path)
        fields = {name: field.contents() for name, field in reader.fields.items()
                  if not name.startswith("tokenizer.")}
        found = list(reader.tensors)
    arch = fields.get("general.architecture")
    prefix = f"blk.{layer - 1}."
    names = {t.name for t in found}
    eps = fields.get(f"{arch}.attention.layer_norm_rms_epsilon")
    hf = {
        "model_type": arch,
        "num_hidden_layers": fields.get(f"{arch}.block_count"),
        "hidden_size": fields.get(f"{arch}.embedding_length"),
        "intermediate_size": fields.get(f"{arch}.feed_forward_length"),
        "num_attention_heads": fields.get(f"{arch}.attention.head_count"),
        "num_key_value_heads": fields.get(f"{arch}.attention.head_count_kv"),
        "head_dim": fields.get(f"{arch}.attention.key_length"),
        # Stored as float32 (9.9999997e-06 for 1e-5); 7 digits give back the config's value. Anything
        # else is passed on for LayerConfig to reject.
        "rms_norm_eps": float(f"{eps:.7g}") if isinstance(eps, float) else eps,
        "attention_bias": prefix + "attn_q.bias" in names,
    }
    config = LayerConfig.from_hf(hf, layer, path=str(path))
    if not need_weights:
        return hf, config, None, None
    if arch == "llama" and config.head_dim % 2:
        raise InputError(f"{path}: expected an even head dimension (llama.cpp pairs the rows of q and k), got "
                         f"{config.head_dim}; the file is corrupt, download it again")

    expected, tensors, stored = expected_shapes(config), {}, []
    for t in found:
        if not t.name.startswith(prefix):
            continue
        block_name, _, kind = t.name[len(prefix):].rpartition(".")
        name = f"{GGUF_NAMES.get(block_name)}.{kind}"
        if name not in expected:
            raise InputError(f"unexpected tensor {t.name} in {path}: not part of a {arch} decoder layer")
        # GGUF lists dimensions innermost first; dequantize gives rows x columns, torch's (out, in).
        with _parsing(path):
            gguf_shape = [int(d) for d in t.shape]
            values = gguf.quants.dequantize(t.data, t.tensor_type).astype("float32")
            weight = torch.from_numpy(values.reshape(tuple(reversed(gguf_shape))))
        if tuple(weight.shape) != expected[name]:
            raise InputError(f"tensor {name} of layer {layer} in {path} has shape {list(weight.shape)}, "
                             f"expected {list(expected[name])} from its metadata")
        if arch == "llama" and block_name in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if block_name == "attn_q" else config.num_key_value_heads
            weight = _undo_llama_cpp_rope_permutation(weight, heads)
        tensors[name] = weight.contiguous()
        stored.append({"name": name, "dtype": t.tensor_type.name, "shape": gguf_shape,
                       "offset": int(t.data_offset), "bytes": int(t.n_bytes)})
    for name in expected:
        if name not in tensors:
            gguf_name = next(k for k, v in GGUF_NAMES.items() if name.startswith(v))
            raise InputError(f"missing tensor {prefix}{gguf_name}.{name.rsplit('.', 1)[1]} in {path}")
    fingerprint = stored_fingerprint(path, stored, stat)
    return hf, replace(config, fingerprint=fingerprint), tensors, stored


def stored_fingerprint(path: Path, stored: list[dict], stat=None) -> dict:
    """layer_fingerprint of the layer's tensors as the GGUF stores them, read from their byte ranges
    (`stored`: name, dtype, shape, offset and byte count of each, as _parse found them)."""
    stat = stat or path.stat()
    with open(path, "rb") as f:
        def stored_bytes(entry: dict) -> bytes:
            f.seek(entry["offset"])
            data = f.read(entry["bytes"])
            if len(data) != entry["bytes"]:
                raise InputError(f"{path} is truncated: tensor {entry['name']} wants {entry['bytes']} bytes at "
                                 f"{entry['offset']}, the file ends first; download it again")
            return data
        layer = [(e["name"], e["dtype"], e["shape"], stored_bytes(e)) for e in stored]
    return layer_fingerprint(layer, [{"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}])


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 of the dequantised tensors the cache holds, in name order, to catch a cache file edited in place."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _undo_llama_cpp_rope_permutation(weight: Tensor, heads: int) -> Tensor:
    """llama.cpp's converter reorders each head's rows from HF's [first halves, second halves]
    to interleaved pairs: rows (heads, 2, d/2) -> (heads, d/2, 2). Reverse it."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
