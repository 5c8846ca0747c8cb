"""One layer's tensors out of safetensors files, reading only their bytes; and local model folders.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [start, end]}}` (offsets counted from the end of the
header), then the raw tensor data. So the header alone says where `model.layers.{i}.*` lies, and
those byte ranges are all that is read, from disk here or over HTTP Range in hub.py.
A local model directory holds config.json and one *.safetensors file, or several listed in
model.safetensors.index.json (then only the shard(s) holding the layer are opened).
Only float tensors (F64 / F32 / F16 / BF16) are accepted; nothing is ever unpickled. The LLM's final
norm (FINAL_NORM, which MedVisionLlama may apply after the layer) is read alone the same way.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from llm_layer.layers import LayerConfig, expected_shapes

FINAL_NORM = "model.norm.weight"  # the LLM's last RMSNorm, after its last layer (Llama, Mistral, Qwen2)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}


@dataclass
class TensorEntry:
    name: str           # our module's name (checkpoint name without `model.layers.{i}.`)
    dtype: str          # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    file: object        # the local path or Hub filename holding it
    start: int          # absolute byte offsets in that file
    end: int


def from_directory(root: Path, layer: int, need_weights: bool):
    """(config, tensors or None) of the `layer`-th layer of a Hugging Face model directory."""
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
        files = sorted({root / f for n, f in weight_map.items() if n.startswith(config.prefixes)})
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files and any(root.glob("pytorch_model*.bin")):
        raise pickled_only(str(root))
    if not files:
        raise FileNotFoundError(f"no *.safetensors holding {config.prefix[:-1]} in {root}")
    return config, read_layer_files(files, config, root)


def final_norm_from_directory(root: Path) -> Tensor:
    """FINAL_NORM of a local model directory (single file, or the shard its index names)."""
    index_file = root / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if FINAL_NORM not in weight_map:
            raise ValueError(f"{index_file} lists no {FINAL_NORM}")
        files = [root / weight_map[FINAL_NORM]]
    else:
        files = sorted(root.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one *.safetensors (or an index) holding {FINAL_NORM} in {root}, "
                                f"found {len(files)}")
    with open(files[0], "rb") as f:
        return read_named_tensor(lambda start, end: _read_exactly(f, start, end, files[0]), FINAL_NORM, files[0])


def read_named_tensor(read, name: str, where) -> Tensor:
    """One tensor of a safetensors file by its full name, reading only the header and its own bytes;
    `read(start, end)` returns bytes [start, end) of the file (from disk, or over HTTP Range)."""
    header_len, header = parse_header(read)
    if name not in header:
        raise ValueError(f"missing tensor {name} in {where}")
    info = header[name]
    if info["dtype"] not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name} in {where} has dtype {info['dtype']}, expected one of "
                         f"{', '.join(SAFETENSORS_DTYPES)}")
    start, end = info["data_offsets"]
    data = bytearray(read(8 + header_len + start, 8 + header_len + end))
    return torch.frombuffer(data, dtype=SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def pickled_only(llm: str) -> ValueError:
    """The error for a model that ships only pytorch_model.bin: unpickling can run code, so it is never
    done here; transformers converts it once."""
    return ValueError(
        f"{llm} ships only pickled weights (pytorch_model.bin), which this project never loads (unpickling "
        f"can run code). Convert once with transformers: python -c \"from transformers import AutoModel; "
        f"AutoModel.from_pretrained('{llm}').save_pretrained('DIR')\" (it writes model.safetensors), then "
        f"pass DIR as the LLM; or pick a Hub revision that has model.safetensors (--revision)")


def read_layer_files(files: list[Path], config: LayerConfig, where) -> dict[str, Tensor]:
    """The layer's tensors from local safetensors files, reading only their bytes."""
    entries = {}
    for file in files:
        with open(file, "rb") as f:
            header_len, header = parse_header(lambda start, end: _read_exactly(f, start, end, file))
        entries.update(layer_entries(header, header_len, config, file))
    check_entries(entries, config, where)
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


def parse_header(read) -> tuple[int, dict]:
    """(N, header) of a safetensors file; `read(start, end)` returns bytes [start, end) of it."""
    probe = read(0, 8)
    header_len = int.from_bytes(probe, "little")
    if header_len > 100_000_000:
        raise ValueError(f"not a safetensors file (header length {header_len})")
    return header_len, json.loads(read(8, 8 + header_len))


def layer_entries(header: dict, header_len: int, config: LayerConfig, file) -> dict[str, TensorEntry]:
    """The header's tensors of this layer, by module name, with absolute byte offsets."""
    entries = {}
    for full_name, info in header.items():
        prefix = next((p for p in config.prefixes if full_name.startswith(p)), None)
        if prefix is None or "rotary_emb" in full_name:
            continue  # other layers; old checkpoints also stored RoPE's inv_freq buffer, unused here
        name = full_name[len(prefix):]
        start, end = info["data_offsets"]
        entries[name] = TensorEntry(name, info["dtype"], tuple(info["shape"]), file,
                                    8 + header_len + start, 8 + header_len + end)
    return entries


def check_entries(entries: dict[str, TensorEntry], config: LayerConfig, where) -> None:
    """Every tensor the layer needs is present, with its shape, a float dtype and a byte span
    that matches; nothing unexpected (it would mean the config does not describe the weights)."""
    prefix, expected = config.prefix, expected_shapes(config)
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
