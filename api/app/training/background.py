"""What every API process runs for training: it follows the trainer's events into the runs,
registers what they trained, fails runs whose trainer died, applies the auto-promote rule, and
starts runs when enough new labelled examples arrived (RETRAIN_MIN_NEW_LABELS)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from datetime import UTC, datetime
from typing import Any, cast

import redis.exceptions
from fastapi import HTTPException
from sqlalchemy import select

from api.app.catalog.service import WorkerDirectory, model_labels
from api.app.core.errors import REDIS_ERRORS, is_outage
from api.app.core.tasks import run_every
from api.app.examples.models import LabelledExample
from api.app.predictions.background import JobRuntime
from api.app.registry import service as registry_service
from api.app.training import service
from contracts import training
from contracts.registry import ModelEntry
from contracts.streams import (
    FORGET_EVERY_S,
    IDLE_CONSUMER_FORGET_MS,
    ensure_group_async,
    forget_idle_consumers_async,
    group_missing,
)

log = logging.getLogger("api.training")

TRIGGER_ACTOR = registry_service.Actor(None, "retraining trigger")
AUTO_PROMOTE_LOCK = "training:auto-promote:lock"
AUTO_PROMOTE_LOCK_S = 60
"""Longer than one pass of the rule takes (a few queries per candidate); a process that dies
holding the lock delays the rule this long."""


async def handle_event(rt: JobRuntime, event: training.TrainingEvent) -> None:
    """Writes the event into its run; a run that ended well registers its version in shadow, and
    the model's earlier candidates in shadow become canaries without traffic
    (``service.step_down_older_shadows``)."""
    async with rt.sessionmaker() as session:
        registered = await service.apply_event(session=session, event=event)
        if registered is None:
            return
        run, entry = registered
        run_id = run.id  # the rollback below expires ``run``: an async session cannot load it again
        accuracy = (run.record or {}).get("test_accuracy")
        try:
            await registry_service.register_version(
                session=session,
                actor=registry_service.Actor(None, f"{service.RUN_ACTOR_PREFIX}{run.id}"),
                entry=entry,
                reason=f"trained from @{run.base_version}: {run.reason}"
                + (f" (held-out accuracy {accuracy:.4f})" if isinstance(accuracy, float) else ""),
            )
        except HTTPException as exc:
            log.error("training run %s: %s not registered: %s", run_id, entry.key, exc.detail)
            await session.rollback()
            run = await service.get_run(session=session, run_id=run_id)
            run.status, run.finished_at, run.record = "failed", datetime.now(UTC), event.record
            run.error = f"trained, but {entry.key} was not registered: {exc.detail}"
            await session.commit()
            return
        stepped_down = await service.step_down_older_shadows(
            session=session,
            actor=registry_service.Actor(None, f"{service.RUN_ACTOR_PREFIX}{run_id}"),
            name=entry.name,
            version=entry.version,
        )
        await rt.live_registry.reload(session, rt.redis)
    log.info("training run %s registered %s in shadow", run_id, entry.key)
    if stepped_down:
        log.info("%s: earlier candidates %s now canaries without traffic", entry.name, stepped_down)


def _first_line(exc: Exception) -> str:
    """The first line of ``exc``'s message (at most 300 characters), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


