"""The queue under failure and load, each test on its own Redis server and workers:
a worker killed mid-batch, Redis restarted, 300 concurrent jobs, a free event loop."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import time
import uuid
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import func, select, text

from api.app.core.config import Settings
from api.app.main import create_app
from api.app.predictions import queue, service
from api.app.predictions.models import Prediction
from contracts import keys, workers
from contracts.messages import Heartbeat, JobMessage, LabelScore, ModelState, PredictionStatus, ResultMessage
from tests.api.conftest import Stack, done_answer
from tests.api.test_predictions import noise_png, upload, wait_job
from tests.conftest import Users, client_for
from tests.support import (
    RedisServer,
    Service,
    entries,
    start_api,
    start_worker,
    streams_read,
    wait_for_worker,
    wait_until,
)

MODEL = "mobilenet_v2"


async def stored_once(app: FastAPI, job_ids: list[str]) -> None:
    async with app.state.sessionmaker() as session:
        counts = await session.execute(
            select(Prediction.job_id, func.count()).where(Prediction.job_id.in_(job_ids)).group_by(Prediction.job_id)
        )
        assert {str(j): n for j, n in counts} == {j: 1 for j in job_ids}


def reclaimed(metrics: str) -> float:
    """portal_reclaimed_jobs_total summed over its labels, from a /metrics text."""
    return sum(
        float(line.rpartition(" ")[2])
        for line in metrics.splitlines()
        if line.startswith("portal_reclaimed_jobs_total{")
    )


def announce(redis_url: str) -> None:
    """A heartbeat announcing the model with no worker behind it, so jobs can be queued first."""
    beat = Heartbeat(
        worker_id="announced",
        pid=0,
        hostname="nowhere",
        started_at=time.time(),
        models=[ModelState(name=MODEL, version=1, ready=True, num_classes=1000)],
    )
    with redis.Redis.from_url(redis_url).pipeline() as pipe:
        workers.announce(
            pipe, worker_id="announced", heartbeat_json=beat.model_dump_json(), ttl_ms=60_000, now=time.time()
        )
        pipe.execute()


async def submit(client: httpx.AsyncClient, headers: dict[str, str], count: int, model: str = MODEL) -> list[str]:
    images = [await upload(client, headers, noise_png(seed=None)) for _ in range(count)]
    jobs = []
    for image in images:
        r = await client.post("/v1/predictions", json={"image_id": image["id"], "models": [model]}, headers=headers)
        assert r.status_code == 202, r.text
        jobs.append(r.json()["job_id"])
    return jobs


@pytest.mark.parametrize(
    ("worker_env", "taken_over_within"),
    [
        # The worker hangs as far as its peers know: its jobs go once idle for VISIBILITY_TIMEOUT_MS.
        ({"VISIBILITY_TIMEOUT_MS": "3000"}, 120.0),
        # Its heartbeat is gone after HEARTBEAT_TTL_S: its jobs go then, long before the timeout.
        ({"VISIBILITY_TIMEOUT_MS": "600000", "HEARTBEAT_INTERVAL_S": "0.5", "HEARTBEAT_TTL_S": "2"}, 30.0),
    ],
    ids=["visibility-timeout", "heartbeat-gone"],
)
async def test_worker_killed_mid_batch_every_job_completes_once(
    stack: Stack, users: Users, worker_env: dict[str, str], taken_over_within: float
) -> None:
    await stack.start_workers(2, MAX_BATCH_SIZE="4", MAX_BATCH_DELAY_MS="20", **worker_env)
    _, headers = await users.create()
    images = [await upload(stack.client, headers, noise_png(seed=None)) for _ in range(40)]

    async def one(image: dict[str, Any]) -> str:
        r = await stack.client.post(
            "/v1/predictions", json={"image_id": image["id"], "models": [MODEL]}, headers=headers
        )
        assert r.status_code == 202, r.text
        return str(r.json()["job_id"])

    # The workers are stopped while the jobs arrive, so they meet a backlog of ten batches each: jobs
    # that arrive one by one can all be answered before a worker is caught holding one.
    reclaimed_before = reclaimed((await stack.client.get("/metrics")).text)
    for worker in stack.workers:
        worker.proc.send_signal(signal.SIGSTOP)
    try:
        announce(stack.redis_server.url)  # the stopped workers' heartbeats may lapse meanwhile
        jobs = list(await asyncio.gather(*(one(image) for image in images)))
    finally:
        for worker in stack.workers:
            worker.proc.send_signal(signal.SIGCONT)

    client = redis.Redis.from_url(stack.redis_server.url)
    stream = f"jobs:{MODEL}@1"

    def pending(name: str) -> int:
        return next((c["pending"] for c in client.xinfo_consumers(stream, "workers") if c["name"].decode() == name), 0)

    frozen: list[Service] = []

    def freeze_a_holder() -> bool:
        """SIGSTOP a worker while it holds jobs (a batch takes milliseconds: it must not finish)."""
        for worker in stack.workers:
            if pending(worker.name) > 0:
                worker.proc.send_signal(signal.SIGSTOP)
                if pending(worker.name) > 0:
                    frozen.append(worker)
                    return True
                worker.proc.send_signal(signal.SIGCONT)
        return False

    await asyncio.to_thread(wait_until, freeze_a_holder, 30, "a worker holding jobs", 0.001)
    victim = frozen[0]
    victim.kill()
    killed = time.monotonic()
    results = [await wait_job(stack.client, headers, j, within=120) for j in jobs]
    assert time.monotonic() - killed < taken_over_within
    assert [r["status"] for r in results] == ["done"] * len(jobs)
    await stored_once(stack.app, jobs)
    # The counter lives as long as the process: this test's reclaims are what it gained.
    assert reclaimed((await stack.client.get("/metrics")).text) > reclaimed_before
    survivors = {w.name for w in stack.workers if w.alive()}
    assert "reclaimed job" in "".join(w.log() for w in stack.workers if w.alive())
    async with stack.app.state.sessionmaker() as session:
        answered_by = set(await session.scalars(select(Prediction.worker_id).where(Prediction.job_id.in_(jobs))))
    assert survivors & answered_by


async def test_redis_restart_gives_503_then_recovers_without_losing_jobs(
    stack: Stack, users: Users, caplog: pytest.LogCaptureFixture
) -> None:
    await stack.start_workers(1)
    _, headers = await users.create()
    me = (await stack.client.get("/v1/users/me", headers=headers)).json()
    image = await upload(stack.client, headers, noise_png())
    jobs = await submit(stack.client, headers, 12)
    # A queued job whose image's file is gone from the store: it must fail, not hold up the others.
    orphan = await _queued_job_without_its_file(stack.app, me["id"])

    caplog.set_level(logging.ERROR, logger="api.outage")
    stack.redis_server.stop()
    answers = []
    for _ in range(20):
        start = time.perf_counter()
        r = await stack.client.post(
            "/v1/predictions", json={"image_id": image["id"], "models": [MODEL]}, headers=headers
        )
        answers.append((r.status_code, time.perf_counter() - start, r.headers.get("retry-after")))
    assert all(code == 503 and seconds < 1.0 and retry for code, seconds, retry in answers), answers
    outage_lines = [r for r in caplog.records if "redis unavailable" in r.getMessage()]
    assert 1 <= len(outage_lines) <= 3  # one line per interval, not one per request

    stack.redis_server.start()  # same port, empty: every stream and group is gone
    await _until_ok(lambda: stack.client.get("/v1/users/me", headers=headers))
    results = [await wait_job(stack.client, headers, j, within=120) for j in jobs]
    assert [r["status"] for r in results] == ["done"] * len(jobs)
    await stored_once(stack.app, jobs)
    failed = await wait_job(stack.client, headers, orphan, within=30)
    assert failed["status"] == "failed" and "missing" in failed["results"][0]["error"], failed
    # New predictions are admitted again once the worker's heartbeat, lost with Redis's data, is
    # back (every 2 s): until then a 503 with Retry-After, as during the outage.
    deadline = time.monotonic() + 30
    while True:
        r = await stack.client.post(
            "/v1/predictions", json={"image_id": image["id"], "models": [MODEL]}, headers=headers
        )
        if r.status_code != 503 or time.monotonic() > deadline:
            break
        assert r.headers.get("retry-after"), r.text
        await asyncio.sleep(0.2)
    assert r.status_code == 202, r.text
    assert (await wait_job(stack.client, headers, r.json()["job_id"]))["status"] == "done"


async def _queued_job_without_its_file(app: FastAPI, owner_id: int) -> str:
    """A queued job of ``MODEL``'s stable version whose image row names a file the store lacks."""
    version = next(
        m.version for m in app.state.live_registry.current.models if m.name == MODEL and m.channel == "stable"
    )
    job_id = uuid.uuid4()
    async with app.state.sessionmaker() as session:
        await session.execute(
            text("""
                WITH image AS (
                    INSERT INTO images (id, owner_id, sha256, format, width, height, bytes, filename, created_at)
                    VALUES (gen_random_uuid(), :owner, md5(random()::text) || md5(random()::text), 'PNG', 1, 1, 1,
                            'gone.png', now()) RETURNING id
                ), job AS (
                    INSERT INTO jobs (id, owner_id, image_id, status, request_id, deadline_at, created_at)
                    SELECT :job, :owner, id, 'queued', '', now() + interval '1 hour', now() FROM image RETURNING id
                )
                INSERT INTO predictions (id, job_id, position, model_name, model_version, status, top_k, cached,
                                         random_weights, created_at)
                SELECT gen_random_uuid(), id, 0, :model, :version, 'queued', '[]', false, false, now() FROM job
                """),
            {"owner": owner_id, "job": job_id, "model": MODEL, "version": version},
        )
        await session.commit()
    return str(job_id)


