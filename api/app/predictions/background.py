"""Tasks every API process runs: collect workers' results, re-enqueue after Redis loss, expire
jobs."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import redis.exceptions
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api.app.catalog import service as catalog
from api.app.catalog.service import weight_shares
from api.app.core import metrics
from api.app.core.config import Settings
from api.app.core.errors import REDIS_ERRORS, OutageLog, is_outage
from api.app.core.tasks import run_every
from api.app.core.wandb_log import InferenceLogger
from api.app.images.storage import LocalBlobStore
from api.app.predictions import evaluations, queue, service
from api.app.registry.live import LiveRegistry
from contracts import keys, streams, workers
from contracts.messages import PredictionStatus, ResultMessage
from contracts.streams import StreamFields

log = logging.getLogger("api.jobs")


@dataclass
class JobRuntime:
    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    engine: AsyncEngine
    """The pool of ``sessionmaker``: a user's answer is stored by one statement on its driver
    (``service.store_answer``), without BEGIN and COMMIT around it."""
    redis: Redis
    redis_blocking: Redis
    """For the loops' blocking reads, on connections of their own (``main.BACKGROUND_REDIS_CONNECTIONS``)."""
    store: LocalBlobStore
    outage_log: OutageLog
    live_registry: LiveRegistry
    inference_log: InferenceLogger | None = None


async def handle_result(rt: JobRuntime, result: ResultMessage) -> bytes | None:
    """Stores one answer; when it completed its job, the job's answers for the waiting request."""
    if not result.shadow_of and not result.evaluation:
        owner_id, completed = await service.store_answer(engine=rt.engine, result=result)
    else:
        async with rt.sessionmaker() as session:
            owner_id, completed = await service.store_result(session=session, result=result)
    if owner_id is not None:
        metrics.observe_result(result)
        if rt.inference_log is not None:
            rt.inference_log.log(result)
    if (
        owner_id is not None
        and result.status == PredictionStatus.done
        and not result.random_weights
        and rt.settings.result_cache_ttl_seconds > 0
    ):
        await queue.cache_result(rt.redis, owner_id, result, rt.settings.result_cache_ttl_seconds)
    return completed


async def _give_up(rt: JobRuntime, entry_id: bytes, fields: dict[bytes, bytes], result: ResultMessage) -> bytes | None:
    """Fails the prediction of an answer that cannot be stored and keeps the answer in the
    results:dead stream for an operator; the job's answers when that finished the job."""
    reason = f"its answer could not be stored after {rt.settings.result_max_attempts} attempts"
    log.error("dead-lettering result %s of job %s: %s", entry_id, result.job_id, reason)
    dead: StreamFields = {key: value for key, value in fields.items()}
    dead.update({b"entry_id": entry_id, b"reason": reason.encode()})
    await rt.redis.xadd(
        keys.RESULT_DEAD_LETTER_STREAM,
        dead,
        maxlen=streams.DEAD_LETTER_MAXLEN,
        approximate=True,
    )
    failed = ResultMessage.answering(result, PredictionStatus.failed, error=reason)
    try:
        async with rt.sessionmaker() as session:
            owner_id, completed = await service.store_result(session=session, result=failed)
    except Exception as exc:
        if is_outage(exc):
            raise
        # Not even the failure can be stored: the reconciler expires the job at its deadline.
        log.exception("could not fail the prediction of result %s", entry_id)
        return None
    if owner_id is not None:  # a user's prediction, failed now (not a shadow copy or an evaluation)
        metrics.count_failed([(result.model, result.version)])
    return completed


