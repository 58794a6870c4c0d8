from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.app.deps import EngineDep, RedisDep, RegistryDep, SettingsDep, WorkersDep
from contracts.redis_policy import EvictionCheck, EvictionPolicyRefused, check_eviction_policy_async

router = APIRouter(prefix="/health", tags=["health"])


# HEAD too: load balancers and uptime checks often probe with it. Its own route, out of the
# schema: one route for both methods gives two operations the same id (FastAPI warns at start).
@router.get("/live")
@router.head("/live", include_in_schema=False)
async def live() -> dict[str, str]:
    """The process is up (no I/O)."""
    return {"status": "ok"}


CHECK_SECONDS = 2.0
"""Longest a readiness check waits for its dependency: a PostgreSQL that hangs rather than refuses
would otherwise hold the answer for asyncpg's ``command_timeout`` (10 s) and more, past the
probe's own timeout."""

_abandoned: set[asyncio.Task[object]] = set()
"""Checks cancelled at CHECK_SECONDS, kept referenced until they end: cancelling a statement on a
hung server makes SQLAlchemy close its connection, which waits for the server too."""


def _forget(task: asyncio.Task[object]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a late failure of a check already answered is no news


async def _check(coro: Coroutine[Any, Any, object], seconds: float = CHECK_SECONDS) -> dict[str, object]:
    """Runs one readiness check: ``{"status": "ok" | "fail", "latency_ms", "detail"}``; a check
    that has not answered within ``seconds`` fails, and the answer does not wait for it to end."""
    start = time.perf_counter()
    task: asyncio.Task[object] = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        _abandoned.add(task)
        task.add_done_callback(_forget)
        detail: object = f"no answer within {seconds:g} s"
        status = "fail"
    elif (exc := task.exception()) is not None:  # a readiness check reports every failure instead of raising
        detail, status = f"{type(exc).__name__}: {exc}", "fail"
    else:
        detail, status = task.result(), "ok"
    return {"status": status, "latency_ms": round((time.perf_counter() - start) * 1000, 2), "detail": detail}


@router.get("/ready", responses={503: {"description": "Not ready; the body says which check failed"}})
@router.head("/ready", include_in_schema=False)
async def ready(
    engine: EngineDep, redis: RedisDep, workers: WorkersDep, registry: RegistryDep, settings: SettingsDep
) -> JSONResponse:
    """Ready: PostgreSQL and Redis answer, Redis does not evict keys (or ALLOW_REDIS_EVICTION says
    to run anyway: then ``warnings`` says so), and a warm worker serves every available model. A
    PostgreSQL setting that hurts in the long run (autovacuum off) is named in ``warnings`` too."""

    postgres_warnings: list[str] = []

    async def db_check() -> str:
        async with engine.connect() as conn:
            # Without autovacuum the summaries' change tables and the history bloat, and the
            # planner's statistics go stale: the portal runs but slows down month by month.
            if (await conn.scalar(text("SHOW autovacuum"))) != "on":
                postgres_warnings.append(
                    "autovacuum is off: dead rows and stale planner statistics will slow the portal down; "
                    "turn it on (see the README's PostgreSQL settings)"
                )
        return "reachable"

    evictions: list[EvictionCheck] = []

    async def redis_check() -> str:
        # Read on every call, not only at start-up: Redis may have been replaced or reconfigured.
        evictions.append(await check_eviction_policy_async(redis, allow=settings.allow_redis_eviction))
        return "reachable"

    async def workers_check() -> dict[str, object]:
        availability = await workers.availability(fresh=True)
        beats = await workers.heartbeats()
        if not beats:
            raise RuntimeError("no live model worker")
        entries = registry.served(benchmark_mode=settings.benchmark_mode)
        # A model a worker reported broken (e.g. missing weights) does not make the portal unready.
        missing = [m.key for m in entries if not (a := availability.get(m.key)) or (not a.available and not a.reasons)]
        if missing:
            raise RuntimeError(f"no warm worker serves {', '.join(missing)}")
        return {"live_workers": len(beats), "models": {k: v.workers for k, v in availability.items()}}

    # Side by side: both out of reach still answer within CHECK_SECONDS (and the workers' check's).
    postgresql, redis_state = await asyncio.gather(_check(db_check()), _check(redis_check()))
    checks = {"postgresql": postgresql, "redis": redis_state}
    eviction = evictions[0] if evictions else None
    if eviction is not None:
        checks["redis"]["eviction_policy"] = eviction.policy
    redis_down = not str(checks["redis"]["detail"]).startswith(EvictionPolicyRefused.__name__)
    checks["workers"] = (
        await _check(workers_check())
        if checks["redis"]["status"] == "ok"
        else {"status": "fail", "detail": "redis down" if redis_down else "redis refused"}
    )
    ok = all(c["status"] == "ok" for c in checks.values())
    warnings = [eviction.warning] if eviction is not None and eviction.warning else []
    warnings += postgres_warnings
    return JSONResponse(
        status_code=200 if ok else 503,
        content={"status": "ok" if ok else "fail", "checks": checks, "warnings": warnings},
    )
