"""Each API process's view of the registry: rebuilt from PostgreSQL whenever its revision moves,
and published to Redis for the workers."""

from __future__ import annotations

import logging

from pydantic import ValidationError
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.app.registry import service
from api.app.registry.models import ModelVersion
from contracts import registry_live
from contracts.registry import ModelEntry, Registry
from contracts.registry_live import RegistrySnapshot

log = logging.getLogger("api.registry")


def entry_of(row: ModelVersion) -> ModelEntry:
    """A stored version as the registry entry workers load and requests are routed by."""
    return ModelEntry.model_validate(
        {
            **row.spec,
            "name": row.name,
            "version": row.version,
            "channel": row.channel,
            "enabled": row.enabled,
            "weight": row.weight,
            "display_name": row.display_name,
        }
    )


def build_registry(rows: list[ModelVersion], default_order: list[str], file_order: list[str]) -> Registry:
    """The registry of ``rows``; ``default_order`` keeps the names it has versions of. Models are
    listed in the order registry.yaml gives them (``file_order``), those registered since after
    them by name. A row whose spec no longer validates (written by another release) is left out,
    and logged."""
    position = {name: i for i, name in enumerate(file_order)}
    rows = sorted(rows, key=lambda r: (position.get(r.name, len(position)), r.name, r.version))
    entries = []
    for row in rows:
        try:
            entries.append(entry_of(row))
        except ValidationError as exc:
            log.error("model version %s@%s left out of the registry: %s", row.name, row.version, exc)
    names = {e.name for e in entries}
    return Registry(default_order=[n for n in default_order if n in names], models=entries)


class LiveRegistry:
    """The registry as of ``revision``; ``current`` is replaced whole, never changed in place, so a
    request holding it sees one consistent revision."""

    def __init__(self, fallback: Registry) -> None:
        self.current = fallback
        """Until the database is first read: the file's registry (revision 0)."""
        self.default_order = fallback.default_order
        self.file_order = list(dict.fromkeys(m.name for m in fallback.models))
        self.revision = 0
        self.source = ""

    async def refresh(self, session: AsyncSession) -> bool:
        """Reads the registry again when its revision moved; True when it did."""
        revision = await service.revision(session=session)
        if revision == self.revision and self.source:
            return False
        source = str(await session.scalar(text("SELECT oid FROM pg_database WHERE datname = current_database()")))
        rows = await service.list_versions(session=session)
        if not rows:
            return False  # not seeded yet: keep the file's registry
        self.current = build_registry(rows, self.default_order, self.file_order)
        self.revision, self.source = revision, source
        log.info("model registry at revision %d", revision)
        return True

    def snapshot(self) -> RegistrySnapshot | None:
        if not self.source:
            return None
        return RegistrySnapshot(revision=self.revision, source=self.source, registry=self.current)

    async def reload(self, session: AsyncSession, redis: Redis) -> None:
        """After a change this process made: serve it here and announce it to the workers at once,
        not at the next round of ``sync``."""
        await self.refresh(session)
        if (snapshot := self.snapshot()) is not None:
            await registry_live.publish(redis, snapshot)

    async def sync(self, sessionmaker: async_sessionmaker[AsyncSession], redis: Redis) -> None:
        """One round of the refresh loop: reads the database's revision, and publishes to Redis
        unless it holds this revision already (Redis may have lost its data)."""
        async with sessionmaker() as session:
            await self.refresh(session)
        if (snapshot := self.snapshot()) is not None and await registry_live.publish(redis, snapshot):
            log.info("published registry revision %d", snapshot.revision)
