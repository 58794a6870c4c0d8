"""The API's Redis connections when more requests wait than it has connections, against a private
Redis: a waiting request that finds no connection free waits on instead of being told Redis is
down, and the background loops read on connections of their own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image

from api.app.core.config import Settings
from api.app.main import create_app
from api.app.predictions import queue, service
from api.app.predictions.models import Job, Prediction
from contracts import keys
from contracts.messages import PredictionStatus
from tests.api.conftest import done_answer, waited
from tests.conftest import Users, client_for
from tests.images import encode
from tests.support import RedisServer

CONNECTIONS = 3


@pytest.fixture
async def portal(settings: Settings, private_redis: RedisServer) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    update = {"redis_url": private_redis.url, "redis_max_connections": CONNECTIONS}
    app = create_app(settings.model_copy(update=update))
    async for client in client_for(app):
        yield app, client


async def queued_jobs(app: FastAPI, client: httpx.AsyncClient, users: Users, n: int) -> list[Prediction]:
    """``n`` jobs of one new user's upload, one queued prediction each; their predictions."""
    user, headers = await users.create()
    png = encode(Image.new("RGB", (8, 8), (3, 1, 4)), "PNG")
    image = (await client.post("/v1/images", files={"file": ("x.png", png)}, headers=headers)).json()
    now = datetime.now(UTC)
    jobs = [
        Job(
            id=uuid.uuid4(),
            owner_id=user["id"],
            image_id=uuid.UUID(image["id"]),
            status="queued",
            request_id="r",
            deadline_at=now + timedelta(minutes=1),
            created_at=now,
        )
        for _ in range(n)
    ]
    predictions = [
        Prediction(id=uuid.uuid4(), job_id=job.id, position=0, model_name="m", model_version=1, status="queued")
        for job in jobs
    ]
    async with app.state.sessionmaker() as session:
        session.add_all(jobs)
        await session.flush()
        session.add_all(predictions)
        await session.commit()
    return predictions


async def test_more_waiting_requests_than_connections_wait_their_turn(
    portal: tuple[FastAPI, httpx.AsyncClient], users: Users, settings: Settings
) -> None:
    """Three times as many requests wait as there are connections: each ends at its deadline
    (504) or with its answer, none with a Redis error (the pool was once given up on after two
    seconds, and those requests answered as if Redis were down)."""
    app, client = portal
    predictions = await queued_jobs(app, client, users, 3 * CONNECTIONS)
    assert await asyncio.gather(*(waited(app, p.job_id, 3) for p in predictions)) == [504] * len(predictions)

    waiting = [asyncio.create_task(waited(app, p.job_id, 20)) for p in predictions]
    await asyncio.sleep(0.5)
    # Every job answered while most of the requests still wait for a connection.
    await queue.notify_done(app.state.redis, {str(p.job_id): b"[]" for p in predictions}, ttl=60)
    started = asyncio.get_running_loop().time()
    assert await asyncio.gather(*waiting) == [200] * len(predictions)
    # The last in line had a connection once two rounds of waits (at most GONE_CHECK_SECONDS each) ended.
    assert asyncio.get_running_loop().time() - started < 2 * service.GONE_CHECK_SECONDS + 1.5


async def blocked_in_redis(app: FastAPI, n: int, within: float = 10) -> None:
    """Until ``n`` clients wait in a BLPOP of a ``held:*`` key."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while True:
        clients = await app.state.redis.client_list()
        if sum(c["cmd"] == "blpop" and c.get("flags") == "b" for c in clients) >= n:
            return
        assert loop.time() < end, clients
        await asyncio.sleep(0.05)


async def test_answers_are_collected_while_requests_hold_every_connection(
    portal: tuple[FastAPI, httpx.AsyncClient], users: Users
) -> None:
    """Requests waiting on all of the API's blocking connections do not hold up the result
    collector: a worker's answer is stored at once, on the background loops' own connections."""
    app, client = portal
    [prediction] = await queued_jobs(app, client, users, 1)
    held = [asyncio.create_task(app.state.redis_blocking.blpop([f"held:{n}"], timeout=8)) for n in range(CONNECTIONS)]
    await blocked_in_redis(app, CONNECTIONS)
    answer = done_answer(prediction.job_id, prediction.id, "kite")
    await app.state.redis.xadd(keys.RESULT_STREAM, answer.to_fields())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 4
    status = None
    while loop.time() < deadline:
        async with app.state.read_sessionmaker() as reader:
            status = (await reader.get(Prediction, prediction.id, populate_existing=True)).status
        if status == PredictionStatus.done.value:
            break
        await asyncio.sleep(0.1)
    assert status == PredictionStatus.done.value
    assert not any(task.done() for task in held)  # the connections were held throughout
    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)
