"""Data at scale: grow a throwaway database to months of use with SQL, then time the routes whose
cost could follow the history (statistics, list pages at any depth, the start of an export).

``python -m bench.scale`` (defaults: 1,000 users, 500,000 images and jobs, a million predictions,
100,000 verdicts over 90 days) prints a Markdown table of p50/p95 per route and writes it to
``docs/benchmarks/scale.md``. The suite's scale test (tests/bench/test_scale.py) grows the same
shape with ``grow`` and checks the same routes.

The routes are called in-process (httpx's ASGI transport): the times are the API's and
PostgreSQL's own, without a network hop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

log = logging.getLogger("bench.scale")

ROOT = Path(__file__).resolve().parent.parent
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
"""Where the throwaway database is made unless ``--admin-dsn`` or TEST_POSTGRES_ADMIN_DSN say otherwise."""
HEAVY_SHARE = 6
"""Every sixth image, job and prediction belongs to one heavy user: their lists are deep."""
MODELS = (("mobilenet_v2", 1), ("sketch", 3), ("resnet50", 1), ("sketch", 2))
"""Model versions the grown predictions name (two per job: the first two, or the last two)."""


@dataclass(frozen=True)
class Shape:
    users: int = 1_000
    images: int = 500_000
    """Also the number of jobs: one job per image (so a million predictions, two per job)."""
    predictions_per_job: int = 2
    feedback: int = 100_000
    days: int = 90


@dataclass(frozen=True)
class Grown:
    heavy_user_id: int
    heavy_email: str
    seconds: float


def _statements(shape: Shape, heavy_id: int) -> list[str]:
    n, users, days = shape.images, shape.users, shape.days
    # A few more candidates than verdicts: failed answers get none.
    step = max(1, int(n / (shape.feedback * 1.05)))
    return [
        # Users: scale-0 is the heavy one.
        f"""INSERT INTO users (email, name, hashed_password, role, is_active, updated_at, created_at)
            SELECT 'scale-' || i || '@example.com', 'Scale ' || i, (SELECT hashed_password FROM users
                   WHERE id = {heavy_id}), 'user', true, now(), now() - interval '{days} days'
            FROM generate_series(1, {users - 1}) AS i""",
        # Images and their jobs: spread over the days, a sixth of them the heavy user's.
        f"""CREATE TEMP TABLE grown_images AS
            SELECT i, gen_random_uuid() AS image_id, gen_random_uuid() AS job_id,
                   CASE WHEN i % {HEAVY_SHARE} = 0 THEN {heavy_id}
                        ELSE (SELECT min(id) FROM users WHERE email LIKE 'scale-%') + i % {users - 1} END AS owner_id,
                   now() - random() * interval '{days} days' AS created_at
            FROM generate_series(1, {n}) AS i""",
        # Planned with real row counts: without them the joins below loop over whole tables.
        "ANALYZE grown_images",
        """INSERT INTO images (id, owner_id, sha256, format, width, height, bytes, filename, created_at)
           SELECT image_id, owner_id, md5(i::text) || md5((i + 1)::text), 'JPEG', 640, 480, 120000,
                  'photo-' || i || '.jpg', created_at
           FROM grown_images""",
        """INSERT INTO jobs (id, owner_id, image_id, status, request_id, deadline_at, finished_at, created_at)
           SELECT job_id, owner_id, image_id, 'done', '', created_at + interval '30 seconds',
                  created_at + interval '1 second', created_at
           FROM grown_images""",
        # Predictions: mostly done with a log-normal-ish latency, some failed or from the cache.
        f"""INSERT INTO predictions (id, job_id, position, model_name, model_version, status, label, score, top_k,
                                     cached, random_weights, total_ms, inference_ms, finished_at, created_at)
            SELECT gen_random_uuid(), g.job_id, p,
                   (ARRAY{[m for m, _ in MODELS]})[1 + (g.i % 2) * 2 + p],
                   (ARRAY{[v for _, v in MODELS]})[1 + (g.i % 2) * 2 + p],
                   CASE WHEN g.i % 97 = 0 THEN 'failed' ELSE 'done' END,
                   CASE WHEN g.i % 97 = 0 THEN NULL ELSE 'label_' || (g.i % 50) END,
                   CASE WHEN g.i % 97 = 0 THEN NULL ELSE 0.5 + random() / 2 END,
                   '[]'::jsonb, g.i % 10 = 0, false,
                   CASE WHEN g.i % 97 = 0 THEN NULL ELSE 30 * exp(random() * 3 - 1) END,
                   CASE WHEN g.i % 97 = 0 THEN NULL ELSE 10 * exp(random() * 2 - 1) END,
                   g.created_at + interval '1 second', g.created_at
            FROM grown_images g, generate_series(0, {shape.predictions_per_job - 1}) AS p""",
        "ANALYZE predictions",
        # Verdicts on first answers: a third of them say "wrong" with another label.
        f"""INSERT INTO feedback (id, owner_id, prediction_id, is_correct, correct_label, predicted_class, score,
                                  model_name, model_version, predicted_label, created_at)
            SELECT gen_random_uuid(), g.owner_id, p.id, (g.i / {step}) % 3 <> 0,
                   CASE WHEN (g.i / {step}) % 3 <> 0 THEN p.label ELSE 'label_' || ((g.i / 7) % 50) END,
                   p.label, p.score, p.model_name, p.model_version, p.label,
                   g.created_at + interval '1 minute'
            FROM grown_images g JOIN predictions p ON p.job_id = g.job_id AND p.position = 0
            WHERE p.status = 'done' AND g.i % {step} = 1
            LIMIT {shape.feedback}""",
        "DROP TABLE grown_images",
    ]


async def grow(dsn: str, shape: Shape = Shape(), *, password_hash_from: str) -> Grown:
    """Adds ``shape``'s rows to the migrated database at ``dsn`` (a plain ``postgresql://`` DSN)
    with set-based SQL, rolls the statistics' changes up and analyzes (the summaries vacuumed
    too, as the API does now and then); the heavy user's password is the one of the existing user
    ``password_hash_from`` (an email), so a test can log in as them. Returns who the heavy user is."""
    start = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        heavy_email = f"scale-heavy-{uuid.uuid4().hex[:6]}@example.com"
        heavy_id = await conn.fetchval(
            """INSERT INTO users (email, name, hashed_password, role, is_active, updated_at, created_at)
               SELECT $1, 'Heavy user', hashed_password, 'user', true, now(), now() FROM users WHERE email = $2
               RETURNING id""",
            heavy_email,
            password_hash_from,
        )
        if heavy_id is None:
            raise ValueError(f"no user {password_hash_from} to copy a password from")
        async with conn.transaction():
            for statement in _statements(shape, heavy_id):
                began = time.perf_counter()
                await conn.execute(statement)
                log.info("%.1f s: %s", time.perf_counter() - began, " ".join(statement.split())[:70])
        # What the API's periodic roll-up and autovacuum do on a portal that has been running.
        from api.app.stats.service import ROLL_UP, SUMMARIES

        await conn.execute(ROLL_UP.text)
        await conn.execute(f"VACUUM ANALYZE {', '.join(SUMMARIES)}")
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return Grown(heavy_user_id=heavy_id, heavy_email=heavy_email, seconds=time.perf_counter() - start)


@dataclass(frozen=True)
class Timing:
    route: str
    p50_ms: float
    p95_ms: float


async def time_route(name: str, call: Callable[[], Awaitable[object]], *, repeat: int = 20) -> Timing:
    """p50 and p95 (ms) of ``repeat`` calls after one warm-up call."""
    await call()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return Timing(name, statistics.median(samples), samples[max(0, int(0.95 * len(samples)) - 1)])


def table(timings: list[Timing], shape: Shape) -> str:
    """The stress report's "data at scale" table."""
    lines = [
        f"Grown: {shape.users:,} users, {shape.images:,} images and jobs, "
        f"{shape.images * shape.predictions_per_job:,} predictions, {shape.feedback:,} verdicts over {shape.days} days "
        f"(the heavy user owns one sixth).",
        "",
        "| route | p50 ms | p95 ms |",
        "|---|---|---|",
    ]
    lines += [f"| {t.route} | {t.p50_ms:.1f} | {t.p95_ms:.1f} |" for t in timings]
    return "\n".join(lines) + "\n"


