"""Deleting a user while they, or others, upload, predict, send batches and give verdicts: no
deadlock, no 500, a clear 4xx for the deleted user's requests, no file left behind, and nothing
of another user lost.

Every writer that adds rows under a user takes that user's row (``OWNER_KEY_SHARE``) before its
other locks; ``delete_user`` locks the row ``FOR UPDATE`` first, deletes it with everything it owns
and commits, then deletes the files no other upload references, a chunk at a time under their blob
locks. No model worker: the catalogue is told every registry model is served, so jobs just wait in
the queue. An outside transaction holding one of the user's uploads ``FOR KEY SHARE`` stands for a
prediction or verdict on it in progress: the cascade waits for it with the user's row locked, long
enough to interleave; one holding a blob's advisory lock stands for another user's upload of that
content in progress."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from api.app.core.config import Settings
from api.app.images import service as images_service
from tests.conftest import PASSWORD, Users
from tests.images import noise_png
from tests.support import blob_lock, image_row_lock, pause_inspection, waiting_on_lock

MODEL = "mobilenet_v2@1"


def png(seed: int) -> bytes:
    # 32 pixels: no other test's noise (64) has the same content, whose blob these tests watch.
    return noise_png(seed, 32)


pytestmark = pytest.mark.usefixtures("everything_served")


@asynccontextmanager
async def deletion_held(
    client: httpx.AsyncClient, settings: Settings, user_id: int, image_id: str, admin_headers: dict[str, str]
) -> AsyncIterator[asyncio.Task[httpx.Response]]:
    """``DELETE /v1/users/{user_id}`` started, and waiting with the user's row locked: its cascade
    needs the upload ``image_id``, held outside (``image_row_lock``) until the block ends."""
    conn, tx = await image_row_lock(settings, image_id)
    try:
        deleting = asyncio.create_task(client.delete(f"/v1/users/{user_id}", headers=admin_headers))
        await waiting_on_lock(settings, 1)
        yield deleting
        await tx.commit()
    finally:
        await conn.close()


async def test_predicting_a_stored_image_while_its_owner_is_deleted_waits_and_gets_401(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str], settings: Settings
) -> None:
    """A job's insert locks its image row, and the delete's cascade needs that row: the request
    takes the owner's row before, so it waits for the delete instead of deadlocking with it."""
    user, headers = await users.create()
    data = png(1)
    r = await client.post("/v1/images", files={"file": ("a.png", data)}, headers=headers)
    assert r.status_code == 201, r.text
    image_id = r.json()["id"]
    # delete_user: the row FOR UPDATE held, its cascade waits for the upload.
    async with deletion_held(client, settings, user["id"], image_id, admin_headers) as deleting:
        predicting = asyncio.create_task(
            client.post("/v1/predictions", json={"image_id": image_id, "models": [MODEL]}, headers=headers)
        )
        await waiting_on_lock(settings, 2)  # the request waits for the user row
    d, p = await asyncio.wait_for(asyncio.gather(deleting, predicting), 30)
    assert d.status_code == 204 and p.status_code == 401, (d.status_code, d.text, p.status_code, p.text)


