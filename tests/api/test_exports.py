"""Export jobs (``/v1/admin/exports``): a feedback export written in the background by the API
process that claimed it, followed by its progress and downloaded when done."""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import threading
import time
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, cast

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from api.app.core.config import Settings
from api.app.exports import service
from api.app.exports.models import Export
from api.app.exports.runner import ExportRunner
from api.app.feedback.export import MANIFEST, ExportWriter, Selection, ZipSink, write_export
from api.app.images.storage import LocalBlobStore
from tests.api.conftest import until
from tests.api.test_feedback_export import classify, drawing, verdict
from tests.conftest import Users

pytestmark = pytest.mark.usefixtures("worker")

FINAL = ("done", "failed", "cancelled")


async def start(client: httpx.AsyncClient, headers: dict[str, str], **body: object) -> dict[str, Any]:
    r = await client.post("/v1/admin/exports", json=body, headers=headers)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"
    return r.json()


async def finished(client: httpx.AsyncClient, headers: dict[str, str], export_id: str) -> dict[str, Any]:
    """The export once it is done, failed or cancelled (the app's runner takes it up)."""
    latest: dict[str, Any] = {}

    async def over() -> bool:
        nonlocal latest
        r = await client.get(f"/v1/admin/exports/{export_id}", headers=headers)
        assert r.status_code == 200, r.text
        latest = r.json()
        return latest["status"] in FINAL

    await until(over, 30, f"export {export_id} to finish")
    return latest


