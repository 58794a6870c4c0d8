"""The migrations build exactly the schema the models describe."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from api.app.core.db import Base
from tests.api.test_stats_migration import upgrade

pytestmark = pytest.mark.usefixtures("client")  # the app's lifespan has opened its engine


async def test_migrated_database_matches_the_models(app: Any) -> None:
    async with app.state.sessionmaker() as session:
        connection = await session.connection()
        diff = await connection.run_sync(lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata))
    assert diff == []


BEFORE_SOURCE = "a8c3e5f7d291"
SOURCE = "b4d9e2f6a813"


async def test_images_a_batch_stored_are_marked_as_its_files_and_earlier_uploads_stay_uploads(
    empty_database: str,
) -> None:
    dsn = empty_database
    url = dsn.replace("postgresql://", "postgresql+asyncpg://")
    await asyncio.to_thread(upgrade, url, BEFORE_SOURCE)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("""
            INSERT INTO users (email, name, hashed_password, role, is_active, updated_at, created_at)
            VALUES ('a@example.com', 'a', 'x', 'user', true, now(), now());
            INSERT INTO images (id, owner_id, sha256, format, width, height, bytes, filename, created_at)
            SELECT ('00000000-0000-0000-0000-00000000000' || i)::uuid, (SELECT min(id) FROM users),
                   md5(i::text) || md5(i::text), 'PNG', 1, 1, 1, '',
                   now() + make_interval(mins => CASE WHEN i = 1 THEN -10 ELSE 0 END)
            FROM generate_series(1, 3) AS i;
            INSERT INTO batches (id, owner_id, status, models, entries, fully_received, created_at)
            VALUES ('00000000-0000-0000-0000-0000000000b1', (SELECT min(id) FROM users), 'done', '[]', 2, true,
                    now() - interval '1 minute');
            -- Image 1 was uploaded before the batch and named by id; image 2 was stored by it;
            -- image 3 was uploaded on its own.
            INSERT INTO batch_items (id, batch_id, position, file_name, image_id)
            VALUES (gen_random_uuid(), '00000000-0000-0000-0000-0000000000b1', 0, 'a.png',
                    '00000000-0000-0000-0000-000000000001'),
                   (gen_random_uuid(), '00000000-0000-0000-0000-0000000000b1', 1, 'b.png',
                    '00000000-0000-0000-0000-000000000002');
        """)
        await asyncio.to_thread(upgrade, url, SOURCE)
        rows = await conn.fetch("SELECT right(id::text, 1) AS n, source FROM images ORDER BY id")
        assert [(r["n"], r["source"]) for r in rows] == [("1", "upload"), ("2", "batch"), ("3", "upload")]
    finally:
        await conn.close()
