"""Requests whose statements go to the driver (core/driver.py) under cancellations, an exhausted
pool, terminated backends, and with the detached user it loads. No model worker: every model is said to be served (jobs wait queued).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import delete

from api.app.core.config import Settings
from api.app.images.storage import LocalBlobStore
from api.app.main import create_app
from api.app.predictions.models import UNFINISHED_JOB, Job
from tests.conftest import PASSWORD, Users, client_for, login
from tests.images import noise_png
from tests.support import RedisServer, blob_lock, waiting_on_lock

pytestmark = pytest.mark.usefixtures("everything_served")

MODEL = "mobilenet_v2@1"
THIS_PROCESS = f"portal-api:{os.getpid()}:%"
"""The application names of this process's apps' connections: never those of an API the suite runs
as a subprocess on the same database (the black-box portal), which the tests here must not cut."""


def dsn(settings: Settings) -> str:
    return settings.database_url.replace("postgresql+asyncpg://", "postgresql://")


@pytest.fixture
async def small(
    settings: Settings, private_redis: RedisServer, app: FastAPI
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app whose pool holds 2 connections, on a Redis of its own (its queues never fill)."""
    session_app = app
    app = create_app(
        settings.model_copy(
            update={
                "db_pool_size": 2,
                "db_max_overflow": 0,
                "predict_deadline_seconds": 2.0,
                "max_jobs_in_flight_per_user": 100000,
                "max_queue_depth": 100000,
                "redis_url": private_redis.url,
            }
        )
    )
    started = datetime.now(UTC)
    try:
        async for c in client_for(app):
            yield app, c
    finally:
        # The tests end backends by application name, the shared app's too: its pools start anew.
        await session_app.state.engine.dispose()
        await session_app.state.background_engine.dispose()
        # No worker answers these jobs: left unfinished, a later app with a Redis of its own would
        # queue them all again (its reconciler re-enqueues what PostgreSQL has unfinished).
        async with session_app.state.sessionmaker() as session:
            await session.execute(delete(Job).where(Job.created_at >= started, UNFINISHED_JOB))
            await session.commit()


async def idle_in_transaction(settings: Settings) -> list[Any]:
    """The app's connections idle in a transaction open for 0.5 s or more. A younger one is a
    background loop (the gauges, the result collector) between its query and its rollback."""
    conn = await asyncpg.connect(dsn(settings))
    try:
        return await conn.fetch(
            "SELECT pid, application_name, state, query FROM pg_stat_activity"
            " WHERE datname = current_database() AND state LIKE 'idle in transaction%'"
            " AND application_name LIKE $1 AND xact_start < now() - interval '500 milliseconds'",
            THIS_PROCESS,
        )
    finally:
        await conn.close()


async def pool_whole(app: FastAPI, settings: Settings) -> None:
    """Once the requests are over: none of the app's connections is left in a transaction, and
    every one is back in its pool."""
    await asyncio.sleep(1)
    assert await idle_in_transaction(settings) == []
    assert app.state.engine.pool.checkedout() == 0, app.state.engine.pool.status()


async def serves(app: FastAPI, client: httpx.AsyncClient, headers: dict[str, str], image_id: str, n: int = 25) -> None:
    """``n`` requests in a row, each with a user lookup on the driver, half with a prediction."""
    for i in range(n):
        if i % 2:
            r = await client.get("/v1/users/me", headers=headers)
            assert r.status_code == 200, (i, r.status_code, r.text)
        else:
            r = await client.post("/v1/predictions", json={"image_id": image_id, "models": [MODEL]}, headers=headers)
            assert r.status_code == 202, (i, r.status_code, r.text)


async def owner_lock(settings: Settings, user_id: int) -> tuple[asyncpg.Connection, Any]:
    conn = await asyncpg.connect(dsn(settings))
    tx = conn.transaction()
    await tx.start()
    await conn.execute("SELECT id FROM users WHERE id = $1 FOR UPDATE", user_id)  # a delete in progress
    return conn, tx