async def _until_ok(call: Any, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if (await call()).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        await asyncio.sleep(0.2)
    raise TimeoutError("the API did not answer 200")


async def test_300_concurrent_jobs_done_or_rejected(stack: Stack, users: Users) -> None:
    # A short batch delay: with none, a worker faster than the requests arrive (the in-process
    # API shares its loop with this test's 300 clients) answers each job alone.
    await stack.start_workers(2, MAX_BATCH_SIZE="16", MAX_BATCH_DELAY_MS="50")
    _, headers = await users.create()
    images = [await upload(stack.client, headers, noise_png()) for _ in range(300)]

    async def one(image: dict[str, Any]) -> httpx.Response:
        return await stack.client.post(
            "/v1/predictions", json={"image_id": image["id"], "models": ["sketch@1"]}, headers=headers
        )

    responses = await asyncio.gather(*(one(i) for i in images))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {202, 503}, codes
    assert all(r.headers.get("retry-after") for r in responses if r.status_code == 503)
    jobs = [r.json()["job_id"] for r in responses if r.status_code == 202]
    results = [await wait_job(stack.client, headers, j, within=120) for j in jobs]
    assert [r["status"] for r in results] == ["done"] * len(jobs)
    await stored_once(stack.app, jobs)
    assert max(r["results"][0]["timings"]["batch_size"] for r in results) > 1  # dynamic batching at work


@pytest.mark.serial
async def test_health_live_stays_fast_with_50_predictions_in_flight(
    stack: Stack, users: Users, settings: Settings
) -> None:
    """Measured on a real API process (uvicorn), so the client's own work does not share its loop."""
    await stack.start_workers(1)
    _, headers = await users.create()
    api, url = await asyncio.to_thread(
        start_api, "health-api", settings, REDIS_URL=stack.redis_server.url, MAX_JOBS_IN_FLIGHT_PER_USER="100"
    )
    try:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def classic(data: bytes) -> int:
                r = await client.post(
                    "/model/predict", params={"models": MODEL}, files={"file": ("n.png", data)}, headers=headers
                )
                return r.status_code

            in_flight = [asyncio.create_task(classic(noise_png())) for _ in range(50)]
            latencies = await asyncio.to_thread(_probe_live, url, stack.redis_server.url, stack.workers[0], in_flight)
            codes = await asyncio.gather(*in_flight)
    finally:
        api.stop()
    assert codes == [200] * 50
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"/health/live with 50 predictions in flight: p99 {p99 * 1000:.1f} ms over {len(latencies)} probes")
    assert len(latencies) >= 50 and p99 < 0.05, (len(latencies), p99)


