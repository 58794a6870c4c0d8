"""PostgreSQL down: 503 at once with one log line per interval, then full recovery without restart.
Runs on a private PostgreSQL cluster, never the shared one."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from api.app.core.config import Settings
from api.app.core.db import make_engine, make_sessionmaker
from api.app.core.errors import OutageLog
from api.app.images.storage import LocalBlobStore
from api.app.main import create_app
from api.app.predictions import background, service
from api.prestart import migrate, seed_admin
from contracts import keys
from contracts.messages import JobMessage, Timings
from tests.api.conftest import done_answer
from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, client_for
from tests.images import noise_png
from tests.support import PostgresServer, RedisServer


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.init()
    server.start()
    yield server
    with contextlib.suppress(Exception):
        server.stop()


LOGIN = {"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD}


@pytest.fixture
async def signed_in(
    private_postgres: PostgresServer, settings: Settings
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    """The app on the private PostgreSQL, migrated and seeded, with its admin's headers."""
    private = settings.model_copy(update={"database_url": private_postgres.url})
    await asyncio.to_thread(migrate, private.database_url)
    await seed_admin(private)
    async for client in client_for(create_app(private)):
        r = await client.post("/login", data=LOGIN)
        headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
        assert (await client.get("/user/", headers=headers)).status_code == 200
        yield client, headers


