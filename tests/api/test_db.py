"""The API's database pool."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event, make_url, text

from api.app.core.db import engine_url, make_engine, open_pool, tls_mode_as
from api.app.core.startup import DependencyUnavailable, asyncpg_dsn, wait_for_postgres
from api.prestart import create_database_if_missing, migrate
from tests.conftest import PASSWORD, Users, make_settings
from tests.support import PostgresServer

TLS_MODE_KEYS = ("ssl", "sslmode")
REFUSED_TLS = "rejected SSL upgrade"
"""asyncpg's words when a server that offers no TLS is asked for it (``require``)."""


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


def with_tls_mode(database_url: str, key: str, mode: str) -> str:
    return f"{database_url}{'&' if '?' in database_url else '?'}{key}={mode}"


def test_the_tls_mode_is_spelled_for_each_client() -> None:
    """``ssl=`` and ``sslmode=`` both name the TLS mode: the engine's URL gets ``ssl``, asyncpg's
    DSN ``sslmode``; the other parameters stay, and two different modes are refused."""
    base = "postgresql+asyncpg://u:p@db:5432/portal?application_name=x"
    for key in TLS_MODE_KEYS:
        url = with_tls_mode(base, key, "verify-full")
        assert dict(tls_mode_as(url, "ssl").query) == {"application_name": "x", "ssl": "verify-full"}
        assert asyncpg_dsn(url) == "postgresql://u:p@db:5432/portal?application_name=x&sslmode=verify-full"
    both = with_tls_mode(with_tls_mode(base, "ssl", "require"), "sslmode", "require")
    assert dict(tls_mode_as(both, "ssl").query) == {"application_name": "x", "ssl": "require"}
    with pytest.raises(ValueError, match="two TLS modes"):
        tls_mode_as(with_tls_mode(with_tls_mode(base, "ssl", "require"), "sslmode", "disable"), "ssl")
    assert asyncpg_dsn(base, "postgres") == "postgresql://u:p@db:5432/postgres?application_name=x"


@pytest.mark.parametrize("key", TLS_MODE_KEYS)
async def test_the_engine_takes_either_spelling_of_the_tls_mode(
    key: str, plain_postgres: None, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    for mode in ("prefer", "require"):
        settings = make_settings(with_tls_mode(database_url, key, mode), redis_url, tmp_path)
        engine = make_engine(settings, pool_size=1)
        try:
            if mode == "prefer":
                async with engine.connect() as conn:
                    assert await conn.scalar(text("SELECT 1")) == 1
            else:
                with pytest.raises(ConnectionError, match=REFUSED_TLS):
                    async with engine.connect():
                        pass
        finally:
            await engine.dispose()


@pytest.mark.parametrize("key", TLS_MODE_KEYS)
async def test_the_start_up_checks_take_either_spelling_of_the_tls_mode(
    key: str, plain_postgres: None, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The app's wait for PostgreSQL and the prestart's (on the ``postgres`` database, before it
    creates the portal's)."""
    prefer = make_settings(
        with_tls_mode(database_url, key, "prefer"),
        redis_url,
        tmp_path,
        dependency_wait_attempts=1,
        dependency_wait_interval=0,
    )
    await wait_for_postgres(prefer)
    await wait_for_postgres(prefer, database="postgres")
    await create_database_if_missing(prefer)
    require = prefer.model_copy(update={"database_url": with_tls_mode(database_url, key, "require")})
    with pytest.raises(DependencyUnavailable, match=REFUSED_TLS):
        await wait_for_postgres(require)
    with pytest.raises(ConnectionError, match=REFUSED_TLS):
        await create_database_if_missing(require)


@pytest.mark.parametrize("key", TLS_MODE_KEYS)
async def test_the_migrations_take_either_spelling_of_the_tls_mode(
    key: str, plain_postgres: None, database_url: str
) -> None:
    """Alembic's environment opens an engine of its own (the database is at head already: the
    upgrade only connects and reads the revision)."""
    await asyncio.to_thread(migrate, with_tls_mode(database_url, key, "prefer"))
    with pytest.raises(ConnectionError, match=REFUSED_TLS):
        await asyncio.to_thread(migrate, with_tls_mode(database_url, key, "require"))


async def test_the_migrations_take_a_percent_encoded_password(database_url: str) -> None:
    """A password holding ``@ / # % :`` is percent-encoded in the URL, as managed databases'
    generated ones often are: Alembic's configuration read ``%`` as interpolation and prestart
    stopped with "invalid interpolation syntax" (the test server trusts every password)."""
    url = make_url(database_url).set(password="p@ss/w%rd").render_as_string(hide_password=False)
    assert "p%40ss%2Fw%25rd" in url
    await asyncio.to_thread(migrate, url)


def test_a_libpq_tls_file_in_the_url_is_refused_naming_the_variable_to_use() -> None:
    """``sslrootcert=`` (as providers document verify-full) reached ``asyncpg.connect`` as a
    keyword it does not take: a TypeError at the first connection. Refused at once, saying where
    asyncpg reads it from."""
    with pytest.raises(ValueError, match="sslrootcert as PGSSLROOTCERT"):
        engine_url("postgresql+asyncpg://u@h/db?sslmode=verify-full&sslrootcert=/etc/ca.pem")


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL that offers TLS, with a self-signed certificate (``require`` does not
    check it)."""
    server = PostgresServer()
    server.init()
    data = server.server.data
    key, cert = data / "server.key", data / "server.crt"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    key.chmod(0o600)  # PostgreSQL refuses a key others can read
    owner = data.stat()
    for file in (key, cert):
        os.chown(file, owner.st_uid, owner.st_gid)
    with (data / "postgresql.conf").open("a") as conf:
        conf.write("ssl = on\n")
    server.start()
    yield server
    with suppress(Exception):
        server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


ENCRYPTED = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


async def test_require_connects_encrypted_to_a_server_that_offers_tls(
    tls_postgres: PostgresServer, redis_url: str, tmp_path: Path
) -> None:
    """Either spelling of ``require`` gives an encrypted connection, from the engine and from
    asyncpg's DSN (the start-up checks); ``disable`` a plain one."""
    for key in TLS_MODE_KEYS:
        for mode, encrypted in (("require", True), ("disable", False)):
            url = with_tls_mode(tls_postgres.url, key, mode)
            settings = make_settings(url, redis_url, tmp_path, dependency_wait_attempts=1, dependency_wait_interval=0)
            engine = make_engine(settings, pool_size=1)
            try:
                async with engine.connect() as conn:
                    assert await conn.scalar(text(ENCRYPTED)) is encrypted, (key, mode)
            finally:
                await engine.dispose()
            await wait_for_postgres(settings)
            direct = await asyncpg.connect(asyncpg_dsn(url))
            try:
                assert await direct.fetchval(ENCRYPTED) is encrypted, (key, mode)
            finally:
                await direct.close()
