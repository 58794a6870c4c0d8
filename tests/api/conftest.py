"""Fixtures for tests that need their own Redis server and model workers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException

from api.app.catalog import service as catalog
from api.app.core.config import Settings
from api.app.main import create_app
from api.app.predictions import service as predictions_service
from api.app.predictions.models import Job, Prediction
from api.prestart import migrate, seed_admin, seed_registry
from contracts.messages import LabelScore, PredictionStatus, ResultMessage
from tests.conftest import _admin_dsn, _execute, client_for
from tests.support import RedisServer, Service, start_worker, wait_for_worker


def done_answer(
    job_id: object, prediction_id: object, label: str = "macaw", *, model: str = "m", version: int = 1, **fields: Any
) -> ResultMessage:
    """A worker's answer to one prediction as the tests publish or store it: done, with ``label``
    first at 0.9; ``fields`` sets the rest (worker_id, timings, ...)."""
    return ResultMessage(
        job_id=str(job_id),
        prediction_id=str(prediction_id),
        model=model,
        version=version,
        status=PredictionStatus.done,
        top_k=[LabelScore(label=label, score=0.9)],
        **fields,
    )


async def stored_job(
    app: FastAPI,
    *,
    owner_id: int,
    image_id: object,
    status: str,
    model: str = "m",
    error: str | None = None,
    deadline_seconds: float = 300,
) -> tuple[Job, Prediction]:
    """A job of one prediction of ``model``@1, both in ``status``, committed as the API would
    leave it (``finished_at`` set for a final status, ``error`` on the prediction)."""
    now = datetime.now(UTC)
    final = status not in ("pending", "queued", "running")
    job = Job(
        id=uuid.uuid4(),
        owner_id=owner_id,
        image_id=uuid.UUID(str(image_id)),
        status=status,
        request_id="test",
        deadline_at=now + timedelta(seconds=deadline_seconds),
        finished_at=now if final else None,
        created_at=now,
    )
    prediction = Prediction(
        id=uuid.uuid4(), job_id=job.id, position=0, model_name=model, model_version=1, status=status, error=error
    )
    async with app.state.sessionmaker() as session:
        session.add(job)
        await session.flush()
        session.add(prediction)
        await session.commit()
    return job, prediction


async def waited(app: FastAPI, job_id: uuid.UUID, seconds: float) -> Any:
    """How a one-call prediction waiting up to ``seconds`` for ``job_id`` ends: 200 (answered), its
    HTTP error's status, or the repr of anything else raised."""
    async with app.state.read_sessionmaker() as reader:
        try:
            await predictions_service._wait_while_the_job_exists(
                reader=reader, blocking_redis=app.state.redis_blocking, job_id=job_id, seconds=seconds
            )
        except HTTPException as exc:
            return exc.status_code
        except Exception as exc:
            return repr(exc)
    return 200


@pytest.fixture
def everything_served(monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalogue says a worker serves each of these versions, with no worker running: jobs
    are admitted and wait in their queues."""

    async def availability(self: Any, *, fresh: bool = False) -> dict[str, catalog.ModelAvailability]:
        return {
            k: catalog.ModelAvailability(workers=1, num_classes=1000)
            for k in ("mobilenet_v2@1", "sketch@1", "sketch@2", "sketch@3")
        }

    monkeypatch.setattr(catalog.WorkerDirectory, "availability", availability)


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


@pytest.fixture
async def fresh_settings(settings: Settings) -> AsyncIterator[Settings]:
    """A database of its own, migrated and empty: seeding is tested from the start."""
    name = f"portal_registry_{uuid.uuid4().hex[:8]}"
    await _execute(f'CREATE DATABASE "{name}"')
    url = settings.database_url.rsplit("/", 1)[0] + f"/{name}"
    await asyncio.to_thread(migrate, url)
    try:
        yield settings.model_copy(update={"database_url": url})
    finally:
        await _execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def own_stack(
    fresh_settings: Settings, private_redis: RedisServer, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Stack]:
    """An API on a database and a Redis of its own, seeded as at start-up: the changes made here
    must not reach the registry the rest of the suite uses. Indirect parameters: more settings."""
    settings = fresh_settings.model_copy(
        update={
            "redis_url": private_redis.url,
            "max_queue_depth": 2000,
            "max_jobs_in_flight_per_user": 1000,
            "training_data_dir": tmp_path / "training",
            **getattr(request, "param", {}),
        }
    )
    await seed_admin(settings)
    await seed_registry(settings)
    app = create_app(settings)
    async for client in client_for(app):
        stack = Stack(private_redis, client, app)
        try:
            yield stack
        finally:
            for w in stack.workers:
                w.stop()


async def until(check: Any, seconds: float, what: str) -> float:
    """Seconds until ``await check()`` is true; fails after ``seconds``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await check():
        if loop.time() - start > seconds:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.1)
    return loop.time() - start


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A database of its own with no schema yet (a plain asyncpg DSN), for migrations' tests."""
    name = f"portal_migration_{uuid.uuid4().hex[:8]}"
    asyncio.run(_execute(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{_admin_dsn().rsplit('/', 1)[0]}/{name}"
    finally:
        asyncio.run(_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
