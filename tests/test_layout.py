"""Imports run one way: orchestration -> assets -> dalle_core (DESIGN.md, Layout).

Read from the source (ast), so an import inside a function counts as much as one at the
top of a module: a loop that only shows when some code path runs is still a loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# what both the assets and orchestration use; they may import each other, nothing else of assets
SHARED = {"assets.resources", "assets.model_registry"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, relative imports resolved against its package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            # `from assets import model_registry` imports a module, not a name
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def modules_under(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def offending(paths: list[Path], forbidden) -> list[str]:
    return [f"{module_name(p)} imports {m}" for p in paths for m in sorted(imported_modules(p)) if forbidden(m)]


def top(module: str) -> str:
    return module.split(".")[0]


def test_the_checker_sees_nested_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    mod = pkg / "m.py"
    mod.write_text("def f():\n    import dagster\n    from ..other import thing\n    from . import sibling\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert {"dagster", "pkg.other", "pkg.sub", "pkg.sub.sibling"} <= imported_modules(mod)


def test_assets_never_import_orchestration():
    assert offending(modules_under("assets"), lambda m: top(m) == "orchestration") == []


def test_resources_and_registry_import_no_assets_nor_orchestration():
    paths = [ROOT / (m.replace(".", "/") + ".py") for m in sorted(SHARED)]
    assert all(p.is_file() for p in paths)
    bad = offending(paths, lambda m: top(m) == "orchestration" or (top(m) == "assets" and m != "assets"
                                                                    and m not in SHARED))
    assert bad == []


@pytest.mark.parametrize("forbidden", ["dagster", "dagster_pipes", "mlflow", "assets", "orchestration"])
def test_dalle_core_imports_no_platform(forbidden):
    assert offending(modules_under("dalle_core"), lambda m: top(m) == forbidden) == []


def test_only_the_mlflow_resource_and_registry_import_mlflow_in_assets():
    """The MLflow client is owned by `MlflowResource`; assets call it, not `mlflow` directly."""
    owners = {"assets.resources", "assets.model_registry"}
    bad = offending([p for p in modules_under("assets") if module_name(p) not in owners],
                    lambda m: top(m) == "mlflow")
    assert bad == []
