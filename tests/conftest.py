"""Fixtures: a throwaway PostgreSQL database and a separate Redis index per run, the API
in-process, and real model workers as subprocesses.

TEST_POSTGRES_ADMIN_DSN and TEST_REDIS_URL name the servers; left unset, they are PostgreSQL on
127.0.0.1:5432 and Redis on 127.0.0.1:6379, and where nothing listens there the session starts
private ones for itself (scripts/local_services.py, data under var/) and stops them at its end.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import redis
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from api.app.core.config import Settings
from api.app.main import create_app
from api.prestart import migrate, seed_admin, seed_registry
from scripts.local_services import (
    POSTGRES_PORT_VARIABLE,
    REDIS_PORT_VARIABLE,
    LocalServiceError,
    LocalServices,
    default_url,
    ensure_local_services,
    var_dir,
)
from tests.support import (
    SHARED,
    RedisServer,
    Service,
    http_ok,
    start_api,
    start_worker,
    wait_for_worker,
    wait_until,
)

# Outside `make test` (which sets these), use ../shared as make does.
if "MODELS_DIR" not in os.environ and (SHARED / "models").is_dir():
    os.environ["MODELS_DIR"] = str(SHARED / "models")
if "QUICKDRAW_DIR" not in os.environ and (SHARED / "data" / "quickdraw").is_dir():
    os.environ["QUICKDRAW_DIR"] = str(SHARED / "data" / "quickdraw")

ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "admin-password-for-tests"
PASSWORD = "a-good-password"


DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
LOCAL_SERVICES = pytest.StashKey[LocalServices]()


def _say(config: pytest.Config) -> Callable[[str], None]:
    """Prints a line past pytest's capture, which would otherwise swallow it."""

    def say(line: str) -> None:
        capman = config.pluginmanager.getplugin("capturemanager")
        if capman is None:
            print(line, flush=True)
            return
        with capman.global_and_fixture_disabled():
            print(line, flush=True)

    return say


def pytest_configure(config: pytest.Config) -> None:
    """Private PostgreSQL and Redis for the session where the default addresses have none.

    Under ``pytest -n`` only the controlling process looks: the test processes it starts afterwards
    inherit the variables set here."""
    config.addinivalue_line(
        "markers",
        "serial: measures latency, throughput or CPU against an otherwise idle host; "
        "`make test` runs these alone, after the others",
    )
    if hasattr(config, "workerinput"):
        return
    try:
        services = ensure_local_services(
            var_dir(),
            database_url=(
                None
                if "TEST_POSTGRES_ADMIN_DSN" in os.environ
                else default_url(DEFAULT_ADMIN_DSN, POSTGRES_PORT_VARIABLE)
            ),
            redis_url=None if "TEST_REDIS_URL" in os.environ else default_url(DEFAULT_REDIS_URL, REDIS_PORT_VARIABLE),
            say=_say(config),
        )
    except LocalServiceError as error:
        # One line (a port taken by something else), not a traceback through the hooks.
        raise pytest.UsageError(str(error)) from error
    # What the fixtures read, naming the test ports when a test moved the defaults.
    if services.database_url is not None:
        os.environ["TEST_POSTGRES_ADMIN_DSN"] = services.database_url
    if services.redis_url is not None:
        os.environ["TEST_REDIS_URL"] = services.redis_url
    config.stash[LOCAL_SERVICES] = services


def pytest_unconfigure(config: pytest.Config) -> None:
    if services := config.stash.get(LOCAL_SERVICES, None):
        services.stop()


def _admin_dsn() -> str:
    return os.environ.get("TEST_POSTGRES_ADMIN_DSN", DEFAULT_ADMIN_DSN)


@pytest.fixture(scope="session")
def plain_postgres() -> None:
    """Skips a test that needs the test PostgreSQL to offer no TLS (as the local one): ``prefer``
    then falls back to plain and ``require`` is refused, which shows a TLS mode reached the driver."""

    async def ssl() -> str:
        conn = await asyncpg.connect(_admin_dsn())
        try:
            return str(await conn.fetchval("SHOW ssl"))
        finally:
            await conn.close()

    if asyncio.run(ssl()) != "off":
        pytest.skip("the test PostgreSQL offers TLS")


