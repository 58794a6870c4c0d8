"""The stream helpers the worker and the API share, each twin against the test Redis."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from typing import cast

import pytest
import redis
import redis.asyncio
import redis.exceptions

from contracts import streams
from tests.support import streams_read

GROUP = "g"


def fresh_stream() -> str:
    return f"test-stream:{uuid.uuid4().hex}"


def test_a_group_sees_the_entries_added_before_it_and_creating_it_twice_is_harmless(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    stream = fresh_stream()
    early = client.xadd(stream, {"n": "1"})
    streams.ensure_group(client, stream, GROUP)
    streams.ensure_group(client, stream, GROUP)
    ((_, entries),) = streams_read(client.xreadgroup(GROUP, "c", {stream: ">"}))
    assert [entry_id for entry_id, _fields in entries] == [early]
    assert [g["name"] for g in client.xinfo_groups(stream)] == [GROUP.encode()]


def test_a_group_on_a_missing_stream_creates_the_stream(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    stream = fresh_stream()
    streams.ensure_group(client, stream, GROUP)
    assert client.xlen(stream) == 0 and client.xinfo_groups(stream)[0]["pending"] == 0


def test_other_refusals_than_an_existing_group_are_raised(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = fresh_stream()
    client.set(key, "not a stream")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        streams.ensure_group(client, key, GROUP)


async def test_the_async_twin_creates_a_group_once_and_raises_other_refusals(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    stream = fresh_stream()
    early = await client.xadd(stream, {"n": "1"})
    await streams.ensure_group_async(client, stream, GROUP)
    await streams.ensure_group_async(client, stream, GROUP)
    ((_, entries),) = streams_read(await client.xreadgroup(GROUP, "c", {stream: ">"}))
    assert [entry_id for entry_id, _fields in entries] == [early]
    key = fresh_stream()
    await client.set(key, "not a stream")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        await streams.ensure_group_async(client, key, GROUP)
    await client.aclose()


def delivered_three_times(client: redis.Redis, stream: str) -> tuple[bytes, bytes]:
    """A stream with two entries: the first delivered three times (claimed twice), the second once."""
    streams.ensure_group(client, stream, GROUP)
    first = cast(bytes, client.xadd(stream, {"n": "1"}))
    second = cast(bytes, client.xadd(stream, {"n": "2"}))
    client.xreadgroup(GROUP, "c1", {stream: ">"})
    client.xclaim(stream, GROUP, "c2", min_idle_time=0, message_ids=[first])
    client.xclaim(stream, GROUP, "c3", min_idle_time=0, message_ids=[first])
    return first, second


def test_times_delivered_counts_each_delivery_of_a_pending_entry(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    stream = fresh_stream()
    first, second = delivered_three_times(client, stream)
    assert streams.times_delivered(client, stream, GROUP, first) == 3
    assert streams.times_delivered(client, stream, GROUP, second) == 1
    client.xack(stream, GROUP, first)
    assert streams.times_delivered(client, stream, GROUP, first) == 1  # no longer pending


async def test_the_async_twin_counts_deliveries_alike(redis_url: str) -> None:
    stream = fresh_stream()
    first, second = delivered_three_times(redis.Redis.from_url(redis_url), stream)
    client = redis.asyncio.Redis.from_url(redis_url)
    assert await streams.times_delivered_async(client, stream, GROUP, first) == 3
    assert await streams.times_delivered_async(client, stream, GROUP, second) == 1
    await client.aclose()


def test_a_lost_group_is_told_from_other_refusals(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    stream = fresh_stream()
    client.xadd(stream, {"n": "1"})
    with pytest.raises(redis.exceptions.ResponseError) as lost:
        client.xreadgroup(GROUP, "c", {stream: ">"})
    assert streams.group_missing(lost.value)
    client.delete(stream)
    client.set(stream, "not a stream")
    with pytest.raises(redis.exceptions.ResponseError) as wrong:
        client.xreadgroup(GROUP, "c", {stream: ">"})
    assert not streams.group_missing(wrong.value)


def test_a_stream_deleted_under_a_waiting_read_is_a_lost_group(redis_url: str) -> None:
    """A collector blocked in XREADGROUP when Redis lost its data (FLUSHDB) is told UNBLOCKED:
    it creates the group again, as for NOGROUP, rather than logging a traceback."""
    client = redis.Redis.from_url(redis_url)
    stream = fresh_stream()
    streams.ensure_group(client, stream, GROUP)
    deleter = threading.Timer(0.3, lambda: redis.Redis.from_url(redis_url).delete(stream))
    deleter.start()
    try:
        with pytest.raises(redis.exceptions.ResponseError) as unblocked:
            client.xreadgroup(GROUP, "c", {stream: ">"}, block=5000)
    finally:
        deleter.join()
    assert "UNBLOCKED" in str(unblocked.value) and streams.group_missing(unblocked.value)


def test_redis_out_of_reach_is_one_of_the_redis_errors_and_a_refused_command_is_not(redis_url: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        with pytest.raises(streams.REDIS_ERRORS):
            client.ping()
    with pytest.raises(redis.exceptions.ResponseError) as refused:
        redis.Redis.from_url(redis_url).execute_command("NO-SUCH-COMMAND")
    assert not isinstance(refused.value, streams.REDIS_ERRORS)


def _consumers(client: redis.Redis, stream: str) -> dict[str, int]:
    return {c["name"].decode(): c["pending"] for c in client.xinfo_consumers(stream, GROUP)}


def _group_with_a_stopped_a_holding_and_a_reading_consumer(client: redis.Redis) -> str:
    """``stopped`` read and acknowledged, ``holding`` holds an entry, both 300 ms ago; ``reading``
    reads just now."""
    stream = fresh_stream()
    streams.ensure_group(client, stream, GROUP)
    done = client.xadd(stream, {"n": "1"})
    client.xreadgroup(GROUP, "stopped", {stream: ">"})
    client.xack(stream, GROUP, done)
    client.xadd(stream, {"n": "2"})
    client.xreadgroup(GROUP, "holding", {stream: ">"})
    time.sleep(0.3)
    client.xadd(stream, {"n": "3"})
    client.xreadgroup(GROUP, "reading", {stream: ">"})
    return stream


def test_idle_consumers_holding_nothing_are_forgotten_and_no_other(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    stream = _group_with_a_stopped_a_holding_and_a_reading_consumer(client)
    assert streams.forget_idle_consumers(client, stream, GROUP, 200) == 1
    # The idle one holding an entry stays (deleting it would drop the entry), as does the reader.
    assert _consumers(client, stream) == {"holding": 1, "reading": 1}
    assert client.xpending(stream, GROUP)["pending"] == 2
    # A forgotten consumer that reads again is simply made anew.
    client.xadd(stream, {"n": "4"})
    assert streams_read(client.xreadgroup(GROUP, "stopped", {stream: ">"}))
    assert _consumers(client, stream)["stopped"] == 1
    assert streams.forget_idle_consumers(client, fresh_stream(), GROUP, 0) == 0
    assert streams.forget_idle_consumers(client, stream, "no-such-group", 0) == 0


async def test_the_async_twin_forgets_alike(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    stream = _group_with_a_stopped_a_holding_and_a_reading_consumer(client)
    aclient = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await streams.forget_idle_consumers_async(aclient, stream, GROUP, 200) == 1
        assert await streams.forget_idle_consumers_async(aclient, fresh_stream(), GROUP, 0) == 0
    finally:
        await aclient.aclose()
    assert _consumers(client, stream) == {"holding": 1, "reading": 1}
