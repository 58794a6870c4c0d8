"""The migrations build exactly the schema the models describe, and carry the data over."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from api.app.core.db import Base
from api.app.examples.service import split_of
from tests.api.test_stats_migration import downgrade, upgrade

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


PER_LABEL = "c5e8a1f3b724"


async def test_labels_a_later_one_had_replaced_come_back_and_taken_back_ones_go(empty_database: str) -> None:
    dsn = empty_database
    url = dsn.replace("postgresql://", "postgresql+asyncpg://")
    await asyncio.to_thread(upgrade, url, SOURCE)
    shared, taken_back = "1" * 64, "3" * 64
    low, high = "0000" + "a" * 60, "f" * 64  # the hash puts the first in test, the second in train
    assert (split_of(low, 0.2), split_of(high, 0.2)) == ("test", "train")
    # The split the shared content's example was given, whatever its hash says: the labels that
    # come back take it.
    kept_split = "train" if split_of(shared, 0.2) == "test" else "test"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("""
            INSERT INTO users (email, name, hashed_password, role, is_active, updated_at, created_at)
            VALUES ('a@example.com', 'a', 'x', 'user', true, now(), now()),
                   ('b@example.com', 'b', 'x', 'user', true, now(), now())""")
        users = [r["id"] for r in await conn.fetch("SELECT id FROM users ORDER BY id")]
        # Images 1 (a's) and 2 (b's) have the same content; a labelled it first, b's label replaced
        # a's example; a's verdict on image 3 was taken back (no label) after its example was
        # written; images 4 and 5 have labelled verdicts and no example.
        images = [(1, users[0], shared), (2, users[1], shared), (3, users[0], taken_back), (4, users[0], low)]
        images.append((5, users[0], high))
        labels = {1: "fish", 2: "apple", 3: None, 4: "star", 5: "star"}
        for n, owner, sha256 in images:
            await conn.execute(
                """
                INSERT INTO images (id, owner_id, sha256, format, width, height, bytes, filename, created_at)
                VALUES ($1, $2, $3, 'PNG', 1, 1, 1, '', now());
                """,
                uuid.UUID(int=n),
                owner,
                sha256,
            )
            await conn.execute(
                """
                INSERT INTO jobs (id, owner_id, image_id, status, request_id, deadline_at, created_at)
                VALUES ($1, $2, $1, 'done', '', now(), now())""",
                uuid.UUID(int=n),
                owner,
            )
            await conn.execute(
                """
                INSERT INTO predictions (id, job_id, position, model_name, model_version, status, top_k, cached,
                                         random_weights, label, created_at)
                VALUES ($1, $1, 0, 'sketch', 1, 'done', '[]', false, false, 'cat', now())""",
                uuid.UUID(int=n),
            )
            await conn.execute(
                """
                INSERT INTO feedback (id, owner_id, prediction_id, is_correct, correct_label, created_at)
                VALUES ($1, $2, $1, false, $3, now() - make_interval(mins => 10 - $4))""",
                uuid.UUID(int=n),
                owner,
                labels[n],
                n,
            )
        for n, label, split in ((2, "apple", kept_split), (3, "dog", "train")):
            await conn.execute(
                """
                INSERT INTO labelled_examples (id, model_name, sha256, label, split, source, owner_id, feedback_id,
                                               updated_at, created_at)
                SELECT gen_random_uuid(), 'sketch', i.sha256, $2, $3, 'verdict', i.owner_id, i.id, now(), now()
                FROM images i WHERE i.id = $1""",
                uuid.UUID(int=n),
                label,
                split,
            )
        await asyncio.to_thread(upgrade, url, PER_LABEL)
        rows = await conn.fetch("SELECT feedback_id, label, split FROM labelled_examples ORDER BY feedback_id, label")
        assert [(r["feedback_id"].int, r["label"], r["split"]) for r in rows] == [
            (1, "fish", kept_split),
            (2, "apple", kept_split),
            (4, "star", "test"),
            (5, "star", "train"),
        ]
        # Back: one example per content and model, the latest label.
        await asyncio.to_thread(downgrade, url, SOURCE)
        rows = await conn.fetch("SELECT feedback_id, label FROM labelled_examples ORDER BY feedback_id")
        assert [(r["feedback_id"].int, r["label"]) for r in rows] == [(2, "apple"), (4, "star"), (5, "star")]
    finally:
        await conn.close()
