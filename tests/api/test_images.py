"""Uploads through the API: statuses, dedup by content, ownership, files and previews."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import threading
import time
from typing import Any, cast

import httpx
import pytest
from anyio import to_thread
from PIL import Image

from api.app.core.config import Settings
from api.app.images import service as images_service
from api.app.main import create_app
from bench.jpeg_scans import scan_bomb
from contracts.imaging import MAX_JPEG_SCANS
from tests.conftest import Users, client_for
from tests.images import animated_gif, encode, noise_png, png_bomb, split_colour
from tests.support import PHOTOS


async def upload(
    client: httpx.AsyncClient, headers: dict[str, str], data: bytes, name: str = "x.png"
) -> httpx.Response:
    return await client.post("/v1/images", files={"file": (name, data)}, headers=headers)


async def test_upload_returns_record_and_dedups_blobs(
    client: httpx.AsyncClient, users: Users, settings: Settings
) -> None:
    # Content no other test uploads: the blob's lifetime depends only on this test's rows.
    data = encode(Image.frombytes("RGB", (48, 32), os.urandom(48 * 32 * 3)), "JPEG")
    sha = hashlib.sha256(data).hexdigest()
    _, alice = await users.create()
    _, bob = await users.create()
    first = await upload(client, alice, data, "parrot.jpg")
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["sha256"] == sha and body["format"] == "JPEG" and body["bytes"] == len(data)
    assert body["width"] > 0 and body["height"] > 0 and body["created_at"]
    assert body["file_name"] == f"{sha}.jpeg"
    second = await upload(client, bob, data, "renamed.png")
    assert second.status_code == 201 and second.json()["id"] != body["id"]
    blobs = [p for p in settings.storage_dir.rglob("*") if p.is_file() and p.name == sha]
    assert len(blobs) == 1

    # Deleting one upload keeps the blob for the other; deleting the last removes it.
    assert (await client.delete(f"/v1/images/{body['id']}", headers=alice)).status_code == 204
    assert any(settings.storage_dir.rglob(sha))
    assert (await client.delete(f"/v1/images/{second.json()['id']}", headers=bob)).status_code == 204
    assert not any(settings.storage_dir.rglob(sha))


def damaged_png() -> bytes:
    """A photo as PNG with 16 bytes in the middle of its pixel data overwritten: Pillow opens it,
    and decoding it fails."""
    data = bytearray(encode(Image.open(PHOTOS / "parrot.jpg").convert("RGB"), "PNG"))
    data[len(data) // 2 : len(data) // 2 + 16] = b"\xff" * 16
    return bytes(data)


@pytest.mark.parametrize(
    ("name", "data", "status", "words"),
    [
        ("empty.jpg", b"", 415, "empty"),
        ("damaged.png", damaged_png(), 422, "truncated or corrupt"),
        ("doc.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", 415, "not an image"),
        ("notes.png", b"hello, this is text", 415, "not an image"),
        ("cut.jpg", encode(split_colour(256), "JPEG")[:-700], 422, "truncated"),
        ("bomb.png", png_bomb(), 413, "pixels"),
        ("scans.jpg", scan_bomb(), 422, "scans"),
    ],
)
async def test_upload_errors(
    client: httpx.AsyncClient, users: Users, name: str, data: bytes, status: int, words: str
) -> None:
    _, headers = await users.create()
    r = await upload(client, headers, data, name)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


@pytest.mark.parametrize("path", ["/v1/images", "/model/predict"])
async def test_a_single_upload_takes_one_named_file_part(client: httpx.AsyncClient, users: Users, path: str) -> None:
    """A second ``file`` part would be dropped without a word, and a part without a filename
    arrives as text: both 422, saying so, without the file's bytes in the answer."""
    _, headers = await users.create()
    png = encode(split_colour(), "PNG")
    two = [("file", ("a.png", png)), ("file", ("b.png", png))]
    r = await client.post(path, files=two, headers=headers)
    assert r.status_code == 422 and "2 'file' parts" in r.json()["detail"], r.text
    r = await client.post(path, files={"file": ("", png, "image/png")}, headers=headers)
    assert r.status_code == 422 and "filename" in r.json()["detail"][0]["msg"], r.text
    assert "PNG" not in r.text and len(r.content) < 400, r.text
    # Over 1 MB, where Starlette's limit on text parts answered 400 "Part exceeded maximum size".
    big = png + b"\x00" * 1_500_000
    r = await client.post(path, files={"file": ("", big, "image/png")}, headers=headers)
    assert r.status_code == 422 and "filename" in r.json()["detail"], r.text
    # A part's headers over the parser's limit were "Invalid multipart data." with no reason.
    r = await client.post(path, files={"file": ("a" * 5000 + ".png", png)}, headers=headers)
    assert r.status_code == 400 and "header size" in r.json()["detail"], r.text
    assert (await client.get("/v1/images", headers=headers)).json()["data"] == []


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/images", "ground_truth"),
        ("/v1/images", "models"),
        ("/model/predict", "model"),
        ("/v1/batches", "model"),
        ("/v1/batches", "image_id"),
    ],
)
async def test_a_form_field_the_upload_does_not_take_is_refused_not_dropped(
    client: httpx.AsyncClient, users: Users, path: str, field: str
) -> None:
    """``ground_truth`` sent with ``POST /v1/images`` (which keeps no label) was dropped while the
    answer said 201, and ``model`` (for ``models``) left the prediction, or a whole batch, to the
    default model: 422 naming the field, as a JSON body's unknown key is; nothing stored. A
    browser form's ``_charset_`` is no field of ours and passes."""
    _, headers = await users.create()
    one = {"file": ("a.png", encode(split_colour(), "PNG"))}
    r = await client.post(path, files=one, data={field: "macaw"}, headers=headers)
    assert r.status_code == 422 and repr(field) in r.json()["detail"], r.text
    assert (await client.get("/v1/images", headers=headers)).json()["data"] == []
    assert (await client.get("/v1/batches", headers=headers)).json()["count"] == 0
    for charset in ("_charset_", "_CHARSET_"):  # HTML matches the name case-insensitively
        r = await client.post("/v1/images", files=one, data={charset: "UTF-8"}, headers=headers)
        assert r.status_code == 201, r.text


