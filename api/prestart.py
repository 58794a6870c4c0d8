"""``python -m api.prestart``: wait for PostgreSQL and Redis, create and migrate the database,
create the first admin. Idempotent; run before every start."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

from api.app.core.config import Settings, load_settings
from api.app.core.db import make_engine, make_sessionmaker
from api.app.core.logging import configure_logging
from api.app.core.security import PasswordHasher
from api.app.core.startup import (
    DependencyUnavailable,
    asyncpg_dsn,
    check_redis_eviction,
    wait_for_postgres,
    wait_for_redis,
)
from api.app.feedback import service as feedback_service
from api.app.registry import service as registry_service
from api.app.users.service import ensure_admin
from contracts.redis_policy import EvictionPolicyRefused
from contracts.registry import RegistryUnreadable, read_registry

log = logging.getLogger("api.prestart")
ALEMBIC_INI = Path(__file__).resolve().parent / "alembic.ini"


async def create_database_if_missing(settings: Settings) -> None:
    name = make_url(settings.database_url).database
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url, "postgres"), timeout=5)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
            log.info("created database %s", name)
    finally:
        await conn.close()


def migrate(database_url: str) -> None:
    config = Config(str(ALEMBIC_INI))
    config.attributes["configure_logger"] = False
    config.cmd_opts = None
    # Alembic's configuration interpolates "%": a percent-encoded password (p%40ss) is written %%.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    command.upgrade(config, "head", tag=None)


async def seed_registry(settings: Settings) -> int:
    """Brings ``REGISTRY_PATH`` (``model/registry.yaml``) into the database's registry; how many
    versions were created or changed."""
    engine = make_engine(settings)
    try:
        async with make_sessionmaker(engine)() as session:
            return await registry_service.seed(session=session, registry=read_registry(settings.registry_path))
    finally:
        await engine.dispose()


async def seed_admin(settings: Settings) -> bool:
    engine = make_engine(settings)
    try:
        async with make_sessionmaker(engine)() as session:
            return await ensure_admin(
                session=session,
                hasher=PasswordHasher(settings),
                email=settings.first_admin_email,
                password=settings.first_admin_password,
            )
    finally:
        await engine.dispose()


async def backfill_examples(settings: Settings) -> int:
    """Labelled examples from the verdicts given before they existed (once); how many."""
    engine = make_engine(settings)
    try:
        async with make_sessionmaker(engine)() as session:
            return await feedback_service.backfill_examples(session=session, test_share=settings.feedback_test_share)
    finally:
        await engine.dispose()


async def prestart(settings: Settings) -> None:
    await wait_for_postgres(settings, database="postgres")
    await wait_for_redis(settings)
    await check_redis_eviction(settings)
    await create_database_if_missing(settings)
    await asyncio.to_thread(migrate, settings.database_url)
    created = await seed_admin(settings)
    log.info("first admin %s %s", settings.first_admin_email, "created" if created else "already present")
    changed = await seed_registry(settings)
    log.info("model registry: %d versions created or changed from %s", changed, settings.registry_path)
    if added := await backfill_examples(settings):
        log.info("labelled examples: %d from earlier verdicts", added)


def main() -> None:
    settings = load_settings("api.prestart")
    configure_logging(settings.log_level, settings.log_json, service="prestart")
    try:
        asyncio.run(prestart(settings))
    except (DependencyUnavailable, EvictionPolicyRefused, RegistryUnreadable) as exc:
        log.error("%s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
