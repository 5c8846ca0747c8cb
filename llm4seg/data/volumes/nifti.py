"""What every file-backed volume dataset shares: reading a NIfTI file into one clear error when it cannot
be used, and the cache of preprocessed cases (its stamp and checksum are data.cases', which the 2D cache
uses too).

Cache file = safetensors of the item's tensors, with string metadata:
    "source"  the NIfTI files' sizes and modification times (plus the preprocessing's version where it has
              one); another stamp means the files changed, so the case is read again
    "crc32"   CRC-32 of the tensors' bytes in key order, then of every other metadata value in key order (the
              MSD caches have none, so their checksums are the tensors' alone, as they always were)
    others    per dataset (BTCV: "grid", the JSON record of the case's original grid)
A cache file that fails to read or to match its checksum is rebuilt with one printed line: it is derived
data, never a reason to stop. Files are written through files.write_atomically (a reader sees the old file
or the whole new one).
"""
import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ...files import InputError, write_atomically
from ..cases import CHECKSUM, STAMP, tensors_crc32


def read_nifti_file(path: Path, what: str, dtype=np.float32):
    """(array, nibabel image) of a NIfTI file: the array as stored (scaled by the header's slope and
    intercept), cast to dtype (None: the stored type); files.InputError naming the file when it is missing,
    cut short or not NIfTI."""
    import nibabel  # only the 3D datasets need it

    if not path.is_file():
        raise InputError(f"the {what} {path} is missing; expected the dataset's file there")
    try:
        image = nibabel.load(path)
        array = np.asarray(image.dataobj) if dtype is None else np.asarray(image.dataobj, dtype=dtype)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, nibabel.filebasedimages.ImageFileError,
            ValueError) as err:
        reason = "the file is empty (0 bytes)" if path.stat().st_size == 0 else str(err)
        raise InputError(f"cannot read the {what} {path}: {reason}. The file is corrupt or not NIfTI; "
                         "replace it with the dataset's own copy.") from err
    return array, image


def read_nifti(path: Path, what: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The array (as stored, float32) and the voxel spacing of its first three axes; 3D or more, every voxel
    finite (a NaN would z-score the whole volume to NaN, and its prediction to all background, silently)."""
    array, image = read_nifti_file(path, what)
    if array.ndim < 3:
        raise InputError(f"the {what} {path} is {array.ndim}D {list(array.shape)}; expected a 3D volume "
                         "(or 4D with the modality last)")
    if problems := not_finite(array, path, what, "Fix or remove the file."):
        raise InputError(problems[0])
    return array, tuple(float(z) for z in image.header.get_zooms()[:3])


def not_finite(array: np.ndarray, path: Path, what: str, remedy: str) -> list[str]:
    """The problem of NaN or infinite voxels in a volume, as a list of at most one line ending with `remedy`:
    every volume path (MSD, BTCV, eval.py --images) refuses them in these words."""
    count = int(np.count_nonzero(~np.isfinite(array)))
    return [f"the {what} {path} has {count} NaN or infinite voxels; expected finite values. {remedy}"] if count else []


def checked_labels(labels: np.ndarray, path: Path, classes: int, what: str, dtype=np.int64) -> np.ndarray:
    """A label volume cast to dtype after checking that every value is an integer in 0..classes-1;
    files.InputError naming the file and the offending values otherwise (only those are sorted: np.unique of
    a whole CT takes seconds)."""
    bad = (labels < 0) | (labels > classes - 1)
    if not np.issubdtype(labels.dtype, np.integer):
        bad |= labels != np.round(labels)
    if bad.any():
        values = np.unique(labels[bad])
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if len(values) > 8 else "")
        raise InputError(f"the label {path} holds the values {{{shown}}} ({int(bad.sum())} voxels); expected "
                         f"integers 0..{classes - 1} ({what}). Replace it with the dataset's own copy or remove "
                         "the case.")
    return labels.astype(dtype)


def resize_volume(volume: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(C, X, Y, Z) -> (C, S, S, S)."""
    options = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(volume[None], size=(size,) * 3, mode=mode, **options)[0]


def read_cached(cached: Path, stamp: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """A cache file's (tensors, extra metadata), or None when they must be rebuilt: absent, stamped for other
    NIfTI files (or written before checksums), or unreadable, which is printed."""
    if not cached.is_file():
        return None
    try:
        with safe_open(cached, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get(STAMP) != stamp or CHECKSUM not in metadata:
                return None
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        extra = {key: value for key, value in metadata.items() if key not in (STAMP, CHECKSUM)}
        crc = tensors_crc32(tensors, extra)
        if crc != metadata[CHECKSUM]:
            raise ValueError(f"its tensors' CRC-32 is {crc}, expected {metadata[CHECKSUM]}")
    except Exception as error:  # whatever failed (a cut file, a bad header, flipped bits): derived data, rebuild
        print(f"volumes: the cached case {cached} is unreadable ({error}); rebuilding it from its NIfTI files")
        return None
    return tensors, extra


def write_cached(cached: Path, stamp: str, tensors: dict[str, torch.Tensor],
                 extra: dict[str, str] | None = None) -> bool:
    """Write a cache file atomically; False (after one printed line) when its folder cannot be written, so
    the caller stops caching (a read-only dataset folder trains without the cache)."""
    extra = extra or {}
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        metadata = {**extra, STAMP: stamp, CHECKSUM: tensors_crc32(tensors, extra)}
        write_atomically(cached, lambda temporary: save_file(tensors, temporary, metadata=metadata))
    except OSError as error:
        print(f"volumes: not caching preprocessed cases in {cached.parent} ({error})")
        return False
    return True
