"""A client's X-Request-ID reaches the logs only when it is short and plain; otherwise a fresh id does."""

from __future__ import annotations

import logging
import re
import signal
import socket
import threading
import time
import uuid
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from sqlalchemy import select

from api.app.core.config import Settings
from api.app.predictions.models import Job
from contracts.messages import JobMessage
from tests.api.test_predictions import noise_png
from tests.api.test_queue_resilience import MODEL, announce
from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, Users
from tests.support import RedisServer, start_api, wait_until

FRESH = re.compile(r"[0-9a-f]{32}")


async def _request_id(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, given: str) -> str:
    """The id the API answered with, after checking its request log line carries the same id."""
    caplog.clear()
    r = await client.get("/health/live", headers=[(b"X-Request-ID", given.encode("latin-1"))])
    assert r.status_code == 200
    [record] = [r for r in caplog.records if r.name == "api.request"]
    assert record.request_id == r.headers["x-request-id"]  # type: ignore[attr-defined]
    return r.headers["x-request-id"]


@pytest.mark.parametrize("given", ["trace-1", "a.b_C-9", "x" * 64])
async def test_a_well_formed_request_id_is_kept(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, given: str
) -> None:
    caplog.set_level(logging.INFO, logger="api.request")
    assert await _request_id(client, caplog, given) == given


@pytest.mark.parametrize(
    "given",
    [
        'ok\n{"level": "ERROR", "message": "forged"}',  # a second, forged log line
        "ok\r\nSet-Cookie: a=b",
        "x" * 65,
        "x" * 10_000,
        "with space",
        "caf\xe9",
        "",
        "batch-1",  # marks a batch's jobs, which a person's in-flight cap does not count
    ],
)
async def test_any_other_request_id_is_replaced_by_a_fresh_one(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, given: str
) -> None:
    caplog.set_level(logging.INFO, logger="api.request")
    answered = await _request_id(client, caplog, given)
    assert FRESH.fullmatch(answered), answered
    assert "forged" not in caplog.text and "Set-Cookie" not in caplog.text


@pytest.mark.usefixtures("worker")
async def test_a_request_id_like_a_batchs_does_not_escape_the_in_flight_cap(
    app: Any, users: Users, client: httpx.AsyncClient
) -> None:
    """Jobs of a request id starting with ``batch-`` are a batch's, outside a person's in-flight
    cap: a client choosing such an id is given a fresh one, which its job carries."""
    _, headers = await users.create()
    image = (await client.post("/v1/images", files={"file": ("n.png", noise_png())}, headers=headers)).json()
    sent = {**headers, "X-Request-ID": "batch-mine"}
    r = await client.post("/v1/predictions", json={"image_id": image["id"], "models": ["sketch@1"]}, headers=sent)
    assert r.status_code == 202, r.text
    assert FRESH.fullmatch(r.headers["x-request-id"])
    async with app.state.sessionmaker() as session:
        stored = await session.scalar(select(Job.request_id).where(Job.id == uuid.UUID(r.json()["job_id"])))
    assert stored == r.headers["x-request-id"]


