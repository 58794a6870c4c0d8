"""The statistics' summaries: always equal to a count over the current rows, whatever wrote,
changed or deleted them; latency percentiles from the histogram within their stated error."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator
from datetime import date

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.app.core.config import Settings
from api.app.core.db import make_engine, make_sessionmaker
from api.app.stats import service
from api.app.stats.models import LATENCY_RELATIVE_ERROR, latency_bucket

GROUPED_PREDICTIONS = """
    SELECT (created_at AT TIME ZONE 'UTC')::date AS day, model_name, model_version, status,
           latency_bucket(status, cached, total_ms) AS bucket, count(*) AS n
    FROM predictions GROUP BY 1, 2, 3, 4, 5
"""
SUMMARISED_PREDICTIONS = """
    SELECT day, model_name, model_version, status, latency_bucket AS bucket, sum(predictions) AS n FROM (
        SELECT * FROM prediction_stats UNION ALL SELECT * FROM prediction_stat_deltas
    ) s GROUP BY 1, 2, 3, 4, 5 HAVING sum(predictions) <> 0
"""
GROUPED_COUNTS = """
    SELECT (created_at AT TIME ZONE 'UTC')::date AS day, model_name, model_version, status, count(*) AS n
    FROM predictions GROUP BY 1, 2, 3, 4
"""
SUMMARISED_COUNTS = """
    SELECT day, model_name, model_version, status, sum(predictions) AS n FROM (
        SELECT day, model_name, model_version, status, predictions FROM prediction_counts
        UNION ALL SELECT day, model_name, model_version, status, predictions FROM prediction_stat_deltas
    ) s GROUP BY 1, 2, 3, 4 HAVING sum(predictions) <> 0
"""
GROUPED_VERDICTS = """
    SELECT (created_at AT TIME ZONE 'UTC')::date AS day, model_name, model_version, is_correct, count(*) AS n
    FROM feedback WHERE model_name IS NOT NULL AND is_correct IS NOT NULL GROUP BY 1, 2, 3, 4
"""
SUMMARISED_VERDICTS = """
    SELECT day, model_name, model_version, is_correct, sum(verdicts) AS n FROM (
        SELECT day, model_name, model_version, is_correct, verdicts FROM verdict_stats
        UNION ALL SELECT day, model_name, model_version, is_correct, verdicts FROM verdict_stat_deltas
    ) s GROUP BY 1, 2, 3, 4 HAVING sum(verdicts) <> 0
"""
GROUPED_MONTHS = """
    SELECT date_trunc('month', created_at AT TIME ZONE 'UTC')::date AS month, model_name, model_version,
           latency_bucket(status, cached, total_ms) AS bucket, count(*) AS n
    FROM predictions WHERE latency_bucket(status, cached, total_ms) >= 0 GROUP BY 1, 2, 3, 4
"""
SUMMARISED_MONTHS = """
    SELECT month, model_name, model_version, bucket, sum(n) AS n FROM (
        SELECT month, model_name, model_version, latency_bucket AS bucket, predictions AS n
        FROM prediction_latency_months
        UNION ALL SELECT date_trunc('month', day)::date, model_name, model_version, latency_bucket, predictions
        FROM prediction_stat_deltas WHERE latency_bucket >= 0
    ) s GROUP BY 1, 2, 3, 4 HAVING sum(n) <> 0
"""
GROUPED_CORRECTIONS = """
    SELECT model_name, model_version, coalesce(predicted_label, '') AS p, coalesce(correct_label, '') AS c, count(*) AS n
    FROM feedback WHERE model_name IS NOT NULL AND is_correct = false GROUP BY 1, 2, 3, 4
"""
SUMMARISED_CORRECTIONS = """
    SELECT model_name, model_version, predicted_label AS p, correct_label AS c, sum(verdicts) AS n FROM (
        SELECT model_name, model_version, predicted_label, correct_label, verdicts FROM correction_stats
        UNION ALL SELECT model_name, model_version, predicted_label, correct_label, verdicts
        FROM verdict_stat_deltas WHERE NOT is_correct
    ) s GROUP BY 1, 2, 3, 4 HAVING sum(verdicts) <> 0
