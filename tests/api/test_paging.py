"""Keyset paging of the lists that grow with history: every row once, in order, at any depth,
even among rows created at the same instant; bad cursors and deep offsets are 422."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import httpx

from api.app.core.config import Settings
from api.app.core.paging import Cursor
from tests.conftest import Users
from tests.images import encode, split_colour


async def test_following_next_cursor_lists_every_upload_once_newest_first(
    client: httpx.AsyncClient, users: Users, settings: Settings
) -> None:
    me, headers = await users.create()
    uploaded = []
    for i in range(23):
        r = await client.post(
            "/v1/images", files={"file": (f"{i}.png", encode(split_colour(40 + i), "PNG"))}, headers=headers
        )
        assert r.status_code == 201, r.text
        uploaded.append(r.json()["id"])
    # Ten of them at the very same instant: the id orders them, and no page loses or repeats one.
    conn = await asyncpg.connect(settings.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(
            "UPDATE images SET created_at = now() - interval '1 hour' WHERE id = ANY($1::uuid[])",
            [uuid.UUID(i) for i in uploaded[5:15]],
        )
        expected = [
            str(r["id"])
            for r in await conn.fetch(
                "SELECT id FROM images WHERE owner_id = $1 ORDER BY created_at DESC, id DESC", me["id"]
            )
        ]
    finally:
        await conn.close()
    assert sorted(expected) == sorted(uploaded)

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, str | int | bool] = {"limit": 4}
        if cursor is not None:
            params["cursor"] = cursor
        r = await client.get("/v1/images", params=params, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["count"] is None  # not asked for
        seen += [i["id"] for i in body["data"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == expected and pages == 6
    counted = (await client.get("/v1/images", params={"total": True, "limit": 1}, headers=headers)).json()
    assert counted["count"] == 23 and counted["next_cursor"] is not None
    # Classic offset paging still answers, bounded.
    skipped = (await client.get("/v1/images", params={"skip": 20, "limit": 10}, headers=headers)).json()
    assert [i["id"] for i in skipped["data"]] == expected[20:] and skipped["next_cursor"] is None


async def test_a_cursor_is_only_one_this_api_gave_and_deep_offsets_are_refused(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str]
) -> None:
    _, headers = await users.create()
    valid = Cursor(datetime.now(UTC), uuid.uuid4()).encode()
    for path in ("/v1/images", "/v1/predictions", "/v1/feedback"):
        for cursor in ("nonsense", "", "MjAyNi0xMi0wMQ", "x" * 201, "bm90fGF8dXVpZA"):
            r = await client.get(path, params={"cursor": cursor}, headers=headers)
            assert r.status_code == 422, (path, cursor, r.text)
        r = await client.get(path, params={"cursor": valid, "skip": 5}, headers=headers)
        assert r.status_code == 422 and "either cursor or skip" in r.text
        assert (await client.get(path, params={"skip": 10_001}, headers=headers)).status_code == 422
        r = await client.get(path, params={"cursor": valid}, headers=headers)
        assert r.status_code == 200 and r.json()["data"] == [] and r.json()["next_cursor"] is None
