"""Keyset paging of the lists that grow with history: every row once, in order, at any depth,
even among rows created at the same instant; bad cursors and deep offsets are 422."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy import event, text

from api.app.core.config import Settings
from api.app.core.paging import Cursor, KeysetPage
from api.app.images import service as images_service
from api.app.images.schemas import ImageSource
from api.app.main import create_app
from contracts import keys
from tests.conftest import PASSWORD, Users, client_for, login
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


async def test_pages_of_jobs_carry_every_answer_in_order_and_show_taken_ones_as_running(
    client: httpx.AsyncClient, users: Users, settings: Settings
) -> None:
    me, headers = await users.create()
    conn = await asyncpg.connect(settings.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        # 11 jobs, four of them at the same instant; job k has k % 3 answers (none, one, two).
        await conn.execute("""
            CREATE TEMP TABLE seeded AS
            SELECT k, gen_random_uuid() AS image_id, gen_random_uuid() AS job_id,
                   now() - CASE WHEN k BETWEEN 3 AND 6 THEN interval '1 hour' ELSE k * interval '1 minute' END AS at
            FROM generate_series(0, 10) AS k;
            INSERT INTO images (id, owner_id, sha256, format, width, height, bytes, filename, created_at)
            SELECT image_id, $1, md5(k::text) || md5(k::text), 'PNG', 1, 1, 1, '', at FROM seeded;
            INSERT INTO jobs (id, owner_id, image_id, status, request_id, deadline_at, created_at)
            SELECT job_id, $1, image_id, CASE WHEN k = 4 THEN 'queued' ELSE 'done' END, '', at + interval '1 day', at
            FROM seeded;
            INSERT INTO predictions (id, job_id, position, model_name, model_version, status, label, score, top_k,
                                     cached, random_weights, total_ms, created_at)
            SELECT gen_random_uuid(), job_id, p, 'm' || p, 1, CASE WHEN k = 4 THEN 'queued' ELSE 'done' END,
                   CASE WHEN k = 4 THEN NULL ELSE 'cat' || p END, CASE WHEN k = 4 THEN NULL ELSE 0.5 END,
                   CASE WHEN k = 4 THEN '[]'::jsonb ELSE '[{"label": "cat", "score": 0.5}]'::jsonb END,
                   false, false, CASE WHEN k = 4 THEN NULL ELSE 7.5 END, at
            FROM seeded, generate_series(0, 2) AS p WHERE p < k % 3;
            """.replace("$1", str(me["id"])))
        expected = [
            str(r["id"])
            for r in await conn.fetch(
                "SELECT id FROM jobs WHERE owner_id = $1 ORDER BY created_at DESC, id DESC", me["id"]
            )
        ]
        answers = {
            str(r["job_id"]): r["models"]
            for r in await conn.fetch(
                "SELECT job_id, array_agg(model_name ORDER BY position) AS models FROM predictions p "
                "JOIN jobs j ON j.id = p.job_id WHERE j.owner_id = $1 GROUP BY job_id",
                me["id"],
            )
        }
        taken = await conn.fetchval(
            "SELECT p.id FROM predictions p JOIN jobs j ON j.id = p.job_id WHERE j.status = 'queued' AND j.owner_id = $1",
            me["id"],
        )
    finally:
        await conn.close()
    redis = Redis.from_url(settings.redis_url)
    try:
        await redis.set(keys.job_running_key(str(taken)), "worker", ex=60)
        seen: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, str | int] = {"limit": 4}
            if cursor is not None:
                params["cursor"] = cursor
            r = await client.get("/v1/predictions", params=params, headers=headers)
            assert r.status_code == 200, r.text
            seen += r.json()["data"]
            cursor = r.json()["next_cursor"]
            if cursor is None:
                break
    finally:
        await redis.delete(keys.job_running_key(str(taken)))
        await redis.aclose()
    assert [j["job_id"] for j in seen] == expected
    assert {j["job_id"]: [a["model"] for a in j["results"]] for j in seen if j["results"]} == answers
    by_status = {j["job_id"]: j for j in seen}
    running = [j for j in seen if j["status"] == "running"]
    assert len(running) == 1 and [a["status"] for a in running[0]["results"]] == ["running"]
    done = next(j for j in by_status.values() if len(j["results"]) == 2)
    assert done["results"][1] | {"id": None} == {
        "id": None,
        "model": "m1",
        "version": 1,
        "status": "done",
        "label": "cat1",
        "score": 0.5,
        "top_k": [{"label": "cat", "score": 0.5}],
        "cached": False,
        "random_weights": False,
        "error": None,
        "timings": {"queue_ms": None, "preprocess_ms": None, "inference_ms": None, "total_ms": 7.5, "batch_size": None},
    }
    counted = (await client.get("/v1/predictions", params={"total": True, "limit": 2}, headers=headers)).json()
    assert counted["count"] == 11 and len(counted["data"]) == 2
    # The seeded uploads have no files: no other test's recovery should meet their queued job.
    conn = await asyncpg.connect(settings.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute("DELETE FROM images WHERE owner_id = $1", me["id"])
    finally:
        await conn.close()


async def _insert_job(conn: asyncpg.Connection, owner_id: int, status: str) -> tuple[uuid.UUID, uuid.UUID]:
    """A job of ``status`` on a new one-pixel image of ``owner_id``, written straight to the
    database; (image id, job id)."""
    image_id, job_id = uuid.uuid4(), uuid.uuid4()
    await conn.execute(
        "INSERT INTO images (id, owner_id, sha256, format, width, height, bytes, filename, created_at)"
        " VALUES ($1, $2, $3, 'PNG', 1, 1, 1, '', now())",
        image_id,
        owner_id,
        uuid.uuid4().hex * 2,
    )
    await conn.execute(
        "INSERT INTO jobs (id, owner_id, image_id, status, request_id, deadline_at, created_at)"
        " VALUES ($1, $2, $3, $4, '', now() + interval '1 day', now())",
        job_id,
        owner_id,
        image_id,
        status,
    )
    return image_id, job_id


async def test_a_page_of_jobs_keeps_every_digit_of_its_floats_whatever_the_database_is_set_to(
    users: Users, settings: Settings
) -> None:
    """The page is built as JSON text by PostgreSQL, whose floats follow extra_float_digits (0 in
    some databases and roles: 15 significant digits). The page must still say exactly what the
    single job says (read in binary), as the ORM-built page did."""
    me, _ = await users.create()
    dsn = settings.database_url.replace("postgresql+asyncpg://", "postgresql://")
    database = dsn.rsplit("/", 1)[1]
    conn = await asyncpg.connect(dsn)
    try:
        image_id, job_id = await _insert_job(conn, me["id"], "done")
        await conn.execute(
            "INSERT INTO predictions (id, job_id, position, model_name, model_version, status, label, score, top_k,"
            " cached, random_weights, total_ms, created_at)"
            " VALUES (gen_random_uuid(), $1, 0, 'm', 1, 'done', 'cat', 0.1::float8 + 0.2::float8,"
            ' \'[{"label": "cat", "score": 0.30000000000000004}]\', false, false, 1.0::float8 / 3, now())',
            job_id,
        )
        await conn.execute(f'ALTER DATABASE "{database}" SET extra_float_digits = 0')
        try:
            # A new app: its connections open with the database's setting.
            async for client in client_for(create_app(settings)):
                headers = await login(client, me["email"], PASSWORD)
                one = (await client.get(f"/v1/predictions/{job_id}", headers=headers)).json()
                page = (await client.get("/v1/predictions", headers=headers)).json()
        finally:
            await conn.execute(f'ALTER DATABASE "{database}" RESET extra_float_digits')
        await conn.execute("DELETE FROM images WHERE id = $1", image_id)
    finally:
        await conn.close()
    assert one["results"][0]["score"] == 0.1 + 0.2 and one["results"][0]["timings"]["total_ms"] == 1 / 3
    assert page["data"] == [one]


async def test_an_answer_whose_top_k_is_json_null_reads_as_no_top_k_on_a_page_as_alone(
    client: httpx.AsyncClient, users: Users, settings: Settings
) -> None:
    """A JSONB ``null`` (what the ORM writes for None) read as [] in the ORM-built page, as the
    single job still reads it; one such answer must not make every page holding it a 500."""
    me, headers = await users.create()
    conn = await asyncpg.connect(settings.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        image_id, job_id = await _insert_job(conn, me["id"], "failed")
        await conn.execute(
            "INSERT INTO predictions (id, job_id, position, model_name, model_version, status, top_k, cached,"
            " random_weights, created_at) VALUES (gen_random_uuid(), $1, 0, 'm', 1, 'failed', 'null', false, false, now())",
            job_id,
        )
        one = await client.get(f"/v1/predictions/{job_id}", headers=headers)
        page = await client.get("/v1/predictions", headers=headers)
        await conn.execute("DELETE FROM images WHERE id = $1", image_id)
    finally:
        await conn.close()
    assert one.status_code == 200 and one.json()["results"][0]["top_k"] == []
    assert page.status_code == 200, page.text
    assert page.json()["data"] == [one.json()]


@pytest.mark.parametrize("source", ["batch", "upload"])
async def test_a_page_of_one_source_reads_no_row_of_the_other(
    client: httpx.AsyncClient, app: FastAPI, users: Users, settings: Settings, source: ImageSource
) -> None:
    """21,000 images of one person, one in 700 a batch file: the first page of either source reads
    an index of that source alone. Filtering the owner's index instead read (and dropped) every
    upload to fill a page of batch files, a cost that grew with the person's history."""
    me, _ = await users.create()
    async with app.state.sessionmaker() as session:
        await session.execute(
            text(
                "INSERT INTO images (id, owner_id, sha256, format, width, height, bytes, filename, source, created_at)"
                " SELECT gen_random_uuid(), :owner, md5(g::text) || md5(g::text), 'PNG', 1, 1, 1, '',"
                " CASE WHEN g % 700 = 0 THEN 'batch' ELSE 'upload' END, now() - make_interval(secs => g)"
                " FROM generate_series(1, 21000) g"
            ),
            {"owner": me["id"]},
        )
        await session.commit()
    conn = await asyncpg.connect(settings.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        # Autovacuum may be off: the planner must know the table as it is now.
        await conn.execute("ANALYZE images")
        statements: list[tuple[str, Any]] = []

        def sent(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
            statements.append((statement, parameters))

        engine = app.state.engine.sync_engine
        event.listen(engine, "before_cursor_execute", sent)
        try:
            async with app.state.sessionmaker() as session:
                rows, _, _ = await images_service.list_images(
                    session=session, owner_id=me["id"], page=KeysetPage(limit=50), source=source
                )
        finally:
            event.remove(engine, "before_cursor_execute", sent)
        assert len(rows) == (30 if source == "batch" else 50) and {r.source for r in rows} == {source}
        [(statement, parameters)] = [s for s in statements if "FROM images" in s[0]]
        explained = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", *parameters)
    finally:
        await conn.close()

    def removed(node: dict[str, Any]) -> int:
        return int(node.get("Rows Removed by Filter", 0)) + sum(removed(n) for n in node.get("Plans", []))

    plan = json.loads(explained)[0]["Plan"]
    assert removed(plan) == 0, json.dumps(plan, indent=1)
