"""The UI image holds everything ``ui/`` imports, also through ``contracts/`` (no Docker engine needed)."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import ROOT

DOCKERFILE = (ROOT / "ui" / "Dockerfile").read_text()


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The nodes under ``if TYPE_CHECKING:``: imported for the type checker, never at run time."""
    return {
        inner
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for stmt in node.body
        for inner in ast.walk(stmt)
    }


def _imports(path: Path) -> set[str]:
    """The absolute module names ``path`` imports at run time (``from a import b`` gives ``a`` and
    ``a.b``)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    skipped = _type_checking_only(tree)
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def _first_party_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_by_the_ui() -> tuple[set[str], set[str]]:
    """(first-party packages, third-party top-level modules) that ``ui/`` needs, following its
    imports into the first-party modules it uses."""
    queue = sorted((ROOT / "ui").rglob("*.py"))
    seen: set[Path] = set()
    first_party: set[str] = set()
    third_party: set[str] = set()
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imports(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names:
                continue
            if (ROOT / top / "__init__.py").is_file():
                first_party.add(top)
                parts = module.split(".")
                queue += [f for i in range(1, len(parts) + 1) if (f := _first_party_file(".".join(parts[:i])))]
            else:
                third_party.add(top)
    return first_party, third_party


def installed_by_the_image() -> set[str]:
    """The distributions the image's requirement files pin, with everything they depend on."""
    pinned = [
        line.strip()
        for name in re.findall(r"requirements/(\w+)\.txt", DOCKERFILE)
        for line in (ROOT / "requirements" / f"{name}.txt").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "-r"))
    ]
    queue = [Requirement(line).name for line in pinned]
    installed: set[str] = set()
    while queue:
        name = canonicalize_name(queue.pop())
        if name in installed:
            continue
        installed.add(name)
        for requirement in map(Requirement, metadata.requires(name) or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                queue.append(requirement.name)
    return installed


def test_the_ui_image_copies_and_installs_what_the_ui_imports() -> None:
    first_party, third_party = imported_by_the_ui()
    assert first_party == {"ui", "contracts"}
    for package in first_party:
        assert re.search(rf"^COPY {package}/ {package}/$", DOCKERFILE, flags=re.M), package
    distributions = metadata.packages_distributions()
    needed = {canonicalize_name(d) for top in third_party for d in distributions[top]}
    assert {"pydantic", "streamlit", "httpx"} <= needed
    assert not needed - installed_by_the_image()
