"""The decoded-once cache of 2D cases, and SegmentationFiles, the dataset of 2D cases read from files
(through the cache when check_cases attached one).

2D cases read from files are decoded once: check_cases decodes every case of its datasets at img_size into
one cache file per dataset root, size and kind of mask, `<root>/llm4seg_cache/<name>_<S>px.safetensors` (binary
masks) or `<name>_<S>px_labels.safetensors` (label maps, multiclass=True), which the datasets then read
memory-mapped (DataLoader workers share its pages; an item is a copy of one 256 KB row at 256 px):
    "pixels"    (N, 4, S, S) uint8, one row per case: RGB resized bilinear in channels 0..2, the mask resized
                nearest in channel 3, 0 / 1 or the label value (decode_case; a JPEG of both sides >= 4 S is
                decoded at a reduced scale, within a few grey levels: decode_image)
    metadata    "names" (the rows' case ids, JSON), "source" (each row's files' size:mtime, data.cases's
                file_stamp), "img_size", "format", "mask" ("binary" or "labels"; a file without it, written
                before label maps existed, is binary), "crc32" (data.cases's tensors_crc32 of the pixels,
                then of the other values)
One file rather than one per split (splits depend on seed, fold and fractions: every split of every run shares
the decoded cases; a run adds the ones the file lacks) or per case (one map and one checksum, not thousands).
A file cut short, corrupt (its checksum), of another img_size, format or kind of mask is rebuilt with one printed
line, never used; a case whose files' stamp changed is decoded again, the other rows copied; a file is written
beside the old one and renamed over it (files.write_atomically), so two runs building it at once each leave a
whole file, and a process keeps reading the file it opened. A root that cannot be written caches under $LLM4SEG_CACHE
(default ~/.cache/llm4seg), in images/, named after the root's path too; where neither can be written, each
item is decoded from its files every epoch, which is said once. A case's cached row was decoded from files of
the same stamp without a problem, so check_cases does not open them again. An item read from the cache equals
the one decoded from its files (the same decode_case, the same augmentation), bit for bit.
"""
import hashlib
import json
import math
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ...files import InputError, WriteError, write_atomically
from ..cases import CHECKSUM, STAMP, Case, file_stamp, tensors_crc32
from .read import augmentation_generator, case_problems, decode_case, draw_symmetry, normalize

CACHE_FOLDER = "llm4seg_cache"  # in a dataset's root, beside its split files (the MSD cache is there too)
CACHE_ENV = "LLM4SEG_CACHE"  # where 2D caches go when the dataset's root cannot be written (~/.cache/llm4seg unset)
CACHE_FORMAT = "llm4seg 2D cases 1"  # what decode_case stores; changing it rebuilds every cache
PIXELS = "pixels"  # the cache file's one tensor, (N, 4, S, S) uint8
MAX_HEADER_BYTES = 1 << 30
BUILD_PROCESSES = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
PARALLEL_BUILD = 64  # fewer cases to decode are decoded in this process (starting workers costs ~0.1 s each)
STALE_TEMPORARY_S = 3600  # a cache temporary untouched this long was left by a killed build


