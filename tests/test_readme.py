"""The README's flag tables state the defaults the parsers really have, so the two cannot drift."""
import re
from pathlib import Path

import pytest

import eval as ev
from llm4seg import settings

README = (Path(__file__).parent.parent / "README.md").read_text()


def readme_flag_table(heading: str) -> dict[str, str]:
    """{flag: default cell} of the table under `heading`, backticks removed."""
    section = README.split(heading, 1)[1]
    table = section.split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(--[\w-]+)[^|]*\|\s*([^|]*?)\s*\|", table, flags=re.M)
    return {flag: cell.strip().strip("`") for flag, cell in rows}


@pytest.mark.parametrize("heading, parser", [("### train.py flags", settings.make_parser()),
                                             ("### eval.py flags", ev.make_parser())])
def test_readme_flag_tables_state_the_parser_defaults(heading, parser):
    table = readme_flag_table(heading)
    flags = {action.option_strings[0]: action for action in parser._actions  # --compile stands for --no-compile too
             if action.option_strings and action.option_strings[0].startswith("--") and action.dest != "help"}
    assert set(table) == set(flags), "the README lists exactly the parser's flags"
    for flag, cell in table.items():
        default = flags[flag].default
        if default is None:
            continue  # described in words: where the run read it, a name built from the settings, ...
        if isinstance(default, float):
            assert float(cell) == default, f"README says {flag} defaults to {cell}, the parser to {default}"
            continue
        expected = "off" if default is False else str(default)
        assert cell == expected, f"README says {flag} defaults to {cell!r}, the parser to {expected!r}"


def readme_names(cell: str) -> set[str]:
    return set(re.findall(r"`([\w.-]+)`", cell))


def test_readme_lists_every_row_of_the_tables():
    """The datasets, backbones, recipes and LLM aliases the README lists are the tables' rows, so a row added to
    a table (mednext-tiny was missing) fails here until the README names it."""
    from llm4seg.data import DATASET_TABLE
    from llm4seg.llm_layer import ALIASES
    from llm4seg.model import BACKBONES
    from llm4seg.settings import RECIPES

    section = README.split("### train.py flags", 1)[1].split("\n### ", 1)[0]
    cells = dict(re.findall(r"^\| `(--[\w-]+)`[^|]*\|[^|]*\|\s*(.*?)\s*\|$", section, flags=re.M))
    assert readme_names(cells["--data"]) == set(DATASET_TABLE)
    assert readme_names(cells["--backbone"]) == set(BACKBONES)
    assert readme_names(cells["--recipe"].split(":")[0]) == set(RECIPES)
    recipes = README.split("The recipes (`--recipe`):", 1)[1].split("\n\n", 2)[1]
    assert set(re.findall(r"^\| `([\w-]+)` \|", recipes, flags=re.M)) == set(RECIPES)
    aliases = README.split("| alias | Hub repo |", 1)[1].split("\n\n", 1)[0]
    listed = {name for row in re.findall(r"^  \| (.*?) \|", aliases, flags=re.M) for name in readme_names(row)}
    assert listed == set(ALIASES)


def test_the_python_example_segments_an_image(tmp_path):
    """The README's ten lines, run on a tiny run of its own and a new image (its paths swapped for them)."""
    import numpy as np
    import torch
    from PIL import Image

    import train

    run = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main(["--data", "synthetic", "--synthetic-size", "10", "--img-size", "32", "--backbone", "vit",
                           "--patch-size", "8", "--embed-dim", "16", "--depth", "1", "--mode", "none", "--epochs", "1",
                           "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8)).save(tmp_path / "polyp.jpg")
    code = re.search(r"In Python, the same in ten lines:\n\n```python\n(.*?)```", README, re.S).group(1)
    code = code.replace("runs/kvasir_cmunext_llama3.2-1b-L15-frozen_seed41", str(run))
    code = code.replace('"polyp.jpg"', repr(str(tmp_path / "polyp.jpg")))
    assert len(code.strip().splitlines()) <= 10
    namespace = {}
    exec(code, namespace)
    assert namespace["mask"].shape == (50, 70) and namespace["mask"].dtype == bool
