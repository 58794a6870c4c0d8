"""The API's domains form layers: a domain imports only the ones below it, so each behaviour has one
home and a change never runs back up the stack."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "api" / "app"

# Bottom to top: each domain may import those before it (and contracts/, libraries).
LAYERS = [
    "core",
    "images",
    "examples",
    "users",
    "auth",
    "api_keys",
    "registry",
    "catalog",
    "predictions",
    "batches",
    "feedback",
    "stats",
    "drift",
    "explanations",
    "exports",
    "releases",
    "training",
    "admin",
    "health",
]
# deps.py wires shared objects into routes: it sits above the domains it hands out and below every
# router, so only routers import it.
DEPS_USES = {"core", "images", "users", "auth", "api_keys", "registry", "catalog"}


def _imported_app_modules(path: Path) -> set[str]:
    """The first name under ``api.app`` of every module ``path`` imports (``api.app.images.service``
    gives ``images``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "api.app":
                names = [f"api.app.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n.split(".")[2] for n in names if n.startswith("api.app.")}
    return found


def _domain_files(domain: str) -> list[Path]:
    return sorted((APP / domain).rglob("*.py"))


@pytest.mark.parametrize("domain", LAYERS)
def test_a_domain_imports_only_the_domains_below_it(domain: str) -> None:
    allowed = set(LAYERS[: LAYERS.index(domain) + 1])
    wrong = []
    for path in _domain_files(domain):
        imported = _imported_app_modules(path)
        if path.name == "router.py":
            imported.discard("deps")
        wrong += [f"{path.relative_to(APP)} imports {name}" for name in sorted(imported - allowed)]
    assert not wrong, wrong


def test_the_issue_rules_hold_by_name() -> None:
    """The layer rules above, spelled out where they once failed."""
    for domain in ("core", "catalog", "images"):
        for path in _domain_files(domain):
            assert "predictions" not in _imported_app_modules(path), path
    for path in _domain_files("users"):
        assert "auth" not in _imported_app_modules(path), path


def test_every_domain_has_its_layer() -> None:
    domains = {p.name for p in APP.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert domains - set(LAYERS) == set(), "place each new domain in LAYERS"


def test_deps_hands_out_only_lower_domains() -> None:
    assert _imported_app_modules(APP / "deps.py") <= DEPS_USES


def test_the_rule_catches_an_import_back_up(tmp_path: Path) -> None:
    module = tmp_path / "service.py"
    module.write_text("from api.app.predictions import service as predictions_service\nimport api.app.auth.models\n")
    assert _imported_app_modules(module) == {"predictions", "auth"}


def test_routers_take_shared_objects_through_typed_dependencies() -> None:
    offenders = [p.relative_to(APP) for p in APP.rglob("router.py") if "app.state" in p.read_text()]
    assert not offenders, f"use a dependency from api/app/deps.py instead of request.app.state: {offenders}"