async def _handle_entries(rt: JobRuntime, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
    """Handles each event, then acknowledges it; one that cannot be handled is logged and dropped,
    and when it was a run's end, the run is failed with why (``service.fail_unrecorded``). Redis
    and PostgreSQL failures are raised with the event unacknowledged (claimed again later)."""
    for entry_id, fields in entries:
        event: training.TrainingEvent | None = None
        try:
            event = training.TrainingEvent.from_fields(fields)
            await handle_event(rt, event)
        except Exception as exc:
            if is_outage(exc):
                raise
            log.exception("dropping training event %s", entry_id)
            if event is not None and event.kind in ("done", "failed", "cancelled"):
                reason = f"its end could not be recorded: {_first_line(exc)}"
                async with rt.sessionmaker() as session:
                    await service.fail_unrecorded(session=session, run_id=uuid.UUID(event.run_id), reason=reason)
        await rt.redis.xack(training.EVENT_STREAM, training.EVENT_GROUP, entry_id)


async def collect_events(rt: JobRuntime, stop: asyncio.Event) -> None:
    """Follows ``training:events`` (consumer group ``api``: each event handled by one process, at
    least once). An event read but left unacknowledged for RESULT_CLAIM_IDLE_SECONDS (its API
    process died handling it, or PostgreSQL failed meanwhile) is claimed and handled again, by
    this process or another, as workers' answers are."""
    claim_idle_s = rt.settings.result_claim_idle_seconds
    consumer = f"api-{socket.gethostname()}-{os.getpid()}"
    group_ready = False
    last_forget = last_claim = 0.0
    while not stop.is_set():
        try:
            if not group_ready:
                await ensure_group_async(rt.redis, training.EVENT_STREAM, training.EVENT_GROUP)
                group_ready = True
            if time.monotonic() - last_claim >= claim_idle_s:
                last_claim = time.monotonic()
                claim: list[Any] = await rt.redis.xautoclaim(
                    training.EVENT_STREAM,
                    training.EVENT_GROUP,
                    consumer,
                    int(claim_idle_s * 1000),
                    count=50,
                )
                await _handle_entries(rt, [c for c in claim[1] if c[1]])
            if time.monotonic() - last_forget >= FORGET_EVERY_S:
                last_forget = time.monotonic()
                await forget_idle_consumers_async(
                    rt.redis, training.EVENT_STREAM, training.EVENT_GROUP, IDLE_CONSUMER_FORGET_MS
                )
            reply = cast(
                list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None,
                await rt.redis_blocking.xreadgroup(
                    training.EVENT_GROUP, consumer, {training.EVENT_STREAM: ">"}, count=50, block=1000
                ),
            )
            for _stream, entries in reply or []:
                await _handle_entries(rt, entries)
        except redis.exceptions.ResponseError as exc:
            if group_missing(exc):
                group_ready = False
                continue
            log.exception("training event collector error")
            await asyncio.sleep(1)
        except REDIS_ERRORS as exc:
            rt.outage_log.report("redis", exc)
            group_ready = False
            await asyncio.sleep(1)
        except Exception as exc:
            if not is_outage(exc):
                raise
            # PostgreSQL refusing, or hanging (asyncpg's TimeoutError).
            rt.outage_log.report("postgresql", exc)
            await asyncio.sleep(1)


def _refused(refusals: dict[str, str], name: str, why: str) -> None:
    """Logs why the trigger did not start a run of ``name`` when it is not what it said last time
    (``refusals``, by model): once per reason, not at every check while it lasts."""
    if refusals.get(name) != why:
        refusals[name] = why
        log.info("retraining %s not started: %s", name, why)


async def maintain_once(rt: JobRuntime, refusals: dict[str, str] | None = None) -> None:
    """Fails runs whose trainer died, and queued runs whose job was lost; removes the feedback
    exports of ended runs; applies the auto-promote rule (AUTO_PROMOTE); starts a run for each
    sketch model (the only ones a run trains) with enough new examples since its latest run that
    ended done or is still going (``service.new_examples_since_last_run``), waiting a while after
    runs that failed or were cancelled (``service.retry_refusal``).

    ``refusals``: by model, why its run was last refused, kept from one call to the next by the
    caller (``maintain``): a refusal is logged when it is new, not at every check while it lasts."""
    async with rt.sessionmaker() as session:
        if failed := await service.fail_stale(session=session, redis=rt.redis):
            log.warning("%d training runs failed: their trainer stopped", failed)
        if lost := await service.fail_lost(session=session, redis=rt.redis):
            log.warning("%d queued training runs failed: their job was lost", lost)
        if removed := await service.remove_exports(session=session, data_dir=rt.settings.training_data_dir):
            log.info("removed %d feedback export folders of ended or unknown training runs", removed)
    # One API process at a time applies the rule: two would race to promote the same candidate.
    # redis-py's lock releases only its own token, so a pass that outlived it frees nothing else's.
    lock = rt.redis.lock(AUTO_PROMOTE_LOCK, timeout=AUTO_PROMOTE_LOCK_S, blocking=False)
    if rt.settings.auto_promote and await lock.acquire():
        try:
            async with rt.sessionmaker() as session:
                decided = await service.auto_promote(
                    session=session,
                    availability=await WorkerDirectory(rt.redis).availability(fresh=True),
                    margin=rt.settings.promotion_margin,
                    wait_seconds=rt.settings.auto_promote_wait_seconds,
                )
        finally:
            with contextlib.suppress(redis.exceptions.LockError):
                await lock.release()
        if any(run.promotion and run.promotion.startswith("promoted") for run in decided):
            async with rt.sessionmaker() as session:
                await rt.live_registry.reload(session, rt.redis)
    threshold = rt.settings.retrain_min_new_labels
    trainable = sorted({entry.name for entry in rt.live_registry.current.models if service.trainable(entry)})
    if threshold <= 0 or not trainable:
        return
    refused = refusals if refusals is not None else {}
    async with rt.sessionmaker() as session:
        names = list(
            await session.scalars(
                select(LabelledExample.model_name).where(LabelledExample.model_name.in_(trainable)).distinct()
            )
        )
        for name in names:
            # Only examples a run from the stable version can learn (labelled one of its
            # categories: a run skips the others) count towards starting one.
            try:
                stable: ModelEntry | None = await service.base_entry(session=session, name=name, base_version=None)
            except HTTPException:
                stable = None  # refused below, saying why
            categories = (await model_labels(rt.redis, stable, session=session)) if stable else None
            new = await service.new_examples_since_last_run(session=session, name=name, categories=categories)
            if new < threshold:
                continue
            # Its last runs failed or were cancelled: their examples count again, after a wait.
            if backing_off := await service.retry_refusal(session=session, name=name):
                await session.rollback()
                _refused(refused, name, backing_off)
                continue
            try:
                base = await service.base_entry(session=session, name=name, base_version=None)
                run = await service.create_run(
                    session=session,
                    redis=rt.redis,
                    store=rt.store,
                    data_dir=rt.settings.training_data_dir,
                    actor=TRIGGER_ACTOR,
                    name=name,
                    base_version=base.version,
                    options=service.recipe(base, epochs=rt.settings.retrain_epochs),
                    reason=f"{new} new labelled examples since the last run",
                    trigger="auto",
                )
            except HTTPException as exc:
                await session.rollback()
                _refused(refused, name, str(exc.detail))
                continue
            refused.pop(name, None)
            log.info("retraining %s: run %s queued (%d new labelled examples)", name, run.id, new)


async def maintain(rt: JobRuntime, stop: asyncio.Event) -> None:
    """Runs ``maintain_once`` every RETRAIN_CHECK_SECONDS until ``stop``."""
    refusals: dict[str, str] = {}
    await run_every(
        rt.settings.retrain_check_seconds,
        lambda: maintain_once(rt, refusals),
        name="training maintenance",
        stop=stop,
        outage_log=rt.outage_log,
    )
