"""Explanations of predictions: Grad-CAM heatmaps from a real explainer process, checked on real
pixels (a photo and a sketch), and every error a user can cause."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
from fastapi import HTTPException
from PIL import Image
from sqlalchemy import update

from api.app.core.config import Settings
from api.app.explanations import service
from api.app.explanations.service import refuse_failed
from api.app.images.service import VIEW_SIZE
from api.app.images.storage import LocalBlobStore
from api.app.predictions.models import Prediction
from contracts import keys, workers
from contracts.imaging import inspect_image
from contracts.messages import ExplainerHeartbeat, Explanation, ExplanationStatus
from tests.api.conftest import Stack, stored_job
from tests.api.test_releases import canvas_drawings
from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, PASSWORD, login
from tests.support import PHOTOS, QUICKDRAW, ROOT, RedisServer, start_explainer

PARROT_BOX = (95, 100, 470, 900)
"""(left, top, right, bottom) of the macaw in parrot.jpg (512x929), head to tail, measured by eye:
head at x 300-465, y 100-260; wings to x 95 at y 740; tail to y 895; the branch it sits on (x
290-512, y 500-929) is mostly outside."""
SKETCHES = {"cat": 3, "fish": 3, "apple": 3, "house": 3}
"""Held-out drawings per category (the end of each QuickDraw file), as the canvas sends them."""


def on_image(heatmap: list[list[float]], width: int, height: int) -> np.ndarray:
    grid = np.asarray(heatmap, dtype=np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BILINEAR))


def dilated(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel in the 8 directions (a 3x3 binary dilation)."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)


async def predict(stack: Stack, headers: dict[str, str], data: bytes, ref: str) -> str:
    r = await stack.client.post(
        "/model/predict", params={"models": ref}, files={"file": ("i.png", data)}, headers=headers
    )
    assert r.status_code == 200, r.text
    return str(r.json()["results"][ref]["id"])


async def test_heatmaps_point_at_the_bird_and_at_the_strokes(own_stack: Stack) -> None:
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    r = await client.post("/v1/users", json={"email": "other@example.com", "password": PASSWORD}, headers=admin)
    assert r.status_code == 201, r.text
    other = await login(client, "other@example.com", PASSWORD)
    await own_stack.start_workers(1, SERVE_MODELS="mobilenet_v2@1,sketch@2,sketch@3,birds@1")
    parrot = (PHOTOS / "parrot.jpg").read_bytes()
    photo_id = await predict(own_stack, admin, parrot, "mobilenet_v2@1")
    url = f"/v1/predictions/{photo_id}/explanation"

    # No explainer yet: a clear 503 with Retry-After, at once.
    r = await client.get(url, headers=admin)
    assert r.status_code == 503 and "Retry-After" in r.headers, r.text
    # Not mine, or no such prediction: 404; a version without a Keras graph: 422.
    assert (await client.get(url, headers=other)).status_code == 404
    assert (await client.get(f"/v1/predictions/{uuid.uuid4()}/explanation", headers=admin)).status_code == 404
    bird_id = await predict(own_stack, admin, parrot, "birds@1")
    r = await client.get(f"/v1/predictions/{bird_id}/explanation", headers=admin)
    assert r.status_code == 422 and "not explainable" in r.json()["detail"], r.text
    # A version retired since its answer: explainers let its graph go, so a 422 that says so
    # rather than a 503 that asks to retry.
    retired_id = await predict(own_stack, admin, next(iter(canvas_drawings("cat", 1))), "sketch@2")
    r = await client.patch(
        "/v1/admin/registry/models/sketch/versions/2",
        json={"channel": "retired", "reason": "superseded"},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    r = await client.get(f"/v1/predictions/{retired_id}/explanation", headers=admin)
    assert r.status_code == 422 and "retired or disabled" in r.json()["detail"], r.text

    explainer = start_explainer(
        f"explainer-test-{uuid.uuid4().hex[:6]}",
        own_stack.redis_server.url,
        EXPLAIN_MODELS="mobilenet_v2@1,sketch@2,sketch@3",
    )
    own_stack.workers.append(explainer)

    r = await client.get(url, params={"size": 56}, headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["explained_with"] == "mobilenet_v2@1" and body["method"] == "grad-cam" and not body["cached"]
    heat = on_image(body["heatmap"], 512, 929)
    assert heat.min() >= 0 and heat.max() <= 1
    inside = np.zeros(heat.shape, dtype=bool)
    left, top, right, bottom = PARROT_BOX
    inside[top:bottom, left:right] = True
    assert heat[inside].mean() >= 2 * heat[~inside].mean(), (heat[inside].mean(), heat[~inside].mean())

    # Cached per (image, version); the small JSON summary and the PNG overlay come from it.
    r = await client.get(url, headers=admin)
    assert r.status_code == 200 and r.json()["cached"] and len(r.json()["heatmap"]) == 14, r.text
    r = await client.get(url, params={"format": "png"}, headers=admin)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (441, 800)

    # Sketches: the heat lies on the strokes (dilated by a pixel), not on the empty canvas.
    on_strokes: list[float] = []
    on_background: list[float] = []
    for category, count in SKETCHES.items():
        bitmaps = np.load(QUICKDRAW / f"{category}.npy", mmap_mode="r")[-count:]
        for data, bitmap in zip(canvas_drawings(category, count), bitmaps, strict=True):
            prediction_id = await predict(own_stack, admin, data, "sketch@3")
            r = await client.get(f"/v1/predictions/{prediction_id}/explanation", params={"size": 56}, headers=admin)
            assert r.status_code == 200, r.text
            heat = on_image(r.json()["heatmap"], 28, 28)
            strokes = dilated(np.asarray(bitmap).reshape(28, 28) > 10)
            on_strokes.append(float(heat[strokes].mean()))
            on_background.append(float(heat[~strokes].mean()))
    assert np.mean(on_strokes) >= 1.5 * np.mean(on_background), (on_strokes, on_background)
    # Drawing by drawing, the strokes are never colder than the canvas.
    assert all(s >= b for s, b in zip(on_strokes, on_background, strict=True)), (on_strokes, on_background)

    # Served again, sketch@2 is explained at once: the request waits while the explainer follows
    # the registry and builds its graph, rather than a 503 for those seconds.
    r = await client.patch(
        "/v1/admin/registry/models/sketch/versions/2", json={"channel": "canary", "reason": "back"}, headers=admin
    )
    assert r.status_code == 200, r.text
    r = await client.get(f"/v1/predictions/{retired_id}/explanation", headers=admin)
    assert r.status_code == 200 and r.json()["explained_with"] == "sketch@2", r.text


OVERLAY_PEAK = """
import asyncio, sys
from pathlib import Path
from api.app.core.config import Settings
from api.app.explanations import service
from api.app.images.storage import LocalBlobStore

