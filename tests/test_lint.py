"""The code passes ruff with pyflakes, bugbear and mccabe (ruff.toml): every zip() says whether its lengths must match,
no closure reads a loop variable late, no name is unused."""
import re
import subprocess
import sys
from pathlib import Path


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=Path(__file__).parent.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_load_dataset_is_a_lookup_and_a_call():
    """The dataset table's promise (issue 30): load_dataset checks its request and calls its row's opener, so its
    complexity stays at 8 or below while datasets are added."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "C901", "--config",
                             "lint.mccabe.max-complexity=8", "llm4seg/data/__init__.py"],
                            cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120)
    assert "`load_dataset` is too complex" not in result.stdout, result.stdout


def code_lines():
    """(file relative to the repository, line number, the line stripped) of every library module and entry
    script."""
    root = Path(__file__).parent.parent
    for path in [*sorted((root / "llm4seg").rglob("*.py")), *sorted(root.glob("*.py"))]:
        name = path.relative_to(root).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            yield name, number, line.strip()


def test_no_code_asks_for_a_backbone_by_name():
    """A backbone's facts are its BACKBONES row (issue 30): no library module or entry script tests
    `backbone == "vit"` (or any other name); they read the row's fields instead."""
    named = re.compile(r"""backbone["'\]]*\s*[!=]=\s*["']|["']\s*[!=]=\s*\w*backbone\b""")
    found = [f"{name}:{number}: {line}" for name, number, line in code_lines() if named.search(line)]
    assert not found, "\n".join(found)


# Where the kind of run may be decided (issue 30): the Task, the dataset table and the model rows.
KIND_HOMES = ("llm4seg/task.py", "llm4seg/data/table.py", "llm4seg/model/", "llm4seg/vit.py", "llm4seg/kernels/")
# x OP n, x(...) OP n, x"] OP n, x", default) OP n for x num_classes or *dims, OP a comparison; ranks of tensors.
_ASKED = r"""(\([^)]*\)|["'\]]+(\s*,[^)]*\))?)?\s*(==|!=|<=|>=|<|>)\s*\d"""
KIND_TESTS = re.compile(rf"num_classes{_ASKED}|dims{_ASKED}|\.ndim\b|\.dim\(\)|shape\[1\]\s*==\s*1|"
                        r"len\((probabilities|class_names|names)\)\s*[<>=]")
# Rank tests that are not the run's kind: each checks what a file or an argument holds before it is used, or is
# a rule of torch's own. (file, the line's code): why.
RANK_CHECKS = {
    ("llm4seg/data/volumes/msd.py", "if image.ndim == 3:"): "an MSD image is (X, Y, Z) or (X, Y, Z, C)",
    ("llm4seg/data/volumes/msd.py", "if image.ndim != 4 or labels.ndim != 3 or image.shape[:3] != labels.shape:"):
        "an MSD image is (X, Y, Z, C) with labels (X, Y, Z)",
    ("llm4seg/data/volumes/nifti.py", "if array.ndim < 3:"): "a NIfTI volume has at least 3 dimensions",
    ("llm4seg/data/volumes/nifti.py", 'raise InputError(f"the {what} {path} is {array.ndim}D {list(array.shape)}; '
                                 'expected a 3D volume "'): "the same, said",
    ("llm4seg/data/volumes/btcv.py", "if image.ndim == 4 and image.shape[3] == 1:"): "a CT may be (X, Y, Z, 1)",
    ("llm4seg/data/volumes/btcv.py", "if image.ndim != 3:"): "else it is (X, Y, Z)",
    ("llm4seg/data/volumes/btcv.py", "weight = (x - low).to(volume.dtype).view([-1 if d == dim else 1 for d in "
                                "range(volume.ndim)])"): "interpolation weights broadcast along one axis",
    ("llm4seg/outputs.py", "if image.ndim == 3:"): "a new volume is (X, Y, Z) or (X, Y, Z, C)",
    ("llm4seg/outputs.py", "if image.ndim != 4 or image.shape[3] != in_channels:"): "with the run's C modalities",
    ("llm4seg/pictures.py", "if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and "
                            "image.shape[2] == 3)):"): "an image to draw is (H, W) gray or (H, W, 3) RGB",
    ("llm4seg/pictures.py", "return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image"):
        "gray drawn as RGB",
    ("llm4seg/metrics.py", "if output.dim() in (4, 5) and output.shape[1] == 1:"):
        "metric arguments are (B, 1, *S) or (B, *S)",
    ("llm4seg/metrics.py", "elif output.dim() != 3:"): "the same",
    ("llm4seg/metrics.py", "spatial_dims = pred.ndim - 1"): "surface distances over the masks' own rank",
    ("llm4seg/analysis.py", "if mask.dim() == 4 and mask.shape[1] == 1:"): "a mask argument is (B, 1, H, W)",
    ("llm4seg/prediction.py", "if not isinstance(volume, Tensor) or volume.dim() not in (4, 5):"):
        "sliding_window's volume is (N, C, *S)",
    ("llm4seg/prediction.py", "dims = volume.dim() - 2"): "its windows have the volume's rank",
    ("llm4seg/prediction.py", "if shape is None or len(shape) != windows.dim() or shape[0] != batch or "
                              "shape[2:] != roi or ("): "predict's output is (B, K, *r)",
    ("llm4seg/runtime.py", 'return torch.channels_last if device.type == "cpu" and spatial_dims == 2 else '
                           "torch.contiguous_format"): "channels_last exists for 4-D tensors only (torch's rule)",
    ("llm4seg/runtime.py", "if images.dim() != 4:"): "the same rule",
}


def test_the_kind_of_run_is_decided_in_its_homes_only():
    """Binary or multi-class and 2D or 3D are asked of the Task, the dataset table or a model row: a grep for
    `num_classes > 1`, `spatial_dims == 3`, `.ndim`, `.dim()` and the like lists every other place; the rank checks
    of inputs in RANK_CHECKS are allowed, each for its stated reason."""
    found = [f"{name}:{number}: {line}" for name, number, line in code_lines()
             if not name.startswith(KIND_HOMES) and KIND_TESTS.search(line) and (name, line) not in RANK_CHECKS]
    assert not found, "\n".join(found)
