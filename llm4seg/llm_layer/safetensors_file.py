"""One layer's tensors out of safetensors files, reading only their bytes; and local model folders.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [start, end]}}` (offsets counted from the end of the
header), then the raw tensor data. So the header alone says where `model.layers.{i}.*` lies, and
those byte ranges are all that is read, from disk here or over HTTP Range in hub.py.
A local model directory holds config.json and one *.safetensors file, or several listed in
model.safetensors.index.json (then only the shard(s) holding the layer are opened).
Only float tensors (F64 / F32 / F16 / BF16) are accepted; nothing is ever unpickled. The LLM's final
norm (FINAL_NORM, which MedVisionLlama may apply after the layer) is read alone the same way.

Every malformed file (a header that is not a JSON object, an entry without data_offsets, offsets that
are reversed or lie past the file's end, a config.json or index that is not JSON) raises
files.InputError naming the file. A layer read from a folder carries a fingerprint (`layer_fingerprint`:
the sha256 of its tensors as stored, and the files' sizes and mtimes), since no checkpoint holds it
and the folder's weights may be replaced after a run trained with them.
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from ..files import InputError
from .layers import LayerConfig, expected_shapes

FINAL_NORM = "model.norm.weight"  # the LLM's last RMSNorm, after its last layer (Llama, Mistral, Qwen2)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}
MAX_HEADER = 100_000_000  # bytes; the safetensors library's own limit
CORRUPT = "the file is corrupt: restore or re-download it"


@dataclass
class TensorEntry:
    name: str           # our module's name (checkpoint name without `model.layers.{i}.`)
    dtype: str          # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    file: object        # the local path or Hub filename holding it
    start: int          # absolute byte offsets in that file
    end: int


def from_directory(root: Path, layer: int, need_weights: bool):
    """(config, tensors or None) of the `layer`-th layer of a Hugging Face model directory; with the
    weights, config.fingerprint pins them."""
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{root} has no config.json: expected a Hugging Face model "
                                f"directory (config.json + *.safetensors)")
    hf = read_json(config_file, "a Hugging Face config.json")
    config = LayerConfig.from_hf(hf, layer, path=str(root), origin=str(config_file))
    if not need_weights:
        return config, None
    index_file = root / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = read_weight_map(index_file)
        files = sorted({root / f for n, f in weight_map.items() if n.startswith(config.prefixes)})
        for file in files:
            if not file.is_file():
                raise InputError(f"{index_file} puts tensors of {config.prefix[:-1]} in {file.name}, which is not "
                                 f"in {root}: expected every shard it names; restore the missing shard")
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files and any(root.glob("pytorch_model*.bin")):
        raise pickled_only(str(root))
    if not files:
        raise FileNotFoundError(f"no *.safetensors holding {config.prefix[:-1]} in {root}")
    tensors, read_from = read_layer_files(files, config, root)
    codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
    stored = [(name, codes[t.dtype], t.shape, t.view(torch.uint8).numpy()) for name, t in tensors.items()]
    return replace(config, fingerprint=layer_fingerprint(stored, read_from)), tensors


def final_norm_from_directory(root: Path) -> Tensor:
    """FINAL_NORM of a local model directory (single file, or the shard its index names)."""
    index_file = root / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = read_weight_map(index_file)
        if FINAL_NORM not in weight_map:
            raise InputError(f"{index_file} lists no {FINAL_NORM}: expected the final norm's shard in its weight_map; "
                             f"restore or re-download it")
        files = [root / weight_map[FINAL_NORM]]
    else:
        files = sorted(root.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one *.safetensors (or an index) holding {FINAL_NORM} in {root}, "
                                f"found {len(files)}")
    return read_tensor_file(files[0], FINAL_NORM)


def read_json(path: Path, what: str):
    """The JSON value in `path`; InputError naming it when it is not UTF-8 JSON (`what` it should be)."""
    try:
        return json.loads(Path(path).read_bytes())
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise InputError(f"{path} is not JSON ({e}): expected {what}; restore or re-download it") from e


def read_weight_map(index_file: Path) -> dict[str, str]:
    """model.safetensors.index.json's {tensor name: shard file name}."""
    index = read_json(index_file, 'a safetensors index, {"weight_map": {tensor name: shard file}}')
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        got = f"a JSON {type(index).__name__}" if not isinstance(index, dict) else (
            "no weight_map" if weight_map is None else f"weight_map {json.dumps(weight_map)[:80]}")
        raise InputError(f'{index_file}: expected {{"weight_map": {{tensor name: shard file name}}}}, got {got}; '
                         f"restore or re-download it")
    # A shard is a file beside the index: "../x" or "/etc/x" would be read from anywhere.
    if outside := [f for f in weight_map.values() if f in ("", ".", "..") or Path(f).name != f]:
        raise InputError(f"{index_file} puts tensors in {outside[0]!r}; expected shard file names beside it (no "
                         "folders, no '..'): restore or re-download it")
    return weight_map


