"""Statements sent to asyncpg directly (``core.driver``): compiled once from SQLAlchemy Core with
their parameters in order, on the engine's own pool, and a lost connection is an outage (503)
that the pool gets over, against the test PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

import asyncpg
import pytest
from sqlalchemy import Integer, String, bindparam, func, literal, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine

from api.app.core.config import Settings
from api.app.core.db import make_engine
from api.app.core.driver import ConnectionLost, DriverStatement, driver_connection
from api.app.core.errors import database_status


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(settings, pool_size=1, max_overflow=0)
    yield engine
    await engine.dispose()


async def test_a_statement_takes_its_parameters_by_name_in_the_order_it_uses_them(engine: AsyncEngine) -> None:
    """``b`` comes before ``a`` in the SQL and ``a`` twice; the literal is fixed in the statement;
    the JSONB parameter goes through SQLAlchemy's conversion (a dict in, the same dict out)."""
    a, b = bindparam("a", type_=Integer), bindparam("b", type_=Integer)
    statement = DriverStatement(
        select(
            (b - a).label("difference"),
            (a * a).label("square"),
            func.concat(bindparam("name", type_=String), literal("!")).label("greeting"),
            bindparam("document", type_=JSONB).label("document"),
        )
    )
    assert statement.sql.index("$1") < statement.sql.index("$2")
    async with driver_connection(engine) as connection:
        row = await statement.fetchrow(connection, {"a": 3, "b": 10, "name": "hi", "document": {"k": [1, "x"]}})
    assert row is not None
    assert dict(row) == {"difference": 7, "square": 9, "greeting": "hi!", "document": {"k": [1, "x"]}}
    with pytest.raises(KeyError):
        statement.args({"a": 1})


async def test_a_connection_the_server_closed_is_replaced_at_checkout(engine: AsyncEngine, settings: Settings) -> None:
    async with driver_connection(engine) as connection:
        pid = await connection.fetchval("SELECT pg_backend_pid()")
    async with driver_connection(engine) as other:
        assert await other.fetchval("SELECT pg_backend_pid()") == pid  # one connection in the pool
    # Another session ends it, as a database restart would.
    terminator = make_engine(settings, pool_size=1, max_overflow=0)
    try:
        async with driver_connection(terminator) as connection:
            assert await connection.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await terminator.dispose()
    for _ in range(100):  # until asyncpg has read the server's goodbye
        async with engine.connect() as probe:
            raw = await probe.get_raw_connection()
            if cast(asyncpg.Connection, raw.driver_connection).is_closed():
                break
        await asyncio.sleep(0.02)
    async with driver_connection(engine) as connection:
        assert await connection.fetchval("SELECT pg_backend_pid()") != pid


async def test_a_connection_lost_during_a_statement_is_an_outage_the_pool_gets_over(engine: AsyncEngine) -> None:
    with pytest.raises(ConnectionLost) as lost:
        async with driver_connection(engine) as connection:
            pid = await connection.fetchval("SELECT pg_backend_pid()")
            await connection.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    assert database_status(lost.value) == 503
    async with driver_connection(engine) as connection:
        assert await connection.fetchval("SELECT pg_backend_pid()") != pid


async def test_an_error_of_the_statement_leaves_the_connection_in_the_pool(engine: AsyncEngine) -> None:
    """A refused statement is the caller's error, not an outage: the same connection serves on."""
    with pytest.raises(Exception) as refused:
        async with driver_connection(engine) as connection:
            pid = await connection.fetchval("SELECT pg_backend_pid()")
            await connection.execute("SELECT 1/0")
    assert not isinstance(refused.value, ConnectionLost) and database_status(refused.value) == 422
    async with driver_connection(engine) as connection:
        assert await connection.fetchval("SELECT pg_backend_pid()") == pid
