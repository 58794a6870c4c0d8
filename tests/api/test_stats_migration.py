"""The statistics' migration counts the history once, even while a process of the previous release
stores answers: none is left out of the summaries, counted in neither the seed nor a trigger."""

from __future__ import annotations

import asyncio

import asyncpg
from alembic import command
from alembic.config import Config

from api.prestart import ALEMBIC_INI

BEFORE_STATS = "c4d9e2a7f813"
STATS = "a1f5c3e9d742"


def _config(url: str) -> Config:
    config = Config(str(ALEMBIC_INI))
    config.attributes["configure_logger"] = False
    config.cmd_opts = None
    config.set_main_option("sqlalchemy.url", url)
    return config


def upgrade(url: str, revision: str) -> None:
    command.upgrade(_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(_config(url), revision)


async def test_an_answer_stored_while_the_summaries_are_seeded_is_counted(empty_database: str) -> None:
    dsn = empty_database
    url = dsn.replace("postgresql://", "postgresql+asyncpg://")
    await asyncio.to_thread(upgrade, url, BEFORE_STATS)
    conn = await asyncpg.connect(dsn)
    writer = await asyncpg.connect(dsn)
    try:
        await conn.execute("""
            INSERT INTO users (email, name, hashed_password, role, is_active, updated_at, created_at)
            VALUES ('a@example.com', 'a', 'x', 'user', true, now(), now());
            CREATE TEMP TABLE seeded AS SELECT i, gen_random_uuid() AS image_id, gen_random_uuid() AS job_id
            FROM generate_series(1, 20) AS i;
            INSERT INTO images (id, owner_id, sha256, format, width, height, bytes, filename, created_at)
            SELECT image_id, (SELECT min(id) FROM users), md5(i::text) || md5(i::text), 'PNG', 1, 1, 1, '', now()
            FROM seeded;
            INSERT INTO jobs (id, owner_id, image_id, status, request_id, deadline_at, created_at)
            SELECT job_id, (SELECT min(id) FROM users), image_id, 'queued', '', now(), now() FROM seeded;
            INSERT INTO predictions (id, job_id, position, model_name, model_version, status, top_k, cached,
                                     random_weights, created_at)
            SELECT gen_random_uuid(), job_id, 0, 'm', 1, 'queued', '[]', false, false, now() FROM seeded;
            """)
        # A process of the previous release stores an answer; its transaction is still open when
        # the migration starts.
        answer = writer.transaction()
        await answer.start()
        await writer.execute(
            "UPDATE predictions SET status = 'done', total_ms = 12 WHERE id = (SELECT id FROM predictions LIMIT 1)"
        )
        migration = asyncio.create_task(asyncio.to_thread(upgrade, url, STATS))
        # The migration waits for that transaction (a lock on predictions) at some point; then it
        # commits.
        for _ in range(300):
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
            if waiting or migration.done():
                break
            await asyncio.sleep(0.05)
        await answer.commit()
        await migration
        await conn.execute("""
            WITH moved AS (DELETE FROM prediction_stat_deltas RETURNING *)
            INSERT INTO prediction_counts AS c (day, model_name, model_version, status, predictions)
            SELECT day, model_name, model_version, status, sum(predictions) FROM moved
            GROUP BY 1, 2, 3, 4 HAVING sum(predictions) <> 0
            ON CONFLICT (day, model_name, model_version, status)
            DO UPDATE SET predictions = c.predictions + excluded.predictions
            """)
        counted = {
            r["status"]: r["n"] for r in await conn.fetch("SELECT status, count(*) AS n FROM predictions GROUP BY 1")
        }
        summarised = {
            r["status"]: r["n"]
            for r in await conn.fetch(
                "SELECT status, sum(predictions)::int AS n FROM prediction_counts GROUP BY 1 HAVING sum(predictions) <> 0"
            )
        }
        assert counted == {"done": 1, "queued": 19}
        assert summarised == counted
    finally:
        await writer.close()
        await conn.close()
