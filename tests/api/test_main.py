"""``python -m api``: the served process itself."""

from __future__ import annotations

import gc
import http.client
import time
import uuid
from urllib.parse import urlsplit

import httpx
from asgi_lifespan import LifespanManager

from api.app.core.config import Settings
from api.app.main import create_app
from tests.support import RedisServer, start_api


def test_an_idle_connection_outlives_a_clients_pause(settings: Settings) -> None:
    """A client pausing a few seconds between requests (Locust's users pause 1-5 s) reuses its
    connection: the server must not have closed it meanwhile (uvicorn's own default is 5 s)."""
    api, url = start_api("keep-alive", settings)
    try:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
        conn.request("GET", "/health/live")
        first = conn.getresponse()
        first.read()
        assert first.status == 200
        sock = conn.sock
        time.sleep(6.5)
        conn.request("GET", "/health/live")
        second = conn.getresponse()
        second.read()
        assert second.status == 200
        assert conn.sock is sock, "the connection was reopened"
    finally:
        api.stop()


def _failed_logins_from_rotating_addresses(url: str, count: int) -> list[int]:
    codes = []
    with httpx.Client(base_url=url, timeout=10) as client:
        for i in range(count):
            form = {"username": f"probe-{i}-{uuid.uuid4().hex[:6]}@example.com", "password": "whatever-pass"}
            codes.append(client.post("/login", data=form, headers={"X-Forwarded-For": f"10.1.{i}.7"}).status_code)
    return codes


def test_x_forwarded_for_counts_only_from_a_trusted_proxy(settings: Settings, private_redis: RedisServer) -> None:
    """By default no proxy is trusted: a local client rotating X-Forwarded-For is still one client
    (20 failures, then 429). From a proxy named in TRUSTED_PROXIES the header is the client. (A
    Redis of its own: the counts must not throttle the suite's other logins from 127.0.0.1.)"""
    api, url = start_api("untrusted", settings, REDIS_URL=private_redis.url)
    try:
        codes = _failed_logins_from_rotating_addresses(url, 21)
    finally:
        api.stop()
    assert codes == [401] * 20 + [429]
    api, url = start_api("trusted", settings, REDIS_URL=private_redis.url, TRUSTED_PROXIES="127.0.0.1")
    try:
        codes = _failed_logins_from_rotating_addresses(url, 21)
    finally:
        api.stop()
    assert codes == [401] * 21


async def test_an_app_stopping_leaves_the_start_up_of_another_running_one_frozen(settings: Settings) -> None:
    """Several apps run in one process (the suite's own and a test's): the one that stops first
    must not unfreeze what the other froze, which then stays in every full collection."""
    baseline = gc.get_freeze_count()
    async with LifespanManager(create_app(settings), startup_timeout=30, shutdown_timeout=30):
        frozen = gc.get_freeze_count()
        assert frozen > baseline
        async with LifespanManager(create_app(settings), startup_timeout=30, shutdown_timeout=30):
            pass
        assert gc.get_freeze_count() >= frozen
    if baseline == 0:  # no other app running: the last one to stop unfroze everything
        assert gc.get_freeze_count() == 0
