"""Every third-party package the code imports is declared in pyproject.toml (issue 14:
scipy arrived only because jax happens to depend on it)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from conftest import REPO

OWN = {"mnist_jax", "experiments", "benchmarks", "tests"}
# Modules of a declared extra that need not be installed here (the benchmark's TensorFlow),
# so importlib.metadata cannot name their distribution: the distributions providing them.
NOT_INSTALLED = {"tensorflow": {"tensorflow", "tensorflow-cpu"}}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _requirement_names(requirements: list[str]) -> set[str]:
    return {_normalize(re.match(r"\s*([A-Za-z0-9._-]+)", r).group(1)) for r in requirements}


def imported_modules(path: Path) -> set[str]:
    """The top-level names of the absolute imports anywhere in `path` (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def third_party_imports(folder: str) -> dict[str, list[str]]:
    """Third-party top-level module -> the files under `folder` importing it."""
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        for name in imported_modules(path):
            if name not in sys.stdlib_module_names and name not in OWN:
                found.setdefault(name, []).append(str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = _requirement_names(project["dependencies"])
    bench = base | _requirement_names(project["optional-dependencies"]["bench"])
    installed = importlib.metadata.packages_distributions()
    undeclared = []
    for folder, declared in [("mnist_jax", base), ("experiments", base), ("benchmarks", bench)]:
        imports = third_party_imports(folder)
        assert imports or folder == "experiments", f"no third-party import found in {folder}/"
        for module, files in sorted(imports.items()):
            providers = {_normalize(d) for d in installed.get(module, ())}
            providers |= NOT_INSTALLED.get(module, set())
            assert providers, (f"{module} (imported by {', '.join(files)}) is not installed, "
                               f"so its distribution is unknown: add it to NOT_INSTALLED")
            if not providers & declared:
                undeclared.append(f"{module} ({' or '.join(sorted(providers))}), imported by "
                                  f"{', '.join(files)}")
    assert not undeclared, ("imported but not declared in pyproject.toml "
                            "(dependencies, or the bench extra for benchmarks/): "
                            + "; ".join(undeclared))


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom . import x\n\ndef f():\n    from scipy import stats\n"
                      "    import keras.ops as k\n")
    assert imported_modules(source) == {"os", "scipy", "keras"}
