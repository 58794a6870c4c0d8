"""The FastAPI application."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_fastapi_instrumentator import Instrumentator

from api.app.admin.router import router as admin_router
from api.app.api_keys.router import router as api_keys_router
from api.app.auth.background import forget_revocations
from api.app.auth.router import classic as auth_classic
from api.app.auth.router import router as auth_router
from api.app.batches import background as batches_background
from api.app.batches.router import router as batches_router
from api.app.catalog.router import router as catalog_router
from api.app.catalog.service import WorkerDirectory
from api.app.core import maintenance, metrics
from api.app.core.body_limits import BodyLimitMiddleware
from api.app.core.config import Settings, get_settings
from api.app.core.db import make_engine, make_read_sessionmaker, make_sessionmaker, open_pool
from api.app.core.errors import OutageLog, install_allow_header, install_outage_handlers, is_outage
from api.app.core.logging import configure_logging
from api.app.core.path_guard import PathGuardMiddleware
from api.app.core.redis import make_redis
from api.app.core.request_context import RequestContextMiddleware
from api.app.core.responses import EVERY_ROUTE
from api.app.core.security import PasswordHasher, VerifiedTokens
from api.app.core.startup import check_redis_eviction
from api.app.core.tasks import run_every
from api.app.core.throttle import AttemptThrottle
from api.app.core.wandb_log import InferenceLogger
from api.app.deps import refused_key
from api.app.drift.background import compute_periodically as compute_drift
from api.app.explanations.router import router as explanations_router
from api.app.exports.router import router as exports_router
from api.app.exports.runner import ExportRunner
from api.app.feedback.router import classic as feedback_classic
from api.app.feedback.router import labels_router as verdict_labels_router
from api.app.feedback.router import router as feedback_router
from api.app.health.router import router as health_router
from api.app.images.background import retry_deletions_periodically as retry_blob_deletions
from api.app.images.router import router as images_router
from api.app.images.storage import LocalBlobStore
from api.app.predictions.background import JobRuntime, collect_results, reconcile
from api.app.predictions.router import classic as predictions_classic
from api.app.predictions.router import images as predictions_of_images
from api.app.predictions.router import router as predictions_router
from api.app.registry.live import LiveRegistry
from api.app.registry.router import router as registry_router
from api.app.releases.router import router as releases_router
from api.app.stats.background import roll_up_periodically
from api.app.training import background as training_background
from api.app.training.router import router as training_router
from api.app.users.router import classic as users_classic
from api.app.users.router import router as users_router
from contracts.redis_policy import EvictionPolicyRefused
from contracts.registry import load_registry

log = logging.getLogger("api.startup")

BACKGROUND_REDIS_CONNECTIONS = 4
"""Blocking Redis connections of the background loops: three each hold one, one is spare."""

DESCRIPTION = """Upload images, classify them with several models side by side, and say when a
prediction is wrong. Use **Authorize** with your email as username to try every route."""


class _Frozen:
    """``gc.freeze`` for each app started in this process, ``gc.unfreeze`` once the last one stops:
    the collector's permanent generation is the process's, and an app stopping first (a test's,
    beside the suite's own) must not thaw what another running app froze."""

    apps = 0

    @classmethod
    def freeze(cls) -> None:
        cls.apps += 1
        gc.freeze()

    @classmethod
    def unfreeze(cls) -> None:
        cls.apps -= 1
        if cls.apps == 0:
            gc.unfreeze()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json, service="api")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            # Before anything is opened: an evicting Redis would lose queued jobs without a word.
            await check_redis_eviction(settings)
        except EvictionPolicyRefused as exc:
            # One clear line before uvicorn's traceback and "Application startup failed".
            log.critical("refusing to start: %s", exc)
            raise
        metrics.forget_dead_processes()
        state = app.state
        state.settings = settings
        state.engine = make_engine(settings)
        state.sessionmaker = make_sessionmaker(state.engine)
        state.read_sessionmaker = make_read_sessionmaker(state.engine)
        await open_pool(state.engine, settings.db_pool_size)
        # Storing results has connections of its own: finishing work never queues behind new work.
        # Its users (the result collector, the reconciler, the revocation cleanup) each take one at a time.
        state.background_engine = make_engine(settings, pool_size=2, max_overflow=2, role="results")
        await open_pool(state.background_engine, 2)
        state.redis = make_redis(settings)
        state.redis_blocking = make_redis(settings, blocking=True)
        # The background loops' blocking reads (the result collector, the training events, the
        # batch lane: one connection each) have connections of their own, as their statements do:
        # answers are collected however many requests are waiting for theirs.
        state.redis_background = make_redis(settings, blocking=True, max_connections=BACKGROUND_REDIS_CONNECTIONS)
        state.throttle = AttemptThrottle(settings, state.redis)
        state.hasher = PasswordHasher(settings)
        state.tokens = VerifiedTokens(settings)
        state.live_registry = live = LiveRegistry(load_registry(settings.registry_path))
        try:
            async with state.sessionmaker() as session:
                await live.refresh(session)
        except Exception as exc:
            # PostgreSQL refusing or hanging: the file's registry until it is back.
            if not is_outage(exc):
                raise
        state.store = LocalBlobStore(settings.storage_dir)
        state.workers = WorkerDirectory(state.redis)
        state.drift_refresh_lock = asyncio.Lock()
        state.outage_log = outage_log
        runtime = JobRuntime(
            settings=settings,
            sessionmaker=make_sessionmaker(state.background_engine),
            engine=state.background_engine,
            redis=state.redis,
            redis_blocking=state.redis_background,
            store=state.store,
            outage_log=outage_log,
            live_registry=live,
            inference_log=(
                InferenceLogger(
                    api_key=settings.wandb_api_key,
                    project=settings.wandb_project,
                    mode=settings.wandb_mode,
                    directory=settings.wandb_dir,
                )
                if settings.wandb_api_key
                else None
            ),
        )
        stop = asyncio.Event()
        forget = forget_revocations(
            runtime.sessionmaker,
            interval=settings.revocation_cleanup_interval_seconds,
            stop=stop,
            outage_log=outage_log,
        )
        sync_registry = run_every(
            settings.registry_refresh_seconds,
            lambda: live.sync(runtime.sessionmaker, state.redis),
            name="registry refresh",
            stop=stop,
            outage_log=outage_log,
        )
        # Export jobs have connections of their own: a page or a lease renewal must never make the
        # result collector wait, and their polling never takes a connection from a request.
        state.export_engine = make_engine(settings, pool_size=2, max_overflow=0, role="exports")
        state.export_runner = exports = ExportRunner(
            sessionmaker=make_sessionmaker(state.export_engine),
            read_sessionmaker=make_read_sessionmaker(state.export_engine),
            store=state.store,
            storage_dir=settings.storage_dir,
            batch_rows=settings.export_batch_rows,
            poll_seconds=settings.export_poll_seconds,
            lease_seconds=settings.export_lease_seconds,
            max_attempts=settings.export_max_attempts,
            keep_days=settings.export_keep_days,
        )
        tasks = [
            asyncio.create_task(t)
            for t in (
                collect_results(runtime, stop),
                reconcile(runtime, stop),
                forget,
                sync_registry,
                training_background.collect_events(runtime, stop),
                training_background.maintain(runtime, stop),
                batches_background.run_lane(runtime, stop),
                roll_up_periodically(
                    runtime.sessionmaker, interval=settings.stats_roll_up_seconds, stop=stop, outage_log=outage_log
                ),
                compute_drift(
                    sessionmaker=runtime.sessionmaker,
                    redis=state.redis,
                    settings=settings,
                    live_registry=live,
                    stop=stop,
                    outage_log=outage_log,
                ),
                exports.run(stop, outage_log),
                retry_blob_deletions(runtime.sessionmaker, store=state.store, stop=stop, outage_log=outage_log),
                run_every(
                    maintenance.MAINTENANCE_SECONDS,
                    functools.partial(maintenance.maintain, engine=state.background_engine),
                    name="table maintenance",
                    stop=stop,
                    outage_log=outage_log,
                ),
            )
        ]
        # What start-up made (modules, schemas, the registry) lives as long
        # as the process. Out of the collector's reach, a full collection no longer walks them on
        # the request path (tests/bench/test_scale.py: p50 of every route about halved). See
        # https://docs.python.org/3/library/gc.html#gc.freeze.
        _Frozen.freeze()
        try:
            yield
        finally:
            _Frozen.unfreeze()
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if runtime.inference_log is not None:
                await asyncio.to_thread(runtime.inference_log.close)
            await state.redis.aclose()
            await state.redis_blocking.aclose()
            await state.redis_background.aclose()
            await state.engine.dispose()
            await state.background_engine.dispose()
            await state.export_engine.dispose()
            metrics.forget_this_process()

    app = FastAPI(
        title="Image classification portal",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses=EVERY_ROUTE,
        swagger_ui_parameters={"persistAuthorization": True},
    )
    outage_log = OutageLog(settings.outage_log_interval_seconds)
    install_outage_handlers(app, outage_log, settings.retry_after_seconds)

    app.add_middleware(
        BodyLimitMiddleware,
        max_upload_bytes=settings.max_upload_bytes,
        max_batch_bytes=settings.max_batch_bytes,
        body_idle_seconds=settings.body_idle_timeout_seconds,
        check_key=refused_key,
    )
    # Before routing: a path with a control character (/metrics%0A) must not reach /metrics.
    app.add_middleware(PathGuardMiddleware)
    app.add_middleware(RequestContextMiddleware, retry_after_seconds=settings.retry_after_seconds)

    Instrumentator(excluded_handlers=["/metrics"]).add(metrics.HTTP).instrument(app).expose(
        app, include_in_schema=False
    )
    routers = (
        auth_classic,
        auth_router,
        api_keys_router,
        users_classic,
        users_router,
        images_router,
        predictions_of_images,
        predictions_classic,
        predictions_router,
        explanations_router,
        batches_router,
        feedback_classic,
        feedback_router,
        verdict_labels_router,
        catalog_router,
        admin_router,
        exports_router,
        registry_router,
        releases_router,
        training_router,
        health_router,
    )
    for router in routers:
        app.include_router(router)
    install_allow_header(app, [*app.router.routes, *(route for router in routers for route in router.routes)])
    return app