def _probe_live(url: str, redis_url: str, worker: Service, in_flight: list[asyncio.Task[int]]) -> list[float]:
    """GET /health/live from another thread, one after another, from the moment all 50
    predictions are queued until they are answered. The worker is frozen for the first 1.5 s
    (batches take milliseconds): every request is then certainly still waiting."""
    stream = f"jobs:{MODEL}@1"
    client = redis.Redis.from_url(redis_url)
    wait_until(
        lambda: client.exists(stream) > 0 and client.xinfo_stream(stream)["entries-added"] >= 50, 30, "50 jobs queued"
    )
    worker.proc.send_signal(signal.SIGSTOP)
    resume_at = time.monotonic() + 1.5
    latencies = []
    try:
        with httpx.Client(base_url=url, timeout=10) as probe:
            while not all(t.done() for t in in_flight):
                if resume_at and time.monotonic() >= resume_at:
                    worker.proc.send_signal(signal.SIGCONT)
                    resume_at = 0.0
                start = time.perf_counter()
                assert probe.get("/health/live").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.01)
    finally:
        worker.proc.send_signal(signal.SIGCONT)
    return latencies


async def test_deadlines_504_and_expired_jobs_not_computed(
    private_redis: RedisServer, settings: Settings, users: Users
) -> None:
    _, headers = await users.create()
    impatient = settings.model_copy(
        update={
            "redis_url": private_redis.url,
            "predict_deadline_seconds": 0.5,
            "job_deadline_seconds": 0.5,
            "reconcile_interval_seconds": 3600.0,  # only the worker may expire these jobs
        }
    )
    announce(private_redis.url)  # the model is announced, but no worker reads its queue yet
    app = create_app(impatient)
    async for client in client_for(app):
        start = time.perf_counter()
        r = await client.post(
            "/model/predict", params={"models": MODEL}, files={"file": ("n.png", noise_png())}, headers=headers
        )
        assert r.status_code == 504 and "/v1/predictions/" in r.json()["detail"], r.text
        assert 0.5 <= time.perf_counter() - start < 2
        image = await upload(client, headers, noise_png())
        r = await client.post("/v1/predictions", json={"image_id": image["id"], "models": [MODEL]}, headers=headers)
        job_id = r.json()["job_id"]
        await asyncio.sleep(0.6)
        worker = start_worker(f"late-{time.monotonic_ns()}", private_redis.url)
        try:
            await asyncio.to_thread(wait_for_worker, private_redis.url, worker)
            job = await wait_job(client, headers, job_id)
        finally:
            worker.stop()
    # A stopped worker leaves the index of live workers at once, not when its heartbeat expires.
    live = redis.Redis.from_url(private_redis.url)
    assert live.zscore(workers.LIVE_WORKERS, worker.name) is None
    assert not live.exists(keys.heartbeat_key(worker.name))
    assert job["status"] == "expired"
    (result,) = job["results"]
    assert result["error"] == "deadline passed in the queue"
    assert result["top_k"] == [] and result["label"] is None and not result["timings"]["inference_ms"]