def read_tensor_file(file: Path, name: str) -> Tensor:
    """One tensor of a local safetensors file by its full name, reading only the header and its bytes."""
    with open(file, "rb") as f:
        return read_named_tensor(lambda start, end: _read_exactly(f, start, end, file), name, file)


def read_named_tensor(read, name: str, where) -> Tensor:
    """One tensor of a safetensors file by its full name, reading only the header and its own bytes;
    `read(start, end)` returns bytes [start, end) of the file (from disk, or over HTTP Range)."""
    header_len, header = parse_header(read, where)
    if name not in header:
        raise InputError(f"missing tensor {name} in {where}")
    entry = _entry(name, name, header[name], header_len, where, where)
    if entry.dtype not in SAFETENSORS_DTYPES:
        raise InputError(f"tensor {name} in {where} has dtype {entry.dtype}, expected one of "
                         f"{', '.join(SAFETENSORS_DTYPES)}")
    _check_span(entry, entry.shape, name, where)
    return _tensor(bytearray(read(entry.start, entry.end)), entry)


def pickled_only(llm: str) -> ValueError:
    """The error for a model that ships only pytorch_model.bin: unpickling can run code, so it is never
    done here; transformers converts it once."""
    return ValueError(
        f"{llm} ships only pickled weights (pytorch_model.bin), which this project never loads (unpickling "
        f"can run code). Convert once with transformers: python -c \"from transformers import AutoModel; "
        f"AutoModel.from_pretrained('{llm}').save_pretrained('DIR')\" (it writes model.safetensors), then "
        f"pass DIR as the LLM; or pick a Hub revision that has model.safetensors (--revision)")


