"""A batch request sent again with its ``Idempotency-Key`` (its answer was lost) gets the batch the
first one made, never a second copy; the key sent with another request is refused; a batch
cancelled before it was fully received lets go of its key. No model worker: jobs wait."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, update

from api.app.batches.models import Batch
from api.app.core.config import Settings
from api.app.main import create_app
from api.app.predictions.models import Job
from contracts import keys
from tests.conftest import Users, client_for
from tests.images import noise_png
from tests.support import app_settings, held_batch

pytestmark = pytest.mark.usefixtures("everything_served")

MODEL = "mobilenet_v2@1"


def pngs(seed: int, count: int) -> list[tuple[str, bytes]]:
    return [(f"{i}.png", noise_png(seed + i, 32)) for i in range(count)]


async def send(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    files: list[tuple[str, bytes]],
    key: str | None,
    models: str = MODEL,
) -> httpx.Response:
    return await client.post(
        "/v1/batches",
        files=[("file", f) for f in files],
        data={"models": models},
        headers={**headers, **({"Idempotency-Key": key} if key is not None else {})},
    )


async def batches_of(app: FastAPI, owner_id: int) -> list[tuple[uuid.UUID, str]]:
    async with app.state.sessionmaker() as session:
        rows = await session.execute(
            select(Batch.id, Batch.status).where(Batch.owner_id == owner_id).order_by(Batch.created_at)
        )
        return [(r[0], r[1]) for r in rows]


async def jobs_of(app: FastAPI, batch_id: uuid.UUID | str) -> int:
    async with app.state.sessionmaker() as session:
        prefix = f"{keys.BATCH_REQUEST_PREFIX}{batch_id}"
        return int(await session.scalar(select(func.count()).select_from(Job).where(Job.request_id == prefix)) or 0)


async def test_the_same_request_sent_again_gets_the_first_batch_even_past_the_quota(
    settings: Settings, users: Users
) -> None:
    """Sent twice with one key: one batch, its three images stored and queued once, the second
    answer is the same batch marked replayed. The quota (3 images waiting) would refuse a second
    batch of three, and does for the same files without the key: a replay adds nothing to wait."""
    user, headers = await users.create()
    small = settings.model_copy(update={"max_batch_images_queued_per_user": 3})
    files = pngs(100, 3)
    key = str(uuid.uuid4())
    app = create_app(small)
    async for client in client_for(app):
        first = await send(client, headers, files, key)
        assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers, first.text
        assert first.json()["fully_received"] is True
        again = await send(client, headers, files, key)
        assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true", again.text
        assert again.json()["id"] == first.json()["id"] and again.json()["counts"]["images"] == 3, again.text
        assert [str(b) for b, _ in await batches_of(app, user["id"])] == [first.json()["id"]]
        assert await jobs_of(app, first.json()["id"]) == 3
        without = await send(client, headers, files, None)
        assert without.status_code == 429, without.text


async def test_a_key_sent_with_another_request_is_refused_and_keys_are_each_owners_own(
    client: httpx.AsyncClient, app: FastAPI, users: Users
) -> None:
    """The key again with other files, another file count or other models: 422 naming the first
    batch, nothing stored. Another user's identical key is theirs: a batch of their own. A key
    that is not 1-255 visible ASCII characters is 422 before anything is read."""
    user, headers = await users.create()
    other_user, other = await users.create()
    key = "order-2026-12-04/42"
    first = await send(client, headers, pngs(200, 2), key)
    assert first.status_code == 202, first.text
    batch_id = first.json()["id"]
    for files, models in ((pngs(300, 2), MODEL), (pngs(200, 3), MODEL), (pngs(200, 2), "sketch@1")):
        r = await send(client, headers, files, key, models)
        assert r.status_code == 422 and batch_id in r.json()["detail"] and "new key" in r.json()["detail"], r.text
        assert r.headers["Location"] == f"/v1/batches/{batch_id}"
    assert [str(b) for b, _ in await batches_of(app, user["id"])] == [batch_id]
    theirs = await send(client, other, pngs(200, 2), key)
    assert theirs.status_code == 202 and theirs.json()["id"] != batch_id, theirs.text
    assert "Idempotent-Replayed" not in theirs.headers
    # Asked by its key, each owner's list holds their own batch only.
    for who, expected in ((headers, batch_id), (other, theirs.json()["id"])):
        r = await client.get("/v1/batches", params={"idempotency_key": key}, headers=who)
        assert r.status_code == 200 and [b["id"] for b in r.json()["data"]] == [expected], r.text
        assert r.json()["count"] == 1
    r = await client.get("/v1/batches", params={"idempotency_key": "never-sent"}, headers=headers)
    assert r.status_code == 200 and r.json() == {"data": [], "count": 0}, r.text
    r = await client.get("/v1/batches", params={"idempotency_key": "has space"}, headers=headers)
    assert r.status_code == 422, r.text
    for bad in ("", "has space", "x" * 256, "é"):
        r = await client.post(
            "/v1/batches",
            files=[("file", ("a.png", noise_png(1, 32)))],
            data={"models": MODEL},
            headers=[*((k.encode(), v.encode()) for k, v in headers.items()), (b"Idempotency-Key", bad.encode())],
        )
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"], (bad, r.text)
    two = [
        *((k.encode(), v.encode()) for k, v in headers.items()),
        (b"Idempotency-Key", b"a"),
        (b"Idempotency-Key", b"b"),
    ]
    r = await client.post(
        "/v1/batches", files=[("file", ("a.png", noise_png(1, 32)))], data={"models": MODEL}, headers=two
    )
    assert r.status_code == 422 and "one Idempotency-Key" in r.json()["detail"], r.text
    assert len(await batches_of(app, user["id"])) == 1 and len(await batches_of(app, other_user["id"])) == 1


async def test_a_key_whose_batch_is_still_being_received_answers_409_with_its_location(
    client: httpx.AsyncClient, app: FastAPI, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request is held at its 2nd file; the same request again gets 409 with the
    batch's URL and Retry-After, and stores nothing. Once the first ends, the key returns its batch."""
    user, headers = await users.create()
    files, key = pngs(400, 3), str(uuid.uuid4())
    frozen, sending = await held_batch(client, headers, files, monkeypatch, at=2, key=key)
    try:
        [(batch_id, status)] = await batches_of(app, user["id"])
        assert status == "receiving"
        r = await send(client, headers, files, key)
        assert r.status_code == 409 and r.headers["Location"] == f"/v1/batches/{batch_id}", r.text
        assert int(r.headers["Retry-After"]) >= 0 and str(batch_id) in r.json()["detail"]
    finally:
        frozen.resume.set()
    first = await asyncio.wait_for(sending, 30)
    assert first.status_code == 202 and first.json()["id"] == str(batch_id), first.text
    assert await jobs_of(app, batch_id) == 3
    again = await send(client, headers, files, key)
    assert again.status_code == 202 and again.json()["id"] == str(batch_id) and again.json()["status"] == "running"


