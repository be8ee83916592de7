"""Package boundaries: ``service -> infergate <- workers``, and no heavy runtime where it does not belong.

Every import is read with ``ast`` (including imports inside functions and ``TYPE_CHECKING`` blocks),
so a lazy import cannot sneak a forbidden edge past this test.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("infergate", "service", "workers")
MAX_LINES = 500

#: (importing package, imported top-level module, why)
FORBIDDEN = [
    ("infergate", "service", "the core must not depend on the service"),
    ("infergate", "workers", "the core must not depend on the workers"),
    ("service", "workers", "the service enqueues by task name and never imports worker code"),
    ("workers", "service", "workers talk to the service only through the broker, SQL and HTTP"),
    ("infergate", "onnxruntime", "the service image ships without ONNX Runtime"),
    ("service", "onnxruntime", "the service image ships without ONNX Runtime"),
    ("infergate", "torch", "PyTorch is only for exporting models (models/*/export.py)"),
    ("service", "torch", "PyTorch is only for exporting models (models/*/export.py)"),
    ("workers", "torch", "PyTorch is only for exporting models (models/*/export.py)"),
]


def _python_files(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package).rglob("*.py"))


def _imported_top_levels(path: Path, package: str) -> Iterator[tuple[str, int]]:
    """Top-level modules imported by ``path`` with line numbers; relative imports stay in ``package``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield package, node.lineno
            elif node.module:
                yield node.module.split(".")[0], node.lineno
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            yield node.args[0].value.split(".")[0], node.lineno  # type: ignore[attr-defined]


def _is_dynamic_import(node: ast.Call) -> bool:
    """``importlib.import_module("x")`` or ``__import__("x")`` with a literal name."""
    func = node.func
    named = (isinstance(func, ast.Name) and func.id in {"__import__", "import_module"}) or (
        isinstance(func, ast.Attribute) and func.attr == "import_module"
    )
    return (
        named
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    )


def _imports(package: str) -> dict[str, list[str]]:
    """Imported top-level module -> where (``path:line``) for every file of ``package``."""
    found: dict[str, list[str]] = {}
    for path in _python_files(package):
        for module, line in _imported_top_levels(path, package):
            found.setdefault(module, []).append(f"{path.relative_to(REPO_ROOT)}:{line}")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_package_exists(package: str) -> None:
    assert _python_files(package), f"no Python files under {package}/"


@pytest.mark.parametrize(
    ("package", "forbidden", "why"), FORBIDDEN, ids=[f"{p}-{m}" for p, m, _ in FORBIDDEN]
)
def test_forbidden_imports(package: str, forbidden: str, why: str) -> None:
    where = _imports(package).get(forbidden, [])
    assert not where, f"{package} imports {forbidden} ({why}): {', '.join(where)}"


def test_the_walker_sees_every_kind_of_import(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text(
        "import a.b\n"
        "from c.d import e\n"
        "from . import sibling\n"
        "def f():\n"
        "    import g\n"
        "    from h import i\n"
        "    importlib.import_module('j.k')\n"
        "if TYPE_CHECKING:\n"
        "    import l\n"
    )
    assert {m for m, _ in _imported_top_levels(source, "pkg")} == {"a", "c", "pkg", "g", "h", "j", "l"}


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_are_small(package: str) -> None:
    too_long = {
        str(path.relative_to(REPO_ROOT)): n
        for path in _python_files(package)
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines; split them by what they hold: {too_long}"
