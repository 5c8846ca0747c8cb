"""Checkpoints of real LLMs' shapes without their bytes: safetensors files whose header lists real-shape
tensors and whose data is a hole (a sparse file of zeros, no disk used), for fetch tests at full size."""
import json
import math
from pathlib import Path


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], itemsize: int = 2) -> int:
    """A safetensors file of `shapes` (BF16 by default), all zeros, written sparse -> its data offset."""
    dtype = {2: "BF16", 4: "F32"}[itemsize]
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = itemsize * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little") + header_bytes)
        f.truncate(8 + len(header_bytes) + offset)
    return 8 + len(header_bytes)


def data_bytes_fetched(hub, repo: str, directory: Path) -> dict[str, int]:
    """{file name: tensor-data bytes the Hub stand-in sent of it} for every safetensors file of `directory`."""
    fetched = {}
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as f:
            data_start = 8 + int.from_bytes(f.read(8), "little")
        fetched[file.name] = sum(max(0, s.end - max(s.start, data_start)) for s in hub.sent(repo, file.name))
    return fetched