async def test_a_one_call_prediction_reads_models_from_the_form_too(client: httpx.AsyncClient, users: Users) -> None:
    _, headers = await users.create()
    one = {"file": ("a.png", encode(split_colour(), "PNG"))}
    r = await client.post("/model/predict", files=one, data={"models": "nope@9"}, headers=headers)
    assert r.status_code == 422 and "nope@9" in r.text, r.text
    r = await client.post(
        "/model/predict", params={"models": "nope@9"}, files=one, data={"models": "nope@8"}, headers=headers
    )
    assert r.status_code == 422 and "not both" in r.text, r.text


async def test_too_large_upload(client: httpx.AsyncClient, users: Users, settings: Settings) -> None:
    _, headers = await users.create()
    r = await upload(client, headers, b"\xff\xd8" + b"0" * settings.max_upload_bytes)
    assert r.status_code == 413 and "at most" in r.json()["detail"]


async def test_list_detail_file_view(client: httpx.AsyncClient, users: Users) -> None:
    _, headers = await users.create()
    gif = animated_gif()
    created = (await upload(client, headers, gif, "anim.gif")).json()
    listing = (await client.get("/v1/images", params={"total": True}, headers=headers)).json()
    assert listing["count"] == 1 and listing["data"][0]["id"] == created["id"]
    detail = await client.get(f"/v1/images/{created['id']}", headers=headers)
    assert detail.status_code == 200 and detail.json()["jobs"] == []
    file = await client.get(f"/v1/images/{created['id']}/file", headers=headers)
    assert file.content == gif and file.headers["content-type"] == "image/gif"
    head = await client.head(f"/v1/images/{created['id']}/file", headers=headers)  # a 405 before
    assert (head.status_code, head.headers["content-type"], head.headers["content-length"]) == (
        200,
        "image/gif",
        str(len(gif)),
    )
    view = await client.get(f"/v1/images/{created['id']}/view", headers=headers)
    assert view.status_code == 200 and view.content.startswith(b"\x89PNG")


