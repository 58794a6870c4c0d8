"""The API on a Redis that may evict keys: it refuses to start, unless ALLOW_REDIS_EVICTION says
to run anyway, and then /health/ready carries the warning. Each test has a private redis-server."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from mirakuru.exceptions import ProcessExitedWithError

from api.app.core.config import Settings
from api.app.main import create_app
from contracts.redis_policy import ALLOW_SETTING, EvictionPolicyRefused
from tests.conftest import client_for
from tests.support import ROOT, RedisServer, api_env, free_port, http_ok, service


@pytest.fixture
def evicting_redis() -> Iterator[RedisServer]:
    server = RedisServer("--maxmemory-policy", "allkeys-lru")
    server.start()
    yield server
    server.stop()


def test_the_api_process_refuses_to_start(settings: Settings, evicting_redis: RedisServer) -> None:
    port = free_port()
    env = api_env(settings, REDIS_URL=evicting_redis.url, API_PORT=str(port))
    # A name of this run's own: logs are appended to, and a port comes round again in a later run.
    name = f"evicting-api-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ProcessExitedWithError) as exited:
        service(name, [sys.executable, "-m", "api"], env, lambda: http_ok(f"http://127.0.0.1:{port}/"))
    assert exited.value.exit_code != 0
    log = (ROOT / "test-artifacts" / f"{name}.log").read_text()
    [line] = [line for line in log.splitlines() if "refusing to start" in line]
    assert "allkeys-lru" in line and f"{ALLOW_SETTING}=true" in line


def test_prestart_refuses_with_one_line(settings: Settings, evicting_redis: RedisServer) -> None:
    """``python -m api.prestart`` (run before the API in compose and by make run) stops before it
    migrates anything, with exit code 1 and one log line."""
    env = {**os.environ, **api_env(settings, REDIS_URL=evicting_redis.url, LOG_JSON="false"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "api.prestart"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert "maxmemory-policy is allkeys-lru" in done.stderr and "Set it to noeviction" in done.stderr
    assert "Traceback" not in done.stderr


async def test_its_start_up_raises_the_clear_error(settings: Settings, evicting_redis: RedisServer) -> None:
    app = create_app(settings.model_copy(update={"redis_url": evicting_redis.url}))
    with pytest.raises(EvictionPolicyRefused, match="allkeys-lru"):
        async for _ in client_for(app):
            pytest.fail("the app started")


async def _ready(client: httpx.AsyncClient) -> dict[str, Any]:
    body: dict[str, Any] = (await client.get("/health/ready")).json()
    return body


async def test_allowed_it_starts_and_readiness_carries_the_warning(
    settings: Settings, evicting_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="api.startup")
    app = create_app(settings.model_copy(update={"redis_url": evicting_redis.url, "allow_redis_eviction": True}))
    async for client in client_for(app):
        assert any("allkeys-lru" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        body = await _ready(client)
        redis_check = body["checks"]["redis"]
        assert redis_check["status"] == "ok" and redis_check["eviction_policy"] == "allkeys-lru"
        # (PostgreSQL's own warnings, autovacuum off say, may stand beside it.)
        [warning] = [w for w in body["warnings"] if "maxmemory-policy" in w or "eviction" in w.lower()]
        assert "allkeys-lru" in warning and f"{ALLOW_SETTING}=true" in warning
        # Read live: once Redis is set right, the warning is gone.
        redis.Redis.from_url(evicting_redis.url).config_set("maxmemory-policy", "noeviction")
        body = await _ready(client)
        assert body["checks"]["redis"]["eviction_policy"] == "noeviction"
        assert not [w for w in body["warnings"] if "allkeys-lru" in w], body


async def test_noeviction_is_normal_and_a_later_change_fails_readiness(
    settings: Settings, private_redis: RedisServer
) -> None:
    app = create_app(settings.model_copy(update={"redis_url": private_redis.url}))
    async for client in client_for(app):
        body = await _ready(client)
        assert body["checks"]["redis"] == {**body["checks"]["redis"], "status": "ok", "eviction_policy": "noeviction"}
        assert not [w for w in body["warnings"] if "maxmemory-policy" in w or "evict" in w.lower()], body
        assert body["checks"]["workers"]["detail"].endswith("no live model worker")  # nothing else is amiss
        # Redis reconfigured under a running API: not ready, and the answer says why.
        redis.Redis.from_url(private_redis.url).config_set("maxmemory-policy", "volatile-lru")
        r = await client.get("/health/ready")
        assert r.status_code == 503
        checks = r.json()["checks"]
        assert checks["redis"]["status"] == "fail" and "volatile-lru" in checks["redis"]["detail"]
        assert checks["workers"]["detail"] == "redis refused"