def peak_mb():
    # VmHWM, the peak resident size of this process image (getrusage's ru_maxrss keeps its parent's).
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) // 1024

store, sha256 = LocalBlobStore(Path(sys.argv[1])), sys.argv[2]
settings = Settings(_env_file=None)
before = peak_mb()
png = asyncio.run(service.overlay_png(store=store, settings=settings, sha256=sha256, heatmap=[[0.5] * 7] * 7))
assert png.startswith(b"\\x89PNG"), png[:8]
print(peak_mb() - before)
"""


def test_the_overlay_of_a_large_png_is_drawn_from_its_preview(tmp_path: Path) -> None:
    """A 49-megapixel PNG (146 KB compressed, 147 MB decoded) stored with its preview: each overlay
    decodes the preview, not the whole image again (24 at once took the API to 8 GB)."""
    side = 7000
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(ramp, (side, side))).convert("RGB").save(buf, format="PNG")
    data = buf.getvalue()
    info = inspect_image(data, max_pixels=50_000_000, preview_size=VIEW_SIZE)
    assert info.preview is not None
    sha256 = hashlib.sha256(data).hexdigest()
    asyncio.run(LocalBlobStore(tmp_path).put(sha256, data, preview=info.preview))
    run = subprocess.run(
        [sys.executable, "-c", OVERLAY_PEAK, str(tmp_path), sha256],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0, run.stderr
    grown_mb = int(run.stdout.split()[-1])
    # From its preview: about 50 MB (the 800-pixel blend in float32); from the PNG: about 375 MB.
    assert grown_mb < 150, f"the overlay took the process {grown_mb} MB higher"


def test_a_failure_of_the_explainer_is_a_502_without_its_details() -> None:
    """The explainer's own fault is not the user's (no 422) and its internals stay in its log."""
    answer = Explanation(
        model="sketch",
        version=1,
        twin="sketch@1",
        sha256="0" * 64,
        label="cat",
        explainer_id="e",
        status=ExplanationStatus.error,
        error="the explainer failed",
    )
    with pytest.raises(HTTPException) as raised:
        refuse_failed(answer, key="sketch@1")
    assert raised.value.status_code == 502 and "failed" in str(raised.value.detail)
    unreadable = answer.model_copy(update={"status": ExplanationStatus.failed, "error": "cannot identify image"})
    with pytest.raises(HTTPException) as raised:
        refuse_failed(unreadable, key="sketch@1")
    assert raised.value.status_code == 422 and "cannot identify image" in str(raised.value.detail)
    refuse_failed(answer.model_copy(update={"status": ExplanationStatus.ok}), key="sketch@1")


async def test_a_cached_heatmap_of_a_version_retired_since_is_422_and_an_unanswered_prediction_says_so(
    own_stack: Stack,
) -> None:
    """The rule for a version retired or disabled since its answer (422 "not explainable any
    more") holds for a heatmap cached before as for one still to compute; a prediction a worker is
    computing (queued in PostgreSQL, running in Redis) is "not answered yet", not "queued"."""
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    owner_id = (await client.get("/v1/users/me", headers=admin)).json()["id"]
    image = await client.post("/v1/images", files={"file": ("c.png", canvas_drawings("cat", 1)[0])}, headers=admin)
    assert image.status_code == 201, image.text
    image_id, sha256 = image.json()["id"], image.json()["sha256"]
    redis = aioredis.Redis.from_url(own_stack.redis_server.url)

    _job, running = await stored_job(own_stack.app, owner_id=owner_id, image_id=image_id, status="queued")
    await redis.set(keys.job_running_key(str(running.id)), b"1", ex=60)
    r = await client.get(f"/v1/predictions/{running.id}/explanation", headers=admin)
    assert r.status_code == 409 and "not answered yet" in r.json()["detail"], r.text

    _job, done = await stored_job(own_stack.app, owner_id=owner_id, image_id=image_id, status="done")
    async with own_stack.app.state.sessionmaker() as session:
        await session.execute(
            update(Prediction).where(Prediction.id == done.id).values(model_name="sketch", model_version=2, label="cat")
        )
        await session.commit()
    cached = Explanation(
        model="sketch",
        version=2,
        twin="sketch@2",
        sha256=sha256,
        label="cat",
        explainer_id="e",
        status=ExplanationStatus.ok,
        heatmap=[[0.5] * 7] * 7,
    )
    await redis.set(keys.explanation_key(owner_id, sha256, "sketch", 2), cached.model_dump_json(), ex=600)
    url = f"/v1/predictions/{done.id}/explanation"
    r = await client.get(url, headers=admin)
    assert r.status_code == 200 and r.json()["cached"], r.text
    r = await client.patch(
        "/v1/admin/registry/models/sketch/versions/2",
        json={"channel": "retired", "reason": "superseded"},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    # An explainer that has not read the change yet still holds the graph: not asked.
    beat = ExplainerHeartbeat(explainer_id="e", pid=1, models=["sketch@2"])
    async with redis.pipeline(transaction=False) as pipe:
        workers.announce_explainer(
            pipe, explainer_id="e", heartbeat_json=beat.model_dump_json(), ttl_ms=60_000, now=time.time()
        )
        await pipe.execute()
    r = await client.get(url, headers=admin)
    assert r.status_code == 422 and "not explainable any more" in r.json()["detail"], r.text

    # An INT8 version disabled since: its FP32 twin still explains the stable version, not it.
    _job, int8 = await stored_job(own_stack.app, owner_id=owner_id, image_id=image_id, status="done")
    async with own_stack.app.state.sessionmaker() as session:
        await session.execute(
            update(Prediction)
            .where(Prediction.id == int8.id)
            .values(model_name="mobilenet_v2", model_version=2, label="tabby")
        )
        await session.commit()
    heatmap = cached.model_copy(
        update={"model": "mobilenet_v2", "version": 2, "twin": "mobilenet_v2@1", "label": "tabby"}
    )
    await redis.set(keys.explanation_key(owner_id, sha256, "mobilenet_v2", 2), heatmap.model_dump_json(), ex=600)
    url = f"/v1/predictions/{int8.id}/explanation"
    r = await client.get(url, headers=admin)
    assert r.status_code == 200 and r.json()["cached"], r.text
    r = await client.patch(
        "/v1/admin/registry/models/mobilenet_v2/versions/2", json={"enabled": False, "reason": "slow"}, headers=admin
    )
    assert r.status_code == 200, r.text
    r = await client.get(url, headers=admin)
    await redis.aclose()
    assert r.status_code == 422 and "not explainable any more" in r.json()["detail"], r.text


async def test_the_live_explainers_are_found_without_scanning_the_keyspace(private_redis: RedisServer) -> None:
    """A request that is not answered from the cache looks for the live explainers, and while one
    builds the twin it looks again every 0.1 s: with every cached answer in the keyspace beside
    them, that costs a few commands, not a SCAN per 100 keys (300,000 keys made each look take
    0.8 s). An explainer killed without withdrawing is gone once its heartbeat expires."""
    client = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        async with client.pipeline(transaction=False) as pipe:
            for i in range(50_000):
                pipe.set(keys.result_cache_key(1, f"{i:064x}", "sketch", 1), "{}", ex=3600)
            await pipe.execute()
        for explainer_id, twin, ttl_ms in (("explainer-a", "sketch@1", 60_000), ("explainer-killed", "sketch@2", 50)):
            beat = ExplainerHeartbeat(explainer_id=explainer_id, pid=1, models=[twin], loading=["sketch@3"], revision=4)
            async with client.pipeline(transaction=False) as pipe:
                workers.announce_explainer(
                    pipe,
                    explainer_id=explainer_id,
                    heartbeat_json=beat.model_dump_json(),
                    ttl_ms=ttl_ms,
                    now=time.time(),
                )
                await pipe.execute()
        await asyncio.sleep(0.2)
        assert not await client.exists(keys.explainer_key("explainer-killed"))
        await client.config_resetstat()
        found = await service.live_explainers(client)
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    assert found.held == {"sketch@1"} and found.loading == {"sketch@3"} and found.revisions == [4], found
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    calls = {name: n for name, n in calls.items() if not name.startswith("config")}
    assert "scan" not in calls and "keys" not in calls, calls
    assert sum(calls.values()) <= 3, calls  # the index read (two commands) and one MGET


@pytest.mark.parametrize("size", [(4000, 2), (20000, 2), (2, 4000)])
def test_the_overlay_of_a_sliver_is_drawn_on_a_band_of_at_most_4_to_1(tmp_path: Path, size: tuple[int, int]) -> None:
    """A picture far longer than wide is drawn at VIEW_SIZE on a plain band of 4:1, as the UI
    shows it, not as a strip one pixel thick; the heat of each place along it goes across the band,
    so hot and cold ends are told apart at a glance."""
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 90, 200)).save(buf, format="PNG")
    data = buf.getvalue()
    sha256 = hashlib.sha256(data).hexdigest()
    asyncio.run(LocalBlobStore(tmp_path).put(sha256, data))
    hot_start = [[1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0] for _ in range(7)]  # hot at the left (top) end
    tall = size[1] > size[0]
    heatmap = [list(column) for column in zip(*hot_start, strict=True)] if tall else hot_start
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    png = asyncio.run(
        service.overlay_png(store=LocalBlobStore(tmp_path), settings=settings, sha256=sha256, heatmap=heatmap)
    )
    shown = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int32)
    assert shown.shape[:2] == ((VIEW_SIZE, VIEW_SIZE // 4) if tall else (VIEW_SIZE // 4, VIEW_SIZE))
    # Along the band's edge (no picture there), the hot end is red and the cold end is not.
    edge = shown[:, 0] if tall else shown[0]
    hot, cold = edge[: VIEW_SIZE // 10], edge[-VIEW_SIZE // 10 :]
    assert (hot[:, 0] - hot[:, 2]).mean() > 100 > (cold[:, 0] - cold[:, 2]).mean(), (hot.mean(0), cold.mean(0))
