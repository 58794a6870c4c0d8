"""Database engine, sessions and the declarative base."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from datetime import UTC, datetime
from typing import Literal, TypeVar

from sqlalchemy import ColumnElement, DateTime, ForeignKey, MetaData, bindparam, column, func, inspect, select, table
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from api.app.core.config import Settings

log = logging.getLogger(__name__)

APPLICATION_NAME = "portal-api"

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_uuid() -> uuid.UUID:
    return uuid.uuid4()


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)


class OwnedMixin(TimestampMixin):
    """A row that belongs to one user, and goes when the user does."""

    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)


OwnedT = TypeVar("OwnedT", bound=OwnedMixin)

_owners = table("users", column("id"))
OWNER_KEY_SHARE = (
    select(_owners.c.id).where(_owners.c.id == bindparam("b_owner_id")).with_for_update(read=True, key_share=True)
)
"""The row of the user an owned row is for (parameter ``b_owner_id``), locked ``FOR KEY SHARE``,
the lock inserting an owned row takes anyway. A writer that adds rows and takes other locks (the
blob lock of an upload) takes this one first: deleting the user locks the row ``FOR UPDATE`` before
anything else, so the two never wait for each other in opposite orders, and an upload either
commits before the delete reads what the user owns or finds the user gone (no row)."""


async def owned_page(
    session: AsyncSession,
    entity: type[OwnedT],
    *filters: ColumnElement[bool],
    owner_id: int,
    skip: int,
    limit: int,
) -> tuple[list[OwnedT], int]:
    """One page of a user's rows (those matching ``filters`` too), newest first (the primary key
    orders rows made at the same instant, so pages neither repeat nor skip one), and how many such
    rows there are in all."""
    where = (entity.owner_id == owner_id, *filters)
    count = await session.scalar(select(func.count()).select_from(entity).where(*where))
    order = (entity.created_at.desc(), *(key.desc() for key in inspect(entity).primary_key))
    rows = await session.scalars(select(entity).where(*where).order_by(*order).offset(skip).limit(limit))
    return list(rows), int(count or 0)


TLS_MODE_KEYS = ("ssl", "sslmode")
"""The two spellings of a TLS mode (``disable`` ... ``verify-full``) in ``DATABASE_URL``'s query:
``ssl=`` as SQLAlchemy documents for asyncpg, ``sslmode=`` as libpq and most managed PostgreSQL
services give it."""


def tls_mode_as(database_url: str | URL, key: Literal["ssl", "sslmode"]) -> URL:
    """``database_url`` with its TLS mode, whichever way it is spelled, under ``key``: ``ssl`` for
    SQLAlchemy's asyncpg dialect (each query parameter becomes a keyword of ``asyncpg.connect``,
    which has ``ssl`` and no ``sslmode``), ``sslmode`` for a DSN given to asyncpg itself (its DSN
    parser knows ``sslmode`` and sends any other parameter, ``ssl`` too, to the server as a
    setting, which the server refuses). Raises ``ValueError`` when both spellings are given with
    different modes."""
    url = make_url(database_url)
    modes = {url.query[name] for name in TLS_MODE_KEYS if name in url.query}
    if len(modes) > 1:
        raise ValueError(f"DATABASE_URL gives two TLS modes: {' and '.join(sorted(map(str, modes)))}")
    url = url.difference_update_query(TLS_MODE_KEYS)
    return url.update_query_dict({key: modes.pop()}) if modes else url


LIBPQ_FILE_KEYS = {
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslpassword": "PGSSLPASSWORD",
    "sslcrl": "PGSSLCRL",
}
"""libpq's TLS file parameters (PostgreSQL's libpq "Parameter Key Words"), which the dialect would
pass to ``asyncpg.connect`` as keywords it does not take, and the environment variables asyncpg
reads them from instead."""


def engine_url(database_url: str) -> URL:
    """``database_url`` as SQLAlchemy's asyncpg dialect takes it (TLS mode as ``ssl=``). Raises
    ``ValueError`` naming the environment variable to use for a libpq TLS file parameter in the
    URL (``sslrootcert=``...): the engine would fail at its first connection with a TypeError."""
    url = tls_mode_as(database_url, "ssl")
    if given := sorted(set(url.query) & LIBPQ_FILE_KEYS.keys()):
        instead = ", ".join(f"{key} as {LIBPQ_FILE_KEYS[key]}" for key in given)
        raise ValueError(f"DATABASE_URL: give {instead} in the environment, not in the URL")
    return url


COMMAND_TIMEOUT_S = 10
"""asyncpg's ``command_timeout``: a statement not answered by then (a PostgreSQL that hangs) is
cancelled and the request answered 503."""

LOCK_TIMEOUT_MS = 8000
"""PostgreSQL's ``lock_timeout`` on the API's connections, under ``COMMAND_TIMEOUT_S``: a request
held up by another holding a lock (an account being deleted with a long history) ends with a
409 "in progress" rather than the command timeout's 503."""


def make_engine(
    settings: Settings, *, pool_size: int | None = None, max_overflow: int | None = None, role: str = "requests"
) -> AsyncEngine:
    # No pre-ping (a round trip per checkout): after a database restart the first query fails,
    # answers 503, and SQLAlchemy replaces every pooled connection.
    return create_async_engine(
        engine_url(settings.database_url),
        pool_size=settings.db_pool_size if pool_size is None else pool_size,
        max_overflow=settings.db_max_overflow if max_overflow is None else max_overflow,
        pool_timeout=5,
        # Last in, first out: under light load one connection serves request after request, with
        # its prepared statements already made; first in, first out would cycle through all of
        # them and prepare each new statement once per connection.
        pool_use_lifo=True,
        connect_args={
            "timeout": 2,
            "command_timeout": COMMAND_TIMEOUT_S,
            "server_settings": {
                # pg_stat_activity then tells which API process holds which connection, and for what.
                "application_name": application_name(os.getpid(), role),
                # Floats PostgreSQL writes as text (the pages of jobs it builds as JSON) in the
                # shortest form that reads back exactly, whatever the server, database or role
                # sets (0 would cut them to 15 significant digits).
                "extra_float_digits": "1",
                # A wait for a row or advisory lock ends before the command timeout: as a 409 "in
                # progress" (``errors.database_status``), not a 503 saying PostgreSQL is down.
                "lock_timeout": str(LOCK_TIMEOUT_MS),
            },
        },
    )


def application_name(pid: int, role: str) -> str:
    return f"{APPLICATION_NAME}:{pid}:{role}"


async def open_pool(engine: AsyncEngine, size: int) -> None:
    """Opens ``size`` connections and returns them to the pool, so that the first burst of
    requests after start-up does not wait while each one is opened (a PostgreSQL backend fork
    and a handshake apiece). A database that is down only delays this by the
    connect timeout: requests then answer 503 until it is back."""
    opened = await asyncio.gather(*(engine.connect().start() for _ in range(size)), return_exceptions=True)
    for conn in opened:
        if isinstance(conn, AsyncConnection):
            await conn.close()
    failures = [c for c in opened if isinstance(c, BaseException)]
    if failures:
        log.warning("opened %d of %d database connections at start-up: %s", size - len(failures), size, failures[0])


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def make_read_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for requests that only read, on the same pool: each statement runs on its own,
    without the BEGIN and COMMIT (or ROLLBACK) round trips of a transaction around it.

    Under READ COMMITTED every statement sees its own snapshot anyway, so a read of several
    statements sees the same data either way. A write through one of these commits at once.
    """
    return async_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)
