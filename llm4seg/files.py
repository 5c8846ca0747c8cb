"""Reading and writing the project's files: atomically and durably (a reader sees the old file or the
whole new one, never half of one, even after a power cut), tables of rows as CSV, and the one error type
that every reader raises for a malformed file.

`write_atomically(path, write)` calls `write(temporary)` on a hidden name beside `path`, flushes it to
the disk (fsync), renames it over `path` (os.replace is atomic within one file system) and fsyncs the
directory so the rename itself survives a power cut. A crash, kill or Ctrl-C in between leaves the old
file and at most a hidden temporary. Checkpoints, metrics logs, split lists, caches, fetched LLM
layers and every evaluation output (write_text, write_csv, write_png: metrics.json, per_image.csv, pictures,
masks, the sweep's tables and plots) are all written through it; the file gets the permissions an ordinary
open() would give it (0644 under the usual umask), whatever `write` used.

`InputError` is a ValueError: what the user can fix (a truncated file, a header that lies, a mask that
is a label map). Its message is one line naming the file and what is wrong; the entry scripts print it
and exit with 2 (cli.user_error).
"""
import csv
import errno
import os
from pathlib import Path


class InputError(ValueError):
    """A malformed or inconsistent input file: one line naming the file, what is wrong, what to do."""


class WriteError(OSError):
    """A file could not be written (disk full, file too large, I/O error); the file it was to replace is
    as it was. train.py exits with 1 on it: the run is sound, the disk is not."""


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


DISK_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO)
# Read once: os.umask can only be read by setting it, which is not thread-safe.
_FILE_MODE = 0o666 & ~_current_umask()


def write_atomically(path: Path, write) -> None:
    """write(temporary_path), fsync it, then rename it over `path` and fsync the directory. A disk that
    refuses the bytes (full, file too large, quota, I/O error) raises WriteError naming `path`, which is
    left as it was; other errors (permissions, a missing folder) raise as they are."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            write(temporary)
            os.chmod(temporary, _FILE_MODE)
            fsync_path(temporary)
        except OSError as error:
            if error.errno not in DISK_ERRORS:
                raise
            kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written there"
            raise WriteError(error.errno, f"{error.strerror} writing {path}; {kept}") from error
        os.replace(temporary, path)
        fsync_path(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_csv(rows: list[dict], path: Path) -> None:
    """One line per row, atomically; the columns are every key of any row, in first-seen order (a missing one
    is empty)."""
    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
            writer.writeheader()
            writer.writerows(rows)
    write_atomically(path, write)


def listed_path(folder: Path, entry, listed_in: Path) -> Path:
    """folder / entry for a path a dataset's or model's index lists (dataset.json, dataset_0.json); InputError
    naming the entry when it is absolute or climbs out of `folder` with `..`, which would train on, cache and
    evaluate files from anywhere without a word. Judged on the path as written, so symbolic links inside the
    folder (data kept on another disk) still work."""
    if not isinstance(entry, str):
        raise InputError(f"{listed_in} lists {entry!r}; expected a path relative to {folder}")
    normal = os.path.normpath(entry)
    if os.path.isabs(entry) or normal == ".." or normal.startswith(".." + os.sep):
        raise InputError(f"{listed_in} lists {entry!r}, which is outside {folder}; expected paths inside the "
                         "folder it describes: move the file there and fix the entry")
    return Path(folder) / normal


def write_text(path: Path, text: str) -> None:
    """`text` as the file `path`, atomically (metrics.json, table.md, ...)."""
    write_atomically(path, lambda temporary: Path(temporary).write_text(text))


def write_png(path: Path, picture) -> None:
    """A PIL image, or an (H, W) / (H, W, 3) uint8 array, as the PNG `path`, atomically: a killed evaluation
    leaves the previous picture or none, never a cut one under the final name."""
    from PIL import Image  # the pictures' concern; checkpoints and caches never need it

    image = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
    write_atomically(path, lambda temporary: image.save(temporary, format="PNG"))  # the name ends in .tmp