def contents(data: bytes) -> tuple[dict[str, bytes], dict[tuple[str, str], dict[str, str]]]:
    """A feedback zip's images by path, and its manifest's rows by (sha256, model)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        files = {name: archive.read(name) for name in archive.namelist() if name != MANIFEST}
        rows = list(csv.DictReader(io.StringIO(archive.read(MANIFEST).decode("utf-8"))))
    return files, {(r["sha256"], r["model"]): r for r in rows}


async def labelled_drawing(client: httpx.AsyncClient, headers: dict[str, str], **extra: str) -> str:
    """A new drawing classified by sketch@1 and labelled by its user; its sha256."""
    answer = await classify(client, headers, drawing(), "sketch@1")
    prediction = answer["results"]["sketch@1"]
    label = next(label for label in ("cat", "fish", "apple") if label != prediction["label"])
    await verdict(client, headers, prediction_id=prediction["id"], is_correct=False, correct_label=label, **extra)
    return str(answer["image_file_name"].split(".")[0])


async def test_an_export_job_writes_what_the_direct_download_answers(
    client: httpx.AsyncClient, admin_headers: dict[str, str], users: Users
) -> None:
    _, headers = await users.create()
    mine = {await labelled_drawing(client, headers, comment="+1 for the ears") for _ in range(3)}
    # A second verdict on the same image for the same model: only the latest is exported.
    again = await classify(client, headers, drawing(), "sketch@1,mobilenet_v2@1")
    await verdict(client, headers, prediction_id=again["results"]["sketch@1"]["id"], is_correct=True)
    await verdict(client, headers, prediction_id=again["results"]["mobilenet_v2@1"]["id"], is_correct=True)

    export = await start(client, admin_headers, model="sketch")
    assert (export["model"], export["version"], export["since_last"], export["kind"]) == (
        "sketch",
        None,
        False,
        "feedback",
    )
    done = await finished(client, admin_headers, export["id"])
    assert done["status"] == "done" and done["error"] is None and done["attempts"] == 1
    assert done["rows_done"] == done["rows_total"] == done["summary"]["examples"] + done["summary"]["missing"]
    assert done["started_at"] and done["finished_at"] and done["until"] and done["since"] is None

    r = await client.get(done["download"], headers=admin_headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.headers["content-disposition"].startswith('attachment; filename="feedback-sketch-')
    assert int(r.headers["content-length"]) == done["bytes_written"]
    files, rows = contents(r.content)
    assert {sha for sha, _model in rows} >= mine and {model for _sha, model in rows} == {"sketch"}
    assert rows[(next(iter(mine)), "sketch")]["comment"] == "'+1 for the ears"
    assert int(r.headers["x-exported-images"]) == len(files) == len(rows) == done["summary"]["examples"]
    # HEAD, as download managers ask first: the same headers, no body (it was a 405).
    head = await client.head(done["download"], headers=admin_headers)
    assert head.status_code == 200 and head.content == b""
    assert {k: head.headers[k] for k in ("content-length", "content-type", "content-disposition")} == {
        k: r.headers[k] for k in ("content-length", "content-type", "content-disposition")
    }

    direct = await client.get("/v1/admin/feedback-export", params={"model": "sketch"}, headers=admin_headers)
    assert direct.status_code == 200
    assert contents(direct.content) == (files, rows)

    listed = await client.get("/v1/admin/exports", headers=admin_headers)
    assert listed.status_code == 200 and listed.json()["data"][0]["id"] == export["id"]
    assert listed.json()["count"] >= 1


async def test_pages_of_any_size_write_what_one_query_writes(
    client: httpx.AsyncClient, app: FastAPI, users: Users, tmp_path: Path
) -> None:
    _, headers = await users.create()
    for _ in range(3):
        await labelled_drawing(client, headers)
    both = await classify(client, headers, drawing(), "sketch@1,mobilenet_v2@1")
    for result in both["results"].values():
        await verdict(client, headers, prediction_id=result["id"], is_correct=True)
    selection = Selection(until=datetime.now(UTC))
    written = []
    # One image a page, two, and everything in one query (fewer examples than a page).
    for batch in (1, 2, 100_000):
        path = tmp_path / f"{batch}.zip"
        writer = ExportWriter(ZipSink(path), app.state.store)
        summary = await write_export(
            read=app.state.read_sessionmaker, writer=writer, selection=selection, batch_rows=batch
        )
        written.append((contents(path.read_bytes()), summary))
    assert written[0] == written[1] == written[2]
    (files, rows), summary = written[0]
    assert summary.examples == len(files) == len(rows) >= 5 and {"sketch", "mobilenet_v2"} <= {m for _, m in rows}


async def test_an_incremental_export_holds_only_the_verdicts_given_since_the_last_one(
    client: httpx.AsyncClient, admin_headers: dict[str, str], users: Users
) -> None:
    _, headers = await users.create()
    older = await labelled_drawing(client, headers)
    full = await finished(client, admin_headers, (await start(client, admin_headers, model="sketch"))["id"])
    assert full["status"] == "done"
    newer = {await labelled_drawing(client, headers) for _ in range(2)}

    since = await finished(
        client, admin_headers, (await start(client, admin_headers, model="sketch", since_last=True))["id"]
    )
    assert since["status"] == "done" and since["since"] == full["until"]
    files, rows = contents((await client.get(since["download"], headers=admin_headers)).content)
    assert {sha for sha, _model in rows} == newer and older not in {sha for sha, _ in rows}
    assert len(files) == 2 and since["rows_total"] == 2

    # Nothing new since: an empty export (the manifest's header alone), not an error.
    empty = await finished(
        client, admin_headers, (await start(client, admin_headers, model="sketch", since_last=True))["id"]
    )
    assert empty["status"] == "done" and empty["rows_total"] == 0 and empty["since"] == since["until"]
    assert contents((await client.get(empty["download"], headers=admin_headers)).content) == ({}, {})


async def test_an_export_waits_for_verdicts_in_flight_and_holds_them(
    client: httpx.AsyncClient, admin_headers: dict[str, str], users: Users, settings: Settings
) -> None:
    """A verdict stamped before an export's end but committed after the export read would be in
    neither that export nor the next incremental one: the export's end waits for it instead."""
    _, headers = await users.create()
    sha = await labelled_drawing(client, headers)
    conn = await asyncpg.connect(settings.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        transaction = conn.transaction()
        await transaction.start()
        # A verdict being replaced, as ``create_feedback`` does: fence, then the database's clock.
        await conn.execute("SELECT pg_advisory_xact_lock_shared(hashtextextended('feedback-export-fence', 0))")
        stamped = await conn.fetchval(
            """UPDATE feedback SET correct_label = 'bicycle', created_at = clock_timestamp()
               WHERE id = (SELECT f.id FROM feedback f JOIN predictions p ON p.id = f.prediction_id
                           JOIN jobs j ON j.id = p.job_id JOIN images i ON i.id = j.image_id
                           WHERE i.sha256 = $1) RETURNING created_at""",
            sha,
        )
        export = await start(client, admin_headers, model="sketch")
        await asyncio.sleep(1.5)
        r = await client.get(f"/v1/admin/exports/{export['id']}", headers=admin_headers)
        assert r.json()["status"] == "queued" and r.json()["until"] is None  # waiting at the fence
        await transaction.commit()
    finally:
        await conn.close()
    done = await finished(client, admin_headers, export["id"])
    assert done["status"] == "done" and datetime.fromisoformat(done["until"]) >= stamped
    _, rows = contents((await client.get(done["download"], headers=admin_headers)).content)
    assert rows[(sha, "sketch")]["label"] == "bicycle"


async def running_elsewhere(
    app: FastAPI, *, lease: timedelta, attempts: int = 1, export_id: uuid.UUID | None = None
) -> str:
    """The id of a new export that another process took up, whose lease ends after ``lease``."""
    now = datetime.now(UTC)
    export = Export(
        id=export_id or uuid.uuid4(),
        kind="feedback",
        model="sketch",
        since_last=False,
        status="running",
        rows_total=0,
        rows_done=0,
        bytes_written=0,
        requested_by="admin@example.com",
        attempts=attempts,
        lease_owner="elsewhere:1:dead",
        started_at=now,
        heartbeat_at=now,
        lease_expires_at=now + lease,
    )
    async with app.state.sessionmaker() as session:
        session.add(export)
        await session.commit()
    return str(export.id)


async def test_cancel_stops_an_export_and_delete_forgets_it(
    client: httpx.AsyncClient, app: FastAPI, admin_headers: dict[str, str]
) -> None:
    # Held by a live process (its lease runs for an hour): this app's runner leaves it be.
    export = {"id": await running_elsewhere(app, lease=timedelta(hours=1))}
    held = (await client.get(f"/v1/admin/exports/{export['id']}", headers=admin_headers)).json()
    assert held["status"] == "running" and held["download"] is None
    r = await client.get(f"/v1/admin/exports/{export['id']}/download", headers=admin_headers)
    assert r.status_code == 409 and "running" in r.json()["detail"]

    r = await client.post(f"/v1/admin/exports/{export['id']}/cancel", headers=admin_headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    again = await client.post(f"/v1/admin/exports/{export['id']}/cancel", headers=admin_headers)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    r = await client.get(f"/v1/admin/exports/{export['id']}/download", headers=admin_headers)
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]

    # The process that held it is told at its next heartbeat: the export is not its own any more.
    async with app.state.sessionmaker() as session:
        assert not await service.renew(
            session=session, export_id=uuid.UUID(export["id"]), owner="elsewhere:1:dead", lease_seconds=30
        )

    done = await finished(client, admin_headers, (await start(client, admin_headers, model="sketch"))["id"])
    r = await client.post(f"/v1/admin/exports/{done['id']}/cancel", headers=admin_headers)
    assert r.status_code == 409 and r.json()["detail"] == "The export is done already; nothing to cancel"

    files = service.leftovers(app.state.settings.storage_dir, uuid.UUID(done["id"]))
    assert len(files) == 1 and files[0].is_file()
    assert (await client.delete(f"/v1/admin/exports/{done['id']}", headers=admin_headers)).status_code == 204
    assert not files[0].exists()
    assert (await client.get(f"/v1/admin/exports/{done['id']}", headers=admin_headers)).status_code == 404
    assert (await client.delete(f"/v1/admin/exports/{done['id']}", headers=admin_headers)).status_code == 404
    unknown = uuid.uuid4()
    assert (await client.post(f"/v1/admin/exports/{unknown}/cancel", headers=admin_headers)).status_code == 404
    assert (await client.get(f"/v1/admin/exports/{unknown}/download", headers=admin_headers)).status_code == 404


async def test_an_export_whose_process_died_is_taken_over_or_failed(
    client: httpx.AsyncClient, app: FastAPI, admin_headers: dict[str, str], settings: Settings
) -> None:
    # What the dead process had half written goes.
    export_id = uuid.uuid4()
    half = settings.storage_dir / service.archive_name(export_id, 1, part=True)
    half.parent.mkdir(parents=True, exist_ok=True)
    half.write_bytes(b"PK half a zip")
    export = {"id": await running_elsewhere(app, lease=timedelta(seconds=-1), export_id=export_id)}

    taken = await finished(client, admin_headers, export["id"])
    assert taken["status"] == "done" and taken["attempts"] == 2
    assert not half.exists()
    assert (await client.get(taken["download"], headers=admin_headers)).status_code == 200

    # A process died on it as often as allowed: failed, with why, rather than tried forever.
    doomed = {"id": await running_elsewhere(app, lease=timedelta(seconds=-1), attempts=settings.export_max_attempts)}
    failed = await finished(client, admin_headers, doomed["id"])
    assert failed["status"] == "failed" and failed["finished_at"]
    assert failed["error"].startswith(f"The API process writing it stopped {settings.export_max_attempts} times")
    r = await client.get(f"/v1/admin/exports/{doomed['id']}/download", headers=admin_headers)
    assert r.status_code == 409 and "failed" in r.json()["detail"]


async def test_exports_are_for_admins_and_refuse_bad_options(
    client: httpx.AsyncClient, admin_headers: dict[str, str], users: Users
) -> None:
    _, headers = await users.create()
    assert (await client.post("/v1/admin/exports", json={}, headers=headers)).status_code == 403
    assert (await client.get("/v1/admin/exports", headers=headers)).status_code == 403
    assert (await client.get(f"/v1/admin/exports/{uuid.uuid4()}", headers=headers)).status_code == 403
    assert (await client.post("/v1/admin/exports", json={})).status_code == 401
    for body in ({"version": 1}, {"model": "sketch", "version": 0}, {"kind": "images"}, {"model": "a\x00b"}):
        r = await client.post("/v1/admin/exports", json=body, headers=admin_headers)
        assert r.status_code == 422, (body, r.text)
    assert (await client.get("/v1/admin/exports/not-an-id", headers=admin_headers)).status_code == 422
    # A model or version the registry does not know: 404, not an empty export.
    for body, detail in (
        ({"model": "nosuch"}, "No model named 'nosuch'."),
        ({"model": "sketch", "version": 999}, "sketch has no version 999."),
    ):
        r = await client.post("/v1/admin/exports", json=body, headers=admin_headers)
        assert r.status_code == 404 and r.json()["detail"] == detail, (body, r.text)


class SlowStore(LocalBlobStore):
    """The real store, a tenth of a second a file: an export long enough to stop half-way."""

    def open(self, sha256: str) -> BinaryIO:
        time.sleep(0.1)
        return super().open(sha256)


class BrokenStore(LocalBlobStore):
    def open(self, sha256: str) -> BinaryIO:
        raise OSError("disk gone")


def own_runner(app: FastAPI, store: LocalBlobStore) -> ExportRunner:
    settings: Settings = app.state.settings
    return ExportRunner(
        sessionmaker=app.state.sessionmaker,
        read_sessionmaker=app.state.read_sessionmaker,
        store=store,
        storage_dir=settings.storage_dir,
        batch_rows=1,
        poll_seconds=1,
        lease_seconds=3600,
        max_attempts=3,
    )


async def claimed_by(app: FastAPI, runner: ExportRunner) -> Export:
    """A new export of sketch's verdicts, taken up by ``runner`` (not by the app's own runner)."""
    export_id = uuid.UUID(await running_elsewhere(app, lease=timedelta(hours=1)))
    async with app.state.sessionmaker() as session:
        export = await service.get_export(session=session, export_id=export_id)
        export.lease_owner, export.until = runner.owner, datetime.now(UTC)
        await session.commit()
    return export


async def test_a_process_that_stops_hands_its_export_back(
    client: httpx.AsyncClient, app: FastAPI, admin_headers: dict[str, str], users: Users, settings: Settings
) -> None:
    _, headers = await users.create()
    for _ in range(3):
        await labelled_drawing(client, headers)
    runner = own_runner(app, SlowStore(settings.storage_dir))
    export = await claimed_by(app, runner)
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run_one(export, stop))
    await until(lambda: _rows_done(client, admin_headers, export.id), 30, "the export to write its first image")
    stop.set()
    await asyncio.wait_for(running, 10)
    assert service.leftovers(settings.storage_dir, export.id) == []
    # Back in the queue, its attempt not counted: the app's own runner takes it up at once (with
    # the lease of an hour it held, it would otherwise have waited that long).
    done = await finished(client, admin_headers, str(export.id))
    assert done["status"] == "done" and done["attempts"] == 1


