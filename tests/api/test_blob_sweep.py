"""``api.cli sweep-blobs`` (``images_service.sweep_orphaned_blobs``): end to end, and against odd
storage folders, bad options and uploads in progress."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app.core.config import Settings
from api.app.core.db import make_engine, make_sessionmaker
from api.app.images import service as images_service
from api.app.images import storage as storage_module
from api.app.images.storage import LocalBlobStore
from api.app.main import create_app
from tests.conftest import Users, client_for
from tests.images import noise_png
from tests.support import blob_lock, waiting_on_lock

ROOT = Path(__file__).resolve().parents[2]
DAY_AGO = time.time() - 86400


def age(*paths: Path) -> None:
    for path in paths:
        os.utime(path, (DAY_AGO, DAY_AGO), follow_symlinks=False)


def orphan(storage: Path, text: str) -> str:
    """A day-old blob no image references, as a failed upload leaves it; its SHA-256."""
    sha = hashlib.sha256(text.encode()).hexdigest()
    (storage / sha[:2]).mkdir(parents=True, exist_ok=True)
    (storage / sha[:2] / sha).write_bytes(text.encode())
    age(storage / sha[:2] / sha)
    return sha


def sweep_blobs(settings: Settings, storage: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m api.cli sweep-blobs *args`` over ``storage``, as an operator runs it."""
    env = {
        "DATABASE_URL": settings.database_url,
        "STORAGE_DIR": str(storage),
        "PYTHONPATH": str(ROOT),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }
    command = [sys.executable, "-m", "api.cli", "sweep-blobs", *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


async def sweep(settings: Settings, storage: Path, seconds: float) -> images_service.Sweep:
    engine = make_engine(settings)
    try:
        async with make_sessionmaker(engine)() as session:
            return await images_service.sweep_orphaned_blobs(
                session=session, store=LocalBlobStore(storage), older_than_seconds=seconds
            )
    finally:
        await engine.dispose()


async def test_only_the_stores_own_files_are_swept(settings: Settings, tmp_path: Path) -> None:
    """Beside a real orphan: a subfolder named like a blob, a symlink loop, a dangling symlink, a
    folder named like an unfinished write, a file named with non-UTF-8 bytes, a blob-named file
    in the wrong shard folder, a non-hex name and a folder that is no shard. The orphan goes,
    everything else stays untouched and uncounted, and the sweep does not stop on any of them."""
    storage = tmp_path / "storage"
    real = orphan(storage, "real orphan")
    shard = storage / real[:2]
    odd: list[Path] = [shard / (real[:2] + "b" * 62), shard / ".upload-dir", storage / "exports"]
    for folder in odd:
        folder.mkdir()
    (shard / "loop").symlink_to(shard / "loop")
    (shard / "dangling").symlink_to(shard / "does-not-exist")
    misplaced = storage / "ab" / ("cd" + "0" * 62)
    misplaced.parent.mkdir()
    misplaced.write_bytes(b"x")
    not_hex = shard / (real[:2] + "Z" * 62)
    not_hex.write_bytes(b"x")
    export = storage / "exports" / "0b1e4f3c.1.zip"
    export.write_bytes(b"zip")
    undecodable = shard / os.fsdecode(b"\xff" * 64)
    undecodable.write_bytes(b"x")
    age(*odd, misplaced, not_hex, export, undecodable)
    found = await sweep(settings, storage, 3600)
    assert found == images_service.Sweep(orphaned=1, unfinished=0)
    assert not (shard / real).exists()
    assert all(p.exists() for p in (*odd, misplaced, not_hex, export, undecodable))
    assert (shard / "loop").is_symlink() and (shard / "dangling").is_symlink()


@pytest.mark.parametrize("value", ["nan", "-1", "-inf", "abc"])
def test_the_age_must_be_a_number_of_hours_from_zero(settings: Settings, tmp_path: Path, value: str) -> None:
    """NaN compares as neither older nor newer: it would have made every file "old"."""
    storage = tmp_path / "storage"
    kept = orphan(storage, "kept")
    done = sweep_blobs(settings, storage, f"--older-than-hours={value}")
    assert done.returncode == 2, done.stderr
    assert (storage / kept[:2] / kept).exists()


async def test_a_sweep_of_any_age_leaves_an_upload_being_written(
    settings: Settings, users: Users, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload stopped between writing its blob's temporary file and renaming it, a sweep with
    age 0 meanwhile: the temporary file is not an unfinished write yet (nothing locks it, so only
    an hour's age makes it one) and the upload succeeds."""
    storage = tmp_path / "storage"
    app = create_app(settings.model_copy(update={"storage_dir": storage}))
    _, headers = await users.create()
    reached, resume = threading.Event(), threading.Event()
    replace = os.replace

    def paused_replace(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(storage_module.UNFINISHED_PREFIX) and not reached.is_set():
            reached.set()
            resume.wait(10)
        replace(src, dst)

    monkeypatch.setattr(storage_module.os, "replace", paused_replace)
    async for c in client_for(app):
        upload = asyncio.create_task(c.post("/v1/images", files={"file": ("x.png", noise_png(5, 16))}, headers=headers))
        assert await asyncio.to_thread(reached.wait, 10)
        try:
            found = await sweep(settings, storage, 0)
        finally:
            resume.set()
        r = await upload
        assert found.unfinished == 0 and r.status_code == 201, (found, r.text)
        assert (await c.get(f"/v1/images/{r.json()['id']}/file", headers=headers)).status_code == 200


async def test_an_old_orphan_an_upload_is_committing_stays(settings: Settings, users: Users, tmp_path: Path) -> None:
    """A day-old orphan blob of content X; an upload of X holds X's blob lock, its row not
    committed, while the sweep runs: the sweep waits for the lock, sees the row and keeps X."""
    storage = tmp_path / "storage"
    app = create_app(settings.model_copy(update={"storage_dir": storage}))
    _, headers = await users.create()
    async for c in client_for(app):
        data = noise_png(6, 16)
        sha = hashlib.sha256(data).hexdigest()
        (storage / sha[:2]).mkdir(parents=True, exist_ok=True)
        (storage / sha[:2] / sha).write_bytes(data)
        age(storage / sha[:2] / sha)
        conn, tx = await blob_lock(settings, sha)
        try:
            upload = asyncio.create_task(c.post("/v1/images", files={"file": ("x.png", data)}, headers=headers))
            await waiting_on_lock(settings, 1)
            sweeping = asyncio.create_task(sweep(settings, storage, 3600))
            await waiting_on_lock(settings, 2)
        finally:
            await tx.commit()
            await conn.close()
        r = await upload
        assert r.status_code == 201, r.text
        assert (await sweeping).orphaned == 0
        assert (await c.get(f"/v1/images/{r.json()['id']}/file", headers=headers)).status_code == 200


async def test_two_sweeps_at_once_count_an_orphan_once(settings: Settings, tmp_path: Path) -> None:
    """Both sweeps find the orphan and wait for its lock (held outside); the one that deletes it
    counts it, the other finds it gone."""
    storage = tmp_path / "storage"
    sha = orphan(storage, "swept twice")
    conn, tx = await blob_lock(settings, sha)
    try:
        sweeps = [asyncio.create_task(sweep(settings, storage, 3600)) for _ in range(2)]
        await waiting_on_lock(settings, 2)
    finally:
        await tx.commit()
        await conn.close()
    found = await asyncio.wait_for(asyncio.gather(*sweeps), 30)
    assert sorted(s.orphaned for s in found) == [0, 1]
    assert not (storage / sha[:2] / sha).exists()


async def test_sweep_blobs_deletes_only_old_blobs_no_image_references(
    client: httpx.AsyncClient, users: Users, settings: Settings
) -> None:
    """``api.cli sweep-blobs``: a blob, a lone preview and an unfinished write left by uploads that
    failed a day ago go; an uploaded image's blob of the same age stays, as does a blob written a
    moment ago (an upload may be committing it); ``--dry-run`` only counts."""
    _, headers = await users.create()
    kept = (await client.post("/v1/images", files={"file": ("k.png", noise_png(61, 16))}, headers=headers)).json()[
        "sha256"
    ]
    store = LocalBlobStore(settings.storage_dir)
    lost, preview_only, fresh = (hashlib.sha256(f"lost {n}".encode()).hexdigest() for n in range(3))
    await store.put(lost, b"lost")
    (settings.storage_dir / preview_only[:2]).mkdir(parents=True, exist_ok=True)
    lone_preview = settings.storage_dir / preview_only[:2] / f"{preview_only}.preview.jpg"
    lone_preview.write_bytes(b"preview")
    unfinished = settings.storage_dir / lost[:2] / ".upload-x1y2"
    unfinished.write_bytes(b"half")
    await store.put(fresh, b"fresh")
    day_ago = time.time() - 86400
    for path in (
        settings.storage_dir / lost[:2] / lost,
        lone_preview,
        unfinished,
        settings.storage_dir / kept[:2] / kept,
    ):
        os.utime(path, (day_ago, day_ago))
    counted = await asyncio.to_thread(sweep_blobs, settings, settings.storage_dir, "--older-than-hours=1", "--dry-run")
    assert counted.returncode == 0, counted.stderr
    assert "would delete 2 blobs no image references and 1 unfinished writes" in counted.stdout
    assert await store.exists(lost) and lone_preview.exists() and unfinished.exists()
    done = await asyncio.to_thread(sweep_blobs, settings, settings.storage_dir, "--older-than-hours=1")
    assert done.returncode == 0, done.stderr
    assert "deleted 2 blobs no image references and 1 unfinished writes" in done.stdout
    assert not await store.exists(lost) and not lone_preview.exists() and not unfinished.exists()
    assert await store.exists(kept) and await store.exists(fresh)
    r = await client.get("/v1/images?limit=1", headers=headers)
    [image] = r.json()["data"]
    assert (await client.get(f"/v1/images/{image['id']}/file", headers=headers)).status_code == 200
    refused = await asyncio.to_thread(sweep_blobs, settings, settings.storage_dir, "--older-than-hours=-1")
    assert refused.returncode == 2 and "must be 0 or more" in refused.stderr
