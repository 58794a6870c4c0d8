from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.app.deps import RegistryDep, SettingsDep

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live")
async def live() -> dict[str, str]:
    """The process is up (no I/O)."""
    return {"status": "ok"}


async def _check(coro) -> dict[str, object]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    try:
        detail = await coro
        status = "ok"
    except Exception as exc:  # a readiness check reports every failure instead of raising
        detail, status = f"{type(exc).__name__}: {exc}", "fail"
    return {"status": status, "latency_ms": round((time.perf_counter() - start) * 1000, 2), "detail": detail}


@router.get("/ready", responses={503: {"description": "Not ready; the body says which check failed"}})
async def ready(request: Request, registry: RegistryDep, settings: SettingsDep) -> JSONResponse:
    """Ready: PostgreSQL and Redis answer, and a warm worker serves every available model."""
    state = request.app.state

    async def db() -> str:
        async with state.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return "reachable"

    async def redis() -> str:
        await state.redis.ping()
        return "reachable"

    async def workers() -> dict[str, object]:
        availability = await state.workers.availability(fresh=True)
        beats = await state.workers.heartbeats()
        if not beats:
            raise RuntimeError("no live model worker")
        entries = registry.served(benchmark_mode=settings.benchmark_mode)
        # A model a worker reported broken (e.g. missing weights) does not make the portal unready.
        missing = [m.key for m in entries if not (a := availability.get(m.key)) or (not a.available and not a.reasons)]
        if missing:
            raise RuntimeError(f"no warm worker serves {', '.join(missing)}")
        return {"live_workers": len(beats), "models": {k: v.workers for k, v in availability.items()}}

    checks = {"postgresql": await _check(db()), "redis": await _check(redis())}
    checks["workers"] = (
        await _check(workers()) if checks["redis"]["status"] == "ok" else {"status": "fail", "detail": "redis down"}
    )
    ok = all(c["status"] == "ok" for c in checks.values())
    return JSONResponse(status_code=200 if ok else 503, content={"status": "ok" if ok else "fail", "checks": checks})