class StalledStore(LocalBlobStore):
    """The real store, whose files are read a chunk every half second, ``reading`` set meanwhile."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reading = threading.Event()

    def open(self, sha256: str) -> BinaryIO:
        real = super().open(sha256)
        reading = self.reading

        class Stalled(io.BufferedReader):
            def read(self, size: int | None = -1) -> bytes:
                reading.set()
                time.sleep(0.5)
                return real.read(-1 if size is None else size)

            def close(self) -> None:
                real.close()

        return cast(BinaryIO, Stalled(io.BytesIO()))


async def test_a_process_that_stops_while_a_file_is_copied_hands_its_export_back(
    client: httpx.AsyncClient, app: FastAPI, admin_headers: dict[str, str], users: Users, settings: Settings
) -> None:
    """The API's shutdown cancels the runner while a thread copies a file into the zip: the zip
    was closed under that open file (ValueError), and the export failed for good instead of going
    back to the queue."""
    _, headers = await users.create()
    await labelled_drawing(client, headers)
    store = StalledStore(settings.storage_dir)
    runner = own_runner(app, store)
    export = await claimed_by(app, runner)
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run_one(export, stop))
    await asyncio.to_thread(store.reading.wait, 30)
    stop.set()
    running.cancel()  # as the lifespan does, right after setting stop
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 10)
    assert service.leftovers(settings.storage_dir, export.id) == []
    done = await finished(client, admin_headers, str(export.id))
    assert (done["status"], done["attempts"], done["error"]) == ("done", 1, None), done


async def test_an_export_cancelled_while_it_is_written_ends_without_an_error_logged(
    client: httpx.AsyncClient,
    app: FastAPI,
    admin_headers: dict[str, str],
    users: Users,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The cancel deletes the half-written zip under the runner: it stops, and logs no failure
    with a traceback (it did, a FileNotFoundError reading the zip's size)."""
    _, headers = await users.create()
    for _ in range(3):
        await labelled_drawing(client, headers)
    runner = own_runner(app, SlowStore(settings.storage_dir))
    export = await claimed_by(app, runner)
    running = asyncio.create_task(runner.run_one(export, asyncio.Event()))
    await until(lambda: _rows_done(client, admin_headers, export.id), 30, "the export to write its first image")
    r = await client.post(f"/v1/admin/exports/{export.id}/cancel", headers=admin_headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    await asyncio.wait_for(running, 10)
    assert [record.message for record in caplog.records if record.levelno >= logging.ERROR] == []
    assert service.leftovers(settings.storage_dir, export.id) == []


async def _rows_done(client: httpx.AsyncClient, headers: dict[str, str], export_id: uuid.UUID) -> bool:
    r = await client.get(f"/v1/admin/exports/{export_id}", headers=headers)
    return bool(r.json()["rows_done"] > 0)


async def test_an_export_that_cannot_be_written_fails_with_the_reason(
    client: httpx.AsyncClient, app: FastAPI, admin_headers: dict[str, str], settings: Settings
) -> None:
    runner = own_runner(app, BrokenStore(settings.storage_dir))
    export = await claimed_by(app, runner)
    await runner.run_one(export, asyncio.Event())
    failed = await status_of(client, admin_headers, export.id)
    assert failed["status"] == "failed" and failed["error"] == "OSError: disk gone" and failed["finished_at"]
    assert service.leftovers(settings.storage_dir, export.id) == []


async def status_of(client: httpx.AsyncClient, headers: dict[str, str], export_id: uuid.UUID) -> dict[str, Any]:
    r = await client.get(f"/v1/admin/exports/{export_id}", headers=headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_zips_past_their_keeping_time_are_deleted_and_their_export_stays_listed(
    client: httpx.AsyncClient, app: FastAPI, admin_headers: dict[str, str], settings: Settings
) -> None:
    kept = await finished(client, admin_headers, (await start(client, admin_headers, model="sketch"))["id"])
    old = await finished(client, admin_headers, (await start(client, admin_headers, model="sketch"))["id"])
    async with app.state.sessionmaker() as session:
        export = await service.get_export(session=session, export_id=uuid.UUID(old["id"]))
        export.finished_at = datetime.now(UTC) - timedelta(days=settings.export_keep_days, minutes=1)
        await session.commit()
    [zip_file] = service.leftovers(settings.storage_dir, uuid.UUID(old["id"]))

    # (The app's own runner does the same once a minute, and may be the one that gets to it.)
    await own_runner(app, app.state.store).expire()
    assert not zip_file.exists()
    gone = await status_of(client, admin_headers, uuid.UUID(old["id"]))
    assert gone["status"] == "done" and gone["download"] is None
    r = await client.get(f"/v1/admin/exports/{old['id']}/download", headers=admin_headers)
    assert r.status_code == 410 and "EXPORT_KEEP_DAYS" in r.json()["detail"]
    assert (await client.get(kept["download"], headers=admin_headers)).status_code == 200
    # An incremental export still follows the expired one: its window is kept with the export.
    since = await finished(
        client, admin_headers, (await start(client, admin_headers, model="sketch", since_last=True))["id"]
    )
    assert since["since"] == old["until"]


async def test_pages_of_exports_made_at_one_instant_list_each_once(
    client: httpx.AsyncClient, app: FastAPI, admin_headers: dict[str, str]
) -> None:
    """Exports of one instant are ordered by id as well: following ``skip`` lists each once."""
    async with app.state.sessionmaker() as session:
        made = await session.scalars(
            text(
                "INSERT INTO exports (id, kind, since_last, status, rows_total, rows_done, bytes_written,"
                " requested_by, attempts, created_at)"
                " SELECT gen_random_uuid(), 'feedback', false, 'cancelled', 0, 0, 0, 'paging@example.com', 0,"
                " now() + interval '1 day' FROM generate_series(1, 300) RETURNING id"
            )
        )
        ours = {str(i) for i in made}
        await session.commit()
    try:
        seen: list[str] = []
        for skip in range(0, 300, 20):
            r = await client.get("/v1/admin/exports", params={"skip": skip, "limit": 20}, headers=admin_headers)
            assert r.status_code == 200, r.text
            seen += [row["id"] for row in r.json()["data"]]
        assert len(seen) == len(set(seen)) == 300 and set(seen) == ours
    finally:
        async with app.state.sessionmaker() as session:
            await session.execute(text("DELETE FROM exports WHERE requested_by = 'paging@example.com'"))
            await session.commit()


async def test_zips_no_export_keeps_are_deleted_and_the_others_kept(
    client: httpx.AsyncClient, app: FastAPI, admin_headers: dict[str, str], settings: Settings
) -> None:
    """A process killed after forgetting an expired zip and before deleting it, or one that had
    lost its export and finished it late, leaves a zip that no export names, and one killed while
    writing a zip leaves its part when the export then ends: nothing else would ever delete them."""
    done = await finished(client, admin_headers, (await start(client, admin_headers, model="sketch"))["id"])
    [kept] = service.leftovers(settings.storage_dir, uuid.UUID(done["id"]))
    folder = settings.storage_dir / service.EXPORTS_DIR
    late = folder / service.archive_name(uuid.UUID(done["id"]), 9).split("/")[-1]  # an older attempt's
    deleted = folder / service.archive_name(uuid.uuid4(), 1).split("/")[-1]  # an export deleted since
    running_id = uuid.UUID(await running_elsewhere(app, lease=timedelta(hours=1)))
    recording = folder / service.archive_name(running_id, 1).split("/")[-1]  # renamed, not yet recorded
    other = folder / "notes.txt"
    late_part = folder / service.archive_name(uuid.UUID(done["id"]), 8, part=True).split("/")[-1]
    deleted_part = folder / service.archive_name(uuid.uuid4(), 1, part=True).split("/")[-1]
    writing = folder / service.archive_name(running_id, 2, part=True).split("/")[-1]
    for path in (late, deleted, recording, other, late_part, deleted_part, writing):
        path.write_bytes(b"PK")
    try:
        await own_runner(app, app.state.store).expire()
        assert kept.exists() and recording.exists() and other.exists() and writing.exists()
        assert not late.exists() and not deleted.exists()
        assert not late_part.exists() and not deleted_part.exists()
    finally:
        for path in (recording, other, writing):
            path.unlink(missing_ok=True)
        await client.post(f"/v1/admin/exports/{running_id}/cancel", headers=admin_headers)
