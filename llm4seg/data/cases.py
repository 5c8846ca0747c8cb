"""What the datasets read from files share, 2D and 3D: a case's files, where a layout sits under a root, and the
key and checksum of whatever is cached from a case's files (the 2D cache, images/cache.py; the preprocessed
volumes, volumes/nifti.py; a multi-class folder's label values, images/classes.py).

    Case(name, image, masks)      one case: its id, its image file, its mask or label file(s)
    find_dir(root, matches)       the shallowest folder at or under root that holds a layout
    file_stamp(*paths)            size:mtime:ctime:inode of each file, the key a cached entry is valid for
    tensors_crc32(tensors, extra) CRC-32 of the tensors' bytes, then of the extra strings, both in key order
    CHECKSUM, STAMP               the metadata keys a cache file keeps these under
"""
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

CHECKSUM, STAMP = "crc32", "source"


@dataclass(frozen=True)
class Case:
    name: str                 # the case id used in split files, e.g. "benign (301)"
    image: Path
    masks: tuple[Path, ...]   # BUSI has several per case; the label is their union


def find_dir(root: Path, matches) -> Path | None:
    """The shallowest folder at or under root for which matches(folder) holds."""
    if not root.is_dir():
        return None
    folders = [root] + sorted((p for p in root.rglob("*") if p.is_dir()),
                              key=lambda p: (len(p.parts), str(p)))
    return next((folder for folder in folders if matches(folder)), None)


def tensors_crc32(tensors: dict[str, torch.Tensor], extra: dict[str, str] | None = None) -> str:
    """CRC-32 of the tensors' bytes in key order (a few ms for 32 MB), then of the extra strings in key
    order, as hex."""
    crc = 0
    for key in sorted(tensors):
        crc = zlib.crc32(tensors[key].contiguous().numpy(), crc)
    for key in sorted(extra or {}):
        crc = zlib.crc32(extra[key].encode(), crc)
    return f"{crc:08x}"


def file_stamp(*paths: Path) -> str:
    """size:mtime:ctime:inode of each file, the key a cache entry is valid for. Size and mtime alone missed a
    file replaced by one of the same size and mtime (cp -p, rsync -t, a restored backup); no user can set the
    ctime, and a file written anew has a new one (and usually a new inode). Read from one stat() per file, as
    before: no cost. A chmod changes the ctime too, which only costs one rebuild."""
    stats = [path.stat() for path in paths]
    return ";".join(f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}" for stat in stats)
