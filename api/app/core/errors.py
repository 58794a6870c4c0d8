"""Outages of PostgreSQL or Redis become 503 answers with one log line per interval."""

from __future__ import annotations

import logging
import time

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from contracts.streams import REDIS_ERRORS

log = logging.getLogger("api.outage")


class ErrorOut(BaseModel):
    detail: str


class OutageLog:
    """Logs a dependency outage at most once per interval, so an outage is not a log storm."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def report(self, dependency: str, error: BaseException) -> None:
        now = time.monotonic()
        if now - self._last.get(dependency, -self.interval) < self.interval:
            self._suppressed[dependency] = self._suppressed.get(dependency, 0) + 1
            return
        suppressed = self._suppressed.pop(dependency, 0)
        self._last[dependency] = now
        log.error(
            "%s unavailable: %s: %s (%d similar errors since the last line)",
            dependency,
            type(error).__name__,
            error,
            suppressed,
        )


DB_ERRORS = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    ConnectionError,
    OSError,
)


def unavailable(detail: str, retry_after: int) -> JSONResponse:
    return JSONResponse(status_code=503, content={"detail": detail}, headers={"Retry-After": str(retry_after)})


def install_outage_handlers(app: FastAPI, outage_log: OutageLog, retry_after: int) -> None:
    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        outage_log.report("redis", exc)
        return unavailable("The job queue (Redis) is unavailable; retry shortly.", retry_after)

    async def db_down(request: Request, exc: Exception) -> JSONResponse:
        outage_log.report("postgresql", exc)
        return unavailable("The database is unavailable; retry shortly.", retry_after)

    for redis_error in REDIS_ERRORS:
        app.add_exception_handler(redis_error, redis_down)
    for db_error in DB_ERRORS:
        app.add_exception_handler(db_error, db_down)
    app.add_exception_handler(sqlalchemy.exc.DBAPIError, db_down)
