"""The classes of a multi-class folder (folder_classes in the package reads them): the names its
classes.json or labels.json gives by label value, and the label values its masks hold, kept with the
masks' stamps so the masks are read once until one changes."""
import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...files import InputError, write_atomically
from ..cases import Case, file_stamp
from .cache import CACHE_FOLDER
from .read import MAX_LABEL, mask_to_labels, open_image

CLASS_FILES = ("classes.json", "labels.json")  # a multi-class folder's class names, by label value
LABELS_MEMO = "folder_labels.json"  # in CACHE_FOLDER: the label values of a multi-class folder's masks


def named_classes(folders: list[Path]) -> tuple[list[str] | None, Path | None]:
    """The class names of the one classes.json or labels.json in `folders` ({"0": "background", "1": "polyp", ...}:
    every value 0..K-1 once, K >= 2, a non-empty name each), in value order, and the file; (None, None) when
    there is none. InputError when there are several or the file is not such a table."""
    found = sorted({(folder / name).resolve() for folder in folders for name in CLASS_FILES
                    if (folder / name).is_file()})
    if len(found) > 1:
        raise InputError(f"found {' and '.join(map(str, found))}; expected one file naming the classes: remove the "
                         "others")
    if not found:
        return None, None
    path = found[0]
    expected = ('expected {"0": "background", "1": "<class 1>", ...}, every label value 0..K-1 once (K >= 2) with '
                'a name')
    try:
        table = json.loads(path.read_text())
        named = {int(key): value for key, value in table.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, ValueError, TypeError) as err:
        raise InputError(f"{path} is unreadable as a class table ({err}); {expected}") from err
    if sorted(named) != list(range(len(named))) or len(named) < 2:
        raise InputError(f"{path} names the label values {sorted(named)}; {expected}")
    if not all(isinstance(value, str) and value.strip() for value in named.values()):
        raise InputError(f"{path} has a name that is empty or not a string; {expected}")
    names = [named[k].strip() for k in range(len(named))]
    if len(set(names)) < len(names):  # one class's metrics would overwrite the other's, and means lose a class
        repeated = sorted({name for name in names if names.count(name) > 1})
        values = {name: [k for k, n in enumerate(names) if n == name] for name in repeated}
        raise InputError(f"{path} gives the same name to several label values ({values}); expected a different name "
                         "for each class: rename them")
    return [named[k] for k in range(len(named))], path


def label_values(cases: list[Case], root_dir: Path) -> tuple[list[int], Path | None]:
    """The values found in the cases' label-map masks, sorted, and a mask holding the largest; masks that cannot
    be read as label maps are left out (check_cases names them). Kept in <root>/llm4seg_cache/folder_labels.json
    with the masks' stamps (file_stamp), so the masks are read again only when one changed (or the file cannot be
    written: then every call reads them)."""
    masks = sorted(path for case in cases for path in case.masks)
    try:
        stamps = file_stamp(*masks)
    except OSError:
        stamps = None
    memo = root_dir / CACHE_FOLDER / LABELS_MEMO
    key = hashlib.sha1(json.dumps([list(map(str, masks)), stamps]).encode()).hexdigest()
    try:
        stored = json.loads(memo.read_text())
        if stored["key"] == key and stamps is not None:
            return [int(v) for v in stored["values"]], Path(stored["largest_in"]) if stored["largest_in"] else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        pass  # absent, unreadable or outdated: read the masks
    found, where = np.zeros(MAX_LABEL + 1, bool), None
    for path in tqdm(masks, desc="reading label values", unit="mask", leave=False, disable=None):
        try:
            labels = mask_to_labels(open_image(path))
        except (InputError, ValueError):
            continue
        if (largest := int(labels.max(initial=0))) > 0 and (where is None or not found[largest:].any()):
            where = path
        found[np.unique(labels)] = True
    values = np.flatnonzero(found).tolist()
    if stamps is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(memo, lambda tmp: tmp.write_text(json.dumps(
                {"key": key, "values": values, "largest_in": str(where) if where else None})))
        except OSError:
            pass  # a read-only root: the masks are read again next time
    return values, where
