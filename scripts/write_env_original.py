"""Writes .env.original from the settings classes: every variable, its development value and
its description. Run after adding a setting; a test checks that the file is current."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings

from api.app.core.config import PROJECT_ROOT, Settings
from model.config import ModelSettings
from scripts.run import DEMO_RETRAIN_MIN_NEW_LABELS
from ui.config import UISettings

DEMO_VALUES: dict[str, object] = {"retrain_min_new_labels": DEMO_RETRAIN_MIN_NEW_LABELS}
"""Where the development configuration is the demo's, not the setting's own default (which is
said beside it): a copied .env.original keeps what ``make run`` and compose do."""

DERIVED = {"api_url"}
"""Written commented out: left unset, ``make run`` derives them from other settings (the UI's
``API_URL`` from ``API_HOST`` and ``API_PORT``), so that a copied .env changing a port stays whole."""

COMPOSE_ONLY: dict[str, tuple[str, str]] = {
    "POSTGRES_PASSWORD": (
        "postgres",
        "The database's password in docker-compose.yml: the db service is given it, and it is pasted\n"
        "as it is into the API's DATABASE_URL there (no setting reads it). Letters, digits and\n"
        "- . _ ~ only: @ / # % : ? and the like would break that URL (compose cannot percent-encode\n"
        "it, and a percent-encoded one would be the database's password as written).",
    ),
    "GRAFANA_ADMIN_PASSWORD": (
        "",
        "Grafana's admin password (user admin) in docker-compose.yml's monitoring profile. No default:\n"
        "Grafana refuses to start while it is empty or admin.",
    ),
}
"""Variables docker-compose.yml reads from .env that are no setting of the API, the model service
or the UI (their settings ignore them): name -> (compose's default, description)."""

HEADER = """# Copy to .env and adjust. Every value here is a safe development default.
# Outside development (ENVIRONMENT=production) set SECRET_KEY and FIRST_ADMIN_PASSWORD.
"""


def _value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Path):
        for base, shown in ((PROJECT_ROOT, ""), (Path.home(), "~/")):
            if value.is_relative_to(base):
                return shown + str(value.relative_to(base))
        return str(value)
    return str(value)


def render() -> str:
    seen: set[str] = set()
    parts = [HEADER]
    sections: list[tuple[str, type[BaseSettings]]] = [
        ("API", Settings),
        ("Model service", ModelSettings),
        ("UI", UISettings),
    ]
    for title, cls in sections:
        parts.append(f"\n# --- {title} ---\n")
        for name, field in cls.model_fields.items():
            if name in seen:
                parts.append(f"# {name.upper()} is shared with the section above.\n")
                continue
            seen.add(name)
            comment = "".join(f"# {line}\n" for line in (field.description or "").splitlines())
            if name in DEMO_VALUES:
                comment += f"# (the demo's value; the setting's own default is {_value(field.default)})\n"
            unset = "# " if name in DERIVED else ""
            parts.append(f"{comment}{unset}{name.upper()}={_value(DEMO_VALUES.get(name, field.default))}\n")
    parts.append("\n# --- Docker compose only ---\n")
    for variable, (default, description) in COMPOSE_ONLY.items():
        comment = "".join(f"# {line}\n" for line in description.splitlines())
        parts.append(f"{comment}{variable}={default}\n")
    return "".join(parts)


if __name__ == "__main__":
    (PROJECT_ROOT / ".env.original").write_text(render(), encoding="utf-8")