async def test_a_50_megapixel_png_is_viewed_from_its_preview(
    client: httpx.AsyncClient, users: Users, settings: Settings
) -> None:
    _, headers = await users.create()
    # 8000x6250 (the 50-megapixel limit) of one colour with a square: a few kilobytes as PNG.
    big = Image.new("RGB", (8000, 6250), (30, 90, 200))
    big.paste((250, 250, 0), (0, 0, 4000, 3125))
    data = encode(big, "PNG")
    created = (await upload(client, headers, data, "huge.png")).json()
    assert (created["width"], created["height"]) == (8000, 6250)
    [original] = [p for p in settings.storage_dir.rglob(created["sha256"])]
    preview = original.with_name(f"{original.name}.preview.jpg")
    assert max(Image.open(preview).size) == 800

    # Cut the original down to its header: a view that decoded it would fail; drawn from the
    # stored preview, the view and the thumbnail do not read its pixels at all.
    original.write_bytes(data[:100])
    view = await client.get(f"/v1/images/{created['id']}/view", headers=headers)
    assert view.status_code == 200, view.text
    drawn = Image.open(io.BytesIO(view.content)).convert("RGB")
    assert drawn.width == 800
    pixels = drawn.load()
    assert pixels is not None
    for (x, y), colour in {(10, 10): (250, 250, 0), (790, 600): (30, 90, 200)}.items():
        got = cast(tuple[int, int, int], pixels[x, y])
        assert max(abs(a - b) for a, b in zip(got, colour, strict=True)) <= 3
    listing = (await client.get("/v1/images", params={"thumbnails": "true"}, headers=headers)).json()
    assert listing["data"][0]["thumbnail"] is not None

    # Deleting the upload removes the preview with the blob.
    assert (await client.delete(f"/v1/images/{created['id']}", headers=headers)).status_code == 204
    assert not original.exists() and not preview.exists()


async def test_a_progressive_jpeg_of_many_scans_is_listed_and_viewed_from_its_preview(
    client: httpx.AsyncClient, users: Users, settings: Settings
) -> None:
    """Each scan of a progressive JPEG is read at any scale: a history page of twelve large ones of
    a hundred scans took over ten seconds, every time, in the decode slots other users' uploads
    wait for. Its preview is drawn once, at upload."""
    _, headers = await users.create()
    data = scan_bomb(side=2400, scans=MAX_JPEG_SCANS, mode="RGB")
    created = (await upload(client, headers, data, "scans.jpg")).json()
    [original] = [p for p in settings.storage_dir.rglob(created["sha256"])]
    preview = original.with_name(f"{original.name}.preview.jpg")
    assert max(Image.open(preview).size) == 800
    original.write_bytes(data[:100])  # a view or thumbnail that decoded the upload would fail
    view = await client.get(f"/v1/images/{created['id']}/view", headers=headers)
    assert view.status_code == 200 and Image.open(io.BytesIO(view.content)).width == 800, view.text
    listing = (await client.get("/v1/images", params={"thumbnails": "true"}, headers=headers)).json()
    assert listing["data"][0]["thumbnail"] is not None


async def test_listing_carries_thumbnails_when_asked(
    client: httpx.AsyncClient, users: Users, settings: Settings
) -> None:
    _, headers = await users.create()
    large = (await upload(client, headers, encode(split_colour(640), "PNG"), "large.png")).json()
    small = encode(Image.frombytes("RGBA", (40, 30), os.urandom(40 * 30 * 4)), "PNG")
    tiny = (await upload(client, headers, small, "tiny.png")).json()
    line = (await upload(client, headers, encode(Image.new("RGB", (20000, 1), "red"), "PNG"), "line.png")).json()
    plain = (await client.get("/v1/images", headers=headers)).json()
    assert [i["thumbnail"] for i in plain["data"]] == [None, None, None]

    listing = (await client.get("/v1/images", params={"thumbnails": "true"}, headers=headers)).json()
    thumbnails = {i["id"]: Image.open(io.BytesIO(base64.b64decode(i["thumbnail"]))) for i in listing["data"]}
    assert thumbnails[large["id"]].format == "JPEG" and max(thumbnails[large["id"]].size) == 280
    assert thumbnails[tiny["id"]].size == (40, 30) and thumbnails[tiny["id"]].mode == "RGB"
    # A line of pixels is padded to 4:1, so that half its size is still at least a pixel high.
    assert thumbnails[line["id"]].size == (280, 70)

    # A blob lost from the store costs its own thumbnail, not the listing.
    for blob in settings.storage_dir.rglob(tiny["sha256"]):
        blob.unlink()
    listing = (await client.get("/v1/images", params={"thumbnails": "true"}, headers=headers)).json()
    missing = {i["id"]: i["thumbnail"] is None for i in listing["data"]}
    assert missing == {large["id"]: False, tiny["id"]: True, line["id"]: False}


