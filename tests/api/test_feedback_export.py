"""Exporting users' verdicts as labelled images to retrain from (``api.cli export-feedback``)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image, ImageDraw

from api.app.core.config import Settings
from api.app.exports.service import DOWNLOADS_DIR
from api.app.feedback.export import MANIFEST, export_archive, export_feedback, folder_name
from api.app.images.storage import LocalBlobStore
from model.training.train_sketch import load_feedback
from tests.conftest import Users
from tests.images import encode
from tests.support import ROOT, free_port

pytestmark = pytest.mark.usefixtures("worker")


def drawing() -> bytes:
    """Dark strokes on white, as the sketch canvas sends them; new each call."""
    img = Image.new("RGB", (280, 280), "white")
    rng = np.random.default_rng()
    points = [tuple(int(v) for v in rng.integers(20, 260, 2)) for _ in range(6)]
    ImageDraw.Draw(img).line(points, fill="black", width=12)
    return encode(img, "PNG")


async def classify(client: httpx.AsyncClient, headers: dict[str, str], data: bytes, models: str) -> dict[str, Any]:
    r = await client.post("/model/predict", params={"models": models}, files={"file": ("d.png", data)}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def verdict(client: httpx.AsyncClient, headers: dict[str, str], **body: object) -> None:
    r = await client.post("/v1/feedback", json=body, headers=headers)
    assert r.status_code == 201, r.text


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def manifest(out: Path) -> list[dict[str, str]]:
    with (out / MANIFEST).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


async def test_export_writes_the_latest_label_of_each_image_and_model(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, users: Users, tmp_path: Path
) -> None:
    _, headers = await users.create()
    labelled, unlabelled = drawing(), drawing()
    first = await classify(client, headers, labelled, "sketch@1,mobilenet_v2@1")
    sketch, mobilenet = first["results"]["sketch@1"], first["results"]["mobilenet_v2@1"]
    # Two labels the model did not answer: "wrong" with the predicted label itself is refused.
    earlier, latest = [label for label in ("cat", "fish", "apple") if label != sketch["label"]][:2]
    await verdict(client, headers, prediction_id=sketch["id"], is_correct=False, correct_label=earlier)
    # The same image classified again: a later verdict on the new prediction supersedes the first.
    again = (await classify(client, headers, labelled, "sketch@1"))["results"]["sketch@1"]
    await verdict(
        client, headers, prediction_id=again["id"], is_correct=False, correct_label=latest, comment="=the ears, see"
    )
    await verdict(client, headers, prediction_id=mobilenet["id"], is_correct=True)
    second = await classify(client, headers, unlabelled, "sketch@1")
    await verdict(client, headers, prediction_id=second["results"]["sketch@1"]["id"], is_correct=False)
    third = await classify(client, headers, drawing(), "sketch@1")
    await verdict(client, headers, prediction_id=third["results"]["sketch@1"]["id"], is_correct=True)
    sha_labelled, sha_unlabelled, sha_lost = (r["image_file_name"].split(".")[0] for r in (first, second, third))
    (settings.storage_dir / sha_lost[:2] / sha_lost).unlink()

    out = tmp_path / "all"
    async with app.state.sessionmaker() as session:
        summary = await export_feedback(session=session, store=app.state.store, out=out)
    rows = {(r["sha256"], r["model"]): r for r in manifest(out)}
    assert summary.examples == len(rows) and summary.superseded >= 1 and summary.unlabelled >= 1
    assert summary.missing >= 1 and summary.by_model["sketch"] == sum(
        1 for r in rows.values() if r["model"] == "sketch"
    )
    assert not any(sha in (sha_unlabelled, sha_lost) for sha, _model in rows)

    mine = rows[(sha_labelled, "sketch")]
    assert mine["path"] == f"sketch/{latest}/{sha_labelled}.png"
    assert (mine["label"], mine["predicted"], mine["is_correct"], mine["version"]) == (
        latest,
        sketch["label"],
        "false",
        "1",
    )
    # What the user wrote goes with the label, as text a spreadsheet never runs (CSV injection).
    assert mine["comment"] == "'=the ears, see"
    assert (out / mine["path"]).read_bytes() == labelled
    assert not (out / "sketch" / earlier / f"{sha_labelled}.png").exists()
    confirmed = rows[(sha_labelled, "mobilenet_v2")]
    assert confirmed["path"] == f"mobilenet_v2/{folder_name(mobilenet['label'])}/{sha_labelled}.png"
    assert (confirmed["label"], confirmed["is_correct"], confirmed["comment"]) == (mobilenet["label"], "true", "")

    # The sketch trainer reads the export as it is written.
    categories = ["cat", "fish", "apple"]
    x, y, _skipped = load_feedback(out / "sketch", categories)
    assert len(x) == sum(1 for r in rows.values() if r["model"] == "sketch" and r["label"] in categories)
    assert categories.index(latest) in y.tolist()

    only_sketch = tmp_path / "sketch-only"
    async with app.state.sessionmaker() as session:
        await export_feedback(session=session, store=app.state.store, out=only_sketch, model="sketch", version=1)
        with pytest.raises(FileExistsError):
            await export_feedback(session=session, store=app.state.store, out=only_sketch)
    sketch_rows = manifest(only_sketch)
    assert {r["model"] for r in sketch_rows} == {"sketch"} and any(r["sha256"] == sha_labelled for r in sketch_rows)


async def test_admins_download_the_export_as_a_zip(
    client: httpx.AsyncClient,
    app: FastAPI,
    admin_headers: dict[str, str],
    users: Users,
    tmp_path: Path,
    settings: Settings,
) -> None:
    _, headers = await users.create()
    data = drawing()
    answer = await classify(client, headers, data, "sketch@1")
    # The drawing is random: "wrong" needs a label other than the answer.
    right = next(label for label in ("eye", "fish") if label != answer["results"]["sketch@1"]["label"])
    await verdict(
        client, headers, prediction_id=answer["results"]["sketch@1"]["id"], is_correct=False, correct_label=right
    )
    sha = answer["image_file_name"].split(".")[0]
    downloads = settings.storage_dir / DOWNLOADS_DIR
    before = files_under(downloads) if downloads.exists() else []

    r = await client.get("/v1/admin/feedback-export", params={"model": "sketch"}, headers=admin_headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert 'filename="feedback-sketch.zip"' in r.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
        names = archive.namelist()
        assert archive.read(f"sketch/{right}/{sha}.png") == data
        rows = list(csv.DictReader(io.StringIO(archive.read(MANIFEST).decode())))
    assert int(r.headers["x-exported-images"]) == len(rows) == len(names) - 1
    assert {row["model"] for row in rows} == {"sketch"}
    assert files_under(downloads) == before, "the archive is gone once sent"

    # The archive never has a name, even while it is written and sent: a process killed then
    # (an API restarted mid-download) leaves nothing on the disk for anyone to sweep.
    async with app.state.sessionmaker() as session:
        unnamed, summary = await export_archive(
            session=session, store=app.state.store, directory=tmp_path, model="sketch"
        )
    with unnamed:
        assert files_under(tmp_path) == []
        assert os.fstat(unnamed.fileno()).st_nlink == 0
        with zipfile.ZipFile(unnamed) as written:
            assert written.read(f"sketch/{right}/{sha}.png") == data and summary.examples == len(rows)

    # A store that fails half-way leaves no archive behind either.
    class BrokenStore(LocalBlobStore):
        def open(self, sha256: str) -> BinaryIO:
            raise OSError("disk gone")

    async with app.state.sessionmaker() as session:
        with pytest.raises(OSError, match="disk gone"):
            await export_archive(session=session, store=BrokenStore(tmp_path), directory=tmp_path, model="sketch")
    assert files_under(tmp_path) == []

    assert (await client.get("/v1/admin/feedback-export", headers=headers)).status_code == 403
    lonely = await client.get("/v1/admin/feedback-export", params={"version": 1}, headers=admin_headers)
    assert lonely.status_code == 422 and lonely.json()["detail"] == "version needs model"
    # A model or version the registry does not know is a typo, answered as the queued export is.
    unknown: list[tuple[dict[str, str | int], str]] = [
        ({"model": "nosuch"}, "No model named 'nosuch'."),
        ({"model": "sketch", "version": 99}, "sketch has no version 99."),
    ]
    for params, detail in unknown:
        r = await client.get("/v1/admin/feedback-export", params=params, headers=admin_headers)
        assert r.status_code == 404 and r.json()["detail"] == detail, r.text
        r = await client.post("/v1/admin/exports", json=params, headers=admin_headers)
        assert r.status_code == 404 and r.json()["detail"] == detail, r.text


def test_folder_names_stay_inside_their_folder() -> None:
    assert folder_name("tabby") == "tabby"
    assert folder_name("Athene cunicularia (Burrowing Owl)") == "Athene cunicularia (Burrowing Owl)"
    assert folder_name("a/b") == "a_b"
    assert folder_name("..") == "_.." and folder_name(".hidden") == "_.hidden" and folder_name("") == "_"


def test_cli_exports_into_a_new_folder_only(settings: Settings, tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": settings.database_url,
        "STORAGE_DIR": str(settings.storage_dir),
        "PYTHONPATH": str(ROOT),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }
    cmd = [sys.executable, "-m", "api.cli", "export-feedback", str(tmp_path / "out"), "--model", "sketch"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("exported ") and (tmp_path / "out" / MANIFEST).is_file()
    again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "not empty" in again.stderr
    lonely = subprocess.run([*cmd[:5], "--version", "1"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert lonely.returncode == 2 and "--version needs --model" in lonely.stderr


def test_cli_refuses_what_it_cannot_export_in_one_line(settings: Settings, tmp_path: Path) -> None:
    """A model or version the registry does not know is refused as the route refuses it (a typo
    would otherwise be an empty training set); an OUT that cannot be written, or PostgreSQL down,
    is one line and exit 1. None of them leaves a folder behind."""
    env = {
        "DATABASE_URL": settings.database_url,
        "STORAGE_DIR": str(settings.storage_dir),
        "PYTHONPATH": str(ROOT),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }

    def export(out: Path, *args: str, **more_env: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "api.cli", "export-feedback", str(out), *args]
        return subprocess.run(cmd, env={**env, **more_env}, cwd=ROOT, capture_output=True, text=True, timeout=60)

    out = tmp_path / "new" / "out"
    refused = [
        (["--model", "nope"], 1, "error: No model named 'nope'."),
        (["--model", "sketch", "--version", "9"], 1, "error: sketch has no version 9."),
        (["--model", "mobilenet_v2", "--version", "0"], 2, "--version must be 1 or more"),
        (["--model", "mobilenet_v2", "--version", "-1"], 2, "--version must be 1 or more"),
    ]
    for args, code, said in refused:
        done = export(out, *args)
        assert done.returncode == code and said in done.stderr.strip().splitlines()[-1], (args, done.stderr)
        assert done.stdout == "" and "Traceback" not in done.stderr, (args, done.stderr)
    assert list(tmp_path.iterdir()) == []

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    down = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/portal"
    failing = [
        (export(a_file), "is not a folder"),
        (export(Path("/proc/no-such-process/out")), "/proc/no-such-process"),
        (export(out, "--model", "sketch", DATABASE_URL=down), "the database cannot be used"),
    ]
    for done, said in failing:
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and said in done.stderr, done.stderr
    assert a_file.read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [a_file]


async def test_cli_export_that_fails_half_way_leaves_no_folder(
    client: httpx.AsyncClient, settings: Settings, users: Users, tmp_path: Path
) -> None:
    """An export that fails once it has begun writing (here a blob the store cannot read) takes
    the folders it made with it, and says so in one line."""
    _, headers = await users.create()
    data = drawing()
    answer = await classify(client, headers, data, "sketch@1")
    await verdict(client, headers, prediction_id=answer["results"]["sketch@1"]["id"], is_correct=True)
    storage = tmp_path / "storage"
    await asyncio.to_thread(shutil.copytree, settings.storage_dir, storage)
    sha = answer["image_file_name"].split(".")[0]
    (storage / sha[:2] / sha).unlink()
    (storage / sha[:2] / sha).mkdir()  # opening it fails, as a failing disk would
    env = {
        "DATABASE_URL": settings.database_url,
        "STORAGE_DIR": str(storage),
        "PYTHONPATH": str(ROOT),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }
    cmd = [sys.executable, "-m", "api.cli", "export-feedback", str(tmp_path / "new" / "out"), "--model", "sketch"]
    done = await asyncio.to_thread(subprocess.run, cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and f"Is a directory: {storage}" in done.stderr, done.stderr
    assert not (tmp_path / "new").exists()


def _full_tmpfs_over(folder: Path) -> str | None:
    """Mounts a tmpfs of 64 KiB over ``folder`` and fills it; why it could not, or None."""
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        return mounted.stderr.decode().strip()
    with contextlib.suppress(OSError), (folder / "filler").open("wb") as filler:
        while True:
            filler.write(b"\0" * 4096)
            filler.flush()
    return None


async def test_a_download_meeting_a_full_storage_volume_is_503_not_500(
    client: httpx.AsyncClient, admin_headers: dict[str, str], settings: Settings
) -> None:
    """The downloads folder on a full volume: the operator's to mend, said as such with
    Retry-After, where it was a 500 and a traceback."""
    downloads = settings.storage_dir / DOWNLOADS_DIR
    downloads.mkdir(parents=True, exist_ok=True)
    if why := await asyncio.to_thread(_full_tmpfs_over, downloads):
        pytest.skip(f"cannot mount a tmpfs here: {why}")
    try:
        r = await client.get("/v1/admin/feedback-export", headers=admin_headers)
        assert r.status_code == 503, r.text
        assert r.json()["detail"] == "The portal's storage is full or read-only; retry later."
        assert r.headers["retry-after"]
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", str(downloads)], check=True)
