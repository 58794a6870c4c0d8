"""Receiving a batch: each file commits with its job and item, the lane leaves a batch alone until
it is received, and a batch that fails or loses its owner while it is received is cancelled or
answered 401, never left 'receiving'. No model worker: the catalogue is told every registry
model is served, so jobs just wait in the queue."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from api.app.batches import lane
from api.app.batches import service as batches_service
from api.app.batches.models import Batch, BatchItem
from api.app.core.config import Settings
from api.app.images import service as images_service
from api.app.predictions.models import Job, Prediction
from contracts import keys
from tests.conftest import Users
from tests.images import noise_png
from tests.support import app_settings, held_batch, pause_inspection, waiting_on_lock

MODEL = "mobilenet_v2@1"


def png(seed: int) -> bytes:
    return noise_png(seed, 32)


pytestmark = pytest.mark.usefixtures("everything_served")


async def test_the_lane_leaves_the_jobs_of_a_batch_still_being_received(
    client: httpx.AsyncClient, app: FastAPI, users: Users, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file commits with its job: the request is frozen at its 4th file (as a process that
    died there would be). The lane, with another user's batch running, queues none of the three
    jobs of the batch still 'receiving'."""
    user, headers = await users.create()
    _, other = await users.create()
    inspect = images_service.inspect_upload
    frozen = pause_inspection(monkeypatch, at=4)  # never resumed until the end: the process "died"
    sending = asyncio.create_task(
        client.post(
            "/v1/batches",
            files=[("file", (f"{i}.png", png(200 + i))) for i in range(6)],
            data={"models": MODEL},
            headers=headers,
        )
    )
    try:
        await asyncio.wait_for(frozen.reached.wait(), 10)
        monkeypatch.setattr(images_service, "inspect_upload", inspect)
        # Someone else's batch is running.
        r = await client.post(
            "/v1/batches", files=[("file", ("o.png", png(299)))], data={"models": MODEL}, headers=other
        )
        assert r.status_code == 202, r.text
        async with app.state.sessionmaker() as session:
            [(batch_id, status)] = list(
                await session.execute(select(Batch.id, Batch.status).where(Batch.owner_id == user["id"]))
            )
            prefix = f"{keys.BATCH_REQUEST_PREFIX}{batch_id}"
            before = list(await session.scalars(select(Job.status).where(Job.request_id == prefix)))
        async with app.state.sessionmaker() as session:
            await lane.top_up(
                session=session, redis=app.state.redis, store=app.state.store, in_flight=10, job_seconds=60, served=None
            )
        async with app.state.sessionmaker() as session:
            after = list(await session.scalars(select(Job.status).where(Job.request_id == prefix)))
        assert status == "receiving" and before == after == ["pending"] * 3, (status, before, after)
    finally:
        frozen.resume.set()
        await asyncio.wait_for(sending, 30)