"""


@pytest.fixture
async def database(fresh_settings: Settings) -> AsyncIterator[tuple[str, async_sessionmaker[AsyncSession]]]:
    """A migrated database of its own (a plain DSN for asyncpg) and sessions on it."""
    engine = make_engine(fresh_settings)
    try:
        yield fresh_settings.database_url.replace("postgresql+asyncpg://", "postgresql://"), make_sessionmaker(engine)
    finally:
        await engine.dispose()


async def rows(conn: asyncpg.Connection, sql: str) -> set[tuple[object, ...]]:
    return {tuple(r) for r in await conn.fetch(sql)}


async def assert_summaries_match(conn: asyncpg.Connection) -> None:
    assert await rows(conn, SUMMARISED_PREDICTIONS) == await rows(conn, GROUPED_PREDICTIONS)
    assert await rows(conn, SUMMARISED_COUNTS) == await rows(conn, GROUPED_COUNTS)
    assert await rows(conn, SUMMARISED_MONTHS) == await rows(conn, GROUPED_MONTHS)
    assert await rows(conn, SUMMARISED_VERDICTS) == await rows(conn, GROUPED_VERDICTS)
    assert await rows(conn, SUMMARISED_CORRECTIONS) == await rows(conn, GROUPED_CORRECTIONS)


async def seed(conn: asyncpg.Connection, jobs: int, days: int = 10) -> None:
    """Two users, ``jobs`` images and jobs, two queued predictions per job over ``days`` days."""
    await conn.execute("""
        INSERT INTO users (email, name, hashed_password, role, is_active, updated_at, created_at)
        VALUES ('a@example.com', 'a', 'x', 'user', true, now(), now()),
               ('b@example.com', 'b', 'x', 'user', true, now(), now())
        """)
    await conn.execute(f"""
        CREATE TEMP TABLE seeded AS
        SELECT i, gen_random_uuid() AS image_id, gen_random_uuid() AS job_id,
               (SELECT min(id) FROM users) + i % 2 AS owner_id,
               now() - (i % {days}) * interval '1 day' - interval '1 minute' AS created_at
        FROM generate_series(1, {jobs}) AS i;
        INSERT INTO images (id, owner_id, sha256, format, width, height, bytes, filename, created_at)
        SELECT image_id, owner_id, md5(i::text) || md5(i::text), 'PNG', 1, 1, 1, '', created_at FROM seeded;
        INSERT INTO jobs (id, owner_id, image_id, status, request_id, deadline_at, created_at)
        SELECT job_id, owner_id, image_id, 'queued', '', created_at + interval '1 hour', created_at FROM seeded;
        INSERT INTO predictions (id, job_id, position, model_name, model_version, status, top_k, cached,
                                 random_weights, created_at)
        SELECT gen_random_uuid(), job_id, p, 'm' || p, 1 + i % 2, 'queued', '[]', false, false, created_at
        FROM seeded, generate_series(0, 1) AS p;
        """)


async def test_summaries_equal_a_count_over_the_rows_through_every_kind_of_change(
    database: tuple[str, async_sessionmaker[AsyncSession]],
) -> None:
    dsn, sessions = database
    conn = await asyncpg.connect(dsn)
    try:
        await seed(conn, 400)
        # Answers arrive one statement at a time and in sets, some from the cache, some failing.
        await conn.execute("""
            UPDATE predictions SET status = 'done', label = 'cat', total_ms = 5 + (random() * 500),
                   cached = (position = 1 AND random() < 0.2)
            WHERE id IN (SELECT id FROM predictions ORDER BY id LIMIT 500)
            """)
        for pid in await conn.fetch("SELECT id FROM predictions WHERE status = 'queued' LIMIT 20"):
            await conn.execute("UPDATE predictions SET status = 'failed', error = 'x' WHERE id = $1", pid["id"])
        await conn.execute("UPDATE predictions SET status = 'expired' WHERE status = 'queued' AND position = 1")
        # A change that moves no count (a label corrected) records nothing.
        before = await conn.fetchval("SELECT count(*) FROM prediction_stat_deltas")
        await conn.execute("UPDATE predictions SET label = 'dog' WHERE label = 'cat'")
        assert await conn.fetchval("SELECT count(*) FROM prediction_stat_deltas") == before
        # Verdicts as the API stores them: given, replaced by the same person, then others.
        await conn.execute("""
            INSERT INTO feedback (id, owner_id, prediction_id, is_correct, correct_label, model_name, model_version,
                                  predicted_label, created_at)
            SELECT gen_random_uuid(), j.owner_id, p.id, random() < 0.5, 'cat', p.model_name, p.model_version,
                   p.label, now() - interval '2 days'
            FROM predictions p JOIN jobs j ON j.id = p.job_id WHERE p.status = 'done'
            """)
        await conn.execute("""
            INSERT INTO feedback (id, owner_id, prediction_id, is_correct, correct_label, model_name, model_version,
                                  predicted_label, created_at)
            SELECT gen_random_uuid(), f.owner_id, f.prediction_id, NOT f.is_correct, 'fox', f.model_name,
                   f.model_version, f.predicted_label, now()
            FROM feedback f WHERE random() < 0.3
            ON CONFLICT (owner_id, prediction_id) WHERE prediction_id IS NOT NULL AND is_correct IS NOT NULL
            DO UPDATE SET is_correct = excluded.is_correct, correct_label = excluded.correct_label,
                          created_at = excluded.created_at
            """)
        # Classic feedback (no verdict) is not counted.
        await conn.execute("""
            INSERT INTO feedback (id, owner_id, comment, created_at) SELECT gen_random_uuid(), min(id), 'hi', now()
            FROM users
            """)
        await assert_summaries_match(conn)  # with the changes not folded in yet
        async with sessions() as session:
            await service.roll_up(session=session)
        await assert_summaries_match(conn)
        for table in ("prediction_stat_deltas", "verdict_stat_deltas"):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0

        # Deleting a person's images takes their jobs, predictions and verdicts out of the counts.
        await conn.execute("DELETE FROM images WHERE owner_id = (SELECT min(id) FROM users)")
        await conn.execute("DELETE FROM feedback WHERE random() < 0.1")
        async with sessions() as session:
            await service.roll_up(session=session)
        await assert_summaries_match(conn)
        assert await conn.fetchval("SELECT count(*) FROM predictions") > 0
    finally:
        await conn.close()


PREVIOUS_RELEASE_ROLL_UP = """
    WITH moved AS (DELETE FROM prediction_stat_deltas RETURNING *),
    histogram AS (
        INSERT INTO prediction_stats AS s (day, model_name, model_version, status, latency_bucket, predictions)
        SELECT day, model_name, model_version, status, latency_bucket, sum(predictions) FROM moved
        GROUP BY 1, 2, 3, 4, 5 HAVING sum(predictions) <> 0 ORDER BY 1, 2, 3, 4, 5
        ON CONFLICT (day, model_name, model_version, status, latency_bucket)
        DO UPDATE SET predictions = s.predictions + excluded.predictions
    )
    INSERT INTO prediction_counts AS c (day, model_name, model_version, status, predictions)
    SELECT day, model_name, model_version, status, sum(predictions) FROM moved
    GROUP BY 1, 2, 3, 4 HAVING sum(predictions) <> 0 ORDER BY 1, 2, 3, 4
    ON CONFLICT (day, model_name, model_version, status)
    DO UPDATE SET predictions = c.predictions + excluded.predictions
