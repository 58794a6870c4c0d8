"""The API's database pool."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI
from sqlalchemy import event

from api.app.core.db import open_pool
from tests.conftest import PASSWORD, Users


async def test_a_burst_of_requests_opens_no_connection(
    app: FastAPI, client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    """The pool is opened at start-up and has no overflow: 50 requests at once wait their turn
    for the pooled connections instead of opening more. An overflow connection is closed when it
    is handed back, so under sustained load each use of one was a new connection."""
    # Whole before the burst, as at start-up: a test run earlier may have ended some of its
    # connections (the pool opens those again lazily, one by one, which is not what is tested).
    await open_pool(app.state.engine, app.state.engine.pool.size())
    engine = app.state.engine.sync_engine
    opened: list[object] = []

    def on_connect(dbapi_connection: object, record: object) -> None:
        opened.append(dbapi_connection)

    event.listen(engine, "connect", on_connect)
    try:
        answers = await asyncio.gather(*(client.get("/user/", headers=admin_headers) for _ in range(50)))
    finally:
        event.remove(engine, "connect", on_connect)
    assert [r.status_code for r in answers] == [200] * 50
    assert opened == []


async def test_reads_run_without_a_transaction(
    app: FastAPI, client: httpx.AsyncClient, admin_headers: dict[str, str], users: Users
) -> None:
    """Listing users costs two statements (the signed-in user, sent to the driver directly, and
    the page, through SQLAlchemy) and no BEGIN, COMMIT or ROLLBACK round trips; a write still runs
    in a transaction."""
    engine = app.state.engine.sync_engine
    plain: list[str] = []  # statements asyncpg runs for the connection itself: BEGIN, COMMIT, the driver's
    statements: list[str] = []
    drivers: list[object] = []

    def log_plain(record: object) -> None:
        plain.append(str(getattr(record, "query", "")).strip().rstrip(";").split()[0].upper())

    def on_checkout(dbapi_connection: object, record: object, proxy: object) -> None:
        driver = dbapi_connection.driver_connection  # type: ignore[attr-defined]
        driver.add_query_logger(log_plain)
        drivers.append(driver)

    def on_execute(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement.split()[0].upper())

    _, headers = await users.create()
    event.listen(engine, "checkout", on_checkout)
    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        assert (await client.get("/user/", headers=admin_headers)).status_code == 200
        read_plain, read_statements = list(plain), list(statements)
        password = {"current_password": PASSWORD, "new_password": "another-password"}
        assert (await client.patch("/v1/users/me/password", json=password, headers=headers)).status_code == 204
    finally:
        event.remove(engine, "checkout", on_checkout)
        event.remove(engine, "before_cursor_execute", on_execute)
        for driver in drivers:
            driver.remove_query_logger(log_plain)  # type: ignore[attr-defined]
    assert read_statements == ["SELECT"]
    assert read_plain == ["SELECT"]
    # Changing the password (a write): the token's user, then a transaction of the route's session.
    assert plain[len(read_plain) :] == ["SELECT", "BEGIN", "COMMIT"], plain
