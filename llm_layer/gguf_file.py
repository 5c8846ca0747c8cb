"""One layer of a GGUF file (llama.cpp's format), dequantised to float32 in the Hugging Face layout.

The config comes from the file's metadata (`<arch>.block_count`, `.embedding_length`, ...; the
eps is stored as float32, so 9.9999997e-06 is read back as 1e-5). Tensors `blk.{i}.attn_q ...
ffn_down` are renamed to ours (GGUF_NAMES) and dequantised by the optional `gguf` package (F32,
F16, Q8_0, Q4_0, Q4_1 and whatever else it knows). llama.cpp's converter reorders the rows of q
and k inside each head for its RoPE kernel; the order is undone so the weights equal the HF ones
(the RoPE-free attention here would give the same result either way: q.k sums over the same pairs).

Parsing a GGUF reads all its metadata (SmolLM2's holds a 49k-token vocabulary: ~5.5 s on 2 cores), so
the layer's config and dequantised tensors are cached the first time, like a Hub layer, under
    $HF_HOME/llm4seg/gguf/<file stem>-<hash of its path, size and mtime>/layer<N>.json, .safetensors
and later loads (each run and evaluation of a sweep) read those instead. A changed file gets a new key.
"""
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from files import write_atomically
from llm_layer.layers import LayerConfig, expected_shapes

GGUF_NAMES = {  # llama.cpp's names within `blk.{i}.` -> ours
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def from_gguf(path: Path, layer: int, need_weights: bool):
    """(config, tensors or None) of the `layer`-th (1-based) layer of a GGUF file: from the cache when
    it holds them, else parsed and then cached."""
    cache = _cache_dir(Path(path))
    hf_file, tensors_file = cache / f"layer{layer}.json", cache / f"layer{layer}.safetensors"
    if hf_file.is_file() and (tensors_file.is_file() or not need_weights):
        config = LayerConfig.from_hf(json.loads(hf_file.read_text()), layer, path=str(path))
        return config, load_file(tensors_file) if need_weights else None
    hf, config, tensors = _parse(path, layer, need_weights)
    cache.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        write_atomically(tensors_file, lambda temporary: save_file(tensors, temporary))
    write_atomically(hf_file, lambda temporary: temporary.write_text(json.dumps(hf)))
    return config, tensors


def _cache_dir(path: Path) -> Path:
    from huggingface_hub import constants

    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(constants.HF_HOME) / "llm4seg" / "gguf" / f"{path.stem}-{key}"


def _parse(path: Path, layer: int, need_weights: bool):
    """(config.json-like dict, config, tensors or None) read from the GGUF file itself."""
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
        return hf, config, None

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
    for name, shape in expected_shapes(config).items():
        if name not in tensors:
            gguf_name = next(k for k, v in GGUF_NAMES.items() if name.startswith(v))
            raise ValueError(f"missing tensor {prefix}{gguf_name}.{name.rsplit('.', 1)[1]} in {path}")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"tensor {name} of layer {layer} in {path} has shape "
                             f"{list(tensors[name].shape)}, expected {list(shape)} from its metadata")
    return hf, config, {name: tensor.contiguous() for name, tensor in tensors.items()}


def _undo_llama_cpp_rope_permutation(weight: Tensor, heads: int) -> Tensor:
    """llama.cpp's converter reorders each head's rows from HF's [first halves, second halves]
    to interleaved pairs: rows (heads, 2, d/2) -> (heads, d/2, 2). Reverse it."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)