async def test_a_waiting_request_is_handed_its_answers(
    private_redis: RedisServer, settings: Settings, users: Users
) -> None:
    """/model/predict answers with what the notification that wakes it carries, without reading
    the job back; a bare wake-up (as API processes of earlier releases send) reads it back."""
    _, headers = await users.create()
    announce(private_redis.url)  # no worker: this test answers the jobs itself
    app = create_app(settings.model_copy(update={"redis_url": private_redis.url}))
    r = aioredis.Redis.from_url(private_redis.url)
    stream = keys.job_stream(MODEL, 1)

    def predict(client: httpx.AsyncClient) -> tuple[asyncio.Task[httpx.Response], str]:
        data = noise_png(seed=None)
        request = client.post(
            "/model/predict", params={"models": MODEL}, files={"file": ("n.png", data)}, headers=headers
        )
        return asyncio.create_task(request), hashlib.sha256(data).hexdigest()

    async def queued(sha256: str) -> JobMessage:
        """The job of this upload, once queued (the stream may also hold jobs re-enqueued from
        PostgreSQL that earlier tests left unfinished)."""
        last: bytes | str = "0"
        while True:
            ((_stream, read),) = streams_read(await r.xread({stream: last}, block=10_000))
            for _entry_id, fields in read:
                if (job := JobMessage.from_fields(fields)).sha256 == sha256:
                    return job
            last = read[-1][0]

    async def store(job: JobMessage, label: str) -> bytes | None:
        result = ResultMessage.answering(job, PredictionStatus.done, top_k=[LabelScore(label=label, score=1)])
        async with app.state.sessionmaker() as session:
            owner_id, payload = await service.store_result(session=session, result=result)
        assert owner_id is not None
        return payload

    async for client in client_for(app):
        waiting, sha256 = predict(client)
        job = await queued(sha256)
        handed = Prediction(
            id=uuid.UUID(job.prediction_id),
            model_name=MODEL,
            model_version=1,
            status="done",
            label="handed on",
            score=0.5,
            cached=False,
            random_weights=False,
        )
        # Only the notification has this answer: PostgreSQL still has the prediction queued.
        await queue.notify_done(r, {job.job_id: service.answers_payload([handed])}, 60)
        answer = (await waiting).json()
        assert (answer["success"], answer["prediction"], answer["job_id"]) == (True, "handed on", job.job_id)
        await store(job, "handed on")  # no unfinished job is left for later tests' reconcilers

        waiting, sha256 = predict(client)
        job = await queued(sha256)
        assert await store(job, "stored") is not None
        await r.rpush(keys.job_done_key(job.job_id), b"1")
        answer = (await waiting).json()
        assert (answer["success"], answer["prediction"], answer["job_id"]) == (True, "stored", job.job_id)
    await r.aclose()


