"""The versions the Makefile installs through (stdlib only, run by any Python 3).

    python .ci/versions.py floors requirements.txt ...   each `name>=X` as `name==X` (markers kept): the
                                                         constraints of `make test-oldest`
    python .ci/versions.py moved constraints.txt FREEZE  which packages a `pip freeze` has at other versions
                                                         than the constraints (printed by `make test-latest`)
    python .ci/versions.py pin FREEZE > constraints.txt  a freeze as constraints: local labels (+cpu) dropped,
                                                         so the pins hold for CPU and CUDA builds alike
"""
import re
import sys
from datetime import date

REQUIREMENT = re.compile(r"^([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*(.*)$")


def normalize(name: str) -> str:
    """PEP 503: `Foo_bar.baz` and `foo-bar-baz` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines(path: str) -> list[str]:
    """The requirement lines of a requirements file, comments and blank lines dropped."""
    with open(path) as file:
        return [line.split("#", 1)[0].strip() for line in file if line.split("#", 1)[0].strip()]


def floors(paths: list[str]) -> list[str]:
    pins = []
    for path in paths:
        for line in requirement_lines(path):
            spec, _, marker = line.partition(";")
            name, specifiers = REQUIREMENT.match(spec.strip()).groups()
            lower = [s.strip()[2:].strip() for s in specifiers.split(",") if s.strip().startswith(">=")]
            if lower:
                pins.append(f"{name}=={lower[0]}" + (f"; {marker.strip()}" if marker else ""))
    return pins


def pinned(path: str) -> dict[str, tuple[str, str]]:
    """{normalized name: (name, version without its local label)} of `name==version` lines."""
    versions = {}
    for line in requirement_lines(path):
        if "==" in line:
            name, version = (part.strip() for part in line.split(";", 1)[0].split("==", 1))
            versions[normalize(name)] = (name, version.split("+", 1)[0])
    return versions


def moved(constraints: str, freeze: str) -> list[str]:
    before, after = pinned(constraints), pinned(freeze)
    lines = [f"  {after[key][0]}: {before[key][1]} -> {after[key][1]}"
             for key in sorted(before.keys() & after.keys()) if before[key][1] != after[key][1]]
    lines += [f"  {after[key][0]}: new, {after[key][1]}" for key in sorted(after.keys() - before.keys())]
    lines += [f"  {before[key][0]}: no longer installed (was {before[key][1]})"
              for key in sorted(before.keys() - after.keys())]
    return [f"{len(lines)} package(s) moved from {constraints}:" if lines else f"nothing moved from {constraints}",
            *lines]


def pin(freeze: str) -> list[str]:
    return [f"# The exact versions `make test` last passed with (the newest on {date.today()}, pinned by",
            "# `python .ci/versions.py pin` after `make test-latest` passed). Bump only that way, in a commit of its own:",
            "# test-latest installs torch's Linux wheel from the index, so torch and triton come as the pair it requires",
            "# (a CPU build's freeze would pin a triton the CUDA wheel of the same torch refuses).",
            *(f"{name}=={version}" for name, version in sorted(pinned(freeze).values(), key=lambda p: normalize(p[0])))]


def main(argv: list[str]) -> int:
    commands = {"floors": lambda args: floors(args), "moved": lambda args: moved(*args), "pin": lambda args: pin(*args)}
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(commands[argv[0]](argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
