"""Every runtime dependency earns its place: the package imports it (pytest-xdist: the
package implements its hooks)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pytest_llmbench"
#: distribution name -> the module it is imported as
IMPORT_NAMES = {"vcrpy": "vcr", "pytest": "pytest"}
#: used through hooks rather than imports
HOOKS = {"pytest-xdist": ("pytest_configure_node", "pytest_xdist_node_collection_finished")}


def imported_modules() -> set[str]:
    """Top-level names of every module the package imports (in functions too)."""
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def runtime_dependencies() -> list[str]:
    # (tomllib is 3.11+; the block is simple enough to read without it)
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = text.split("\ndependencies = [", 1)[1].split("\n]", 1)[0]
    specs = re.findall(r'^\s*"([^"]+)"', block, flags=re.MULTILINE)
    assert len(specs) >= 8, specs
    return [re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0] for spec in specs]


@pytest.mark.parametrize("dist", runtime_dependencies())
def test_every_runtime_dependency_is_used(dist: str) -> None:
    if dist in HOOKS:
        source = "".join(p.read_text(encoding="utf-8") for p in PACKAGE.glob("*.py"))
        assert all(f"def {hook}(" in source for hook in HOOKS[dist]), dist
        return
    module = IMPORT_NAMES.get(dist, dist.replace("-", "_"))
    assert module in imported_modules(), f"{dist} is declared but never imported"


def test_every_module_is_in_the_layers_contract() -> None:
    """A new module must take its place in the layers (pyproject.toml), so that
    lint-imports guards it too."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    layers = text.split("layers = [", 1)[1].split("\n]", 1)[0]
    listed = set(re.findall(r"pytest_llmbench\.(\w+)", layers))
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    modules |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert modules - listed == set()
