"""GET /metrics after real jobs: HTTP latency, the job pipeline, cache, queue depth, workers."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import psutil
import pytest
from fastapi import FastAPI
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from sqlalchemy import select, update

from api.app.core.config import Settings
from api.app.main import create_app
from api.app.predictions import background
from api.app.predictions.models import Job, Prediction
from contracts.messages import Timings
from tests.api.conftest import Stack, done_answer, until
from tests.api.test_catalog import _announce
from tests.api.test_predictions import noise_png
from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, Users, client_for, login
from tests.images import encode
from tests.support import ROOT, RedisServer, http_ok, start_api, wait_until


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = (await client.get("/metrics")).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_an_app_made_after_another_in_the_same_process_still_counts_its_requests(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """The suite (and any embedding) makes several apps in one process: each records HTTP metrics,
    not only the first one started."""
    assert (await client.get("/health/live")).status_code == 200  # the session's app has started
    async for later in client_for(create_app(settings)):
        before = await scrape(later)
        for _ in range(2):
            assert (await later.get("/health/live")).status_code == 200
        after = await scrape(later)
    counted = ("http_request_duration_seconds_count", (("handler", "/health/live"), ("method", "GET")))
    assert after.get(counted, 0.0) - before.get(counted, 0.0) >= 2


@pytest.mark.usefixtures("worker")
async def test_metrics_after_real_jobs(client: httpx.AsyncClient, users: Users) -> None:
    _, headers = await users.create()
    before = await scrape(client)
    data = noise_png()
    for _ in range(2):  # the second answer comes from the cache
        r = await client.post(
            "/model/predict", params={"models": "mobilenet_v2"}, files={"file": ("n.png", data)}, headers=headers
        )
        assert r.status_code == 200
    await asyncio.sleep(1.5)  # the gauges are refreshed by the reconciler every second here
    after = await scrape(client)
    model = {"model": "mobilenet_v2", "version": "1"}

    def grew(name: str, by: float = 1, **labels: str) -> bool:
        return value(after, name, **labels) - value(before, name, **labels) >= by

    assert grew("http_request_duration_seconds_count", 2, handler="/model/predict", method="POST")
    assert grew("portal_jobs_total", 1, **model, status="done")
    assert grew("portal_result_cache_total", 1, result="hit") and grew("portal_result_cache_total", 1, result="miss")
    for histogram in (
        "portal_queue_wait_seconds",
        "portal_preprocess_seconds",
        "portal_inference_seconds",
        "portal_end_to_end_seconds",
        "portal_batch_size",
    ):
        assert grew(f"{histogram}_count", 1, **model), histogram
    assert value(after, "portal_inference_seconds_sum", **model) > 0
    assert value(after, "portal_end_to_end_seconds_sum", **model) >= value(
        after, "portal_inference_seconds_sum", **model
    )
    assert ("portal_queue_depth", tuple(sorted(model.items()))) in after
    assert value(after, "portal_live_workers") >= 1


@pytest.mark.usefixtures("worker")
async def test_verdicts_are_counted_per_model_version(client: httpx.AsyncClient, users: Users) -> None:
    _, headers = await users.create()
    r = await client.post(
        "/model/predict", params={"models": "sketch@2"}, files={"file": ("n.png", noise_png())}, headers=headers
    )
    prediction = r.json()["results"]["sketch@2"]
    before = await scrape(client)
    for body in ({"is_correct": True}, {"is_correct": False, "correct_label": "eye"}, {"is_correct": False}):
        answer = await client.post("/v1/feedback", json={"prediction_id": prediction["id"], **body}, headers=headers)
        assert answer.status_code == 201, answer.text
    refused = await client.post(
        "/v1/feedback",
        json={"prediction_id": prediction["id"], "is_correct": False, "correct_label": "zebra"},
        headers=headers,
    )
    assert refused.status_code == 422
    after = await scrape(client)
    model = {"model": "sketch", "version": "2"}
    for verdict, count in (("correct", 1), ("wrong", 2)):
        grown = value(after, "portal_feedback_total", **model, verdict=verdict)
        assert grown - value(before, "portal_feedback_total", **model, verdict=verdict) == count, verdict


def runtime_of(app: FastAPI) -> background.JobRuntime:
    """What the app's background tasks run with, for calling one of them directly."""
    state = app.state
    return background.JobRuntime(
        settings=state.settings,
        sessionmaker=state.sessionmaker,
        engine=state.engine,
        redis=state.redis,
        redis_blocking=state.redis_blocking,
        store=state.store,
        outage_log=state.outage_log,
        live_registry=state.live_registry,
    )


def line_drawing(offset: int) -> bytes:
    """A 28x28 sketch of one line, a different one for each ``offset``."""
    img = Image.new("L", (28, 28), 255)
    ImageDraw.Draw(img).line((offset, 2, 27 - offset, 25), fill=0, width=2)
    return encode(img, "PNG")