async def test_postgres_outage_503_then_recovery(
    private_postgres: PostgresServer,
    signed_in: tuple[httpx.AsyncClient, dict[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, headers = signed_in
    caplog.set_level(logging.ERROR, logger="api.outage")
    await asyncio.to_thread(private_postgres.stop)
    answers = []
    for _ in range(15):
        start = time.perf_counter()
        r = await client.get("/user/", headers=headers)
        answers.append((r.status_code, time.perf_counter() - start, r.headers.get("retry-after")))
    assert all(code == 503 and seconds < 1.0 and retry for code, seconds, retry in answers), answers
    assert "database" in r.json()["detail"]
    ready = await client.get("/health/ready")
    assert ready.status_code == 503 and ready.json()["checks"]["postgresql"]["status"] == "fail"
    lines = [rec for rec in caplog.records if "postgresql unavailable" in rec.getMessage()]
    assert 1 <= len(lines) <= 2, [rec.getMessage() for rec in lines]

    await asyncio.to_thread(private_postgres.start)
    deadline = time.monotonic() + 20
    while (r := await client.get("/user/", headers=headers)).status_code != 200:
        assert time.monotonic() < deadline, r.text
        await asyncio.sleep(0.2)
    assert (await client.post("/login", data=LOGIN)).status_code == 200


async def test_keys_and_logins_refused_for_an_outage_are_no_failed_attempts(
    private_postgres: PostgresServer, private_redis: RedisServer, settings: Settings
) -> None:
    """A script retrying its key, or a person their login, through a database outage gets 503s
    that are not counted as failed guesses: neither is locked out (429) once PostgreSQL is back."""
    private = settings.model_copy(
        update={
            "database_url": private_postgres.url,
            "redis_url": private_redis.url,
            "login_max_failures_per_client": 3,
            "login_max_failures_per_email": 2,
        }
    )
    await asyncio.to_thread(migrate, private.database_url)
    await seed_admin(private)
    async for client in client_for(create_app(private)):
        r = await client.post("/login", data=LOGIN)
        headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
        r = await client.post("/v1/api-keys", json={"name": "nightly", "scopes": ["read"]}, headers=headers)
        assert r.status_code == 201, r.text
        key = {"X-API-Key": r.json()["key"]}
        await asyncio.to_thread(private_postgres.stop)
        refused = [await client.get("/v1/images", headers=key) for _ in range(5)]
        refused += [await client.post("/login", data=LOGIN) for _ in range(4)]
        assert [r.status_code for r in refused] == [503] * 9, [(r.status_code, r.text) for r in refused]
        await asyncio.to_thread(private_postgres.start)
        deadline = time.monotonic() + 20
        while (r := await client.get("/v1/images", headers=key)).status_code == 503:
            assert time.monotonic() < deadline, r.text
            await asyncio.sleep(0.2)
        assert r.status_code == 200, r.text
        assert (await client.post("/login", data=LOGIN)).status_code == 200


@pytest.mark.parametrize("route", ["/v1/images", "/model/predict?models=mobilenet_v2", "/v1/batches"])
async def test_an_upload_cut_off_by_an_outage_leaves_its_file_to_the_deletions_retry(
    private_postgres: PostgresServer,
    settings: Settings,
    worker: object,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    route: str,
) -> None:
    """PostgreSQL goes away after an upload's file is written and before its row commits: the
    upload is 503, and its file, which nothing could check then, is noted and deleted by the
    retry of deletions once PostgreSQL is back (it was left to ``sweep-blobs`` before)."""
    from api.app.images import service as images_service
    from api.app.images.storage import UNSETTLED_FOLDER

    # The suite's Redis and model worker: a prediction is admitted only for a version it serves.
    private = settings.model_copy(update={"database_url": private_postgres.url, "storage_dir": tmp_path})
    await asyncio.to_thread(migrate, private.database_url)
    await seed_admin(private)
    put = LocalBlobStore.put

    async def stored_then_cut_off(self: LocalBlobStore, sha256: str, data: bytes, *, preview: bytes | None) -> None:
        await put(self, sha256, data, preview=preview)
        await asyncio.to_thread(private_postgres.stop)

    data = noise_png(4711, 24)
    sha256 = hashlib.sha256(data).hexdigest()
    blob = tmp_path / sha256[:2] / sha256
    note = tmp_path / UNSETTLED_FOLDER / sha256
    async for client in client_for(create_app(private)):
        r = await client.post("/login", data=LOGIN)
        headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
        monkeypatch.setattr(LocalBlobStore, "put", stored_then_cut_off)
        form = {"models": "mobilenet_v2"} if route == "/v1/batches" else None
        r = await client.post(route, files={"file": ("x.png", data)}, data=form, headers=headers)
        assert r.status_code == 503, r.text
        assert blob.is_file() and note.is_file()
    await asyncio.to_thread(private_postgres.start)
    engine = make_engine(private)
    try:
        async with make_sessionmaker(engine)() as session:
            store = LocalBlobStore(tmp_path)
            # A note younger than the retry's period may be an upload still failing: left be.
            assert await images_service.retry_blob_deletions(session=session, store=store) == 0
            assert blob.is_file() and note.is_file()
            old = time.time() - images_service.BLOB_DELETION_RETRY_SECONDS - 60
            os.utime(note, (old, old))
            assert await images_service.retry_blob_deletions(session=session, store=store) == 1
    finally:
        await engine.dispose()
    assert not blob.exists() and not note.exists()


async def test_a_batch_whose_key_cannot_be_checked_for_an_outage_is_503_before_its_body(
    private_postgres: PostgresServer, settings: Settings
) -> None:
    """PostgreSQL down: a batch of a gigabyte with an API key is answered 503 at once. The key's
    lookup failed, and the API read the whole body before the route's 503, reopening the spool
    of up to MAX_BATCH_BYTES that refusing unknown keys first closed."""
    from contracts.api_keys import KEY_LENGTH, KEY_PREFIX
    from tests.api.test_body_limits import GIB, raw_request
    from tests.support import start_api

    private = settings.model_copy(update={"database_url": private_postgres.url})
    await asyncio.to_thread(migrate, private.database_url)
    await seed_admin(private)
    api, url = start_api("outage-keys", private)
    try:
        await asyncio.to_thread(private_postgres.stop)
        head = (
            "POST /v1/batches HTTP/1.1\r\nHost: test\r\n"
            f"X-API-Key: {KEY_PREFIX + 'Z' * (KEY_LENGTH - len(KEY_PREFIX))}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {GIB}\r\n"
        )
        status, answer, seconds = await asyncio.to_thread(raw_request, url, head, b"--x\r\n")
        assert status == 503 and "retry-after" in answer.lower() and seconds < 5, answer
    finally:
        api.stop()


async def test_a_postgres_that_hangs_gives_503_not_500(
    private_postgres: PostgresServer, signed_in: tuple[httpx.AsyncClient, dict[str, str]]
) -> None:
    """A PostgreSQL that hangs rather than refuses lets asyncpg's timeouts run out: on a pooled
    connection the statement's (``command_timeout``, 10 s), on a new one the connect timeout
    (2 s). Both are the database being unavailable, a 503 with ``Retry-After``, then recovery."""
    client, headers = signed_in
    with private_postgres.frozen():
        # The first reuses the pooled connection; the next have to open new ones.
        answers = [await client.get("/user/", headers=headers) for _ in range(2)]
        answers.append(await client.post("/login", data=LOGIN))
    assert [r.status_code for r in answers] == [503, 503, 503], [(r.status_code, r.text) for r in answers]
    assert all("database" in r.json()["detail"] and r.headers.get("retry-after") for r in answers)
    deadline = time.monotonic() + 20
    while (r := await client.get("/user/", headers=headers)).status_code != 200:
        assert time.monotonic() < deadline, r.text
        await asyncio.sleep(0.2)


async def test_a_postgres_that_hangs_is_an_outage_for_readiness_and_the_background_tasks(
    private_postgres: PostgresServer,
    signed_in: tuple[httpx.AsyncClient, dict[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Hung rather than refusing, PostgreSQL makes the background tasks (registry refresh,
    reconciler, batch lane, export runner, ...) meet asyncpg's TimeoutError: each is the outage it
    is, one line per OUTAGE_LOG_INTERVAL_SECONDS (10 s), not an error with a traceback every
    second or so. Readiness says so within its CHECK_SECONDS, not after the statement timeout."""
    client, _headers = signed_in
    caplog.set_level(logging.WARNING)
    with private_postgres.frozen():
        start = time.perf_counter()
        ready = await client.get("/health/ready")
        seconds = time.perf_counter() - start
        await asyncio.sleep(7)  # the tasks' connect (2 s) and statement (10 s) timeouts run out
    assert ready.status_code == 503 and seconds < 3.5, (ready.status_code, seconds)
    assert ready.json()["checks"]["postgresql"]["status"] == "fail"
    tracebacks = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info]
    assert not tracebacks, tracebacks
    lines = [r for r in caplog.records if "postgresql unavailable" in r.getMessage()]
    assert len(lines) == 1 and "TimeoutError" in lines[0].getMessage(), [r.getMessage() for r in lines]


def test_prestart_gives_up_with_a_readable_message(tmp_path: object) -> None:
    import subprocess
    import sys

    from tests.support import ROOT, free_port

    env = {
        "DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/portal",
        "DEPENDENCY_WAIT_ATTEMPTS": "2",
        "DEPENDENCY_WAIT_INTERVAL": "0.1",
        "LOG_JSON": "false",
        "PYTHONPATH": str(ROOT),
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, "-m", "api.prestart"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    attempts = [line for line in done.stderr.splitlines() if "waiting for PostgreSQL" in line]
    assert len(attempts) == 2 and "(attempt 1/2)" in attempts[0]
    assert "did not answer after 2 attempts" in done.stderr and "Traceback" not in done.stderr


async def test_the_api_starts_while_postgres_is_down_and_answers_503(
    private_postgres: PostgresServer, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening the pool at start-up must not keep the API from starting (compose may start it
    first): it starts, says how many connections it opened, answers 503 until PostgreSQL is up,
    then serves."""
    private = settings.model_copy(update={"database_url": private_postgres.url})
    await asyncio.to_thread(migrate, private.database_url)
    await seed_admin(private)
    await asyncio.to_thread(private_postgres.stop)
    caplog.set_level(logging.WARNING, logger="api.app.core.db")
    start = time.perf_counter()
    async for client in client_for(create_app(private)):
        assert time.perf_counter() - start < 10
        assert any("opened 0 of" in rec.getMessage() for rec in caplog.records)
        login = {"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
        r = await client.post("/login", data=login)
        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
        await asyncio.to_thread(private_postgres.start)
        deadline = time.monotonic() + 20
        while (r := await client.post("/login", data=login)).status_code != 200:
            assert time.monotonic() < deadline, r.text


async def test_the_api_starts_while_postgres_hangs(private_postgres: PostgresServer, settings: Settings) -> None:
    """A PostgreSQL that hangs at start-up (a frozen host, a cut network) is an outage as one that
    refuses: the API starts on the file's registry and answers 503, then serves once it is back."""
    private = settings.model_copy(update={"database_url": private_postgres.url})
    await asyncio.to_thread(migrate, private.database_url)
    await seed_admin(private)
    login = {"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
    with private_postgres.frozen():
        start = time.perf_counter()
        async for client in client_for(create_app(private)):
            assert time.perf_counter() - start < 15
            assert (await client.get("/health/live")).status_code == 200
            r = await client.post("/login", data=login)
            assert r.status_code == 503 and r.headers.get("retry-after"), r.text
            break
    async for client in client_for(create_app(private)):
        assert (await client.post("/login", data=login)).status_code == 200


def begin_smart_shutdown(server: PostgresServer) -> None:
    """``pg_ctl stop -m smart`` without waiting: the sessions open go on, new connections are
    refused with 57P03 "the database system is shutting down" until the last one ends."""
    done = server.server._run("pg_ctl", "stop", "-D", str(server.server.data), "-m", "smart", "-W")
    assert done.returncode == 0, done.stdout


async def test_a_refused_connection_during_a_restart_is_503_not_500(
    private_postgres: PostgresServer, settings: Settings
) -> None:
    private = settings.model_copy(update={"database_url": private_postgres.url})
    await asyncio.to_thread(migrate, private.database_url)
    await seed_admin(private)
    app = create_app(private)
    async for client in client_for(app):
        r = await client.post("/v1/auth/login", data={"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
        headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
        assert (await client.get("/v1/users/me", headers=headers)).status_code == 200
        held = await asyncpg.connect(private_postgres.url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await asyncio.to_thread(begin_smart_shutdown, private_postgres)
            # The restart ends the API's sessions; the one held here keeps the server shutting down.
            await held.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name LIKE 'portal-api:%' AND pid <> pg_backend_pid()"
            )
            await asyncio.sleep(0.3)
            codes = [(await client.get("/v1/users/me", headers=headers)).status_code for _ in range(3)]
            # The same refusal on a route that reads through a session (no driver): 503.
            session_route = await client.post(
                "/v1/auth/login", data={"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
            )
        finally:
            await held.close()
        assert session_route.status_code == 503, session_route.text
        assert codes == [503, 503, 503], codes


async def test_an_answer_refused_so_during_a_restart_is_retried_not_dead_lettered(
    private_postgres: PostgresServer, private_redis: RedisServer, settings: Settings, tmp_path: Path
) -> None:
    """The result collector (``background._process``) re-raises DB_ERRORS, leaving the answer
    pending to be retried; any other error counts as a failed attempt and, once the entry was
    delivered RESULT_MAX_ATTEMPTS times (reclaimed during a long outage), dead-letters the answer
    and acknowledges it. PostgreSQL refusing a connection while it restarts (57P03) is an outage:
    the answer must stay pending."""
    private = settings.model_copy(update={"database_url": private_postgres.url, "redis_url": private_redis.url})
    await asyncio.to_thread(migrate, private.database_url)
    engine = make_engine(private, pool_size=1, max_overflow=0)
    client = Redis.from_url(private.redis_url)
    rt = background.JobRuntime(
        settings=private,
        sessionmaker=make_sessionmaker(engine),
        engine=engine,
        redis=client,
        redis_blocking=client,
        store=LocalBlobStore(tmp_path),
        outage_log=OutageLog(60),
        live_registry=None,  # type: ignore[arg-type]
    )
    result = done_answer(
        uuid.uuid4(), uuid.uuid4(), "cat", model="mobilenet_v2", request_id="r", timings=Timings(), worker_id="w"
    )
    await client.xgroup_create(keys.RESULT_STREAM, keys.RESULT_GROUP, id="0", mkstream=True)
    entry_id = await client.xadd(keys.RESULT_STREAM, result.to_fields())
    await client.xreadgroup(keys.RESULT_GROUP, "c1", {keys.RESULT_STREAM: ">"})
    for _ in range(private.result_max_attempts - 1):  # reclaimed while PostgreSQL was down
        await client.xclaim(keys.RESULT_STREAM, keys.RESULT_GROUP, "c1", 0, [entry_id])
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(keys.RESULT_STREAM))
    held = await asyncpg.connect(private_postgres.url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await asyncio.to_thread(begin_smart_shutdown, private_postgres)
        with contextlib.suppress(Exception):
            await background._process(rt, entries)
    finally:
        await held.close()
        await engine.dispose()
    pending = await client.xpending(keys.RESULT_STREAM, keys.RESULT_GROUP)
    dead = await client.xlen(keys.RESULT_DEAD_LETTER_STREAM)
    await client.aclose()
    assert (pending["pending"], dead) == (1, 0), (pending, dead)


async def queued_prediction(
    client: httpx.AsyncClient, redis: Redis, headers: dict[str, str]
) -> tuple[asyncio.Task[httpx.Response], JobMessage]:
    """A /model/predict request waiting for its answer, and its job's message in the queue (no
    worker reads it)."""
    stream = keys.job_stream("mobilenet_v2", 1)
    before = await redis.xlen(stream)
    waiting = asyncio.create_task(
        client.post("/model/predict?models=mobilenet_v2@1", files={"file": ("n.png", noise_png())}, headers=headers)
    )
    deadline = time.monotonic() + 10
    while len(queued := cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(stream))) == before:
        assert time.monotonic() < deadline and not waiting.done(), "the job was never queued"
        await asyncio.sleep(0.1)
    return waiting, JobMessage.model_validate_json(queued[-1][1][b"meta"])


async def test_a_one_call_prediction_waits_through_a_short_database_outage(
    private_postgres: PostgresServer, private_redis: RedisServer, settings: Settings, everything_served: None
) -> None:
    """/model/predict accepted and waiting for its worker while PostgreSQL is down for a few
    seconds: the job's existence checks (every GONE_CHECK_SECONDS) meet the outage, the wait goes
    on, and the worker's answer once PostgreSQL is back is the 200 the client waits for, not a
    503 telling it to retry (a duplicate job, and no id to fetch this one's answer). Ended by the
    outage after all, the 503 names the job."""
    private = settings.model_copy(update={"database_url": private_postgres.url, "redis_url": private_redis.url})
    await asyncio.to_thread(migrate, private.database_url)
    await seed_admin(private)
    redis = Redis.from_url(private.redis_url)
    async for client in client_for(create_app(private)):
        r = await client.post("/login", data=LOGIN)
        headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
        waiting, job = await queued_prediction(client, redis, headers)
        await asyncio.to_thread(private_postgres.stop)
        await asyncio.sleep(2 * service.GONE_CHECK_SECONDS + 1)  # two existence checks meet the outage
        assert not waiting.done(), waiting.result().text
        await asyncio.to_thread(private_postgres.start)
        answer = done_answer(
            job.job_id, job.prediction_id, "cat", model="mobilenet_v2", request_id=job.request_id, worker_id="w"
        )
        await redis.xadd(keys.RESULT_STREAM, answer.to_fields())  # the worker answers
        r = await asyncio.wait_for(waiting, 30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["job_id"] == job.job_id and body["prediction"] == "cat", body

        # A bare wake-up (no answers in it) has the answers read from PostgreSQL, down by then.
        waiting, job = await queued_prediction(client, redis, headers)
        await asyncio.to_thread(private_postgres.stop)
        await redis.lpush(keys.job_done_key(job.job_id), b"")
        r = await asyncio.wait_for(waiting, 30)
        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
        assert f"/v1/predictions/{job.job_id}" in r.json()["detail"], r.text
        await asyncio.to_thread(private_postgres.start)
    await redis.aclose()
