"""Import rules: core imports neither side; training and service never import each other; the engine is web-free."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> dict[Path, set[str]]:
    found: dict[Path, set[str]] = {}
    for file in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[file] = names
    return found


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{file.relative_to(ROOT)} imports {name}" for file, names in _imports(package).items()
            for name in names if name.split(".")[0] in forbidden or name in forbidden]


def test_core_imports_neither_side() -> None:
    assert _offenders("core", ("training", "service", "uqserve")) == []


def test_training_and_service_never_import_each_other() -> None:
    assert _offenders("training", ("service",)) == []
    assert _offenders("service", ("training",)) == []


def test_engine_never_imports_fastapi() -> None:
    engine = [f"{f.relative_to(ROOT)} imports {n}" for f, names in _imports("service").items()
              if "engine" in f.parts for n in names if n.split(".")[0] in ("fastapi", "starlette", "uvicorn")]
    assert engine == []