async def sketch_jobs_alone_and_beside(
    client: httpx.AsyncClient, admin: dict[str, str], data: bytes
) -> tuple[str, httpx.Response, httpx.Response]:
    """Stores ``data`` and asks for it twice: sketch@2 alone, then sketch@2 beside sketch@3 (both
    accepted); the image's id and the two answers."""
    stored = await client.post("/v1/images", files={"file": ("d.png", data)}, headers=admin)
    assert stored.status_code == 201, stored.text
    image_id = stored.json()["id"]
    alone, beside = [
        await client.post("/v1/predictions", json={"image_id": image_id, "models": models}, headers=admin)
        for models in (["sketch@2"], ["sketch@2", "sketch@3"])
    ]
    assert alone.status_code == beside.status_code == 202, (alone.text, beside.text)
    return image_id, alone, beside


@pytest.mark.usefixtures("everything_served")
async def test_the_predictions_the_api_expires_are_counted_once(own_stack: Stack) -> None:
    """No worker is up. A job waits for sketch@2 alone, one for sketch@2 beside sketch@3, and a
    batch of two images for sketch@2 (not queued by the lane). Retiring sketch@2 expires its four
    predictions; the other job's deadline passing expires its sketch@3 one: each counts once in
    ``portal_jobs_total{status="expired"}``, and a worker's answer arriving after that counts for
    nothing."""
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    _, alone, beside = await sketch_jobs_alone_and_beside(client, admin, line_drawing(0))
    files = [("file", (f"d{i}.png", line_drawing(i + 1))) for i in range(2)]
    batch = await client.post("/v1/batches", files=files, data={"models": ["sketch@2"]}, headers=admin)
    assert batch.status_code == 202, batch.text

    async def job(accepted: httpx.Response) -> dict[str, Any]:
        r = await client.get(f"/v1/predictions/{accepted.json()['job_id']}", headers=admin)
        assert r.status_code == 200, r.text
        return cast(dict[str, Any], r.json())

    async def batch_over() -> bool:
        r = await client.get(f"/v1/batches/{batch.json()['id']}", headers=admin)
        return bool(r.json()["status"] == "done")

    def expired(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], version: str) -> float:
        return value(samples, "portal_jobs_total", model="sketch", version=version, status="expired")

    before = await scrape(client)
    r = await client.patch(
        "/v1/admin/registry/models/sketch/versions/2", json={"channel": "retired", "reason": "x"}, headers=admin
    )
    assert r.status_code == 200, r.text

    async def retired_expired() -> bool:
        return (await job(alone))["status"] == "expired" and await batch_over()

    await until(retired_expired, 20, "sketch@2's predictions expired")
    after_retiring = await scrape(client)
    assert expired(after_retiring, "2") - expired(before, "2") == 4
    assert expired(after_retiring, "3") == expired(before, "3")

    # The deadline of the other job passes: its sketch@3 prediction expires (the reconciler's sweep).
    async with own_stack.app.state.sessionmaker() as session:
        await session.execute(
            update(Job)
            .where(Job.id == uuid.UUID(beside.json()["job_id"]))
            .values(deadline_at=datetime.now(UTC) - timedelta(minutes=5))
        )
        await session.commit()

    async def deadline_expired() -> bool:
        return (await job(beside))["status"] == "expired"

    await until(deadline_expired, 20, "the other job expired at its deadline")
    after_deadline = await scrape(client)
    assert expired(after_deadline, "3") - expired(before, "3") == 1
    assert expired(after_deadline, "2") == expired(after_retiring, "2")

    # A worker's answer for an expired prediction, late: stored nowhere, counted nowhere.
    [prediction] = (await job(alone))["results"]
    late = done_answer(
        alone.json()["job_id"], prediction["id"], "eye", model="sketch", version=2, timings=Timings(), worker_id="w"
    )
    assert await background.handle_result(runtime_of(own_stack.app), late) is None
    async with own_stack.app.state.read_sessionmaker() as session:
        status = await session.scalar(select(Prediction.status).where(Prediction.id == uuid.UUID(prediction["id"])))
    assert status == "expired"
    after_late = await scrape(client)
    for outcome in ("expired", "done"):
        assert value(after_late, "portal_jobs_total", model="sketch", version="2", status=outcome) == value(
            after_deadline, "portal_jobs_total", model="sketch", version="2", status=outcome
        ), outcome


def test_metrics_add_up_across_api_processes(settings: Settings) -> None:
    api, url = start_api("metrics-api", settings, API_WORKERS="2")

    def live_count() -> float:
        text = httpx.get(f"{url}/metrics").text
        samples = {
            (s.name, s.labels.get("handler")): s.value for f in text_string_to_metric_families(text) for s in f.samples
        }
        return samples[("http_request_duration_seconds_count", "/health/live")]

    try:
        before = live_count()
        for _ in range(30):  # each on a new connection, so both processes serve some
            assert http_ok(f"{url}/health/live")
        # Whichever process answers the scrape, it reports the sum over both.
        assert {live_count() for _ in range(6)} == {before + 30}
        pids = {p.pid for p in psutil.Process(api.proc.pid).children(recursive=True)}
        assert len(pids) >= 2
    finally:
        api.stop()


