"""The package layout's import contract: each package imports only the packages below it, and no module
imports a module of this project inside a function (a lazy import hides a loop between layers)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = {"common", "diffusion", "imagedata", "stages", "semantic_compressor", "weights", "pipeline"}
PROJECT = LIBRARY | {"train", "sample", "benchmarks", "tests"}
# what each package may import (besides itself); train/ and sample/ never import each other
MAY_IMPORT = {
    "common": set(),
    "diffusion": set(),
    "imagedata": set(),
    "semantic_compressor": {"common"},
    "stages": {"common", "semantic_compressor"},  # semantic_compressor: only python -m stages (parameter counts)
    "weights": {"common", "stages", "semantic_compressor"},
    "pipeline": {"common", "diffusion", "imagedata", "stages", "semantic_compressor", "weights"},
    "train": LIBRARY,
    "sample": LIBRARY,
    "benchmarks": LIBRARY | {"train"},
}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level package, imported inside a function or class) of each import of a project module."""
    tree = ast.parse(path.read_text(), str(path))
    nested = {id(node) for scope in ast.walk(tree) if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                          ast.ClassDef))
              for node in ast.walk(scope) if node is not scope}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(name.split(".")[0], id(node) in nested) for name in names if name.split(".")[0] in PROJECT]
    return found


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_package_imports_only_the_packages_below_it(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = {name for name, _ in imports(path)} - MAY_IMPORT[package] - {package}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


@pytest.mark.parametrize("package", sorted(PROJECT))
def test_no_function_level_imports_of_project_modules(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        lazy = sorted({name for name, inside in imports(path) if inside})
        assert not lazy, f"{path.relative_to(ROOT)} imports {lazy} inside a function; import at the top of the file"
