"""One error model: what a request caused is a 4xx, what is out of reach a 503, our bug a 500
that names its request id, logged once with its traceback."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from api.app.core.config import Settings
from api.app.core.errors import concurrent_change, database_status
from api.app.main import create_app
from tests.conftest import Users, client_for
from tests.images import noise_png
from tests.support import free_port


async def _error(url: str, sql: str, params: dict[str, object] | None = None) -> BaseException:
    engine = create_async_engine(url, connect_args={"timeout": 2})
    try:
        async with engine.connect() as conn:
            await conn.execute(text("CREATE TEMP TABLE once (x int UNIQUE)"))
            await conn.execute(text("INSERT INTO once VALUES (1)"))
            await conn.execute(text(sql), params or {})
    except Exception as exc:
        return exc
    finally:
        await engine.dispose()
    raise AssertionError(f"{sql} succeeded")


async def test_database_errors_are_classified_by_who_caused_them(settings: Settings) -> None:
    url = settings.database_url
    assert database_status(await _error(url, "SELECT CAST(:v AS text)", {"v": "a\x00b"})) == 422
    assert database_status(await _error(url, "SELECT CAST(:v AS integer)", {"v": 2**31})) == 422
    assert database_status(await _error(url, "SELECT 1 OFFSET :v", {"v": 2**63})) == 422
    assert database_status(await _error(url, "INSERT INTO once VALUES (1)")) == 409
    assert database_status(await _error(url, "SELECT * FROM no_such_table")) == 500
    nowhere = url.rsplit("@", 1)[0] + f"@127.0.0.1:{free_port()}/postgres"
    assert database_status(await _error(nowhere, "SELECT 1")) == 503
    unresolvable = url.rsplit("@", 1)[0] + "@db.portal.invalid:5432/postgres"  # RFC 2606: never resolves
    assert database_status(await _error(unresolvable, "SELECT 1")) == 503
    assert database_status(OSError("disk full")) == 500


async def _deadlock(url: str) -> BaseException:
    """The error of the transaction PostgreSQL rolls back when two wait for each other."""
    engine = create_async_engine(url)
    both_hold = asyncio.Barrier(2)

    async def take(first: int, second: int) -> None:
        async with engine.begin() as conn:
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": first})
            await both_hold.wait()
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": second})

    try:
        outcomes = await asyncio.gather(take(7_001, 7_002), take(7_002, 7_001), return_exceptions=True)
    finally:
        await engine.dispose()
    [error] = [o for o in outcomes if isinstance(o, BaseException)]
    return error


async def test_a_deadlock_is_a_conflict_to_retry(settings: Settings) -> None:
    error = await _deadlock(settings.database_url)
    assert concurrent_change(error) and database_status(error) == 409
    assert not concurrent_change(await _error(settings.database_url, "INSERT INTO once VALUES (1)"))


@pytest.fixture
async def failing_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(settings)

    async def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    async for client in client_for(app):
        yield client


async def test_a_bug_is_a_500_naming_its_request_id_logged_once(
    failing_client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="api.request"):
        r = await failing_client.get("/boom", headers={"X-Request-ID": "report-me-42"})
    assert r.status_code == 500
    assert r.headers["x-request-id"] == "report-me-42" and r.json()["request_id"] == "report-me-42"
    assert "a bug" not in r.text, "internal error text reached the client"
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 1 and getattr(tracebacks[0], "request_id", None) == "report-me-42"


async def test_every_answer_carries_the_security_headers(failing_client: httpx.AsyncClient) -> None:
    for path, status in (("/health/live", 200), ("/v1/nothing-here", 404), ("/boom", 500)):
        r = await failing_client.get(path)
        assert r.status_code == status, path
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["x-request-id"], path


async def test_a_422_does_not_send_a_large_input_back(client: httpx.AsyncClient, users: Users) -> None:
    _, headers = await users.create()
    comment = "x" * 50_000
    r = await client.post("/v1/feedback", json={"prediction_id": "not-a-uuid", "comment": comment}, headers=headers)
    assert r.status_code == 422 and len(r.content) < 2_000, len(r.content)
    errors = r.json()["detail"]
    assert {tuple(e["loc"]) for e in errors} >= {("body", "prediction_id"), ("body", "comment")}
    small = next(e for e in errors if e["loc"] == ["body", "prediction_id"])
    assert small["input"] == "not-a-uuid", "a small input is still quoted as FastAPI does"

    # A model reference is bounded where it arrives, in the query and in JSON; a service's own 422
    # names no input at length either.
    huge = "a" * 60_000
    for r in (
        await client.post("/model/predict", params={"models": huge}, files={"file": ("n.png", b"x")}, headers=headers),
        await client.post("/v1/predictions", json={"image_id": str(uuid.uuid4()), "models": [huge]}, headers=headers),
        await client.post(
            "/model/predict", params={"models": ",".join(["m"] * 11)}, files={"file": ("n.png", b"x")}, headers=headers
        ),
    ):
        assert r.status_code == 422 and len(r.content) < 2_000, (len(r.content), r.text[:300])


async def test_a_422_is_strict_json(client: httpx.AsyncClient, users: Users) -> None:
    """Numbers JSON cannot write (1e999 reads as infinity) are quoted as strings."""
    _, headers = await users.create()

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    for score in ("1e999", "-1e999", "NaN", "Infinity"):
        r = await client.post(
            "/feedback/",
            content=f'{{"score": {score}, "predicted_class": "macaw"}}',
            headers={**headers, "Content-Type": "application/json"},
        )
        assert r.status_code == 422, r.text
        json.loads(r.text, parse_constant=refuse)


async def test_a_405_names_every_method_of_the_path(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> None:
    """Starlette named only the methods of the first route matching the path."""
    for path, allowed in (
        ("/v1/users", "GET, POST"),
        ("/v1/users/7", "DELETE, GET, PATCH"),
        ("/v1/images/00000000-0000-0000-0000-000000000000", "DELETE, GET"),
        ("/user/", "GET, POST"),
    ):
        r = await client.put(path, json={}, headers=admin_headers)
        assert (r.status_code, r.headers.get("allow")) == (405, allowed), path
        assert r.json() == {"detail": "Method Not Allowed"}
    r = await client.options("/v1/users", headers=admin_headers)
    assert (r.status_code, r.headers["allow"]) == (405, "GET, POST")


async def test_me_is_no_user_id(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> None:
    """PATCH and DELETE of /v1/users/me were routed to /v1/users/{user_id} and failed as a 422 on 'me'."""
    for method in ("PATCH", "DELETE"):
        r = await client.request(method, "/v1/users/me", headers=admin_headers)
        assert (r.status_code, r.headers.get("allow")) == (405, "GET"), method
    assert (await client.get("/v1/users/not-a-number", headers=admin_headers)).status_code == 404


async def test_a_malformed_body_is_a_400(client: httpx.AsyncClient, users: Users) -> None:
    _, headers = await users.create()
    r = await client.post(
        "/v1/images",
        content=b"--x\r\nnot a header\r\n\r\ndata\r\n--x--\r\n",
        headers={**headers, "Content-Type": "multipart/form-data; boundary=x"},
    )
    assert r.status_code == 400 and isinstance(r.json()["detail"], str)
    r = await client.post("/v1/feedback", content=b"\xff", headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 400 and isinstance(r.json()["detail"], str)


@pytest.mark.parametrize("kind", ["multipart image", "octet-stream"])
async def test_a_body_of_bytes_where_json_is_expected_is_422_not_500(
    client: httpx.AsyncClient, users: Users, kind: str
) -> None:
    """FastAPI's 422 quotes the body it could not read as JSON; bytes that are no UTF-8 (an
    image sent to a JSON route, a common mistake) must be quoted, not crash the answer."""
    _, headers = await users.create()
    if kind == "multipart image":
        r = await client.post("/v1/predictions", files={"file": ("a.png", noise_png(9401, 24))}, headers=headers)
    else:
        octets = {**headers, "Content-Type": "application/octet-stream"}
        r = await client.post("/v1/feedback", content=b"\x89PNG\xff\xfe", headers=octets)
    assert r.status_code == 422, (r.status_code, r.text[:200])
    json.dumps(r.json())  # a body any JSON reader takes
