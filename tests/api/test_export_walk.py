"""An export walked a page at a time writes each image and model once, even when a verdict it
wrote from one page is deleted or replaced before the next page is read."""

from __future__ import annotations

import csv
import io
import uuid
import zipfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from api.app.core.config import Settings
from api.app.feedback.export import MANIFEST, ExportProgress, ExportWriter, Selection, ZipSink, write_export


async def seed(conn: asyncpg.Connection, model: str) -> dict[str, object]:
    """Two users who uploaded the same picture X and labelled it (A first, then B); A also
    labelled a picture Y earlier. Returns their ids."""
    tag = uuid.uuid4().hex[:8]
    a, b = [
        await conn.fetchval(
            "INSERT INTO users (email, name, hashed_password, role, is_active, updated_at, created_at) "
            "VALUES ($1, 'x', 'x', 'user', true, now(), now()) RETURNING id",
            f"{who}-{tag}@example.com",
        )
        for who in ("a", "b")
    ]
    x, y = uuid.uuid4().hex * 2, uuid.uuid4().hex * 2
    verdicts = []
    for owner, sha, label, ago in ((a, y, "fish", 30), (a, x, "cat", 20), (b, x, "dog", 10)):
        image, job, prediction, fb = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await conn.execute(
            "INSERT INTO images (id, owner_id, sha256, format, width, height, bytes, filename, created_at) "
            "VALUES ($1, $2, $3, 'PNG', 1, 1, 1, '', now())",
            image,
            owner,
            sha,
        )
        await conn.execute(
            "INSERT INTO jobs (id, owner_id, image_id, status, request_id, deadline_at, created_at) "
            "VALUES ($1, $2, $3, 'done', '', now(), now())",
            job,
            owner,
            image,
        )
        await conn.execute(
            "INSERT INTO predictions (id, job_id, position, model_name, model_version, status, label, top_k, "
            "cached, random_weights, created_at) VALUES ($1, $2, 0, $3, 1, 'done', 'apple', '[]', false, false, now())",
            prediction,
            job,
            model,
        )
        await conn.execute(
            "INSERT INTO feedback (id, owner_id, prediction_id, is_correct, correct_label, model_name, model_version, "
            "predicted_label, created_at) VALUES ($1, $2, $3, false, $4, $5, 1, 'apple', "
            "now() - make_interval(secs => $6))",
            fb,
            owner,
            prediction,
            label,
            model,
            float(ago),
        )
        verdicts.append(fb)
    return {"a": a, "b": b, "x": x, "y": y, "b_verdict": verdicts[2]}


def manifest(path: Path) -> list[dict[str, str]]:
    with zipfile.ZipFile(path) as archive:
        return list(csv.DictReader(io.StringIO(archive.read(MANIFEST).decode("utf-8"))))


@pytest.mark.parametrize("change", ["delete the user", "delete the verdict", "replace the verdict"])
async def test_a_verdict_that_goes_away_mid_export_does_not_put_its_image_in_twice(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, tmp_path: Path, change: str
) -> None:
    model = f"probe{uuid.uuid4().hex[:6]}"
    conn = await asyncpg.connect(settings.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        seeded = await seed(conn, model)
        for sha in (seeded["x"], seeded["y"]):
            await app.state.store.put(str(sha), b"\x89PNG fake")
        pages = 0

        async def on_progress(progress: ExportProgress) -> None:
            nonlocal pages
            pages += 1
            if pages == 1:  # B's verdict on X is written; now it goes away
                if change == "delete the user":
                    await conn.execute("DELETE FROM users WHERE id = $1", seeded["b"])
                elif change == "delete the verdict":
                    await conn.execute("DELETE FROM feedback WHERE id = $1", seeded["b_verdict"])
                else:  # said again, as create_feedback's upsert does: stamped after the export's end
                    await conn.execute(
                        "UPDATE feedback SET correct_label = 'fish', created_at = clock_timestamp() WHERE id = $1",
                        seeded["b_verdict"],
                    )

        path = tmp_path / "export.zip"
        summary = await write_export(
            read=app.state.read_sessionmaker,
            writer=ExportWriter(ZipSink(path), app.state.store),
            selection=Selection(model=model, until=datetime.now(UTC)),
            batch_rows=1,
            on_progress=on_progress,
        )
        rows = manifest(path)
        per_image = Counter(r["sha256"] for r in rows)
        assert per_image[str(seeded["x"])] == 1, rows
        # The verdict that was the latest when the export began, written from the first page.
        assert next(r["label"] for r in rows if r["sha256"] == seeded["x"]) == "dog"
        assert summary.examples == len(rows) == 2
        assert (summary.superseded, summary.unlabelled, summary.missing) == (1, 0, 0)
    finally:
        await conn.close()
