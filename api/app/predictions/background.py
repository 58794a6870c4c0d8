"""Tasks every API process runs: collect workers' results, re-enqueue after Redis loss, expire."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass

import redis.exceptions
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.app.core import metrics
from api.app.core.config import Settings
from api.app.core.errors import DB_ERRORS, REDIS_ERRORS, OutageLog
from api.app.core.wandb_log import InferenceLogger
from api.app.images.storage import LocalBlobStore
from api.app.predictions import queue, service
from contracts import keys
from contracts.messages import PredictionStatus, ResultMessage
from contracts.registry import Registry

log = logging.getLogger("api.jobs")

# An API process that died holding results: another takes them over after this long.
RESULT_CLAIM_IDLE_MS = 30_000


@dataclass
class JobRuntime:
    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    redis: Redis
    redis_blocking: Redis
    store: LocalBlobStore
    outage_log: OutageLog
    registry: Registry
    inference_log: InferenceLogger | None = None


async def ensure_group(client: Redis, stream: str, group: str) -> None:
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.exceptions.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def handle_result(rt: JobRuntime, result: ResultMessage) -> None:
    async with rt.sessionmaker() as session:
        stored, completed = await service.store_result(session=session, result=result)
    if stored:
        metrics.observe_result(result)
        if rt.inference_log is not None:
            rt.inference_log.log(result)
    if (
        result.status == PredictionStatus.done
        and not result.random_weights
        and rt.settings.result_cache_ttl_seconds > 0
    ):
        await queue.cache_result(rt.redis, result.sha256, result, rt.settings.result_cache_ttl_seconds)
    if completed:
        await queue.notify_done(rt.redis, result.job_id, rt.settings.job_key_ttl_seconds)


async def _process(rt: JobRuntime, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
    for entry_id, fields in entries:
        try:
            result = ResultMessage.from_fields(fields)
        except Exception:
            log.exception("dropping malformed result message %s", entry_id)
        else:
            await handle_result(rt, result)
        await rt.redis.xack(keys.RESULT_STREAM, keys.RESULT_GROUP, entry_id)


async def collect_results(rt: JobRuntime, stop: asyncio.Event) -> None:
    """Stores each worker result in PostgreSQL, then acknowledges it: at least once, stored once."""
    consumer = f"api-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    group_ready = False
    loops = 0
    while not stop.is_set():
        try:
            if not group_ready:
                await ensure_group(rt.redis, keys.RESULT_STREAM, keys.RESULT_GROUP)
                group_ready = True
            if loops % 30 == 0:
                _next, claimed, *_ = await rt.redis.xautoclaim(
                    keys.RESULT_STREAM, keys.RESULT_GROUP, consumer, RESULT_CLAIM_IDLE_MS, count=100
                )
                await _process(rt, [c for c in claimed if c[1]])
            loops += 1
            response = await rt.redis_blocking.xreadgroup(
                keys.RESULT_GROUP, consumer, {keys.RESULT_STREAM: ">"}, count=100, block=1000
            )
            for _stream, entries in response or []:
                await _process(rt, entries)
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" in str(exc):
                group_ready = False
                continue
            log.exception("result collector error")
            await asyncio.sleep(1)
        except REDIS_ERRORS as exc:
            rt.outage_log.report("redis", exc)
            group_ready = False
            await asyncio.sleep(1)
        except DB_ERRORS as exc:
            rt.outage_log.report("postgresql", exc)
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("result collector error")
            await asyncio.sleep(1)


async def refresh_gauges(rt: JobRuntime) -> None:
    for entry in rt.registry.served(benchmark_mode=rt.settings.benchmark_mode):
        depth = await queue.depth(rt.redis, entry.name, entry.version)
        metrics.QUEUE_DEPTH.labels(entry.name, str(entry.version)).set(depth)
    workers = [k async for k in rt.redis.scan_iter(match=f"{keys.HEARTBEAT_PREFIX}*", count=200)]
    metrics.LIVE_WORKERS.set(len(workers))


async def reconcile_once(rt: JobRuntime) -> None:
    settings = rt.settings
    # A missing epoch key means this Redis lost its data (or is new): put every unfinished job
    # back on the queue from PostgreSQL. Duplicates are harmless: results are stored once.
    fresh = await rt.redis.set(keys.QUEUE_EPOCH, uuid.uuid4().hex, nx=True, ex=86400)
    if fresh:
        async with rt.sessionmaker() as session:
            messages = await service.unfinished_messages(session=session, store=rt.store)
        if messages:
            await queue.enqueue(rt.redis, messages)
            log.warning("re-enqueued %d unfinished predictions after Redis lost its queue", len(messages))
    else:
        await rt.redis.expire(keys.QUEUE_EPOCH, 86400)
    await refresh_gauges(rt)
    async with rt.sessionmaker() as session:
        finished = await service.expire_overdue(session=session, grace_seconds=settings.expire_grace_seconds)
    for job_id in finished:
        await queue.notify_done(rt.redis, str(job_id), settings.job_key_ttl_seconds)


async def reconcile(rt: JobRuntime, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await reconcile_once(rt)
        except REDIS_ERRORS as exc:
            rt.outage_log.report("redis", exc)
        except DB_ERRORS as exc:
            rt.outage_log.report("postgresql", exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reconciler error")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=rt.settings.reconcile_interval_seconds)
