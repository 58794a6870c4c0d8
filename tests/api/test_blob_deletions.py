"""Queued blob deletions (``images_service.queue_blob_deletions``, ``retry_blob_deletions``): the
files a deletion could not delete after its commit are deleted later, not left on disk."""

from __future__ import annotations

import asyncio
import warnings

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image
from sqlalchemy import select, text

from api.app.core.config import Settings
from api.app.images import service as images_service
from api.app.images.storage import LocalBlobStore
from api.app.main import create_app
from tests.conftest import Users, client_for
from tests.images import encode

pytestmark = pytest.mark.usefixtures("client")  # the app's lifespan gives it its sessionmaker


async def queued(app: FastAPI, *sha256s: str) -> list[str]:
    async with app.state.sessionmaker() as session:
        rows = await session.scalars(
            text("SELECT sha256 FROM blob_deletions WHERE sha256 = ANY(:s) ORDER BY sha256"), {"s": list(sha256s)}
        )
        return list(rows)


async def age_queue(app: FastAPI, *sha256s: str) -> None:
    """Queued an hour ago, as a deletion its process never finished."""
    async with app.state.sessionmaker() as session:
        await session.execute(
            text("UPDATE blob_deletions SET created_at = now() - interval '1 hour' WHERE sha256 = ANY(:s)"),
            {"s": list(sha256s)},
        )
        await session.commit()


async def retry(app: FastAPI) -> int:
    async with app.state.sessionmaker() as session:
        return await images_service.retry_blob_deletions(session=session, store=app.state.store)


async def upload(client: httpx.AsyncClient, headers: dict[str, str], colour: tuple[int, int, int]) -> str:
    png = encode(Image.new("RGB", (7, 4), colour), "PNG")
    r = await client.post("/v1/images", files={"file": ("a.png", png)}, headers=headers)
    assert r.status_code == 201, r.text
    return str(r.json()["sha256"])


def failing_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    async def failing(self: LocalBlobStore, sha256: str) -> bool:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(LocalBlobStore, "delete", failing)


async def test_a_deleted_users_files_the_deletion_could_not_delete_are_deleted_later(
    client: httpx.AsyncClient,
    app: FastAPI,
    users: Users,
    admin_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The disk failing after the account's commit left the files on disk for good (only a manual
    ``sweep-blobs`` would find them); they stay queued and the retry deletes them."""
    leaving, headers = await users.create()
    shas = [await upload(client, headers, (1, 2, i)) for i in range(3)]
    with monkeypatch.context() as patched:
        failing_disk(patched)
        r = await client.delete(f"/v1/users/{leaving['id']}", headers=admin_headers)
    assert r.status_code == 204, r.text
    assert [await app.state.store.exists(sha) for sha in shas] == [True] * 3
    assert await queued(app, *shas) == sorted(shas)
    assert await retry(app) == 0  # queued just now: most likely a deletion still in progress
    await age_queue(app, *shas)
    assert await retry(app) == 3
    assert [await app.state.store.exists(sha) for sha in shas] == [False] * 3
    assert await queued(app, *shas) == []


async def test_a_file_that_cannot_be_deleted_does_not_hold_back_the_others(
    client: httpx.AsyncClient,
    app: FastAPI,
    users: Users,
    admin_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The retry took the oldest first and gave up at the first disk error: one file that can
    never be deleted (its permissions changed) kept every later one on disk for good."""
    leaving, headers = await users.create()
    shas = [await upload(client, headers, (5, 9, i)) for i in range(5)]
    with monkeypatch.context() as patched:
        failing_disk(patched)
        assert (await client.delete(f"/v1/users/{leaving['id']}", headers=admin_headers)).status_code == 204
    await age_queue(app, *shas)
    stuck = sorted(shas)[0]
    real = LocalBlobStore.delete

    async def refusing_one(self: LocalBlobStore, sha256: str) -> bool:
        if sha256 == stuck:
            raise PermissionError(13, "Permission denied")
        return await real(self, sha256)

    monkeypatch.setattr(LocalBlobStore, "delete", refusing_one)
    monkeypatch.setattr(images_service, "SWEEP_CHUNK", 2)
    assert await retry(app) == 4
    assert [await app.state.store.exists(sha) for sha in shas] == [sha == stuck for sha in shas]
    assert await queued(app, *shas) == [stuck]
    monkeypatch.undo()  # the disk lets it go: the next pass deletes it
    assert await retry(app) == 1
    assert await queued(app, *shas) == []


async def test_a_deletion_that_finishes_leaves_nothing_queued(
    client: httpx.AsyncClient, app: FastAPI, users: Users, admin_headers: dict[str, str]
) -> None:
    leaving, headers = await users.create()
    sha = await upload(client, headers, (3, 2, 1))
    assert (await client.delete(f"/v1/users/{leaving['id']}", headers=admin_headers)).status_code == 204
    assert not await app.state.store.exists(sha)
    assert await queued(app, sha) == []


