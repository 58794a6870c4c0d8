"""The API's side of the job queue against a private Redis: how often admission asks for a depth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from api.app.predictions import queue
from contracts import keys
from tests.support import RedisServer

STREAM = keys.job_stream("sketch", 1)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis(server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(server.url)
    await client.flushall()
    await client.config_resetstat()
    try:
        yield client
    finally:
        await client.aclose()


async def xlen_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_xlen", {}).get("calls", 0))


async def fill(redis: Redis, jobs: int) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for _ in range(jobs):
            pipe.xadd(STREAM, {"meta": b"{}"})
        await pipe.execute()


async def test_a_queue_far_from_its_cap_is_not_asked_again_within_a_tenth_of_a_second(redis: Redis) -> None:
    await fill(redis, 10)
    # Cap 40: a reading of 10 is trusted for this process's next admissions up to half the cap.
    assert all([await queue.has_room(redis, "sketch", 1, 40) for _ in range(10)])
    assert await xlen_calls(redis) == 1
    # The 11th would make 21, over half the cap: read afresh (and still room).
    assert await queue.has_room(redis, "sketch", 1, 40)
    assert await xlen_calls(redis) == 2
    await asyncio.sleep(queue.DEPTH_READING_SECONDS)
    await fill(redis, 30)
    # An old reading is never trusted: the queue is now full (40), and says so.
    assert not await queue.has_room(redis, "sketch", 1, 40)
    assert await xlen_calls(redis) == 3


async def test_a_full_queue_is_only_reported_from_a_fresh_reading(redis: Redis) -> None:
    await fill(redis, 3)
    assert not await queue.has_room(redis, "sketch", 1, 3)
    await redis.delete(STREAM)
    # Full a moment ago, empty now: asked again at once, not refused from the last reading.
    assert await queue.has_room(redis, "sketch", 1, 3)
    assert await xlen_calls(redis) == 2
    # A cap of 0 or 1 is never under half: every admission asks.
    assert not await queue.has_room(redis, "sketch", 1, 0)
    assert await queue.has_room(redis, "sketch", 1, 1)
    assert await queue.has_room(redis, "sketch", 1, 1)
    assert await xlen_calls(redis) == 5


async def test_each_client_keeps_its_own_readings(server: RedisServer, redis: Redis) -> None:
    assert await queue.has_room(redis, "sketch", 1, 100)
    other = Redis.from_url(server.url)
    try:
        assert await queue.has_room(other, "sketch", 1, 100)
    finally:
        await other.aclose()
    assert await xlen_calls(redis) == 2


async def test_admissions_made_at_the_same_moment_all_count(redis: Redis) -> None:
    # 50 requests at once all read an empty queue (as when each asked Redis); each is counted
    # against the reading, so the next one asks again and finds the queue full.
    admitted = await asyncio.gather(*(queue.has_room(redis, "sketch", 1, 40) for _ in range(50)))
    assert all(admitted)
    await fill(redis, 50)
    assert not await queue.has_room(redis, "sketch", 1, 40)