async def _process(rt: JobRuntime, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
    """Stores each result, then tells the waiting requests and acknowledges the stored results in
    one round trip; what was stored before an outage is still acknowledged and told.

    An answer that fails for another reason (one PostgreSQL refuses) stays unacknowledged, is
    tried again when claimed, and after RESULT_MAX_ATTEMPTS fails its prediction instead; it never
    holds up the answers after it.
    """
    done_jobs: dict[str, bytes] = {}
    handled: list[bytes] = []
    evaluating = batching = False
    try:
        for entry_id, fields in entries:
            try:
                result = ResultMessage.from_fields(fields)
            except Exception:
                log.exception("dropping malformed result message %s", entry_id)
                handled.append(entry_id)
                continue
            try:
                completed = await handle_result(rt, result)
            except Exception as exc:
                # An outage leaves the answer pending, to be stored once the service is back:
                # only an answer refused for itself counts as an attempt.
                if is_outage(exc):
                    raise
                attempts = await streams.times_delivered_async(
                    rt.redis, keys.RESULT_STREAM, keys.RESULT_GROUP, entry_id
                )
                log.exception("could not store result %s (attempt %d)", entry_id, attempts)
                if attempts < rt.settings.result_max_attempts:
                    continue
                completed = await _give_up(rt, entry_id, fields, result)
            if completed is not None:
                done_jobs[result.job_id] = completed
            evaluating |= bool(result.evaluation)
            batching |= result.request_id.startswith(keys.BATCH_REQUEST_PREFIX)
            handled.append(entry_id)
    finally:
        if handled:
            await queue.notify_done(
                rt.redis,
                done_jobs,
                rt.settings.job_key_ttl_seconds,
                ack=(keys.RESULT_STREAM, keys.RESULT_GROUP, handled),
            )
    if evaluating:
        # The next few of an evaluation's jobs as soon as some are answered, not at the next reconcile.
        await top_up_evaluations(rt)
    if batching:
        # Wakes the batch lane (api.app.batches.background) to queue the next of a batch's jobs.
        async with rt.redis.pipeline(transaction=False) as pipe:
            pipe.lpush(keys.BATCH_WAKE, 1)
            pipe.ltrim(keys.BATCH_WAKE, 0, 0)
            await pipe.execute()


async def top_up_evaluations(rt: JobRuntime) -> None:
    """Queues the next jobs of running evaluations (``evaluations.top_up``) for the versions a
    live worker serves; nothing (not even the workers' heartbeats read) while none runs."""
    async with rt.sessionmaker() as session:
        if not await evaluations.any_running(session=session):
            return
        beats = await workers.live_heartbeats_async(rt.redis)
        served = {f"{m.name}@{m.version}" for beat in beats for m in beat.models if m.ready}
        await evaluations.top_up(
            served=served,
            session=session,
            redis=rt.redis,
            store=rt.store,
            in_flight=rt.settings.evaluation_in_flight,
            job_seconds=rt.settings.evaluation_job_seconds,
        )


async def collect_results(rt: JobRuntime, stop: asyncio.Event) -> None:
    """Stores each worker result in PostgreSQL, then acknowledges it: at least once, stored once."""
    consumer = f"api-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    claim_idle_ms = int(rt.settings.result_claim_idle_seconds * 1000)
    group_ready = False
    last_claim = last_forget = 0.0
    while not stop.is_set():
        try:
            if not group_ready:
                await streams.ensure_group_async(rt.redis, keys.RESULT_STREAM, keys.RESULT_GROUP)
                group_ready = True
            if time.monotonic() - last_claim >= rt.settings.result_claim_idle_seconds:
                # Answers another (or this) collector read but never acknowledged: it died, or storing failed.
                last_claim = time.monotonic()
                claim: list[Any] = await rt.redis.xautoclaim(
                    keys.RESULT_STREAM, keys.RESULT_GROUP, consumer, claim_idle_ms, count=100
                )
                claimed: list[tuple[bytes, dict[bytes, bytes]]] = claim[1]
                await _process(rt, [c for c in claimed if c[1]])
            if time.monotonic() - last_forget >= streams.FORGET_EVERY_S:
                # API processes that stopped; each one reads under a name of its own.
                last_forget = time.monotonic()
                await streams.forget_idle_consumers_async(
                    rt.redis, keys.RESULT_STREAM, keys.RESULT_GROUP, streams.IDLE_CONSUMER_FORGET_MS
                )
            response = cast(
                list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None,
                await rt.redis_blocking.xreadgroup(
                    keys.RESULT_GROUP, consumer, {keys.RESULT_STREAM: ">"}, count=100, block=1000
                ),
            )
            for _stream, entries in response or []:
                await _process(rt, entries)
        except redis.exceptions.ResponseError as exc:
            if streams.group_missing(exc):
                group_ready = False
                continue
            log.exception("result collector error")
            await asyncio.sleep(1)
        except REDIS_ERRORS as exc:
            rt.outage_log.report("redis", exc)
            group_ready = False
            await asyncio.sleep(1)
        except Exception as exc:
            if is_outage(exc):
                rt.outage_log.report("postgresql", exc)
            else:
                log.exception("result collector error")
            await asyncio.sleep(1)


async def refresh_gauges(rt: JobRuntime) -> None:
    """Sets the gauges read from Redis (queue depths, live workers), from PostgreSQL (shadow
    agreement) and the registry (traffic shares), and ``portal_dependency_up`` for Redis and
    PostgreSQL. An outage raises nothing here: what cannot be read is not exported as it last
    was, but as the API sees it now (no live worker, no queue depth; shadow gauges kept, as an
    hour's share they change slowly), so alerts on these gauges fire during the outage."""
    registry = rt.live_registry.current
    bench = rt.settings.benchmark_mode
    try:
        depths = {
            (entry.name, entry.version): await queue.depth(rt.redis, entry.name, entry.version)
            for entry in registry.served(benchmark_mode=bench)
        }
        live = len(await workers.live_heartbeats_async(rt.redis))
    except REDIS_ERRORS:
        metrics.DEPENDENCY_UP.labels("redis").set(0)
        metrics.LIVE_WORKERS.set(0)
        metrics.forget_queue_depths()
    else:
        metrics.DEPENDENCY_UP.labels("redis").set(1)
        metrics.LIVE_WORKERS.set(live)
        for (name, version), depth in depths.items():
            metrics.QUEUE_DEPTH.labels(name, str(version)).set(depth)
    shares = weight_shares(registry, benchmark_mode=bench)
    for entry in registry.models:
        metrics.TRAFFIC_WEIGHT.labels(entry.name, str(entry.version)).set(shares.get((entry.name, entry.version), 0.0))
    try:
        async with rt.sessionmaker() as session:
            agreement = await service.shadow_agreement(session=session, since=datetime.now(UTC) - timedelta(hours=1))
    except Exception as exc:
        if not is_outage(exc):
            raise
        metrics.DEPENDENCY_UP.labels("postgresql").set(0)
        return
    metrics.DEPENDENCY_UP.labels("postgresql").set(1)
    answered_by = {(name, version): (answered, agreeing) for name, version, answered, agreeing in agreement}
    for entry in registry.models:
        answered, agreeing = answered_by.get((entry.name, entry.version), (0, 0))
        if answered or entry.channel == "shadow":
            metrics.SHADOW_ANSWERS.labels(entry.name, str(entry.version)).set(answered)
        if answered:
            metrics.SHADOW_AGREEMENT.labels(entry.name, str(entry.version)).set(agreeing / answered)


async def reconcile_once(rt: JobRuntime) -> None:
    settings = rt.settings
    # First: the gauges tell an outage that makes the rest fail.
    await refresh_gauges(rt)
    # A missing epoch key means this Redis lost its data (or is new): put every unfinished job
    # back on the queue from PostgreSQL. Duplicates are harmless: results are stored once.
    fresh = await rt.redis.set(keys.QUEUE_EPOCH, uuid.uuid4().hex, nx=True, ex=86400)
    if fresh:
        try:
            async with rt.sessionmaker() as session:
                messages = await service.unfinished_messages(session=session, store=rt.store)
            if messages:
                await queue.enqueue(rt.redis, messages)
                log.warning("re-enqueued %d unfinished predictions after Redis lost its queue", len(messages))
        except Exception:
            # Not done: the next reconcile must try again, not take the epoch as handled.
            await rt.redis.delete(keys.QUEUE_EPOCH)
            raise
    else:
        await rt.redis.expire(keys.QUEUE_EPOCH, 86400)
    # Before the heartbeats are read: an entry added since may be for a version served again.
    looked_at_ms = await queue.server_time_ms(rt.redis)
    served = {f"{m.name}@{m.version}" for beat in await workers.live_heartbeats_async(rt.redis) for m in beat.models}
    unserved = service.unserved_versions(rt.live_registry.current, served)
    async with rt.sessionmaker() as session:
        await catalog.remember_labels(session=session, redis=rt.redis)
        finished = await service.expire_overdue(session=session, grace_seconds=settings.expire_grace_seconds)
        finished |= await service.expire_unserved(session=session, versions=unserved)
        await evaluations.expire_overdue(
            session=session,
            grace_seconds=settings.expire_grace_seconds,
            stall_seconds=settings.evaluation_job_seconds,
        )
    for (name, version), why in unserved.items():
        # A retired version's unfinished predictions all end expired (one the lane or a collector
        # held now, at a later look), so no entry queued before the look can still be answered.
        # A disabled version's stay: its batch images wait for it to be enabled again.
        if why.retired and (dropped := await queue.drop_entries_before(rt.redis, name, version, looked_at_ms)):
            log.info("dropped %d queued entries of %s@%d, retired with no worker serving it", dropped, name, version)
    await top_up_evaluations(rt)
    if finished:
        await queue.notify_done(
            rt.redis, {str(job_id): answers for job_id, answers in finished.items()}, settings.job_key_ttl_seconds
        )


async def reconcile(rt: JobRuntime, stop: asyncio.Event) -> None:
    await run_every(
        rt.settings.reconcile_interval_seconds,
        lambda: reconcile_once(rt),
        name="reconciler",
        stop=stop,
        outage_log=rt.outage_log,
    )