async def test_a_batch_whose_owner_is_deleted_while_it_is_received(
    client: httpx.AsyncClient,
    users: Users,
    admin_headers: dict[str, str],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch row is committed, then the files are read and stored; the owner is deleted in
    between: the batch answers 401, its row gone with its owner."""
    user, headers = await users.create()
    first = pause_inspection(monkeypatch, at=1)
    sending = asyncio.create_task(
        client.post(
            "/v1/batches",
            files=[("file", ("a.png", png(2))), ("file", ("b.png", png(3)))],
            data={"models": MODEL},
            headers=headers,
        )
    )
    await asyncio.wait_for(first.reached.wait(), 10)
    d = await client.delete(f"/v1/users/{user['id']}", headers=admin_headers)
    assert d.status_code == 204, d.text
    first.resume.set()
    r = await asyncio.wait_for(sending, 30)
    assert r.status_code == 401, (r.status_code, r.text)


async def test_a_batch_with_a_skipped_file_whose_owner_is_deleted(
    client: httpx.AsyncClient,
    users: Users,
    admin_headers: dict[str, str],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, with a first file that is no image (an item already listed): still the 401, not
    a conflict from writing that item for the deleted batch."""
    user, headers = await users.create()
    the_png = pause_inspection(monkeypatch, at=2)
    sending = asyncio.create_task(
        client.post(
            "/v1/batches",
            files=[("file", ("notes.txt", b"not an image")), ("file", ("a.png", png(4)))],
            data={"models": MODEL},
            headers=headers,
        )
    )
    await asyncio.wait_for(the_png.reached.wait(), 10)
    d = await client.delete(f"/v1/users/{user['id']}", headers=admin_headers)
    assert d.status_code == 204, d.text
    the_png.resume.set()
    r = await asyncio.wait_for(sending, 30)
    assert r.status_code == 401, (r.status_code, r.text)


async def test_batches_of_two_users_with_the_same_files_in_opposite_orders(
    client: httpx.AsyncClient, users: Users, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file of a batch commits on its own, so its transaction holds one blob lock: two people
    sending the same two photos in opposite orders never wait for each other in a circle."""
    _, h1 = await users.create()
    _, h2 = await users.create()
    x, y = png(5), png(6)
    seen: dict[bytes, int] = {x: 0, y: 0}
    both_have_one = asyncio.Event()
    inspect = images_service.inspect_upload

    async def paced(data: bytes, s: Settings) -> Any:
        seen[data] = seen.get(data, 0) + 1
        if sum(seen.values()) >= 3:  # each batch's second file: wait until both stored their first
            await asyncio.sleep(0.5)
            both_have_one.set()
        await both_have_one.wait() if sum(seen.values()) >= 3 else None
        return await inspect(data, s)

    monkeypatch.setattr(images_service, "inspect_upload", paced)
    a = asyncio.create_task(
        client.post("/v1/batches", files=[("file", ("x", x)), ("file", ("y", y))], data={"models": MODEL}, headers=h1)
    )
    b = asyncio.create_task(
        client.post("/v1/batches", files=[("file", ("y", y)), ("file", ("x", x))], data={"models": MODEL}, headers=h2)
    )
    ra, rb = await asyncio.wait_for(asyncio.gather(a, b, return_exceptions=True), 60)
    out = [(r.status_code, r.text[:200]) if isinstance(r, httpx.Response) else repr(r) for r in (ra, rb)]
    assert all(isinstance(r, httpx.Response) and r.status_code == 202 for r in (ra, rb)), out


async def test_a_batch_and_the_deletion_of_another_user_sharing_two_files(
    client: httpx.AsyncClient,
    users: Users,
    admin_headers: dict[str, str],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A has X and Y. B's batch sends Y then X while A is deleted (A's blobs locked sorted, X
    first): both succeed, and B's copies stay."""
    a_user, ha = await users.create()
    _, hb = await users.create()
    files = [png(7), png(8)]
    files.sort(key=lambda d: hashlib.sha256(d).hexdigest())
    x, y = files  # sha(x) < sha(y): the delete locks x first
    for d in (x, y):
        assert (await client.post("/v1/images", files={"file": ("f", d)}, headers=ha)).status_code == 201
    first_stored = pause_inspection(monkeypatch, at=2)  # B's second file (x): B holds y's lock now
    sending = asyncio.create_task(
        client.post("/v1/batches", files=[("file", ("y", y)), ("file", ("x", x))], data={"models": MODEL}, headers=hb)
    )
    await asyncio.wait_for(first_stored.reached.wait(), 10)
    deleting = asyncio.create_task(client.delete(f"/v1/users/{a_user['id']}", headers=admin_headers))
    await asyncio.wait({deleting}, timeout=2)  # done, or waiting on B: either way B goes on
    first_stored.resume.set()
    rb, rd = await asyncio.wait_for(asyncio.gather(sending, deleting), 60)
    assert rb.status_code == 202 and rd.status_code == 204, (rb.status_code, rb.text, rd.status_code, rd.text)
    for d in (x, y):
        assert list(settings.storage_dir.rglob(hashlib.sha256(d).hexdigest()))


async def test_uploads_by_a_user_being_deleted_get_401_and_leave_nothing(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str], settings: Settings
) -> None:
    """An upload (POST /v1/images, /model/predict) of new or already owned content that arrives
    while the user is being deleted waits and gets 401; the delete succeeds; no file is left;
    another user's copy of the content is kept."""
    user, headers = await users.create()
    _, other = await users.create()
    had = png(9)
    shared = png(10)
    ids = []
    for content in (had, shared):
        r = await client.post("/v1/images", files={"file": ("h", content)}, headers=headers)
        assert r.status_code == 201
        ids.append(r.json()["id"])
    assert (await client.post("/v1/images", files={"file": ("s", shared)}, headers=other)).status_code == 201
    new1, new2 = png(11), png(12)
    async with deletion_held(client, settings, user["id"], ids[0], admin_headers) as deleting:
        reqs = [
            client.post("/v1/images", files={"file": ("a", had)}, headers=headers),
            client.post("/v1/images", files={"file": ("b", new1)}, headers=headers),
            client.post("/model/predict", params={"models": MODEL}, files={"file": ("c", new2)}, headers=headers),
            client.post("/model/predict", params={"models": MODEL}, files={"file": ("d", shared)}, headers=headers),
        ]
        tasks = [asyncio.create_task(r) for r in reqs]
        await waiting_on_lock(settings, 5)
    d = await asyncio.wait_for(deleting, 30)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert d.status_code == 204
    assert all(r.status_code == 401 for r in results)
    for blob in (had, new1, new2):
        assert not list(settings.storage_dir.rglob(hashlib.sha256(blob).hexdigest() + "*"))
    assert list(settings.storage_dir.rglob(hashlib.sha256(shared).hexdigest()))


async def test_a_verdict_by_a_user_being_deleted(
    client: httpx.AsyncClient, app: FastAPI, users: Users, admin_headers: dict[str, str], settings: Settings
) -> None:
    """A verdict sent while the user is being deleted waits for the delete and gets no 500."""
    from datetime import UTC, datetime, timedelta

    from api.app.predictions.models import Job, Prediction

    user, headers = await users.create()
    data = png(13)
    r = await client.post("/v1/images", files={"file": ("a.png", data)}, headers=headers)
    image_id = uuid.UUID(r.json()["id"])
    now = datetime.now(UTC)
    job_id, pred_id = uuid.uuid4(), uuid.uuid4()
    async with app.state.sessionmaker() as session:
        session.add(
            Job(
                id=job_id,
                owner_id=user["id"],
                image_id=image_id,
                status="done",
                request_id="r",
                deadline_at=now + timedelta(minutes=1),
                created_at=now,
                finished_at=now,
            )
        )
        await session.flush()
        session.add(
            Prediction(
                id=pred_id,
                job_id=job_id,
                position=0,
                model_name="mobilenet_v2",
                model_version=1,
                status="done",
                label="macaw",
                score=0.9,
                top_k=[{"label": "macaw", "score": 0.9}],
                cached=False,
                random_weights=False,
                created_at=now,
                finished_at=now,
            )
        )
        await session.commit()
    # Another upload of theirs, held outside, keeps the delete waiting with the row locked.
    r = await client.post("/v1/images", files={"file": ("o", png(14))}, headers=headers)
    assert r.status_code == 201
    async with deletion_held(client, settings, user["id"], r.json()["id"], admin_headers) as deleting:
        verdict = asyncio.create_task(
            client.post("/v1/feedback", json={"prediction_id": str(pred_id), "is_correct": True}, headers=headers)
        )
        await waiting_on_lock(settings, 2)
    d, v = await asyncio.wait_for(asyncio.gather(deleting, verdict), 30)
    assert d.status_code == 204 and v.status_code < 500


async def test_deleting_an_image_while_its_owner_is_deleted(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str], settings: Settings
) -> None:
    """DELETE /v1/images/{id} of an owner being deleted: no deadlock, no 500."""
    user, headers = await users.create()
    x, other = png(15), png(16)
    r = await client.post("/v1/images", files={"file": ("x", x)}, headers=headers)
    image_id = r.json()["id"]
    r = await client.post("/v1/images", files={"file": ("o", other)}, headers=headers)
    assert r.status_code == 201
    # The delete waits on `other`'s row, holding the user's (and maybe x's, deleted first).
    async with deletion_held(client, settings, user["id"], r.json()["id"], admin_headers) as deleting:
        removing = asyncio.create_task(client.delete(f"/v1/images/{image_id}", headers=headers))
        await asyncio.sleep(1.0)
    d, i = await asyncio.wait_for(asyncio.gather(deleting, removing), 30)
    assert d.status_code == 204 and i.status_code in (204, 404)
    assert not list(settings.storage_dir.rglob(hashlib.sha256(x).hexdigest() + "*"))


