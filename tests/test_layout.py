"""The layout rules of README.md's "How to read this code", read from the import statements themselves:
the entry scripts sit on top and never import each other, the library never imports an entry script, the
kernels import nothing else of the project, the library's modules import each other without a cycle, no library
file outgrows 500 lines (a concern that does becomes a small package named for it), the entry scripts stay under
400, and train.py shows its step on its first screen."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "llm4seg"
ENTRY_SCRIPTS = ("train", "eval", "sweep")
MAX_LINES = 500
MAX_ENTRY_LINES = 400  # thin: what the library can hold, it holds
FIRST_SCREEN = 80


def module_name(path: Path) -> str:
    """llm4seg/data/images/cache.py -> llm4seg.data.images.cache; llm4seg/data/__init__.py -> llm4seg.data."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in LIBRARY.rglob("*.py")}


def imported_modules(path: Path, top_level_only: bool) -> set[str]:
    """The modules `path` imports (relative imports resolved; `from package import submodule` names the
    submodule). top_level_only: the statements run when the module is imported, not those inside functions."""
    tree = ast.parse(path.read_text())
    statements = tree.body if top_level_only else list(ast.walk(tree))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in statements:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            # `from package import submodule` names the submodule (a package's __init__ runs before any of its
            # submodules, imported or not); `from module import name` names the module.
            submodules = {f"{source}.{alias.name}" for alias in node.names} & MODULES.keys()
            found |= submodules or {source}
    return found


def test_the_entry_scripts_import_the_library_and_never_each_other():
    for script in ENTRY_SCRIPTS:
        imports = imported_modules(REPO / f"{script}.py", top_level_only=False)
        assert any(name.startswith("llm4seg") for name in imports)
        assert not imports & set(ENTRY_SCRIPTS), f"{script}.py imports {sorted(imports & set(ENTRY_SCRIPTS))}"


def test_the_library_never_imports_an_entry_script_and_the_kernels_nothing_of_the_project():
    for name, path in MODULES.items():
        imports = imported_modules(path, top_level_only=False)
        assert not imports & set(ENTRY_SCRIPTS), f"{name} imports the entry script {sorted(imports & set(ENTRY_SCRIPTS))}"
        if name.startswith("llm4seg.kernels"):
            outside = {i for i in imports if i.startswith("llm4seg") and not i.startswith("llm4seg.kernels")}
            assert not outside, f"{name} imports {sorted(outside)}: the kernels import nothing else of the project"


def test_the_library_imports_without_a_cycle():
    """Depth-first search over the module-level imports between the package's modules."""
    edges = {name: {i for i in imported_modules(path, top_level_only=True) if i in MODULES and i != name}
             for name, path in MODULES.items()}
    done, path = set(), []

    def visit(name: str) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for target in sorted(edges[name]):
            visit(target)
        path.pop()
        done.add(name)

    for name in sorted(MODULES):
        visit(name)


def test_no_library_file_or_entry_script_over_500_lines():
    files = {**MODULES, **{script: REPO / f"{script}.py" for script in ENTRY_SCRIPTS}}
    long = {name: n for name, path in files.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}; split by concern (the library's part into llm4seg/)"


def test_the_entry_scripts_stay_thin():
    long = {script: n for script in ENTRY_SCRIPTS
            if (n := len((REPO / f"{script}.py").read_text().splitlines())) >= MAX_ENTRY_LINES}
    assert not long, f"{MAX_ENTRY_LINES} lines or more: {long}; move what is not the script's own flow into llm4seg/"


def test_train_py_shows_the_step_on_its_first_screen():
    """nanoGPT's promise: a reader who opens train.py finds forward, loss, backward and the optimizer step at once."""
    first_screen = "\n".join((REPO / "train.py").read_text().splitlines()[:FIRST_SCREEN])
    for part in ("logits = run.model(", "run.task.loss(", "loss.backward()", "run.optimizer.step()"):
        assert part in first_screen, f"train.py's first {FIRST_SCREEN} lines lack {part!r}"
