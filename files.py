"""Writing files: atomically (a reader sees the old file or the whole new one, never half of one), and
tables of rows as CSV.

`write_atomically(path, write)` calls `write(temporary)` on a hidden name beside `path` and then
renames it over `path` (os.replace is atomic within one file system). A crash, kill or Ctrl-C in
between leaves the old file and no temporary. Checkpoints, metrics logs, split lists and fetched
LLM layers are all written through it.
"""
import csv
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


def write_csv(rows: list[dict], path: Path) -> None:
    """One line per row; the columns are every key of any row, in first-seen order (a missing one is empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