async def test_cancelled_predictions_waiting_on_the_owner_lock_leave_the_pool_whole(
    small: tuple[FastAPI, httpx.AsyncClient], users: Users, settings: Settings
) -> None:
    app, client = small
    user, headers = await users.create()
    r = await client.post("/v1/images", files={"file": ("a.png", noise_png(101, 24))}, headers=headers)
    assert r.status_code == 201, r.text
    image_id = r.json()["id"]
    for _round in range(3):
        conn, tx = await owner_lock(settings, user["id"])
        try:
            tasks = [
                asyncio.create_task(
                    client.post("/v1/predictions", json={"image_id": image_id, "models": [MODEL]}, headers=headers)
                )
                for _ in range(2)
            ]
            await waiting_on_lock(settings, 2)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await tx.rollback()
            await conn.close()
    await pool_whole(app, settings)
    await serves(app, client, headers, image_id)


async def test_cancelled_uploads_waiting_on_the_blob_lock_store_nothing_and_leave_the_pool_whole(
    small: tuple[FastAPI, httpx.AsyncClient], users: Users, settings: Settings
) -> None:
    app, client = small
    _, headers = await users.create()
    data = noise_png(102, 24)
    sha = hashlib.sha256(data).hexdigest()
    conn, tx = await blob_lock(settings, sha)
    try:
        tasks = [
            asyncio.create_task(
                client.post(
                    "/model/predict", files={"file": ("n.png", data)}, params={"models": MODEL}, headers=headers
                )
            )
            for _ in range(2)
        ]
        await waiting_on_lock(settings, 2)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await tx.rollback()
        await conn.close()
    await pool_whole(app, settings)
    assert not list(settings.storage_dir.rglob(f"{sha}*"))
    assert (await client.get("/v1/images", headers=headers)).json()["data"] == []
    r = await client.post("/v1/images", files={"file": ("a.png", noise_png(103, 24))}, headers=headers)
    await serves(app, client, headers, r.json()["id"])


async def test_a_level_triggered_cancellation_while_waiting_on_a_lock_leaves_the_pool_whole(
    small: tuple[FastAPI, httpx.AsyncClient], users: Users, settings: Settings
) -> None:
    """anyio's cancel scopes (a timeout around a request) cancel every await until the scope
    exits, the rollback on the way out included."""
    app, client = small
    user, headers = await users.create()
    r = await client.post("/v1/images", files={"file": ("a.png", noise_png(104, 24))}, headers=headers)
    image_id = r.json()["id"]
    conn, tx = await owner_lock(settings, user["id"])
    try:

        async def timed() -> None:
            with anyio.move_on_after(1.0):
                await client.post("/v1/predictions", json={"image_id": image_id, "models": [MODEL]}, headers=headers)

        await asyncio.gather(timed(), timed())
    finally:
        await tx.rollback()
        await conn.close()
    await pool_whole(app, settings)
    await serves(app, client, headers, image_id)


async def test_many_concurrent_predictions_on_a_small_pool_are_accepted_or_503(
    small: tuple[FastAPI, httpx.AsyncClient], users: Users, settings: Settings
) -> None:
    app, client = small
    _, headers = await users.create()
    r = await client.post("/v1/images", files={"file": ("a.png", noise_png(105, 24))}, headers=headers)
    image_id = r.json()["id"]

    async def one(i: int) -> int:
        if i % 3 == 0:
            r = await client.post(
                "/model/predict",
                files={"file": ("n.png", noise_png(2000 + i, 24))},
                params={"models": MODEL},
                headers=headers,
            )
        else:
            r = await client.post("/v1/predictions", json={"image_id": image_id, "models": [MODEL]}, headers=headers)
        if r.status_code == 503:
            assert r.headers.get("retry-after"), r.text
        return r.status_code

    codes = await asyncio.gather(*(one(i) for i in range(60)))
    # 504: /model/predict waited its 2 s for a worker that never comes.
    assert set(codes) <= {202, 503, 504}, codes
    await asyncio.sleep(1)
    assert await idle_in_transaction(settings) == []
    await serves(app, client, headers, image_id)


