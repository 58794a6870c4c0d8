"""Fixtures for tests that need their own Redis server and model workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI

from api.app.core.config import Settings
from api.app.main import create_app
from tests.conftest import client_for
from tests.support import RedisServer, Service, start_worker, wait_for_worker


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


class Stack:
    def __init__(self, redis_server: RedisServer, client: httpx.AsyncClient, app: FastAPI) -> None:
        self.redis_server = redis_server
        self.client = client
        self.app = app
        self.workers: list[Service] = []

    async def start_workers(self, count: int, **extra: str) -> None:
        started = [
            start_worker(f"resilience-{len(self.workers) + i}-{time.monotonic_ns()}", self.redis_server.url, **extra)
            for i in range(count)
        ]
        self.workers.extend(started)
        for w in started:
            await asyncio.to_thread(wait_for_worker, self.redis_server.url, w)


@pytest.fixture
async def stack(private_redis: RedisServer, settings: Settings) -> AsyncIterator[Stack]:
    private = settings.model_copy(
        update={"redis_url": private_redis.url, "max_queue_depth": 120, "max_jobs_in_flight_per_user": 1000}
    )
    app = create_app(private)
    async for client in client_for(app):
        s = Stack(private_redis, client, app)
        try:
            yield s
        finally:
            for w in s.workers:
                w.stop()