def read_layer_files(files: list[Path], config: LayerConfig, where) -> tuple[dict[str, Tensor], list[dict]]:
    """The layer's tensors from local safetensors files, reading only their bytes; and the files that
    held them, [{"path", "size", "mtime_ns"}], stat'ed as they were read."""
    entries = {}
    for file in files:
        with open(file, "rb") as f:
            header_len, header = parse_header(lambda start, end, f=f, file=file: _read_exactly(f, start, end, file), file)
        entries.update(layer_entries(header, header_len, config, file, file))
    check_entries(entries, config, where)
    tensors, read_from = {}, []
    for file in files:
        held = [e for e in entries.values() if e.file == file]
        if not held:
            continue
        with open(file, "rb") as f:
            stat = os.fstat(f.fileno())
            read_from.append({"path": str(Path(file).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
            for entry in held:
                tensors[entry.name] = _tensor(_read_exactly(f, entry.start, entry.end, f"{file} (tensor {entry.name})"),
                                              entry)
    return tensors, read_from


def layer_fingerprint(stored, files: list[dict]) -> dict:
    """{"sha256", "files"} of a layer read from local files. `stored` holds (name, dtype, shape, raw bytes)
    of each tensor as the file stores it (a quantised GGUF tensor's own bytes); they are hashed in name
    order, each after a line of its name, dtype, shape and length, so the digest changes exactly when the
    weights do. `files` ({"path", "size", "mtime_ns"}) only help to tell what changed."""
    digest = hashlib.sha256()
    for name, dtype, shape, data in sorted(stored, key=lambda item: item[0]):
        digest.update(f"{name} {dtype} {[int(d) for d in shape]} {memoryview(data).nbytes}\n".encode())
        digest.update(data)
    return {"sha256": digest.hexdigest(), "files": files}


def _tensor(data: bytearray, entry: TensorEntry) -> Tensor:
    """The tensor over `data` (no copy); its span was checked to hold exactly the shape's bytes."""
    if not data:  # torch.frombuffer refuses an empty buffer
        return torch.empty(entry.shape, dtype=SAFETENSORS_DTYPES[entry.dtype])
    return torch.frombuffer(data, dtype=SAFETENSORS_DTYPES[entry.dtype]).reshape(entry.shape)


def _read_exactly(f, start: int, end: int, file) -> bytearray:
    """Bytes [start, end) of an open file (a writable buffer torch can wrap without a copy), or an
    InputError if the file ends first (checked before allocating: a corrupt header may ask for terabytes)."""
    size = os.fstat(f.fileno()).st_size
    if end > size:
        raise InputError(f"{file} is truncated or its header is corrupt: wanted bytes {start}..{end}, the file "
                         f"ends at {size}; restore or re-download it")
    f.seek(start)
    data = bytearray(end - start)
    received = f.readinto(data)
    if received != end - start:  # the file shrank while being read
        raise InputError(f"{file} is truncated: wanted bytes {start}..{end}, got {received}; restore or re-download it")
    return data


def parse_header(read, where) -> tuple[int, dict]:
    """(N, header) of a safetensors file; `read(start, end)` returns bytes [start, end) of it, `where`
    names it in errors."""
    header_len = int.from_bytes(read(0, 8), "little")
    if header_len > MAX_HEADER:
        raise InputError(f"{where} is not a safetensors file: its first 8 bytes give a header length of "
                         f"{header_len}, expected at most {MAX_HEADER}; {CORRUPT}")
    try:
        header = json.loads(read(8, 8 + header_len))
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise InputError(f"{where}: expected a safetensors header of {header_len} bytes of UTF-8 JSON, got "
                         f"bytes that are not ({e}); {CORRUPT}") from e
    if not isinstance(header, dict):
        raise InputError(f"{where}: expected a safetensors header that is a JSON object {{name: {{dtype, shape, "
                         f"data_offsets}}}}, got a JSON {type(header).__name__}; {CORRUPT}")
    return header_len, header


def layer_entries(header: dict, header_len: int, config: LayerConfig, file, where) -> dict[str, TensorEntry]:
    """The header's tensors of this layer, by module name, with absolute byte offsets in `file`."""
    entries = {}
    for full_name, info in header.items():
        prefix = next((p for p in config.prefixes if full_name.startswith(p)), None)
        if prefix is None or "rotary_emb" in full_name:
            continue  # other layers; old checkpoints also stored RoPE's inv_freq buffer, unused here
        name = full_name[len(prefix):]
        entries[name] = _entry(name, full_name, info, header_len, file, where)
    return entries


def _entry(name: str, full_name: str, info, header_len: int, file, where) -> TensorEntry:
    """A header entry as a TensorEntry; InputError if it is not {"dtype": str, "shape": [int >= 0, ...],
    "data_offsets": [start, end]} with 0 <= start <= end."""
    if not isinstance(info, dict):
        raise InputError(f"{where}: tensor {full_name}'s header entry is {json.dumps(info)[:80]}, expected "
                         f'{{"dtype", "shape", "data_offsets"}}; {CORRUPT}')
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise InputError(f"{where}: tensor {full_name} has dtype {dtype!r}, expected a name like \"BF16\"; {CORRUPT}")
    if not _int_list(shape) or any(d < 0 for d in shape):
        raise InputError(f"{where}: tensor {full_name} has shape {shape!r}, expected a list of integers >= 0; "
                         f"{CORRUPT}")
    if not _int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise InputError(f"{where}: tensor {full_name} has data_offsets {offsets!r}, expected [start, end] "
                         f"with 0 <= start <= end; {CORRUPT}")
    return TensorEntry(name, dtype, tuple(shape), file, 8 + header_len + offsets[0], 8 + header_len + offsets[1])


def _int_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _check_span(entry: TensorEntry, shape: tuple[int, ...], full_name: str, where) -> None:
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[entry.dtype].itemsize
    if entry.end - entry.start != nbytes:
        raise InputError(f"tensor {full_name} in {where} spans {entry.end - entry.start} bytes, expected "
                         f"{nbytes} for {entry.dtype} {list(shape)}: inconsistent file; restore or re-download it")


def check_entries(entries: dict[str, TensorEntry], config: LayerConfig, where) -> None:
    """Every tensor the layer needs is present, with its shape, a float dtype and a byte span
    that matches; nothing unexpected (it would mean the config does not describe the weights)."""
    prefix, expected = config.prefix, expected_shapes(config)
    for name, shape in expected.items():
        if name not in entries:
            raise InputError(f"missing tensor {prefix}{name} in {where}")
        entry = entries[name]
        if entry.shape != shape:
            raise InputError(f"tensor {prefix}{name} in {where} has shape {list(entry.shape)}, "
                             f"expected {list(shape)} from config.json")
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise InputError(f"tensor {prefix}{name} in {where} has dtype {entry.dtype}, expected "
                             f"one of {', '.join(SAFETENSORS_DTYPES)}")
        _check_span(entry, shape, prefix + name, where)
    unexpected = sorted(set(entries) - set(expected))
    if unexpected:
        raise InputError(f"unexpected tensor {prefix}{unexpected[0]} in {where}: config.json "
                         f"describes a layer without it")