async def test_terminated_backends_mid_load_are_503_then_recovered(
    small: tuple[FastAPI, httpx.AsyncClient], users: Users, settings: Settings
) -> None:
    app, client = small
    _, headers = await users.create()
    r = await client.post("/v1/images", files={"file": ("a.png", noise_png(106, 24))}, headers=headers)
    image_id = r.json()["id"]
    codes: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            if i % 2:
                r = await client.get("/v1/users/me", headers=headers)
            else:
                r = await client.post(
                    "/v1/predictions", json={"image_id": image_id, "models": [MODEL]}, headers=headers
                )
            codes.append(r.status_code)

    loaders = [asyncio.create_task(load()) for _ in range(6)]
    conn = await asyncpg.connect(dsn(settings))
    try:
        for _ in range(10):
            await asyncio.sleep(0.15)
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name LIKE $1"
                " AND pid <> pg_backend_pid()",
                THIS_PROCESS,
            )
    finally:
        await conn.close()
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*loaders)
    assert set(codes) <= {200, 202, 503}, sorted(set(codes))
    await asyncio.sleep(0.5)
    await serves(app, client, headers, image_id)


async def test_password_change_and_deactivation_right_after_login(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str]
) -> None:
    user, headers = await users.create()
    new = "another-good-password-1"
    r = await client.patch(
        "/v1/users/me/password", json={"current_password": PASSWORD, "new_password": new}, headers=headers
    )
    assert r.status_code == 204, r.text
    assert (await client.get("/v1/users/me", headers=headers)).status_code == 401
    # A login right after the change (in the same second, as a rule) begins a valid session.
    fresh = await login(client, user["email"], new)
    assert (await client.get("/v1/users/me", headers=fresh)).status_code == 200
    # Twice in a row on the same (fresh) token: the second sees the first's change.
    r = await client.patch(
        "/v1/users/me/password", json={"current_password": new, "new_password": PASSWORD + "x"}, headers=fresh
    )
    assert r.status_code == 204, r.text
    again = await login(client, user["email"], PASSWORD + "x")
    r = await client.patch(f"/v1/users/{user['id']}", json={"is_active": False}, headers=admin_headers)
    assert r.status_code == 200, r.text
    assert (await client.get("/v1/users/me", headers=again)).status_code == 401
    r = await client.patch(
        "/v1/users/me/password", json={"current_password": PASSWORD + "x", "new_password": new}, headers=again
    )
    assert r.status_code == 401, r.text


async def test_an_exhausted_pool_is_503_with_retry_after_then_recovers(
    small: tuple[FastAPI, httpx.AsyncClient], users: Users, settings: Settings
) -> None:
    app, client = small
    _, headers = await users.create()
    r = await client.post("/v1/images", files={"file": ("a.png", noise_png(107, 24))}, headers=headers)
    image_id = r.json()["id"]
    held = [await app.state.engine.raw_connection() for _ in range(2)]
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        r = await client.get("/v1/users/me", headers=headers)
        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
        assert loop.time() - start < 7
    finally:
        for c in held:
            c.close()
    await serves(app, client, headers, image_id)


async def test_an_upload_whose_transaction_is_lost_after_its_blob_was_written_leaves_no_blob(
    small: tuple[FastAPI, httpx.AsyncClient], users: Users, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blob is written inside the admission transaction, before the rows: when the
    transaction then fails (here its backend is terminated, as by a failover), the request is
    refused (503) and must store nothing."""
    _, client = small
    _, headers = await users.create()
    data = noise_png(108, 24)
    sha = hashlib.sha256(data).hexdigest()
    written = asyncio.Event()
    loop = asyncio.get_running_loop()
    original = LocalBlobStore._put_with_preview

    def slow_put(self: LocalBlobStore, sha256: str, blob: bytes, preview: bytes | None) -> None:
        original(self, sha256, blob, preview)
        loop.call_soon_threadsafe(written.set)
        time.sleep(0.5)

    monkeypatch.setattr(LocalBlobStore, "_put_with_preview", slow_put)
    predicting = asyncio.create_task(
        client.post("/model/predict", files={"file": ("n.png", data)}, params={"models": MODEL}, headers=headers)
    )
    await written.wait()
    conn = await asyncpg.connect(dsn(settings))
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE $1 AND state LIKE 'idle in transaction%'",
            THIS_PROCESS,
        )
    finally:
        await conn.close()
    r = await predicting
    assert r.status_code == 503, r.text
    assert (await client.get("/v1/images", headers=headers)).json()["data"] == []
    assert not list(settings.storage_dir.rglob(f"{sha}*"))