async def test_other_users_images_are_404(client: httpx.AsyncClient, users: Users) -> None:
    _, owner = await users.create()
    _, intruder = await users.create()
    image = (await upload(client, owner, encode(split_colour(), "PNG"))).json()
    for method, suffix in (("GET", ""), ("GET", "/file"), ("GET", "/view"), ("DELETE", "")):
        r = await client.request(method, f"/v1/images/{image['id']}{suffix}", headers=intruder)
        assert r.status_code == 404, (method, suffix)
    assert (await client.get("/v1/images", params={"total": True}, headers=intruder)).json()["count"] == 0
    r = await client.post("/v1/predictions", json={"image_id": image["id"]}, headers=intruder)
    assert r.status_code == 404
    assert (await client.get(f"/v1/images/{image['id']}", headers=owner)).status_code == 200


async def test_an_image_whose_file_goes_while_it_is_read_is_404(
    client: httpx.AsyncClient, users: Users, settings: Settings
) -> None:
    """A delete of the image between a request's read of its row and of its file (simulated by
    removing the file, as the delete does): its file and its view answer 404, never 500."""
    _, headers = await users.create()
    data = encode(Image.frombytes("RGB", (40, 30), os.urandom(40 * 30 * 3)), "PNG")
    image = (await upload(client, headers, data)).json()
    for path in [p for p in settings.storage_dir.rglob(f"{image['sha256']}*") if p.is_file()]:
        path.unlink()
    for suffix in ("/file", "/view"):
        r = await client.get(f"/v1/images/{image['id']}{suffix}", headers=headers)
        assert r.status_code == 404 and "deleted meanwhile" in r.json()["detail"], (suffix, r.text)