def _set_live_workers(directory: Path, count: int) -> int:
    """Sets portal_live_workers in a new process writing to ``directory``, which then dies without
    cleaning up (as a killed API process does); its pid."""
    code = f"import os; from api.app.core import metrics; metrics.LIVE_WORKERS.set({count}); print(os.getpid())"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return int(done.stdout)


def _collect(directory: Path) -> dict[str, float]:
    code = (
        "from prometheus_client import CollectorRegistry, generate_latest;"
        "from prometheus_client.multiprocess import MultiProcessCollector;"
        "r = CollectorRegistry(); MultiProcessCollector(r); print(generate_latest(r).decode())"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    text = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_a_dead_process_gauge_is_not_reported(tmp_path: Path) -> None:
    dead = _set_live_workers(tmp_path, 5)
    assert (tmp_path / f"gauge_livemostrecent_{dead}.db").exists()
    # A restarted process reading fewer workers is believed, not the dead one's larger value.
    restarted = _set_live_workers(tmp_path, 2)
    assert _collect(tmp_path)["portal_live_workers"] == 2

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    code = "from api.app.core import metrics; print(metrics.forget_dead_processes())"
    done = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    assert done.stdout.strip() == str(sorted([dead, restarted]))
    assert not list(tmp_path.glob(f"gauge_*_{dead}.db")) and not list(tmp_path.glob(f"gauge_*_{restarted}.db"))


def test_api_processes_remove_their_gauge_files(settings: Settings, tmp_path: Path) -> None:
    api, url = start_api("metrics-gauges", settings, API_WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(tmp_path))

    def children() -> set[int]:
        """The running uvicorn worker processes (not multiprocessing's resource tracker)."""
        pids = set()
        for p in psutil.Process(api.proc.pid).children():
            with suppress(psutil.Error):  # a killed one is a zombie until uvicorn reaps it
                if "spawn_main" in " ".join(p.cmdline()):
                    pids.add(p.pid)
        return pids

    def gauge_pids() -> set[int]:
        return {int(f.stem.rsplit("_", 1)[1]) for f in tmp_path.glob("gauge_live*.db")}

    try:
        wait_until(lambda: len(children()) == 2 and gauge_pids() == children(), 60, "both API processes' gauges")
        killed = min(children())
        os.kill(killed, signal.SIGKILL)
        # uvicorn starts a new process, which removes the killed one's files when it starts.
        wait_until(lambda: len(children()) == 2 and killed not in children(), 60, "a new API process")
        wait_until(lambda: killed not in gauge_pids() and gauge_pids() == children(), 60, "the dead files gone")
        assert http_ok(f"{url}/metrics")
    finally:
        api.stop()
    assert not gauge_pids()
    assert list(tmp_path.glob("counter_*.db"))  # counts of every process stay


@pytest.mark.parametrize("processes", [1, 2])
async def test_gauges_tell_a_redis_outage_rather_than_freeze(
    processes: int, settings: Settings, private_redis: RedisServer, tmp_path: Path
) -> None:
    """With Redis gone the API can neither see a worker nor a queue: ``portal_live_workers`` is 0
    (an alert on no live worker fires), ``portal_queue_depth`` has no number (no sample, or NaN
    where several processes share PROMETHEUS_MULTIPROC_DIR), and ``portal_dependency_up`` says
    which dependency is out of reach, instead of the last values read before the outage."""
    multiprocess = {"API_WORKERS": "2", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)} if processes > 1 else {}
    api, url = start_api(
        "metrics-outage", settings, REDIS_URL=private_redis.url, RECONCILE_INTERVAL_SECONDS="0.5", **multiprocess
    )
    redis = Redis.from_url(private_redis.url)

    async def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with httpx.AsyncClient(base_url=url) as client:
            return await scrape(client)

    async def until(check: object, what: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        deadline = time.monotonic() + 20
        while not (check(now := await samples())):  # type: ignore[operator]
            assert time.monotonic() < deadline, (what, now)
            await asyncio.sleep(0.2)
        return now

    def depths(now: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> list[float]:
        return [v for (name, _), v in now.items() if name == "portal_queue_depth"]

    try:
        await _announce(redis, "metrics-worker")
        # PostgreSQL's gauge is set after the queues' in each refresh: a scrape between the two
        # in the first refresh has no PostgreSQL sample yet.
        before = await until(
            lambda now: value(now, "portal_live_workers") == 1
            and depths(now)
            and value(now, "portal_dependency_up", dependency="postgresql") == 1,
            "a live worker, the queues read and PostgreSQL reached",
        )
        assert value(before, "portal_dependency_up", dependency="redis") == 1
        await redis.aclose()
        await asyncio.to_thread(private_redis.stop)
        after = await until(
            lambda now: value(now, "portal_dependency_up", dependency="redis") == 0 == value(now, "portal_live_workers")
            and all(math.isnan(d) for d in depths(now)),
            "the outage told",
        )
        assert value(after, "portal_dependency_up", dependency="postgresql") == 1
        if processes == 1:
            assert not depths(after)
    finally:
        api.stop()