def test_a_request_cut_by_a_shutdown_is_answered_503_not_500(settings: Settings) -> None:
    """An upload still being received when the API stops (SIGTERM, past its graceful-shutdown
    time) is answered 503 with Retry-After, which a client sends again, not a bare 500."""
    service, url = start_api("shutdown-503", settings, API_GRACEFUL_SHUTDOWN_SECONDS="1")
    try:
        r = httpx.post(f"{url}/v1/auth/login", data={"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
        head = (
            "POST /v1/images HTTP/1.1\r\nHost: test\r\n"
            f"Authorization: Bearer {r.json()['access_token']}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n"
            "Content-Length: 100000\r\n\r\n"
            '--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        )
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=15) as sock:
            sock.sendall(head.encode("latin-1") + b"\0" * 1000)  # the rest never comes
            time.sleep(0.5)
            service.proc.send_signal(signal.SIGTERM)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        service.proc.wait(timeout=15)
    finally:
        service.kill()
    status_line, _, rest = answer.decode("latin-1").partition("\r\n")
    assert status_line.split(" ")[1] == "503", answer
    assert "retry-after: 2" in rest.lower() and "send the request again" in rest, answer


def test_a_prediction_cut_by_a_shutdown_names_the_job_it_stored(settings: Settings, private_redis: RedisServer) -> None:
    """``POST /model/predict`` waits for its answers. Cut by the server stopping, the job it stored
    goes on, so the 503 names it: asked only to send the photo again, a client would make a
    duplicate and never read this job's answer."""
    announce(private_redis.url)  # the model is served, but no worker takes the job: it waits
    service, url = start_api("shutdown-job", settings, API_GRACEFUL_SHUTDOWN_SECONDS="1", REDIS_URL=private_redis.url)
    queued = redis.Redis.from_url(private_redis.url)
    answers: list[httpx.Response] = []
    try:
        token = httpx.post(f"{url}/v1/auth/login", data={"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}

        def predict() -> None:
            files = {"file": ("n.png", noise_png())}
            answers.append(httpx.post(f"{url}/model/predict", params={"models": MODEL}, files=files, headers=headers))

        waiting = threading.Thread(target=predict)
        waiting.start()
        stream = f"jobs:{MODEL}@1"
        wait_until(lambda: bool(queued.exists(stream)) and queued.xlen(stream) == 1, 15, "the job queued")
        service.proc.send_signal(signal.SIGTERM)
        waiting.join(15)
        service.proc.wait(timeout=15)
    finally:
        service.kill()
    [(_, fields)] = cast(list[tuple[bytes, dict[bytes, bytes]]], queued.xrange(stream))
    job_id = JobMessage.from_fields(fields).job_id
    [answer] = answers
    assert answer.status_code == 503, answer.text
    assert "retry-after" not in answer.headers  # retried as told, the photo would make a second job
    assert answer.json()["job_id"] == job_id
    assert f"GET /v1/predictions/{job_id}" in answer.json()["detail"]


def test_a_body_that_stops_arriving_is_answered_408_and_a_slow_one_is_not(settings: Settings) -> None:
    """A client that sends part of an upload and goes quiet without closing held its connection,
    and the part spooled to disk, for good (uvicorn sets no limit on the time between two reads of
    a body): after BODY_IDLE_TIMEOUT_SECONDS of silence it is answered 408 and the connection
    closed. One that keeps sending, however slowly, is not cut off."""
    service, url = start_api("body-idle", settings, BODY_IDLE_TIMEOUT_SECONDS="1.5")
    parts = urlsplit(url)
    try:
        r = httpx.post(f"{url}/v1/auth/login", data={"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
        png = noise_png()
        body = (
            b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--x--\r\n"
        )
        head = (
            "POST /v1/images HTTP/1.1\r\nHost: test\r\n"
            f"Authorization: Bearer {r.json()['access_token']}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1")
        with socket.create_connection((parts.hostname, parts.port), timeout=15) as sock:
            sock.sendall(head + body[:100])  # the rest never comes
            started = time.monotonic()
            answer = b""
            while chunk := sock.recv(65536):  # until the server closes the connection
                answer += chunk
            waited = time.monotonic() - started
        status_line, _, rest = answer.decode("latin-1").partition("\r\n")
        assert status_line.split(" ")[1] == "408", answer
        assert "stopped arriving" in rest and 1.4 < waited < 10, (waited, answer)
        # A chunk every 0.5 s for about 3 s: slow, never silent for 1.5 s.
        with socket.create_connection((parts.hostname, parts.port), timeout=15) as sock:
            sock.sendall(head)
            step = len(body) // 6 + 1
            for at in range(0, len(body), step):
                sock.sendall(body[at : at + step])
                time.sleep(0.5)
            answer = sock.recv(65536)
        assert answer.split(b" ")[1] == b"201", answer
    finally:
        service.kill()
