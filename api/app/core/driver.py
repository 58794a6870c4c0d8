"""The statements every prediction runs, sent on a pooled connection's asyncpg driver directly.

SQLAlchemy's asyncio layer runs each statement's execution in a greenlet and builds its result
through the ORM or Core result machinery: on a prediction's path that cost more CPU in the API
than PostgreSQL spent running the statements (``python -m bench.profile``; see the stress report).
The hot statements are still written once, as SQLAlchemy Core, and compiled once for asyncpg
here; the connection comes from the engine's own pool, so pool size, timeouts and the outage
handling of checking one out are those of every other query.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

import asyncpg
import sqlalchemy.exc
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine.interfaces import PoolProxiedConnection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util import greenlet_spawn

_DIALECT = asyncpg_dialect()

CONNECTION_LOST = (OSError, asyncpg.PostgresConnectionError, asyncpg.exceptions.AdminShutdownError)
"""What asyncpg raises when the connection is gone: the pool must not hand it out again."""


class DriverStatement:
    """A Core statement compiled once for asyncpg: its SQL (``$n`` placeholders) and, for each
    placeholder, the parameter's name, its value when fixed in the statement, and SQLAlchemy's
    conversion of it (JSONB values to text, for one).

    Parameters are passed by name, as to ``Session.execute``; a name the statement does not fix
    must be given (``KeyError`` otherwise)."""

    def __init__(self, statement: ClauseElement) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=_DIALECT, compile_kwargs={"render_postcompile": True}))
        self.sql = compiled.string
        fixed = compiled.construct_params(_check=False)
        self._slots: list[tuple[str, bool, Any, Callable[[Any], Any] | None]] = [
            (name, bind.required, fixed.get(name), bind.type.dialect_impl(_DIALECT).bind_processor(_DIALECT))
            for name in compiled.positiontup or []
            for bind in [compiled.binds[name]]
        ]

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        """The positional arguments for ``params``."""
        args = []
        for name, required, fixed, convert in self._slots:
            value = params[name] if required else fixed
            args.append(convert(value) if convert is not None and value is not None else value)
        return args

    async def fetchrow(self, connection: asyncpg.Connection, params: Mapping[str, Any]) -> asyncpg.Record | None:
        return await connection.fetchrow(self.sql, *self.args(params))

    async def execute(self, connection: asyncpg.Connection, params: Mapping[str, Any]) -> None:
        await connection.execute(self.sql, *self.args(params))


async def _checkout(engine: AsyncEngine) -> PoolProxiedConnection:
    """A pooled connection. A connection refused while it was being opened (PostgreSQL shutting
    down or starting up, too many clients) comes out of the pool as the driver adapter's own
    error: it is raised as SQLAlchemy's ``DBAPIError``, as a session's checkout raises it."""
    try:
        return await engine.raw_connection()
    except sqlalchemy.exc.EmulatedDBAPIException as exc:
        dbapi_error = engine.dialect.loaded_dbapi.Error
        raise sqlalchemy.exc.DBAPIError.instance(None, None, exc, dbapi_error) from exc


class ConnectionLost(ConnectionError):
    """The connection to PostgreSQL was lost during a statement sent to the driver: an outage,
    answered 503 like SQLAlchemy's own disconnect errors."""


@contextlib.asynccontextmanager
async def driver_connection(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """One of ``engine``'s pooled connections as its asyncpg connection, outside any transaction
    (each statement commits on its own unless the caller opens ``connection.transaction()``).

    Checking one out raises as SQLAlchemy does (``TimeoutError`` when the pool is exhausted,
    ``OperationalError`` or another ``DBAPIError`` when PostgreSQL cannot be reached or refuses).
    A pooled connection the server closed meanwhile (a restart) is replaced first, without a round
    trip: asyncpg knows it is closed. Statements raise asyncpg's errors, except that a connection lost on the way raises
    ``ConnectionLost`` and is discarded rather than returned to the pool."""
    pooled = await _checkout(engine)
    connection: asyncpg.Connection = pooled.driver_connection
    while connection.is_closed():
        # Outside a greenlet, invalidating terminates the connection at once, without waiting.
        pooled.invalidate()
        await greenlet_spawn(pooled.close)
        pooled = await _checkout(engine)
        connection = pooled.driver_connection
    try:
        yield connection
    except Exception as exc:
        if not isinstance(exc, CONNECTION_LOST) and not connection.is_closed():
            raise
        pooled.invalidate(exc)
        raise ConnectionLost(f"{type(exc).__name__}: {exc}") from exc
    except BaseException:
        # Cancelled (the client went away), perhaps in the middle of a statement: a connection in
        # an unknown state is not handed to the next request.
        pooled.invalidate()
        raise
    finally:
        await greenlet_spawn(pooled.close)
