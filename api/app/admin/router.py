from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from api.app.admin import service
from api.app.admin.schemas import Stats
from api.app.core.responses import ADMIN
from api.app.deps import AdminUser, ReadSessionDep, RedisDep, RegistryDep, SettingsDep
from api.app.predictions import queue

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/stats", response_model=Stats, responses=ADMIN)
async def stats(
    request: Request,
    _: AdminUser,
    session: ReadSessionDep,
    redis: RedisDep,
    registry: RegistryDep,
    settings: SettingsDep,
    days: Annotated[int, Query(ge=1, le=365)] = 30,
) -> Stats:
    """Predictions per day, latency percentiles, accuracy from feedback, most corrected labels (admin)."""
    depth = {
        m.key: await queue.depth(redis, m.name, m.version)
        for m in registry.served(benchmark_mode=settings.benchmark_mode)
    }
    return Stats(
        predictions_per_day=await service.predictions_per_day(session, days),
        latency=await service.latency(session, days),
        accuracy=await service.accuracy(session),
        most_corrected=await service.most_corrected(session, 10),
        queue_depth=depth,
        live_workers=len(await request.app.state.workers.heartbeats()),
    )
