"""Splits: the authors' lists, or a seeded split written once as JSON and reused; cross-validation folds
on the cases outside the test split. The package docstring's table says how each dataset splits."""
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..files import InputError, write_atomically
from .images.raw_layouts import IMAGE_EXTENSIONS

FOLDS = 5  # fold=k: the non-test cases in 5 parts, part k validates
SPLITS = ("train", "val", "test")


def ceil_count(fraction: float, total: int) -> int:
    """ceil(fraction * total) without float noise: 0.3 * 10 is 3.0000000000000004, not 4 cases."""
    return math.ceil(round(fraction * total, 9))


def seeded_split(names: list[str], val_fraction: float, test_fraction: float,
                 seed: int) -> dict[str, list[str]]:
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [names[i] for i in order]
    test, val = ceil_count(test_fraction, len(names)), ceil_count(val_fraction, len(names))
    return {"train": sorted(shuffled[test + val:]), "val": sorted(shuffled[test:test + val]),
            "test": sorted(shuffled[:test])}


def cross_validation_fold(splits: dict[str, list[str]], fold: int, seed: int) -> dict[str, list[str]]:
    """Fold `fold` of FOLDS on the cases outside the test split: they are shuffled by `seed` and cut in
    FOLDS near-equal parts; part `fold` is val, the others train. The test split is kept as it is, so
    every fold is scored on the same held-out cases (MedVisionLlama: 5-fold CV on 90 %, 10 % test)."""
    rest = sorted(splits["train"] + splits["val"])
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed)).tolist()
    parts = np.array_split(np.array(order), FOLDS)
    val = {rest[i] for i in parts[fold]}
    return {"train": [n for n in rest if n not in val], "val": sorted(val), "test": splits["test"]}


def read_case_list(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    # Accept ids written with their file extension, too.
    return [n[:-len(Path(n).suffix)] if Path(n).suffix.lower() in IMAGE_EXTENSIONS else n
            for n in names]


def find_author_lists(name: str, folders: list[Path]) -> tuple[Path, Path] | None:
    """The authors' <name>_train[1].txt + <name>_val[1].txt in the given folders (any name for
    the generic `folder` dataset)."""
    prefix = "*" if name == "folder" else name
    pairs = set()
    for folder in folders:
        for suffix in ("", "1"):
            for train in folder.glob(f"{prefix}_train{suffix}.txt"):
                val = train.with_name(train.name.replace(f"_train{suffix}.txt", f"_val{suffix}.txt"))
                if val.is_file():
                    pairs.add((train, val))
    if len(pairs) > 1:
        raise ValueError(f"found several split lists {sorted(str(t) for t, _ in pairs)}; expected "
                         "one pair. Remove the others, or name the split with train.py --split-file <JSON>")
    return pairs.pop() if pairs else None


def write_json_atomically(path: Path, content: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(content, indent=1)))
    except OSError as err:
        raise OSError(f"cannot write the split file {path}: {err}. Keep it elsewhere with train.py "
                      "--split-file <a writable path>.") from err


def split_from_json(name: str, found: list[str], path: Path, must_cover: bool, seed: int,
                    val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    """The split stored at path, or a new seeded one written there. A file we wrote covers every
    case (must_cover); one the user wrote may choose a subset, which the log line counts."""
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            splits = {split: [str(n) for n in stored.get(split, [])] for split in SPLITS}
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as err:
            raise InputError(f"split file {path} is unreadable ({err}); expected JSON like "
                             '{"train": [ids], "val": [ids], "test": [ids]}. Fix or delete it.') from err
    else:
        splits = seeded_split(found, val_fraction, test_fraction, seed)
        write_json_atomically(path, {"dataset": name, "seed": seed, "val_fraction": val_fraction,
                                     "test_fraction": test_fraction, **splits})
    unassigned = sorted(set(found) - {n for split in SPLITS for n in splits[split]})
    if unassigned and must_cover:
        raise ValueError(f"{len(unassigned)} cases in the data are in no split of {path} "
                         f"(first: {', '.join(unassigned[:5])}); the data changed since it was "
                         "written. Delete it to split again.")
    return splits
