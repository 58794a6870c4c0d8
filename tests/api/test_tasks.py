"""Background loops of an API process: they outlive failing steps and stop when told."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.exceptions
import sqlalchemy.exc

from api.app.core.errors import OutageLog
from api.app.core.tasks import run_every


async def test_a_loop_lives_through_outages_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    failures: list[Exception] = [
        redis.exceptions.ConnectionError("redis down"),
        sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("postgres down")),
        RuntimeError("a bug"),
    ]
    calls = 0
    stop = asyncio.Event()

    async def step() -> None:
        nonlocal calls
        calls += 1
        if failures:
            raise failures.pop(0)
        stop.set()

    with caplog.at_level(logging.ERROR):
        await asyncio.wait_for(run_every(0.01, step, name="a loop", stop=stop, outage_log=OutageLog(0)), 5)
    assert calls == 4
    assert "redis unavailable" in caplog.text and "postgresql unavailable" in caplog.text
    assert "a loop failed" in caplog.text and "a bug" in caplog.text


async def test_a_loop_runs_at_once_then_waits_its_interval_until_stopped() -> None:
    calls = 0
    stop = asyncio.Event()

    async def step() -> None:
        nonlocal calls
        calls += 1

    loop = asyncio.create_task(run_every(3600, step, name="hourly", stop=stop, outage_log=OutageLog(0)))
    await asyncio.sleep(0.2)
    assert calls == 1
    stop.set()
    await asyncio.wait_for(loop, 1)
    assert calls == 1