_BURST = """
import asyncio, io
import numpy as np
from PIL import Image
from api.app.core.config import Settings
from api.app.images.service import inspect_upload

def rss_mib() -> int:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024

uploads = []
for i in range(8):
    pixels = np.zeros((5000, 5000, 3), dtype=np.uint8)
    pixels[::7, :, 1] = 255
    pixels[0, 0, 2] = i
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    uploads.append(buf.getvalue())
del pixels
settings = Settings(max_concurrent_decodes=2)
before = rss_mib()

async def burst() -> None:
    await asyncio.gather(*(inspect_upload(data, settings) for data in uploads))

asyncio.run(burst())
print(rss_mib() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_a_burst_of_large_uploads_leaves_the_process_no_larger(settings: Settings) -> None:
    """Eight 25-megapixel PNGs checked at once, two decoding at a time: afterwards the process
    holds at most a few dozen MiB more than before (each thread that decoded one kept what it
    freed: 0.8-1.3 GiB more, before decode memory was handed back)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url}
    done = subprocess.run(
        [sys.executable, "-c", _BURST],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    grown_mib = int(done.stdout.split()[-1])
    assert grown_mib < 60, f"the process grew by {grown_mib} MiB"


class SlowDecodes:
    """Every picture the API draws of a stored image (a view, a thumbnail) is decoded as it was,
    ``seconds`` more slowly, as a large progressive JPEG is (a 7071 x 7071 one of 1.5 MB takes
    1.1 s); counts the decodes running now, started, and the most that ran at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
        self.lock = threading.Lock()
        self.seconds = seconds
        self.running = self.started = self.most = 0
        real = images_service.load_image

        def slow(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.running += 1
                self.started += 1
                self.most = max(self.most, self.running)
            try:
                time.sleep(self.seconds)
                return real(*args, **kwargs)
            finally:
                with self.lock:
                    self.running -= 1

        monkeypatch.setattr(images_service, "load_image", slow)

    async def running_at_least(self, count: int) -> None:
        for _ in range(100):
            if self.running >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.running} decodes running, not {count}")


async def answered_while_decoding(
    settings: Settings, users: Users, monkeypatch: pytest.MonkeyPatch, path: str, other_path: str
) -> tuple[list[int], int, float]:
    """Six concurrent GETs of ``path`` (``{id}``: one image of a user's) on an API of two database
    connections, each decoding for 2 s; once two decode, another user's GET of ``other_path``.
    The six answers' statuses, the other's status and how long it took, in seconds."""
    (_, viewer), (_, other) = await users.create(), await users.create()
    small = settings.model_copy(update={"db_pool_size": 2, "db_max_overflow": 0, "max_concurrent_decodes": 6})
    async for c in client_for(create_app(small)):
        image = (await upload(c, viewer, noise_png())).json()
        slow = SlowDecodes(monkeypatch, seconds=2.0)
        busy = [asyncio.create_task(c.get(path.format(id=image["id"]), headers=viewer)) for _ in range(6)]
        await slow.running_at_least(2)
        start = time.perf_counter()
        r = await c.get(other_path, headers=other)
        took = time.perf_counter() - start
        return [b.status_code for b in await asyncio.gather(*busy)], r.status_code, took
    raise AssertionError("no client")


@pytest.mark.parametrize(
    ("path", "other_path"),
    [("/v1/images/{id}/view", "/v1/models"), ("/v1/images?limit=1&thumbnails=true", "/v1/images")],
    ids=["views", "thumbnails"],
)
async def test_images_being_decoded_hold_no_database_connection(
    settings: Settings, users: Users, monkeypatch: pytest.MonkeyPatch, path: str, other_path: str
) -> None:
    """A view, or a listing's thumbnails, is decoded after its connection went back to the pool:
    while more of them than the pool has connections are drawn from an image that is slow to
    decode, another user's request is answered at once (holding them, it waited seconds, and past
    5 s got 503)."""
    drawn, status, took = await answered_while_decoding(settings, users, monkeypatch, path, other_path)
    assert drawn == [200] * 6
    assert status == 200 and took < 1.0, (status, took)


async def test_views_and_thumbnails_take_the_decode_slots_uploads_take(
    settings: Settings, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With MAX_CONCURRENT_DECODES 1, views and thumbnail listings requested at once are decoded
    one at a time, as uploads are: a burst of views takes one image's memory, not one per view."""
    _, headers = await users.create()
    async for c in client_for(create_app(settings.model_copy(update={"max_concurrent_decodes": 1}))):
        image = (await upload(c, headers, noise_png())).json()
        slow = SlowDecodes(monkeypatch, seconds=0.3)
        answers = await asyncio.gather(
            *(c.get(f"/v1/images/{image['id']}/view", headers=headers) for _ in range(3)),
            *(c.get("/v1/images?limit=1&thumbnails=true", headers=headers) for _ in range(2)),
        )
        assert [r.status_code for r in answers] == [200] * 5
        assert answers[3].json()["data"][0]["thumbnail"] is not None
        assert (slow.started, slow.most) == (5, 1)


async def test_requests_waiting_for_a_decode_slot_hold_no_thread(
    settings: Settings, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Views waiting for the one decode slot (MAX_CONCURRENT_DECODES 1) wait in the event loop:
    with 45 of them queued behind a slow decode, a few threads of the shared pool are busy, and
    another user's request for a stored file (a blob read, in that pool) is answered at once.
    Waiting in threads, they held all 40 and the file waited for several decodes."""
    (_, viewer), (_, other) = await users.create(), await users.create()
    async for c in client_for(create_app(settings.model_copy(update={"max_concurrent_decodes": 1}))):
        image = (await upload(c, viewer, noise_png())).json()
        theirs = (await upload(c, other, noise_png(seed=2))).json()
        slow = SlowDecodes(monkeypatch, seconds=0.5)
        views = [asyncio.create_task(c.get(f"/v1/images/{image['id']}/view", headers=viewer)) for _ in range(45)]
        await slow.running_at_least(1)
        await asyncio.sleep(0.2)
        busy_threads = to_thread.current_default_thread_limiter().borrowed_tokens
        start = time.perf_counter()
        r = await c.get(f"/v1/images/{theirs['id']}/file", headers=other)
        took = time.perf_counter() - start
        slow.seconds = 0.0
        assert [v.status_code for v in await asyncio.gather(*views)] == [200] * 45
        assert slow.most == 1
        assert busy_threads < 10, busy_threads
        assert r.status_code == 200 and took < 0.4, (r.status_code, took)