async def _execute(sql: str) -> None:
    conn = await asyncpg.connect(_admin_dsn())
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def throwaway_database() -> Iterator[str]:
    """A new, migrated database (its SQLAlchemy URL), dropped on exit with whatever was written to it."""
    name = f"portal_test_{uuid.uuid4().hex[:10]}"
    asyncio.run(_execute(f'CREATE DATABASE "{name}"'))
    base = _admin_dsn().rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    url = f"{base}/{name}"
    try:
        migrate(url)
        yield url
    finally:
        asyncio.run(_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with throwaway_database() as url:
        yield url


def redis_index_of_this_process(url: str) -> str:
    """``url`` as given for a run in one process; under ``pytest -n``, with its database index
    moved up by one more than the test process's number (gw0 the next index, gw1 the one after,
    modulo Redis's 16). Each process flushes and reads only its own index, and a later run in one
    process (the serial half of `make test`) never meets a model worker left
    behind by a crashed one."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return url
    parts = urlsplit(url)
    index = int(parts.path.strip("/") or 0) + 1 + int(worker.removeprefix("gw"))
    return urlunsplit(parts._replace(path=f"/{index % 16}"))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = redis_index_of_this_process(os.environ.get("TEST_REDIS_URL", DEFAULT_REDIS_URL))
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis server of the test's own, on a free port: for tests that stop, cut or fill it."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def make_settings(database_url: str, redis_url: str, storage: Path, **overrides: object) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "secret_key": secrets.token_urlsafe(48),
        "database_url": database_url,
        "redis_url": redis_url,
        "storage_dir": storage,
        "training_data_dir": storage / "training",
        "first_admin_email": ADMIN_EMAIL,
        "first_admin_password": ADMIN_PASSWORD,
        "log_json": True,
        "reconcile_interval_seconds": 1.0,
        # Each app and API process opens its whole pool at start-up; several run side by side
        # against one server, whose max_connections is 100.
        "db_pool_size": 5,
        # The suite's admin logs in once (``admin_headers``) and the suite may outlast the
        # default 30 minutes on a slow host: its late tests would get 401.
        "access_token_expire_minutes": 240,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    s = make_settings(database_url, redis_url, tmp_path_factory.mktemp("storage"))
    asyncio.run(seed_admin(s))
    asyncio.run(seed_registry(s))
    return s


def no_password_hashes(response: httpx.Response) -> None:
    """Every response the suite sees is scanned for a password hash."""
    body = response.text
    assert "$argon2" not in body and "hashed_password" not in body, f"password hash leaked by {response.url}"


async def _scan(response: httpx.Response) -> None:
    await response.aread()
    no_password_hashes(response)


async def client_for(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30):
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", event_hooks={"response": [_scan]}, timeout=60
        ) as client:
            yield client


@pytest.fixture(scope="session")
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture(scope="session")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async for c in client_for(app):
        yield c


async def login(client: httpx.AsyncClient, email: str, password: str) -> dict[str, str]:
    r = await client.post("/v1/auth/login", data={"username": email, "password": password})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


@pytest.fixture(scope="session")
async def admin_headers(client: httpx.AsyncClient) -> dict[str, str]:
    return await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)


class Users:
    """Creates users through the API and logs them in."""

    def __init__(self, client: httpx.AsyncClient, admin_headers: dict[str, str]) -> None:
        self.client = client
        self.admin_headers = admin_headers

    async def create(self, *, role: str = "user", password: str = PASSWORD) -> tuple[dict[str, Any], dict[str, str]]:
        email = f"user-{uuid.uuid4().hex[:10]}@example.com"
        r = await self.client.post(
            "/v1/users",
            json={"email": email, "password": password, "name": "Test User", "role": role},
            headers=self.admin_headers,
        )
        assert r.status_code == 201, r.text
        return r.json(), await login(self.client, email, password)


@pytest.fixture(scope="session")
def users(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> Users:
    return Users(client, admin_headers)


@pytest.fixture(scope="session")
def worker(redis_url: str) -> Iterator[Service]:
    """One real model worker serving the registry's models against the test Redis."""
    # Named after the test process under ``pytest -n``: each writes a log of its own in test-artifacts/.
    w = start_worker(f"test-worker-{os.environ.get('PYTEST_XDIST_WORKER', '1')}", redis_url)
    try:
        wait_for_worker(redis_url, w)
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="module")
def portal(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, str]]:
    """(base URL, admin email, admin password) of a running portal: PORTAL_URL, or the real API
    started here as a subprocess on a free port, with the suite's model worker.

    One per test file: the API process collects workers' answers beside the in-process app, so
    while it runs, the answers of the in-process app's requests may be stored (and counted in
    /metrics) by it. It must not outlive the file that asked for it into the next file of its test
    process."""
    if url := os.environ.get("PORTAL_URL"):
        yield url, os.environ.get("PORTAL_ADMIN_EMAIL", "admin@example.com"), os.environ.get(
            "PORTAL_ADMIN_PASSWORD", "admin"
        )
        return
    settings: Settings = request.getfixturevalue("settings")
    request.getfixturevalue("worker")
    api, url = start_api("integration-api", settings)
    try:
        wait_until(lambda: http_ok(f"{url}/health/ready"), 60, "the API to be ready", interval=0.3)
        yield url, ADMIN_EMAIL, ADMIN_PASSWORD
    finally:
        api.stop()