async def test_a_stored_image_deleted_while_its_batch_is_received_cancels_the_batch(
    client: httpx.AsyncClient, app: FastAPI, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /v1/batches with a file and image_ids=[I1, I2]; I2 is deleted between the batch reading
    it and inserting its job. The batch is cancelled with the file's committed job, not left
    'receiving', and no item names a job the rollback took back."""
    user, headers = await users.create()
    i1 = (await client.post("/v1/images", files={"file": ("i1", png(101))}, headers=headers)).json()["id"]
    i2 = (await client.post("/v1/images", files={"file": ("i2", png(102))}, headers=headers)).json()["id"]
    got_i2, go_on = asyncio.Event(), asyncio.Event()
    get_owned = images_service.get_owned_image

    async def slow_get(**kw: Any) -> Any:
        image = await get_owned(**kw)
        if str(kw["image_id"]) == i2:
            got_i2.set()
            await go_on.wait()
        return image

    monkeypatch.setattr(images_service, "get_owned_image", slow_get)
    sending = asyncio.create_task(
        client.post(
            "/v1/batches",
            files=[("file", ("c.png", png(103)))],
            data={"models": MODEL, "image_ids": f"{i1},{i2}"},
            headers=headers,
        )
    )
    await asyncio.wait_for(got_i2.wait(), 10)
    monkeypatch.setattr(images_service, "get_owned_image", get_owned)  # the DELETE route reads it too
    d = await client.delete(f"/v1/images/{i2}", headers=headers)
    assert d.status_code == 204, d.text
    go_on.set()
    r = await asyncio.wait_for(sending, 30)
    async with app.state.sessionmaker() as session:
        batches = list(await session.execute(select(Batch.id, Batch.status).where(Batch.owner_id == user["id"])))
        [(batch_id, status)] = batches
        items = await session.scalar(select(func.count()).select_from(BatchItem).where(BatchItem.batch_id == batch_id))
        jobs = list(
            await session.scalars(select(Job.status).where(Job.request_id == f"{keys.BATCH_REQUEST_PREFIX}{batch_id}"))
        )
    assert r.status_code < 500
    # The file's item, committed with its job; not I1's, whose job the rollback took back.
    assert items == 1, items
    assert status == "cancelled" and set(jobs) == {"cancelled"}, (status, jobs, r.status_code, r.text)


async def test_a_copy_of_a_file_whose_image_was_deleted_meanwhile_is_stored_anew(
    client: httpx.AsyncClient, app: FastAPI, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files [a, b, a]: each file commits, so the user can delete a's image before the third file,
    a copy of a that would reuse its image and job. The copy is stored anew with a job of its own
    and the batch goes on (it reused the deleted rows, and the whole batch was cancelled)."""
    user, headers = await users.create()
    a, b = png(801), png(802)
    third = pause_inspection(monkeypatch, at=3)
    sending = asyncio.create_task(
        client.post(
            "/v1/batches",
            files=[("file", ("a.png", a)), ("file", ("b.png", b)), ("file", ("a-again.png", a))],
            data={"models": MODEL},
            headers=headers,
        )
    )
    await asyncio.wait_for(third.reached.wait(), 10)
    listed = (await client.get("/v1/images", headers=headers)).json()["data"]
    [a_image] = [i for i in listed if i["filename"] == "a.png"]
    assert (await client.delete(f"/v1/images/{a_image['id']}", headers=headers)).status_code == 204
    third.resume.set()
    r = await asyncio.wait_for(sending, 30)
    assert r.status_code == 202, r.text
    async with app.state.sessionmaker() as session:
        [(batch_id, status)] = list(
            await session.execute(select(Batch.id, Batch.status).where(Batch.owner_id == user["id"]))
        )
        items = {
            name: (image_id, job_id)
            for name, image_id, job_id in await session.execute(
                select(BatchItem.file_name, BatchItem.image_id, BatchItem.job_id).where(BatchItem.batch_id == batch_id)
            )
        }
        jobs = list(
            await session.scalars(select(Job.status).where(Job.request_id == f"{keys.BATCH_REQUEST_PREFIX}{batch_id}"))
        )
    assert status != "cancelled" and "cancelled" not in jobs and len(jobs) == 2, (status, jobs)
    # a's item lost its image and job with the delete; the copy has new ones.
    assert items["a.png"] == (None, None), items
    assert None not in items["a-again.png"] and items["a-again.png"][0] != uuid.UUID(a_image["id"]), items
    assert None not in items["b.png"], items


async def test_a_batch_whose_owner_is_deleted_after_its_last_file_gets_401(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file commits, so once the last one is in nothing holds the owner's row: deleting the
    user then answers the batch 401, as for the earlier files."""
    from api.app.batches import service as batches_service

    user, headers = await users.create()
    received, go_on = asyncio.Event(), asyncio.Event()
    receive = batches_service._receive

    async def paced(*args: Any, **kw: Any) -> None:
        await receive(*args, **kw)
        received.set()
        await go_on.wait()

    monkeypatch.setattr(batches_service, "_receive", paced)
    sending = asyncio.create_task(
        client.post("/v1/batches", files=[("file", ("a.png", png(701)))], data={"models": MODEL}, headers=headers)
    )
    await asyncio.wait_for(received.wait(), 10)
    d = await client.delete(f"/v1/users/{user['id']}", headers=admin_headers)
    assert d.status_code == 204, d.text
    go_on.set()
    r = await asyncio.wait_for(sending, 30)
    assert r.status_code == 401, (r.status_code, r.text)


async def test_a_batch_left_receiving_is_cancelled_once_nothing_arrived_for_the_timeout(
    client: httpx.AsyncClient, app: FastAPI, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request is frozen at its 3rd file, as a process that died there would leave it. The
    sweep passes over it while its last file is recent; past the timeout it cancels the batch and
    its two pending jobs, and its four planned images no longer count against the owner's batch
    quota. When the request wakes after all, it finds its batch cancelled and answers so."""
    user, headers = await users.create()
    files = [(f"{i}.png", png(400 + i)) for i in range(4)]
    frozen, sending = await held_batch(client, headers, files, monkeypatch, at=3)
    try:

        async def sweep(stale_after: timedelta) -> int:
            async with app.state.sessionmaker() as session:
                return await lane.cancel_orphaned(session=session, stale_after=stale_after)

        async def state() -> tuple[str, list[str], int]:
            async with app.state.sessionmaker() as session:
                [(batch_id, status)] = list(
                    await session.execute(select(Batch.id, Batch.status).where(Batch.owner_id == user["id"]))
                )
                request_id = f"{keys.BATCH_REQUEST_PREFIX}{batch_id}"
                jobs = list(await session.scalars(select(Job.status).where(Job.request_id == request_id)))
                return status, jobs, await batches_service._queued_images(session, user["id"])

        assert await sweep(timedelta(minutes=1)) == 0
        assert await state() == ("receiving", ["pending", "pending"], 4)
        assert await sweep(timedelta(0)) == 1
        assert await state() == ("cancelled", ["cancelled", "cancelled"], 0)
    finally:
        frozen.resume.set()
    r = await asyncio.wait_for(sending, 30)
    assert r.status_code == 202 and r.json()["status"] == "cancelled", r.text
    assert (await state())[1] == ["cancelled"] * 4


async def test_an_owners_cancel_racing_the_requests_last_commit_cancels_every_job(
    client: httpx.AsyncClient, app: FastAPI, users: Users, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request holds its batch's row while it commits its last items and makes the batch
    running; the owner's cancel comes then. The cancel locks the batch's row before its jobs, so
    it waits, then cancels every job, those of the last commit included: none is left pending
    under a cancelled batch (never run, never cancelled, counted against the quota for good)."""
    user, headers = await users.create()
    stored = (await client.post("/v1/images", files={"file": ("s.png", png(9101))}, headers=headers)).json()
    locked, go_on = asyncio.Event(), asyncio.Event()
    flush = batches_service._flush

    async def paused_flush(session: Any, b: Any) -> None:
        if b.batch.status == "running":  # the last flush: the batch's row is held
            locked.set()
            await go_on.wait()
        await flush(session, b)

    monkeypatch.setattr(batches_service, "_flush", paused_flush)
    sending = asyncio.create_task(
        client.post(
            "/v1/batches",
            files=[("file", ("a.png", png(9102)))],
            data={"models": MODEL, "image_ids": stored["id"]},
            headers=headers,
        )
    )
    await asyncio.wait_for(locked.wait(), 15)
    async with app.state.sessionmaker() as session:
        batch_id = await session.scalar(select(Batch.id).where(Batch.owner_id == user["id"]))
    cancelling = asyncio.create_task(client.delete(f"/v1/batches/{batch_id}", headers=headers))
    await waiting_on_lock(settings, 1)
    go_on.set()
    r = await asyncio.wait_for(sending, 30)
    d = await asyncio.wait_for(cancelling, 30)
    assert r.status_code == 202 and d.status_code == 200, (r.text, d.text)
    async with app.state.sessionmaker() as session:
        status = await session.scalar(select(Batch.status).where(Batch.id == batch_id))
        request_id = f"{keys.BATCH_REQUEST_PREFIX}{batch_id}"
        jobs = list(await session.scalars(select(Job.status).where(Job.request_id == request_id)))
        waiting = await batches_service._queued_images(session, user["id"])
    assert (status, sorted(jobs), waiting) == ("cancelled", ["cancelled", "cancelled"], 0)


async def test_a_batch_received_slowly_is_not_taken_for_an_orphan(
    client: httpx.AsyncClient, app: FastAPI, users: Users, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file takes 0.4 s to check, one of them 2.5 s, and the timeout is 1.5 s; after the
    first, every file is a copy of it (no new job). The request notes that it is alive
    (``received_at``) while it waits on a file too, so the sweep, run every 0.25 s, leaves the
    batch alone: it ends running, not cancelled."""
    _, headers = await users.create()
    with app_settings(app, batch_receive_timeout_seconds=1.5):
        inspect = images_service.inspect_upload
        calls = 0

        async def slow(data: bytes, s: Settings) -> Any:
            nonlocal calls
            calls += 1
            await asyncio.sleep(2.5 if calls == 3 else 0.4)
            return await inspect(data, s)

        monkeypatch.setattr(images_service, "inspect_upload", slow)
        photo = png(9201)
        files = [("file", ("first.png", photo))] + [("file", (f"copy-{i}.png", photo)) for i in range(8)]
        sending = asyncio.create_task(client.post("/v1/batches", files=files, data={"models": MODEL}, headers=headers))
        swept = 0
        while not sending.done():
            await asyncio.sleep(0.25)
            async with app.state.sessionmaker() as session:
                swept += await lane.cancel_orphaned(session=session, stale_after=timedelta(seconds=1.5))
        r = await sending
        assert swept == 0 and r.json()["status"] == "running", r.text


async def test_an_owners_cancel_and_the_sweep_wait_for_each_other_without_deadlock(
    client: httpx.AsyncClient, app: FastAPI, users: Users, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner's cancel is held between its jobs and their predictions (an outside transaction
    holds a prediction); the sweep comes then. Both lock the owner's row, then the batch's, then
    the jobs: the sweep waits and then finds the batch cancelled. No deadlock, a 200 for the owner."""
    user, headers = await users.create()
    frozen = pause_inspection(monkeypatch, at=3)
    sending = asyncio.create_task(
        client.post(
            "/v1/batches",
            files=[("file", (f"{i}.png", png(9500 + i))) for i in range(4)],
            data={"models": MODEL},
            headers=headers,
        )
    )
    outside = await asyncpg.connect(settings.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await asyncio.wait_for(frozen.reached.wait(), 10)
        async with app.state.sessionmaker() as session:
            batch_id = await session.scalar(select(Batch.id).where(Batch.owner_id == user["id"]))
            request_id = f"{keys.BATCH_REQUEST_PREFIX}{batch_id}"
            job_ids = list(await session.scalars(select(Job.id).where(Job.request_id == request_id)))
            prediction_id = await session.scalar(select(Prediction.id).where(Prediction.job_id == job_ids[0]))
        tx = outside.transaction()
        await tx.start()
        await outside.execute("SELECT 1 FROM predictions WHERE id = $1 FOR UPDATE", prediction_id)
        cancelling = asyncio.create_task(client.delete(f"/v1/batches/{batch_id}", headers=headers))
        await waiting_on_lock(settings, 1)

        async def sweep() -> int:
            async with app.state.sessionmaker() as session:
                return await lane.cancel_orphaned(session=session, stale_after=timedelta(0))

        sweeping = asyncio.create_task(sweep())
        await waiting_on_lock(settings, 2)
        await tx.rollback()
        d, swept = await asyncio.wait_for(asyncio.gather(cancelling, sweeping), 30)
    finally:
        frozen.resume.set()
        await outside.close()
    await asyncio.wait_for(sending, 30)
    assert d.status_code == 200 and d.json()["status"] == "cancelled" and swept == 0, (d.text, swept)


async def test_a_request_whose_batch_was_cancelled_meanwhile_stores_no_more_files(
    client: httpx.AsyncClient, app: FastAPI, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held at its 2nd file of 6 while its owner cancels the batch (as the lane does when the
    process stalled past the timeout): its next note of being alive finds the batch cancelled, so
    once it wakes it stores the file it held and no other, and answers the batch cancelled, not
    fully received, and finished when its owner cancelled it."""
    user, headers = await users.create()
    with app_settings(app, batch_receive_timeout_seconds=1.0):  # a note every 0.1 s
        files = [(f"{i}.png", png(9300 + i)) for i in range(6)]
        frozen, sending = await held_batch(client, headers, files, monkeypatch, at=2)
        try:
            async with app.state.sessionmaker() as session:
                [batch_id] = list(await session.scalars(select(Batch.id).where(Batch.owner_id == user["id"])))
            cancelled = await client.delete(f"/v1/batches/{batch_id}", headers=headers)
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
            await asyncio.sleep(0.5)  # a few notes
        finally:
            frozen.resume.set()
        r = await asyncio.wait_for(sending, 30)
    assert r.status_code == 202 and r.json()["status"] == "cancelled" and r.json()["fully_received"] is False, r.text
    # It ended when its owner cancelled it, not when the request noticed.
    assert cancelled.json()["finished_at"] is not None
    assert r.json()["finished_at"] == cancelled.json()["finished_at"], (r.json(), cancelled.json())
    async with app.state.sessionmaker() as session:
        stored = await session.scalar(select(func.count()).select_from(BatchItem).where(BatchItem.batch_id == batch_id))
    assert stored == 2, stored
