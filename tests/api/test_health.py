"""Readiness follows Redis and the workers; a request id follows a job into the worker's logs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from api.app.core.config import Settings
from api.app.main import create_app
from api.prestart import migrate
from tests.api.conftest import Stack
from tests.api.test_predictions import noise_png
from tests.conftest import Users, client_for
from tests.support import PostgresServer, RedisServer


async def _ready(client: httpx.AsyncClient, expected: int, within: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        r = await client.get("/health/ready")
        if r.status_code == expected:
            return r.json()
        assert time.monotonic() < deadline, r.text
        await asyncio.sleep(0.2)


async def test_ready_follows_redis_and_workers(stack: Stack) -> None:
    live = await stack.client.get("/health/live")
    assert live.status_code == 200
    body = await _ready(stack.client, 503)  # no worker yet
    assert "no live model worker" in body["checks"]["workers"]["detail"]
    await stack.start_workers(1)
    body = await _ready(stack.client, 200)
    assert all(c["status"] == "ok" and c["latency_ms"] >= 0 for c in body["checks"].values())

    stack.redis_server.stop()
    body = await _ready(stack.client, 503)
    assert body["checks"]["redis"]["status"] == "fail"
    assert (await stack.client.get("/health/live")).status_code == 200
    stack.redis_server.start()
    await _ready(stack.client, 200)  # the worker reconnects and announces itself again

    stack.workers[0].stop()  # the last worker
    await _ready(stack.client, 503)
    await stack.start_workers(1)
    await _ready(stack.client, 200)


async def test_request_id_reaches_the_worker_log(stack: Stack, users: Users, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="api.request")
    await stack.start_workers(1)
    _, headers = await users.create()
    request_id = f"trace-{uuid.uuid4().hex[:12]}"
    r = await stack.client.post(
        "/model/predict",
        params={"models": "sketch@1"},
        files={"file": ("n.png", noise_png())},
        headers={**headers, "X-Request-ID": request_id},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == request_id, r.text
    # The API's own time covers the whole wait, so it is at least the worker's time for the job.
    spent = float(r.headers["server-timing"].removeprefix("app;dur="))
    assert spent >= r.json()["results"]["sketch@1"]["timings"]["total_ms"] > 0
    lines = [json.loads(line) for line in stack.workers[0].log().splitlines() if line.startswith("{")]
    answered = [line for line in lines if request_id in line.get("request_id", "")]
    assert answered and answered[0]["service"] == "model" and "answered" in answered[0]["message"]
    assert headers["Authorization"][7:] not in stack.workers[0].log()
    api_lines = [r for r in caplog.records if getattr(r, "request_id", "") == request_id]
    assert any("POST /model/predict 200" in r.getMessage() for r in api_lines)
    assert all(headers["Authorization"][7:] not in r.getMessage() for r in caplog.records)


async def test_ready_warns_while_autovacuum_is_off(settings: Settings) -> None:
    server = PostgresServer()
    server.init()
    server.start()
    # A Redis of its own too: this API's registry must not reach the suite's workers.
    redis_server = RedisServer()
    redis_server.start()
    try:
        private = settings.model_copy(update={"database_url": server.url, "redis_url": redis_server.url})
        await asyncio.to_thread(migrate, private.database_url)
        conn = await asyncpg.connect(server.url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            async for client in client_for(create_app(private)):
                body = (await client.get("/health/ready")).json()
                assert body["checks"]["postgresql"]["status"] == "ok", body
                assert not [w for w in body["warnings"] if "autovacuum" in w], body
                await conn.execute("ALTER SYSTEM SET autovacuum = off")
                await conn.execute("SELECT pg_reload_conf()")
                await asyncio.sleep(0.5)
                body = (await client.get("/health/ready")).json()
                assert body["checks"]["postgresql"]["status"] == "ok", body
                assert any("autovacuum is off" in w for w in body["warnings"]), body
        finally:
            await conn.close()
    finally:
        redis_server.stop()
        server.stop()