"""
"""The roll-up of the release before the monthly histogram: it knows nothing of that table."""


async def test_what_a_previous_release_writes_during_an_upgrade_is_counted(
    database: tuple[str, async_sessionmaker[AsyncSession]],
) -> None:
    """While an upgrade rolls out, API processes of the previous release still roll up (without
    the monthly histogram) and store verdicts (without naming their model version): the
    database keeps the summaries right for them."""
    dsn, sessions = database
    conn = await asyncpg.connect(dsn)
    try:
        await seed(conn, 600, days=200)
        await conn.execute("UPDATE predictions SET status = 'done', label = 'cat', total_ms = 1 + random() * 900")
        await conn.execute(PREVIOUS_RELEASE_ROLL_UP)
        await conn.execute("""
            INSERT INTO feedback (id, owner_id, prediction_id, is_correct, correct_label, created_at)
            SELECT gen_random_uuid(), j.owner_id, p.id, p.position = 0, 'dog', now()
            FROM predictions p JOIN jobs j ON j.id = p.job_id LIMIT 50
            """)
        assert await conn.fetchval("SELECT count(*) FROM feedback WHERE model_name IS NULL") == 0
        await assert_summaries_match(conn)
        async with sessions() as session:
            await service.roll_up(session=session)
            year = {(x.model, x.version): x.count for x in await service.latency(session=session, days=365)}
            accuracy = {(x.model, x.version): x.feedback for x in await service.accuracy(session=session)}
        await assert_summaries_match(conn)
        assert sum(year.values()) == 1200 and sum(accuracy.values()) == 50
    finally:
        await conn.close()


async def test_concurrent_writers_and_roll_ups_count_everything_once(
    database: tuple[str, async_sessionmaker[AsyncSession]],
) -> None:
    dsn, sessions = database
    conn = await asyncpg.connect(dsn)
    await seed(conn, 300)
    ids = [r["id"] for r in await conn.fetch("SELECT id FROM predictions")]
    stop = asyncio.Event()

    async def answer(share: list[object]) -> None:
        writer = await asyncpg.connect(dsn)
        try:
            for pid in share:
                await writer.execute(
                    "UPDATE predictions SET status = 'done', total_ms = $2 WHERE id = $1", pid, random.uniform(1, 900)
                )
        finally:
            await writer.close()

    async def roll_up_until_stopped() -> int:
        done = 0
        while not stop.is_set():
            async with sessions() as session:
                await service.roll_up(session=session)
            done += 1
        return done

    try:
        rollers = [asyncio.create_task(roll_up_until_stopped()) for _ in range(3)]
        await asyncio.gather(*(answer(ids[k::4]) for k in range(4)))
        stop.set()
        assert all(n > 0 for n in await asyncio.gather(*rollers))
        async with sessions() as session:
            await service.roll_up(session=session)
        await assert_summaries_match(conn)
        assert await conn.fetchval("SELECT sum(predictions) FROM prediction_stats WHERE status = 'done'") == len(ids)
    finally:
        await conn.close()


async def test_latency_percentiles_from_the_histogram_are_within_the_stated_error(
    database: tuple[str, async_sessionmaker[AsyncSession]],
) -> None:
    dsn, sessions = database
    conn = await asyncpg.connect(dsn)
    try:
        await seed(conn, 1500)
        generator = random.Random(7)
        latencies = {
            r["id"]: generator.lognormvariate(math.log(40), 1.0)
            for r in await conn.fetch("SELECT id FROM predictions WHERE model_name = 'm0' AND model_version = 1")
        }
        await conn.executemany(
            "UPDATE predictions SET status = 'done', total_ms = $2 WHERE id = $1", list(latencies.items())
        )
        # Old answers fall out of a short window (the last 3 UTC days, today included).
        recent = sorted(
            r["total_ms"]
            for r in await conn.fetch(
                "SELECT total_ms FROM predictions WHERE model_name = 'm0' AND model_version = 1 AND "
                "(created_at AT TIME ZONE 'UTC')::date >= (now() AT TIME ZONE 'UTC')::date - 2"
            )
        )
        assert 0 < len(recent) < len(latencies)
    finally:
        await conn.close()
    async with sessions() as session:
        await service.roll_up(session=session)
        for days, values in ((365, sorted(latencies.values())), (3, recent)):
            measured = {(x.model, x.version): x for x in await service.latency(session=session, days=days)}[("m0", 1)]
            assert measured.count == len(values)
            for q, estimate in ((0.5, measured.p50_ms), (0.95, measured.p95_ms), (0.99, measured.p99_ms)):
                exact = values[max(1, math.ceil(q * len(values))) - 1]  # nearest rank
                assert estimate is not None
                assert abs(estimate - exact) / exact <= LATENCY_RELATIVE_ERROR + 1e-3, (days, q, estimate, exact)


@pytest.mark.parametrize(
    ("today", "start", "months"),
    [
        (date(2026, 12, 1), date(2026, 11, 1), (date(2026, 11, 1), date(2026, 12, 1))),
        (date(2026, 12, 1), date(2026, 11, 2), None),
        (date(2026, 12, 15), date(2025, 12, 16), (date(2026, 1, 1), date(2026, 12, 1))),
        (date(2026, 3, 10), date(2026, 1, 31), (date(2026, 2, 1), date(2026, 3, 1))),
        (date(2026, 3, 10), date(2026, 3, 1), None),
    ],
)
def test_whole_months_are_the_ended_months_inside_the_window(
    today: date, start: date, months: tuple[date, date] | None
) -> None:
    assert service.whole_months(start, today) == months


async def test_every_window_reads_the_same_percentiles_from_months_and_days(
    database: tuple[str, async_sessionmaker[AsyncSession]],
) -> None:
    """A window that spans whole months reads them from the monthly histogram: the answer must be
    the one the daily histogram alone gives, for windows that start anywhere in a month."""
    dsn, sessions = database
    conn = await asyncpg.connect(dsn)
    try:
        await seed(conn, 2000, days=400)
        await conn.execute("UPDATE predictions SET status = 'done', total_ms = 1 + random() * 900")
    finally:
        await conn.close()
    async with sessions() as session:
        await service.roll_up(session=session)
        for days in (1, 7, 29, 31, 45, 100, 200, 365):
            start = service.first_day(days)
            rows_ = await session.execute(
                text(
                    "SELECT model_name, model_version, latency_bucket, sum(predictions) FROM prediction_stats "
                    "WHERE day >= :start AND latency_bucket >= 0 GROUP BY 1, 2, 3"
                ),
                {"start": start},
            )
            histograms: dict[tuple[str, int], dict[int, int]] = {}
            for model, version, bucket, n in rows_:
                histograms.setdefault((model, version), {})[bucket] = int(n)
            expected = {
                key: (sum(h.values()), *service.percentiles(h, (0.5, 0.95, 0.99))) for key, h in histograms.items()
            }
            measured = {
                (x.model, x.version): (x.count, x.p50_ms, x.p95_ms, x.p99_ms)
                for x in await service.latency(session=session, days=days)
            }
            assert measured == expected, days


async def test_the_database_and_python_put_latencies_in_the_same_bucket(
    database: tuple[str, async_sessionmaker[AsyncSession]],
) -> None:
    values = [0.0, 0.05, 0.1, 0.1001, 0.99, 1.0, 7.3, 41.0, 999.9, 1e4, 3.2e6, 1e9]
    values += [random.lognormvariate(3, 2) for _ in range(300)]
    async with database[1]() as session:
        result = await session.execute(
            text("SELECT v, latency_bucket('done', false, v) FROM unnest(CAST(:values AS double precision[])) AS v"),
            {"values": values},
        )
        pairs = list(result)
        assert await session.scalar(text("SELECT latency_bucket('done', true, 5.0)")) == -1  # from the cache
        assert await session.scalar(text("SELECT latency_bucket('failed', false, 5.0)")) == -1
    assert [(v, b) for v, b in pairs] == [(v, latency_bucket(v)) for v, _ in pairs]


async def test_the_change_tables_are_vacuumed_even_where_autovacuum_is_off(
    database: tuple[str, async_sessionmaker[AsyncSession]],
) -> None:
    dsn, sessions = database
    conn = await asyncpg.connect(dsn)
    try:
        await seed(conn, 50)
        last_vacuum = "SELECT last_vacuum FROM pg_stat_user_tables WHERE relname = 'prediction_stat_deltas'"
        # The summaries are analyzed too: a one-day window then reads one day through the key.
        last_analyze = "SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'prediction_stats'"
        assert await conn.fetchval(last_vacuum) is None and await conn.fetchval(last_analyze) is None
        async with sessions() as session:
            await service.roll_up(session=session)
            await service.vacuum_changes(session=session)
            await service.roll_up(session=session)  # the session goes on being usable
        for _ in range(50):
            if await conn.fetchval(last_vacuum) is not None and await conn.fetchval(last_analyze) is not None:
                break
            await asyncio.sleep(0.1)
        assert await conn.fetchval(last_vacuum) is not None and await conn.fetchval(last_analyze) is not None
    finally:
        await conn.close()