async def test_a_batch_cancelled_while_received_lets_go_of_its_key(
    client: httpx.AsyncClient, app: FastAPI, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled by its owner while its request was still storing files (as the sweep does when
    that request's process died): the same request with the same key then makes a new batch, it
    is not answered with the cancelled half. A batch cancelled after it was received keeps its key."""
    user, headers = await users.create()
    files, key = pngs(500, 3), str(uuid.uuid4())
    frozen, sending = await held_batch(client, headers, files, monkeypatch, at=2, key=key)
    try:
        [(batch_id, _)] = await batches_of(app, user["id"])
        found = await client.get("/v1/batches", params={"idempotency_key": key}, headers=headers)
        assert [(b["id"], b["status"]) for b in found.json()["data"]] == [(str(batch_id), "receiving")], found.text
        cancelled = await client.delete(f"/v1/batches/{batch_id}", headers=headers)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        found = await client.get("/v1/batches", params={"idempotency_key": key}, headers=headers)
        assert found.json()["count"] == 0, found.text  # the key is free: the send is made anew
    finally:
        frozen.resume.set()
    first = await asyncio.wait_for(sending, 30)
    assert first.status_code == 202 and first.json()["status"] == "cancelled", first.text
    assert first.json()["fully_received"] is False  # its sender may send it again
    second = await send(client, headers, files, key)
    assert second.status_code == 202 and second.json()["id"] != str(batch_id), second.text
    assert second.json()["status"] == "running" and "Idempotent-Replayed" not in second.headers
    await client.delete(f"/v1/batches/{second.json()['id']}", headers=headers)
    third = await send(client, headers, files, key)
    assert third.json()["id"] == second.json()["id"] and third.json()["status"] == "cancelled", third.text
    assert third.headers["Idempotent-Replayed"] == "true"


async def test_the_same_request_sent_five_times_at_once_makes_one_batch(
    client: httpx.AsyncClient, app: FastAPI, users: Users
) -> None:
    """Five sends of one request with one key at the same moment: one batch with its images once;
    every answer is that batch (202, replayed but one) or 409 while it was being received."""
    user, headers = await users.create()
    files, key = pngs(600, 4), str(uuid.uuid4())
    answers = await asyncio.gather(*(send(client, headers, files, key) for _ in range(5)))
    [(batch_id, status)] = await batches_of(app, user["id"])
    assert status == "running" and await jobs_of(app, batch_id) == 4
    made = [r for r in answers if r.status_code == 202 and "Idempotent-Replayed" not in r.headers]
    assert len(made) == 1 and made[0].json()["id"] == str(batch_id), [r.text for r in answers]
    for r in answers:
        assert r.status_code in (202, 409), r.text
        assert (r.json()["id"] if r.status_code == 202 else r.headers["Location"].rsplit("/", 1)[1]) == str(batch_id)


async def test_a_batch_whose_process_stopped_receiving_it_is_made_anew_when_sent_again(
    client: httpx.AsyncClient, app: FastAPI, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request is held at its 2nd file and its notes made BATCH_RECEIVE_TIMEOUT_SECONDS
    old, as a process killed or stopped there leaves them: the request sent again, here with the
    files changed meanwhile, does not wait on a 409 for the lane's sweep nor get a 422 for the
    change; it cancels that batch and makes the batch itself."""
    user, headers = await users.create()
    files, changed, key = pngs(700, 3), pngs(800, 2), str(uuid.uuid4())
    # Notes a minute apart: none comes between the notes made old and the request sent again.
    with app_settings(app, batch_receive_timeout_seconds=600.0) as settings:
        frozen, sending = await held_batch(client, headers, files, monkeypatch, at=2, key=key)
        try:
            [(stopped, _)] = await batches_of(app, user["id"])
            long_ago = func.now() - timedelta(seconds=settings.batch_receive_timeout_seconds + 1)
            async with app.state.sessionmaker() as session:
                await session.execute(
                    update(Batch).where(Batch.id == stopped).values(received_at=long_ago, created_at=long_ago)
                )
                await session.commit()
            again = await send(client, headers, changed, key)
            assert again.status_code == 202 and again.json()["id"] != str(stopped), again.text
            assert again.json()["status"] == "running" and "Idempotent-Replayed" not in again.headers
            made = uuid.UUID(again.json()["id"])
            assert await batches_of(app, user["id"]) == [(stopped, "cancelled"), (made, "running")]
        finally:
            frozen.resume.set()
        first = await asyncio.wait_for(sending, 30)
    assert first.status_code == 202 and first.json()["status"] == "cancelled", first.text
    assert (await send(client, headers, changed, key)).json()["id"] == str(made)
