"""Finding the live workers: through the index of announced workers, whatever else Redis holds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from api.app.catalog.service import LOAD_FAILED, NOT_INSTALLED, NOT_TRAINED, WorkerDirectory
from api.app.core.config import Settings
from contracts import keys, workers
from contracts.messages import BEING_TRAINED, FAILED_TO_LOAD, NOT_TRAINED_YET, Heartbeat, ModelState, being_trained
from tests.support import RedisServer


@pytest.fixture
async def private_redis() -> AsyncIterator[Redis]:
    server = RedisServer()
    server.start()
    client = Redis.from_url(server.url)
    try:
        yield client
    finally:
        await client.aclose()
        server.stop()


async def _announce(
    client: Redis,
    worker_id: str,
    *,
    ttl_ms: int = 60_000,
    at: float | None = None,
    models: list[ModelState] | None = None,
) -> None:
    beat = Heartbeat(
        worker_id=worker_id,
        pid=1,
        hostname="host",
        started_at=time.time(),
        models=models or [ModelState(name="mobilenet_v2", version=1, ready=True, num_classes=1000)],
    )
    async with client.pipeline(transaction=False) as pipe:
        workers.announce(
            pipe, worker_id=worker_id, heartbeat_json=beat.model_dump_json(), ttl_ms=ttl_ms, now=at or time.time()
        )
        await pipe.execute()


async def _calls(client: Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def test_live_workers_are_found_without_scanning_the_keyspace(private_redis: Redis) -> None:
    client = private_redis
    # What a busy hour leaves behind: every job's keys, alive for an hour.
    async with client.pipeline(transaction=False) as pipe:
        for i in range(20_000):
            pipe.set(keys.job_done_key(f"job-{i}"), b"1", ex=3600)
        await pipe.execute()
    await _announce(client, "alive")
    await _announce(client, "crashed", ttl_ms=1)  # its heartbeat expires, its entry stays a while
    # The round trips up to the lookup below can take less than that millisecond.
    await asyncio.sleep(0.01)
    assert not await client.exists(keys.heartbeat_key("crashed"))
    await _announce(client, "long-gone", at=time.time() - workers.FORGET_AFTER_S - 1)
    await client.delete(keys.heartbeat_key("long-gone"))
    await client.config_resetstat()

    directory = WorkerDirectory(client)
    beats = await directory.heartbeats(fresh=True)
    availability = await directory.availability(fresh=True)

    assert [b.worker_id for b in beats] == ["alive"]
    assert availability["mobilenet_v2@1"].workers == 1
    calls = await _calls(client)
    assert "scan" not in calls and "keys" not in calls, calls
    assert sum(calls.values()) <= 10, calls  # two lookups of three commands, not a SCAN per 200 keys
    # Forgotten entries are dropped as they are read; recent ones stay until forgotten.
    assert await client.zrange(workers.LIVE_WORKERS, 0, -1) == [b"alive", b"crashed"]
    assert 0 < await client.ttl(workers.LIVE_WORKERS) <= workers.FORGET_AFTER_S


async def test_a_version_not_trained_yet_is_told_apart_from_a_missing_one(private_redis: Redis) -> None:
    """Users read that a version is not trained yet when every worker says so (the
    workers load it once training writes its file), that it failed to load when a worker found
    files it could not load, and that it is not installed otherwise; the workers' paths and errors
    stay for admins."""
    untrained = f"{NOT_TRAINED_YET}: /srv/trained/sketch/v3/model.keras not found (python -m model.prepare trains it)"
    await _announce(
        private_redis,
        "a",
        models=[
            ModelState(name="sketch", version=3, ready=False, reason=untrained),
            ModelState(name="resnet50", version=1, ready=False, reason=f"{NOT_TRAINED_YET}: /a not found"),
            ModelState(name="mobilenet_v2", version=1, ready=False, reason=f"{NOT_TRAINED_YET}: /m not found"),
        ],
    )
    await _announce(
        private_redis,
        "b",
        models=[
            ModelState(name="resnet50", version=1, ready=False, reason="model file /srv/r.h5 not found"),
            ModelState(name="mobilenet_v2", version=1, ready=False, reason=f"{FAILED_TO_LOAD}: bad magic in /m.h5"),
        ],
    )
    availability = await WorkerDirectory(private_redis).availability(fresh=True)
    assert availability["sketch@3"].public_reason() == NOT_TRAINED
    assert availability["resnet50@1"].public_reason() == NOT_INSTALLED
    assert availability["mobilenet_v2@1"].public_reason() == LOAD_FAILED
    assert "bad magic in /m.h5" in (availability["mobilenet_v2@1"].reason() or "")
    assert availability["sketch@3"].reason() == untrained


async def test_users_read_how_far_a_version_being_trained_is(private_redis: Redis) -> None:
    """While ``model.prepare`` trains a version its workers report its progress note; users read
    the furthest any worker saw, and no path; admins read that worker's text, once."""
    path = "/srv/trained/sketch/v3/model.keras"

    def reason(epoch: int | None) -> str:
        being = "; " + BEING_TRAINED.format(epoch=epoch, epochs=12) if epoch is not None else ""
        return f"{NOT_TRAINED_YET}: {path} not found{being}; workers load it once it is written"

    elsewhere = f"{NOT_TRAINED_YET}: /mnt/other/sketch/v3/model.keras not found; workers load it once it is written"
    for worker, said in (("a", reason(3)), ("b", reason(4)), ("c", reason(None)), ("d", elsewhere)):
        await _announce(private_redis, worker, models=[ModelState(name="sketch", version=3, ready=False, reason=said)])
    availability = (await WorkerDirectory(private_redis).availability(fresh=True))["sketch@3"]
    assert availability.public_reason() == "it is being trained on this server: 4 of 12 epochs done"
    assert being_trained(reason(4)) == (4, 12) and being_trained(reason(None)) is None
    # Admins read the furthest worker's text once, path included; a worker that looks at another
    # path (a host mounting its own folder) is still heard.
    assert availability.reason() == f"{elsewhere}; {reason(4)}"