async def test_poison_job_goes_to_dead_letter_and_fails_with_reason(stack: Stack, users: Users) -> None:
    _, headers = await users.create()
    announce(stack.redis_server.url)
    # Another job waits ahead of the poison one, as jobs re-enqueued from PostgreSQL may.
    healthy_id, job_id = await submit(stack.client, headers, 2)
    client = redis.Redis.from_url(stack.redis_server.url)
    stream = f"jobs:{MODEL}@1"
    client.xgroup_create(stream, "workers", id="0", mkstream=True)
    # Three workers took it and died before answering: delivered three times, never acknowledged.
    ((_, delivered),) = streams_read(client.xreadgroup("workers", "ghost-1", {stream: ">"}, count=1000))
    order = [JobMessage.from_fields(fields).job_id for _e, fields in delivered]
    assert order.index(healthy_id) < order.index(job_id)
    entry_id = delivered[order.index(job_id)][0]
    client.xclaim(stream, "workers", "ghost-2", min_idle_time=0, message_ids=[entry_id])
    client.xclaim(stream, "workers", "ghost-3", min_idle_time=0, message_ids=[entry_id])
    await stack.start_workers(1, VISIBILITY_TIMEOUT_MS="200", MAX_DELIVERIES="3")
    healthy = await wait_job(stack.client, headers, healthy_id, within=60)
    assert healthy["status"] == "done", healthy
    job = await wait_job(stack.client, headers, job_id, within=60)
    assert job["status"] == "failed"
    assert "gave up after 3 deliveries" in job["results"][0]["error"]
    dead = entries(client.xrange("jobs:dead"))
    assert len(dead) == 1 and dead[0][1][b"entry_id"] == entry_id
    assert job_id.encode() in dead[0][1][b"meta"]
    metrics = (await stack.client.get("/metrics")).text
    assert any(
        line.startswith("portal_dead_lettered_jobs_total{") and not line.endswith(" 0.0")
        for line in metrics.splitlines()
    )