async def _cursor_at(dsn: str, table: str, where: str, depth: int) -> str:
    """The cursor a client holds after paging ``depth`` rows into ``table`` (newest first)."""
    from api.app.core.paging import Cursor

    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            f"SELECT created_at, id FROM {table} WHERE {where} ORDER BY created_at DESC, id DESC OFFSET $1 LIMIT 1",
            depth,
        )
    finally:
        await conn.close()
    assert row is not None, f"{table} has fewer than {depth} rows"
    return Cursor(row["created_at"], row["id"]).encode()


async def measure(
    shape: Shape,
    *,
    base: Any = None,
    admin_dsn: str = ADMIN_DSN,
    repeat: int = 20,
) -> list[Timing]:
    """Grows a throwaway database (dropped afterwards; created through ``admin_dsn``) to
    ``shape`` under an API in this process with ``base``'s other settings (Settings; default: the
    environment's) and times its routes."""
    import httpx
    from asgi_lifespan import LifespanManager

    from api.app.core.config import Settings
    from api.app.main import create_app
    from api.prestart import migrate, seed_admin, seed_registry

    name = f"portal_scale_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_dsn)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    dsn = admin_dsn.rsplit("/", 1)[0] + f"/{name}"
    try:
        base = base if base is not None else Settings()
        settings = base.model_copy(update={"database_url": dsn.replace("postgresql://", "postgresql+asyncpg://")})
        await asyncio.to_thread(migrate, settings.database_url)
        await seed_admin(settings)
        await seed_registry(settings)
        grown = await grow(dsn, shape, password_hash_from=settings.first_admin_email)
        print(f"grown in {grown.seconds:.1f} s")
        app = create_app(settings)
        async with LifespanManager(app, startup_timeout=60):
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
            async with httpx.AsyncClient(transport=transport, base_url="http://scale", timeout=60) as client:
                return await _time_routes(client, settings, grown, dsn, shape, repeat)
    finally:
        conn = await asyncpg.connect(admin_dsn)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