async def test_a_queued_file_uploaded_again_meanwhile_stays(
    client: httpx.AsyncClient,
    app: FastAPI,
    users: Users,
    admin_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another upload of the same content after the deletion keeps the file: the retry checks
    each under its blob lock, and the queued deletion goes."""
    leaving, headers = await users.create()
    sha = await upload(client, headers, (9, 8, 7))
    with monkeypatch.context() as patched:
        failing_disk(patched)
        assert (await client.delete(f"/v1/users/{leaving['id']}", headers=admin_headers)).status_code == 204
    _, other = await users.create()
    assert await upload(client, other, (9, 8, 7)) == sha
    await age_queue(app, sha)
    assert await retry(app) == 0
    assert await app.state.store.exists(sha)
    assert await queued(app, sha) == []


async def test_an_upload_deleted_when_its_file_cannot_be_deleted(
    client: httpx.AsyncClient, app: FastAPI, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload is deleted (204) and its file is deleted later. Before, the file went before
    the commit: a commit failing then left an upload whose file was gone."""
    _, headers = await users.create()
    png = encode(Image.new("RGB", (5, 9), (4, 4, 4)), "PNG")
    image = (await client.post("/v1/images", files={"file": ("b.png", png)}, headers=headers)).json()
    with monkeypatch.context() as patched:
        failing_disk(patched)
        r = await client.delete(f"/v1/images/{image['id']}", headers=headers)
    assert r.status_code == 204, r.text
    assert (await client.get(f"/v1/images/{image['id']}", headers=headers)).status_code == 404
    assert await app.state.store.exists(image["sha256"])
    await age_queue(app, image["sha256"])
    assert await retry(app) == 1
    assert not await app.state.store.exists(image["sha256"])


async def test_an_upload_is_kept_with_its_file_when_its_deletion_fails_to_commit(
    client: httpx.AsyncClient, app: FastAPI, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file goes only once the upload's deletion is committed."""
    from sqlalchemy.ext.asyncio import AsyncSession

    _, headers = await users.create()
    png = encode(Image.new("RGB", (9, 5), (4, 5, 4)), "PNG")
    image = (await client.post("/v1/images", files={"file": ("c.png", png)}, headers=headers)).json()
    real_commit = AsyncSession.commit

    async def refused(self: AsyncSession) -> None:
        raise ConnectionResetError("connection lost")

    monkeypatch.setattr(AsyncSession, "commit", refused)
    try:
        r = await client.delete(f"/v1/images/{image['id']}", headers=headers)
    finally:
        monkeypatch.setattr(AsyncSession, "commit", real_commit)
    assert r.status_code == 503, r.text
    assert (await client.get(f"/v1/images/{image['id']}", headers=headers)).status_code == 200
    assert await app.state.store.exists(image["sha256"])


async def test_each_api_process_retries_the_queue(
    client: httpx.AsyncClient,
    settings: Settings,
    app: FastAPI,
    users: Users,
    admin_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The retry runs by itself in every API process, every BLOB_DELETION_RETRY_SECONDS."""
    leaving, headers = await users.create()
    sha = await upload(client, headers, (6, 6, 1))
    with monkeypatch.context() as patched:
        failing_disk(patched)
        assert (await client.delete(f"/v1/users/{leaving['id']}", headers=admin_headers)).status_code == 204
    monkeypatch.setattr(images_service, "BLOB_DELETION_RETRY_SECONDS", 0.2)
    async for _ in client_for(create_app(settings)):
        # The file goes first, then its row with the retry's commit: both are waited for.
        for _ in range(100):
            if not await app.state.store.exists(sha) and await queued(app, sha) == []:
                break
            await asyncio.sleep(0.1)
    assert not await app.state.store.exists(sha)
    assert await queued(app, sha) == []


async def test_an_upload_deleted_meanwhile_is_deleted_again_without_a_warning(
    client: httpx.AsyncClient, app: FastAPI, users: Users
) -> None:
    """Two deletions of one upload (its owner's deletion and theirs, or a request sent twice):
    the second found no row, and SQLAlchemy warned in the logs that its DELETE matched none."""
    from sqlalchemy.exc import SAWarning

    from api.app.images.models import Image as ImageRow

    _, headers = await users.create()
    sha = await upload(client, headers, (2, 7, 9))
    async with app.state.sessionmaker() as first, app.state.sessionmaker() as second:
        rows = [await s.scalar(select(ImageRow).where(ImageRow.sha256 == sha)) for s in (first, second)]
        assert rows[0] is not None and rows[1] is not None
        await images_service.delete_image(session=first, store=app.state.store, image=rows[0])
        with warnings.catch_warnings():
            warnings.simplefilter("error", SAWarning)
            await images_service.delete_image(session=second, store=app.state.store, image=rows[1])
    assert not await app.state.store.exists(sha)
    assert await queued(app, sha) == []