async def test_an_answer_that_cannot_be_stored_fails_its_prediction_and_holds_up_nothing(
    private_redis: RedisServer, settings: Settings, users: Users
) -> None:
    private = settings.model_copy(
        update={"redis_url": private_redis.url, "result_claim_idle_seconds": 0.5, "result_max_attempts": 3}
    )
    async for client in client_for(create_app(private)):
        _, headers = await users.create()
        announce(private_redis.url)
        jobs = []
        for _ in range(2):
            image = await upload(client, headers, noise_png())
            r = await client.post("/v1/predictions", json={"image_id": image["id"], "models": [MODEL]}, headers=headers)
            assert r.status_code == 202, r.text
            jobs.append((await client.get(f"/v1/predictions/{r.json()['job_id']}", headers=headers)).json())

        def answer(job: dict[str, Any], worker_id: str) -> ResultMessage:
            return done_answer(job["job_id"], job["results"][0]["id"], model=MODEL, worker_id=worker_id)

        stream = redis.Redis.from_url(private_redis.url)
        failed_label = {"model": MODEL, "version": "1", "status": "failed"}
        failed_before = REGISTRY.get_sample_value("portal_jobs_total", failed_label) or 0.0
        # The first answer names a worker longer than its column: PostgreSQL refuses it every time.
        stream.xadd("results", answer(jobs[0], "w" * 300).to_fields())
        stream.xadd("results", answer(jobs[1], "w-1").to_fields())
        good = await wait_job(client, headers, jobs[1]["job_id"], within=30)
        assert good["status"] == "done" and good["results"][0]["label"] == "macaw"
        bad = await wait_job(client, headers, jobs[0]["job_id"], within=30)
        assert bad["status"] == "failed"
        assert bad["results"][0]["error"] == "its answer could not be stored after 3 attempts"
        (dead,) = entries(stream.xrange("results:dead"))
        assert ResultMessage.from_fields(dead[1]).job_id == jobs[0]["job_id"]
        assert stream.xpending("results", "api")["pending"] == 0
        # The prediction the API failed is counted as failed, once.
        assert REGISTRY.get_sample_value("portal_jobs_total", failed_label) == failed_before + 1


async def test_a_job_the_api_fails_is_counted_as_failed_once(
    private_redis: RedisServer, settings: Settings, users: Users
) -> None:
    """``fail_unfinished`` (the job queue out of reach when the job was sent, the image's file
    gone when Redis lost its streams) counts the predictions it failed in ``portal_jobs_total``,
    and a second call, finding them final, counts nothing."""
    private = settings.model_copy(update={"redis_url": private_redis.url})
    app = create_app(private)
    async for client in client_for(app):
        _, headers = await users.create()
        announce(private_redis.url)
        image = await upload(client, headers, noise_png())
        r = await client.post("/v1/predictions", json={"image_id": image["id"], "models": [MODEL]}, headers=headers)
        assert r.status_code == 202, r.text
        job_id = uuid.UUID(r.json()["job_id"])
        failed_label = {"model": MODEL, "version": "1", "status": "failed"}
        before = REGISTRY.get_sample_value("portal_jobs_total", failed_label) or 0.0
        for _ in range(2):
            async with app.state.sessionmaker() as session:
                await service.fail_unfinished(session=session, job_id=job_id, reason="the job queue was unavailable")
        job = (await client.get(f"/v1/predictions/{job_id}", headers=headers)).json()
        assert job["status"] == "failed" and job["results"][0]["error"] == "the job queue was unavailable"
        assert REGISTRY.get_sample_value("portal_jobs_total", failed_label) == before + 1


async def test_every_redis_key_but_the_streams_expires(stack: Stack, users: Users) -> None:
    await stack.start_workers(1)
    _, headers = await users.create()
    await stack.client.post("/login", data={"username": "nobody@example.com", "password": "wrong-password"})
    r = await stack.client.post(
        "/model/predict", params={"models": MODEL}, files={"file": ("n.png", noise_png())}, headers=headers
    )
    assert r.status_code == 200
    await stack.client.post("/v1/auth/logout", headers=headers)
    client = redis.Redis.from_url(stack.redis_server.url)
    kinds: dict[str, int] = {}
    for key in client.scan_iter(count=1000):
        name = key.decode()
        if client.type(key) == b"stream":
            assert client.xinfo_stream(key)["length"] <= 100_000
            continue
        kinds[name.split(":")[0]] = kinds.get(name.split(":")[0], 0) + 1
        assert client.ttl(key) != -1, name  # -1: no expiry; -2: gone meanwhile (a released lock)
    assert {"worker", "workers", "labels", "cache", "prediction", "throttle", "queue", "registry"} <= set(kinds), kinds
