"""The API's database pool."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI
from sqlalchemy import event


async def test_a_burst_of_requests_opens_no_connection(
    app: FastAPI, client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    """The pool is opened at start-up and has no overflow: 50 requests at once wait their turn
    for the pooled connections instead of opening more. An overflow connection is closed when it
    is handed back, so under sustained load each use of one was a new connection."""
    engine = app.state.engine.sync_engine
    opened: list[object] = []

    def on_connect(dbapi_connection: object, record: object) -> None:
        opened.append(dbapi_connection)

    event.listen(engine, "connect", on_connect)
    try:
        answers = await asyncio.gather(*(client.get("/user/", headers=admin_headers) for _ in range(50)))
    finally:
        event.remove(engine, "connect", on_connect)
    assert [r.status_code for r in answers] == [200] * 50
    assert opened == []
