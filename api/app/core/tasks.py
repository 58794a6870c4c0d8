"""Background loops of an API process: each runs a step now and then at its interval, and lives
through outages of the services the step uses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from api.app.core.errors import OutageLog, lock_not_available, outage_of

log = logging.getLogger("api.tasks")


async def run_every(
    seconds: float, step: Callable[[], Awaitable[None]], *, name: str, stop: asyncio.Event, outage_log: OutageLog
) -> None:
    """Runs ``step`` at once and then every ``seconds`` until ``stop`` is set. An outage of Redis or
    PostgreSQL (refusing or hanging: ``errors.outage_of``) goes to ``outage_log``; a lock wait past
    ``lock_timeout`` is one warning line; any other error is logged with its traceback; none ends
    the loop."""
    while not stop.is_set():
        try:
            await step()
        except Exception as exc:
            if dependency := outage_of(exc):
                outage_log.report(dependency, exc)
            elif lock_not_available(exc):
                # Another transaction held a lock past lock_timeout (a long account deletion):
                # the step is tried again at its next turn.
                log.warning("%s waited too long for a lock; tried again in %g s", name, seconds)
            else:
                log.exception("%s failed", name)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)