class CachedCases:
    """An open cache file: `pixels` (N, 4, S, S) uint8 memory-mapped, the row of each case name and its stamp,
    and the file's CRC-32. The map is copy-on-write, so torch.from_numpy takes it without a warning and nothing
    ever reaches the file. Pickled (to a DataLoader worker that spawn or forkserver starts; fork shares the map as
    it is), it maps the file again only while the file keeps that checksum: one another build replaced is not
    used, and that process reads its cases from their files."""

    def __init__(self, path: Path, pixels: np.ndarray, names: list[str], stamps: list[str], crc: str, start: int):
        self.path, self.pixels, self.names, self.stamps, self.crc = path, pixels, names, stamps, crc
        self.start = start
        self.rows = {name: row for row, name in enumerate(names)}

    def row_of(self, name: str, stamp: str | None) -> int | None:
        """The row of case `name` when it was decoded from files of this stamp (file_stamp), else None."""
        row = self.rows.get(name)
        return row if row is not None and stamp is not None and self.stamps[row] == stamp else None

    def row(self, row: int) -> np.ndarray | None:
        """One row of the map, (4, S, S) uint8 (a view: copy it before use); None when this process could not
        map the file again."""
        return None if self.pixels is None else self.pixels[row]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "pixels": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        try:
            header, start = read_cache_header(self.path)
            if header["__metadata__"][CHECKSUM] == self.crc and start == self.start:
                self.pixels = map_pixels(self.path, start, tuple(header[PIXELS]["shape"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass


def cache_paths(name: str, root_dir: Path, img_size: int, multiclass: bool = False) -> tuple[Path, Path]:
    """Where the cache of a 2D dataset at img_size may be: in its root, else (a read-only dataset folder) under
    $LLM4SEG_CACHE or ~/.cache/llm4seg, named after the root's absolute path too; label maps (multiclass) in
    files of their own, so a root's binary and multi-class caches never replace each other."""
    fallback = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llm4seg") / "images"
    key = hashlib.sha1(str(root_dir.resolve()).encode()).hexdigest()[:12]
    stem = f"{name}_{img_size}px{'_labels' if multiclass else ''}"
    return root_dir / CACHE_FOLDER / f"{stem}.safetensors", fallback / f"{stem}_{key}.safetensors"


def mask_kind(multiclass: bool) -> str:
    """The cache metadata's "mask": what channel 3 holds."""
    return "labels" if multiclass else "binary"


def case_stamp(case: Case) -> str | None:
    """The sizes and modification times of a case's files (data.cases.file_stamp); None when one is missing."""
    try:
        return file_stamp(case.image, *case.masks)
    except OSError:
        return None


def read_cache_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (JSON) and where its data begin."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or not 2 <= length <= MAX_HEADER_BYTES:
            raise ValueError(f"its first 8 bytes give no header length ({prefix.hex() or 'the file is empty'})")
        text = f.read(length)
    if len(text) < length:
        raise ValueError(f"it ends inside its {length}-byte header")
    return json.loads(text), 8 + length


def map_pixels(path: Path, start: int, shape: tuple[int, ...]) -> np.ndarray:
    if math.prod(shape) == 0:
        return np.zeros(shape, np.uint8)  # mmap cannot map 0 bytes
    return np.memmap(path, np.uint8, "c", offset=start, shape=shape)


def pixels_crc32(pixels: np.ndarray, metadata: dict[str, str]) -> str:
    """data.cases's checksum (tensors_crc32) of the pixels and every metadata value but the checksum."""
    return tensors_crc32({PIXELS: torch.from_numpy(pixels)}, {k: v for k, v in metadata.items() if k != CHECKSUM})


def open_cache(path: Path, img_size: int, multiclass: bool = False) -> CachedCases | None:
    """The cache file at path, checked against its checksum; None when it is absent, or unusable, which is
    printed in one line (cut short, corrupt, another img_size, format or kind of mask): it is then rebuilt."""
    if not path.is_file():
        return None
    try:
        header, start = read_cache_header(path)
        metadata = header["__metadata__"]
        if metadata.get("format") != CACHE_FORMAT:
            raise ValueError(f"its format is {metadata.get('format')!r}, expected {CACHE_FORMAT!r}")
        if metadata.get("img_size") != str(img_size):
            raise ValueError(f"it holds {metadata.get('img_size')} px images, expected {img_size} px")
        # A file written before label maps existed has no "mask" and holds binary masks.
        if (kind := metadata.get("mask", mask_kind(False))) != mask_kind(multiclass):
            raise ValueError(f"its masks are {kind}, expected {mask_kind(multiclass)}")
        names, stamps = json.loads(metadata["names"]), json.loads(metadata[STAMP])
        shape, entry = (len(names), 4, img_size, img_size), header[PIXELS]
        if entry != {"dtype": "U8", "shape": list(shape), "data_offsets": [0, math.prod(shape)]} or \
                len(stamps) != len(names):
            raise ValueError(f"its tensor is {entry}, expected {len(names)} rows of uint8 (4, {img_size}, {img_size})")
        if path.stat().st_size != start + math.prod(shape):
            raise ValueError(f"it is {path.stat().st_size} bytes, expected {start + math.prod(shape)}")
        pixels = map_pixels(path, start, shape)
        if (crc := pixels_crc32(pixels, metadata)) != metadata[CHECKSUM]:
            raise ValueError(f"its CRC-32 is {crc}, expected {metadata[CHECKSUM]}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:  # derived data: rebuild, never stop
        print(f"data: the cache {path} is unusable ({error}); rebuilding it")
        return None
    return CachedCases(path, pixels, names, stamps, metadata[CHECKSUM], start)


def cache_cases(datasets: list["SegmentationFiles"]) -> dict[Case, list[str]]:
    """Bring the cache of each dataset up to date and attach the dataset to it; datasets sharing a cache (a
    run's train and val) are one build. Returns the problems (case_problems' lines) of every case the caches
    vouch for: [] for a row written from the case's current files, found here for each case decoded here."""
    groups: dict[tuple, list[SegmentationFiles]] = {}
    for dataset in datasets:
        if dataset.cache_paths:
            groups.setdefault((dataset.cache_paths, dataset.img_size, dataset.multiclass), []).append(dataset)
    checked = {}
    for (paths, img_size, multiclass), members in groups.items():
        cases = list(dict.fromkeys(case for dataset in members for case in dataset.cases))
        stamps = {case: case_stamp(case) for case in cases}
        cache, decoded = update_cache(paths, cases, img_size, stamps, multiclass)
        for dataset in members:
            dataset.attach(cache, stamps)
        vouched = [case for case in cases if cache is not None and cache.row_of(case.name, stamps[case]) is not None]
        checked |= {case: [] for case in vouched} | decoded
    return checked


def update_cache(paths: tuple[Path, ...], cases: list[Case], img_size: int, stamps: dict[Case, str | None],
                 multiclass: bool = False) -> tuple[CachedCases | None, dict[Case, list[str]]]:
    """The first usable cache file of `paths` when it holds every case as its files now are; otherwise a new one
    holding the old file's rows (but the cases decoded again) and every case decoded here but the unusable
    ones, written at the first of `paths` that can be written. Returns it (the old one, or None, when none can
    be written) and the problems of each case decoded here. multiclass: the masks are label maps."""
    old = None
    for path in paths:
        if (old := open_cache(path, img_size, multiclass)) is not None:
            break
    todo = [case for case in cases if old is None or old.row_of(case.name, stamps[case]) is None]
    if not todo:
        return old, {}
    changed = [case.name for case in todo if old is not None and case.name in old.rows]
    if changed:
        print(f"data: {len(changed)} cases changed since {old.path} was written (first: {changed[0]}); "
              "decoding them again")
    again = {case.name for case in todo}
    kept = [] if old is None else [row for row, name in enumerate(old.names) if name not in again]
    decoded: dict[Case, list[str]] = {}
    written = write_cache(paths, img_size, old, kept, todo, stamps, decoded, multiclass)
    return (open_cache(written, img_size, multiclass) if written is not None else None) or old, decoded


def write_cache(paths: tuple[Path, ...], img_size: int, old: CachedCases | None, kept: list[int], todo: list[Case],
                stamps: dict[Case, str | None], decoded: dict[Case, list[str]],
                multiclass: bool = False) -> Path | None:
    """Write the cache at the first of `paths` that can be written (files.write_atomically: two runs building
    it at once each rename a whole file into place, the last one stays); the path, or None (printed) when
    none can. `decoded` receives each case's problems as it is decoded."""
    reasons, start = [], time.perf_counter()
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path.parent)
            write_atomically(path, partial(fill_cache, img_size=img_size, old=old, kept=kept, todo=todo,
                                           stamps=stamps, decoded=decoded, multiclass=multiclass))
        except WriteError as error:  # a full disk: the cases decoded so far are checked, check_cases reads the rest
            print(f"data: not caching the decoded images ({error}); each is decoded from its files every epoch")
            return None
        except OSError as error:  # a read-only folder, a file where the folder would go
            reasons.append(f"{path.parent}: {error.strerror or error}")
            continue
        if reasons:
            print(f"data: cannot write the cache in {reasons[0]}; caching in {path.parent}")
        added = len(todo) - sum(bool(problems) for problems in decoded.values())
        print(f"data: decoded {added} cases in {time.perf_counter() - start:.1f} s into the cache {path} "
              f"({len(kept) + added} cases at {img_size} px, {path.stat().st_size / 1e6:.0f} MB)")
        return path
    print(f"data: cannot write a cache ({'; '.join(reasons)}); each image is decoded from its files every epoch")
    return None


def fill_cache(temporary: Path, img_size: int, old: CachedCases | None, kept: list[int], todo: list[Case],
               stamps: dict[Case, str | None], decoded: dict[Case, list[str]], multiclass: bool = False) -> None:
    """The cache file's bytes: the header's room (the longest it can be, every case decoded), the old file's
    `kept` rows copied, the rows of the cases of `todo` that decode, then the header written into its room."""
    names, rows_stamps = [old.names[row] for row in kept], [old.stamps[row] for row in kept]
    room = len(cache_header(img_size, names + [case.name for case in todo],
                            rows_stamps + [stamps[case] or "" for case in todo], "0" * 8, multiclass=multiclass))
    with open(temporary, "wb") as f:
        f.write(b" " * room)
        for row in kept:
            f.write(old.pixels[row])
        for case, (pixels, problems) in zip(todo, decoded_cases(todo, img_size, multiclass), strict=True):
            decoded[case] = problems
            if pixels is not None:
                f.write(pixels.numpy())
                names.append(case.name)
                rows_stamps.append(stamps[case])
    metadata = cache_metadata(img_size, names, rows_stamps, "", multiclass)
    crc = pixels_crc32(map_pixels(temporary, room, (len(names), 4, img_size, img_size)), metadata)
    with open(temporary, "r+b") as f:
        f.write(cache_header(img_size, names, rows_stamps, crc, room, multiclass))


def cache_metadata(img_size: int, names: list[str], stamps: list[str], crc: str,
                   multiclass: bool = False) -> dict[str, str]:
    return {"format": CACHE_FORMAT, "img_size": str(img_size), "mask": mask_kind(multiclass),
            "names": json.dumps(names), STAMP: json.dumps(stamps), CHECKSUM: crc}


def cache_header(img_size: int, names: list[str], stamps: list[str], crc: str, length: int | None = None,
                 multiclass: bool = False) -> bytes:
    """The safetensors header of a cache file: its length (8 bytes, little-endian), then the JSON padded with
    spaces to `length` bytes in all (default: a multiple of 8, as safetensors aligns its own)."""
    shape = [len(names), 4, img_size, img_size]
    text = json.dumps({PIXELS: {"dtype": "U8", "shape": shape, "data_offsets": [0, math.prod(shape)]},
                       "__metadata__": cache_metadata(img_size, names, stamps, crc, multiclass)}).encode()
    length = length or (8 + len(text) + 7) // 8 * 8
    assert 8 + len(text) <= length, "the header outgrew the room written for it"
    return (length - 8).to_bytes(8, "little") + text.ljust(length - 8)


def decoded_cases(cases: list[Case], img_size: int, multiclass: bool = False):
    """(pixels (4, S, S) uint8 tensor or None, problems) of each case, in order, with a progress bar; in
    BUILD_PROCESSES worker processes when there are at least PARALLEL_BUILD cases."""
    processes = BUILD_PROCESSES if len(cases) >= PARALLEL_BUILD else 0
    loader = DataLoader(CaseDecoder(cases, img_size, multiclass), batch_size=None, num_workers=processes)
    return tqdm(loader, total=len(cases), desc=f"caching {img_size} px images", unit="case", leave=False,
                disable=None)


class CaseDecoder(Dataset):
    """Item i: (decode_case of case i, []), or (None, its problems) when a file of it is unusable."""

    def __init__(self, cases: list[Case], img_size: int, multiclass: bool = False):
        self.cases, self.img_size, self.multiclass = cases, img_size, multiclass

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tuple[np.ndarray | None, list[str]]:
        try:
            return decode_case(self.cases[index], self.img_size, self.multiclass), []
        except InputError:
            return None, case_problems(self.cases[index], self.multiclass)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporaries (files.write_atomically's `.<name>.<pid>.tmp`, as large as a cache) that a killed
    build left: those untouched for STALE_TEMPORARY_S. Not by process id: a live build writes its temporary every
    few milliseconds, and on a file system that several machines share, a process id names nothing."""
    for temporary in folder.glob(".*.tmp"):
        try:
            if time.time() - temporary.stat().st_mtime > STALE_TEMPORARY_S:
                temporary.unlink()
        except OSError:
            pass  # gone already (another run removed it), or not ours to remove


class SegmentationFiles(Dataset):
    """Cases read from disk, resized to img_size x img_size. When `augment`, item i of epoch `epoch` (set by
    train.py) gets the symmetry drawn from (seed, epoch, i). check_cases attaches the dataset to its cache (the
    first of `cache_paths` that is usable or can be written): items are then read from the memory-mapped file;
    before that, and for a case the cache lacks, from the case's files. Either way an item is the same.
    multiclass: the masks are label maps, items' masks int64 labels; else binary, float32 0 / 1."""

    def __init__(self, cases: list[Case], img_size: int, seed: int, augment: bool, cache_paths: tuple[Path, ...] = (),
                 multiclass: bool = False):
        self.cases, self.img_size, self.seed, self.augment = cases, img_size, seed, augment
        self.cache_paths, self.multiclass = cache_paths, multiclass
        self.epoch = 0
        self.cache: CachedCases | None = None
        self.rows: list[int | None] = [None] * len(cases)  # each case's row in the cache

    def attach(self, cache: CachedCases | None, stamps: dict[Case, str | None]) -> None:
        """Read the cases from `cache` where it holds them as decoded from files of these stamps."""
        self.cache = cache
        self.rows = [None if cache is None else cache.row_of(case.name, stamps[case]) for case in self.cases]

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        item = self.raw_item(index)
        mask = item["mask"].long() if self.multiclass else item["mask"].float()
        return {"image": normalize(item["image"].float() / 255), "mask": mask, "name": item["name"]}

    def raw_item(self, index: int) -> dict:
        """Item `index` before normalisation: image (3, S, S) uint8 RGB, mask (1, S, S) uint8 0 / 1 (multiclass:
        the labels), augmented as __getitem__'s are. train.py's loader reads these (EpochItems) and normalises on
        the device (normalize_batch): a quarter of the bytes through the worker queues, no float work in the
        workers; its losses take the uint8 masks as they are (task.Task.loss)."""
        case, row = self.cases[index], self.rows[index]
        pixels = self.cache.row(row) if row is not None else None
        if pixels is None:
            pixels = decode_case(case, self.img_size, self.multiclass)           # (4, S, S)
        if self.augment:
            # random_symmetry's draw, applied as numpy views: the copy out of the map below is the only one.
            turns, dims = draw_symmetry(augmentation_generator(self.seed, self.epoch, index))
            pixels = np.flip(np.rot90(pixels, turns, axes=(1, 2)), dims)
        pixels = torch.from_numpy(np.array(pixels, order="C"))                   # (4, S, S), a copy
        return {"image": pixels[:3], "mask": pixels[3:], "name": case.name}      # (3, S, S), (1, S, S)
