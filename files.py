"""Writing a file so that a reader sees the old file or the whole new one, never half of one.

`write_atomically(path, write)` calls `write(temporary)` on a hidden name beside `path` and then
renames it over `path` (os.replace is atomic within one file system). A crash, kill or Ctrl-C in
between leaves the old file and no temporary. Checkpoints, metrics logs, split lists and fetched
LLM layers are all written through it.
"""
import os
from pathlib import Path


def write_atomically(path: Path, write) -> None:
    """write(temporary_path), then rename it over `path`."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