async def test_labels_are_kept_in_postgresql_only_when_they_are_a_list_of_labels(
    fresh_settings: Settings, private_redis: Redis
) -> None:
    """What a worker publishes is kept once; a value no worker writes (not JSON, not a list of
    strings) is left out, logged, and holds up nothing, and is kept once it is made right."""
    from sqlalchemy import select

    from api.app.catalog.service import remember_labels
    from api.app.core.db import make_engine, make_sessionmaker
    from api.app.registry.models import ModelVersion
    from api.prestart import seed_registry

    await seed_registry(fresh_settings)
    engine = make_engine(fresh_settings)
    redis = private_redis
    try:
        async with make_sessionmaker(engine)() as session:
            await redis.set(keys.labels_key("sketch", 1), "not json{")
            await redis.set(keys.labels_key("sketch", 2), '"abc"')
            await redis.set(keys.labels_key("sketch", 3), '["cat", "dog"]')
            assert await remember_labels(session=session, redis=redis) == 1

            async def kept() -> dict[int, object]:
                rows = await session.execute(
                    select(ModelVersion.version, ModelVersion.labels).where(ModelVersion.name == "sketch")
                )
                return {version: labels for version, labels in rows}

            assert await kept() == {1: None, 2: None, 3: ["cat", "dog"]}
            await redis.set(keys.labels_key("sketch", 1), '["fish"]')
            await redis.set(keys.labels_key("sketch", 3), '["changed"]')  # kept once: never rewritten
            assert await remember_labels(session=session, redis=redis) == 1
            assert await kept() == {1: ["fish"], 2: None, 3: ["cat", "dog"]}
    finally:
        await engine.dispose()
