"""PostgreSQL down: 503 at once with one log line per interval, then full recovery without restart.
Runs on a private PostgreSQL cluster, never the shared one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

import pytest

from api.app.core.config import Settings
from api.app.main import create_app
from api.prestart import migrate, seed_admin
from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, client_for
from tests.support import PostgresServer


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.init()
    server.start()
    yield server
    with contextlib.suppress(Exception):
        server.stop()


async def test_postgres_outage_503_then_recovery(
    private_postgres: PostgresServer, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    private = settings.model_copy(update={"database_url": private_postgres.url})
    await asyncio.to_thread(migrate, private.database_url)
    await seed_admin(private)
    async for client in client_for(create_app(private)):
        login = {"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
        r = await client.post("/login", data=login)
        headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
        assert (await client.get("/user/", headers=headers)).status_code == 200

        caplog.set_level(logging.ERROR, logger="api.outage")
        await asyncio.to_thread(private_postgres.stop)
        answers = []
        for _ in range(15):
            start = time.perf_counter()
            r = await client.get("/user/", headers=headers)
            answers.append((r.status_code, time.perf_counter() - start, r.headers.get("retry-after")))
        assert all(code == 503 and seconds < 1.0 and retry for code, seconds, retry in answers), answers
        assert "database" in r.json()["detail"]
        ready = await client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["checks"]["postgresql"]["status"] == "fail"
        lines = [rec for rec in caplog.records if "postgresql unavailable" in rec.getMessage()]
        assert 1 <= len(lines) <= 2, [rec.getMessage() for rec in lines]

        await asyncio.to_thread(private_postgres.start)
        deadline = time.monotonic() + 20
        while (r := await client.get("/user/", headers=headers)).status_code != 200:
            assert time.monotonic() < deadline, r.text
            await asyncio.sleep(0.2)
        assert (await client.post("/login", data=login)).status_code == 200


def test_prestart_gives_up_with_a_readable_message(tmp_path: object) -> None:
    import subprocess
    import sys

    from tests.support import ROOT, free_port

    env = {
        "DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/portal",
        "DEPENDENCY_WAIT_ATTEMPTS": "2",
        "DEPENDENCY_WAIT_INTERVAL": "0.1",
        "LOG_JSON": "false",
        "PYTHONPATH": str(ROOT),
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, "-m", "api.prestart"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    attempts = [line for line in done.stderr.splitlines() if "waiting for PostgreSQL" in line]
    assert len(attempts) == 2 and "(attempt 1/2)" in attempts[0]
    assert "did not answer after 2 attempts" in done.stderr and "Traceback" not in done.stderr


async def test_the_api_starts_while_postgres_is_down_and_answers_503(
    private_postgres: PostgresServer, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening the pool at start-up must not keep the API from starting (compose may start it
    first): it starts, says how many connections it opened, answers 503 until PostgreSQL is up,
    then serves."""
    private = settings.model_copy(update={"database_url": private_postgres.url})
    await asyncio.to_thread(migrate, private.database_url)
    await seed_admin(private)
    await asyncio.to_thread(private_postgres.stop)
    caplog.set_level(logging.WARNING, logger="api.app.core.db")
    start = time.perf_counter()
    async for client in client_for(create_app(private)):
        assert time.perf_counter() - start < 10
        assert any("opened 0 of" in rec.getMessage() for rec in caplog.records)
        login = {"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
        r = await client.post("/login", data=login)
        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
        await asyncio.to_thread(private_postgres.start)
        deadline = time.monotonic() + 20
        while (r := await client.post("/login", data=login)).status_code != 200:
            assert time.monotonic() < deadline, r.text
