"""Background loops of an API process: each runs a step now and then at its interval, and lives
through outages of the services the step uses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from api.app.core.errors import DB_ERRORS, REDIS_ERRORS, OutageLog

log = logging.getLogger("api.tasks")


async def run_every(
    seconds: float, step: Callable[[], Awaitable[None]], *, name: str, stop: asyncio.Event, outage_log: OutageLog
) -> None:
    """Runs ``step`` at once and then every ``seconds`` until ``stop`` is set. An outage of Redis or
    PostgreSQL goes to ``outage_log``; any other error is logged; neither ends the loop."""
    while not stop.is_set():
        try:
            await step()
        except REDIS_ERRORS as exc:
            outage_log.report("redis", exc)
        except DB_ERRORS as exc:
            outage_log.report("postgresql", exc)
        except Exception:
            log.exception("%s failed", name)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)
