"""The model registry as live data in PostgreSQL: every model version, its state, and an audit
trail of every change. ``registry.yaml`` seeds it at start-up."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.registry.models import ModelVersion, RegistryChange
from contracts.registry import ModelEntry, Registry

SEED_ACTOR = "registry.yaml"
"""The actor named in the audit trail for changes made by start-up seeding."""


def _state(row: ModelVersion) -> dict[str, Any]:
    return {
        "display_name": row.display_name,
        "channel": row.channel,
        "enabled": row.enabled,
        "weight": row.weight,
        "spec": row.spec,
    }


def _new_version(entry: ModelEntry) -> ModelVersion:
    weight = entry.weight if entry.weight is not None else (100 if entry.channel == "stable" else 0)
    return ModelVersion(
        name=entry.name,
        version=entry.version,
        display_name=entry.display_name or entry.key,
        spec=entry.spec(),
        channel=entry.channel,
        enabled=entry.enabled,
        weight=weight,
    )


async def seed(*, session: AsyncSession, registry: Registry) -> int:
    """Brings the versions ``registry`` (read from ``registry.yaml``) names into the database, and
    commits: a missing version is created with the file's state; an existing one gets the file's
    spec (how to load it) and display name, and keeps the state operators gave it (channel, enabled,
    weight), so a restart never undoes a promotion or a rollback. Versions the file does not name
    are left as they are. Each creation or change is audited under ``SEED_ACTOR``; returns how many.

    Safe to run from several processes at once: they take turns on a transaction-level lock.
    """
    await session.execute(text("SELECT pg_advisory_xact_lock(hashtext('model_registry'))"))
    existing = {(v.name, v.version): v for v in await session.scalars(select(ModelVersion))}
    changes = 0
    for entry in registry.models:
        row = existing.get((entry.name, entry.version))
        if row is None:
            row = _new_version(entry)
            session.add(row)
            _audit(session, action="register", row=row, before=None, reason="named in registry.yaml")
            changes += 1
            continue
        before = _state(row)
        row.spec = entry.spec()
        row.display_name = entry.display_name or row.display_name
        if _state(row) != before:
            _audit(session, action="update", row=row, before=before, reason="registry.yaml changed")
            changes += 1
    await session.commit()
    return changes


def _audit(
    session: AsyncSession, *, action: str, row: ModelVersion, before: dict[str, Any] | None, reason: str
) -> None:
    session.add(
        RegistryChange(
            actor_id=None,
            actor=SEED_ACTOR,
            action=action,
            model=row.name,
            version=row.version,
            before=before,
            after=_state(row),
            reason=reason,
        )
    )


async def revision(*, session: AsyncSession) -> int:
    """The registry's revision: the id of its latest change, 0 before the first."""
    return int(await session.scalar(select(func.coalesce(func.max(RegistryChange.id), 0))) or 0)


async def list_versions(*, session: AsyncSession) -> list[ModelVersion]:
    """Every model version, by name then version."""
    return list(await session.scalars(select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version)))


async def list_changes(
    *, session: AsyncSession, model: str | None, skip: int, limit: int
) -> tuple[list[RegistryChange], int]:
    """A page of the audit trail, newest first (of one model when ``model`` is given), and its total."""
    where = [RegistryChange.model == model] if model is not None else []
    total = await session.scalar(select(func.count()).select_from(RegistryChange).where(*where))
    rows = await session.scalars(
        select(RegistryChange).where(*where).order_by(RegistryChange.id.desc()).offset(skip).limit(limit)
    )
    return list(rows), int(total or 0)