async def _time_routes(
    client: Any,
    settings: Any,
    grown: Grown,
    dsn: str,
    shape: Shape,
    repeat: int,
) -> list[Timing]:
    async def login(email: str) -> dict[str, str]:
        r = await client.post("/login", data={"username": email, "password": settings.first_admin_password})
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['access_token']}"}

    admin, user = await login(settings.first_admin_email), await login(grown.heavy_email)
    deep = shape.images // HEAVY_SHARE - 100
    owner = f"owner_id = {grown.heavy_user_id}"
    cursors = {
        "images": await _cursor_at(dsn, "images", owner, deep),
        "jobs": await _cursor_at(dsn, "jobs", owner, deep),
        "feedback": await _cursor_at(dsn, "feedback", "true", shape.feedback - 100),
    }

    def get(path: str, headers: dict[str, str], **params: object) -> Callable[[], Awaitable[object]]:
        async def call() -> object:
            r = await client.get(path, params=params, headers=headers)
            assert r.status_code == 200, (path, r.status_code, r.text[:300])
            return r

        return call

    timings = [
        await time_route("GET /v1/admin/stats?days=1", get("/v1/admin/stats", admin, days=1), repeat=repeat),
        await time_route("GET /v1/admin/stats?days=30", get("/v1/admin/stats", admin, days=30), repeat=repeat),
        await time_route("GET /v1/admin/stats?days=365", get("/v1/admin/stats", admin, days=365), repeat=repeat),
        await time_route("GET /v1/images, first page", get("/v1/images", user), repeat=repeat),
        await time_route(
            f"GET /v1/images, page at row {deep:,}", get("/v1/images", user, cursor=cursors["images"]), repeat=repeat
        ),
        await time_route("GET /v1/predictions, first page", get("/v1/predictions", user), repeat=repeat),
        await time_route(
            f"GET /v1/predictions, page at row {deep:,}",
            get("/v1/predictions", user, cursor=cursors["jobs"]),
            repeat=repeat,
        ),
        await time_route(
            "GET /v1/feedback?all_users=true, first page", get("/v1/feedback", admin, all_users=True), repeat=repeat
        ),
        await time_route(
            f"GET /v1/feedback?all_users=true, page at row {shape.feedback - 100:,}",
            get("/v1/feedback", admin, all_users=True, cursor=cursors["feedback"]),
            repeat=repeat,
        ),
    ]

    async def start_export() -> object:
        r = await client.post("/v1/admin/exports", json={"model": "mobilenet_v2"}, headers=admin)
        assert r.status_code == 202, r.text
        return r

    # Last: each start queues an export of the whole history, which then runs in the background.
    timings.append(await time_route("POST /v1/admin/exports (start)", start_export, repeat=repeat))
    return timings


async def _main(args: argparse.Namespace) -> None:
    shape = Shape(users=args.users, images=args.images, feedback=args.feedback, days=args.days)
    timings = await measure(shape, admin_dsn=args.admin_dsn)
    text = table(timings, shape)
    print(text)
    out = ROOT / "docs" / "benchmarks" / "scale.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Data at scale\n\nMeasured by `python -m bench.scale`.\n\n" + text)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's shape and ``admin_dsn`` (``--admin-dsn``, else TEST_POSTGRES_ADMIN_DSN,
    else ADMIN_DSN)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=Shape.users)
    parser.add_argument("--images", type=int, default=Shape.images)
    parser.add_argument("--feedback", type=int, default=Shape.feedback)
    parser.add_argument("--days", type=int, default=Shape.days)
    parser.add_argument(
        "--admin-dsn",
        default=os.environ.get("TEST_POSTGRES_ADMIN_DSN", ADMIN_DSN),
        help="the server and role that create and drop the throwaway database "
        "(default: TEST_POSTGRES_ADMIN_DSN, else %(default)s)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(_main(arguments()))