async def test_batches_crossing_on_shared_files_leave_no_file_and_no_batch_receiving(
    client: httpx.AsyncClient, app: FastAPI, users: Users, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B sends [z (new, only B's), y, x], A sends [x, y], paced so that with batch-wide
    transactions each would hold one lock the other wants. Both are received, z's file has its row."""
    from sqlalchemy import func, select

    from api.app.batches.models import Batch
    from api.app.images.models import Image as ImageRow

    _, ha = await users.create()
    b_user, hb = await users.create()
    x, y, z = png(21), png(22), png(23)
    calls: dict[bytes, int] = {x: 0, y: 0, z: 0}
    b_has_y = asyncio.Event()
    inspect = images_service.inspect_upload

    async def paced(data: bytes, s: Settings) -> Any:
        calls[data] = calls.get(data, 0) + 1
        if data == y and calls[y] == 1:  # A's second file: A holds x's lock now
            await b_has_y.wait()
            await asyncio.sleep(0.3)  # B waits for x first: B is the victim
        elif data == x and calls[x] == 2:  # B's third file: B holds z's and y's locks
            b_has_y.set()
        return await inspect(data, s)

    monkeypatch.setattr(images_service, "inspect_upload", paced)
    a = asyncio.create_task(
        client.post("/v1/batches", files=[("file", ("x", x)), ("file", ("y", y))], data={"models": MODEL}, headers=ha)
    )
    await asyncio.sleep(0.2)
    b = asyncio.create_task(
        client.post(
            "/v1/batches",
            files=[("file", ("z", z)), ("file", ("y", y)), ("file", ("x", x))],
            data={"models": MODEL},
            headers=hb,
        )
    )
    ra, rb = await asyncio.wait_for(asyncio.gather(a, b), 60)
    z_sha = hashlib.sha256(z).hexdigest()
    async with app.state.sessionmaker() as session:
        z_rows = await session.scalar(select(func.count()).select_from(ImageRow).where(ImageRow.sha256 == z_sha))
        statuses = list(await session.scalars(select(Batch.status).where(Batch.owner_id == b_user["id"])))
    z_files = list(settings.storage_dir.rglob(z_sha))
    assert ra.status_code == 202 and rb.status_code == 202, (ra.text, rb.text)
    assert z_rows or not z_files, "z's file leaked"
    assert "receiving" not in statuses


async def test_another_users_upload_of_the_same_content_survives_the_deletion(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str], settings: Settings
) -> None:
    """The delete's rows are gone and its file step waits for x's blob lock (held outside, as
    another upload of x in progress would); another user's upload of x waits behind it, then
    stores x again after the delete removed it: its row points at a file that exists."""
    leaving, hl = await users.create()
    _, other = await users.create()
    x, later = png(31), png(32)
    for content in (x, later):
        assert (await client.post("/v1/images", files={"file": ("f", content)}, headers=hl)).status_code == 201
    conn, tx = await blob_lock(settings, hashlib.sha256(x).hexdigest())
    try:
        deleting = asyncio.create_task(client.delete(f"/v1/users/{leaving['id']}", headers=admin_headers))
        await waiting_on_lock(settings, 1)  # the rows committed, the file step waits for x's lock
        up = asyncio.create_task(client.post("/v1/images", files={"file": ("x", x)}, headers=other))
        await waiting_on_lock(settings, 2)
        await tx.commit()
    finally:
        await conn.close()
    d, u = await asyncio.wait_for(asyncio.gather(deleting, up), 30)
    assert d.status_code == 204 and u.status_code == 201, (d.text, u.text)
    assert list(settings.storage_dir.rglob(hashlib.sha256(x).hexdigest()))
    view = await client.get(f"/v1/images/{u.json()['id']}/view", headers=other)
    assert view.status_code == 200
    assert not list(settings.storage_dir.rglob(hashlib.sha256(later).hexdigest() + "*"))


async def test_another_users_upload_does_not_wait_for_the_deletion(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str], settings: Settings
) -> None:
    """While the delete waits with the user's row locked, another user's upload of the same
    content is stored at once (the delete holds no blob lock while it deletes rows), and its file
    stays after the delete."""
    leaving, hl = await users.create()
    _, other = await users.create()
    x = png(33)
    r = await client.post("/v1/images", files={"file": ("f", x)}, headers=hl)
    assert r.status_code == 201
    async with deletion_held(client, settings, leaving["id"], r.json()["id"], admin_headers) as deleting:
        u = await asyncio.wait_for(client.post("/v1/images", files={"file": ("x", x)}, headers=other), 10)
        assert u.status_code == 201, u.text
        assert not deleting.done()
    d = await asyncio.wait_for(deleting, 30)
    assert d.status_code == 204, d.text
    view = await client.get(f"/v1/images/{u.json()['id']}/view", headers=other)
    assert view.status_code == 200
    assert list(settings.storage_dir.rglob(hashlib.sha256(x).hexdigest()))


async def test_a_batch_of_stored_images_and_the_deletion_of_its_owner_wait_for_each_other(
    client: httpx.AsyncClient,
    users: Users,
    admin_headers: dict[str, str],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """POST /v1/batches image_ids=...: each job's insert locks its image, as POST /v1/predictions
    does; the batch takes the owner's row first, so the delete waits for it."""
    user, headers = await users.create()
    data = png(41)
    image_id = (await client.post("/v1/images", files={"file": ("a", data)}, headers=headers)).json()["id"]
    gate, arrived = asyncio.Event(), asyncio.Event()
    get_owned = images_service.get_owned_image

    async def slow_get(**kw: Any) -> Any:
        arrived.set()
        await gate.wait()
        return await get_owned(**kw)

    monkeypatch.setattr(images_service, "get_owned_image", slow_get)
    sending = asyncio.create_task(
        client.post("/v1/batches", data={"models": MODEL, "image_ids": image_id}, headers=headers)
    )
    await asyncio.wait_for(arrived.wait(), 10)  # the batch row is committed
    # The delete waits on the owner's row, which the batch holds.
    async with deletion_held(client, settings, user["id"], image_id, admin_headers) as deleting:
        gate.set()
        await asyncio.wait_for(sending, 30)
    d, b = await asyncio.wait_for(asyncio.gather(deleting, sending), 30)
    assert d.status_code == 204 and b.status_code == 202, (d.status_code, b.status_code, b.text)


async def test_a_batch_failing_on_its_first_file_is_cancelled(
    client: httpx.AsyncClient, app: FastAPI, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error before the first item (here a full disk) cancels the batch: it is not left
    'receiving' for ever."""
    import errno

    from sqlalchemy import select

    from api.app.batches.models import Batch
    from api.app.images.storage import LocalBlobStore

    user, headers = await users.create()

    async def full(self: Any, sha256: str, data: bytes, *, preview: bytes | None = None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalBlobStore, "put", full)
    r = await client.post("/v1/batches", files=[("file", ("a.png", png(51)))], data={"models": MODEL}, headers=headers)
    assert r.status_code >= 500, (r.status_code, r.text)  # the disk failed, not the request
    async with app.state.sessionmaker() as session:
        statuses = list(await session.scalars(select(Batch.status).where(Batch.owner_id == user["id"])))
    assert statuses == ["cancelled"], statuses


async def test_changing_ones_password_keys_or_batches_while_being_deleted_gets_401(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str], settings: Settings
) -> None:
    """The delete holds the user's row (waiting on one of their uploads, held outside); a
    password change, a new API key and a batch of theirs wait for it, then find the account gone:
    401 as any request of a deleted account (they were 409 "changed meanwhile" or "conflicts");
    an admin's change of the account finds it gone: 404."""
    user, headers = await users.create()
    r = await client.post("/v1/images", files={"file": ("a", png(951))}, headers=headers)
    assert r.status_code == 201
    async with deletion_held(client, settings, user["id"], r.json()["id"], admin_headers) as deleting:
        requests = [
            client.patch(
                "/v1/users/me/password",
                json={"current_password": PASSWORD, "new_password": "another-good-password"},
                headers=headers,
            ),
            client.post("/v1/api-keys", json={"name": "script", "scopes": ["read"]}, headers=headers),
            client.post("/v1/batches", files=[("file", ("b.png", png(952)))], data={"models": MODEL}, headers=headers),
        ]
        theirs = [asyncio.create_task(request) for request in requests]
        await waiting_on_lock(settings, 4, within=20)
        renaming = asyncio.create_task(
            client.patch(f"/v1/users/{user['id']}", json={"name": "N"}, headers=admin_headers)
        )
        await waiting_on_lock(settings, 5, within=20)
    d = await asyncio.wait_for(deleting, 30)
    answers = await asyncio.wait_for(asyncio.gather(*theirs), 30)
    renamed = await asyncio.wait_for(renaming, 30)
    assert d.status_code == 204
    assert [(a.status_code, a.json()["detail"]) for a in answers] == [(401, "This account no longer exists.")] * 3, [
        (a.status_code, a.text) for a in answers
    ]
    assert renamed.status_code == 404, renamed.text
